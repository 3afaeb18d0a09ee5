"""Optimal Grouping (GreenMIM, Algorithm 1) and the per-stage layout of visible tokens.

Visible tokens of a stage fall into attention *segments*: a window, and under shifted windows one of the (up to 9)
shift regions of that window. Tokens attend only within their segment, so segments are packed into groups of
``g_s`` slots: the subset-sum DP of Eq. 7 picks, from the segments not yet assigned, a subset filling ``g_s`` as
much as possible; this repeats until every segment is assigned. ``g_s`` is swept over ``[max w_i, sum w_i]`` and
the value minimising Eq. 8, ``n_groups(g_s) * (4 g_s C^2 + 2 g_s^2 C)`` (the cost of self-attention on ``g_s``
tokens of width ``C``), is kept (ties: the fewest padded slots). The sweep stops early, without changing its
result, once the lower bound ``sum w_i * (4 C^2 + 2 g_s C)`` of every larger ``g_s`` exceeds the best cost found,
and skips a ``g_s`` whose ``ceil(sum w_i / g_s)`` groups alone would cost more.

Packing shift *regions* rather than whole windows (the paper packs windows) gives smaller items and less padding;
attention is unchanged because tokens of different regions never attend to each other.

The layout of a stage also holds what the other layers that work on visible tokens need, all aligned with the mask
units: the children of each token in the previous stage (patch merging, strided patch embedding), the tokens under
each pooled cell (the stride-``p`` convolution of global sub-sampled attention) and the neighbour map of a
depthwise convolution (:func:`greenmim.kernels.neighbour_map`).

Per-image masks (``[B, Hm, Wm]``, every image with the same number of visible units): the segments of all images
are packed together, one ``g_s`` per (stage, window, shift) for the batch (Eq. 7/8 over the pooled segments; a
group may hold segments of several images, which never attend to each other since segment ids are unique across
images). Segment sizes are small integers with many repeats, so the pooled packing works on their histogram
(:func:`pack_histogram`): each max-subset DP runs over the distinct sizes (binary-split counts) and the subset
found is repeated while the remaining multiset still holds it. A repeated maximal subset is still maximal
(removing items cannot raise the best fill), so this is Algorithm 1 on the pooled multiset, with the same
guarantee: any two groups together hold more than ``g_s`` tokens (else the earlier one was not maximal), hence
``n_groups < 2 * total / g_s + 1``, at most twice the optimum ``ceil(total / g_s)``. One ``g_s`` for a whole batch
sometimes buys a slightly smaller Eq. 8 cost with a few padded slots (Swin-B stage 3: ``g_s`` 28 with 16 padded
slots vs 32 with none, 0.12% apart). Eq. 8 prices a padded slot like a token, but cannot tell such ``g_s`` apart
for this implementation: the attention kernel tiles a group to power-of-two rows (``launch_config``), so both do
the same work per group and the smaller one only makes more groups. So the pooled sweep takes, among the ``g_s``
within :data:`POOLED_COST_TOLERANCE` (0.5%) of the least cost, the one with the fewest padded slots.

Everything here is a pure function of the mask, runs on the host with numpy, vectorised over the images (the
neighbour map: vectorised torch on the target device), and is computed once per step for all blocks
(:func:`build_visible_layout`; it can run in DataLoader workers: :class:`LayoutCollate`, :func:`layout_to`).
"""
import copy
import math
from dataclasses import dataclass, fields, replace
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import default_collate, get_worker_info

from greenmim.kernels import neighbour_map
from greenmim.masking import random_mask

__all__ = [
    'max_subset', 'pack_segments', 'optimal_grouping', 'grouping_cost', 'pack_histogram', 'optimal_histogram_grouping',
    'AttentionLayout', 'StageLayout', 'StageSpec', 'check_stage_specs', 'build_visible_layout', 'layout_to',
    'LayoutCollate', 'PackedLayout', 'PackedMap', 'pack_layout',
]

Shift = Tuple[int, int]
Window = Tuple[int, int]


