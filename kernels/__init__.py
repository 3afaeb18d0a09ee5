"""greenmim.kernels: group window attention and sparse depthwise convolution (Triton kernels and the PyTorch
reference), dispatched by backend."""
from typing import Optional, Tuple

import torch

from greenmim.backend import resolve_backend
from .group_attention_op import group_window_attention_triton
from .neighbour_map import neighbour_map
from .reference import (
    depthwise_conv_masked_grid, group_window_attention_reference, relative_position_index,
    sparse_depthwise_conv_reference,
)
from .sparse_conv_op import check_sparse_conv_inputs, sparse_depthwise_conv_triton

__all__ = [
    'group_window_attention', 'group_window_attention_reference', 'group_window_attention_triton',
    'relative_position_index',
    'neighbour_map', 'sparse_depthwise_conv', 'sparse_depthwise_conv_reference', 'sparse_depthwise_conv_triton',
    'depthwise_conv_masked_grid',
]


def group_window_attention(
        qkv: torch.Tensor,
        index: torch.Tensor,
        segment: torch.Tensor,
        position: torch.Tensor,
        bias_table: torch.Tensor,
        window_size: Tuple[int, int],
        scale: float,
        backend: Optional[str] = None,
) -> torch.Tensor:
    """Group window attention ``qkv [T, 3, H, D] -> [T, H, D]``; see :func:`group_window_attention_reference`."""
    if resolve_backend(qkv, backend) == 'triton':
        return group_window_attention_triton(qkv, index, segment, position, bias_table, window_size, scale)
    return group_window_attention_reference(qkv, index, segment, position, bias_table, window_size, scale)


def sparse_depthwise_conv(
        x: torch.Tensor,
        neighbours: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        backend: Optional[str] = None,
) -> torch.Tensor:
    """Depthwise submanifold convolution ``x [T, C] -> [T, C]``; see :func:`sparse_depthwise_conv_reference`."""
    if resolve_backend(x, backend) == 'triton':
        return sparse_depthwise_conv_triton(x, neighbours, weight, bias)
    check_sparse_conv_inputs(x, neighbours, weight, bias)
    return sparse_depthwise_conv_reference(x, neighbours, weight, bias)
