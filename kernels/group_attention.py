"""Triton kernels of group window attention (forward, backward) and their launchers.

One program per (group, head) walks the group's ``S`` slots in tiles of ``BLOCK`` query rows and ``BLOCK`` keys.
q/k/v rows are read straight from ``qkv [T, 3, H, D]`` through the slot -> token ``index`` (no gather copy), the
relative position bias is looked up from the ``[(2Wh-1)(2Ww-1), H]`` table with the index computed from the slots'
in-window positions, the same-segment mask comes from ``segment``, and outputs are written in token order.
Softmax runs in base 2 with fp32 accumulation; the forward stores the per-slot log-sum-exp (base 2) ``[G, H, S]``
that the backward uses to recompute the probabilities.

Whether kernels run compiled or in Triton's CPU interpreter is fixed by ``TRITON_INTERPRET`` when they are decorated
(``@triton.jit``): Triton's own library (``tl.max``, ``tl.sum``) is decorated when ``triton`` is imported, so the
variable must be set in the environment before Python starts (this module refuses to load otherwise).
"""
import math
from typing import Tuple

import torch
import triton
import triton.language as tl

__all__ = ['INTERPRETED', 'group_attention_forward', 'group_attention_backward']

LOG2E = tl.constexpr(math.log2(math.e))
MAX_BLOCK = 64


