"""Group window attention: our Triton kernels vs gather + SDPA, FlexAttention and the eager reference.

    python benchmarks/bench_group_attention.py                 # GPU: Swin-B stage shapes, batch 128, bf16
    python benchmarks/bench_group_attention.py --smoke         # CPU, TRITON_INTERPRET=1, tiny shapes (checks the script)

For every (window 7 / 14, stage, shift) layout of green_swin_base built by ``build_visible_layout`` on a random
ratio-0.75 mask: median forward and forward+backward times of (a) ``ours`` (Triton), (b) ``sdpa`` (gather q/k/v into
groups, materialise the ``[G, H, S, S]`` bias + mask, ``F.scaled_dot_product_attention``, scatter back),
(c) ``flex`` (FlexAttention over the flattened slots with a block mask and a bias ``score_mod``; ``create_block_mask``
timed separately) and (d) ``reference`` (the eager PyTorch op); achieved bandwidth of ``ours`` against the minimal
bytes; and a whole GreenMIM(green_swin_base) training step (bf16 autocast, AdamW) with GREENMIM_BACKEND=triton vs
torch. Bandwidth is also given as a fraction of a large device copy's (``copy_GBps``, the practical ceiling).
Results go to ``<out>/group_attention_<device>.json``.
"""
import argparse
import os
import sys

if '--smoke' in sys.argv:  # Triton reads this when it is imported
    os.environ['TRITON_INTERPRET'] = '1'

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import greenmim  # noqa: E402
from greenmim.kernels import group_window_attention_triton  # noqa: E402
from greenmim.kernels.reference import group_window_attention_reference, relative_position_index  # noqa: E402
from greenmim.layout import build_visible_layout  # noqa: E402
from greenmim.masking import random_mask  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from common import median_ms, write_result  # noqa: E402


def sdpa_attention(qkv, layout, table, scale, allowed, rel_index):
    """Gather into ``[G, H, S, D]``, SDPA with a materialised additive bias+mask, scatter to token order."""
    index = layout.index.clamp_min(0).long()
    q, k, v = qkv[index].permute(2, 0, 3, 1, 4).unbind(0)
    bias = table[rel_index].permute(0, 3, 1, 2).to(q.dtype)  # [G, H, S, S]
    bias = bias.masked_fill(~allowed[:, None], float('-inf'))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    out = out.transpose(1, 2).flatten(0, 1)  # [G*S, H, D]
    valid = layout.index.flatten() >= 0
    return out.new_empty(qkv.shape[0], *out.shape[1:]).index_copy_(0, layout.index.flatten()[valid].long(), out[valid])


def _error(e: Exception) -> str:
    return f'{type(e).__name__}: {e}'.splitlines()[0][:300]


def _allowed(layout):
    """bool ``[G, S, S]``: same segment and valid key; a padding row attends to itself (finite, then dropped)."""
    valid = layout.index >= 0
    allowed = (layout.segment[:, :, None] == layout.segment[:, None, :]) & valid[:, None, :]
    eye = torch.eye(layout.group_size, dtype=torch.bool, device=valid.device)
    return allowed | (eye & ~valid[:, :, None])


def flex_setup(layout, device, flat: bool):
    """FlexAttention block mask: one batch entry per group (``flat=False``), or all ``G * S`` slots as one sequence
    with the group as part of the mask (``flat=True``, block-sparse)."""
    from torch.nn.attention.flex_attention import create_block_mask
    groups, size = layout.index.shape
    segment, valid = layout.segment.flatten(), layout.index.flatten() >= 0
    if flat:
        group = torch.arange(groups, device=device).repeat_interleave(size)

        def mask_mod(b, h, q, kv):
            same = (group[q] == group[kv]) & (segment[q] == segment[kv]) & valid[kv]
            return same | ((q == kv) & ~valid[q])

        return create_block_mask(mask_mod, 1, None, groups * size, groups * size, device=device,
                                 _compile=device == 'cuda')

    def mask_mod(b, h, q, kv):
        q, kv = b * size + q, b * size + kv
        return ((segment[q] == segment[kv]) & valid[kv]) | ((q == kv) & ~valid[q])

    return create_block_mask(mask_mod, groups, None, size, size, device=device, _compile=device == 'cuda')


