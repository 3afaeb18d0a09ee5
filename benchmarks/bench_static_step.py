"""The static, compile-once GreenMIM step on the CPU: what a GPU run then only times.

    OMP_NUM_THREADS=2 python benchmarks/bench_static_step.py [--smoke] [--out FILE]

1. ``compilations``: ``torch.compile(GreenMIM, fullgraph=True, dynamic=False)`` stepped (forward and backward) over
   ``--masks`` static layouts of batch-wise and per-image masks alternating: graphs compiled (want 1).
2. ``ops``: aten ops dispatched per step (forward and backward), eager vs compiled (``torch.profiler``: every
   ``aten::`` op the dispatcher runs, the compiled step's fused kernels counted as the ops they call).
3. ``tile_work``: forward-kernel tile work (:func:`bench_per_image_masks.tile_work`: rows x keys of the tiles the
   kernel runs) of static vs exact layouts per (stage, window, shift), batch-wise and per-image masks, Swin-B and
   Twins-SVT-B at 224 px; for static layouts the groups the kernels run (non-empty) and the capacity they launch
   (the rest exit after reading their index row).
4. ``loader_wait``: how long the training process waits per batch for its images, masks and (static) layout built by
   :class:`~greenmim.train.data.MaskCollate` in 2 DataLoader workers, batch 128, with a 200 ms step.
5. ``step_time``: the torch backend's eager step (forward, backward) on static vs exact layouts, interleaved.
"""
import argparse
import os
import statistics
import sys
import time

import timm
import torch
from torch.profiler import ProfilerActivity, profile

import greenmim
from greenmim.layout import build_visible_layout
from greenmim.masking import random_mask

sys.path.insert(0, os.path.dirname(__file__))
from bench_per_image_masks import tile_work, worker_wait  # noqa: E402
from common import write_result  # noqa: E402

SNIPPET = dict(name='green_swin_tiny', kwargs=dict(img_size=128, window_size=4))  # the static-step issue's model
SMOKE = dict(name='green_swin_tiny', kwargs=dict(img_size=128, window_size=4, embed_dim=24, depths=(1, 1, 1, 1),
                                                  num_heads=(1, 1, 2, 2)))


def _masks(grid, count, batch, seed=0):
    """``count`` masks, batch-wise and per image alternating."""
    gen = torch.Generator().manual_seed(seed)
    return [random_mask(grid, 0.75, gen, batch if i % 2 else None) for i in range(count)]


def compilations(model, masks: int, batch: int, backend: str) -> dict:
    encoder = timm.create_model(model['name'], drop_path_rate=0.0, **model['kwargs'])
    mim = greenmim.GreenMIM(encoder, mask_ratio=0.75)
    step = torch.compile(mim, fullgraph=True, dynamic=False, backend=backend)
    images = torch.randn(batch, 3, *encoder.first_patch_embed().img_size)
    torch._dynamo.reset()
    before, times = torch._dynamo.utils.counters['stats']['unique_graphs'], []
    for mask in _masks(encoder.mask_grid_size, masks, batch):
        t = time.perf_counter()
        step(images, layout=encoder.visible_layout(mask, batch, static=True)).loss.backward()
        times.append(time.perf_counter() - t)
    graphs = torch._dynamo.utils.counters['stats']['unique_graphs'] - before
    return dict(model=model, backend=backend, masks=masks, batch_size=batch, graphs_compiled=graphs,
                first_step_s=times[0], later_step_median_s=statistics.median(times[1:]))


def _aten_ops(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key.startswith('aten::'))


def ops_per_step(model, batch: int, backend: str) -> dict:
    encoder = timm.create_model(model['name'], drop_path_rate=0.0, **model['kwargs'])
    mim = greenmim.GreenMIM(encoder, mask_ratio=0.75)
    step = torch.compile(mim, fullgraph=True, dynamic=False, backend=backend)
    images = torch.randn(batch, 3, *encoder.first_patch_embed().img_size)
    exact, static = (encoder.visible_layout(random_mask(encoder.mask_grid_size, 0.75), batch, static=s)
                     for s in (False, True))
    step(images, layout=static).loss.backward()  # compiled here
    return dict(eager=_aten_ops(lambda: mim(images, layout=exact).loss.backward()),
                eager_static=_aten_ops(lambda: mim(images, layout=static).loss.backward()),
                compiled=_aten_ops(lambda: step(images, layout=static).loss.backward()), backend=backend)


