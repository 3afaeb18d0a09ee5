"""The training loop shared by pre-training and fine-tuning.

:meth:`Trainer.fit` runs epochs; an epoch is a sequence of optimizer steps, each of ``accum_iter`` calls of
:meth:`Trainer._micro_step` (forward and backward of one micro-batch; DDP syncs gradients on the last one only)
followed by :meth:`Trainer._optimizer_step`; :meth:`Trainer._end_epoch` evaluates, logs and checkpoints.

The loop owns what makes a run resumable and visible: the lr schedule per optimizer step, bf16/fp16 autocast, the
NaN guard, the progress bar and JSONL log, checkpoints (periodic, at the end, on Ctrl-C and at ``max_steps``) and
exact resume: the data position is counted in micro-batches of the current epoch, the sampler order is a function
of ``(seed, epoch)``, every sample's augmentation a function of ``(seed, epoch, index)``, and the RNG states saved
are those right after the last completed optimizer step.
"""
import json
import math
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset
from tqdm import tqdm

from .data import Batch, ResumableSampler, collate_images
from .distributed import DistributedProcess, all_gather_objects, all_reduce_sum
from .run_checkpoints import capture_rng_state, restore_rng_state, save_checkpoint

__all__ = ['NonFiniteLossError', 'NothingTrainedError', 'LoopConfig', 'TrainSummary', 'Trainer', 'steps_per_epoch']


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the weights of the last good checkpoint are untouched."""


class NothingTrainedError(ValueError):
    """Every micro-batch of an epoch (or of the whole run) was skipped: no image could be read. No checkpoint is
    written for it."""


@dataclass
class LoopConfig:
    """The settings the loop reads: the fields of the same names of a ``PretrainConfig`` / ``FinetuneConfig``."""
    epochs: int
    batch_size: int                 # per rank and micro-batch
    accum_iter: int = 1
    num_workers: int = 2
    seed: int = 0
    max_steps: Optional[int] = None  # stop (with a checkpoint) after this many optimizer steps in total
    clip_grad: Optional[float] = None
    save_every: int = 1              # epochs between checkpoints (the last epoch is always saved)
    keep_last: int = 2
    log_every: int = 1               # optimizer steps between JSONL step records
    cuda_graphs: bool = False        # the model step replays as CUDA graphs (torch.compile's reduce-overhead)

    @classmethod
    def of(cls, run_config) -> 'LoopConfig':
        """The loop settings of a run's config."""
        return cls(**{f.name: getattr(run_config, f.name) for f in fields(cls)})


@dataclass
class TrainSummary:
    output_dir: str
    steps: int
    epochs_completed: int
    losses: List[float] = field(default_factory=list)   # loss of every optimizer step trained in this call
    epoch_metrics: List[Dict[str, float]] = field(default_factory=list)
    images_skipped: int = 0
    last_checkpoint: Optional[str] = None
    best_checkpoint: Optional[str] = None
    interrupted: bool = False
    wall_time_s: float = 0.0
    graphs_compiled: Optional[int] = None  # with torch.compile: graphs Dynamo compiled in this call (1: once)
    stop_metrics: Dict[str, Any] = field(default_factory=dict)  # on_epoch_end's at a --max-steps stop mid-epoch


@dataclass
class StepTotals:
    """What the micro-batches of the current optimizer step added up to: the sum of their losses (a device scalar,
    read once per optimizer step), how many had images (a micro-batch whose images were all unreadable is
    skipped), and the images."""
    loss_sum: Optional[torch.Tensor] = None
    trained: int = 0
    images: int = 0
    synced: bool = False  # DDP averaged the gradients (in the backward of the step's last micro-batch)

    def add(self, loss: torch.Tensor, images: int) -> None:
        loss = loss.detach().float()
        self.loss_sum = loss.clone() if self.loss_sum is None else self.loss_sum + loss  # (a CUDA graph reuses loss)
        self.trained += 1
        self.images += images


@dataclass
class EpochLoss:
    """Sum and count of the losses of the optimizer steps trained so far in the current epoch (skipped steps do
    not count)."""
    total: float = 0.0
    steps: int = 0

    @property
    def mean(self) -> float:
        return self.total / max(self.steps, 1)


