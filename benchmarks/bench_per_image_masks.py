"""Per-image masks vs the batch-wise mask: padding, layout host time (and the training process's wait for it when
DataLoader workers build it), and step time.

    python benchmarks/bench_per_image_masks.py            # full: Swin-B 224, ratio 0.75 (CPU, ~10 min)
    python benchmarks/bench_per_image_masks.py --smoke    # seconds: a tiny model, small batches

(a) padded slots / visible tokens for each (stage, window, shift), and the Eq. 8 cost, of the per-image layout of
``--batch`` images (all images' segments packed together) vs batch-wise layouts (each mask alone, as when it is the
batch's mask), over ``--draws`` random draws; (b) the median host time of the layout at ``--batch`` for both kinds,
and how long the training process waits per batch for (images, masks, layout) when a ``MaskCollate`` in a
DataLoader with ``--workers`` workers builds the layouts, while the training process spends ``--step-ms`` per step
(a sleep standing in for the accelerator's step; 0: the worst case, it only waits), against the wait for the
samples alone; (c) GreenMIM step time
(forward + backward) at ``--step-batch`` per-image vs batch-wise, interleaved.
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np
import timm
import torch
from torch.utils.data import DataLoader

import greenmim
from greenmim.grouping import grouping_cost
from greenmim.layout import build_visible_layout, layout_to
from greenmim.train.data import MaskCollate, collate_images
from greenmim.kernels.group_attention import launch_config

sys.path.insert(0, os.path.dirname(__file__))
from common import write_result  # noqa: E402

SMOKE_MODEL = dict(img_size=64, window_size=2, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4))


def tile_work(att, head_dim):
    """Score-tile entries the bf16 forward kernel computes for ``att``: ``G`` groups of ``S`` slots, tiled to
    ``BLOCK`` query rows and ``CHUNK`` key columns (:func:`greenmim.kernels.group_attention.launch_config`)."""
    g, s = att.index.shape
    config = launch_config(torch.bfloat16, head_dim, s)['forward']
    return g * -(-s // config['BLOCK']) * config['BLOCK'] * -(-s // config['CHUNK']) * config['CHUNK']


def padding(specs, masks, head_dim, block_heads):
    """``{stage/window/shift: {per_image, batch_wise, cost_ratio, tile_ratio}}`` for the per-image masks
    ``masks [B, Hm, Wm]``: padded slots / visible tokens, and Eq. 8 cost and forward-kernel tile work (heads of
    ``head_dim``) per-image / batch-wise; and under ``model`` the tile work of the whole encoder per-image /
    batch-wise, each (stage, window, shift) counted ``block_heads[stage]`` times (its blocks times heads)."""
    pooled = build_visible_layout(masks, specs, len(masks))
    alone = [build_visible_layout(mask, specs, 1) for mask in masks]
    result, model = {}, np.zeros(2)
    for s, spec in enumerate(specs):
        tokens = len(masks) * pooled[s].num_tokens
        for key, att in pooled[s].attention.items():
            atts = [layout[s].attention[key] for layout in alone]
            tiles = np.array([tile_work(att, head_dim), sum(tile_work(a, head_dim) for a in atts)])
            model += block_heads[s] * tiles
            result[f'stage{s + 1} window{key[0][0]} shift{key[1][0]}'] = dict(
                per_image=int((att.index < 0).sum()) / tokens,
                batch_wise=sum(int((a.index < 0).sum()) for a in atts) / tokens,
                cost_ratio=grouping_cost(att.index.shape[0], att.group_size, spec.channels) / sum(
                    grouping_cost(a.index.shape[0], a.group_size, spec.channels) for a in atts),
                tile_ratio=tiles[0] / tiles[1])
    result['model'] = dict(tile_ratio=model[0] / model[1])
    return result


def layout_times(specs, grid, batch, repeats, gen):
    """Median / max host time (ms) of the layout of ``batch`` images, per-image and batch-wise masks."""
    times = {'per_image': [], 'batch_wise': []}
    for _ in range(repeats):
        for kind, size in (('per_image', batch), ('batch_wise', None)):
            mask = greenmim.random_mask(grid, 0.75, gen, size)
            t = time.perf_counter()
            build_visible_layout(mask, specs, batch)
            times[kind].append(1e3 * (time.perf_counter() - t))
    return {k: dict(median_ms=statistics.median(v), max_ms=max(v)) for k, v in times.items()}


class _Trivial(torch.utils.data.Dataset):
    def __len__(self):
        return 1 << 20

    def __getitem__(self, index):
        return torch.zeros(1), -1  # (image, label): collated to a [B, 1] 'image' batch


def worker_wait(specs, batch, workers, batches, step_ms, per_image=True, static=False):
    """Median / max time (ms) the training process waits per batch for (samples, masks, layout) built by a
    ``MaskCollate`` in ``workers`` DataLoader workers, plus moving the layout (:func:`layout_to`), while it spends
    ``step_ms`` per step; and, as the baseline, for the samples alone (``collate_images``). The first batch, the
    workers' start-up, is left out."""
    result = dict(step_ms=step_ms, workers=workers, batches=batches)
    with_layout = MaskCollate(specs, 0.75, per_image=per_image, seed=0, static=static)
    for name, collate in (('samples_only', collate_images), ('with_layout', with_layout)):
        it = iter(DataLoader(_Trivial(), batch_size=batch, num_workers=workers, collate_fn=collate))
        waits = []
        for i in range(batches + 1):
            t = time.perf_counter()
            item = next(it)
            if name == 'with_layout':
                layout_to(item.inputs['packed'], torch.device('cpu'))
            if i:
                waits.append(1e3 * (time.perf_counter() - t))
            time.sleep(step_ms / 1e3)
        del it
        result[name] = dict(median_ms=statistics.median(waits), max_ms=max(waits))
    return result


