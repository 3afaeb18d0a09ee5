"""greenmim.kernels: group window attention and sparse depthwise convolution (Triton kernels and the PyTorch
reference), dispatched by backend.

Installed from the top-level ``kernels/`` folder (``package-dir`` in pyproject.toml): ``kernels/backend.py`` is
``greenmim.kernels.backend``, and so on.
"""
from typing import Optional

import torch

from .backend import resolve_backend
from .group_attention_op import group_window_attention_triton
from .groups import AttentionLayout, tile_group_size
from .neighbour_map import neighbour_map
from .reference import group_window_attention_reference, sparse_depthwise_conv_reference
from .sparse_conv_op import check_sparse_conv_inputs, sparse_depthwise_conv_triton

__all__ = [
    'AttentionLayout', 'group_window_attention', 'group_window_attention_triton', 'tile_group_size',
    'resolve_backend', 'neighbour_map', 'sparse_depthwise_conv', 'sparse_depthwise_conv_triton',
]

_IMPLEMENTATIONS = {'torch': group_window_attention_reference, 'triton': group_window_attention_triton}


def group_window_attention(
        qkv: torch.Tensor,
        groups: AttentionLayout,
        bias_table: Optional[torch.Tensor] = None,
        scale: float = 1.0,
        backend: Optional[str] = None,
) -> torch.Tensor:
    """Group window attention ``qkv [T, 3, H, D] -> [T, H, D]`` over the ``groups`` of an
    :class:`~greenmim.kernels.groups.AttentionLayout`, on the backend chosen for ``qkv``
    (:func:`~greenmim.kernels.backend.resolve_backend`); see
    :func:`~greenmim.kernels.reference.group_window_attention_reference` (``bias_table=None``: no relative
    position bias)."""
    return _IMPLEMENTATIONS[resolve_backend(qkv, backend)](qkv, groups, bias_table, scale)


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
