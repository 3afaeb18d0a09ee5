"""Optimal Grouping (GreenMIM, Algorithm 1): pack attention segments into groups of ``g_s`` slots.

Visible tokens of a stage fall into attention *segments* (a window, and under shifted windows one of its shift
regions: :mod:`greenmim.layout`). Tokens attend only within their segment, so segments are packed into groups of
``g_s`` slots: the subset-sum DP of Eq. 7 picks, from the segments not yet assigned, a subset filling ``g_s`` as
much as possible; this repeats until every segment is assigned. ``g_s`` is swept over ``[max w_i, sum w_i]`` and
the value minimising Eq. 8, ``n_groups(g_s) * (4 g_s C^2 + 2 g_s^2 C)`` (the cost of self-attention on ``g_s``
tokens of width ``C``), is kept (ties: the fewest padded slots). The sweep stops early, without changing its
result, once the lower bound ``sum w_i * (4 C^2 + 2 g_s C)`` of every larger ``g_s`` exceeds the best cost found,
and skips a ``g_s`` whose ``ceil(sum w_i / g_s)`` groups alone would cost more.

Segment sizes are small integers with many repeats, so the packing works on their histogram
(:func:`pack_histogram`, the one implementation; :func:`pack_segments` lists its groups): each max-subset DP runs
over the distinct sizes (binary-split counts) and the subset found is repeated while the remaining multiset still
holds it. A repeated maximal subset is still maximal (removing items cannot raise the best fill), so this is
Algorithm 1, with its guarantee: any two groups together hold more than ``g_s`` tokens (else the earlier one was
not maximal), hence ``n_groups <= ceil(2 * total / g_s)``, at most twice the optimum ``ceil(total / g_s)`` -- the
bound that sizes static layouts (:mod:`greenmim.layout`).

Per-image masks pack the segments of all images together, one ``g_s`` for the batch. One ``g_s`` for a whole batch
sometimes buys a slightly smaller Eq. 8 cost with a few padded slots (Swin-B stage 3: ``g_s`` 28 with 16 padded
slots vs 32 with none, 0.12% apart). Eq. 8 prices a padded slot like a token, but cannot tell such ``g_s`` apart
for this implementation: the attention kernel tiles a group to power-of-two rows (``launch_config``), so both do
the same work per group and the smaller one only makes more groups. So the pooled sweep takes, among the ``g_s``
within :data:`POOLED_COST_TOLERANCE` (0.5%) of the least cost, the one with the fewest padded slots.
"""
from typing import List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    'max_subset', 'pack_histogram', 'pack_segments', 'grouping_cost', 'optimal_grouping',
    'optimal_histogram_grouping', 'place_segments', 'POOLED_COST_TOLERANCE',
]

Packing = List[Tuple[np.ndarray, int]]

#: Per-image layouts take, among the ``g_s`` whose Eq. 8 cost is within this fraction of the least, the one with the
#: fewest padded slots (see the module docstring).
POOLED_COST_TOLERANCE = 0.005


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


def pack_histogram(counts: Sequence[int], group_size: int) -> Packing:
    """Algorithm 1 on a multiset of segment sizes given as a histogram (``counts[w]`` segments of ``w`` tokens).

    Returns ``[(pattern, repeats)]``: ``repeats`` groups, each holding ``pattern[w]`` segments of size ``w``
    (``pattern`` int64 like ``counts``). Each pattern is a maximal subset (Eq. 7) of what is left, found by
    :func:`max_subset` over the counts split in binary chunks, and repeated while the rest still holds it.
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


def place_segments(sizes: np.ndarray, packing: Packing) -> Tuple[np.ndarray, np.ndarray]:
    """``(group, first slot)`` of each segment (``sizes [K]``) under a :func:`pack_histogram` packing of their
    histogram: segments of one size are taken in order, each group's segments fill its slots from slot 0."""
    group, offset = np.empty(len(sizes), np.int64), np.empty(len(sizes), np.int64)
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
    return group, offset


def pack_segments(sizes: Sequence[int], group_size: int) -> List[List[int]]:
    """Assign every segment to a group of at most ``group_size`` tokens (:func:`pack_histogram`): the segment
    indices of each group."""
    sizes = np.asarray(sizes, dtype=np.int64)
    return _segment_lists(sizes, pack_histogram(np.bincount(sizes), group_size))


def _segment_lists(sizes: np.ndarray, packing: Packing) -> List[List[int]]:
    """The segment indices of each group of ``packing`` (:func:`place_segments`)."""
    group, _ = place_segments(sizes, packing)
    return [np.nonzero(group == g)[0].tolist() for g in range(int(group.max()) + 1)]


def grouping_cost(num_groups: int, group_size: int, channels: int) -> int:
    """Eq. 8: cost of self-attention over ``num_groups`` groups of ``group_size`` tokens of width ``channels``."""
    return num_groups * (4 * group_size * channels ** 2 + 2 * group_size ** 2 * channels)


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


def optimal_histogram_grouping(
        counts: Sequence[int],
        channels: int,
        group_size: Optional[int] = None,
        tolerance: float = 0.0,
) -> Tuple[Packing, int]:
    """Algorithm 1 on the segment-size histogram ``counts``: ``(packing, g_s)``, the :func:`pack_histogram` packing
    for the ``g_s`` of least Eq. 8 cost (or ``group_size``); with a ``tolerance``, the ``g_s`` of fewest padded
    slots among those within ``(1 + tolerance)`` of the least cost."""
    if group_size is not None:
        return pack_histogram(counts, group_size), group_size
    counts = np.asarray(counts, dtype=np.int64)
    largest, total = int(np.nonzero(counts)[0][-1]), int(counts @ np.arange(len(counts)))
    return _sweep(lambda g: pack_histogram(counts, g), lambda packing: sum(r for _, r in packing),
                  largest, total, channels, tolerance)


def optimal_grouping(
        sizes: Sequence[int],
        channels: int,
        group_size: Optional[int] = None,
) -> Tuple[List[List[int]], int]:
    """Algorithm 1 on a list of segment sizes: ``(groups, g_s)``, each group a list of segment indices.

    ``group_size`` fixes ``g_s`` (the paper's released code uses ``window_area``); ``None`` sweeps it (Eq. 8).
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    packing, g_s = optimal_histogram_grouping(np.bincount(sizes), channels, group_size)
    return _segment_lists(sizes, packing), g_s
