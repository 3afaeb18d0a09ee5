"""greenmim.kernels: group window attention (Triton kernels and the PyTorch reference), dispatched by backend."""
from typing import Optional, Tuple

import torch

from greenmim.backend import resolve_backend
from .group_attention_op import group_window_attention_triton
from .reference import group_window_attention_reference, relative_position_index

__all__ = [
    'group_window_attention', 'group_window_attention_reference', 'group_window_attention_triton',
    'relative_position_index',
]


def group_window_attention(
        qkv: torch.Tensor,
        index: torch.Tensor,
        segment: torch.Tensor,
        position: Optional[torch.Tensor],
        bias_table: Optional[torch.Tensor],
        window_size: Optional[Tuple[int, int]],
        scale: float,
        backend: Optional[str] = None,
) -> torch.Tensor:
    """Group window attention ``qkv [T, 3, H, D] -> [T, H, D]``; see :func:`group_window_attention_reference`
    (``bias_table=None``: no relative position bias; ``position`` and ``window_size`` may then be None)."""
    if resolve_backend(qkv, backend) == 'triton':
        return group_window_attention_triton(qkv, index, segment, position, bias_table, window_size, scale)
    return group_window_attention_reference(qkv, index, segment, position, bias_table, window_size, scale)
