"""GreenMIM vs SimMIM: FLOPs and wall-clock time of one training step (forward + backward + AdamW step).

    python benchmarks/bench_mim_step.py --models green_swin_tiny green_swin_base --batch-size 8
    python benchmarks/bench_mim_step.py --models green_swin_base green_swin_large --batch-size 128 --amp bf16  # GPU
    python benchmarks/bench_mim_step.py --models green_swin_base green_twins_svt_base green_twins_svt_large \
        --batch-size 4 --interleave --out benchmarks/results/mim_step_twins_cpu.json

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` over forward and backward (matmuls and convs;
GreenMIM's gathers and the host-side grouping count zero FLOPs but are inside the timed step). Times are medians
over ``--steps`` steps after ``--warmup`` steps, with both methods measured in the same process (``--interleave``:
their steps alternating, for a machine shared with other jobs); on CUDA the peak memory of the timed steps is
recorded too (not with ``--interleave``).
"""
import argparse
import contextlib
import os
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import greenmim

sys.path.insert(0, os.path.dirname(__file__))
from common import write_result  # noqa: E402


def _step(mim, opt, images, generator, amp):
    with torch.autocast(images.device.type, dtype=torch.bfloat16) if amp == 'bf16' else contextlib.nullcontext():
        loss = mim(images, generator=generator).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


def _build(method: str, model: str, device: str, **model_kwargs):
    """``method`` (``'GreenMIM'`` / ``'SimMIM'``) around ``timm.create_model(model, **model_kwargs)``, its optimizer
    and ``images(batch_size)``: random images of the model's size."""
    torch.manual_seed(0)
    mim = getattr(greenmim, method)(model, **model_kwargs).to(device).train()
    return mim, torch.optim.AdamW(mim.parameters(), lr=1e-4)


def _images(mim, batch_size: int, device: str) -> torch.Tensor:
    return torch.randn(batch_size, 3, *mim.encoder.patch_embed.img_size, device=device)


def _flops(mim, images) -> int:
    with FlopCounterMode(display=False) as counter:
        mim(images, generator=torch.Generator().manual_seed(0)).loss.backward()
    mim.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def _timed_step(mim, opt, images, generator, amp, device) -> float:
    if device == 'cuda':
        torch.cuda.synchronize()
    t = time.perf_counter()
    _step(mim, opt, images, generator, amp)
    if device == 'cuda':
        torch.cuda.synchronize()
    return time.perf_counter() - t


def measure(method: str, model: str, batch_size: int, steps: int, warmup: int, device: str, amp: str,
            **model_kwargs) -> dict:
    """FLOPs, median step time (and peak CUDA memory) of one method (:func:`_build`)."""
    mim, opt = _build(method, model, device, **model_kwargs)
    images = _images(mim, batch_size, device)
    flops = _flops(mim, images)
    gen = torch.Generator().manual_seed(0)
    times = []
    for i in range(warmup + steps):
        if device == 'cuda' and i == warmup:
            torch.cuda.reset_peak_memory_stats()
        dt = _timed_step(mim, opt, images, gen, amp, device)
        if i >= warmup:
            times.append(dt)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device == 'cuda' else None
    return dict(flops_per_step=flops, step_s=statistics.median(times), step_times_s=times, peak_memory_gib=peak)


def measure_interleaved(methods, model: str, batch_size: int, steps: int, warmup: int, device: str,
                        amp: str, **model_kwargs) -> dict:
    """Both methods in one process, their steps alternating, so that load from other jobs on a shared machine
    falls on both alike (no peak memory: both models are resident)."""
    runs = {m: _build(m, model, device, **model_kwargs) for m in methods}
    images = _images(runs[methods[0]][0], batch_size, device)
    flops = {m: _flops(mim, images) for m, (mim, _) in runs.items()}
    gens = {m: torch.Generator().manual_seed(0) for m in methods}
    times = {m: [] for m in methods}
    for i in range(warmup + steps):
        for m, (mim, opt) in runs.items():
            dt = _timed_step(mim, opt, images, gens[m], amp, device)
            if i >= warmup:
                times[m].append(dt)
    return {m: dict(flops_per_step=flops[m], step_s=statistics.median(times[m]), step_times_s=times[m],
                    peak_memory_gib=None) for m in methods}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--models', nargs='+', default=['green_swin_tiny', 'green_swin_base'])
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--steps', type=int, default=3)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--amp', choices=('none', 'bf16'), default='none', help='bf16 autocast of the forward')
    parser.add_argument('--interleave', action='store_true',
                        help='alternate SimMIM and GreenMIM steps (a shared CPU); no peak memory')
    parser.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'results', 'mim_step_cpu.json'))
    args = parser.parse_args()
    rows = []
    methods = ('SimMIM', 'GreenMIM')
    for model in args.models:
        if args.interleave:
            res = measure_interleaved(methods, model, args.batch_size, args.steps, args.warmup, args.device, args.amp)
        else:
            res = {m: measure(m, model, args.batch_size, args.steps, args.warmup, args.device, args.amp)
                   for m in methods}
        row = dict(
            model=model, batch_size=args.batch_size, **{m: r for m, r in res.items()},
            flops_ratio=res['GreenMIM']['flops_per_step'] / res['SimMIM']['flops_per_step'],
            speedup=res['SimMIM']['step_s'] / res['GreenMIM']['step_s'],
        )
        rows.append(row)
        print(f"{model} batch {args.batch_size}: FLOPs/step SimMIM {res['SimMIM']['flops_per_step'] / 1e9:.1f} G, "
              f"GreenMIM {res['GreenMIM']['flops_per_step'] / 1e9:.1f} G ({100 * row['flops_ratio']:.1f}%); "
              f"step SimMIM {res['SimMIM']['step_s']:.3f} s, GreenMIM {res['GreenMIM']['step_s']:.3f} s "
              f"(speedup {row['speedup']:.2f}x)", flush=True)
    write_result(args.out, dict(benchmark='mim_step', device_kind=args.device, amp=args.amp,
                                interleaved=args.interleave, results=rows, command='python ' + ' '.join(sys.argv)))


if __name__ == '__main__':
    main()
