"""The layout of the visible tokens of a masked batch, stage by stage: what every layer that works on visible
tokens reads, built once per step from the mask (:func:`build_visible_layout`), exact or of static shape.

Per stage: the raster index of each visible token; the children of each token in the previous stage (patch
merging, strided patch embedding); the tokens under each pooled cell (the stride-``p`` convolution of global
sub-sampled attention); the neighbour map of a depthwise convolution (:func:`greenmim.kernels.neighbour_map`); and
for each (window, shift) of its blocks the attention groups: the segments (a window, and under shifted windows one
of its :data:`SHIFT_REGIONS` x :data:`SHIFT_REGIONS` shift regions) packed by Optimal Grouping
(:mod:`greenmim.grouping`). Packing shift *regions* rather than whole windows (the paper packs windows) gives
smaller items and less padding; attention is unchanged because tokens of different regions never attend to each
other.

**Exact layouts** (``static=False``) have the shapes of their mask: ``G`` groups of the ``g_s`` that Eq. 8 picks,
and index maps of one image (``[N]``, ``[M, k]``) for a batch-wise mask. The cheapest for eager steps.

**Static layouts** (``static=True``) have the same tensor shapes and Python values for every mask with the same
grid, number of visible units and batch size, batch-wise or per image, so a compiled step never recompiles and a
CUDA graph replays: every map is per image (``[B, N]``, ...; a batch-wise mask repeated), the mask ``[B, Hm, Wm]``,
and each (window, shift) has ``S`` = :func:`~greenmim.kernels.groups.tile_group_size` of its largest possible
segment (a group fills the kernel's tiles) and a fixed capacity of ``G`` groups (:func:`group_capacity`), the groups
past the packing's all padding (the kernels skip them). Optimal Grouping still decides which segments share a group.

Everything here is a pure function of the mask, runs on the host with numpy, vectorised over the images, and can
run in DataLoader workers (:func:`pack_layout` / :func:`layout_to`: one buffer, one host-to-device copy).
"""
import functools
import math
from dataclasses import dataclass, fields, replace
from typing import Dict, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from greenmim.grouping import POOLED_COST_TOLERANCE, optimal_histogram_grouping, place_segments
from greenmim.kernels import AttentionLayout, neighbour_map, tile_group_size
from greenmim.masking import unit_indices

__all__ = [
    'AttentionLayout', 'StageLayout', 'VisibleLayout', 'StageSpec', 'CHILDREN_ORDERS', 'SHIFT_REGIONS',
    'check_stage_specs', 'group_capacity', 'build_visible_layout', 'PackedLayout', 'PackedMap', 'pack_layout',
    'layout_to',
]

Shift = Tuple[int, int]
Window = Tuple[int, int]

#: Regions per axis of a shifted window (Swin's ``[0, R - W)``, ``[R - W, R - s)``, ``[R - s, R)`` in the rolled
#: frame): a window holds up to ``SHIFT_REGIONS ** 2`` segments.
SHIFT_REGIONS = 3
CHILDREN_ORDERS = ('rows', 'columns')


@dataclass(frozen=True)
class StageSpec:
    """Static description of a stage.

    Attributes:
        grid_size: ``(Rh, Rw)`` token grid; a multiple of the mask grid.
        channels: token width ``C`` (for the grouping cost, Eq. 8).
        windows: the (window, shift) pairs of its window-attention blocks.
        merges_previous_stage: the stage starts by embedding each ``f x f`` neighbourhood of the previous stage's
            tokens (``f`` = previous grid / this grid: Swin's patch merging, Twins' strided patch embedding); the
            first stage embeds pixels instead.
        children_order: order of those children: ``'rows'`` (``(dh, dw)`` in raster order, a convolution weight's
            ``(kh, kw)``) or ``'columns'`` (Swin's x00, x10, x01, x11).
        pool_size: ``p``: the stage summarises each ``p x p`` cell of its grid into one token (Twins' global
            sub-sampled attention, whose keys and values come from a stride-``p`` convolution); ``None``: no pooling.
        conv_kernel: ``(kh, kw)`` of a stride-1 depthwise convolution on the stage's tokens (Twins' position
            encoding); ``None``: none.
    """
    grid_size: Tuple[int, int]
    channels: int
    windows: Tuple[Tuple[Window, Shift], ...] = ()
    merges_previous_stage: bool = False
    children_order: str = 'rows'
    pool_size: Optional[int] = None
    conv_kernel: Optional[Tuple[int, int]] = None


