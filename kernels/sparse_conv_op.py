"""Depthwise submanifold convolution as ``torch.library`` custom ops backed by the Triton kernels.

``greenmim::sparse_depthwise_conv`` (forward) and ``greenmim::sparse_depthwise_conv_backward`` (``dx``, ``dweight``,
``dbias``) have fake implementations and registered autograd, so ``torch.compile`` traces them without graph breaks.
The Triton module (:mod:`greenmim.kernels.sparse_conv`) is imported on the first launch.
"""
from typing import Optional, Tuple

import torch

from .triton_runtime import check_triton_device, kernel_module

__all__ = ['sparse_depthwise_conv_triton', 'check_sparse_conv_inputs']

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_sparse_conv_inputs(
        x: torch.Tensor, neighbours: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    """Raise ``ValueError`` naming the problem unless the arguments suit the op (see the reference)."""
    if x.ndim != 2:
        raise ValueError(f'x must be [T, C], got {tuple(x.shape)}')
    if x.dtype not in _DTYPES:
        raise ValueError(f'x must be one of {_DTYPES}, got {x.dtype}')
    num_tokens, channels = x.shape
    if weight.ndim != 4 or weight.shape[:2] != (channels, 1):
        raise ValueError(
            f'weight must be a depthwise Conv2d weight [C={channels}, 1, kh, kw], got {tuple(weight.shape)}')
    kh, kw = weight.shape[2:]
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f'kernel size must be odd (a centred stencil), got ({kh}, {kw})')
    if neighbours.dtype != torch.int32 or neighbours.shape != (num_tokens, kh * kw):
        raise ValueError(f'neighbours must be an int32 [T={num_tokens}, K={kh * kw}] tensor, got '
                         f'{neighbours.dtype} {tuple(neighbours.shape)}')
    if bias is not None and bias.shape != (channels,):
        raise ValueError(f'bias must be [C={channels}], got {tuple(bias.shape)}')
    for name, t in (('weight', weight), ('bias', bias)):
        if t is not None and t.dtype not in _DTYPES:
            raise ValueError(f'{name} must be one of {_DTYPES}, got {t.dtype}')
    devices = {t.device for t in (x, neighbours, weight, bias) if t is not None}
    if len(devices) != 1:
        raise ValueError(f'all tensors must be on one device, got {sorted(map(str, devices))}')


@torch.library.custom_op('greenmim::sparse_depthwise_conv', mutates_args=())
def _forward_op(x: torch.Tensor, neighbours: torch.Tensor, weight: torch.Tensor,
                bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``y [T, C]`` in ``x``'s dtype."""
    return kernel_module('sparse_conv', x).sparse_conv_forward(x, neighbours, weight, bias)


@_forward_op.register_fake
def _(x, neighbours, weight, bias):
    return x.new_empty(x.shape)


@torch.library.custom_op('greenmim::sparse_depthwise_conv_backward', mutates_args=())
def _backward_op(dy: torch.Tensor, x: torch.Tensor, neighbours: torch.Tensor,
                 weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx [T, C], dweight [C, 1, kh, kw], dbias [C] fp32)``."""
    return kernel_module('sparse_conv', x).sparse_conv_backward(dy, x, neighbours, weight)


@_backward_op.register_fake
def _(dy, x, neighbours, weight):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape[0], dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, neighbours, weight, bias = inputs
    ctx.save_for_backward(x, neighbours, weight)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, dy):
    x, neighbours, weight = ctx.saved_tensors
    dx, dweight, dbias = _backward_op(dy, x, neighbours, weight)
    return dx, None, dweight, None if ctx.bias_dtype is None else dbias.to(ctx.bias_dtype)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def sparse_depthwise_conv_triton(
        x: torch.Tensor,
        neighbours: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Depthwise submanifold convolution ``x [T, C] -> [T, C]`` on the Triton kernels, differentiable in ``x``,
    ``weight`` and ``bias``; arguments as :func:`~greenmim.kernels.reference.sparse_depthwise_conv_reference`, with
    a centred-stencil ``neighbours`` map from :func:`~greenmim.kernels.neighbour_map` (the backward relies on
    ``nbr[t, k] = s`` iff ``nbr[s, K-1-k] = t``).

    Gradients are deterministic (fixed-order fp32 reductions, no atomics) and computed in fp32; ``dx`` is in ``x``'s
    dtype, ``dweight``/``dbias`` in those of ``weight``/``bias``.
    """
    check_sparse_conv_inputs(x, neighbours, weight, bias)
    check_triton_device(x)
    return _forward_op(x, neighbours.contiguous(), weight, bias)
