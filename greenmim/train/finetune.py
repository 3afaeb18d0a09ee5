"""``greenmim finetune``: fine-tune (or linear-probe) a pre-trained green encoder as a timm classifier.

Recipe (MAE / SimMIM style): AdamW, layer-wise lr decay over timm's ``group_matcher`` (paper: 0.9 Swin-B, 0.8
Swin-L), drop path, RandAugment + random erasing, Mixup 0.8 / CutMix 1.0 / label smoothing 0.1, warmup + cosine,
top-1 / top-5 evaluation every epoch. Learning rate: ``lr = blr x effective batch / 512`` with
``blr = 1.25e-3`` (the authors' released configs; the paper's 1.25e-4 is ten times lower; see docs/training.md).

Python API::

    from greenmim.train import FinetuneConfig, finetune
    finetune(FinetuneConfig(model='green_swin_base', checkpoint='runs/pretrain', data='imagenet/train',
                            val_data='imagenet/val', num_classes=1000))
"""
import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import timm
import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import accuracy
from torch.utils.data import DataLoader, DistributedSampler

import greenmim
from greenmim.mim import split_mim_state_dict

from .checkpoint import check_model_metadata, load_weights_into, read_training_state, read_weights
from .data import DATA_FORMATS, build_dataset, collate_images
from .distributed import DistInfo, all_reduce_sum, init_distributed
from .engine import LoopConfig, Trainer, TrainSummary, steps_per_epoch
from .optim import build_optimizer, build_scheduler, scaled_lr
from .config import add_config_arguments, amp_dtype, config_from_args, derived_seed
from .transforms import eval_transform, finetune_transform

__all__ = ['FinetuneConfig', 'finetune', 'load_pretrained_encoder', 'evaluate', 'add_arguments', 'run']


@dataclass
class FinetuneConfig:
    """Fine-tuning settings (defaults: the authors' Swin-B recipe; ``layer_decay`` 0.8 for Swin-L)."""
    model: str = 'green_swin_base'
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    input_size: int = 224
    checkpoint: Optional[str] = None      # MIM checkpoint (folder/run/file) or exported encoder; None: from scratch
    linear_probe: bool = False            # train the head only, on frozen features
    # data
    data: Optional[str] = None            # labelled: ImageFolder layout, Parquet or Hugging Face dataset
    val_data: Optional[str] = None        # evaluated every epoch when given
    data_format: str = 'auto'
    split: str = 'train'
    val_split: str = 'validation'
    image_column: Optional[str] = None
    label_column: Optional[str] = None
    num_classes: Optional[int] = None     # from the data when not given
    min_image_size: int = 32
    num_workers: int = 2
    # optimisation
    epochs: int = 100
    warmup_epochs: float = 20
    batch_size: int = 64
    accum_iter: int = 1
    blr: float = 1.25e-3                  # per 512 images
    lr: Optional[float] = None
    min_lr: float = 2.5e-7
    weight_decay: float = 0.05
    betas: Tuple[float, float] = (0.9, 0.999)
    layer_decay: float = 0.9
    drop_path: float = 0.1
    clip_grad: Optional[float] = 5.0
    mixup: float = 0.8
    cutmix: float = 1.0
    smoothing: float = 0.1
    auto_augment: str = 'rand-m9-mstd0.5-inc1-mmax9'  # mmax9: see transforms.finetune_transform
    reprob: float = 0.25
    # run
    amp: str = 'auto'
    compile: bool = False
    device: str = 'auto'
    seed: int = 0
    output_dir: str = 'runs/finetune'
    resume: Optional[str] = None
    max_steps: Optional[int] = None
    save_every: int = 1
    keep_last: int = 2
    log_every: int = 1