def _stage_tiles(layout, head_dim):
    """``{stage/window/shift: {work, groups, used}}``: forward-kernel tile work of the non-empty groups, the groups
    launched and the non-empty ones (every group of a layout does the same tile work)."""
    rows = {}
    for s, stage in enumerate(layout):
        for key, att in stage.attention.items():
            groups, used = att.index.shape[0], int((att.index >= 0).any(1).sum())
            rows[f'stage{s + 1} window{key[0][0]} shift{key[1][0]}'] = dict(
                work=tile_work(att, head_dim) * used // groups, groups=groups, used=used)
    return rows


def tile_ratios(name: str, batch: int, draws: int, head_dim: int = 32) -> dict:
    """Per (stage, window, shift) and mask kind, over ``draws`` masks: forward-kernel tile work static (the groups
    the kernel runs) / exact, and the static layout's capacity / the groups it fills."""
    specs = timm.create_model(name, device='meta').layout_specs
    grid = specs[-1].grid_size
    result = {}
    for kind, size in (('batch_wise', None), ('per_image', batch)):
        work, fill = {}, {}
        for i in range(draws):
            mask = random_mask(grid, 0.75, torch.Generator().manual_seed(i), size)
            exact = _stage_tiles(build_visible_layout(mask, specs, batch), head_dim)
            static = _stage_tiles(build_visible_layout(mask, specs, batch, static=True), head_dim)
            for key in exact:
                work.setdefault(key, []).append(static[key]['work'] / exact[key]['work'])
                fill.setdefault(key, []).append(static[key]['groups'] / static[key]['used'])
        result[kind] = {key: dict(tile_work_static_over_exact=statistics.median(work[key]),
                                  tile_work_range=[min(work[key]), max(work[key])],
                                  capacity_over_used_groups=statistics.median(fill[key])) for key in work}
    return dict(model=name, batch_size=batch, draws=draws, head_dim=head_dim, **result)


def step_times(model, batch: int, repeats: int) -> dict:
    """Median eager step time (forward, backward) on the torch backend, exact vs static layouts, interleaved."""
    encoder = timm.create_model(model['name'], drop_path_rate=0.0, **model['kwargs'])
    mim = greenmim.GreenMIM(encoder, mask_ratio=0.75)
    images = torch.randn(batch, 3, *encoder.first_patch_embed().img_size)
    times = {'exact': [], 'static': []}
    for i, mask in enumerate(_masks(encoder.mask_grid_size, repeats + 1, batch, seed=1)):
        for kind in times:
            layout = encoder.visible_layout(mask, batch, static=kind == 'static')
            t = time.perf_counter()
            mim(images, layout=layout).loss.backward()
            if i:
                times[kind].append(time.perf_counter() - t)
    return dict(model=model, batch_size=batch, repeats=repeats,
                **{k: dict(median_s=statistics.median(v), all_s=v) for k, v in times.items()},
                static_over_exact=statistics.median(times['static']) / statistics.median(times['exact']))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--smoke', action='store_true', help='tiny sizes, seconds')
    parser.add_argument('--backend', default='inductor', help='torch.compile backend of parts 1-2')
    parser.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'results', 'static_step_cpu.json'))
    args = parser.parse_args(argv)
    smoke = args.smoke
    model = SMOKE if smoke else SNIPPET
    specs = timm.create_model('green_swin_base', device='meta').layout_specs
    result = dict(benchmark='static_step', smoke=smoke, command='python ' + ' '.join(sys.argv))
    result['compilations'] = compilations(model, 4 if smoke else 50, 4, 'aot_eager' if smoke else args.backend)
    print('compilations', result['compilations'], flush=True)
    result['ops_per_step'] = ops_per_step(model, 4, 'aot_eager' if smoke else args.backend)
    print('ops per step', result['ops_per_step'], flush=True)
    result['tile_work'] = [tile_ratios(name, 8 if smoke else 128, 1 if smoke else 10)
                           for name in (['green_swin_base'] if smoke else ['green_swin_base', 'green_twins_svt_base'])]
    result['loader_wait'] = {
        f'{kind}_{"static" if static else "exact"}': worker_wait(
            specs, 8 if smoke else 128, 2, 2 if smoke else 30, 10 if smoke else 200, kind == 'per_image', static)
        for kind in ('batch_wise', 'per_image') for static in (False, True)}
    print('loader wait', {k: v['with_layout'] for k, v in result['loader_wait'].items()}, flush=True)
    result['step_time'] = step_times(SMOKE if smoke else dict(name='green_swin_tiny', kwargs={}), 2 if smoke else 8,
                                     1 if smoke else 5)
    print('step time', {k: v for k, v in result['step_time'].items() if k != 'model'}, flush=True)
    write_result(args.out, result)


if __name__ == '__main__':
    main()
