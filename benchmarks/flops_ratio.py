"""GreenMIM / SimMIM FLOPs of one training step (forward + backward), without timing: the FLOPs half of
``bench_mim_step.py`` (same wrappers, images and counter), cheap enough for large models on a CPU.

    python benchmarks/flops_ratio.py --models green_swin_base green_swinv2_base_window8_256 \
        green_swinv2_base_window16_256 --batch-size 8 --out benchmarks/results/flops_ratio_swinv2_cpu.json
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from bench_mim_step import StepRunner  # noqa: E402
from common import write_result  # noqa: E402


def flops_ratio(model: str, batch_size: int, device: str = 'cpu') -> dict:
    """FLOPs per step of SimMIM and GreenMIM around ``model`` at its image size, and their ratio."""
    runners = {m: StepRunner(m, model, device, batch_size, 'none', masks=1) for m in ('SimMIM', 'GreenMIM')}
    flops = {m: runner.flops() for m, runner in runners.items()}
    per_method = {f'{m}_flops_per_step': f for m, f in flops.items()}
    size = runners['GreenMIM'].images.shape[-2:]
    return dict(model=model, image_size='x'.join(map(str, size)), batch_size=batch_size,
                **per_method, flops_ratio=flops['GreenMIM'] / flops['SimMIM'])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--models', nargs='+', default=['green_swin_base', 'green_swinv2_base_window8_256'])
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'results', 'flops_ratio_cpu.json'))
    args = parser.parse_args()
    rows = []
    for model in args.models:
        rows.append(flops_ratio(model, args.batch_size))
        r = rows[-1]
        print(f"{model} at {r['image_size']}, batch {args.batch_size}: FLOPs/step SimMIM "
              f"{r['SimMIM_flops_per_step'] / 1e9:.1f} G, GreenMIM {r['GreenMIM_flops_per_step'] / 1e9:.1f} G "
              f"({100 * r['flops_ratio']:.1f}%)", flush=True)
    write_result(args.out, dict(benchmark='flops_ratio', results=rows, command='python ' + ' '.join(sys.argv)))


if __name__ == '__main__':
    main()
