"""GreenMIM vs SimMIM: FLOPs and wall-clock time of one training step (forward + backward + AdamW step), eager or
compiled.

    python benchmarks/bench_mim_step.py --models green_swin_tiny green_swin_base --batch-size 8
    python benchmarks/bench_mim_step.py --models green_swin_base green_swin_large --batch-size 128 --amp bf16 \
        --modes eager compiled cuda-graphs  # GPU
    python benchmarks/bench_mim_step.py --models green_swin_base green_twins_svt_base green_twins_svt_large \
        --batch-size 4 --interleave --out benchmarks/results/mim_step_twins_cpu.json

A step runs as in training: its masks (and GreenMIM's layout) come pre-built, as the DataLoader workers hand them
over (:class:`greenmim.train.data.MaskCollate`: a pool of ``--masks`` different ones, in turn), and the step copies
them to the device (:func:`greenmim.layout.layout_to`), runs forward and backward, and the optimizer (fused AdamW on
CUDA, ``foreach`` on the CPU). Modes: ``eager`` (exact layouts); ``compiled``: ``torch.compile(fullgraph=True,
dynamic=False)`` of the model on static layouts (SimMIM: its masks), compiled once -- the compilations are counted;
``cuda-graphs``: the same with ``mode='reduce-overhead'`` (CUDA only).

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` over forward and backward (matmuls and convs).
Times are medians over ``--steps`` steps after ``--warmup`` steps, both methods measured in the same process
(``--interleave``: their steps alternating, for a machine shared with other jobs). On CUDA the peak memory of the
timed steps (not with ``--interleave``) and the GPU kernel time per step (``torch.profiler``, over the timed steps
again) are recorded: ``wall / kernel`` near 1 means the GPU is kept busy, well above 1 that the step is host-bound.
"""
import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import greenmim
from greenmim.layout import build_visible_layout, layout_to, pack_layout

sys.path.insert(0, os.path.dirname(__file__))
from common import write_result  # noqa: E402

MODES = ('eager', 'compiled', 'cuda-graphs')


class StepRunner:
    """One method (``'GreenMIM'`` / ``'SimMIM'``) around ``timm.create_model(model, **model_kwargs)`` in one mode:
    its optimizer, a pool of pre-built step inputs, and :meth:`step`."""

    def __init__(self, method: str, model: str, device: str, batch_size: int, amp: str, mode: str = 'eager',
                 masks: int = 8, backend: str = 'inductor', **model_kwargs):
        torch.manual_seed(0)
        self.mim = getattr(greenmim, method)(model, **model_kwargs).to(device).train()
        self.device, self.amp, self.mode = torch.device(device), amp, mode
        self.opt = torch.optim.AdamW(self.mim.parameters(), lr=1e-4, **(
            {'fused': True} if self.device.type == 'cuda' else {'foreach': True}))
        self.images = torch.randn(batch_size, 3, *self.mim.encoder.first_patch_embed().img_size, device=device)
        gen = torch.Generator().manual_seed(1)
        pool = [self.mim.sample_mask(gen, batch_size) for _ in range(masks)]
        if method == 'GreenMIM':
            specs = self.mim.encoder.layout_specs
            pool = [pack_layout(build_visible_layout(m, specs, batch_size, torch.device('cpu'), static=mode != 'eager'))
                    for m in pool]
        self.inputs = [_pinned(x, self.device) for x in pool]
        self.calls = 0
        self.model = self.mim
        if mode != 'eager':
            self.model = torch.compile(self.mim, fullgraph=True, dynamic=False, backend=backend,
                                       mode='reduce-overhead' if mode == 'cuda-graphs' else None)
        self._graphs_before = _graphs()

    def _loss(self) -> torch.Tensor:
        given = self.inputs[self.calls % len(self.inputs)]
        self.calls += 1
        if self.mode == 'cuda-graphs':
            torch.compiler.cudagraph_mark_step_begin()
        if isinstance(given, torch.Tensor):  # SimMIM: the mask
            return self.model(self.images, mask=given.to(self.device, non_blocking=True)).loss
        return self.model(self.images, layout=layout_to(given, self.device)).loss

    def step(self) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16) if self.amp == 'bf16' else \
                contextlib.nullcontext():
            loss = self._loss()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def timed_step(self) -> float:
        _sync(self.device)
        t = time.perf_counter()
        self.step()
        _sync(self.device)
        return time.perf_counter() - t

    @property
    def compilations(self) -> int:
        """Graphs Dynamo compiled since this runner was built (compiled modes: 1 is compiled once)."""
        return _graphs() - self._graphs_before

    def flops(self) -> int:
        with FlopCounterMode(display=False) as counter:
            self.mim(self.images, generator=torch.Generator().manual_seed(0)).loss.backward()
        self.mim.zero_grad(set_to_none=True)
        return counter.get_total_flops()

    def kernel_seconds(self, steps: int) -> float:
        """GPU kernel time per step (CUDA: profiler over ``steps`` steps)."""
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                self.step()
            _sync(self.device)
        return sum(e.self_device_time_total for e in prof.key_averages()) / 1e6 / steps


