"""GreenMIM vs SimMIM: FLOPs and wall-clock time of one training step (forward + backward + AdamW step).

    python benchmarks/bench_mim_step.py --models green_swin_tiny green_swin_base --batch-size 8
    python benchmarks/bench_mim_step.py --models green_swin_base green_swin_large --batch-size 128 --amp bf16  # GPU

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` over forward and backward (matmuls and convs;
GreenMIM's gathers and the host-side grouping count zero FLOPs but are inside the timed step). Times are medians
over ``--steps`` steps after ``--warmup`` steps, with both methods measured in the same process; on CUDA the peak
memory of the timed steps is recorded too.
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


def measure(method: str, model: str, batch_size: int, steps: int, warmup: int, device: str, amp: str,
            **model_kwargs) -> dict:
    """FLOPs, median step time (and peak CUDA memory) of ``method`` (``'GreenMIM'`` / ``'SimMIM'``) around
    ``timm.create_model(model, **model_kwargs)`` on random images of the model's size."""
    torch.manual_seed(0)
    mim = getattr(greenmim, method)(model, **model_kwargs).to(device).train()
    opt = torch.optim.AdamW(mim.parameters(), lr=1e-4)
    images = torch.randn(batch_size, 3, *mim.encoder.patch_embed.img_size, device=device)
    gen = torch.Generator().manual_seed(0)
    with FlopCounterMode(display=False) as counter:
        loss = mim(images, generator=gen).loss
        loss.backward()
    flops = counter.get_total_flops()
    opt.zero_grad(set_to_none=True)
    times = []
    for i in range(warmup + steps):
        if device == 'cuda':
            torch.cuda.synchronize()
            if i == warmup:
                torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        _step(mim, opt, images, gen, amp)
        if device == 'cuda':
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device == 'cuda' else None
    return dict(flops_per_step=flops, step_s=statistics.median(times), step_times_s=times, peak_memory_gib=peak)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--models', nargs='+', default=['green_swin_tiny', 'green_swin_base'])
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--steps', type=int, default=3)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--amp', choices=('none', 'bf16'), default='none', help='bf16 autocast of the forward')
    parser.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'results', 'mim_step_cpu.json'))
    args = parser.parse_args()
    rows = []
    for model in args.models:
        res = {m: measure(m, model, args.batch_size, args.steps, args.warmup, args.device, args.amp)
               for m in ('SimMIM', 'GreenMIM')}
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
    write_result(args.out, dict(benchmark='mim_step', device_kind=args.device, amp=args.amp, results=rows,
                                command='python ' + ' '.join(sys.argv)))


if __name__ == '__main__':
    main()