@dataclass(frozen=True)
class StageLayout:
    """Visible tokens of one stage.

    A batch-wise mask's exact layout gives index tensors of one image (``[N]``, ``[M, k]``), the same for every
    image; per-image masks and static layouts give them per image (``[B, N]``, ``[B, M, k]``), child indices then
    addressing the flattened ``[B * N']`` tokens of the previous stage.

    Attributes:
        grid_size: ``(Rh, Rw)`` token grid of the stage.
        num_tokens: ``N``, visible tokens per image.
        token_index: long ``[N]`` or ``[B, N]``: raster index (in ``Rh * Rw``) of each visible token.
        merge_index: long ``[N, f * f]`` or ``[B, N, f * f]`` for a stage that embeds ``f x f`` neighbourhoods of the
            previous stage's tokens: index of each token's children in the previous stage's visible tokens (order:
            the spec's ``children_order``); ``None`` for the first stage.
        attention: ``{(window, shift): AttentionLayout}`` for each block configuration of the stage.
        pool_index: long ``[M, p * p]`` or ``[B, M, p * p]`` for a stage with ``pool_size`` ``p``: the visible tokens
            under each of the ``M`` visible ``p x p`` cells (raster order of the pooled grid; tokens in a convolution
            weight's ``(kh, kw)`` order); ``None`` otherwise.
        neighbours: int32 ``[B * N, kh * kw]`` for a stage with a ``conv_kernel``: the neighbour map of a
            stride-1 depthwise convolution over the flattened batch (-1 = masked or outside); ``None`` otherwise.
    """
    grid_size: Tuple[int, int]
    num_tokens: int
    token_index: torch.Tensor
    merge_index: Optional[torch.Tensor]
    attention: Dict[Tuple[Window, Shift], AttentionLayout]
    pool_index: Optional[torch.Tensor] = None
    neighbours: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class VisibleLayout:
    """The layout of a masked batch: one :class:`StageLayout` per stage, and the mask it was built from.

    Attributes:
        stages: one per stage (also ``layout[s]``, ``len(layout)``, ``iter(layout)``).
        mask: bool, on the layout's device: the mask as given (``[Hm, Wm]`` or ``[B, Hm, Wm]``), or
            ``[B, Hm, Wm]`` in a static layout (a batch-wise mask repeated).
        masked_units: long ``[m]`` or ``[B, m]`` (static: ``[B, m]``): raster indices of the masked units (the
            visible ones are the last stage's ``token_index``).
        host_mask: ``mask`` on the CPU (host-side checks and pictures; not read in a step).
        batch_size: ``B``, the images the index maps address.
        static: built with ``static=True``.
        specs: the stage specs it was built for.
    """
    stages: Tuple[StageLayout, ...]
    mask: torch.Tensor
    masked_units: torch.Tensor
    host_mask: torch.Tensor
    batch_size: int
    static: bool
    specs: Tuple[StageSpec, ...]

    def __getitem__(self, stage: int) -> StageLayout:
        return self.stages[stage]

    def __len__(self) -> int:
        return len(self.stages)

    def __iter__(self):
        return iter(self.stages)

    @property
    def device(self) -> torch.device:
        return self.mask.device