def step_times(model_name, model_kwargs, img_size, batch, steps, gen):
    """Median GreenMIM forward + backward time (ms) at ``batch``, per-image vs batch-wise masks, interleaved."""
    torch.manual_seed(0)
    mim = greenmim.GreenMIM(timm.create_model(model_name, num_classes=0, **model_kwargs))
    images = torch.randn(batch, 3, img_size, img_size, generator=gen)
    times = {'per_image': [], 'batch_wise': []}
    for i in range(steps + 1):
        for kind, size in (('per_image', batch), ('batch_wise', None)):
            mask = greenmim.random_mask(mim.grid_size, 0.75, gen, size)
            t = time.perf_counter()
            mim(images, mask).loss.backward()
            mim.zero_grad(set_to_none=False)  # gradient buffers reused: fresh ones page-fault on a busy host
            if i:  # the first round warms up
                times[kind].append(1e3 * (time.perf_counter() - t))
    return {k: dict(median_ms=statistics.median(v), times_ms=v) for k, v in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--smoke', action='store_true', help='a tiny model and small batches (seconds)')
    parser.add_argument('--batch', type=int, default=128)
    parser.add_argument('--draws', type=int, default=20)
    parser.add_argument('--repeats', type=int, default=20, help='layouts timed per kind')
    parser.add_argument('--workers', type=int, default=2)
    parser.add_argument('--batches', type=int, default=30, help='DataLoader batches timed per --step-ms')
    parser.add_argument('--step-ms', type=float, nargs='+', default=[0.0, 200.0])
    parser.add_argument('--step-batch', type=int, default=8)
    parser.add_argument('--steps', type=int, default=4)
    parser.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'results',
                                                      'per_image_masks_cpu.json'))
    args = parser.parse_args()
    model_name, model_kwargs, img_size = 'green_swin_base', {}, 224
    if args.smoke:
        model_name, model_kwargs, img_size = 'green_swin_tiny', SMOKE_MODEL, 64
        args.batch, args.draws, args.repeats, args.batches, args.steps = 8, 2, 2, 2, 1
        args.step_ms, args.step_batch = [0.0], 2
    meta = timm.create_model(model_name, device='meta', **model_kwargs)
    specs = meta.stage_specs()
    head_dim = specs[0].channels // meta.layers[0].blocks[0].attn.num_heads
    block_heads = [len(layer.blocks) // len(spec.windows) * layer.blocks[0].attn.num_heads
                   for layer, spec in zip(meta.layers, specs)]
    grid = specs[-1].grid_size
    gen = torch.Generator().manual_seed(0)

    draws = [padding(specs, greenmim.random_mask(grid, 0.75, gen, args.batch), head_dim, block_heads)
             for _ in range(args.draws)]
    pad = {k: {m: float(np.mean([d[k][m] for d in draws])) for m in draws[0][k]} for k in draws[0]}
    model = pad.pop('model')
    model['min'], model['max'] = (f([d['model']['tile_ratio'] for d in draws]) for f in (min, max))
    print(f'whole encoder: kernel tile work per-image / batch-wise {model["tile_ratio"]:.4f} '
          f'({model["min"]:.4f}-{model["max"]:.4f} over the draws)')
    for k, v in pad.items():
        v['draws_with_more_padding'] = sum(d[k]['per_image'] > d[k]['batch_wise'] for d in draws)
        print(f'{k}: padding per-image {100 * v["per_image"]:.2f}%, batch-wise {100 * v["batch_wise"]:.2f}% (more in '
              f'{v["draws_with_more_padding"]} of {args.draws} draws); per-image / batch-wise: Eq. 8 cost '
              f'{v["cost_ratio"]:.4f}, kernel tile work {v["tile_ratio"]:.4f}')
    host = layout_times(specs, grid, args.batch, args.repeats, gen)
    print(f'layout host time at batch {args.batch}:',
          {k: f'{v["median_ms"]:.1f} ms median' for k, v in host.items()})
    waits = [worker_wait(specs, args.batch, args.workers, args.batches, ms) for ms in args.step_ms]
    for w in waits:
        print(f'training process waits per batch with {w["workers"]} workers and a {w["step_ms"]:.0f} ms step: '
              f'{w["with_layout"]["median_ms"]:.2f} ms median ({w["with_layout"]["max_ms"]:.2f} max) with the '
              f'layout, {w["samples_only"]["median_ms"]:.2f} ms ({w["samples_only"]["max_ms"]:.2f}) without')
    steps = step_times(model_name, model_kwargs, img_size, args.step_batch, args.steps, gen)
    print(f'step (forward + backward) at batch {args.step_batch}:',
          {k: f'{v["median_ms"]:.0f} ms median' for k, v in steps.items()})
    write_result(args.out, dict(
        benchmark='per_image_masks', model=model_name, img_size=img_size, mask_ratio=0.75, batch=args.batch,
        draws=args.draws, padding=pad, model_tile_ratio=model, layout_time=host, worker_wait=waits,
        step_batch=args.step_batch, step_time=steps, command='python ' + ' '.join(sys.argv)))


if __name__ == '__main__':
    main()