@dataclass
class StopRequest:
    """Set by the first Ctrl-C (on any rank): save and stop after the current optimizer step."""
    requested: bool = False


def steps_per_epoch(dataset, loop: LoopConfig, process: DistributedProcess) -> int:
    """Optimizer steps per epoch on each rank (incomplete micro-batches and steps are dropped)."""
    per_rank = len(dataset) if isinstance(dataset, IterableDataset) else math.ceil(len(dataset) / process.world_size)
    steps = per_rank // (loop.batch_size * loop.accum_iter)
    if steps == 0:
        raise ValueError(f'{per_rank} images per rank are fewer than one optimizer step needs '
                         f'(batch_size {loop.batch_size} x accum_iter {loop.accum_iter}): lower the batch size')
    return steps


def _compiled_graphs() -> int:
    """Graphs ``torch.compile`` (Dynamo) has compiled in this process so far."""
    return torch._dynamo.utils.counters['stats']['unique_graphs']


@contextmanager
def _stop_on_sigint():
    """First Ctrl-C sets the yielded :class:`StopRequest`; a second one raises ``KeyboardInterrupt``. Outside the
    main thread nothing is installed."""
    stop = StopRequest()

    def handler(signum, frame):
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested = True
        print('\nCtrl-C: stopping after this step and saving a resumable checkpoint (Ctrl-C again to abort)',
              flush=True)

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread
        yield stop
        return
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


