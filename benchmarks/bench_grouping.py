"""Optimal Grouping: padding overhead and host time.

    python benchmarks/bench_grouping.py --masks 1000

For green_swin_base at 224 px (mask ratio 0.75), over ``--masks`` random masks: padded slots / visible tokens per
(stage, shift) for the Eq. 8 sweep and for a fixed ``g_s = window area`` (the authors' released code), the mean
group size, and the time to build the layout of all stages (batch 1 and 128).
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np
import timm
import torch

import greenmim
from greenmim.layout import build_visible_layout

sys.path.insert(0, os.path.dirname(__file__))
from common import write_result  # noqa: E402


def overheads(masks, specs, group_size=None):
    """``{(stage, shift): (mean padded/visible, mean g_s)}`` over ``masks``."""
    acc = {}
    for mask in masks:
        for s, stage in enumerate(build_visible_layout(mask, specs, 1, group_size=group_size)):
            for (window, shift), att in stage.attention.items():
                window_area = window[0] * window[1]
                if group_size is not None and group_size != window_area:
                    continue
                padded = int((att.index < 0).sum())
                acc.setdefault(f'stage{s + 1} window{window[0]} shift{shift[0]}', []).append(
                    (padded / stage.num_tokens, att.group_size))
    return {k: dict(padding=float(np.mean([p for p, _ in v])), group_size=float(np.mean([g for _, g in v])))
            for k, v in acc.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', default='green_swin_base')
    parser.add_argument('--masks', type=int, default=1000)
    parser.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'results', 'grouping_cpu.json'))
    args = parser.parse_args()
    specs = timm.create_model(args.model, device='meta').stage_specs()
    gen = torch.Generator().manual_seed(0)
    masks = [greenmim.random_mask((7, 7), 0.75, gen) for _ in range(args.masks)]
    sweep = overheads(masks, specs)
    fixed = {}
    for area in sorted({w[0] * w[1] for spec in specs for w, _ in spec.windows}):
        fixed.update(overheads(masks, specs, group_size=area))
    timing = {}
    for batch in (1, 128):
        times = []
        for mask in masks[:200]:
            t = time.perf_counter()
            build_visible_layout(mask, specs, batch)
            times.append(time.perf_counter() - t)
        timing[f'batch{batch}'] = dict(median_ms=1e3 * statistics.median(times), max_ms=1e3 * max(times))
    for k in sweep:
        print(f'{k}: padding sweep {100 * sweep[k]["padding"]:.1f}% (mean g_s {sweep[k]["group_size"]:.1f}), '
              f'fixed g_s=window area {100 * fixed[k]["padding"]:.1f}%')
    print('layout of all stages:', {k: f'{v["median_ms"]:.2f} ms median' for k, v in timing.items()})
    write_result(args.out, dict(benchmark='grouping', model=args.model, masks=args.masks, mask_ratio=0.75,
                                padding_sweep=sweep, padding_fixed_window_area=fixed, layout_time=timing,
                                command='python ' + ' '.join(sys.argv)))


if __name__ == '__main__':
    main()
