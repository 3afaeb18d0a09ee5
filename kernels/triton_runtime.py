"""What the Triton ops share: whether kernels run compiled or in Triton's CPU interpreter, and where they can run.

Whether a ``@triton.jit`` function runs compiled or in the interpreter is fixed by ``TRITON_INTERPRET`` when it is
decorated; Triton's own library (``tl.max``, ``tl.sum``) is decorated when ``triton`` is imported. So the variable
must be in the environment before Python imports triton, and a kernel module checks that both agree when it loads.
Nothing here imports triton at module level: the ops import their kernel modules on the first launch.
"""
import importlib
import os
from types import ModuleType

import torch

__all__ = ['interpreted', 'check_triton_device', 'kernel_module']


def interpreted(kernel) -> bool:
    """Whether ``kernel`` (a ``@triton.jit`` function) runs in the interpreter; ``RuntimeError`` if Triton's own
    library was decorated in the other mode (``TRITON_INTERPRET=1`` set after triton was imported)."""
    import triton
    import triton.language as tl
    interpret = not isinstance(kernel, triton.runtime.JITFunction)
    if interpret and isinstance(tl.max, triton.runtime.JITFunction):
        raise RuntimeError(
            'TRITON_INTERPRET=1 was set after triton was imported: Triton decorates its own library (tl.max, tl.sum) '
            'when it is imported, so set TRITON_INTERPRET=1 in the environment before Python starts')
    return interpret


def check_triton_device(tensor: torch.Tensor) -> None:
    """``ValueError`` unless ``tensor`` is on CUDA, or on the CPU with ``TRITON_INTERPRET=1``."""
    if not tensor.is_cuda and os.environ.get('TRITON_INTERPRET') != '1':
        raise ValueError('the Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors')


def kernel_module(name: str, tensor: torch.Tensor) -> ModuleType:
    """The kernel module ``greenmim.kernels.<name>`` (imported on the first call; it defines ``INTERPRETED``);
    ``RuntimeError`` if its kernels were compiled and ``tensor`` is on the CPU."""
    module = importlib.import_module(f'{__package__}.{name}')
    if not module.INTERPRETED and not tensor.is_cuda:
        raise RuntimeError(
            'the Triton kernels were compiled for CUDA in this process (TRITON_INTERPRET was not 1 when triton was '
            f'imported) and cannot run on {tensor.device} tensors')
    return module
