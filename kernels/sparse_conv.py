"""Triton kernels of the depthwise submanifold convolution on visible tokens (forward, backward) and their launchers.

Tokens are rows of ``x [T, C]``; ``neighbours [T, K]`` (int32, -1 = absent) names the row under each of the ``K``
kernel taps. Programs tile (token block, channel block); every tap is a gather of ``BLOCK_T`` rows of ``BLOCK_C``
contiguous channels, multiplied by the tap's weight column, accumulated in fp32.

Backward, in one kernel: the input gradient is the same gather applied to ``dy`` with the flipped kernel (the map of
a centred stencil is its own inverse up to reversing the taps: ``nbr[t, k] = s`` iff ``nbr[s, K-1-k] = t``), and the
weight and bias gradients are reduced over the program's tokens in registers (fp32) and written as one partial per
program, summed over programs in a fixed order afterwards: deterministic, no atomics.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .triton_runtime import interpreted

__all__ = ['INTERPRETED', 'sparse_conv_forward', 'sparse_conv_backward']

BLOCK_T = 64
MAX_BLOCK_C = 64  # 128 bytes of bf16 per gathered row
NUM_WARPS = 8
# backward: token tiles per program grow until about this many programs remain, up to MAX_TILES_PER_PROGRAM
TARGET_PROGRAMS = 512
MAX_TILES_PER_PROGRAM = 8


@triton.jit
def _tap_rows(neighbours, offs_t, in_t, k, K: tl.constexpr):
    """Row (int64) under tap ``k`` of tokens ``offs_t``, and whether it is present."""
    row = tl.load(neighbours + offs_t * K + k, mask=in_t, other=-1)
    return row.to(tl.int64), row >= 0


@triton.jit
def _gather(src, row, present, offs_c, in_c, stride_t, stride_c):
    """``src[row, offs_c]`` as fp32 ``[BLOCK_T, BLOCK_C]``, zeros where the row is absent."""
    ptrs = src + row[:, None] * stride_t + offs_c[None, :] * stride_c
    return tl.load(ptrs, mask=present[:, None] & in_c[None, :], other=0.).to(tl.float32)


@triton.jit
def _sparse_conv_fwd_kernel(
        x, neighbours, weight, bias, y,
        stride_xt, stride_xc, stride_yt, stride_yc, stride_wc, stride_wk,
        num_tokens, channels,
        K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``y[t, c] = bias[c] + sum_k x[nbr[t, k], c] * w[c, k]`` for one (token block, channel block)."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    in_t = offs_t < num_tokens
    in_c = offs_c < channels
    acc = tl.zeros([BLOCK_T, BLOCK_C], tl.float32)
    for k in range(0, K):
        row, present = _tap_rows(neighbours, offs_t, in_t, k, K)
        w = tl.load(weight + offs_c * stride_wc + k * stride_wk, mask=in_c, other=0.).to(tl.float32)
        acc += _gather(x, row, present, offs_c, in_c, stride_xt, stride_xc) * w[None, :]
    if HAS_BIAS:
        acc += tl.load(bias + offs_c, mask=in_c, other=0.).to(tl.float32)[None, :]
    y_ptrs = y + offs_t.to(tl.int64)[:, None] * stride_yt + offs_c[None, :] * stride_yc
    tl.store(y_ptrs, acc.to(y.dtype.element_ty), mask=in_t[:, None] & in_c[None, :])


@triton.jit
def _sparse_conv_bwd_kernel(
        x, dy, neighbours, weight, dx, partial,
        stride_xt, stride_xc, stride_dyt, stride_dyc, stride_dxt, stride_dxc, stride_wc, stride_wk,
        num_tokens, channels, tiles_per_program,
        K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """For ``tiles_per_program`` consecutive token tiles and one channel block: ``dx`` rows (``dy`` gathered with
    the flipped kernel, ``dx[t] = sum_k dy[nbr[t, k]] * w[K-1-k]``) and this program's partial ``[K + 1, BLOCK_C]``
    of the weight gradient (row ``k < K``: ``sum_t dy[t] * x[nbr[t, k]]``) and bias gradient (row ``K``:
    ``sum_t dy[t]``), in fp32."""
    pid_t = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    in_c = offs_c < channels
    rows = tl.arange(0, K_PAD)[:, None]
    grads = tl.zeros([K_PAD, BLOCK_C], tl.float32)
    for i in range(0, tiles_per_program):
        offs_t = (pid_t * tiles_per_program + i) * BLOCK_T + tl.arange(0, BLOCK_T)
        in_t = offs_t < num_tokens
        own = offs_t.to(tl.int64)
        g = _gather(dy, own, in_t, offs_c, in_c, stride_dyt, stride_dyc)
        acc = tl.zeros([BLOCK_T, BLOCK_C], tl.float32)
        for k in range(0, K):
            row, present = _tap_rows(neighbours, offs_t, in_t, k, K)
            w = tl.load(weight + offs_c * stride_wc + (K - 1 - k) * stride_wk, mask=in_c, other=0.).to(tl.float32)
            acc += _gather(dy, row, present, offs_c, in_c, stride_dyt, stride_dyc) * w[None, :]
            x_k = _gather(x, row, present, offs_c, in_c, stride_xt, stride_xc)
            grads = tl.where(rows == k, grads + tl.sum(g * x_k, 0)[None, :], grads)
        grads = tl.where(rows == K, grads + tl.sum(g, 0)[None, :], grads)
        tl.store(dx + own[:, None] * stride_dxt + offs_c[None, :] * stride_dxc, acc.to(dx.dtype.element_ty),
                 mask=in_t[:, None] & in_c[None, :])
    p_ptrs = partial + (pid_t * (K + 1) + rows) * channels + offs_c[None, :]
    tl.store(p_ptrs, grads, mask=(rows <= K) & in_c[None, :])


INTERPRETED = interpreted(_sparse_conv_fwd_kernel)


def launch_config(channels: int, kernel_area: int) -> dict:
    """Launch options of both kernels (tile constexprs and ``num_warps``) for ``channels`` and ``K = kernel_area``."""
    return dict(K=kernel_area, BLOCK_T=BLOCK_T, BLOCK_C=min(MAX_BLOCK_C, max(16, triton.next_power_of_2(channels))),
                num_warps=NUM_WARPS)


def tiles_per_program(num_tokens: int, channels: int, config: dict) -> int:
    """Token tiles per backward program: fewer partials on large inputs, enough programs on small ones."""
    tiles = triton.cdiv(num_tokens, config['BLOCK_T']) * triton.cdiv(channels, config['BLOCK_C'])
    return max(1, min(MAX_TILES_PER_PROGRAM, tiles // TARGET_PROGRAMS))


def _taps(weight: torch.Tensor) -> torch.Tensor:
    """``[C, 1, kh, kw] -> [C, K]`` (a view when possible)."""
    return weight.reshape(weight.shape[0], -1)


def sparse_conv_forward(
        x: torch.Tensor, neighbours: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``y [T, C]`` in ``x``'s dtype; arguments as the reference, ``neighbours`` contiguous."""
    num_tokens, channels = x.shape
    y = torch.empty(num_tokens, channels, dtype=x.dtype, device=x.device)
    if num_tokens == 0 or channels == 0:
        return y
    taps = _taps(weight)
    config = launch_config(channels, taps.shape[1])
    grid = (triton.cdiv(num_tokens, config['BLOCK_T']), triton.cdiv(channels, config['BLOCK_C']))
    _sparse_conv_fwd_kernel[grid](
        x, neighbours, taps, bias if bias is not None else taps, y,
        *x.stride(), *y.stride(), *taps.stride(), num_tokens, channels,
        HAS_BIAS=bias is not None, **config,
    )
    return y