def _pinned(x, device):
    """A step input as the loader hands it over: in pinned memory for a CUDA device."""
    if device.type != 'cuda':
        return x
    return x.pin_memory() if isinstance(x, torch.Tensor) else x._replace(buffer=x.buffer.pin_memory())


def _graphs() -> int:
    return torch._dynamo.utils.counters['stats']['unique_graphs']


def _sync(device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize()


def _result(runner: StepRunner, times, flops, peak=None) -> dict:
    result = dict(flops_per_step=flops, step_s=statistics.median(times), step_times_s=times, peak_memory_gib=peak,
                  mode=runner.mode)
    if runner.mode != 'eager':
        result['compilations'] = runner.compilations
    if runner.device.type == 'cuda':
        result['kernel_s'] = runner.kernel_seconds(max(len(times) // 2, 1))
        result['wall_over_kernel'] = result['step_s'] / result['kernel_s']
    return result


def measure(method: str, model: str, batch_size: int, steps: int, warmup: int, device: str, amp: str,
            mode: str = 'eager', **model_kwargs) -> dict:
    """FLOPs, median step time (and on CUDA peak memory and kernel time) of one method in one mode."""
    runner = StepRunner(method, model, device, batch_size, amp, mode, **model_kwargs)
    flops = runner.flops()
    times = []
    for i in range(warmup + steps):
        if device == 'cuda' and i == warmup:
            torch.cuda.reset_peak_memory_stats()
        dt = runner.timed_step()
        if i >= warmup:
            times.append(dt)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device == 'cuda' else None
    return _result(runner, times, flops, peak)


def measure_interleaved(methods, model: str, batch_size: int, steps: int, warmup: int, device: str, amp: str,
                        mode: str = 'eager', **model_kwargs) -> dict:
    """Both methods in one process, their steps alternating, so that load from other jobs on a shared machine
    falls on both alike (no peak memory: both models are resident)."""
    runners = {m: StepRunner(m, model, device, batch_size, amp, mode, **model_kwargs) for m in methods}
    flops = {m: r.flops() for m, r in runners.items()}
    times = {m: [] for m in methods}
    for i in range(warmup + steps):
        for m, runner in runners.items():
            dt = runner.timed_step()
            if i >= warmup:
                times[m].append(dt)
    return {m: _result(r, times[m], flops[m]) for m, r in runners.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--models', nargs='+', default=['green_swin_tiny', 'green_swin_base'])
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--steps', type=int, default=3)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--amp', choices=('none', 'bf16'), default='none', help='bf16 autocast of the forward')
    parser.add_argument('--modes', nargs='+', choices=MODES, default=['eager'])
    parser.add_argument('--backend', default='inductor', help='torch.compile backend of the compiled modes')
    parser.add_argument('--interleave', action='store_true',
                        help='alternate SimMIM and GreenMIM steps (a shared CPU); no peak memory')
    parser.add_argument('--model-kwargs', default='{}', help='JSON timm kwargs for every model (e.g. small test sizes)')
    parser.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'results', 'mim_step_cpu.json'))
    args = parser.parse_args(argv)
    model_kwargs = dict(json.loads(args.model_kwargs), backend=args.backend)
    rows = []
    methods = ('SimMIM', 'GreenMIM')
    for model in args.models:
        for mode in args.modes:
            common = (model, args.batch_size, args.steps, args.warmup, args.device, args.amp, mode)
            if args.interleave:
                res = measure_interleaved(methods, *common, **model_kwargs)
            else:
                res = {m: measure(m, *common, **model_kwargs) for m in methods}
            row = dict(model=model, mode=mode, batch_size=args.batch_size, **res,
                       flops_ratio=res['GreenMIM']['flops_per_step'] / res['SimMIM']['flops_per_step'],
                       speedup=res['SimMIM']['step_s'] / res['GreenMIM']['step_s'])
            rows.append(row)
            print(f"{model} {mode} batch {args.batch_size}: FLOPs/step SimMIM "
                  f"{res['SimMIM']['flops_per_step'] / 1e9:.1f} G, GreenMIM {res['GreenMIM']['flops_per_step'] / 1e9:.1f}"
                  f" G ({100 * row['flops_ratio']:.1f}%); step SimMIM {res['SimMIM']['step_s']:.3f} s, GreenMIM "
                  f"{res['GreenMIM']['step_s']:.3f} s (speedup {row['speedup']:.2f}x)", flush=True)
    best = {}  # each method at its best mode, per model: the comparison that matters
    for row in rows:
        for m in methods:
            key = (row['model'], m)
            best[key] = min(best.get(key, float('inf')), row[m]['step_s'])
    summary = [dict(model=model, speedup_vs_best_simmim=best[(model, 'SimMIM')] / best[(model, 'GreenMIM')])
               for model in args.models]
    write_result(args.out, dict(benchmark='mim_step', device_kind=args.device, amp=args.amp, modes=args.modes,
                                interleaved=args.interleave, results=rows, best=summary,
                                command='python ' + ' '.join(sys.argv)))


if __name__ == '__main__':
    main()