def max_subset(sizes: Sequence[int], capacity: int) -> List[int]:
    """Indices of a subset of ``sizes`` with the largest sum not above ``capacity`` (Eq. 7).

    Subset-sum DP with the reachable sums of each prefix held as the bits of an integer; stops at the first prefix
    that reaches ``capacity`` exactly.
    """
    limit = (1 << (capacity + 1)) - 1
    prefixes = [1]
    for w in sizes:
        prefixes.append((prefixes[-1] | (prefixes[-1] << w)) & limit)
        if prefixes[-1] >> capacity:
            break
    total = prefixes[-1].bit_length() - 1
    chosen = []
    for i in range(len(prefixes) - 2, -1, -1):
        if not (prefixes[i] >> total) & 1:  # this sum needs item i
            chosen.append(i)
            total -= sizes[i]
    return chosen[::-1]


def pack_segments(sizes: Sequence[int], group_size: int) -> List[List[int]]:
    """Assign every segment to a group of at most ``group_size`` tokens by repeated :func:`max_subset`."""
    if max(sizes) > group_size:
        raise ValueError(f'group_size {group_size} is smaller than the largest segment ({max(sizes)} tokens)')
    remaining = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    left = sum(sizes)
    groups = []
    while remaining:
        if left <= group_size:
            groups.append(remaining)
            break
        picked = max_subset([sizes[i] for i in remaining], group_size)
        groups.append([remaining[j] for j in picked])
        left -= sum(sizes[i] for i in groups[-1])
        taken = set(picked)
        remaining = [i for j, i in enumerate(remaining) if j not in taken]
    return groups


def grouping_cost(num_groups: int, group_size: int, channels: int) -> int:
    """Eq. 8: cost of self-attention over ``num_groups`` groups of ``group_size`` tokens of width ``channels``."""
    return num_groups * (4 * group_size * channels ** 2 + 2 * group_size ** 2 * channels)


def optimal_grouping(
        sizes: Sequence[int],
        channels: int,
        group_size: Optional[int] = None,
) -> Tuple[List[List[int]], int]:
    """Algorithm 1: ``(groups, g_s)``, each group a list of segment indices.

    ``group_size`` fixes ``g_s`` (the paper's released code uses ``window_area``); ``None`` sweeps it (Eq. 8).
    """
    if group_size is not None:
        return pack_segments(sizes, group_size), group_size
    return _sweep(lambda g: pack_segments(sizes, g), len, max(sizes), sum(sizes), channels)