def flex_attention_fn(qkv, layout, table, scale, block_mask, flat, flex):
    """Gather into slot order, FlexAttention with a relative-position-bias ``score_mod``, scatter to token order."""
    groups, size = layout.index.shape
    wh, ww = layout.window_size
    position = layout.position.flatten().long()
    row, col = position // ww, position % ww

    def score_mod(score, b, h, q, kv):
        q, kv = (q, kv) if flat else (b * size + q, b * size + kv)
        rel = (row[q] - row[kv] + wh - 1) * (2 * ww - 1) + col[q] - col[kv] + ww - 1
        return score + table[rel, h]

    index = layout.index.flatten().clamp_min(0).long()
    q, k, v = qkv[index].permute(1, 2, 0, 3).unbind(0)  # [H, G*S, D]
    if flat:
        q, k, v = q[None], k[None], v[None]
    else:
        q, k, v = (t.unflatten(1, (groups, size)).transpose(0, 1) for t in (q, k, v))  # [G, H, S, D]
    out = flex(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)
    out = out.transpose(1, 2).reshape(groups * size, *out.shape[1:2], out.shape[-1])  # [G*S, H, D]
    valid = layout.index.flatten() >= 0
    return out.new_empty(qkv.shape[0], *out.shape[1:]).index_copy_(0, layout.index.flatten()[valid].long(), out[valid])


def bench_layout(layout, num_tokens, heads, head_dim, dtype, device, args, flex):
    gen = torch.Generator(device=device).manual_seed(0)
    wh, ww = layout.window_size
    qkv = torch.randn(num_tokens, 3, heads, head_dim, device=device, dtype=dtype, generator=gen)
    table = torch.randn((2 * wh - 1) * (2 * ww - 1), heads, device=device, generator=gen) * 0.02
    dout = torch.randn(num_tokens, heads, head_dim, device=device, dtype=dtype, generator=gen)
    scale = head_dim ** -0.5
    allowed, rel_index = _allowed(layout), relative_position_index(layout.position.long(), layout.window_size)
    methods = {
        'ours': lambda x, t: group_window_attention_triton(x, layout, t, scale),
        'sdpa': lambda x, t: sdpa_attention(x, layout, t, scale, allowed, rel_index),
        'reference': lambda x, t: group_window_attention_reference(x, layout, t, scale),
    }
    result = dict(groups=layout.index.shape[0], group_size=layout.group_size, tokens=num_tokens, heads=heads,
                  window=list(layout.window_size), fill=round(num_tokens / layout.index.numel(), 3))
    for flat, name in ((False, 'flex'), (True, 'flex_flat')):
        try:
            result[f'{name}_create_block_mask_ms'] = median_ms(
                lambda: flex_setup(layout, device, flat), args.repeats, 1, device)
            block_mask = flex_setup(layout, device, flat)
        except Exception as e:
            result[name] = dict(error=_error(e))
            continue
        methods[name] = (lambda m, f: lambda x, t: flex_attention_fn(x, layout, t, scale, m, f, flex))(block_mask, flat)
    ref_out = methods['reference'](qkv.float(), table)
    x_grad, t_grad = qkv.detach().requires_grad_(), table.detach().requires_grad_()
    for name, fn in methods.items():
        entry = result[name] = {}
        try:  # a baseline that cannot run here is reported, not hidden
            entry['max_abs_err_vs_fp32_reference'] = (fn(qkv, table).float() - ref_out).abs().max().item()
            entry['fwd_ms'] = median_ms(lambda: fn(qkv, table), args.repeats, args.warmup, device)
            entry['fwd_bwd_ms'] = median_ms(lambda: fn(x_grad, t_grad).backward(dout), args.repeats, args.warmup,
                                            device)
        except Exception as e:
            entry['error'] = _error(e)
    es = qkv.element_size()
    maps = 3 * layout.index.numel() * 4
    fwd_bytes = qkv.numel() * es + table.numel() * 4 + maps + num_tokens * heads * head_dim * es
    bwd_bytes = (qkv.numel() * es * 2 + 2 * num_tokens * heads * head_dim * es + 2 * table.numel() * 4 + maps)
    result['min_bytes'] = dict(fwd=fwd_bytes, bwd=bwd_bytes)
    if 'fwd_bwd_ms' in result['ours']:
        ours = result['ours']
        ours['fwd_GBps'] = fwd_bytes / ours['fwd_ms'] / 1e6
        ours['fwd_bwd_GBps'] = (fwd_bytes + bwd_bytes) / ours['fwd_bwd_ms'] / 1e6
        result['speedup_of_ours'] = {
            name: dict(fwd=entry['fwd_ms'] / ours['fwd_ms'], fwd_bwd=entry['fwd_bwd_ms'] / ours['fwd_bwd_ms'])
            for name, entry in result.items() if name in methods and name != 'ours' and 'fwd_bwd_ms' in entry}
    return result


