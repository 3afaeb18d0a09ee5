"""Group window attention as ``torch.library`` custom ops backed by the Triton kernels.

``greenmim::group_window_attention`` (forward: output and log-sum-exp) and
``greenmim::group_window_attention_backward`` (``dqkv`` and the bias-table gradient) have fake implementations and
registered autograd, so ``torch.compile`` traces them without graph breaks. The Triton module
(:mod:`greenmim.kernels.group_attention`) is imported on the first launch.
"""
from typing import Optional, Tuple

import torch

from .groups import AttentionLayout
from .triton_runtime import check_triton_device, kernel_module

__all__ = ['group_window_attention_triton', 'check_group_attention_inputs']

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_HEAD_DIM = 128


def _check_slot_map(name: str, t: torch.Tensor, index: torch.Tensor) -> None:
    if t.dtype != torch.int32 or t.ndim != 2:
        raise ValueError(f'{name} must be an int32 [G, S] tensor, got {t.dtype} {tuple(t.shape)}')
    if t.shape != index.shape:
        raise ValueError(f'{name} has shape {tuple(t.shape)}, index has {tuple(index.shape)}')


def check_group_attention_inputs(qkv: torch.Tensor, groups: AttentionLayout, bias_table: Optional[torch.Tensor]
                                 ) -> None:
    """Raise ``ValueError`` naming the problem unless the arguments suit the kernels (see the reference)."""
    index, segment, position, window_size = groups.index, groups.segment, groups.position, groups.window_size
    if qkv.ndim != 4 or qkv.shape[1] != 3:
        raise ValueError(f'qkv must be [T, 3, H, D], got {tuple(qkv.shape)}')
    if qkv.dtype not in _DTYPES:
        raise ValueError(f'qkv must be one of {_DTYPES}, got {qkv.dtype}')
    if qkv.shape[-1] > _MAX_HEAD_DIM:
        raise ValueError(f'head_dim {qkv.shape[-1]} is above the supported {_MAX_HEAD_DIM}')
    _check_slot_map('index', index, index)
    _check_slot_map('segment', segment, index)
    tensors = [qkv, index, segment]
    if bias_table is not None:
        if position is None or window_size is None:
            raise ValueError('a bias_table needs position and window_size')
        _check_slot_map('position', position, index)
        wh, ww = window_size
        rows = (2 * wh - 1) * (2 * ww - 1)
        if bias_table.ndim != 2 or bias_table.shape != (rows, qkv.shape[2]):
            raise ValueError(
                f'bias_table must be [(2*{wh}-1)*(2*{ww}-1), H={qkv.shape[2]}] = [{rows}, {qkv.shape[2]}], '
                f'got {tuple(bias_table.shape)}')
        if not bias_table.is_floating_point():
            raise ValueError(f'bias_table must be floating point, got {bias_table.dtype}')
        tensors += [position, bias_table]
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f'all tensors must be on one device, got {sorted(map(str, devices))}')
    check_triton_device(qkv)


@torch.library.custom_op('greenmim::group_window_attention', mutates_args=())
def _forward_op(
        qkv: torch.Tensor,
        index: torch.Tensor,
        segment: torch.Tensor,
        position: Optional[torch.Tensor],
        bias_table: Optional[torch.Tensor],
        window_h: int,
        window_w: int,
        scale: float,
        deterministic: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(out [T, H, D], lse [G, H, S] fp32)``; ``deterministic`` selects the backward's bias-gradient mode.
    Without a bias table, ``position`` and the window are unused."""
    return kernel_module('group_attention', qkv).group_attention_forward(
        qkv, index, segment, position, bias_table, (window_h, window_w), scale)


@_forward_op.register_fake
def _(qkv, index, segment, position, bias_table, window_h, window_w, scale, deterministic):
    num_tokens, _, heads, head_dim = qkv.shape
    out = qkv.new_empty(num_tokens, heads, head_dim)
    return out, qkv.new_empty(index.shape[0], heads, index.shape[1], dtype=torch.float32)


@torch.library.custom_op('greenmim::group_window_attention_backward', mutates_args=())
def _backward_op(
        dout: torch.Tensor,
        qkv: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        index: torch.Tensor,
        segment: torch.Tensor,
        position: Optional[torch.Tensor],
        bias_table: Optional[torch.Tensor],
        window_h: int,
        window_w: int,
        scale: float,
        deterministic: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(dqkv [T, 3, H, D], dbias [(2Wh-1)(2Ww-1), H])``; without a bias table ``dbias`` is an empty ``[0]`` tensor
    (a custom op cannot return None)."""
    dqkv, dbias = kernel_module('group_attention', qkv).group_attention_backward(
        dout, qkv, out, lse, index, segment, position, bias_table, (window_h, window_w), scale, deterministic)
    return dqkv, dbias if dbias is not None else qkv.new_empty(0)


@_backward_op.register_fake
def _(dout, qkv, out, lse, index, segment, position, bias_table, window_h, window_w, scale, deterministic):
    return qkv.new_empty(qkv.shape), torch.empty_like(bias_table) if bias_table is not None else qkv.new_empty(0)


def _setup_context(ctx, inputs, output):
    qkv, index, segment, position, bias_table, window_h, window_w, scale, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(qkv, index, segment, position, bias_table, out, lse)
    ctx.window_size = (window_h, window_w)
    ctx.scale = scale
    ctx.deterministic = deterministic
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # no zeros for the gradient of lse (never used)


def _backward(ctx, dout, dlse):
    qkv, index, segment, position, bias_table, out, lse = ctx.saved_tensors
    dqkv, dbias = _backward_op(
        dout, qkv, out, lse, index, segment, position, bias_table, *ctx.window_size, ctx.scale, ctx.deterministic)
    return dqkv, None, None, None, dbias if bias_table is not None else None, None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def group_window_attention_triton(
        qkv: torch.Tensor,
        groups: AttentionLayout,
        bias_table: Optional[torch.Tensor],
        scale: float,
        deterministic: Optional[bool] = None,
) -> torch.Tensor:
    """Group window attention ``qkv [T, 3, H, D] -> [T, H, D]`` on the Triton kernels, differentiable in ``qkv``
    and ``bias_table``; arguments as :func:`~greenmim.kernels.reference.group_window_attention_reference`
    (``bias_table=None``: no bias, the positions and window unused). All-padding groups cost the kernels one
    read of their index row.

    ``deterministic``: bitwise-reproducible bias-table gradient (no atomics); ``None`` follows
    ``torch.are_deterministic_algorithms_enabled()``. q/k/v and their gradients never use atomics.
    """
    check_group_attention_inputs(qkv, groups, bias_table)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    has_bias = bias_table is not None
    wh, ww = groups.window_size if has_bias else (0, 0)
    out, _ = _forward_op(
        qkv, groups.index.contiguous(), groups.segment.contiguous(),
        groups.position.contiguous() if has_bias else None, bias_table, int(wh), int(ww), float(scale),
        bool(deterministic))
    return out
