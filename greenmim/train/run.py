"""The set-up every training run shares (``pretrain`` and ``finetune`` call it): process group and seeds, then,
around the task's model, data and loss: resume, optimizer, DDP and ``torch.compile``, the lr schedule, the
:class:`~greenmim.train.engine.Trainer` and the run's ``config.json``.

A run config is a ``PretrainConfig`` or ``FinetuneConfig``: a :class:`RunConfig` (how the run executes) plus what
it trains. Besides the :class:`RunConfig` fields, the set-up reads ``model``, ``output_dir``, the optimisation
fields (``lr``, ``blr``, ``weight_decay``, ``betas``, ``epochs``, ``warmup_epochs``, ``min_lr``) and those of
:class:`~greenmim.train.engine.LoopConfig`, which both configs define with their own defaults.
"""
import json
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple

import numpy as np
import timm
import torch

from greenmim.checkpoint import check_written_for, load_verified, read_checkpoint, wrapper_metadata
from greenmim.offline import hub_reachable, is_hub_id

from .config import amp_dtype, derived_seed
from .distributed import DistributedProcess, all_reduce_sum, init_distributed
from .engine import LoopConfig, Trainer, TrainSummary, steps_per_epoch
from .optim import build_optimizer, build_scheduler, scaled_lr
from .run_checkpoints import read_training_state, resolve_checkpoint
from .run_folder import claim_run_folder
from .validation import check_config

__all__ = ['RunConfig', 'start_process', 'run_session', 'create_model', 'build_trainer', 'SubsetDataset',
           'subset', 'print_summary']


@dataclass
class RunConfig:
    """How a training run executes, the same for pre-training and fine-tuning (flags of both commands)."""
    amp: str = 'auto'                    # auto (bf16 on CUDA, off on CPU) | bf16 | fp16 | none
    compile: bool = False                # torch.compile the model step: one graph, static shapes, compiled once
    cuda_graphs: bool = False            # with --compile on CUDA: replay the compiled step as CUDA graphs
    device: str = 'auto'
    seed: int = 0
    resume: Optional[str] = None
    max_steps: Optional[int] = None
    keep_last: int = 2
    log_every: int = 1
    overwrite: bool = False              # replace a run already in output_dir (refused otherwise)


def start_process(config: RunConfig) -> DistributedProcess:
    """Join the process group (if any) and seed torch and numpy for this rank, from ``config.seed``."""
    process = init_distributed(config.device)
    torch.manual_seed(derived_seed(config.seed, process.rank, 0))
    np.random.seed(derived_seed(config.seed, process.rank, 1) % 2 ** 32)
    return process


@contextmanager
def run_session(config) -> Iterator[DistributedProcess]:
    """Everything before a run's own work: :func:`~greenmim.train.validation.check_config` (a ``ValueError`` for
    any unusable setting), :func:`start_process`, and, on rank 0, holding ``config.output_dir`` for the run
    (:func:`~greenmim.train.run_folder.claim_run_folder`: a folder holding another run is refused unless resumed
    or ``overwrite``; a folder in use by another run is refused). Every rank raises when rank 0 refuses."""
    check_config(config)
    for what in (config.model, getattr(config, 'data', None)):
        if what and (what.startswith('hf-hub:') or is_hub_id(what)):
            hub_reachable(what)
    process = start_process(config)
    if config.cuda_graphs and (not config.compile or process.device.type != 'cuda'):
        raise ValueError(f'--cuda-graphs replays the compiled step on a GPU: it needs --compile and a CUDA device '
                         f'(this run: {"--compile, " if config.compile else "no --compile, "}{process.device})')
    with ExitStack() as held:
        if any(_is_local_file_data(getattr(config, name, None)) for name in ('data', 'val_data')):
            held.enter_context(_datasets_progress_off())
        refusal = None
        if process.is_main:
            try:
                held.enter_context(claim_run_folder(config.output_dir, config.resume, config.overwrite))
            except (ValueError, OSError) as e:  # raised on every rank below, so none waits for the others
                refusal = e
        refused = all_reduce_sum(torch.tensor([float(refusal is not None)], device=process.device), process)
        if refused.item():
            raise refusal or ValueError(f'rank 0 refused the output folder {config.output_dir}')
        yield process


def _is_local_file_data(source: Optional[str]) -> bool:
    """A local source that Hugging Face ``datasets`` reads (Parquet, ``imagefolder``), not an image folder."""
    path = Path(source).expanduser() if source else None
    return bool(path and path.exists() and not (path.is_dir() and not any(path.rglob('*.parquet'))))