def copy_bandwidth_GBps(device, args) -> float:
    """Achieved bandwidth of a large device copy (read + write), the practical ceiling for a memory-bound kernel."""
    x = torch.empty(2 ** 26 if args.smoke else 2 ** 28, dtype=torch.bfloat16, device=device)
    y = torch.empty_like(x)
    return 2 * x.numel() * x.element_size() / median_ms(lambda: y.copy_(x), args.repeats, args.warmup, device) / 1e6


def bench_training_step(args, device):
    """Median time of one GreenMIM training step with each attention backend."""
    mim = greenmim.GreenMIM(args.model).to(device).train()
    opt = torch.optim.AdamW(mim.parameters(), lr=1e-4)
    images = torch.randn(args.batch_size, 3, 224, 224, device=device)
    mask = mim.sample_mask(torch.Generator().manual_seed(0))

    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = mim(images, mask).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    times = {}
    for backend in ('torch', 'triton'):
        os.environ['GREENMIM_BACKEND'] = backend
        times[backend] = median_ms(step, args.repeats, args.warmup, device)
    os.environ.pop('GREENMIM_BACKEND')
    return dict(model=args.model, batch_size=args.batch_size, step_ms=times,
                speedup=times['torch'] / times['triton'])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'results'))
    parser.add_argument('--smoke', action='store_true', help='tiny shapes on the CPU under TRITON_INTERPRET=1')
    parser.add_argument('--model', default='green_swin_base')
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--windows', type=int, nargs='+', default=[7, 14])
    parser.add_argument('--repeats', type=int, default=20)
    parser.add_argument('--warmup', type=int, default=5)
    parser.add_argument('--skip-step', action='store_true', help='skip the whole training step')
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.batch_size, args.windows, args.repeats, args.warmup = 'green_swin_tiny', 1, [7], 1, 0
        device = 'cpu'
    elif torch.cuda.is_available():
        device = 'cuda'
    else:
        parser.error('needs a CUDA device (or --smoke)')
    dtype = torch.bfloat16 if device == 'cuda' else torch.float32
    from torch.nn.attention.flex_attention import flex_attention
    flex = torch.compile(flex_attention, dynamic=False) if device == 'cuda' else flex_attention
    torch._dynamo.config.recompile_limit = 256  # one FlexAttention compile per layout shape, never an eager fallback
    mask = random_mask((7, 7), 0.75, torch.Generator().manual_seed(0))
    layouts = []
    for window in args.windows:
        model = timm.create_model(args.model, window_size=window, pretrained=False)
        heads = [stage.blocks[0].attn.num_heads for stage in model.layers]
        specs = model.stage_specs()
        stages = build_visible_layout(mask, specs, args.batch_size, device)
        for s, (stage, spec) in enumerate(zip(stages[:1] if args.smoke else stages, specs)):
            for (_, shift), layout in list(stage.attention.items())[:1 if args.smoke else None]:
                head_dim = spec.channels // heads[s]
                row = bench_layout(layout, args.batch_size * stage.num_tokens, heads[s], head_dim, dtype, device,
                                   args, flex)
                row.update(stage=s + 1, shift=list(shift))
                layouts.append(row)
                print({k: v for k, v in row.items() if k not in ('min_bytes',)}, flush=True)
    copy_GBps = copy_bandwidth_GBps(device, args)
    for row in layouts:
        if 'fwd_bwd_GBps' in row['ours']:
            row['ours']['fwd_fraction_of_copy_bandwidth'] = row['ours']['fwd_GBps'] / copy_GBps
            row['ours']['fwd_bwd_fraction_of_copy_bandwidth'] = row['ours']['fwd_bwd_GBps'] / copy_GBps
    result = dict(kind='group_attention', dtype=str(dtype), batch_size=args.batch_size, model=args.model,
                  mask_ratio=0.75, smoke=args.smoke, copy_GBps=copy_GBps, layouts=layouts)
    if not args.skip_step:
        result['training_step'] = bench_training_step(args, device)
        print(result['training_step'], flush=True)
    name = torch.cuda.get_device_name().replace(' ', '_') if device == 'cuda' else 'cpu_smoke'
    path = os.path.join(args.out, f'group_attention_{name}.json')
    write_result(path, result)
    print('wrote', path)


if __name__ == '__main__':
    main()
