"""The input of group window attention: tokens packed into groups of slots, and the group size the kernels tile.

No triton import here: the layout builder (:mod:`greenmim.layout`) sizes static groups with :func:`tile_group_size`.
"""
from dataclasses import dataclass
from typing import Tuple

import torch

__all__ = ['AttentionLayout', 'MAX_BLOCK', 'MIN_BLOCK', 'tile_group_size']

#: Most query rows / keys of one kernel tile; groups above it are walked in tiles of this many slots.
MAX_BLOCK = 64
#: Fewest rows of a tile (a ``tl.dot`` needs 16).
MIN_BLOCK = 16


@dataclass(frozen=True)
class AttentionLayout:
    """Visible tokens of one (stage, window, shift) packed into ``G`` groups of ``S`` slots, over the batch.

    Attributes:
        index: int32 ``[G, S]`` token index into the flattened ``[B * N]`` visible tokens; -1 marks a padding slot.
            Every token occupies exactly one slot; a group may be all padding (a static layout's spare capacity).
        segment: int32 ``[G, S]`` attention segment of the slot (window and shift region); -1 on padding. Slots
            attend to the slots of the same segment in their group.
        position: int32 ``[G, S]`` in-window position ``row * Ww + col`` of the slot; 0 on padding.
        window_size: ``(Wh, Ww)``.
    """
    index: torch.Tensor
    segment: torch.Tensor
    position: torch.Tensor
    window_size: Tuple[int, int]

    @property
    def group_size(self) -> int:
        return self.index.shape[1]


def tile_group_size(tokens: int) -> int:
    """The group size ``S`` whose groups fill the kernels' tiles for segments of up to ``tokens`` tokens: the next
    power of two from :data:`MIN_BLOCK` up to :data:`MAX_BLOCK`, then the next multiple of :data:`MAX_BLOCK` (the
    kernels tile a group to power-of-two rows, so any smaller ``S`` costs the same per group)."""
    if tokens <= MAX_BLOCK:
        return max(MIN_BLOCK, 1 << max(tokens - 1, 0).bit_length())
    return -(-tokens // MAX_BLOCK) * MAX_BLOCK
