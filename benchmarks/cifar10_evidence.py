"""Does GreenMIM pre-training help? CIFAR-10 fine-tuning of a small green Swin, pre-trained vs from scratch.

    python benchmarks/cifar10_evidence.py --data-dir ../shared/data/cifar10            # CPU preset (see PRESETS)
    python benchmarks/cifar10_evidence.py --preset gpu --data-dir shared/data/cifar10 --out $OUT/cifar10_gpu.json
    python benchmarks/cifar10_evidence.py --smoke --data-dir DIR --out X.json           # seconds: checks the script

``--data-dir`` holds ``train.parquet`` and ``test.parquet`` (columns ``image``: JPEG bytes, ``label``: class index).
Everything runs through the project's public Python API, the code ``greenmim pretrain`` / ``finetune`` run:

1. ``pretrain``: GreenMIM on the train split (labels unused), images upsampled to ``input_size``;
2. for every seed, ``finetune`` on the first ``finetune_images`` rows of the train split (a Parquet subset file in
   the work folder), from the GreenMIM encoder and from random init with the same recipe and budget, then top-1 on
   the test split (the final weights, evaluated once, after training);
3. with SimMIM on: a short SimMIM calibration run measures its img/s, SimMIM pre-trains for the epochs that fill
   GreenMIM's wall time (the paper's claim in practice: the time GreenMIM saves buys epochs), and is fine-tuned
   the same way.

The JSON (``--out``) is rewritten after every phase, so an interrupted run leaves what it finished; a PNG beside it
shows top-1 per init and the pre-training loss curves.
"""
import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pyarrow.parquet as pq

from greenmim.train import FinetuneConfig, PretrainConfig, finetune, pretrain
from greenmim.train.data import build_dataset
from greenmim.train.distributed import init_distributed
from greenmim.train.finetune import evaluate, load_pretrained_encoder
from greenmim.train.run import create_model
from greenmim.train.transforms import eval_transform

sys.path.insert(0, os.path.dirname(__file__))
from common import environment, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA_DIRS = (ROOT / 'shared' / 'data' / 'cifar10', ROOT.parent / 'shared' / 'data' / 'cifar10')
MODEL = 'green_swin_tiny'
NUM_CLASSES = 10


@dataclass(frozen=True)
class Preset:
    """The size of a run; the recipe (:func:`pretrain_config`, :func:`finetune_config`) is the same for all."""
    model_kwargs: Dict
    input_size: int
    pretrain_epochs: int
    pretrain_batch: int
    pretrain_lr: float
    decoder_dim: int
    finetune_images: Optional[int]      # the first rows of the train split; None: all of it
    finetune_epochs: int
    finetune_batch: int
    finetune_lr: float
    seeds: Tuple[int, ...]
    simmim: bool
    calibration_steps: int              # SimMIM steps timed to size its pre-training
    num_workers: int
    pretrain_images: Optional[int] = None  # None: the whole train split
    test_images: Optional[int] = None      # None: the whole test split
    notes: List[str] = field(default_factory=list)


PRESETS = {
    'cpu': Preset(
        model_kwargs=dict(embed_dim=48, depths=(2, 2, 2, 2), window_size=3), input_size=96,
        pretrain_epochs=2, pretrain_batch=64, pretrain_lr=1e-3, decoder_dim=256,
        finetune_images=4000, finetune_epochs=3, finetune_batch=64, finetune_lr=1e-3,
        seeds=(0, 1), simmim=True, calibration_steps=20, num_workers=2,
        notes=['Sized for the shared 2-core CPU (other jobs at normal priority, this one at nice 10, '
               'OMP_NUM_THREADS=1): measured before the run, 40 steps each, GreenMIM pre-training ran at 200 img/s '
               'idle with 2 threads, 9 img/s under that load with 2 threads (threads waiting on each other) and '
               '70 img/s with 1 thread; SimMIM 99 and fine-tuning 96 img/s idle (2 threads).',
               '96 px: a 3x3 grid of 32-px mask units (2 of 9 visible at ratio 0.75); window 3 fits the stage grids '
               '24/12/6/3.',
               'Pre-training on all 50,000 train images without labels (2 epochs), fine-tuning on the first 4,000 '
               'labelled ones (8% of the split) for 3 epochs: what two pre-trainings and six fine-tunings allow in '
               'about 95 minutes under that load.']),
    'gpu': Preset(
        model_kwargs=dict(embed_dim=96, depths=(2, 2, 6, 2), window_size=4), input_size=128,
        pretrain_epochs=10, pretrain_batch=256, pretrain_lr=2e-3, decoder_dim=512,
        finetune_images=None, finetune_epochs=3, finetune_batch=256, finetune_lr=2e-3,
        seeds=(0, 1), simmim=False, calibration_steps=20, num_workers=14,
        notes=['Swin-T widths and depths at 128 px (a 4x4 mask grid), the whole train split. Sized by estimate for '
               'about 4 minutes of an H200, not yet run on one; --simmim adds SimMIM (about 2 more minutes).']),
    'smoke': Preset(
        model_kwargs=dict(embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=2), input_size=64,
        pretrain_epochs=1, pretrain_batch=8, pretrain_lr=1e-3, decoder_dim=32,
        finetune_images=16, finetune_epochs=1, finetune_batch=8, finetune_lr=1e-3,
        seeds=(0, 1), simmim=True, calibration_steps=2, num_workers=0, pretrain_images=16, test_images=16,
        notes=['Smoke run: checks the script end to end; its numbers mean nothing.']),
}


