"""Triton kernels of group window attention (forward, backward) and their launchers.

One program per (group, head) walks the group's ``S`` slots in tiles of ``BLOCK`` query rows and ``BLOCK`` keys.
q/k/v rows are read straight from ``qkv [T, 3, H, D]`` through the slot -> token ``index`` (no gather copy), the
optional relative position bias is looked up from the ``[(2Wh-1)(2Ww-1), H]`` table with the index computed from the
slots' in-window positions, the same-segment mask comes from ``segment``, and outputs are written in token order.
Softmax runs in base 2 with fp32 accumulation; the forward stores the per-slot log-sum-exp (base 2) ``[G, H, S]``
that the backward uses to recompute the probabilities. A program whose group is all padding (a static layout's
spare capacity, :mod:`greenmim.layout`) reads the group's index row and exits.

Register pressure: a disallowed pair is masked by loading its bias as ``-inf`` (or one ``where`` without bias), so
neither the mask nor the bias index outlives the scores; the bias-gradient scatter recomputes its table rows from the
slots' codes and skips pairs with ``ds == 0`` (every disallowed pair), so it needs no mask either.

Whether kernels run compiled or in Triton's CPU interpreter is fixed by ``TRITON_INTERPRET`` when they are decorated
(``@triton.jit``): Triton's own library (``tl.max``, ``tl.sum``) is decorated when ``triton`` is imported, so the
variable must be set in the environment before Python starts (this module refuses to load otherwise).
"""
import functools
import math
from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from .groups import MAX_BLOCK, MIN_BLOCK
from .triton_runtime import interpreted

__all__ = ['INTERPRETED', 'group_attention_forward', 'group_attention_backward', 'launch_config']

LOG2E = tl.constexpr(math.log2(math.e))
ZERO_BLOCK = tl.constexpr(256)  # bias-gradient partial entries zeroed per step


