"""greenmim.kernels: group window attention (Triton kernels and the PyTorch reference), dispatched by backend.

Installed from the top-level ``kernels/`` folder (``package-dir`` in pyproject.toml): ``kernels/backend.py`` is
``greenmim.kernels.backend``, and so on.
"""
from typing import Optional

import torch

from .backend import resolve_backend
from .group_attention_op import group_window_attention_triton
from .reference import group_window_attention_reference, relative_position_index

__all__ = [
    'group_window_attention', 'group_window_attention_reference', 'group_window_attention_triton',
    'relative_position_index', 'resolve_backend',
]

_IMPLEMENTATIONS = {'torch': group_window_attention_reference, 'triton': group_window_attention_triton}


def group_window_attention(qkv: torch.Tensor, *args, backend: Optional[str] = None) -> torch.Tensor:
    """Group window attention ``qkv [T, 3, H, D] -> [T, H, D]`` on the backend chosen for ``qkv``
    (:func:`~greenmim.kernels.backend.resolve_backend`); the other arguments are those of
    :func:`group_window_attention_reference`, passed on unchanged."""
    return _IMPLEMENTATIONS[resolve_backend(qkv, backend)](qkv, *args)