def check_stage_specs(specs: Sequence[StageSpec], mask_grid: Tuple[int, int]) -> None:
    """Raise ``ValueError`` unless every stage lines up with the mask units: stage grids (and pooled grids) are
    multiples of ``mask_grid``, windows tile their grid, and a merging stage's grid divides the previous one."""
    previous = None
    for i, spec in enumerate(specs):
        grid = spec.grid_size
        if grid[0] % mask_grid[0] or grid[1] % mask_grid[1]:
            raise ValueError(f'stage {i} grid {grid} is not a multiple of the mask grid {mask_grid}')
        for (wh, ww), _ in spec.windows:
            if grid[0] % wh or grid[1] % ww:
                raise ValueError(
                    f'stage grid {grid} is not divisible by window {(wh, ww)}: forward_visible needs whole windows '
                    '(choose the image or window size accordingly)')
        if spec.merges_previous_stage:
            f = previous[0] // grid[0] if previous else 0
            if not f or previous != (f * grid[0], f * grid[1]):
                raise ValueError(f'stage {i} grid {grid} does not tile the previous stage grid {previous}')
        if spec.children_order not in CHILDREN_ORDERS:
            raise ValueError(f'children_order {spec.children_order!r} is not one of {CHILDREN_ORDERS}')
        p = spec.pool_size
        if p is not None and (grid[0] % (p * mask_grid[0]) or grid[1] % (p * mask_grid[1])):
            raise ValueError(f'stage {i}: pooling {p}x{p} cells of the {grid} grid straddles the mask units '
                             f'({mask_grid} grid): the grid must be a multiple of {p} x the mask grid')
        previous = grid