def pretrain_config(preset: Preset, method: str, data: str, epochs: int, output_dir: Path, **run) -> PretrainConfig:
    """The pre-training recipe: the paper's (AdamW 0.9/0.95, wd 0.05, mask ratio 0.75, RandomResizedCrop 0.2-1 +
    flip, norm-pix loss, 1-block decoder) with an absolute lr, warmup over the first quarter epoch and cosine."""
    return PretrainConfig(
        model=MODEL, method=method, model_kwargs=preset.model_kwargs, input_size=preset.input_size,
        decoder_dim=preset.decoder_dim, data=data, batch_size=preset.pretrain_batch, epochs=epochs,
        warmup_epochs=0.25, lr=preset.pretrain_lr, num_workers=preset.num_workers, vis_every=epochs,
        output_dir=str(output_dir), overwrite=True, log_every=1, **run)


def finetune_config(preset: Preset, data: str, checkpoint: Optional[str], seed: int, output_dir: Path
                    ) -> FinetuneConfig:
    """The fine-tuning recipe, the same for every init: the project's defaults (AdamW 0.9/0.999, wd 0.05, layer
    decay 0.9, drop path 0.1, label smoothing 0.1, clip 5, RandomResizedCrop + flip, cosine) with an absolute lr,
    warmup over half an epoch, and no Mixup/CutMix, RandAugment or random erasing, which slow down learning in a
    schedule of a few epochs (for either init)."""
    return FinetuneConfig(
        model=MODEL, model_kwargs=preset.model_kwargs, input_size=preset.input_size, checkpoint=checkpoint,
        data=data, num_classes=NUM_CLASSES, batch_size=preset.finetune_batch, epochs=preset.finetune_epochs,
        warmup_epochs=0.5, lr=preset.finetune_lr, mixup=0.0, cutmix=0.0, auto_augment=None, reprob=0.0,
        num_workers=preset.num_workers, seed=seed, output_dir=str(output_dir), overwrite=True, log_every=10)


def parquet_subset(source: Path, rows: Optional[int], path: Path) -> str:
    """``source`` itself, or its first ``rows`` rows (schema and Hugging Face metadata kept) written to ``path``."""
    if rows is None:
        return str(source)
    table = pq.read_table(source)
    if rows > table.num_rows:
        raise ValueError(f'{source} has {table.num_rows} rows, fewer than the {rows} asked for')
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.slice(0, rows), path)
    return str(path)


def step_records(run_dir: Path) -> List[dict]:
    """The step records of a run's ``log.jsonl``."""
    with open(run_dir / 'log.jsonl') as f:
        return [r for r in map(json.loads, f) if r.get('type') == 'step']


def steady_img_per_s(run_dir: Path) -> float:
    """Median img/s over a run's steps, the first two (warm-up) left out when there are more."""
    rates = [r['img_per_s'] for r in step_records(run_dir)]
    return statistics.median(rates[2:] if len(rates) > 2 else rates)


