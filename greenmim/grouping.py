"""Optimal Grouping (GreenMIM, Algorithm 1) and the per-stage layout of visible tokens.

Visible tokens of a stage fall into attention *segments*: a window, and under shifted windows one of the (up to 9)
shift regions of that window. Tokens attend only within their segment, so segments are packed into groups of
``g_s`` slots: the subset-sum DP of Eq. 7 picks, from the segments not yet assigned, a subset filling ``g_s`` as
much as possible; this repeats until every segment is assigned. ``g_s`` is swept over ``[max w_i, sum w_i]`` and
the value minimising Eq. 8, ``n_groups(g_s) * (4 g_s C^2 + 2 g_s^2 C)`` (the cost of self-attention on ``g_s``
tokens of width ``C``), is kept. The sweep stops early, without changing its result, once the lower bound
``sum w_i * (4 C^2 + 2 g_s C)`` of every larger ``g_s`` exceeds the best cost found, and skips a ``g_s``
whose ``ceil(sum w_i / g_s)`` groups alone would cost more.

Packing shift *regions* rather than whole windows (the paper packs windows) gives smaller items and less padding;
attention is unchanged because tokens of different regions never attend to each other.

Everything here is a pure function of the mask, runs on the host with numpy on grids of at most a few thousand
tokens, and is computed once per step for all blocks (:func:`build_visible_layout`).
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = [
    'max_subset', 'pack_segments', 'optimal_grouping', 'grouping_cost',
    'AttentionLayout', 'StageLayout', 'StageSpec', 'build_visible_layout',
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
    total = sum(sizes)
    best, best_cost = None, None
    for g in range(max(sizes), total + 1):
        if best_cost is not None:
            if total * (4 * channels ** 2 + 2 * g * channels) >= best_cost:
                break  # bound of this and every larger g_s
            if grouping_cost(-(-total // g), g, channels) >= best_cost:
                continue  # needs at least ceil(total / g_s) groups
        groups = pack_segments(sizes, g)
        cost = grouping_cost(len(groups), g, channels)
        if best_cost is None or cost < best_cost:
            best, best_cost = (groups, g), cost
    return best


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

    Attributes:
        grid_size: ``(Rh, Rw)`` token grid of the stage.
        num_tokens: ``N``, visible tokens per image.
        token_index: long ``[N]`` raster index (in ``Rh * Rw``) of each visible token.
        merge_index: long ``[N, 4]`` for stages after a patch merging: index of the 2x2 children of each token in
            the previous stage's visible tokens, in Swin's order x00, x10, x01, x11; ``None`` for the first stage.
        attention: ``{(window, shift): AttentionLayout}`` for each block configuration of the stage.
        batch_size: ``B``, the number of images the attention index maps address.
        mask: bool ``[Hm, Wm]`` on the CPU, the mask the layout was built for.
    """
    grid_size: Tuple[int, int]
    num_tokens: int
    token_index: torch.Tensor
    merge_index: Optional[torch.Tensor]
    attention: Dict[Tuple[Window, Shift], AttentionLayout]
    batch_size: int
    mask: torch.Tensor


@dataclass(frozen=True)
class StageSpec:
    """Static description of a stage: token grid, width, the (window, shift) pairs its blocks use, and whether it
    starts by merging 2x2 neighbourhoods of the previous stage's tokens (timm's ``downsample``; the first stage
    embeds patches instead)."""
    grid_size: Tuple[int, int]
    channels: int
    windows: Tuple[Tuple[Window, Shift], ...]
    merges_previous_stage: bool