@triton.jit
def _mma(a, b, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` accumulated in fp32; ``UPCAST`` multiplies in fp32 (the interpreter gets bf16 dots wrong)."""
    if UPCAST:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision='ieee')
    else:
        c = tl.dot(a, b, input_precision=DOT_PRECISION)
    return c


@triton.jit
def _load_slots(index, segment, position, g, group_size, start, BLOCK: tl.constexpr, WINDOW_W: tl.constexpr):
    """Slots ``start + arange(BLOCK)`` of group ``g``: ``(offsets, in group, token row (int64, 0 on padding), valid,
    segment, position code)``; the code ``row * (2Ww-1) + col`` makes the bias index a difference of codes."""
    offs = start + tl.arange(0, BLOCK)
    inside = offs < group_size
    token = tl.load(index + g * group_size + offs, mask=inside, other=-1)
    valid = token >= 0
    seg = tl.load(segment + g * group_size + offs, mask=inside, other=-1)
    pos = tl.load(position + g * group_size + offs, mask=inside, other=0)
    code = (pos // WINDOW_W) * (2 * WINDOW_W - 1) + pos % WINDOW_W
    return offs, inside, tl.where(valid, token, 0).to(tl.int64), valid, seg, code


@triton.jit
def _scores(q, k, valid_m, seg_m, code_m, valid_n, seg_n, code_n, bias_table, h, stride_bt, stride_bh, qk_scale,
            WINDOW_H: tl.constexpr, WINDOW_W: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``(scores * log2(e) [BLOCK, BLOCK] fp32, allowed pairs, bias-table row of each pair)`` of a tile."""
    allowed = (seg_m[:, None] == seg_n[None, :]) & valid_m[:, None] & valid_n[None, :]
    rel = code_m[:, None] - code_n[None, :] + (WINDOW_H - 1) * (2 * WINDOW_W - 1) + WINDOW_W - 1
    bias = tl.load(bias_table + rel * stride_bt + h * stride_bh, mask=allowed, other=0.).to(tl.float32)
    s = _mma(q, tl.trans(k), DOT_PRECISION, UPCAST) * qk_scale + bias * LOG2E
    return s, allowed, rel


@triton.jit
def _load_kv(qkv_h, row_n, valid_n, in_d, stride_qt, stride_qc):
    """k and v rows ``[BLOCK, BLOCK_D]`` of a key tile (zeros on padding slots) and their load mask."""
    kv_mask = valid_n[:, None] & in_d[None, :]
    k = tl.load(qkv_h + row_n[:, None] * stride_qt + stride_qc, mask=kv_mask, other=0.)
    v = tl.load(qkv_h + row_n[:, None] * stride_qt + 2 * stride_qc, mask=kv_mask, other=0.)
    return k, v, kv_mask


@triton.jit
def _load_query_grads(qkv_h, dout_h, lse_g, delta, h, num_heads, offs_m, in_m, row_m, valid_m, in_d, stride_qt,
                      stride_dt):
    """What the backward needs of a query tile: q and dout rows, log-sum-exp, delta, and the rows' load mask."""
    q_mask = valid_m[:, None] & in_d[None, :]
    q = tl.load(qkv_h + row_m[:, None] * stride_qt, mask=q_mask, other=0.)
    do = tl.load(dout_h + row_m[:, None] * stride_dt, mask=q_mask, other=0.)
    lse_m = tl.load(lse_g + offs_m, mask=in_m, other=0.)
    delta_m = tl.load(delta + row_m * num_heads + h, mask=valid_m, other=0.)
    return q, do, lse_m, delta_m, q_mask


@triton.jit
def _group_attention_fwd_kernel(
        qkv, out, lse, index, segment, position, bias_table,
        stride_qt, stride_qc, stride_qh, stride_qd,
        stride_ot, stride_oh, stride_od,
        stride_bt, stride_bh,
        num_heads, group_size, head_dim, qk_scale,
        WINDOW_H: tl.constexpr, WINDOW_W: tl.constexpr,
        BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Output rows (token order) and base-2 log-sum-exp of every query tile of one (group, head)."""
    pid = tl.program_id(0)  # g * num_heads + h
    g = pid // num_heads
    h = pid % num_heads
    offs_d = tl.arange(0, BLOCK_D)
    in_d = offs_d < head_dim
    qkv_h = qkv + h * stride_qh + offs_d[None, :] * stride_qd
    for start_m in range(0, group_size, BLOCK):
        offs_m, in_m, row_m, valid_m, seg_m, code_m = _load_slots(
            index, segment, position, g, group_size, start_m, BLOCK, WINDOW_W)
        q = tl.load(qkv_h + row_m[:, None] * stride_qt, mask=valid_m[:, None] & in_d[None, :], other=0.)
        m_i = tl.full([BLOCK], float('-inf'), tl.float32)
        l_i = tl.zeros([BLOCK], tl.float32)
        acc = tl.zeros([BLOCK, BLOCK_D], tl.float32)
        for start_n in range(0, group_size, BLOCK):
            _, _, row_n, valid_n, seg_n, code_n = _load_slots(
                index, segment, position, g, group_size, start_n, BLOCK, WINDOW_W)
            k, v, _ = _load_kv(qkv_h, row_n, valid_n, in_d, stride_qt, stride_qc)
            s, allowed, _ = _scores(q, k, valid_m, seg_m, code_m, valid_n, seg_n, code_n, bias_table, h,
                                    stride_bt, stride_bh, qk_scale, WINDOW_H, WINDOW_W, DOT_PRECISION, UPCAST)
            s = tl.where(allowed, s, float('-inf'))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float('-inf'), 0., m_new)  # rows with no allowed key yet
            alpha = tl.math.exp2(m_i - m_safe)
            p = tl.math.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + _mma(p.to(v.dtype), v, DOT_PRECISION, UPCAST)
            m_i = m_new
        has_keys = l_i > 0.  # False only on padding slots
        l_safe = tl.where(has_keys, l_i, 1.)
        o = acc / l_safe[:, None]
        o_ptrs = out + row_m[:, None] * stride_ot + h * stride_oh + offs_d[None, :] * stride_od
        tl.store(o_ptrs, o.to(out.dtype.element_ty), mask=valid_m[:, None] & in_d[None, :])
        tl.store(lse + pid * group_size + offs_m, tl.where(has_keys, m_i + tl.math.log2(l_safe), 0.), mask=in_m)


@triton.jit
def _score_grads(q, k, v, do, lse_m, delta_m, valid_m, seg_m, code_m, valid_n, seg_n, code_n, bias_table, h,
                 stride_bt, stride_bh, qk_scale,
                 WINDOW_H: tl.constexpr, WINDOW_W: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Recomputed probabilities ``p`` and score gradients ``ds = p * (dp - delta)`` (zero off the allowed pairs)
    of a tile, with the pairs' bias-table rows."""
    s, allowed, rel = _scores(q, k, valid_m, seg_m, code_m, valid_n, seg_n, code_n, bias_table, h,
                              stride_bt, stride_bh, qk_scale, WINDOW_H, WINDOW_W, DOT_PRECISION, UPCAST)
    p = tl.where(allowed, tl.math.exp2(s - lse_m[:, None]), 0.)
    dp = _mma(do, tl.trans(v), DOT_PRECISION, UPCAST)
    return p, p * (dp - delta_m[:, None]), allowed, rel


@triton.jit
def _group_attention_bwd_kv_kernel(
        qkv, dout, delta, lse, dqkv, dbias_partial, index, segment, position, bias_table,
        stride_qt, stride_qc, stride_qh, stride_qd,
        stride_dt, stride_dh, stride_dd,
        stride_gt, stride_gc, stride_gh, stride_gd,
        stride_bt, stride_bh,
        num_heads, group_size, head_dim, scale, qk_scale, num_rel,
        WINDOW_H: tl.constexpr, WINDOW_W: tl.constexpr,
        BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        DETERMINISTIC: tl.constexpr, SINGLE_TILE: tl.constexpr,
):
    """dk, dv of every key tile of one (group, head) and its bias-table gradient partial; with ``SINGLE_TILE``
    (the group fits one tile) dq too."""
    pid = tl.program_id(0)
    g = pid // num_heads
    h = pid % num_heads
    offs_d = tl.arange(0, BLOCK_D)
    in_d = offs_d < head_dim
    qkv_h = qkv + h * stride_qh + offs_d[None, :] * stride_qd
    dout_h = dout + h * stride_dh + offs_d[None, :] * stride_dd
    dqkv_h = dqkv + h * stride_gh + offs_d[None, :] * stride_gd
    partial = dbias_partial + pid * num_rel
    for start_n in range(0, group_size, BLOCK):
        _, _, row_n, valid_n, seg_n, code_n = _load_slots(
            index, segment, position, g, group_size, start_n, BLOCK, WINDOW_W)
        k, v, kv_mask = _load_kv(qkv_h, row_n, valid_n, in_d, stride_qt, stride_qc)
        dk = tl.zeros([BLOCK, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK, BLOCK_D], tl.float32)
        for start_m in range(0, group_size, BLOCK):
            offs_m, in_m, row_m, valid_m, seg_m, code_m = _load_slots(
                index, segment, position, g, group_size, start_m, BLOCK, WINDOW_W)
            q, do, lse_m, delta_m, q_mask = _load_query_grads(
                qkv_h, dout_h, lse + pid * group_size, delta, h, num_heads, offs_m, in_m, row_m, valid_m, in_d,
                stride_qt, stride_dt)
            p, ds, allowed, rel = _score_grads(
                q, k, v, do, lse_m, delta_m, valid_m, seg_m, code_m, valid_n, seg_n, code_n, bias_table, h,
                stride_bt, stride_bh, qk_scale, WINDOW_H, WINDOW_W, DOT_PRECISION, UPCAST)
            dv += _mma(tl.trans(p.to(do.dtype)), do, DOT_PRECISION, UPCAST)
            dk += _mma(tl.trans(ds.to(q.dtype)), q, DOT_PRECISION, UPCAST)
            if SINGLE_TILE:
                dq = _mma(ds.to(k.dtype), k, DOT_PRECISION, UPCAST) * scale
                tl.store(dqkv_h + row_m[:, None] * stride_gt, dq.to(dqkv.dtype.element_ty), mask=q_mask)
            if DETERMINISTIC:
                # one key column at a time: a column's allowed pairs have distinct bias rows (distinct query
                # positions in one window), so each read-modify-write is collision-free and runs in a fixed order.
                # Threads holding copies of an element all load before any stores (first barrier), and a column's
                # stores land before the next column's loads (second barrier).
                cols = tl.arange(0, BLOCK)[None, :]
                for j in range(0, BLOCK):
                    take = (cols == j) & allowed
                    ds_col = tl.sum(tl.where(take, ds, 0.), 1)
                    rel_col = tl.sum(tl.where(take, rel, 0), 1)
                    in_col = tl.sum(take.to(tl.int32), 1) > 0
                    current = tl.load(partial + rel_col, mask=in_col, other=0.)
                    tl.debug_barrier()
                    tl.store(partial + rel_col, current + ds_col, mask=in_col)
                    tl.debug_barrier()
            else:
                tl.atomic_add(partial + rel, ds, mask=allowed)
        g_ptrs = dqkv_h + row_n[:, None] * stride_gt
        tl.store(g_ptrs + stride_gc, (dk * scale).to(dqkv.dtype.element_ty), mask=kv_mask)
        tl.store(g_ptrs + 2 * stride_gc, dv.to(dqkv.dtype.element_ty), mask=kv_mask)


@triton.jit
def _group_attention_bwd_q_kernel(
        qkv, dout, delta, lse, dqkv, index, segment, position, bias_table,
        stride_qt, stride_qc, stride_qh, stride_qd,
        stride_dt, stride_dh, stride_dd,
        stride_gt, stride_gc, stride_gh, stride_gd,
        stride_bt, stride_bh,
        num_heads, group_size, head_dim, scale, qk_scale,
        WINDOW_H: tl.constexpr, WINDOW_W: tl.constexpr,
        BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """dq of every query tile of one (group, head), for groups larger than one tile."""
    pid = tl.program_id(0)
    g = pid // num_heads
    h = pid % num_heads
    offs_d = tl.arange(0, BLOCK_D)
    in_d = offs_d < head_dim
    qkv_h = qkv + h * stride_qh + offs_d[None, :] * stride_qd
    dout_h = dout + h * stride_dh + offs_d[None, :] * stride_dd
    for start_m in range(0, group_size, BLOCK):
        offs_m, in_m, row_m, valid_m, seg_m, code_m = _load_slots(
            index, segment, position, g, group_size, start_m, BLOCK, WINDOW_W)
        q, do, lse_m, delta_m, q_mask = _load_query_grads(
            qkv_h, dout_h, lse + pid * group_size, delta, h, num_heads, offs_m, in_m, row_m, valid_m, in_d,
            stride_qt, stride_dt)
        dq = tl.zeros([BLOCK, BLOCK_D], tl.float32)
        for start_n in range(0, group_size, BLOCK):
            _, _, row_n, valid_n, seg_n, code_n = _load_slots(
                index, segment, position, g, group_size, start_n, BLOCK, WINDOW_W)
            k, v, _ = _load_kv(qkv_h, row_n, valid_n, in_d, stride_qt, stride_qc)
            _, ds, _, _ = _score_grads(
                q, k, v, do, lse_m, delta_m, valid_m, seg_m, code_m, valid_n, seg_n, code_n, bias_table, h,
                stride_bt, stride_bh, qk_scale, WINDOW_H, WINDOW_W, DOT_PRECISION, UPCAST)
            dq += _mma(ds.to(k.dtype), k, DOT_PRECISION, UPCAST)
        tl.store(dqkv + row_m[:, None] * stride_gt + h * stride_gh + offs_d[None, :] * stride_gd,
                 (dq * scale).to(dqkv.dtype.element_ty), mask=q_mask)


INTERPRETED = not isinstance(_group_attention_fwd_kernel, triton.runtime.JITFunction)
if INTERPRETED and isinstance(tl.max, triton.runtime.JITFunction):
    raise RuntimeError(
        'TRITON_INTERPRET=1 was set after triton was imported: Triton decorates its own library (tl.max, tl.sum) '
        'when it is imported, so set TRITON_INTERPRET=1 in the environment before Python starts')


def _launch_config(qkv: torch.Tensor, group_size: int) -> dict:
    """Tile sizes and dot precision for ``qkv [T, 3, H, D]`` and groups of ``group_size`` slots."""
    head_dim = qkv.shape[-1]
    return dict(
        BLOCK=min(MAX_BLOCK, max(16, triton.next_power_of_2(group_size))),
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        DOT_PRECISION='ieee' if qkv.dtype == torch.float32 else 'tf32',
        UPCAST=INTERPRETED and qkv.dtype == torch.bfloat16,
    )


def group_attention_forward(
        qkv: torch.Tensor,
        index: torch.Tensor,
        segment: torch.Tensor,
        position: torch.Tensor,
        bias_table: torch.Tensor,
        window_size: Tuple[int, int],
        scale: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(out [T, H, D], lse [G, H, S] fp32, base 2)``; arguments as the reference, index maps contiguous."""
    num_tokens, _, heads, head_dim = qkv.shape
    groups, group_size = index.shape
    out = qkv.new_empty(num_tokens, heads, head_dim)
    lse = qkv.new_empty(groups, heads, group_size, dtype=torch.float32)
    if groups == 0 or num_tokens == 0:
        return out, lse.zero_()
    _group_attention_fwd_kernel[(groups * heads,)](
        qkv, out, lse, index, segment, position, bias_table,
        *qkv.stride(), *out.stride(), *bias_table.stride(),
        heads, group_size, head_dim, scale * LOG2E.value,
        WINDOW_H=window_size[0], WINDOW_W=window_size[1], **_launch_config(qkv, group_size),
    )
    return out, lse


def group_attention_backward(
        dout: torch.Tensor,
        qkv: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        index: torch.Tensor,
        segment: torch.Tensor,
        position: torch.Tensor,
        bias_table: torch.Tensor,
        window_size: Tuple[int, int],
        scale: float,
        deterministic: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(dqkv [T, 3, H, D], dbias [(2Wh-1)(2Ww-1), H])`` for ``dout [T, H, D]``.

    The bias-table gradient is accumulated in fp32 into one partial per (group, head) -- with fp32 atomics, or with
    ``deterministic`` by collision-free read-modify-writes in a fixed order -- and the partials are summed over
    groups in a fixed order.
    """
    num_tokens, _, heads, head_dim = qkv.shape
    groups, group_size = index.shape
    num_rel = bias_table.shape[0]
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    partial = torch.zeros(groups, heads, num_rel, dtype=torch.float32, device=qkv.device)
    if groups and num_tokens:
        delta = (dout.float() * out.float()).sum(-1).contiguous()  # [T, H]
        config = _launch_config(qkv, group_size)
        strides = (*qkv.stride(), *dout.stride(), *dqkv.stride(), *bias_table.stride())
        window = dict(WINDOW_H=window_size[0], WINDOW_W=window_size[1])
        single_tile = group_size <= config['BLOCK']
        _group_attention_bwd_kv_kernel[(groups * heads,)](
            qkv, dout, delta, lse, dqkv, partial, index, segment, position, bias_table, *strides,
            heads, group_size, head_dim, scale, scale * LOG2E.value, num_rel,
            DETERMINISTIC=deterministic, SINGLE_TILE=single_tile, **window, **config,
        )
        if not single_tile:
            _group_attention_bwd_q_kernel[(groups * heads,)](
                qkv, dout, delta, lse, dqkv, index, segment, position, bias_table, *strides,
                heads, group_size, head_dim, scale, scale * LOG2E.value,
                **window, **config,
            )
    return dqkv, torch.empty_like(bias_table).copy_(partial.sum(0).t())