def load_pretrained_encoder(model: torch.nn.Module, path, model_name: str) -> Dict[str, str]:
    """Load a GreenMIM/SimMIM checkpoint's encoder, an exported encoder or a classifier into ``model`` (a timm
    classifier of ``model_name``). The head is kept from ``model`` when absent or of another size. Returns the
    checkpoint's metadata; raises ``ValueError`` when the weights belong to another architecture."""
    weights, metadata = read_weights(path)
    check_model_metadata(metadata, model_name, path)
    if any(k.startswith('encoder.') for k in weights):
        weights = split_mim_state_dict(weights)[0]
    own = model.state_dict()
    weights = {k: v for k, v in weights.items()
               if not (k.startswith('head.') and (k not in own or own[k].shape != v.shape))}
    load_weights_into(model, weights, path, model_name, optional_missing=('head.',))
    return metadata


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset, batch_size: int, info: DistInfo, num_workers: int = 2,
             amp: Optional[torch.dtype] = None) -> Dict[str, float]:
    """Top-1 / top-5 accuracy (%) and loss over ``dataset``, sharded over ranks (readable images only)."""
    model.eval()
    sampler = DistributedSampler(dataset, info.world_size, info.rank, shuffle=False) if info.distributed else None
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        collate_fn=collate_images)
    totals = torch.zeros(4, dtype=torch.float64)  # correct@1, correct@5, loss sum, count
    for batch in loader:
        if batch.images is None:
            continue
        images, labels = batch.images.to(info.device), batch.labels.to(info.device)
        with torch.autocast(info.device.type, dtype=amp, enabled=amp is not None):
            logits = model(images).float()
        top1, top5 = accuracy(logits, labels, topk=(1, min(5, logits.shape[1])))
        n = labels.shape[0]
        totals += torch.tensor([top1.item() * n / 100, top5.item() * n / 100,
                                torch.nn.functional.cross_entropy(logits, labels, reduction='sum').item(), n],
                               dtype=torch.float64)
    totals = all_reduce_sum(totals.to(info.device), info).cpu()
    count = max(totals[3].item(), 1)
    return {'val_top1': 100 * totals[0].item() / count, 'val_top5': 100 * totals[1].item() / count,
            'val_loss': totals[2].item() / count}