def _segments(coords: np.ndarray, grid: Tuple[int, int], window: Window, shift: Shift):
    """Segment id and in-window position of each token ``coords [N, 2]`` under ``window`` and ``shift``."""
    (rh, rw), (wh, ww), (sh, sw) = grid, window, shift
    h = (coords[:, 0] - sh) % rh
    w = (coords[:, 1] - sw) % rw
    win = (h // wh) * (rw // ww) + (w // ww)
    # Swin's shift regions in the rolled frame: [0, R - W), [R - W, R - s), [R - s, R)
    reg_h = (h >= rh - wh).astype(np.int64) + (h >= rh - sh).astype(np.int64) if sh else np.zeros_like(h)
    reg_w = (w >= rw - ww).astype(np.int64) + (w >= rw - sw).astype(np.int64) if sw else np.zeros_like(w)
    return win * 9 + reg_h * 3 + reg_w, (h % wh) * ww + (w % ww)


def _attention_slots(coords, grid, window, shift, channels, group_size):
    """``[3, G, S]`` int32 (token index, segment, position) for one image."""
    segment, position = _segments(coords, grid, window, shift)
    order = np.argsort(segment, kind='stable')
    seg_ids, starts, counts = np.unique(segment[order], return_index=True, return_counts=True)
    groups, g_s = optimal_grouping(counts.tolist(), channels, group_size)
    slots = np.full((3, len(groups), g_s), -1, dtype=np.int32)
    slots[2] = 0
    for g, members in enumerate(groups):
        tokens = np.concatenate([order[starts[m]:starts[m] + counts[m]] for m in members])
        slots[0, g, :len(tokens)] = tokens
        slots[1, g, :len(tokens)] = segment[tokens]
        slots[2, g, :len(tokens)] = position[tokens]
    return slots


def build_visible_layout(
        mask: torch.Tensor,
        specs: Sequence[StageSpec],
        batch_size: int,
        device: Optional[torch.device] = None,
        group_size: Optional[int] = None,
) -> List[StageLayout]:
    """Per-stage layout of the visible tokens for a batch sharing ``mask``.

    Args:
        mask: bool ``[Hm, Wm]`` on any device, True = visible; the grid of the last stage.
        specs: one :class:`StageSpec` per stage; stage grids are ``mask`` grid times a power of two.
        batch_size: ``B``; groups are laid out per image, so attention index maps address ``B * N`` tokens.
        device: where the index tensors go (one host-to-device copy per tensor).
        group_size: fixed ``g_s`` for every stage instead of the Eq. 8 sweep.
    """
    host_mask = mask.detach().to('cpu', torch.bool)
    unit = host_mask.numpy()
    layouts = []
    prev_lookup = None
    for spec in specs:
        rh, rw = spec.grid_size
        f = rh // unit.shape[0]
        visible = np.repeat(np.repeat(unit, f, axis=0), rw // unit.shape[1], axis=1)
        coords = np.argwhere(visible)  # raster order
        n = len(coords)
        merge_index = None
        if spec.merges_previous_stage:
            children = [prev_lookup[2 * coords[:, 0] + dh, 2 * coords[:, 1] + dw] for dh, dw in
                        ((0, 0), (1, 0), (0, 1), (1, 1))]
            merge_index = torch.from_numpy(np.stack(children, 1)).to(device)
        lookup = np.full((rh, rw), -1, dtype=np.int64)
        lookup[coords[:, 0], coords[:, 1]] = np.arange(n)
        attention = {}
        for window, shift in spec.windows:
            slots = _attention_slots(coords, (rh, rw), window, shift, spec.channels, group_size)
            g = slots.shape[1]
            batched = np.tile(slots, (1, batch_size, 1))
            offsets = np.repeat(np.arange(batch_size, dtype=np.int32) * n, g)[:, None]
            batched[0] = np.where(batched[0] >= 0, batched[0] + offsets, -1)
            index, segment, position = torch.from_numpy(batched).to(device).unbind(0)
            attention[(window, shift)] = AttentionLayout(index, segment, position, window)
        layouts.append(StageLayout(
            grid_size=(rh, rw),
            num_tokens=n,
            token_index=torch.from_numpy(coords[:, 0] * rw + coords[:, 1]).to(device),
            merge_index=merge_index,
            attention=attention,
            batch_size=batch_size,
            mask=host_mask,
        ))
        prev_lookup = lookup
    return layouts