def _segments(coords: np.ndarray, grid: Tuple[int, int], window: Window, shift: Shift):
    """Segment id and in-window position of each token ``coords [..., 2]`` under ``window`` and ``shift``."""
    (rh, rw), (wh, ww), (sh, sw) = grid, window, shift
    h = (coords[..., 0] - sh) % rh
    w = (coords[..., 1] - sw) % rw
    win = (h // wh) * (rw // ww) + (w // ww)
    reg_h = (h >= rh - wh).astype(np.int64) + (h >= rh - sh).astype(np.int64) if sh else np.zeros_like(h)
    reg_w = (w >= rw - ww).astype(np.int64) + (w >= rw - sw).astype(np.int64) if sw else np.zeros_like(w)
    return (win * SHIFT_REGIONS + reg_h) * SHIFT_REGIONS + reg_w, (h % wh) * ww + (w % ww)


def _static_group_size(window: Window, num_tokens: int) -> int:
    """``S`` of a static layout: a segment lies in one window and one image, so it holds at most
    ``min(Wh * Ww, N)`` tokens; :func:`~greenmim.kernels.groups.tile_group_size` of that."""
    return tile_group_size(min(window[0] * window[1], num_tokens))


@functools.lru_cache(maxsize=None)
def group_capacity(grid: Tuple[int, int], window: Window, shift: Shift, mask_grid: Tuple[int, int],
                   visible_units: int) -> int:
    """Groups of a static layout per image: no mask of ``visible_units`` visible units of ``mask_grid`` (the stage's
    token ``grid``) packs its segments under ``(window, shift)`` into more.

    Proof. Let ``N`` be an image's visible tokens and ``S`` the static group size. (a) Algorithm 1 leaves no two
    groups whose fills add up to at most ``S`` (the earlier would not be a maximal subset), so at most one group
    is at most half full: ``N > (n - 1) S / 2``, i.e. ``n <= ceil(2 N / S)``; pooled over ``B`` images with the same
    ``N``, ``n <= ceil(2 B N / S) <= B ceil(2 N / S)``. (b) A group holds at least one segment, and the segments of
    an image are at most the distinct (window, region) pairs its visible units touch: at most the sum of the
    ``visible_units`` largest per-unit counts, and at most all the grid's segments. The capacity is the smaller of
    (a) and (b); the tests check it on adversarial masks (e.g. every visible unit in its own window).
    """
    (rh, rw), (hm, wm) = grid, mask_grid
    uh, uw = rh // hm, rw // wm
    num_tokens = visible_units * uh * uw
    coords = np.stack(np.meshgrid(np.arange(rh), np.arange(rw), indexing='ij'), -1)
    segment, _ = _segments(coords, grid, window, shift)  # [Rh, Rw]
    per_unit = segment.reshape(hm, uh, wm, uw).transpose(0, 2, 1, 3).reshape(hm * wm, uh * uw)
    touched = np.sort([len(np.unique(row)) for row in per_unit])[::-1]
    by_segments = min(int(touched[:visible_units].sum()), len(np.unique(segment)))
    by_pairs = -(-2 * num_tokens // _static_group_size(window, num_tokens))
    return min(by_pairs, by_segments)


def _attention_slots(coords, grid, window, shift, channels, group_size):
    """``[3, G, S]`` int32 (token index into the flattened ``[I * N]``, segment, position) for the tokens
    ``coords [I, N, 2]`` of ``I`` images: Algorithm 1 for one image, the pooled packing (the fewest padded slots
    within :data:`~greenmim.grouping.POOLED_COST_TOLERANCE` of the least Eq. 8 cost) for several."""
    segment, position = _segments(coords, grid, window, shift)
    windows = (grid[0] // window[0]) * (grid[1] // window[1])
    segment = (segment + SHIFT_REGIONS ** 2 * windows * np.arange(len(coords))[:, None]).ravel()  # unique per image
    position = position.ravel()
    order = np.argsort(segment, kind='stable')
    _, starts, counts = np.unique(segment[order], return_index=True, return_counts=True)
    tolerance = POOLED_COST_TOLERANCE if len(coords) > 1 else 0.0
    packing, g_s = optimal_histogram_grouping(np.bincount(counts), channels, group_size, tolerance)
    group, offset = place_segments(counts, packing)
    of_token = np.repeat(np.arange(len(counts)), counts)  # segment of each token in ``order``
    g, s = group[of_token], offset[of_token] + np.arange(len(order)) - starts[of_token]
    slots = np.full((3, int(group.max()) + 1, g_s), -1, dtype=np.int32)
    slots[2] = 0
    slots[:, g, s] = order, segment[order], position[order]
    return slots


def _visible_coords(unit: np.ndarray, grid: Tuple[int, int]) -> np.ndarray:
    """``[I, N, 2]`` (row, col) of the visible cells of ``grid`` under the unit masks ``unit [I, Hm, Wm]`` (each
    with ``N`` visible cells), raster order."""
    visible = np.repeat(np.repeat(unit, grid[0] // unit.shape[1], axis=1), grid[1] // unit.shape[2], axis=2)
    return np.argwhere(visible)[:, 1:].reshape(len(unit), -1, 2)


def _children(coords: np.ndarray, fine_lookup: np.ndarray, factor: int, order: str) -> np.ndarray:
    """``[I, N, f * f]``: the fine-grid tokens (``fine_lookup [I, f Rh, f Rw]``, token or -1) under each coarse cell
    ``coords [I, N, 2]``, in ``order`` (:data:`CHILDREN_ORDERS`)."""
    offsets = [(dh, dw) for dh in range(factor) for dw in range(factor)]
    if order == 'columns':
        offsets = [(dh, dw) for dw, dh in offsets]
    image = np.arange(len(coords))[:, None]
    return np.stack([fine_lookup[image, factor * coords[..., 0] + dh, factor * coords[..., 1] + dw]
                     for dh, dw in offsets], -1)


def _attention_layouts(coords, spec: StageSpec, batch_size: int, device, group_size, capacity) -> Dict:
    """``{(window, shift): AttentionLayout}`` over the batch for every block configuration of ``spec``; the slots
    of one image (``coords`` ``[1, N, 2]``: a batch-wise mask) are repeated for every image. ``capacity``:
    ``(mask_grid, visible_units)`` of a static layout (its group size and :func:`group_capacity`), else ``None``."""
    attention = {}
    copies, n = batch_size // len(coords), coords.shape[0] * coords.shape[1]
    for window, shift in spec.windows:
        static_size = _static_group_size(window, coords.shape[1]) if capacity else group_size
        slots = _attention_slots(coords, spec.grid_size, window, shift, spec.channels, static_size)
        g = slots.shape[1]
        batched = np.tile(slots, (1, copies, 1))
        offsets = np.repeat(np.arange(copies, dtype=np.int32) * n, g)[:, None]
        batched[0] = np.where(batched[0] >= 0, batched[0] + offsets, -1)
        if capacity:
            limit = batch_size * group_capacity(spec.grid_size, window, shift, *capacity)
            if batched.shape[1] > limit:  # the bound of group_capacity, proved in its docstring
                raise RuntimeError(f'{batched.shape[1]} groups exceed the static capacity {limit}')
            spare = np.full((3, limit - batched.shape[1], static_size), -1, dtype=np.int32)
            spare[2] = 0
            batched = np.concatenate([batched, spare], 1)
        index, segment, position = torch.from_numpy(batched).to(device).unbind(0)
        attention[(window, shift)] = AttentionLayout(index, segment, position, window)
    return attention


def build_visible_layout(
        mask: torch.Tensor,
        specs: Sequence[StageSpec],
        batch_size: int,
        device: Optional[torch.device] = None,
        group_size: Optional[int] = None,
        static: bool = False,
) -> VisibleLayout:
    """Layout of the visible tokens of every stage for a batch sharing ``mask`` or with one mask per image.

    Args:
        mask: bool ``[Hm, Wm]`` (one mask for the batch) or ``[B, Hm, Wm]`` (one per image, each with the same
            number of visible units) on any device, True = visible; the grid of the last stage. Not checked here
            (:func:`greenmim.masking.check_mask`).
        specs: one :class:`StageSpec` per stage, lined up with the mask units (:func:`check_stage_specs`).
        batch_size: ``B``; attention index maps address the flattened ``[B * N]`` tokens (groups of a batch-wise
            mask hold one image's tokens, repeated per image; per-image masks pack all images' segments together).
        device: where the index tensors go (one host-to-device copy per tensor).
        group_size: fixed ``g_s`` for every stage instead of the Eq. 8 sweep (exact layouts only).
        static: the same shapes for every mask of this grid, visible count and batch size (module docstring).
    """
    if static and group_size is not None:
        raise ValueError('a static layout sizes its groups to the kernel tiles: group_size must be None')
    host_mask = mask.detach().to('cpu', torch.bool)
    per_image = host_mask.ndim == 3
    if per_image and host_mask.shape[0] != batch_size:
        raise ValueError(f'per-image mask has {host_mask.shape[0]} masks for batch size {batch_size}')
    unit = host_mask.numpy().reshape(-1, *host_mask.shape[-2:])  # [I, Hm, Wm], I = B or 1
    check_stage_specs(specs, unit.shape[1:])
    capacity = (unit.shape[1:], int(unit[0].sum())) if static else None
    images = unit if per_image or not static else np.broadcast_to(unit, (batch_size, *unit.shape[1:]))

    def to_device(array):  # per image [B, ...], or the one image's [...] for an exact batch-wise layout
        return torch.from_numpy(np.ascontiguousarray(array if per_image or static else array[0])).to(device)

    image = np.arange(len(images))[:, None]
    stages, prev_lookup = [], None
    for spec in specs:
        rh, rw = spec.grid_size
        coords = _visible_coords(images, spec.grid_size)
        n = coords.shape[1]
        merge_index = None
        if spec.merges_previous_stage:
            factor = prev_lookup.shape[1] // rh
            merge_index = to_device(_children(coords, prev_lookup, factor, spec.children_order))
        lookup = np.full((len(images), rh, rw), -1, dtype=np.int64)
        lookup[image, coords[..., 0], coords[..., 1]] = np.arange(coords.shape[0] * n).reshape(-1, n)
        pool_index = None
        if spec.pool_size is not None:
            p = spec.pool_size
            pool_index = to_device(_children(_visible_coords(images, (rh // p, rw // p)), lookup, p, 'rows'))
        token_index = to_device(coords[..., 0] * rw + coords[..., 1])
        grouped = coords if per_image else coords[:1]  # a batch-wise mask is grouped once and repeated
        stages.append(StageLayout(
            grid_size=(rh, rw),
            num_tokens=n,
            token_index=token_index,
            merge_index=merge_index,
            attention=_attention_layouts(grouped, spec, batch_size, device, group_size, capacity),
            pool_index=pool_index,
            neighbours=None if spec.conv_kernel is None else neighbour_map(
                token_index, spec.grid_size, spec.conv_kernel, batch_size),
        ))
        prev_lookup = lookup
    if static:
        host_mask = host_mask.expand(batch_size, *host_mask.shape[-2:]).contiguous()
    return VisibleLayout(
        stages=tuple(stages), mask=host_mask.to(device), masked_units=unit_indices(~host_mask).to(device),
        host_mask=host_mask, batch_size=batch_size, static=static, specs=tuple(specs))


def _map_index_maps(layout: VisibleLayout, kind: type, fn) -> VisibleLayout:
    """``layout`` with ``fn`` applied to every device map of type ``kind`` (not the ``host_mask``)."""
    def apply(item):
        return replace(item, **{f.name: fn(getattr(item, f.name)) for f in fields(item)
                                if f.name != 'host_mask' and isinstance(getattr(item, f.name), kind)})
    stages = tuple(replace(apply(stage), attention={key: apply(att) for key, att in stage.attention.items()})
                   for stage in layout.stages)
    return replace(apply(layout), stages=stages)


class PackedLayout(NamedTuple):
    """A CPU :class:`VisibleLayout` whose device maps are slices of one byte ``buffer`` (one shared-memory handle
    from a DataLoader worker, pinned by the loader, one host-to-device copy): in ``layout`` each map is a
    :class:`PackedMap`; ``host_mask`` travels as a numpy array (pickled inline)."""
    buffer: torch.Tensor
    host_mask: np.ndarray
    layout: VisibleLayout


class PackedMap(NamedTuple):
    """Where a map lies in a :class:`PackedLayout`'s buffer (byte offset, a multiple of 8), its shape and dtype."""
    start: int
    shape: Tuple[int, ...]
    dtype: torch.dtype


def pack_layout(layout: VisibleLayout) -> PackedLayout:
    """Every device map of ``layout`` (on the CPU) into one byte buffer."""
    chunks, start = [], 0

    def place(tensor):
        nonlocal start
        data = tensor.contiguous().flatten().view(torch.uint8)
        spot = PackedMap(start, tuple(tensor.shape), tensor.dtype)
        chunks.extend([data, data.new_zeros(-data.numel() % 8)])  # keep every map 8-byte aligned
        start += chunks[-2].numel() + chunks[-1].numel()
        return spot

    packed = _map_index_maps(layout, torch.Tensor, place)
    return PackedLayout(torch.cat(chunks), layout.host_mask.numpy(), replace(packed, host_mask=None))


def layout_to(packed: PackedLayout, device: torch.device) -> VisibleLayout:
    """The :class:`VisibleLayout` of a :class:`PackedLayout` with its maps on ``device`` (one copy of the buffer,
    asynchronous from pinned memory, then views)."""
    buffer = packed.buffer.to(device, non_blocking=True)
    layout = replace(packed.layout, host_mask=torch.from_numpy(packed.host_mask))
    return _map_index_maps(layout, PackedMap, lambda m: buffer[
        m.start:m.start + math.prod(m.shape) * m.dtype.itemsize].view(m.dtype).view(m.shape))
