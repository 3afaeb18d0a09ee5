"""Sparse (submanifold) depthwise 3x3 convolution vs the dense depthwise conv on the zero-filled masked grid, at
Twins-L stage shapes (Twins' PosConv: 224 px, grids 56/28/14/7, channels 128/256/512/1024).

    python benchmarks/bench_sparse_conv.py                          # CPU: the torch backend (the reference), fp32
    python benchmarks/bench_sparse_conv.py --dtype bf16 --out X.json  # GPU: the Triton kernels, batch 128
    python benchmarks/bench_sparse_conv.py --smoke --out X.json     # CPU, TRITON_INTERPRET=1, tiny: checks the script

One ratio-0.75 mask (32 px units) per run, as in pre-training. For each stage: median forward (no grad) and
forward+backward (gradients of x, weight and bias) times of ``sparse`` (``greenmim.kernels.sparse_depthwise_conv``
on the visible tokens through the neighbour map, with ``--backend``) and ``dense`` (what one would write instead:
scatter the visible tokens into a zero-filled ``[B, C, H, W]`` grid, ``F.conv2d(groups=C)``, gather them back); the
max error of each against the float64 reference; the host time of building the neighbour map; and the sparse
path's achieved bandwidth on its minimal bytes. Under ``TRITON_INTERPRET=1`` Triton timings are meaningless.
"""
import argparse
import os
import sys

if '--smoke' in sys.argv:  # Triton reads this when it is imported
    os.environ['TRITON_INTERPRET'] = '1'

import torch  # noqa: E402

from greenmim.kernels.backend import BACKENDS, resolve_backend  # noqa: E402
from greenmim.layout import StageSpec, build_visible_layout  # noqa: E402
from greenmim.kernels import neighbour_map, sparse_depthwise_conv  # noqa: E402
from greenmim.kernels.reference import depthwise_conv_masked_grid, sparse_depthwise_conv_reference  # noqa: E402
from greenmim.masking import random_mask  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from common import median_ms, write_result  # noqa: E402

TWINS_L = ((56, 128), (28, 256), (14, 512), (7, 1024))
DTYPES = dict(fp32=torch.float32, bf16=torch.bfloat16, fp16=torch.float16)
KERNEL = (3, 3)


def bench_stage(stage, channels, args, device, dtype) -> dict:
    """Times and errors of the sparse and dense paths on one stage's visible tokens."""
    grid = stage.grid_size
    token_index = stage.token_index
    nbr = neighbour_map(token_index, grid, KERNEL, args.batch_size)
    num_tokens = nbr.shape[0]
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(num_tokens, channels, device=device, dtype=dtype, generator=gen)
    weight = torch.randn(channels, 1, *KERNEL, device=device, dtype=dtype, generator=gen) / 3
    bias = torch.randn(channels, device=device, dtype=dtype, generator=gen)
    dy = torch.randn(num_tokens, channels, device=device, dtype=dtype, generator=gen)
    methods = dict(
        sparse=lambda x, w, b: sparse_depthwise_conv(x, nbr, w, b, backend=args.backend),
        dense=lambda x, w, b: depthwise_conv_masked_grid(x, token_index, grid, w, b),
    )
    exact = sparse_depthwise_conv_reference(x.double(), nbr, weight.double(), bias.double())
    grads = [t.detach().requires_grad_() for t in (x, weight, bias)]
    result = dict(grid=list(grid), channels=channels, tokens=num_tokens,
                  visible_fraction=round(stage.num_tokens / (grid[0] * grid[1]), 4),
                  neighbour_map_ms=median_ms(lambda: neighbour_map(token_index, grid, KERNEL, args.batch_size),
                                             args.repeats, args.warmup, device))
    for name, fn in methods.items():
        with torch.no_grad():
            err = (fn(x, weight, bias).double() - exact).abs().max().item()
            fwd = median_ms(lambda: fn(x, weight, bias), args.repeats, args.warmup, device)
        fwd_bwd = median_ms(lambda: fn(*grads).backward(dy), args.repeats, args.warmup, device)
        result[name] = dict(fwd_ms=fwd, fwd_bwd_ms=fwd_bwd, max_abs_err_vs_fp64=err)
    es, maps = x.element_size(), nbr.numel() * 4
    fwd_bytes = 2 * num_tokens * channels * es + maps  # read x, write y
    bwd_bytes = 3 * num_tokens * channels * es + maps  # read x and dy, write dx
    sparse = result['sparse']
    sparse['fwd_GBps'] = fwd_bytes / sparse['fwd_ms'] / 1e6
    sparse['fwd_bwd_GBps'] = (fwd_bytes + bwd_bytes) / sparse['fwd_bwd_ms'] / 1e6
    result['speedup_of_sparse'] = dict(fwd=result['dense']['fwd_ms'] / sparse['fwd_ms'],
                                       fwd_bwd=result['dense']['fwd_bwd_ms'] / sparse['fwd_bwd_ms'])
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', help='result JSON (default: benchmarks/results/sparse_conv_<cpu|gpu>.json)')
    parser.add_argument('--smoke', action='store_true', help='tiny shapes on the CPU under TRITON_INTERPRET=1')
    parser.add_argument('--batch-size', type=int, help='default: 128 on CUDA, 8 on the CPU')
    parser.add_argument('--mask-ratio', type=float, default=0.75)
    parser.add_argument('--dtype', choices=sorted(DTYPES), default='fp32')
    parser.add_argument('--backend', choices=BACKENDS, default='auto', help='of the sparse path')
    parser.add_argument('--repeats', type=int, default=10)
    parser.add_argument('--warmup', type=int, default=3)
    args = parser.parse_args(argv)
    device = 'cuda' if torch.cuda.is_available() and not args.smoke else 'cpu'
    stages = TWINS_L
    if args.smoke:  # the four grids, narrow channels, the Triton kernels in the interpreter
        stages = [(grid, channels // 16) for grid, channels in TWINS_L]
        args.batch_size, args.backend, args.repeats, args.warmup = 1, 'triton', 1, 0
    args.batch_size = args.batch_size or (128 if device == 'cuda' else 8)
    dtype = DTYPES[args.dtype]
    mask = random_mask((7, 7), args.mask_ratio, torch.Generator().manual_seed(0))
    specs = [StageSpec(grid_size=(g, g), channels=c, windows=(), merges_previous_stage=False) for g, c in stages]
    rows = []
    for stage, (_, channels) in zip(build_visible_layout(mask, specs, args.batch_size, device), stages):
        rows.append(dict(stage=len(rows) + 1, **bench_stage(stage, channels, args, device, dtype)))
        print(rows[-1], flush=True)
    sparse_backend = resolve_backend(torch.empty(0, device=device), args.backend)
    result = dict(kind='sparse_conv', model='twins_svt_large / twins_pcpvt_large PosConv', kernel=list(KERNEL),
                  dtype=args.dtype, batch_size=args.batch_size, mask_ratio=args.mask_ratio,
                  visible_units=int(mask.sum()), sparse_backend=sparse_backend, smoke=args.smoke,
                  interpreted=os.environ.get('TRITON_INTERPRET') == '1', stages=rows)
    name = 'sparse_conv_gpu.json' if device == 'cuda' else 'sparse_conv_cpu.json'
    write_result(args.out or os.path.join(os.path.dirname(__file__), 'results', name), result)


if __name__ == '__main__':
    main()