def run_pretraining(preset: Preset, method: str, data: str, epochs: int, work: Path) -> dict:
    """Pre-train ``method`` for ``epochs``; what the JSON records of it (sizes, wall time, losses)."""
    run_dir = work / f'pretrain_{method}'
    start = time.perf_counter()
    summary = pretrain(pretrain_config(preset, method, data, epochs, run_dir))
    wall = time.perf_counter() - start
    records = step_records(run_dir)
    every = max(1, len(records) // 200)
    return dict(
        method=method, model=MODEL, model_kwargs=preset.model_kwargs, size=preset.input_size, epochs=epochs,
        images=summary.steps * preset.pretrain_batch, steps=summary.steps, batch_size=preset.pretrain_batch,
        lr=preset.pretrain_lr, decoder_dim=preset.decoder_dim, mask_ratio=0.75, wall_s=round(wall, 1),
        img_per_s=round(steady_img_per_s(run_dir), 1), checkpoint=summary.last_checkpoint,
        epoch_losses=[round(m['train_loss'], 4) for m in summary.epoch_metrics],
        loss_curve=[[round(r['elapsed_s'], 1), r['step'], round(r['loss'], 4)] for r in records[::every]])


def simmim_epochs(preset: Preset, data: str, greenmim: dict, work: Path) -> Tuple[int, dict]:
    """The SimMIM epochs that fill GreenMIM's pre-training wall time, from SimMIM's img/s in a short timed run."""
    run_dir = work / 'simmim_calibration'
    pretrain(pretrain_config(preset, 'simmim', data, greenmim['epochs'], run_dir, max_steps=preset.calibration_steps))
    rate = steady_img_per_s(run_dir)
    images_per_epoch = greenmim['images'] // greenmim['epochs']
    epochs = max(1, round(greenmim['wall_s'] * rate / images_per_epoch))
    return epochs, dict(simmim_img_per_s=round(rate, 1), greenmim_img_per_s=greenmim['img_per_s'],
                        steps=preset.calibration_steps, target_wall_s=greenmim['wall_s'], simmim_epochs=epochs)


def run_finetuning(preset: Preset, init: str, checkpoint: Optional[str], seed: int, data: Dict[str, str],
                   work: Path) -> dict:
    """Fine-tune from ``checkpoint`` (``None``: random init) and evaluate the final weights on the test split."""
    run_dir = work / f'finetune_{init}_seed{seed}'
    start = time.perf_counter()
    summary = finetune(finetune_config(preset, data['finetune'], checkpoint, seed, run_dir))
    train_wall = time.perf_counter() - start
    process = init_distributed('auto')
    model = create_model(MODEL, num_classes=NUM_CLASSES, img_size=preset.input_size, **preset.model_kwargs)
    load_pretrained_encoder(model, run_dir, MODEL)
    test = build_dataset(data['test'], eval_transform(preset.input_size), with_labels=True, split='test')
    metrics = evaluate(model.to(process.device), test, 2 * preset.finetune_batch, process, preset.num_workers)
    return dict(
        init=init, seed=seed, top1=round(metrics['val_top1'], 2), top5=round(metrics['val_top5'], 2),
        test_loss=round(metrics['val_loss'], 4), test_images=len(test), finetune_epochs=preset.finetune_epochs,
        finetune_images=summary.steps * preset.finetune_batch,
        finetune_subset=pq.ParquetFile(data['finetune']).metadata.num_rows,
        finetune_steps=summary.steps, final_train_loss=round(summary.epoch_metrics[-1]['train_loss'], 4),
        train_wall_s=round(train_wall, 1), wall_s=round(time.perf_counter() - start, 1))


def compare(runs: List[dict]) -> dict:
    """Per init: seeds, mean, sample std and range of top-1; per pre-trained init: its mean minus scratch's, the
    spread (the larger of the two seed ranges) and whether the difference exceeds twice the spread."""
    by_init: Dict[str, List[float]] = {}
    for run in runs:
        by_init.setdefault(run['init'], []).append(run['top1'])
    stats = {init: dict(n=len(v), mean=round(statistics.mean(v), 2),
                        std=round(statistics.stdev(v), 2) if len(v) > 1 else None,
                        min=min(v), max=max(v), range=round(max(v) - min(v), 2)) for init, v in by_init.items()}
    versus = {}
    if 'scratch' in stats:
        base = stats['scratch']
        for init, s in stats.items():
            if init == 'scratch' or min(s['n'], base['n']) < 2:
                continue
            diff, spread = s['mean'] - base['mean'], max(s['range'], base['range'])
            versus[init] = dict(diff_vs_scratch=round(diff, 2), spread=round(spread, 2),
                                beyond_twice_spread=diff > 2 * spread)
    return dict(per_init=stats, versus_scratch=versus)


def plot(result: dict, path: Path) -> None:
    """Top-1 per init (each seed a dot, the mean a bar) and each method's pre-training loss against wall time."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    methods = list(result['pretrain'])
    fig, axes = plt.subplots(1, 1 + len(methods), figsize=(4 * (1 + len(methods)), 3.2), dpi=80)
    ax, inits = axes[0], list(result['summary']['per_init'])
    for i, init in enumerate(inits):
        tops = [r['top1'] for r in result['runs'] if r['init'] == init]
        ax.bar(i, result['summary']['per_init'][init]['mean'], color='C%d' % i, alpha=0.4)
        ax.plot([i] * len(tops), tops, 'o', color='C%d' % i)
    ax.set_xticks(range(len(inits)), inits)
    ax.set_ylabel('test top-1 (%)')
    ax.set_title(f'CIFAR-10, {result["config"]["finetune_epochs"]} fine-tuning epochs')
    for ax, method in zip(axes[1:], methods):
        curve = result['pretrain'][method]['loss_curve']
        ax.plot([c[0] / 60 for c in curve], [c[2] for c in curve], lw=0.8)
        ax.set_xlabel('pre-training wall time (min)')
        ax.set_ylabel('loss (GreenMIM: norm-pix MSE, SimMIM: L1)' if len(methods) > 1 else 'loss')
        ax.set_title(f'{method} pre-training, {result["pretrain"][method]["epochs"]} epochs')
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def find_data_dir(given: Optional[str]) -> Path:
    candidates = [Path(given)] if given else list(DATA_DIRS)
    for folder in candidates:
        if (folder / 'train.parquet').is_file() and (folder / 'test.parquet').is_file():
            return folder
    raise SystemExit(f'no train.parquet and test.parquet in {" or ".join(map(str, candidates))}: pass --data-dir')


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--preset', choices=sorted(PRESETS), default='cpu')
    parser.add_argument('--smoke', action='store_true', help='the smoke preset (seconds; checks the script)')
    parser.add_argument('--data-dir', help='folder with train.parquet and test.parquet (default: shared/data/cifar10 '
                                           'in or beside the checkout)')
    parser.add_argument('--simmim', action=argparse.BooleanOptionalAction, default=None,
                        help="SimMIM for GreenMIM's wall time (default: the preset's)")
    parser.add_argument('--work-dir', default='runs/cifar10_evidence', help='run folders and data subsets')
    parser.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results' / 'cifar10_evidence.json'))
    args = parser.parse_args(argv)
    name = 'smoke' if args.smoke else args.preset
    preset = PRESETS[name] if args.simmim is None else replace(PRESETS[name], simmim=args.simmim)
    data_dir, work, out = find_data_dir(args.data_dir), Path(args.work_dir), Path(args.out)
    data = dict(pretrain=parquet_subset(data_dir / 'train.parquet', preset.pretrain_images, work / 'pretrain.parquet'),
                finetune=parquet_subset(data_dir / 'train.parquet', preset.finetune_images, work / 'finetune.parquet'),
                test=parquet_subset(data_dir / 'test.parquet', preset.test_images, work / 'test.parquet'))
    result = dict(status='running', code_commit=environment()['commit'],  # env.commit: HEAD at the last write
                  preset=name, config=asdict(preset), model=MODEL, data_dir=str(data_dir),
                  command='python ' + ' '.join([os.path.relpath(__file__, ROOT)] + (argv or sys.argv[1:])),
                  pretrain_recipe=' '.join(pretrain_config.__doc__.split()),
                  finetune_recipe=' '.join(finetune_config.__doc__.split()),
                  pretrain={}, runs=[], summary=compare([]), phases=[])
    started = time.perf_counter()

    def report(phase: str, phase_start: float) -> None:
        result['phases'].append(dict(phase=phase, wall_s=round(time.perf_counter() - phase_start, 1)))
        result['summary'] = compare(result['runs'])
        result['total_wall_s'] = round(time.perf_counter() - started, 1)
        write_result(str(out), result)
        plot(result, out.with_suffix('.png'))

    def finetuning(init: str, checkpoint: Optional[str], seed: int) -> None:
        t = time.perf_counter()
        result['runs'].append(run_finetuning(preset, init, checkpoint, seed, data, work))
        report(f'finetune {init} seed {seed}', t)

    t = time.perf_counter()
    result['pretrain']['greenmim'] = run_pretraining(preset, 'greenmim', data['pretrain'], preset.pretrain_epochs,
                                                     work)
    report('pretrain greenmim', t)
    for seed in preset.seeds:  # the first results to come are a pair: an interrupted run still compares them
        finetuning('greenmim', result['pretrain']['greenmim']['checkpoint'], seed)
        finetuning('scratch', None, seed)
    if preset.simmim:
        t = time.perf_counter()
        epochs, result['simmim_calibration'] = simmim_epochs(preset, data['pretrain'], result['pretrain']['greenmim'],
                                                             work)
        result['pretrain']['simmim'] = run_pretraining(preset, 'simmim', data['pretrain'], epochs, work)
        report('pretrain simmim (calibration included)', t)
        for seed in preset.seeds:
            finetuning('simmim', result['pretrain']['simmim']['checkpoint'], seed)
    else:
        result['simmim_calibration'] = 'not run (SimMIM off in this preset; --simmim turns it on)'
    result['status'] = 'complete'
    report('end', time.perf_counter())
    return result


if __name__ == '__main__':
    main()
