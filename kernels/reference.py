"""Pure-PyTorch group window attention and sparse convolution: the ``torch`` backend and the oracle the Triton kernels
are tested against."""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .groups import AttentionLayout

__all__ = [
    'relative_position_index', 'group_window_attention_reference', 'sparse_depthwise_conv_reference',
    'depthwise_conv_masked_grid',
]


def relative_position_index(position: torch.Tensor, window_size: Tuple[int, int]) -> torch.Tensor:
    """Index into Swin's ``[(2Wh-1)(2Ww-1), heads]`` bias table for every slot pair: ``[..., S] -> [..., S, S]``."""
    ww = window_size[1]
    row, col = position // ww, position % ww
    d_row = row[..., :, None] - row[..., None, :] + window_size[0] - 1
    d_col = col[..., :, None] - col[..., None, :] + ww - 1
    return d_row * (2 * ww - 1) + d_col


def group_window_attention_reference(
        qkv: torch.Tensor,
        groups: AttentionLayout,
        bias_table: Optional[torch.Tensor],
        scale: float,
) -> torch.Tensor:
    """Attention inside groups of token slots with a block-diagonal (same-segment) mask and, optionally, Swin's
    relative position bias.

    Args:
        qkv: ``[T, 3, H, D]`` projections of the ``T`` visible tokens (token order).
        groups: the ``[G, S]`` slot maps (:class:`~greenmim.kernels.groups.AttentionLayout`): token of each slot
            (-1 for padding; every token in exactly one slot), its segment (slots attend to slots of the same
            segment in their group) and in-window position (unused without a bias table).
        bias_table: ``[(2Wh-1)(2Ww-1), H]`` Swin relative position bias table, or None for no bias (e.g. Twins'
            locally-grouped attention).
        scale: softmax scale applied to ``q``.

    Returns:
        ``[T, H, D]`` attention output in token order.
    """
    index, segment, position, window_size = groups.index, groups.segment, groups.position, groups.window_size
    num_tokens, _, heads, dim = qkv.shape
    valid = index >= 0
    groups, size = index.shape
    slots = qkv.index_select(0, index.clamp_min(0).flatten().long()).view(groups, size, 3, heads, dim)
    q, k, v = slots.permute(2, 0, 3, 1, 4).unbind(0)  # [G, H, S, D]
    scores = (q * scale) @ k.transpose(-2, -1)
    if bias_table is not None:
        rel = relative_position_index(position.long(), window_size)
        bias = bias_table.index_select(0, rel.flatten()).view(groups, size, size, -1)  # [G, S, S, H]
        scores = scores + bias.permute(0, 3, 1, 2).to(q.dtype)
    allowed = (segment[:, :, None] == segment[:, None, :]) & valid[:, None, :]
    # padding rows attend to themselves only: finite, and dropped below
    allowed |= torch.eye(size, dtype=torch.bool, device=index.device) & ~valid[:, :, None]
    scores = scores.masked_fill(~allowed[:, None], float('-inf'))
    out = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype) @ v  # [G, H, S, D]
    flat = out.transpose(1, 2).reshape(-1, heads, dim)
    # inverse of the index map (padding slots all land on a spare entry T), with static shapes for torch.compile
    target = torch.where(valid, index.long(), num_tokens).flatten()
    slots = torch.arange(target.numel(), device=index.device)
    slot_of_token = torch.zeros(num_tokens + 1, dtype=torch.long, device=index.device).scatter_(0, target, slots)
    return flat.index_select(0, slot_of_token[:num_tokens])


def sparse_depthwise_conv_reference(
        x: torch.Tensor,
        neighbours: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Depthwise KxK convolution at the visible tokens only (submanifold): absent neighbours contribute zero.

    Args:
        x: ``[T, C]`` visible tokens (``T = B * N``).
        neighbours: int ``[T, K]`` row of the token under each kernel tap, -1 where absent (``neighbour_map``).
        weight: ``[C, 1, kh, kw]`` depthwise ``Conv2d`` weight, ``K = kh * kw`` taps in raster order.
        bias: ``[C]`` or ``None``.

    Returns:
        ``[T, C]`` in ``x``'s dtype: ``y[t, c] = bias[c] + sum_k x[nbr[t, k], c] * weight[c, 0, k // kw, k % kw]``.
    """
    num_tokens, channels = x.shape
    dtype = torch.promote_types(torch.promote_types(x.dtype, weight.dtype), torch.float32)  # fp32 accumulation
    padded = torch.cat([x, x.new_zeros(1, channels)]).to(dtype)  # row T: the zero of absent taps
    rows = torch.where(neighbours >= 0, neighbours.long(), num_tokens)
    taps = weight.reshape(channels, -1).to(dtype)
    y = padded.new_zeros(num_tokens, channels) if bias is None else bias.to(dtype).expand(num_tokens, channels)
    for k in range(rows.shape[1]):  # one [T, C] gather per tap: no [T, K, C] intermediate (2-4x faster on a CPU)
        y = y + padded.index_select(0, rows[:, k]) * taps[:, k]
    return y.to(x.dtype)


def depthwise_conv_masked_grid(
        x: torch.Tensor,
        token_index: torch.Tensor,
        grid_size: Tuple[int, int],
        weight: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The dense equivalent of :func:`sparse_depthwise_conv_reference`: scatter ``x [B * N, C]`` into a zero-filled
    ``[B, C, Rh, Rw]`` grid at ``token_index [N]``, ``F.conv2d(groups=C, padding=k // 2)``, read back ``[B * N, C]``."""
    channels = x.shape[1]
    rh, rw = grid_size
    tokens = x.reshape(-1, token_index.numel(), channels).transpose(1, 2)  # [B, C, N]
    grid = tokens.new_zeros(tokens.shape[0], channels, rh * rw).index_copy(2, token_index, tokens)
    out = F.conv2d(grid.view(-1, channels, rh, rw), weight, bias,
                   padding=(weight.shape[2] // 2, weight.shape[3] // 2), groups=channels)
    return out.flatten(2).index_select(2, token_index).transpose(1, 2).reshape(-1, channels)