class Trainer:
    """Runs ``loss_fn(train_model, images, labels) -> loss`` over ``dataset`` for ``loop.epochs`` (with
    ``layout=batch.layout`` as well when the loader's batches carry one).

    Args:
        model: the unwrapped module (its ``state_dict`` is checkpointed).
        train_model: what ``loss_fn`` calls: ``model`` wrapped by DDP and/or ``torch.compile``.
        on_epoch_end: ``epoch -> {name: value}`` (evaluation, reconstructions), run on every rank.
        best_metric: ``(name, 'min' | 'max')`` over the epoch metrics (``train_loss`` is always there).
        metadata: stored in the safetensors header (see :mod:`greenmim.checkpoint`).
        generators: the task's own RNGs by name (pre-training's mask generator), checkpointed with the others.
        collate_at: ``(epoch, first_batch) -> collate_fn`` for a loader that starts at batch ``first_batch`` of
            ``epoch`` (default: :func:`~greenmim.train.data.collate_images`).
    """

    def __init__(self, *, model, train_model, optimizer, scheduler, dataset, loss_fn: Callable, loop: LoopConfig,
                 process: DistributedProcess, output_dir, metadata: Dict[str, str], run_config: Dict[str, Any],
                 amp_dtype: Optional[torch.dtype] = None, on_epoch_end: Optional[Callable] = None,
                 best_metric=('train_loss', 'min'), generators: Optional[Mapping[str, torch.Generator]] = None,
                 collate_at: Optional[Callable[[int, int], Callable]] = None):
        self.model, self.train_model, self.optimizer, self.scheduler = model, train_model, optimizer, scheduler
        self.dataset, self.loss_fn, self.loop, self.process = dataset, loss_fn, loop, process
        self.output_dir = Path(output_dir)
        self.metadata, self.run_config = metadata, run_config
        self.amp_dtype, self.on_epoch_end = amp_dtype, on_epoch_end
        self.best_name, self.best_mode = best_metric
        self.generators = dict(generators or {})
        self.collate_at = collate_at or (lambda epoch, first_batch: collate_images)
        self.scaler = torch.amp.GradScaler('cuda', enabled=amp_dtype == torch.float16)
        self.steps_per_epoch = steps_per_epoch(dataset, loop, process)
        self.epoch, self.micro_in_epoch, self.step = 0, 0, 0
        self.epoch_loss = EpochLoss()
        self.best: Optional[float] = None
        self.history: List[Dict[str, float]] = []
        self.rng_after_step = capture_rng_state(self.generators)
        self.summary: Optional[TrainSummary] = None  # of the current fit()

    @property
    def total_steps(self) -> int:
        return self.loop.epochs * self.steps_per_epoch

    # --- the loop -------------------------------------------------------------------------------------------
    def fit(self) -> TrainSummary:
        """Train from the current position to ``epochs`` (or ``max_steps``, or a Ctrl-C); returns a
        :class:`TrainSummary`."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.summary = TrainSummary(str(self.output_dir), self.step, self.epoch)
        self._graphs_at_start = _compiled_graphs()
        self._start_time = self._last_step_time = time.time()
        total = min(self.total_steps, self.loop.max_steps or self.total_steps)
        self._bar = tqdm(total=total, initial=self.step, disable=not self.process.is_main, unit='step',
                         dynamic_ncols=True, desc='train')
        with self._bar, _stop_on_sigint() as stop:  # the bar is closed (its line ended) also when the run fails
            while self.epoch < self.loop.epochs:
                if not self._train_epoch(stop):
                    break
                self._end_epoch()
        return self._finish()

    def _train_epoch(self, stop: StopRequest) -> bool:
        """The rest of the current epoch. ``False`` when the run stops inside it (Ctrl-C or ``max_steps``), after
        saving a checkpoint (:class:`NothingTrainedError` instead if no step of this run trained)."""
        self.train_model.train()
        micro_batches = self.steps_per_epoch * self.loop.accum_iter
        totals = StepTotals()
        for batch in self._loader():
            if self.micro_in_epoch >= micro_batches:
                break
            self._micro_step(batch, totals)
            if self.micro_in_epoch % self.loop.accum_iter:
                continue  # the optimizer step needs more micro-batches
            self._optimizer_step(totals, stop)
            totals = StepTotals()
            if stop.requested or (self.loop.max_steps and self.step >= self.loop.max_steps):
                self.summary.interrupted = stop.requested
                self._require_trained('this run', len(self.summary.losses))
                self.summary.last_checkpoint = self._save()
                if not stop.requested:
                    self._evaluate_at_stop()
                return False
        return True

    def _evaluate_at_stop(self) -> None:
        """At ``max_steps`` inside an epoch: ``on_epoch_end`` as at an epoch's end (evaluation, reconstructions),
        logged as a ``stop`` record; the position stays inside the epoch, so a resumed run continues it."""
        metrics = self.on_epoch_end(self.epoch) if self.on_epoch_end is not None else {}
        self.summary.stop_metrics = metrics
        self._log({'type': 'stop', 'step': self.step, 'epoch': self.epoch, **metrics})
        if self.process.is_main and metrics:
            self._bar.write(' '.join(f'{k}={v:.4f}' for k, v in metrics.items()))

    def _micro_step(self, batch: Batch, totals: StepTotals) -> None:
        """Forward and backward of one micro-batch, its loss added to ``totals`` on the device (no host sync); a
        micro-batch that is empty on any rank (every image unreadable) is skipped by all ranks, which agree on it
        over the host-side control group."""
        process, accum = self.process, self.loop.accum_iter
        empty, skipped = batch.images is None, batch.skipped
        if process.distributed:  # ranks must run the same collectives
            agreed = all_reduce_sum(torch.tensor([float(empty), float(skipped)]), process, control=True)
            empty, skipped = bool(agreed[0] > 0), int(agreed[1])
        self.summary.images_skipped += skipped
        if self.micro_in_epoch % accum == 0:
            self.scheduler.step_update(self.step)
        self.micro_in_epoch += 1
        if empty:
            return
        images = batch.images.to(process.device, non_blocking=True)
        labels = batch.labels.to(process.device, non_blocking=True)
        last_of_step = self.micro_in_epoch % accum == 0
        if self.loop.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # this micro-batch's replay may reuse the last one's memory
        with nullcontext() if last_of_step or not process.distributed else self.train_model.no_sync():
            with torch.autocast(process.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                loss = self.loss_fn(self.train_model, images, labels, **batch.inputs)
            self.scaler.scale(loss / accum).backward()
        totals.add(loss, images.shape[0])
        totals.synced = last_of_step

    def _agree(self, totals: StepTotals, stop: StopRequest) -> Optional[float]:
        """The step's loss (mean over its micro-batches and the ranks; ``None`` if all were skipped), read with
        the step's one host sync and checked before any update; a Ctrl-C on any rank stops every rank."""
        process = self.process
        loss = totals.loss_sum / totals.trained if totals.trained else torch.zeros((), device=process.device)
        check = all_reduce_sum(torch.stack([loss, torch.tensor(float(stop.requested), device=loss.device)]), process)
        total, stops = check.tolist()  # the host sync of this optimizer step
        stop.requested = stop.requested or stops > 0
        if not totals.trained:
            return None
        value = total / process.world_size
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f'loss is {value} at step {self.step + 1} (epoch {self.epoch}): stopped before updating the weights. '
                f'The last good checkpoint is untouched ({self.output_dir / "checkpoints" / "last.json"}); resume '
                'from it with a lower learning rate, or check the data.')
        return value

    def _optimizer_step(self, totals: StepTotals, stop: StopRequest) -> None:
        """Agree on the loss (:meth:`_agree`), clip, update the weights (through the gradient scaler), record the
        step (RNG states, loss, log). A step whose micro-batches were all skipped counts as a step (the schedule and
        data position advance on every rank alike) but updates nothing and adds no loss."""
        loss = self._agree(totals, stop)
        if totals.trained:
            if self.process.distributed and not totals.synced:
                self._average_gradients()
            if self.loop.clip_grad:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.loop.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.epoch_loss.total += loss
            self.epoch_loss.steps += 1
            self.summary.losses.append(loss)
        self.step += 1
        self.rng_after_step = capture_rng_state(self.generators)
        self._report_step(loss, totals.images)

    def _average_gradients(self) -> None:
        """Average the gradients over ranks by hand: DDP does it in the backward of a step's last micro-batch, which
        did not run when every rank skipped it."""
        for p in self.model.parameters():
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad /= self.process.world_size

    def _end_epoch(self) -> None:
        """Epoch metrics (mean loss of the trained steps, ``on_epoch_end``), the log, and the checkpoint when one is
        due; :class:`NothingTrainedError` if no step of the epoch trained."""
        self._require_trained(f'epoch {self.epoch}', self.epoch_loss.steps)
        metrics = {'epoch': self.epoch, 'train_loss': self.epoch_loss.mean}  # step losses are rank means already
        if self.on_epoch_end is not None:
            metrics.update(self.on_epoch_end(self.epoch))
        self.history.append(metrics)
        self.summary.epoch_metrics.append(metrics)
        self._log({'type': 'epoch', **metrics, 'images_skipped': self.summary.images_skipped})
        if self.process.is_main:
            self._bar.write(' '.join(f'{k}={v:.4f}' if isinstance(v, float) else f'{k}={v}'
                                     for k, v in metrics.items()))
        self.epoch, self.micro_in_epoch, self.epoch_loss = self.epoch + 1, 0, EpochLoss()
        if self.epoch % self.loop.save_every == 0 or self.epoch == self.loop.epochs:
            is_best = self._is_better(metrics[self.best_name])  # best among the saved epochs
            self.best = metrics[self.best_name] if is_best else self.best
            self.summary.last_checkpoint = self._save(best=is_best)

    def _require_trained(self, scope: str, trained_steps: int) -> None:
        if not trained_steps:
            raise NothingTrainedError(
                f'{scope} trained nothing: every micro-batch was skipped ({self.summary.images_skipped} images '
                'unreadable or smaller than --min-image-size). No checkpoint was written; check the data.')

    def _finish(self) -> TrainSummary:
        summary = self.summary
        summary.steps, summary.epochs_completed = self.step, self.epoch
        summary.wall_time_s = time.time() - self._start_time
        if isinstance(self.train_model, torch._dynamo.eval_frame.OptimizedModule):
            summary.graphs_compiled = _compiled_graphs() - self._graphs_at_start
            self._log({'type': 'compile', 'graphs': summary.graphs_compiled, 'steps': summary.steps})
        best = self.output_dir / 'checkpoints' / 'best.json'
        if best.exists():
            summary.best_checkpoint = str(best.parent / json.loads(best.read_text())['checkpoint'])
        return summary

    # --- data, progress ---------------------------------------------------------------------------------------
    def _loader(self) -> DataLoader:
        """The current epoch's data from the current micro-batch on."""
        start = self.micro_in_epoch * self.loop.batch_size
        self.dataset.set_epoch(self.epoch)
        if isinstance(self.dataset, IterableDataset):
            self.dataset.start = start
            sampler, workers = None, 0
        else:
            sampler = ResumableSampler(self.dataset, self.process.world_size, self.process.rank, seed=self.loop.seed)
            sampler.set_epoch(self.epoch)
            sampler.start = start
            workers = self.loop.num_workers
        return DataLoader(self.dataset, batch_size=self.loop.batch_size, sampler=sampler, num_workers=workers,
                          collate_fn=self.collate_at(self.epoch, self.micro_in_epoch), drop_last=True,
                          pin_memory=self.process.device.type == 'cuda',
                          generator=torch.Generator(), persistent_workers=False)

    def _report_step(self, loss: Optional[float], images: int) -> None:
        """Progress bar and (every ``log_every`` steps) the JSONL step record."""
        now = time.time()
        images_per_step = self.loop.batch_size * self.loop.accum_iter * self.process.world_size
        speed = images_per_step / max(now - self._last_step_time, 1e-9)
        self._last_step_time = now
        lr = max(g['lr'] for g in self.optimizer.param_groups)
        self._bar.set_postfix(epoch=self.epoch, loss='skipped' if loss is None else f'{loss:.4f}', lr=f'{lr:.2e}',
                              img_s=f'{speed:.1f}')
        self._bar.update(1)
        if self.step % self.loop.log_every == 0:  # a skipped step: loss null, images 0
            self._log({'type': 'step', 'step': self.step, 'epoch': self.epoch, 'loss': loss, 'lr': lr,
                       'img_per_s': speed, 'images': images * self.process.world_size,
                       'elapsed_s': now - self._start_time})

    def _log(self, record: Dict[str, Any]) -> None:
        if self.process.is_main:
            with open(self.output_dir / 'log.jsonl', 'a') as f:
                f.write(json.dumps(record) + '\n')

    def _is_better(self, value: float) -> bool:
        return self.best is None or (value < self.best if self.best_mode == 'min' else value > self.best)

    # --- checkpoint state ------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """The training state (``training_state.pt``); gathers every rank's RNG states (a collective)."""
        return {
            'optimizer': self.optimizer.state_dict(),
            'scheduler': self.scheduler.state_dict(),
            'scaler': self.scaler.state_dict(),
            'rng': all_gather_objects(self.rng_after_step, self.process),
            'epoch_loss': [self.epoch_loss.total, self.epoch_loss.steps],
            'position': {'epoch': self.epoch, 'micro_batch': self.micro_in_epoch, 'step': self.step,
                         **self._run_shape()},
            'best': self.best,
            'history': self.history,
            'config': json.dumps(self.run_config),
        }

    def _run_shape(self) -> Dict[str, int]:
        """What an exact resume needs unchanged."""
        return {'world_size': self.process.world_size, 'batch_size': self.loop.batch_size,
                'accum_iter': self.loop.accum_iter}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (the model weights are loaded by the caller)."""
        position = state['position']
        for key, now in self._run_shape().items():
            if position[key] != now:
                raise ValueError(f'cannot resume exactly: the checkpoint ran with {key}={position[key]}, this run '
                                 f'has {key}={now}')
        self.optimizer.load_state_dict(state['optimizer'])
        self.scheduler.load_state_dict(state['scheduler'])
        self.scaler.load_state_dict(state['scaler'])
        self.epoch, self.micro_in_epoch, self.step = position['epoch'], position['micro_batch'], position['step']
        self.best, self.history = state['best'], list(state['history'])
        self.epoch_loss = EpochLoss(*state['epoch_loss'])
        self.rng_after_step = state['rng'][self.process.rank]
        restore_rng_state(self.rng_after_step, self.generators)

    def _save(self, best: bool = False) -> Optional[str]:
        """Checkpoint (rank 0 writes; every rank takes part); returns the folder on rank 0."""
        state = self.state_dict()
        path = None
        if self.process.is_main:
            path = str(save_checkpoint(self.output_dir / 'checkpoints', self.step, self.model.state_dict(),
                                       self.metadata, state, self.loop.keep_last, best, {'epoch': self.epoch}))
        if self.process.distributed:
            torch.distributed.barrier()
        return path
