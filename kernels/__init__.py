"""greenmim.kernels: group window attention and sparse depthwise convolution (Triton kernels and the PyTorch
reference), dispatched by backend.

Installed from the top-level ``kernels/`` folder (``package-dir`` in pyproject.toml): ``kernels/backend.py`` is
``greenmim.kernels.backend``, and so on.
"""
from typing import Optional

import torch

from .backend import resolve_backend
from .group_attention_op import group_window_attention_triton
from .neighbour_map import neighbour_map
from .reference import (
    depthwise_conv_masked_grid, group_window_attention_reference, relative_position_index,
    sparse_depthwise_conv_reference,
)
from .sparse_conv_op import check_sparse_conv_inputs, sparse_depthwise_conv_triton

__all__ = [
    'group_window_attention', 'group_window_attention_reference', 'group_window_attention_triton',
    'relative_position_index', 'resolve_backend',
    'neighbour_map', 'sparse_depthwise_conv', 'sparse_depthwise_conv_reference', 'sparse_depthwise_conv_triton',
    'depthwise_conv_masked_grid',
]

_IMPLEMENTATIONS = {'torch': group_window_attention_reference, 'triton': group_window_attention_triton}


def group_window_attention(qkv: torch.Tensor, *args, backend: Optional[str] = None) -> torch.Tensor:
    """Group window attention ``qkv [T, 3, H, D] -> [T, H, D]`` on the backend chosen for ``qkv``
    (:func:`~greenmim.kernels.backend.resolve_backend`); the other arguments are those of
    :func:`group_window_attention_reference`, passed on unchanged (``bias_table=None``: no relative position
    bias; ``position`` and ``window_size`` may then be None)."""
    return _IMPLEMENTATIONS[resolve_backend(qkv, backend)](qkv, *args)


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