def finetune(cfg: FinetuneConfig) -> TrainSummary:
    """Fine-tune as configured; returns the :class:`~greenmim.train.engine.TrainSummary` (epoch metrics hold
    ``val_top1`` / ``val_top5`` when ``val_data`` is given)."""
    if cfg.data is None:
        raise ValueError('finetune needs labelled data (data=...): an ImageFolder-layout folder, Parquet or a '
                         'Hugging Face dataset with a label column')
    info = init_distributed(cfg.device)
    torch.manual_seed(derived_seed(cfg.seed, info.rank, 0))
    np.random.seed(derived_seed(cfg.seed, info.rank, 1) % 2 ** 32)
    common = dict(with_labels=True, data_format=cfg.data_format, image_column=cfg.image_column,
                  label_column=cfg.label_column, min_size=cfg.min_image_size, seed=cfg.seed)
    train_tf = (finetune_transform(cfg.input_size, None, 0.0) if cfg.linear_probe
                else finetune_transform(cfg.input_size, cfg.auto_augment, cfg.reprob))
    dataset = build_dataset(cfg.data, train_tf, split=cfg.split, rank=info.rank, world_size=info.world_size, **common)
    val_dataset = (build_dataset(cfg.val_data, eval_transform(cfg.input_size), split=cfg.val_split, **common)
                   if cfg.val_data else None)
    num_classes = cfg.num_classes or dataset.num_classes
    if not num_classes:
        raise ValueError('could not tell the number of classes from the data: pass num_classes')

    if 'img_size' in cfg.model_kwargs:
        raise ValueError('set the image size with input_size (--input-size), not model_kwargs')
    model = timm.create_model(cfg.model, num_classes=num_classes, img_size=cfg.input_size,
                              drop_path_rate=0.0 if cfg.linear_probe else cfg.drop_path, **cfg.model_kwargs)
    if cfg.checkpoint:
        load_pretrained_encoder(model, cfg.checkpoint, cfg.model)
    elif info.is_main:
        print('warning: no checkpoint given, fine-tuning from random initialisation', flush=True)
    if cfg.resume:
        weights, meta = read_weights(cfg.resume)
        check_model_metadata(meta, cfg.model, cfg.resume)
        load_weights_into(model, weights, cfg.resume, cfg.model)
    if cfg.linear_probe:
        head = set(id(p) for p in model.get_classifier().parameters())
        for p in model.parameters():
            p.requires_grad_(id(p) in head)
    model.to(info.device)

    effective_batch = cfg.batch_size * cfg.accum_iter * info.world_size
    lr = cfg.lr if cfg.lr is not None else scaled_lr(cfg.blr, effective_batch, 512)
    optimizer = build_optimizer(model, lr, cfg.weight_decay, tuple(cfg.betas),
                                layer_decay=None if cfg.linear_probe else cfg.layer_decay)
    train_model = model
    if info.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == 'cuda' else None)
    if cfg.compile:
        train_model = torch.compile(train_model)

    mixup = (Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.smoothing,
                   num_classes=num_classes) if cfg.mixup > 0 or cfg.cutmix > 0 else None)
    criterion = (SoftTargetCrossEntropy() if mixup else
                 LabelSmoothingCrossEntropy(cfg.smoothing) if cfg.smoothing > 0 else torch.nn.CrossEntropyLoss())

    def loss_fn(net, images, labels):
        if mixup is not None:
            even = images.shape[0] // 2 * 2  # Mixup pairs images: drop an odd one (after skipped images)
            images, labels = mixup(images[:even], labels[:even])
        return criterion(net(images), labels)

    amp = amp_dtype(cfg.amp, info.device)

    def on_epoch_end(epoch: int) -> Dict[str, float]:
        if val_dataset is None:
            return {}
        return evaluate(model, val_dataset, cfg.batch_size, info, cfg.num_workers, amp)

    metadata = {'format': 'greenmim', 'kind': 'classifier', 'model': cfg.model,
                'model_kwargs': json.dumps(dict(img_size=cfg.input_size, num_classes=num_classes, **cfg.model_kwargs)),
                'greenmim_version': greenmim.__version__}
    loop = LoopConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, accum_iter=cfg.accum_iter,
                      num_workers=cfg.num_workers, seed=cfg.seed, max_steps=cfg.max_steps, clip_grad=cfg.clip_grad,
                      save_every=cfg.save_every, keep_last=cfg.keep_last, log_every=cfg.log_every)
    output_dir = Path(cfg.output_dir)
    epoch_steps = steps_per_epoch(dataset, loop, info)
    scheduler = build_scheduler(optimizer, cfg.epochs * epoch_steps, round(cfg.warmup_epochs * epoch_steps), cfg.min_lr)
    trainer = Trainer(model=model, train_model=train_model, optimizer=optimizer, scheduler=scheduler, dataset=dataset,
                      loss_fn=loss_fn, config=loop, info=info, output_dir=output_dir, metadata=metadata,
                      run_config=asdict(cfg), amp_dtype=amp, on_epoch_end=on_epoch_end,
                      best_metric=('val_top1', 'max') if val_dataset is not None else ('train_loss', 'min'))
    if cfg.resume:
        trainer.load_state_dict(read_training_state(cfg.resume))
    if info.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / 'config.json').write_text(json.dumps(asdict(cfg), indent=1))
        print(f'{"linear probe" if cfg.linear_probe else "finetune"} {cfg.model} @ {cfg.input_size}px, '
              f'{num_classes} classes, {len(dataset)} training images'
              f'{f", {len(val_dataset)} validation images" if val_dataset is not None else ""}, '
              f'effective batch {effective_batch}, lr {lr:.3g}', flush=True)
    summary = trainer.fit()
    if info.is_main:
        last = summary.epoch_metrics[-1] if summary.epoch_metrics else {}
        print(f'done: steps {summary.steps}, wall time {summary.wall_time_s:.0f} s, '
              + (f'val top-1 {last["val_top1"]:.2f}% top-5 {last["val_top5"]:.2f}%, ' if 'val_top1' in last else '')
              + f'images skipped {summary.images_skipped}, last checkpoint {summary.last_checkpoint}, '
              f'best {summary.best_checkpoint}', flush=True)
    return summary


HELP = {
    'checkpoint': 'pre-trained weights: a MIM run/checkpoint folder or a .safetensors (MIM or exported encoder)',
    'data': 'labelled training data: ImageFolder-layout folder, Parquet, or Hugging Face dataset name',
    'val_data': 'labelled validation data, evaluated (top-1/top-5) every epoch',
    'data_format': f'one of {DATA_FORMATS}',
    'blr': 'base learning rate per 512 images (lr = blr x effective batch / 512)',
    'layer_decay': 'layer-wise lr decay (paper: 0.9 Swin-B, 0.8 Swin-L)',
    'linear_probe': 'train the classifier head only on frozen features',
    'model_kwargs': 'extra timm model kwargs, e.g. window_size=14',
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, FinetuneConfig, HELP)


def run(args: argparse.Namespace) -> int:
    finetune(config_from_args(FinetuneConfig, args))
    return 0