@contextmanager
def _datasets_progress_off() -> Iterator[None]:
    """No ``datasets`` progress lines ("Downloading data", "Generating train split") for local files."""
    import datasets
    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()


class SubsetDataset(torch.utils.data.Dataset):
    """``indices`` of a map-style greenmim dataset (:func:`~greenmim.train.data.build_dataset`), with its
    ``raw_image``, ``set_epoch``, ``min_size``, ``num_classes`` and ``num_ignored``."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, list(indices)
        self.min_size, self.num_classes, self.num_ignored = dataset.min_size, dataset.num_classes, dataset.num_ignored

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.dataset[self.indices[index]]

    def raw_image(self, index: int):
        return self.dataset.raw_image(self.indices[index])

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)


def subset(dataset, count: Optional[int], seed: int):
    """``count`` images of a map-style ``dataset`` drawn once from ``seed`` (in dataset order), or ``dataset`` when
    ``count`` is ``None`` or not below its size; a streamed dataset is returned as it is (it takes ``count`` as its
    epoch length)."""
    if count is None or isinstance(dataset, torch.utils.data.IterableDataset) or count >= len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    return SubsetDataset(dataset, sorted(order[:count].tolist()))


def print_summary(summary: TrainSummary, output_dir: Path, metrics: Sequence[str] = (),
                  extra: Sequence[str] = ()) -> None:
    """The end-of-run block: steps, epochs, wall time, first -> last epoch loss, the last value of each of
    ``metrics``, skipped images, checkpoints, ``extra`` lines, the log."""
    losses = [m['train_loss'] for m in summary.epoch_metrics]
    last = {**(summary.epoch_metrics[-1] if summary.epoch_metrics else {}), **summary.stop_metrics}
    lines = [
        'interrupted: resumable checkpoint written' if summary.interrupted else 'done',
        f'  steps {summary.steps}, epochs {summary.epochs_completed}, wall time {summary.wall_time_s:.0f} s',
        f'  epoch loss {losses[0]:.4f} -> {losses[-1]:.4f}' if losses else
        (f'  step loss {summary.losses[0]:.4f} -> {summary.losses[-1]:.4f}' if summary.losses else ''),
        *(f'  {name} {last[name]:.2f}' + (' (at the stop)' if name in summary.stop_metrics else '')
          for name in metrics if name in last),
        f'  images skipped (unreadable or smaller than the minimum size): {summary.images_skipped}',
        '' if summary.graphs_compiled is None else '  torch.compile: ' + (
            'compiled once' if summary.graphs_compiled == 1 else 'no compilation (a graph compiled earlier in this '
            'process served every step)' if summary.graphs_compiled == 0 else
            f'{summary.graphs_compiled} graphs compiled (recompiled)'),
        f'  last checkpoint: {summary.last_checkpoint}',
        f'  best checkpoint: {summary.best_checkpoint}',
        *extra,
        f'  log: {output_dir / "log.jsonl"}',
    ]
    print('\n'.join(line for line in lines if line), flush=True)


def create_model(name: str, **kwargs) -> torch.nn.Module:
    """``timm.create_model(name, **kwargs)``; keyword arguments the model does not take are a ``ValueError`` that
    points at ``--model-kwargs`` (timm raises ``TypeError``)."""
    try:
        return timm.create_model(name, **kwargs)
    except TypeError as e:
        raise ValueError(f'--model {name} does not take these arguments ({e}): check --model-kwargs') from e


def _check_work_left(config, trainer: Trainer) -> None:
    """A resumed run must have steps left before ``max_steps`` and ``epochs``."""
    if config.max_steps is not None and config.max_steps <= trainer.step:
        raise ValueError(f'--max-steps {config.max_steps} is not above step {trainer.step}, where {config.resume} '
                         'resumes: nothing to train (pass a larger --max-steps)')
    if trainer.epoch >= config.epochs:
        raise ValueError(f'{config.resume} has completed {trainer.epoch} of --epochs {config.epochs}: nothing to '
                         'train (pass a larger --epochs to continue)')


def _resume_weights(model: torch.nn.Module, config) -> None:
    weights, metadata = read_checkpoint(resolve_checkpoint(config.resume))
    check_written_for(metadata, config.model, config.resume)
    written = json.loads(wrapper_metadata(metadata).get('mim_kwargs', '{}')).get('mask_mode', 'batch')
    if getattr(model, 'mask_mode', written) != written:  # a MIM run continues with the masks it started with
        raise ValueError(f'{config.resume} was trained with --mask-mode {written}, this run has --mask-mode '
                         f'{model.mask_mode}: pass --mask-mode {written} to resume it')
    load_verified(model, weights, config.model, source=config.resume)


def _learning_rate(config, process: DistributedProcess, lr_batch: int) -> Tuple[float, int]:
    """``(lr, effective batch)``: ``config.lr``, or ``config.blr`` scaled by the effective batch / ``lr_batch``."""
    effective_batch = config.batch_size * config.accum_iter * process.world_size
    lr = config.lr if config.lr is not None else scaled_lr(config.blr, effective_batch, lr_batch)
    return lr, effective_batch


def build_trainer(
        config,
        process: DistributedProcess,
        model: torch.nn.Module,
        dataset,
        loss_fn: Callable,
        *,
        metadata: Dict[str, str],
        description: str,
        lr_batch: int,
        layer_decay: Optional[float] = None,
        on_epoch_end: Optional[Callable] = None,
        best_metric=('train_loss', 'min'),
        generators: Optional[Mapping[str, torch.Generator]] = None,
        collate_at: Optional[Callable[[int, int], Callable]] = None,
) -> Trainer:
    """A :class:`~greenmim.train.engine.Trainer` for ``model`` (built and on ``process.device``), ready to ``fit``.

    With ``config.resume`` the weights (checked against ``config.model``), the optimizer, schedule and scaler
    states, the data position and the RNG states are restored. Rank 0 writes ``config.json`` and prints
    ``description`` with the run's shape (processes, effective batch, lr, steps).

    Args:
        loss_fn, on_epoch_end, best_metric, generators, collate_at, metadata: as for the ``Trainer``.
        lr_batch: the batch size ``config.blr`` is given for (256 for pre-training, 512 for fine-tuning).
        layer_decay: layer-wise lr decay over the model's ``group_matcher`` (fine-tuning).
    """
    if config.resume:
        _resume_weights(model, config)
    lr, effective_batch = _learning_rate(config, process, lr_batch)
    optimizer = build_optimizer(model, lr, config.weight_decay, tuple(config.betas), layer_decay=layer_decay,
                                fused=process.device.type == 'cuda')
    train_model = model
    if process.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[process.device.index] if process.device.type == 'cuda' else None)
    if config.compile:  # the model step as one graph of static shapes (pre-training: static layouts)
        train_model = torch.compile(train_model, fullgraph=True, dynamic=False,
                                    mode='reduce-overhead' if config.cuda_graphs else None)
    loop = LoopConfig.of(config)
    epoch_steps = steps_per_epoch(dataset, loop, process)
    warmup_epochs = config.warmup_epochs
    if warmup_epochs >= config.epochs:
        warmup_epochs = config.epochs / 10
        if process.is_main:
            print(f'warning: --warmup-epochs {config.warmup_epochs:g} is not shorter than --epochs {config.epochs}, '
                  f'so the lr would never leave the warm-up: warming up over {warmup_epochs:g} epochs (a tenth of '
                  'the run) instead', flush=True)
    warmup_steps = round(warmup_epochs * epoch_steps)
    scheduler = build_scheduler(optimizer, config.epochs * epoch_steps, warmup_steps, config.min_lr)
    if process.is_main and config.max_steps is not None and config.max_steps <= warmup_steps:
        print(f'warning: --max-steps {config.max_steps} stops inside the lr warm-up ({warmup_steps} steps of '
              f'--warmup-epochs {warmup_epochs:g}): the lr never reaches {lr:.3g}; the schedule is that of '
              f'--epochs {config.epochs}, so lower --epochs and --warmup-epochs for a short run', flush=True)
    trainer = Trainer(model=model, train_model=train_model, optimizer=optimizer, scheduler=scheduler,
                      dataset=dataset, loss_fn=loss_fn, loop=loop, process=process, output_dir=config.output_dir,
                      metadata=metadata, run_config=asdict(config), amp_dtype=amp_dtype(config.amp, process.device),
                      on_epoch_end=on_epoch_end, best_metric=best_metric, generators=generators,
                      collate_at=collate_at)
    if config.resume:
        trainer.load_state_dict(read_training_state(config.resume))
        _check_work_left(config, trainer)
    if process.is_main:
        output_dir = Path(config.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / 'config.json').write_text(json.dumps(asdict(config), indent=1))
        print(f'{description}, {process.world_size} process(es) on {process.device}, effective batch '
              f'{effective_batch}, lr {lr:.3g}, {epoch_steps} steps/epoch x {config.epochs} epochs'
              + (f', resuming at step {trainer.step}' if config.resume else ''), flush=True)
    return trainer