@triton.jit
def _mma(a, b, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` accumulated in fp32; ``UPCAST`` multiplies in fp32 (the interpreter gets bf16 dots wrong)."""
    if UPCAST:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision='ieee')
    else:
        c = tl.dot(a, b, input_precision=DOT_PRECISION)
    return c


@triton.jit
def _group_is_empty(index, g, group_size, BLOCK: tl.constexpr):
    """Whether every slot of group ``g`` is padding (a static layout's spare capacity): its program exits early."""
    last = tl.full([], -1, tl.int32)
    for start in range(0, group_size, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        last = tl.maximum(last, tl.max(tl.load(index + g * group_size + offs, mask=offs < group_size, other=-1), 0))
    return last < 0


@triton.jit
def _load_slots(index, segment, position, g, group_size, start,
                BLOCK: tl.constexpr, WINDOW_W: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Slots ``start + arange(BLOCK)`` of group ``g``: ``(offsets, in group, token row (int64, 0 on padding), valid,
    segment, code)``. The code ``row * (2Ww-1) + col`` of the in-window position makes the bias-table row of a pair
    ``code_q - code_k`` plus the table's centre row (0 without bias)."""
    offs = start + tl.arange(0, BLOCK)
    inside = offs < group_size
    slot = g * group_size + offs
    token = tl.load(index + slot, mask=inside, other=-1)
    valid = token >= 0
    seg = tl.load(segment + slot, mask=inside, other=-1)
    code = tl.zeros([BLOCK], tl.int32)
    if HAS_BIAS:
        pos = tl.load(position + slot, mask=inside, other=0)
        code = (pos // WINDOW_W) * (2 * WINDOW_W - 1) + pos % WINDOW_W
    return offs, inside, tl.where(valid, token, 0).to(tl.int64), valid, seg, code


@triton.jit
def _masked_scores(q, k, seg_m, code_m, valid_n, seg_n, code_n, bias_table, h, stride_bt, stride_bh, qk_scale,
                   WINDOW_H: tl.constexpr, WINDOW_W: tl.constexpr, HAS_BIAS: tl.constexpr, KEYS_ON_ROWS: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``(q·kᵀ · scale + bias) · log2(e)`` of a tile in fp32 (``[queries, keys]``, or ``[keys, queries]`` with
    ``KEYS_ON_ROWS``), ``-inf`` on pairs that are not allowed (other segment or padding key). A padding query row may
    see keys: its results are never stored and its gradients are zero."""
    if KEYS_ON_ROWS:
        s = _mma(k, tl.trans(q), DOT_PRECISION, UPCAST) * qk_scale
        allowed = (seg_n[:, None] == seg_m[None, :]) & valid_n[:, None]
        rel = code_m[None, :] - code_n[:, None]
    else:
        s = _mma(q, tl.trans(k), DOT_PRECISION, UPCAST) * qk_scale
        allowed = (seg_m[:, None] == seg_n[None, :]) & valid_n[None, :]
        rel = code_m[:, None] - code_n[None, :]
    if HAS_BIAS:
        centre = (WINDOW_H - 1) * (2 * WINDOW_W - 1) + WINDOW_W - 1
        bias_h = bias_table + centre * stride_bt + h * stride_bh
        bias = tl.load(bias_h + rel * stride_bt, mask=allowed, other=float('-inf'))
        s += bias.to(tl.float32) * LOG2E
    else:
        s = tl.where(allowed, s, float('-inf'))
    return s


@triton.jit
def _load_kv(qkv_h, row_n, valid_n, in_d, stride_qt, stride_qc):
    """k and v rows ``[rows, BLOCK_D]`` of a key tile (zeros on padding slots) and their load mask."""
    kv_mask = valid_n[:, None] & in_d[None, :]
    k = tl.load(qkv_h + row_n[:, None] * stride_qt + stride_qc, mask=kv_mask, other=0.)
    v = tl.load(qkv_h + row_n[:, None] * stride_qt + 2 * stride_qc, mask=kv_mask, other=0.)
    return k, v, kv_mask


@triton.jit
def _group_attention_fwd_kernel(
        qkv, out, lse, index, segment, position, bias_table,
        stride_qt, stride_qc, stride_qh, stride_qd, stride_bt, stride_bh,
        num_heads, group_size, head_dim, scale,
        WINDOW_H: tl.constexpr, WINDOW_W: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
):
    """Output rows (token order, into contiguous ``out [T, H, D]``) and base-2 log-sum-exp of one (group, head), in
    query tiles of ``BLOCK`` rows and key chunks of ``CHUNK``."""
    pid = tl.program_id(0)  # g * num_heads + h
    g = pid // num_heads
    h = pid % num_heads
    if _group_is_empty(index, g, group_size, BLOCK):
        return
    qk_scale = scale * LOG2E
    offs_d = tl.arange(0, BLOCK_D)
    in_d = offs_d < head_dim
    qkv_h = qkv + h * stride_qh + offs_d[None, :] * stride_qd
    out_h = out + h * head_dim + offs_d[None, :]
    for start_m in range(0, group_size, BLOCK):
        offs_m, in_m, row_m, valid_m, seg_m, code_m = _load_slots(
            index, segment, position, g, group_size, start_m, BLOCK, WINDOW_W, HAS_BIAS)
        q_mask = valid_m[:, None] & in_d[None, :]
        q = tl.load(qkv_h + row_m[:, None] * stride_qt, mask=q_mask, other=0.)
        m_i = tl.full([BLOCK], float('-inf'), tl.float32)
        l_i = tl.zeros([BLOCK], tl.float32)
        acc = tl.zeros([BLOCK, BLOCK_D], tl.float32)
        for start_n in range(0, group_size, CHUNK):
            _, _, row_n, valid_n, seg_n, code_n = _load_slots(
                index, segment, position, g, group_size, start_n, CHUNK, WINDOW_W, HAS_BIAS)
            k, v, _ = _load_kv(qkv_h, row_n, valid_n, in_d, stride_qt, stride_qc)
            s = _masked_scores(q, k, seg_m, code_m, valid_n, seg_n, code_n, bias_table, h, stride_bt, stride_bh,
                               qk_scale, WINDOW_H, WINDOW_W, HAS_BIAS, False, DOT_PRECISION, UPCAST)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float('-inf'), 0., m_new)  # rows with no allowed key yet
            alpha = tl.math.exp2(m_i - m_safe)
            p = tl.math.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + _mma(p.to(v.dtype), v, DOT_PRECISION, UPCAST)
            m_i = m_new
        has_keys = valid_m & (l_i > 0.)
        l_safe = tl.where(has_keys, l_i, 1.)
        o = acc / l_safe[:, None]
        tl.store(out_h + row_m[:, None] * num_heads * head_dim, o.to(out.dtype.element_ty), mask=q_mask)
        tl.store(lse + pid * group_size + offs_m, tl.where(has_keys, m_i + tl.math.log2(l_safe), 0.), mask=in_m)


@triton.jit
def _load_query_grads(qkv_h, dout_h, out_h, lse_g, offs_m, in_m, row_m, valid_m, in_d, stride_qt, stride_dt,
                      stride_ot):
    """What the backward needs of a query tile: q and dout rows, log-sum-exp, ``delta = rowsum(dout * out)`` (fp32,
    fixed order) and the rows' load mask."""
    q_mask = valid_m[:, None] & in_d[None, :]
    q = tl.load(qkv_h + row_m[:, None] * stride_qt, mask=q_mask, other=0.)
    do = tl.load(dout_h + row_m[:, None] * stride_dt, mask=q_mask, other=0.)
    o = tl.load(out_h + row_m[:, None] * stride_ot, mask=q_mask, other=0.)
    delta_m = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    lse_m = tl.load(lse_g + offs_m, mask=in_m, other=0.)
    return q, do, lse_m, delta_m, q_mask


@triton.jit
def _score_grads(q, k, v, do, lse_m, delta_m, seg_m, code_m, valid_n, seg_n, code_n, bias_table, h,
                 stride_bt, stride_bh, qk_scale,
                 WINDOW_H: tl.constexpr, WINDOW_W: tl.constexpr, HAS_BIAS: tl.constexpr, KEYS_ON_ROWS: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Recomputed probabilities ``p`` and score gradients ``ds = p * (dp - delta)`` of a tile, oriented as
    :func:`_masked_scores` (both exactly zero on pairs that are not allowed)."""
    s = _masked_scores(q, k, seg_m, code_m, valid_n, seg_n, code_n, bias_table, h, stride_bt, stride_bh, qk_scale,
                       WINDOW_H, WINDOW_W, HAS_BIAS, KEYS_ON_ROWS, DOT_PRECISION, UPCAST)
    if KEYS_ON_ROWS:
        p = tl.math.exp2(s - lse_m[None, :])
        ds = p * (_mma(v, tl.trans(do), DOT_PRECISION, UPCAST) - delta_m[None, :])
    else:
        p = tl.math.exp2(s - lse_m[:, None])
        ds = p * (_mma(do, tl.trans(v), DOT_PRECISION, UPCAST) - delta_m[:, None])
    return p, ds


@triton.jit
def _accumulate_dbias(partial, ds_t, code_n, code_m, num_heads, num_cols, CHUNK: tl.constexpr,
                      DETERMINISTIC: tl.constexpr):
    """Add the score gradients ``ds_t [keys, CHUNK queries]`` of a tile to the program's bias-gradient partial
    (``partial`` points at its centre row; rows are ``num_heads`` apart) at rows ``code_q - code_k``; pairs with
    ``ds == 0`` (all that are not allowed) are skipped, which changes no sum."""
    if DETERMINISTIC:
        # one query at a time: its nonzero pairs are allowed pairs, whose keys have distinct positions in one window,
        # hence distinct bias rows, so each read-modify-write is collision-free and runs in a fixed order. Threads
        # holding copies of an element all load before any stores (first barrier), and a query's stores land
        # before the next query's loads (second barrier).
        cols = tl.arange(0, CHUNK)
        for j in range(0, num_cols):
            ds_col = tl.sum(tl.where(cols[None, :] == j, ds_t, 0.), 1)
            code_j = tl.sum(tl.where(cols == j, code_m, 0), 0)
            ptrs = partial + (code_j - code_n) * num_heads
            take = ds_col != 0.
            current = tl.load(ptrs, mask=take, other=0.)
            tl.debug_barrier()
            tl.store(ptrs, current + ds_col, mask=take)
            tl.debug_barrier()
    else:
        tl.atomic_add(partial + (code_m[None, :] - code_n[:, None]) * num_heads, ds_t, mask=ds_t != 0.)


@triton.jit
def _group_attention_bwd_kv_kernel(
        qkv, dout, out, lse, dqkv, dbias_partial, index, segment, position, bias_table,
        stride_qt, stride_qc, stride_qh, stride_qd, stride_dt, stride_dh, stride_dd, stride_bt, stride_bh,
        num_heads, group_size, head_dim, scale,
        WINDOW_H: tl.constexpr, WINDOW_W: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
        UPCAST: tl.constexpr, DETERMINISTIC: tl.constexpr, SINGLE_TILE: tl.constexpr,
):
    """dk, dv of one (group, head) in key tiles of ``BLOCK`` rows (query chunks of ``CHUNK``; the tiles are
    ``[keys, queries]``) into contiguous ``dqkv [T, 3, H, D]`` and, with a bias table, the program's bias-gradient
    partial ``[G, (2Wh-1)(2Ww-1), H]`` (zeroed here first). With ``SINGLE_TILE`` (the group fits one key tile) each
    query chunk's dq is complete after its tile and is written too."""
    pid = tl.program_id(0)
    g = pid // num_heads
    h = pid % num_heads
    qk_scale = scale * LOG2E
    offs_d = tl.arange(0, BLOCK_D)
    in_d = offs_d < head_dim
    qkv_h = qkv + h * stride_qh + offs_d[None, :] * stride_qd
    dout_h = dout + h * stride_dh + offs_d[None, :] * stride_dd
    out_h = out + h * head_dim + offs_d[None, :]
    dqkv_h = dqkv + h * head_dim + offs_d[None, :]
    dqkv_t = dqkv + h * head_dim + offs_d[:, None]
    stride_gt = 3 * num_heads * head_dim
    if HAS_BIAS:
        num_rel = (2 * WINDOW_H - 1) * (2 * WINDOW_W - 1)
        partial = dbias_partial + g * num_rel * num_heads + h
        for start_r in range(0, num_rel, ZERO_BLOCK):
            offs_r = start_r + tl.arange(0, ZERO_BLOCK)
            tl.store(partial + offs_r * num_heads, tl.zeros([ZERO_BLOCK], tl.float32), mask=offs_r < num_rel)
        tl.debug_barrier()  # the zeros land before any thread adds to them
        partial += ((WINDOW_H - 1) * (2 * WINDOW_W - 1) + WINDOW_W - 1) * num_heads  # centre row
    if _group_is_empty(index, g, group_size, BLOCK):
        return
    for start_n in range(0, group_size, BLOCK):
        _, _, row_n, valid_n, seg_n, code_n = _load_slots(
            index, segment, position, g, group_size, start_n, BLOCK, WINDOW_W, HAS_BIAS)
        k, v, kv_mask = _load_kv(qkv_h, row_n, valid_n, in_d, stride_qt, stride_qc)
        dk = tl.zeros([BLOCK, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK, BLOCK_D], tl.float32)
        for start_m in range(0, group_size, CHUNK):
            offs_m, in_m, row_m, valid_m, seg_m, code_m = _load_slots(
                index, segment, position, g, group_size, start_m, CHUNK, WINDOW_W, HAS_BIAS)
            q, do, lse_m, delta_m, q_mask = _load_query_grads(
                qkv_h, dout_h, out_h, lse + pid * group_size, offs_m, in_m, row_m, valid_m, in_d,
                stride_qt, stride_dt, num_heads * head_dim)
            p_t, ds_t = _score_grads(
                q, k, v, do, lse_m, delta_m, seg_m, code_m, valid_n, seg_n, code_n, bias_table, h,
                stride_bt, stride_bh, qk_scale, WINDOW_H, WINDOW_W, HAS_BIAS, True, DOT_PRECISION, UPCAST)
            dv += _mma(p_t.to(do.dtype), do, DOT_PRECISION, UPCAST)
            dk += _mma(ds_t.to(q.dtype), q, DOT_PRECISION, UPCAST)
            if SINGLE_TILE:  # dqᵀ = kᵀ dsᵀ keeps the dot's rows at head_dim (no k replicated across warps)
                dq_t = _mma(tl.trans(k), ds_t.to(k.dtype), DOT_PRECISION, UPCAST) * scale
                tl.store(dqkv_t + row_m[None, :] * stride_gt, dq_t.to(dqkv.dtype.element_ty), mask=tl.trans(q_mask))
            if HAS_BIAS:
                _accumulate_dbias(partial, ds_t, code_n, code_m, num_heads, tl.minimum(group_size - start_m, CHUNK),
                                  CHUNK, DETERMINISTIC)
        g_ptrs = dqkv_h + row_n[:, None] * stride_gt
        tl.store(g_ptrs + num_heads * head_dim, (dk * scale).to(dqkv.dtype.element_ty), mask=kv_mask)
        tl.store(g_ptrs + 2 * num_heads * head_dim, dv.to(dqkv.dtype.element_ty), mask=kv_mask)


@triton.jit
def _group_attention_bwd_q_kernel(
        qkv, dout, out, lse, dqkv, index, segment, position, bias_table,
        stride_qt, stride_qc, stride_qh, stride_qd, stride_dt, stride_dh, stride_dd, stride_bt, stride_bh,
        num_heads, group_size, head_dim, scale,
        WINDOW_H: tl.constexpr, WINDOW_W: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
):
    """dq of one (group, head) in query tiles of ``BLOCK`` rows and key chunks of ``CHUNK``, for groups larger than
    one tile."""
    pid = tl.program_id(0)
    g = pid // num_heads
    h = pid % num_heads
    if _group_is_empty(index, g, group_size, BLOCK):
        return
    qk_scale = scale * LOG2E
    offs_d = tl.arange(0, BLOCK_D)
    in_d = offs_d < head_dim
    qkv_h = qkv + h * stride_qh + offs_d[None, :] * stride_qd
    dout_h = dout + h * stride_dh + offs_d[None, :] * stride_dd
    out_h = out + h * head_dim + offs_d[None, :]
    for start_m in range(0, group_size, BLOCK):
        offs_m, in_m, row_m, valid_m, seg_m, code_m = _load_slots(
            index, segment, position, g, group_size, start_m, BLOCK, WINDOW_W, HAS_BIAS)
        q, do, lse_m, delta_m, q_mask = _load_query_grads(
            qkv_h, dout_h, out_h, lse + pid * group_size, offs_m, in_m, row_m, valid_m, in_d,
            stride_qt, stride_dt, num_heads * head_dim)
        dq = tl.zeros([BLOCK, BLOCK_D], tl.float32)
        for start_n in range(0, group_size, CHUNK):
            _, _, row_n, valid_n, seg_n, code_n = _load_slots(
                index, segment, position, g, group_size, start_n, CHUNK, WINDOW_W, HAS_BIAS)
            k, v, _ = _load_kv(qkv_h, row_n, valid_n, in_d, stride_qt, stride_qc)
            _, ds = _score_grads(
                q, k, v, do, lse_m, delta_m, seg_m, code_m, valid_n, seg_n, code_n, bias_table, h,
                stride_bt, stride_bh, qk_scale, WINDOW_H, WINDOW_W, HAS_BIAS, False, DOT_PRECISION, UPCAST)
            dq += _mma(ds.to(k.dtype), k, DOT_PRECISION, UPCAST)
        tl.store(dqkv + row_m[:, None] * 3 * num_heads * head_dim + h * head_dim + offs_d[None, :],
                 (dq * scale).to(dqkv.dtype.element_ty), mask=q_mask)


INTERPRETED = interpreted(_group_attention_fwd_kernel)


@functools.lru_cache(maxsize=None)
def launch_config(dtype: torch.dtype, head_dim: int, group_size: int) -> Dict[str, dict]:
    """Launch parameters of each kernel (``forward``, ``backward_kv``, ``backward_q``) for groups of ``group_size``
    slots of ``head_dim``-wide heads in ``dtype``: tile rows ``BLOCK``, the other side ``CHUNK`` of the score tile,
    warps, register budget, dot precision. Chosen with ``benchmarks/compile_report.py`` so that no kernel spills at
    sm_80/sm_90 (see docs/kernels.md).

    Every dot's rows span ``BLOCK`` (queries in the forward and dq kernels, keys in the dk/dv kernel), and small
    ``CHUNK``s of the other side keep the score tile, the bias gather (a 64-bit address per pair) and the
    bias-gradient scatter few registers per thread. bf16/fp16 dots run on tensor cores, one warp per 8 rows. fp32
    dots run in IEEE fp32 on FMA units: one warp per 4 rows (at most 8) under a 128-register budget (16 warps per
    SM; left to itself ptxas trades a few bytes of spills for occupancy there), and the backward's tiles stop at 32
    rows.
    """
    block = min(MAX_BLOCK, max(MIN_BLOCK, triton.next_power_of_2(group_size)))
    common = dict(
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        DOT_PRECISION='ieee' if dtype == torch.float32 else 'tf32',
        UPCAST=INTERPRETED and dtype == torch.bfloat16,
        num_stages=1,  # deeper pipelines prefetch the next chunk's bias gather: registers, no gain at these sizes
    )
    if dtype == torch.float32:
        rows = (block, min(block, 32))  # (forward, backward)
        chunks = (16, 16)
        warps = tuple(min(8, r // 4) for r in rows)
        budget = dict(maxnreg=128)
    else:
        rows = (block, block)
        chunks = (32 if head_dim <= 32 else 16, 16)
        warps = tuple(r // 8 for r in rows)
        budget = {}
    forward, backward = (dict(common, BLOCK=r, CHUNK=min(r, c), num_warps=w, **budget)
                         for r, c, w in zip(rows, chunks, warps))
    return dict(forward=forward, backward_kv=backward, backward_q=backward)


def _bias_args(bias_table: Optional[torch.Tensor], window_size: Optional[Tuple[int, int]]) -> dict:
    """The bias table, its strides and the window (a 1x1 window without a table: one relative position)."""
    if bias_table is None:
        return dict(bias_table=None, stride_bt=0, stride_bh=0, WINDOW_H=1, WINDOW_W=1, HAS_BIAS=False)
    return dict(bias_table=bias_table, stride_bt=bias_table.stride(0), stride_bh=bias_table.stride(1),
                WINDOW_H=window_size[0], WINDOW_W=window_size[1], HAS_BIAS=True)


def group_attention_forward(
        qkv: torch.Tensor,
        index: torch.Tensor,
        segment: torch.Tensor,
        position: Optional[torch.Tensor],
        bias_table: Optional[torch.Tensor],
        window_size: Optional[Tuple[int, int]],
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
        qkv=qkv, out=out, lse=lse, index=index, segment=segment, position=position,
        stride_qt=qkv.stride(0), stride_qc=qkv.stride(1), stride_qh=qkv.stride(2), stride_qd=qkv.stride(3),
        num_heads=heads, group_size=group_size, head_dim=head_dim, scale=scale,
        **_bias_args(bias_table, window_size), **launch_config(qkv.dtype, head_dim, group_size)['forward'],
    )
    return out, lse


def group_attention_backward(
        dout: torch.Tensor,
        qkv: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        index: torch.Tensor,
        segment: torch.Tensor,
        position: Optional[torch.Tensor],
        bias_table: Optional[torch.Tensor],
        window_size: Optional[Tuple[int, int]],
        scale: float,
        deterministic: bool,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(dqkv [T, 3, H, D], dbias [(2Wh-1)(2Ww-1), H] or None without a bias table)`` for ``dout [T, H, D]``
    (``out`` as the forward returned it: contiguous).

    The bias-table gradient is accumulated in fp32 into one partial per (group, head) -- with fp32 atomics, or with
    ``deterministic`` by collision-free read-modify-writes in a fixed order -- and the partials are summed over
    groups by ``torch.sum`` (a fixed order).
    """
    num_tokens, _, heads, head_dim = qkv.shape
    groups, group_size = index.shape
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    bias = _bias_args(bias_table, window_size)
    partial = None
    if bias_table is not None:
        partial = torch.empty(groups, bias_table.shape[0], heads, dtype=torch.float32, device=qkv.device)
    if groups and num_tokens:
        config = launch_config(qkv.dtype, head_dim, group_size)
        args = dict(
            qkv=qkv, dout=dout, out=out, lse=lse, dqkv=dqkv, index=index, segment=segment, position=position,
            stride_qt=qkv.stride(0), stride_qc=qkv.stride(1), stride_qh=qkv.stride(2), stride_qd=qkv.stride(3),
            stride_dt=dout.stride(0), stride_dh=dout.stride(1), stride_dd=dout.stride(2),
            num_heads=heads, group_size=group_size, head_dim=head_dim, scale=scale, **bias)
        single_tile = group_size <= config['backward_kv']['BLOCK']
        _group_attention_bwd_kv_kernel[(groups * heads,)](
            dbias_partial=partial, DETERMINISTIC=deterministic, SINGLE_TILE=single_tile, **args,
            **config['backward_kv'])
        if not single_tile:
            _group_attention_bwd_q_kernel[(groups * heads,)](**args, **config['backward_q'])
    elif partial is not None:
        partial.zero_()
    if partial is None:
        return dqkv, None
    dbias = partial.sum(0)  # [(2Wh-1)(2Ww-1), H] fp32
    return dqkv, dbias if dbias.dtype == bias_table.dtype else dbias.to(bias_table.dtype)
