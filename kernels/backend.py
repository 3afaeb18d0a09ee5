"""Backend selection: ``GREENMIM_BACKEND=auto|torch|triton``.

``auto`` (default) runs the Triton kernels on CUDA tensors and the PyTorch reference otherwise; ``triton`` forces
the kernels (on the CPU only under ``TRITON_INTERPRET=1``); ``torch`` forces the reference.
"""
import os

import torch

__all__ = ['BACKENDS', 'resolve_backend']

BACKENDS = ('auto', 'torch', 'triton')


def resolve_backend(tensor: torch.Tensor, backend: str = None) -> str:
    """``'torch'`` or ``'triton'`` for ops on ``tensor``, from ``backend`` or ``$GREENMIM_BACKEND``."""
    backend = backend or os.environ.get('GREENMIM_BACKEND', 'auto')
    if backend not in BACKENDS:
        raise ValueError(f'GREENMIM_BACKEND must be one of {BACKENDS}, got {backend!r}')
    if backend == 'auto':
        return 'triton' if tensor.is_cuda else 'torch'
    if backend == 'triton' and not tensor.is_cuda and os.environ.get('TRITON_INTERPRET') != '1':
        raise ValueError('GREENMIM_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1 (or a CUDA device)')
    return backend