def sparse_conv_backward(
        dy: torch.Tensor, x: torch.Tensor, neighbours: torch.Tensor, weight: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx [T, C] in x's dtype, dweight [C, 1, kh, kw] in weight's dtype, dbias [C] fp32)`` for ``dy [T, C]``.

    Needs a centred-stencil map (as :func:`~greenmim.kernels.neighbour_map` builds): the input gradient gathers
    through the same map with the taps reversed.
    """
    num_tokens, channels = x.shape
    taps = _taps(weight)
    kernel_area = taps.shape[1]
    config = launch_config(channels, kernel_area)
    per_program = tiles_per_program(num_tokens, channels, config)
    programs = triton.cdiv(triton.cdiv(num_tokens, config['BLOCK_T']), per_program)
    dx = torch.empty(num_tokens, channels, dtype=x.dtype, device=x.device)
    partial = torch.empty(programs, kernel_area + 1, channels, dtype=torch.float32, device=x.device)
    if num_tokens and channels:
        _sparse_conv_bwd_kernel[(programs, triton.cdiv(channels, config['BLOCK_C']))](
            x, dy, neighbours, taps, dx, partial,
            *x.stride(), *dy.stride(), *dx.stride(), *taps.stride(), num_tokens, channels, per_program,
            K_PAD=triton.next_power_of_2(kernel_area + 1), **config,
        )
    # fixed-order reductions over programs
    dweight = partial[:, :kernel_area].sum(0).t().contiguous().to(weight.dtype).view(weight.shape)
    return dx, dweight, partial[:, kernel_area].sum(0)
