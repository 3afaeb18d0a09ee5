"""``greenmim pretrain``: masked-image-modeling pre-training of a green model (GreenMIM or the SimMIM baseline).

Python API::

    from greenmim.train import PretrainConfig, pretrain
    summary = pretrain(PretrainConfig(model='green_swin_tiny', epochs=10, batch_size=16, output_dir='runs/demo'))
"""
import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import IterableDataset

import greenmim
from greenmim.mim import GreenMIM, SimMIM, mim_metadata

from .config import add_config_arguments, amp_dtype, config_from_args, derived_seed
from .checkpoint import check_model_metadata, load_weights_into, read_training_state, read_weights
from .data import DATA_FORMATS, build_dataset
from .distributed import init_distributed
from .engine import LoopConfig, Trainer, TrainSummary, steps_per_epoch
from .optim import build_optimizer, build_scheduler, scaled_lr
from .reconstruction import save_reconstruction_grid
from .transforms import eval_transform, pretrain_transform

__all__ = ['PretrainConfig', 'pretrain', 'build_mim_model', 'add_arguments', 'run']

METHODS = {'greenmim': GreenMIM, 'simmim': SimMIM}


@dataclass
class PretrainConfig:
    """Pre-training settings; defaults follow the paper's recipe (AdamW, betas 0.9/0.95, weight decay 0.05,
    lr = blr x effective batch / 256, RandomResizedCrop 0.2-1 + flip, mask ratio 0.75)."""
    model: str = 'green_swin_base'
    method: str = 'greenmim'
    model_kwargs: Dict[str, Any] = field(default_factory=dict)  # extra timm kwargs, e.g. window_size, depths
    input_size: int = 224
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    decoder_dim: int = 512
    decoder_depth: int = 1
    drop_path: float = 0.0
    # data
    data: Optional[str] = None           # None: the embedded sample photos
    data_format: str = 'auto'
    split: str = 'train'
    streaming: bool = False
    image_column: Optional[str] = None
    epoch_size: Optional[int] = None     # streamed datasets without size info
    min_image_size: int = 32             # smaller images are skipped (and counted)
    num_workers: int = 2
    # optimisation
    epochs: int = 800
    warmup_epochs: float = 40
    batch_size: int = 64                 # per device and micro-batch
    accum_iter: int = 1
    blr: float = 1.5e-4
    lr: Optional[float] = None           # absolute lr; overrides blr
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: Tuple[float, float] = (0.9, 0.95)
    clip_grad: Optional[float] = None
    # run
    amp: str = 'auto'                    # auto (bf16 on CUDA, off on CPU) | bf16 | fp16 | none
    compile: bool = False
    device: str = 'auto'
    seed: int = 0
    output_dir: str = 'runs/pretrain'
    resume: Optional[str] = None
    max_steps: Optional[int] = None
    save_every: int = 10                 # epochs between checkpoints (the last epoch, Ctrl-C and max_steps always save)
    keep_last: int = 2
    vis_every: int = 1                   # epochs between reconstruction PNGs (0: never)
    vis_images: int = 4
    log_every: int = 1


def build_mim_model(cfg: PretrainConfig) -> torch.nn.Module:
    """The GreenMIM / SimMIM wrapper of ``cfg.model`` at ``cfg.input_size``."""
    if cfg.method not in METHODS:
        raise ValueError(f'method must be one of {sorted(METHODS)}, got {cfg.method!r}')
    if 'img_size' in cfg.model_kwargs:
        raise ValueError('set the image size with input_size (--input-size), not model_kwargs')
    kwargs = dict(img_size=cfg.input_size, drop_path_rate=cfg.drop_path, **cfg.model_kwargs)
    if cfg.method == 'greenmim':
        kwargs.update(decoder_dim=cfg.decoder_dim, decoder_depth=cfg.decoder_depth, norm_pix_loss=cfg.norm_pix_loss)
    return METHODS[cfg.method](cfg.model, mask_ratio=cfg.mask_ratio, **kwargs)


