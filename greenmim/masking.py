"""Batch-wise random masking at mask-unit granularity.

A mask is a bool tensor ``[H/u, W/u]`` over mask units of ``u x u`` pixels (u = 32 for Swin: the encoder's
largest stride); ``True`` marks a visible unit. One mask serves a whole micro-batch.

Rounding: with ``L`` units and ratio ``r``, ``num_visible(L, r) = min(L, max(1, round(L * (1 - r))))`` visible
units are kept (Python's round, half to even). For 224 px (L = 49) and r = 0.75 that keeps 12 units, an
effective masking ratio of 37/49 = 75.5%.
"""
from typing import Optional, Tuple

import torch

__all__ = ['num_visible', 'random_mask', 'check_mask', 'upsample_mask']


def num_visible(num_units: int, mask_ratio: float) -> int:
    """Number of visible units kept out of ``num_units`` for ``mask_ratio``."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f'mask_ratio must be in [0, 1), got {mask_ratio}')
    return min(num_units, max(1, round(num_units * (1.0 - mask_ratio))))


def random_mask(
        grid_size: Tuple[int, int],
        mask_ratio: float = 0.75,
        generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """A random mask ``bool [Hm, Wm]`` (True = visible) with ``num_visible`` visible units, on the CPU."""
    hm, wm = grid_size
    keep = num_visible(hm * wm, mask_ratio)
    order = torch.randperm(hm * wm, generator=generator)
    mask = torch.zeros(hm * wm, dtype=torch.bool)
    mask[order[:keep]] = True
    return mask.view(hm, wm)


def check_mask(mask: torch.Tensor, grid_size: Tuple[int, int]) -> None:
    """Raise ``ValueError`` unless ``mask`` is a bool ``[Hm, Wm]`` grid with at least one visible unit."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f'mask must be a torch.Tensor, got {type(mask).__name__}')
    if mask.dtype != torch.bool:
        raise ValueError(f'mask must have dtype torch.bool (True = visible), got {mask.dtype}')
    if tuple(mask.shape) != tuple(grid_size):
        raise ValueError(
            f'mask shape {tuple(mask.shape)} does not match the mask-unit grid {tuple(grid_size)} of the input')
    if not bool(mask.any()):
        raise ValueError('mask has no visible unit: at least one unit must be True (visible)')


def upsample_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """The mask ``[Hm, Wm]`` on a grid ``factor`` times finer: ``[Hm * factor, Wm * factor]``."""
    return mask.repeat_interleave(factor, 0).repeat_interleave(factor, 1)
