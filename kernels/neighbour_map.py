"""The neighbour map of a stride-1 "same" convolution on the visible tokens of one stage."""
from typing import Tuple

import torch

__all__ = ['neighbour_map']


def neighbour_map(
        token_index: torch.Tensor,
        grid_size: Tuple[int, int],
        kernel_size: Tuple[int, int],
        batch_size: int,
) -> torch.Tensor:
    """Row of the visible token under every kernel tap of every visible token, over the batch.

    Args:
        token_index: int64/int32 ``[N]`` (shared by the batch) or ``[B, N]`` (per image) raster index (in
            ``Rh * Rw``) of each visible token of an image, distinct within an image (``StageLayout.token_index``);
            the map addresses tokens by their position in it.
        grid_size: ``(Rh, Rw)``, the stage's token grid.
        kernel_size: ``(kh, kw)``, both odd: a centred stencil (padding ``kh // 2``, ``kw // 2``).
        batch_size: ``B``; image ``b``'s tokens are rows ``b * N ... b * N + N - 1`` of the flattened ``[B * N]``.

    Returns:
        int32 ``[B * N, kh * kw]`` on ``token_index``'s device: entry ``[t, i * kw + j]`` is the row of the token at
        offset ``(i - kh // 2, j - kw // 2)`` from token ``t`` in the same image, -1 where that site is masked or
        outside the grid. The map is its own inverse up to reversing the taps: ``nbr[t, k] = s`` iff
        ``nbr[s, K-1-k] = t``. Token values are checked on the CPU only (elsewhere that would cost a host sync).
    """
    (rh, rw), (kh, kw) = grid_size, kernel_size
    if token_index.ndim not in (1, 2) or token_index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f'token_index must be an int32/int64 [N] or [B, N] tensor, got {token_index.dtype} '
                         f'{tuple(token_index.shape)}')
    if min(rh, rw) < 1 or min(kh, kw) < 1 or kh % 2 == 0 or kw % 2 == 0 or batch_size < 1:
        raise ValueError(f'need a positive grid, odd kernel sizes and batch_size >= 1, got grid {grid_size}, '
                         f'kernel {kernel_size}, batch_size {batch_size}')
    if token_index.ndim == 2 and token_index.shape[0] != batch_size:
        raise ValueError(f'token_index has {token_index.shape[0]} images, batch_size is {batch_size}')
    index = token_index.long().view(-1, token_index.shape[-1])  # [I, N], I = 1 (shared) or B
    images, num_tokens = index.shape
    if index.device.type == 'cpu' and num_tokens and (
            index.min() < 0 or index.max() >= rh * rw or (index.sort(1)[0].diff(dim=1) == 0).any()):
        raise ValueError(f'token_index must hold distinct raster indices in [0, {rh * rw})')
    device = index.device
    lookup = torch.full((images, rh * rw), -1, dtype=torch.long, device=device)
    lookup.scatter_(1, index, torch.arange(num_tokens, device=device).expand(images, -1))
    row = (index // rw)[..., None, None] + torch.arange(kh, device=device)[:, None] - kh // 2  # [I, N, kh, 1]
    col = (index % rw)[..., None, None] + torch.arange(kw, device=device) - kw // 2  # [I, N, 1, kw]
    inside = (row >= 0) & (row < rh) & (col >= 0) & (col < rw)
    at = (row.clamp(0, rh - 1) * rw + col.clamp(0, rw - 1)).flatten(1)
    nbr = torch.where(inside.flatten(2), lookup.gather(1, at).view(images, num_tokens, -1), -1)
    image = torch.arange(batch_size, device=device)[:, None, None] * num_tokens
    return torch.where(nbr >= 0, nbr + image, -1).flatten(0, 1).to(torch.int32)
