"""The training loop shared by pre-training and fine-tuning.

One optimizer step = ``accum_iter`` micro-batches (DDP syncs gradients on the last one only). The loop owns what
makes a run resumable and visible: the lr schedule per optimizer step, bf16/fp16 autocast, the NaN guard, the
progress bar and JSONL log, checkpoints (periodic, at the end, on Ctrl-C and at ``max_steps``) and exact resume:
the data position is counted in micro-batches of the current epoch, the sampler order is a function of
``(seed, epoch)``, every sample's augmentation a function of ``(seed, epoch, index)``, and the RNG states saved
are those right after the last completed optimizer step.
"""
import json
import math
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset
from tqdm import tqdm

from .checkpoint import capture_rng_state, restore_rng_state, save_checkpoint
from .data import Batch, ResumableSampler, collate_images
from .distributed import DistInfo, all_gather_objects, all_reduce_sum

__all__ = ['NonFiniteLossError', 'LoopConfig', 'TrainSummary', 'Trainer', 'steps_per_epoch']


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the weights of the last good checkpoint are untouched."""


@dataclass
class LoopConfig:
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


@dataclass
class TrainSummary:
    output_dir: str
    steps: int
    epochs_completed: int
    losses: List[float] = field(default_factory=list)   # loss of every optimizer step run in this call
    epoch_metrics: List[Dict[str, float]] = field(default_factory=list)
    images_skipped: int = 0
    last_checkpoint: Optional[str] = None
    best_checkpoint: Optional[str] = None
    interrupted: bool = False
    wall_time_s: float = 0.0


def steps_per_epoch(dataset, config: LoopConfig, info: DistInfo) -> int:
    """Optimizer steps per epoch on each rank (incomplete micro-batches and steps are dropped)."""
    per_rank = len(dataset) if isinstance(dataset, IterableDataset) else math.ceil(len(dataset) / info.world_size)
    steps = per_rank // (config.batch_size * config.accum_iter)
    if steps == 0:
        raise ValueError(f'{per_rank} images per rank are fewer than one optimizer step needs '
                         f'(batch_size {config.batch_size} x accum_iter {config.accum_iter}): lower the batch size')
    return steps


@contextmanager
def _stop_on_sigint():
    """First Ctrl-C sets ``flag['stop']`` (the loop saves and stops after the current step); a second one raises
    ``KeyboardInterrupt``. Outside the main thread nothing is installed."""
    flag = {'stop': False}

    def handler(signum, frame):
        if flag['stop']:
            raise KeyboardInterrupt
        flag['stop'] = True
        print('\nCtrl-C: stopping after this step and saving a resumable checkpoint (Ctrl-C again to abort)',
              flush=True)

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


class Trainer:
    """Runs ``loss_fn(train_model, images, labels) -> loss`` over ``dataset`` for ``config.epochs``.

    Args:
        model: the unwrapped module (its ``state_dict`` is checkpointed).
        train_model: what ``loss_fn`` calls: ``model`` wrapped by DDP and/or ``torch.compile``.
        on_epoch_end: ``epoch -> {name: value}`` (evaluation, reconstructions), run on every rank.
        best_metric: ``(name, 'min' | 'max')`` over the epoch metrics (``train_loss`` is always there).
        metadata: stored in the safetensors header (model name, kwargs, kind).
        mask_generator: its state is checkpointed with the other RNG states.
    """

    def __init__(self, *, model, train_model, optimizer, scheduler, dataset, loss_fn: Callable, config: LoopConfig,
                 info: DistInfo, output_dir, metadata: Dict[str, str], run_config: Dict[str, Any],
                 amp_dtype: Optional[torch.dtype] = None, on_epoch_end: Optional[Callable] = None,
                 best_metric=('train_loss', 'min'), mask_generator: Optional[torch.Generator] = None):
        self.model, self.train_model, self.optimizer, self.scheduler = model, train_model, optimizer, scheduler
        self.dataset, self.loss_fn, self.cfg, self.info = dataset, loss_fn, config, info
        self.output_dir = Path(output_dir)
        self.metadata, self.run_config = metadata, run_config
        self.amp_dtype, self.on_epoch_end = amp_dtype, on_epoch_end
        self.best_name, self.best_mode = best_metric
        self.mask_generator = mask_generator
        self.scaler = torch.amp.GradScaler('cuda', enabled=amp_dtype == torch.float16)
        self.steps_per_epoch = steps_per_epoch(dataset, config, info)
        self.epoch, self.micro_in_epoch, self.step = 0, 0, 0
        self.epoch_loss = [0.0, 0]  # sum of step losses and steps so far in this epoch
        self.best: Optional[float] = None
        self.history: List[Dict[str, float]] = []
        self.rng_after_step = capture_rng_state(mask_generator)

    @property
    def total_steps(self) -> int:
        return self.cfg.epochs * self.steps_per_epoch

    # --- state ------------------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {
            'optimizer': self.optimizer.state_dict(),
            'scheduler': self.scheduler.state_dict(),
            'scaler': self.scaler.state_dict(),
            'rng': all_gather_objects(self.rng_after_step, self.info),
            'epoch_loss': list(self.epoch_loss),
            'position': {'epoch': self.epoch, 'micro_batch': self.micro_in_epoch, 'step': self.step,
                         'world_size': self.info.world_size, 'batch_size': self.cfg.batch_size,
                         'accum_iter': self.cfg.accum_iter},
            'best': self.best,
            'history': self.history,
            'config': json.dumps(self.run_config),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (the model weights are loaded by the caller)."""
        pos = state['position']
        for key in ('world_size', 'batch_size', 'accum_iter'):
            now = {'world_size': self.info.world_size, 'batch_size': self.cfg.batch_size,
                   'accum_iter': self.cfg.accum_iter}[key]
            if pos[key] != now:
                raise ValueError(f'cannot resume exactly: the checkpoint ran with {key}={pos[key]}, this run has '
                                 f'{key}={now}')
        self.optimizer.load_state_dict(state['optimizer'])
        self.scheduler.load_state_dict(state['scheduler'])
        self.scaler.load_state_dict(state['scaler'])
        self.epoch, self.micro_in_epoch, self.step = pos['epoch'], pos['micro_batch'], pos['step']
        self.best, self.history, self.epoch_loss = state['best'], list(state['history']), list(state['epoch_loss'])
        self.rng_after_step = state['rng'][self.info.rank]
        restore_rng_state(self.rng_after_step, self.mask_generator)

    def _save(self, best: bool = False) -> Optional[str]:
        state = self.state_dict()  # collective: every rank takes part
        path = None
        if self.info.is_main:
            weights = {k: v for k, v in self.model.state_dict().items()}
            path = str(save_checkpoint(self.output_dir / 'checkpoints', self.step, weights, self.metadata, state,
                                       self.cfg.keep_last, best, {'epoch': self.epoch}))
        if self.info.distributed:
            torch.distributed.barrier()
        return path

    # --- data ---------------------------------------------------------------------------------------------------
    def _loader(self) -> DataLoader:
        start = self.micro_in_epoch * self.cfg.batch_size
        self.dataset.set_epoch(self.epoch)
        if isinstance(self.dataset, IterableDataset):
            self.dataset.start = start
            sampler, workers = None, 0
        else:
            sampler = ResumableSampler(self.dataset, self.info.world_size, self.info.rank, seed=self.cfg.seed)
            sampler.set_epoch(self.epoch)
            sampler.start = start
            workers = self.cfg.num_workers
        return DataLoader(self.dataset, batch_size=self.cfg.batch_size, sampler=sampler, num_workers=workers,
                          collate_fn=collate_images, drop_last=True, pin_memory=self.info.device.type == 'cuda',
                          generator=torch.Generator(), persistent_workers=False)

    # --- loop ---------------------------------------------------------------------------------------------------
    def _log(self, record: Dict[str, Any]) -> None:
        if self.info.is_main:
            with open(self.output_dir / 'log.jsonl', 'a') as f:
                f.write(json.dumps(record) + '\n')

    def _is_better(self, value: float) -> bool:
        return self.best is None or (value < self.best if self.best_mode == 'min' else value > self.best)

    def fit(self) -> TrainSummary:
        """Train from the current position to ``epochs`` (or ``max_steps``); returns a :class:`TrainSummary`."""
        cfg, info = self.cfg, self.info
        self.output_dir.mkdir(parents=True, exist_ok=True)
        summary = TrainSummary(str(self.output_dir), self.step, self.epoch)
        micro_per_epoch = self.steps_per_epoch * cfg.accum_iter
        images_per_step = cfg.batch_size * cfg.accum_iter * info.world_size
        start_time = last_time = time.time()
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not info.is_main, unit='step',
                   dynamic_ncols=True, desc='train')
        with _stop_on_sigint() as stop:
            while self.epoch < cfg.epochs:
                self.train_model.train()
                step_loss, step_images = 0.0, 0
                for batch in self._loader():
                    batch: Batch
                    if self.micro_in_epoch >= micro_per_epoch:
                        break
                    empty, skipped = batch.images is None, batch.skipped
                    if info.distributed:  # ranks must run the same collectives: skip a batch empty on any rank
                        agreed = all_reduce_sum(torch.tensor([float(empty), float(skipped)], device=info.device),
                                                info).tolist()
                        empty, skipped = agreed[0] > 0, int(agreed[1])
                    summary.images_skipped += skipped
                    last_micro = (self.micro_in_epoch + 1) % cfg.accum_iter == 0
                    if self.micro_in_epoch % cfg.accum_iter == 0:
                        self.scheduler.step_update(self.step)
                    if not empty:
                        images = batch.images.to(info.device, non_blocking=True)
                        labels = batch.labels.to(info.device, non_blocking=True)
                        sync = nullcontext() if last_micro or not info.distributed else self.train_model.no_sync()
                        with sync:
                            with torch.autocast(info.device.type, dtype=self.amp_dtype,
                                                enabled=self.amp_dtype is not None):
                                loss = self.loss_fn(self.train_model, images, labels)
                            check = all_reduce_sum(torch.stack([loss.detach().float(),
                                                                torch.tensor(float(stop['stop']), device=loss.device)]),
                                                   info)
                            loss_value = check[0].item() / info.world_size
                            if not math.isfinite(loss_value):
                                raise NonFiniteLossError(
                                    f'loss is {loss_value} at step {self.step + 1} (epoch {self.epoch}): stopped '
                                    'before updating the weights. The last good checkpoint is untouched '
                                    f'({self.output_dir / "checkpoints" / "last.json"}); resume from it with a lower '
                                    'learning rate, or check the data.')
                            stop['stop'] = stop['stop'] or check[1].item() > 0
                            self.scaler.scale(loss / cfg.accum_iter).backward()
                        step_loss += loss_value / cfg.accum_iter
                        step_images += images.shape[0]
                    self.micro_in_epoch += 1
                    if not last_micro:
                        continue
                    if cfg.clip_grad:
                        self.scaler.unscale_(self.optimizer)
                        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.step += 1
                    self.rng_after_step = capture_rng_state(self.mask_generator)
                    now = time.time()
                    speed = images_per_step / max(now - last_time, 1e-9)
                    last_time = now
                    lr = max(g['lr'] for g in self.optimizer.param_groups)
                    summary.losses.append(step_loss)
                    self.epoch_loss = [self.epoch_loss[0] + step_loss, self.epoch_loss[1] + 1]
                    bar.set_postfix(epoch=self.epoch, loss=f'{step_loss:.4f}', lr=f'{lr:.2e}', img_s=f'{speed:.1f}')
                    bar.update(1)
                    if self.step % cfg.log_every == 0:
                        self._log({'type': 'step', 'step': self.step, 'epoch': self.epoch, 'loss': step_loss,
                                   'lr': lr, 'img_per_s': speed, 'images': step_images * info.world_size,
                                   'elapsed_s': now - start_time})
                    step_loss, step_images = 0.0, 0
                    if stop['stop'] or (cfg.max_steps and self.step >= cfg.max_steps):
                        summary.interrupted = bool(stop['stop'])
                        summary.last_checkpoint = self._save()
                        return self._finish(summary, bar, start_time)
                metrics = {'epoch': self.epoch,
                           'train_loss': self.epoch_loss[0] / max(self.epoch_loss[1], 1)}  # rank means already
                if self.on_epoch_end is not None:
                    metrics.update(self.on_epoch_end(self.epoch))
                self.history.append(metrics)
                summary.epoch_metrics.append(metrics)
                self._log({'type': 'epoch', **metrics, 'images_skipped': summary.images_skipped})
                if info.is_main:
                    bar.write(' '.join(f'{k}={v:.4f}' if isinstance(v, float) else f'{k}={v}'
                                       for k, v in metrics.items()))
                self.epoch, self.micro_in_epoch, self.epoch_loss = self.epoch + 1, 0, [0.0, 0]
                if self.epoch % cfg.save_every == 0 or self.epoch == cfg.epochs:
                    is_best = self._is_better(metrics[self.best_name])  # best among the saved epochs
                    self.best = metrics[self.best_name] if is_best else self.best
                    summary.last_checkpoint = self._save(best=is_best)
        return self._finish(summary, bar, start_time)

    def _finish(self, summary: TrainSummary, bar, start_time: float) -> TrainSummary:
        bar.close()
        summary.steps, summary.epochs_completed = self.step, self.epoch
        summary.wall_time_s = time.time() - start_time
        best = self.output_dir / 'checkpoints' / 'best.json'
        if best.exists():
            summary.best_checkpoint = str(best.parent / json.loads(best.read_text())['checkpoint'])
        return summary
