"""Random masking at mask-unit granularity, batch-wise or per image.

A mask is a bool tensor ``[H/u, W/u]`` over mask units of ``u x u`` pixels (u = 32 for Swin: the encoder's
largest stride); ``True`` marks a visible unit. A ``[Hm, Wm]`` mask serves a whole micro-batch (the paper's
batch-wise masking); a ``[B, Hm, Wm]`` mask holds one mask per image, every image with the same number of visible
units (so visible tokens stay a rectangular ``[B, N, C]``).

Rounding: with ``L`` units and ratio ``r``, ``num_visible(L, r) = min(L, max(1, round(L * (1 - r))))`` visible
units are kept (Python's round, half to even). For 224 px (L = 49) and r = 0.75 that keeps 12 units, an
effective masking ratio of 37/49 = 75.5%.
"""
from typing import Optional, Tuple

import torch

__all__ = ['num_visible', 'random_mask', 'check_mask', 'upsample_mask', 'unit_indices']


def num_visible(num_units: int, mask_ratio: float) -> int:
    """Number of visible units kept out of ``num_units`` for ``mask_ratio``."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f'mask_ratio must be in [0, 1), got {mask_ratio}')
    return min(num_units, max(1, round(num_units * (1.0 - mask_ratio))))


def random_mask(
        grid_size: Tuple[int, int],
        mask_ratio: float = 0.75,
        generator: Optional[torch.Generator] = None,
        batch_size: Optional[int] = None,
) -> torch.Tensor:
    """A random mask ``bool [Hm, Wm]`` (True = visible) with ``num_visible`` visible units, on the CPU; with
    ``batch_size`` ``B``, one per image: ``[B, Hm, Wm]``, each with ``num_visible`` visible units."""
    hm, wm = grid_size
    keep = num_visible(hm * wm, mask_ratio)
    if batch_size is None:
        order = torch.randperm(hm * wm, generator=generator)
        mask = torch.zeros(hm * wm, dtype=torch.bool)
        mask[order[:keep]] = True
        return mask.view(hm, wm)
    if batch_size < 1:
        raise ValueError(f'batch_size must be at least 1, got {batch_size}')
    rank = torch.rand(batch_size, hm * wm, generator=generator).argsort(1).argsort(1)  # a random permutation each
    return (rank < keep).view(batch_size, hm, wm)


def check_mask(mask: torch.Tensor, grid_size: Tuple[int, int], batch_size: Optional[int] = None) -> None:
    """Raise ``ValueError`` unless ``mask`` is a bool ``[Hm, Wm]`` grid with at least one visible unit, or a
    ``[B, Hm, Wm]`` stack of them (``B = batch_size`` when given) with the same number of visible units each."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f'mask must be a torch.Tensor, got {type(mask).__name__}')
    if mask.dtype != torch.bool:
        raise ValueError(f'mask must have dtype torch.bool (True = visible), got {mask.dtype}')
    if mask.ndim not in (2, 3) or tuple(mask.shape[-2:]) != tuple(grid_size):
        raise ValueError(f'mask shape {tuple(mask.shape)} does not match the mask-unit grid {tuple(grid_size)} of '
                         'the input (a batch-wise [Hm, Wm] or per-image [B, Hm, Wm] mask)')
    if mask.ndim == 3 and batch_size is not None and mask.shape[0] != batch_size:
        raise ValueError(f'per-image mask has {mask.shape[0]} masks for {batch_size} images')
    counts = mask.flatten(-2).sum(-1).view(-1)
    if not bool(counts.min() > 0):
        where = f' (image {int(counts.argmin())})' if mask.ndim == 3 else ''
        raise ValueError(f'mask has no visible unit{where}: at least one unit must be True (visible)')
    if bool(counts.max() != counts.min()):
        raise ValueError(f'per-image mask: every image needs the same number of visible units, got between '
                         f'{int(counts.min())} and {int(counts.max())}')


def unit_indices(mask: torch.Tensor) -> torch.Tensor:
    """Raster indices of the True units of ``mask`` ``[Hm, Wm]`` -> long ``[n]``, or of each image's units of
    ``[B, Hm, Wm]`` (``n`` True units each) -> ``[B, n]``."""
    flat = mask.flatten(-2)
    return flat.nonzero()[:, -1].view(*flat.shape[:-1], -1)


def upsample_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """The mask ``[..., Hm, Wm]`` on a grid ``factor`` times finer: ``[..., Hm * factor, Wm * factor]``."""
    return mask.repeat_interleave(factor, -2).repeat_interleave(factor, -1)