def _preview_batch(dataset, count: int, input_size: int) -> Optional[torch.Tensor]:
    """``count`` readable images spread evenly over ``dataset`` (the first ones of a stream), resized and
    centre-cropped: ``[n, 3, S, S]``."""
    transform, images = eval_transform(input_size, crop_pct=1.0), []
    step = 1 if isinstance(dataset, IterableDataset) else max(len(dataset) // count, 1)
    for index in list(range(0, len(dataset), step)) + [i for i in range(len(dataset)) if i % step]:
        if len(images) == count:
            break
        image = dataset.raw_image(index)
        if image is not None and min(image.size) >= dataset.min_size:
            images.append(transform(image))
    return torch.stack(images) if images else None


def pretrain(cfg: PretrainConfig) -> TrainSummary:
    """Pre-train as configured; returns the run's :class:`~greenmim.train.engine.TrainSummary`.

    Raises:
        NonFiniteLossError: the loss became NaN/inf (the last checkpoint is left as it was).
    """
    info = init_distributed(cfg.device)
    torch.manual_seed(derived_seed(cfg.seed, info.rank, 0))
    np.random.seed(derived_seed(cfg.seed, info.rank, 1) % 2 ** 32)
    mask_generator = torch.Generator().manual_seed(derived_seed(cfg.seed, info.rank, 2))
    dataset = build_dataset(
        cfg.data, pretrain_transform(cfg.input_size), data_format=cfg.data_format, split=cfg.split,
        streaming=cfg.streaming, image_column=cfg.image_column, min_size=cfg.min_image_size, seed=cfg.seed,
        epoch_size=cfg.epoch_size, rank=info.rank, world_size=info.world_size)

    model = build_mim_model(cfg).to(info.device)
    metadata = {'format': 'greenmim', 'kind': 'mim', 'method': cfg.method, 'model': cfg.model,
                'model_kwargs': json.dumps(dict(img_size=cfg.input_size, **cfg.model_kwargs)),
                'greenmim_version': greenmim.__version__, **mim_metadata(model)}
    if cfg.resume:
        weights, meta = read_weights(cfg.resume)
        check_model_metadata(meta, cfg.model, cfg.resume)
        load_weights_into(model, weights, cfg.resume, cfg.model)

    effective_batch = cfg.batch_size * cfg.accum_iter * info.world_size
    lr = cfg.lr if cfg.lr is not None else scaled_lr(cfg.blr, effective_batch)
    optimizer = build_optimizer(model, lr, cfg.weight_decay, tuple(cfg.betas))
    train_model = model
    if info.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == 'cuda' else None)
    if cfg.compile:
        train_model = torch.compile(train_model)

    def loss_fn(net, images, labels):
        return net(images, generator=mask_generator).loss

    preview = _preview_batch(dataset, cfg.vis_images, cfg.input_size) if info.is_main and cfg.vis_every else None
    preview_mask = model.sample_mask(torch.Generator().manual_seed(cfg.seed)) if preview is not None else None
    output_dir = Path(cfg.output_dir)

    def on_epoch_end(epoch: int) -> Dict[str, Any]:
        if preview is None or (epoch + 1) % cfg.vis_every:
            return {}
        path = output_dir / 'reconstructions' / f'epoch-{epoch + 1:04d}.png'
        with torch.autocast(info.device.type, dtype=amp_dtype(cfg.amp, info.device),
                            enabled=amp_dtype(cfg.amp, info.device) is not None):
            save_reconstruction_grid(model, preview.to(info.device), preview_mask, path)
        return {}

    loop = LoopConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, accum_iter=cfg.accum_iter,
                      num_workers=cfg.num_workers, seed=cfg.seed, max_steps=cfg.max_steps, clip_grad=cfg.clip_grad,
                      save_every=cfg.save_every, keep_last=cfg.keep_last, log_every=cfg.log_every)
    epoch_steps = steps_per_epoch(dataset, loop, info)
    scheduler = build_scheduler(optimizer, cfg.epochs * epoch_steps, round(cfg.warmup_epochs * epoch_steps), cfg.min_lr)
    trainer = Trainer(model=model, train_model=train_model, optimizer=optimizer, scheduler=scheduler, dataset=dataset,
                      loss_fn=loss_fn, config=loop, info=info, output_dir=output_dir, metadata=metadata,
                      run_config=asdict(cfg), amp_dtype=amp_dtype(cfg.amp, info.device),
                      on_epoch_end=on_epoch_end, mask_generator=mask_generator)
    if cfg.resume:
        trainer.load_state_dict(read_training_state(cfg.resume))
    if info.is_main:
        num_images = len(dataset) * (info.world_size if isinstance(dataset, IterableDataset) else 1)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / 'config.json').write_text(json.dumps(asdict(cfg), indent=1))
        print(f'pretrain {cfg.method} {cfg.model} @ {cfg.input_size}px on {cfg.data or "the embedded sample photos"}'
              f' ({num_images} images, {dataset.num_ignored} non-image files ignored), '
              f'{info.world_size} process(es) on {info.device}, effective batch {effective_batch}, lr {lr:.3g}, '
              f'{trainer.steps_per_epoch} steps/epoch x {cfg.epochs} epochs'
              + (f', resuming at step {trainer.step}' if cfg.resume else ''), flush=True)
    summary = trainer.fit()
    if info.is_main:
        _print_summary(summary, output_dir)
    return summary


def _print_summary(summary: TrainSummary, output_dir: Path) -> None:
    losses = [m['train_loss'] for m in summary.epoch_metrics]
    pngs = sorted((output_dir / 'reconstructions').glob('*.png'))
    lines = [
        'interrupted: resumable checkpoint written' if summary.interrupted else 'done',
        f'  steps {summary.steps}, epochs {summary.epochs_completed}, wall time {summary.wall_time_s:.0f} s',
        f'  epoch loss {losses[0]:.4f} -> {losses[-1]:.4f}' if losses else
        (f'  step loss {summary.losses[0]:.4f} -> {summary.losses[-1]:.4f}' if summary.losses else ''),
        f'  images skipped (unreadable or smaller than the minimum size): {summary.images_skipped}',
        f'  last checkpoint: {summary.last_checkpoint}',
        f'  best checkpoint: {summary.best_checkpoint}',
        f'  reconstructions: {pngs[-1]}' if pngs else '',
        f'  log: {output_dir / "log.jsonl"}',
    ]
    print('\n'.join(line for line in lines if line), flush=True)


HELP = {
    'model': 'green model name registered in timm',
    'method': 'greenmim (visible tokens only) or simmim (dense baseline)',
    'model_kwargs': 'extra timm model kwargs, e.g. window_size=4 depths="(2,2,2,2)"',
    'data': 'image folder, Parquet file/folder, or Hugging Face dataset name; default: the embedded photos',
    'data_format': f'one of {DATA_FORMATS}',
    'blr': 'base learning rate per 256 images (lr = blr x effective batch / 256)',
    'batch_size': 'images per device and micro-batch',
    'accum_iter': 'micro-batches per optimizer step',
    'resume': 'checkpoint folder, run folder or its checkpoints/ folder to continue exactly',
    'max_steps': 'stop after this many optimizer steps in total, with a checkpoint (schedule unchanged)',
    'vis_every': 'epochs between reconstruction PNGs (0: never)',
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, PretrainConfig, HELP)


def run(args: argparse.Namespace) -> int:
    pretrain(config_from_args(PretrainConfig, args))
    return 0