def _sweep(pack, num_groups, largest: int, total: int, channels: int, tolerance: float = 0.0):
    """Eq. 8 sweep of ``g_s`` over ``[largest, total]``, ``pack(g_s)`` making ``num_groups(packing)`` groups, with the
    early-stop bounds of the module docstring: ``(pack(g_s), g_s)`` of the ``g_s`` with the fewest padded slots
    (then the cheapest, then the smallest) among those costing at most ``(1 + tolerance)`` times the least."""
    candidates, least = [], None  # (padded slots, cost, g_s, packing)
    for g in range(largest, total + 1):
        if least is not None:
            bound = least * (1 + tolerance)
            if total * (4 * channels ** 2 + 2 * g * channels) > bound:
                break  # bound of this and every larger g_s
            if grouping_cost(-(-total // g), g, channels) > bound:
                continue  # needs at least ceil(total / g_s) groups
        packing = pack(g)
        groups = num_groups(packing)
        cost = grouping_cost(groups, g, channels)
        candidates.append((groups * g - total, cost, g, packing))
        least = cost if least is None else min(least, cost)
    _, _, g, packing = min((c for c in candidates if c[1] <= least * (1 + tolerance)), key=lambda c: c[:3])
    return packing, g


Packing = List[Tuple[np.ndarray, int]]

#: Per-image layouts take, among the ``g_s`` whose Eq. 8 cost is within this fraction of the least, the one with the
#: fewest padded slots (see the module docstring).
POOLED_COST_TOLERANCE = 0.005


def pack_histogram(counts: Sequence[int], group_size: int) -> Packing:
    """Algorithm 1 on a multiset of segment sizes given as a histogram (``counts[w]`` segments of ``w`` tokens).

    Returns ``[(pattern, repeats)]``: ``repeats`` groups, each holding ``pattern[w]`` segments of size ``w``
    (``pattern`` int64 like ``counts``). Each pattern is a maximal subset (Eq. 7) of what is left, found by
    :func:`max_subset` over the counts split in binary chunks, and repeated while the rest still holds it; any two
    groups hold more than ``group_size`` tokens together, so ``n_groups < 2 * sum / group_size + 1``.
    """
    counts = np.array(counts, dtype=np.int64)
    sizes = np.arange(len(counts))
    if counts[group_size + 1:].any():
        raise ValueError(f'group_size {group_size} is smaller than the largest segment '
                         f'({int(np.nonzero(counts)[0][-1])} tokens)')
    left = int(counts @ sizes)
    packing = []
    while left:
        if left <= group_size:
            packing.append((counts, 1))
            break
        chunks = []  # (size, number of segments): the usable counts in binary chunks, largest size first
        for w in np.nonzero(counts)[0][::-1].tolist():
            c, k = min(int(counts[w]), group_size // w), 1  # no group holds more than group_size // w of them
            while c:
                chunks.append((w, min(k, c)))
                c -= chunks[-1][1]
                k *= 2
        pattern = np.zeros_like(counts)
        for i in max_subset([w * k for w, k in chunks], group_size):
            pattern[chunks[i][0]] += chunks[i][1]
        used = pattern > 0
        repeats = int((counts[used] // pattern[used]).min())
        packing.append((pattern, repeats))
        counts = counts - repeats * pattern
        left -= repeats * int(pattern @ sizes)
    return packing


def optimal_histogram_grouping(
        counts: Sequence[int],
        channels: int,
        group_size: Optional[int] = None,
        tolerance: float = 0.0,
) -> Tuple[Packing, int]:
    """:func:`optimal_grouping` of the segment-size histogram ``counts``: ``(packing, g_s)``, the packing of
    :func:`pack_histogram` for the ``g_s`` of least Eq. 8 cost (or ``group_size``); with a ``tolerance``, the
    ``g_s`` of fewest padded slots among those within ``(1 + tolerance)`` of the least cost."""
    if group_size is not None:
        return pack_histogram(counts, group_size), group_size
    counts = np.asarray(counts, dtype=np.int64)
    largest, total = int(np.nonzero(counts)[0][-1]), int(counts @ np.arange(len(counts)))
    return _sweep(lambda g: pack_histogram(counts, g), lambda packing: sum(r for _, r in packing),
                  largest, total, channels, tolerance)


@dataclass(frozen=True)
class AttentionLayout:
    """Visible tokens of one (stage, window, shift) packed into ``G`` groups of ``S`` slots, over the batch.

    Attributes:
        index: int32 ``[G, S]`` token index into the flattened ``[B * N]`` visible tokens; -1 marks a padding slot.
        segment: int32 ``[G, S]`` attention segment of the slot (window and shift region); -1 on padding.
        position: int32 ``[G, S]`` in-window position ``row * Ww + col`` of the slot; 0 on padding.
        window_size: ``(Wh, Ww)``.
    """
    index: torch.Tensor
    segment: torch.Tensor
    position: torch.Tensor
    window_size: Window

    @property
    def group_size(self) -> int:
        return self.index.shape[1]


@dataclass(frozen=True)
class StageLayout:
    """Visible tokens of one stage.

    A batch-wise mask gives index tensors of one image (``[N]``, ``[M, k]``), the same for every image; a per-image
    mask gives them per image (``[B, N]``, ``[B, M, k]``), child indices then addressing the flattened ``[B * N']``
    tokens of the previous stage.

    Attributes:
        grid_size: ``(Rh, Rw)`` token grid of the stage.
        num_tokens: ``N``, visible tokens per image.
        token_index: long ``[N]`` or ``[B, N]``: raster index (in ``Rh * Rw``) of each visible token.
        merge_index: long ``[N, f * f]`` or ``[B, N, f * f]`` for a stage that embeds ``f x f`` neighbourhoods of the
            previous stage's tokens: index of each token's children in the previous stage's visible tokens (order:
            the spec's ``children_order``); ``None`` for the first stage.
        attention: ``{(window, shift): AttentionLayout}`` for each block configuration of the stage.
        batch_size: ``B``, the number of images the attention index maps and ``neighbours`` address.
        mask: bool ``[Hm, Wm]`` or ``[B, Hm, Wm]`` on the CPU, the mask the layout was built for.
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
    batch_size: int
    mask: torch.Tensor
    pool_index: Optional[torch.Tensor] = None
    neighbours: Optional[torch.Tensor] = None


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
    # Swin's shift regions in the rolled frame: [0, R - W), [R - W, R - s), [R - s, R)
    reg_h = (h >= rh - wh).astype(np.int64) + (h >= rh - sh).astype(np.int64) if sh else np.zeros_like(h)
    reg_w = (w >= rw - ww).astype(np.int64) + (w >= rw - sw).astype(np.int64) if sw else np.zeros_like(w)
    return win * 9 + reg_h * 3 + reg_w, (h % wh) * ww + (w % ww)


def _place_groups(sizes: np.ndarray, channels: int, group_size: Optional[int], pooled: bool):
    """Group and first slot of each segment (``sizes [K]``), and ``g_s``: :func:`optimal_grouping` of the list, or
    with ``pooled`` :func:`optimal_histogram_grouping` of its histogram (segments of a size taken in order, the
    fewest padded slots within :data:`POOLED_COST_TOLERANCE` of the least Eq. 8 cost)."""
    group, offset = np.empty(len(sizes), np.int64), np.empty(len(sizes), np.int64)
    if not pooled:
        groups, g_s = optimal_grouping(sizes.tolist(), channels, group_size)
        for g, members in enumerate(groups):
            group[members], offset[members] = g, np.cumsum(sizes[members]) - sizes[members]
        return group, offset, g_s
    packing, g_s = optimal_histogram_grouping(np.bincount(sizes), channels, group_size, POOLED_COST_TOLERANCE)
    by_size = np.argsort(sizes, kind='stable')
    taken = np.searchsorted(sizes[by_size], np.arange(len(packing[0][0])))  # next unplaced segment of each size
    first = 0
    for pattern, repeats in packing:
        slot = 0
        for w in np.nonzero(pattern)[0][::-1]:
            k = int(pattern[w])
            i = np.arange(k * repeats)
            segments = by_size[taken[w]:taken[w] + k * repeats]
            group[segments], offset[segments] = first + i // k, slot + (i % k) * w
            taken[w] += k * repeats
            slot += k * int(w)
        first += repeats
    return group, offset, g_s


def _attention_slots(coords, grid, window, shift, channels, group_size):
    """``[3, G, S]`` int32 (token index into the flattened ``[I * N]``, segment, position) for the tokens
    ``coords [I, N, 2]`` of ``I`` images: Algorithm 1 for one image, the pooled packing for several."""
    segment, position = _segments(coords, grid, window, shift)
    windows = (grid[0] // window[0]) * (grid[1] // window[1])
    segment = (segment + 9 * windows * np.arange(len(coords))[:, None]).ravel()  # unique across images
    position = position.ravel()
    order = np.argsort(segment, kind='stable')
    _, starts, counts = np.unique(segment[order], return_index=True, return_counts=True)
    group, offset, g_s = _place_groups(counts, channels, group_size, pooled=len(coords) > 1)
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


def _attention_layouts(coords, spec: StageSpec, batch_size: int, device, group_size) -> Dict:
    """``{(window, shift): AttentionLayout}`` over the batch for every block configuration of ``spec``; the slots
    of a batch-wise mask (``coords`` of one image) are repeated for every image."""
    attention = {}
    copies, n = batch_size // len(coords), coords.shape[0] * coords.shape[1]
    for window, shift in spec.windows:
        slots = _attention_slots(coords, spec.grid_size, window, shift, spec.channels, group_size)
        g = slots.shape[1]
        batched = np.tile(slots, (1, copies, 1))
        offsets = np.repeat(np.arange(copies, dtype=np.int32) * n, g)[:, None]
        batched[0] = np.where(batched[0] >= 0, batched[0] + offsets, -1)
        index, segment, position = torch.from_numpy(batched).to(device).unbind(0)
        attention[(window, shift)] = AttentionLayout(index, segment, position, window)
    return attention


def build_visible_layout(
        mask: torch.Tensor,
        specs: Sequence[StageSpec],
        batch_size: int,
        device: Optional[torch.device] = None,
        group_size: Optional[int] = None,
) -> List[StageLayout]:
    """Per-stage layout of the visible tokens for a batch sharing ``mask`` or with one mask per image.

    Args:
        mask: bool ``[Hm, Wm]`` (one mask for the batch) or ``[B, Hm, Wm]`` (one per image, each with the same
            number of visible units) on any device, True = visible; the grid of the last stage.
        specs: one :class:`StageSpec` per stage, lined up with the mask units (:func:`check_stage_specs`).
        batch_size: ``B``; attention index maps address the flattened ``[B * N]`` tokens (groups of a batch-wise
            mask hold one image's tokens, repeated per image; per-image masks pack all images' segments together).
        device: where the index tensors go (one host-to-device copy per tensor).
        group_size: fixed ``g_s`` for every stage instead of the Eq. 8 sweep.
    """
    host_mask = mask.detach().to('cpu', torch.bool)
    per_image = host_mask.ndim == 3
    if per_image and host_mask.shape[0] != batch_size:
        raise ValueError(f'per-image mask has {host_mask.shape[0]} masks for batch size {batch_size}')
    unit = host_mask.numpy().reshape(-1, *host_mask.shape[-2:])  # [I, Hm, Wm], I = B or 1
    check_stage_specs(specs, unit.shape[1:])

    def to_device(array):  # per image [B, ...], or the one image's [...] for a batch-wise mask
        return torch.from_numpy(np.ascontiguousarray(array if per_image else array[0])).to(device)

    image = np.arange(len(unit))[:, None]
    layouts = []
    prev_lookup = None
    for spec in specs:
        rh, rw = spec.grid_size
        coords = _visible_coords(unit, spec.grid_size)
        n = coords.shape[1]
        merge_index = None
        if spec.merges_previous_stage:
            factor = prev_lookup.shape[1] // rh
            merge_index = to_device(_children(coords, prev_lookup, factor, spec.children_order))
        lookup = np.full((len(unit), rh, rw), -1, dtype=np.int64)
        lookup[image, coords[..., 0], coords[..., 1]] = np.arange(coords.shape[0] * n).reshape(-1, n)
        pool_index = None
        if spec.pool_size is not None:
            p = spec.pool_size
            pool_index = to_device(_children(_visible_coords(unit, (rh // p, rw // p)), lookup, p, 'rows'))
        token_index = to_device(coords[..., 0] * rw + coords[..., 1])
        layouts.append(StageLayout(
            grid_size=(rh, rw),
            num_tokens=n,
            token_index=token_index,
            merge_index=merge_index,
            attention=_attention_layouts(coords, spec, batch_size, device, group_size),
            batch_size=batch_size,
            mask=host_mask,
            pool_index=pool_index,
            neighbours=None if spec.conv_kernel is None else neighbour_map(
                token_index, spec.grid_size, spec.conv_kernel, batch_size),
        ))
        prev_lookup = lookup
    return layouts


def _map_index_maps(layout: Sequence[StageLayout], kind: type, fn) -> List[StageLayout]:
    """``layout`` with ``fn`` applied to every index map of type ``kind`` (not the host ``mask``)."""
    def apply(item):
        return replace(item, **{f.name: fn(getattr(item, f.name)) for f in fields(item)
                                if f.name != 'mask' and isinstance(getattr(item, f.name), kind)})
    return [replace(apply(stage), attention={key: apply(att) for key, att in stage.attention.items()})
            for stage in layout]


class PackedLayout(NamedTuple):
    """A CPU layout whose index maps are slices of one byte ``buffer`` (one shared-memory handle from a DataLoader
    worker, one host-to-device copy), with the ``mask`` as a numpy array (pickled inline): in ``layout`` each map
    is a :class:`PackedMap` and the mask ``None``."""
    buffer: torch.Tensor
    mask: np.ndarray
    layout: List[StageLayout]


class PackedMap(NamedTuple):
    """Where an index map lies in a :class:`PackedLayout`'s buffer (byte offset, a multiple of 8), its shape and
    dtype."""
    start: int
    shape: Tuple[int, ...]
    dtype: torch.dtype


def pack_layout(layout: Sequence[StageLayout]) -> PackedLayout:
    """Every index map of ``layout`` (CPU) into one byte buffer."""
    chunks, start = [], 0

    def place(tensor):
        nonlocal start
        data = tensor.contiguous().flatten().view(torch.uint8)
        spot = PackedMap(start, tuple(tensor.shape), tensor.dtype)
        chunks.extend([data, data.new_zeros(-data.numel() % 8)])  # keep every map 8-byte aligned
        start += chunks[-2].numel() + chunks[-1].numel()
        return spot

    packed = _map_index_maps(layout, torch.Tensor, place)
    return PackedLayout(torch.cat(chunks), layout[0].mask.numpy(), [replace(stage, mask=None) for stage in packed])


def layout_to(layout: PackedLayout, device: torch.device) -> List[StageLayout]:
    """The layout of a :class:`PackedLayout` with its index maps on ``device`` (one copy of the buffer, then
    views)."""
    buffer, mask = layout.buffer.to(device, non_blocking=True), torch.from_numpy(layout.mask)
    return _map_index_maps([replace(stage, mask=mask) for stage in layout.layout], PackedMap, lambda m: buffer[
        m.start:m.start + math.prod(m.shape) * m.dtype.itemsize].view(m.dtype).view(m.shape))


class LayoutCollate:
    """DataLoader ``collate_fn`` that also draws the batch's masks and builds their CPU layout, in the worker
    processes: the training process only moves the layout to its device (:func:`layout_to`; the mask is its
    ``[0].mask``).

    Args:
        specs: the encoder's ``stage_specs()``; the mask grid is the last stage's.
        mask_ratio: as :func:`greenmim.masking.random_mask`.
        per_image: one mask per image (``[B, Hm, Wm]``) or one for the batch (``[Hm, Wm]``).
        group_size: fixed ``g_s`` (:func:`build_visible_layout`).
        collate: collates the samples; the batch size is the length of the first element of its result (a batch
            whose first element is ``None``, e.g. every image unreadable, gets no layout).
        seed: ``None``: masks from the worker's RNG (seeded per worker by the DataLoader). An int: the masks of the
            ``i``-th batch handed out by a loader made with :meth:`at` ``(epoch, first)`` come from a generator
            seeded by ``(seed, epoch, first + i)``, whatever the number of workers (a map-style DataLoader hands
            batches to its workers in turn), so a run that resumes at batch ``first`` draws the masks it would have.

    Returns ``(collate(samples), packed)``, the layout as a :class:`PackedLayout` (or ``None``): its index maps
    travel from the worker in one shared-memory buffer, where each tensor would cost a handle of its own.
    """

    def __init__(self, specs: Sequence[StageSpec], mask_ratio: float, per_image: bool = True,
                 group_size: Optional[int] = None, collate: Callable = default_collate, seed: Optional[int] = None):
        self.specs, self.mask_ratio, self.per_image = list(specs), mask_ratio, per_image
        self.group_size, self.collate, self.seed = group_size, collate, seed
        self.epoch, self.next_batch = 0, 0

    def at(self, epoch: int, first: int) -> 'LayoutCollate':
        """A copy for a loader of ``epoch`` whose first batch is batch ``first`` of the epoch."""
        collate = copy.copy(self)
        collate.epoch, collate.next_batch = epoch, first
        return collate

    def _generator(self) -> Optional[torch.Generator]:
        """The generator of the next batch's masks (``None``: the worker's RNG)."""
        worker = get_worker_info()
        workers, rank = (worker.num_workers, worker.id) if worker is not None else (1, 0)
        batch = self.next_batch + rank
        self.next_batch += workers  # this process's next batch
        if self.seed is None:
            return None
        seed = np.random.SeedSequence([self.seed, self.epoch, batch]).generate_state(1)[0]
        return torch.Generator().manual_seed(int(seed))

    def __call__(self, samples):
        collated, generator = self.collate(samples), self._generator()
        if collated[0] is None:
            return collated, None
        batch_size = len(collated[0])
        mask = random_mask(self.specs[-1].grid_size, self.mask_ratio, generator,
                           batch_size if self.per_image else None)
        layout = build_visible_layout(mask, self.specs, batch_size, torch.device('cpu'), self.group_size)
        return collated, pack_layout(layout)
