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
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from timm.data import Mixup
from timm.data.mixup import mixup_target
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import accuracy
from torch.utils.data import DataLoader, DistributedSampler

from greenmim.checkpoint import (
    check_written_for, is_mim_state_dict, load_verified, read_checkpoint, split_mim_state_dict, weights_metadata)

from .config import amp_dtype, config_command
from .data import build_dataset, collate_images
from .distributed import DistributedProcess, all_reduce_sum
from .engine import TrainSummary
from .run import RunConfig, build_trainer, create_model, print_summary, run_session, subset
from .run_checkpoints import resolve_checkpoint
from .transforms import eval_transform, finetune_transform

__all__ = ['FinetuneConfig', 'finetune', 'load_pretrained_encoder', 'evaluate', 'add_arguments', 'run']


@dataclass
class FinetuneConfig(RunConfig):
    """Fine-tuning settings (defaults: the authors' Swin-B recipe; ``layer_decay`` 0.8 for Swin-L)."""
    model: str = 'green_swin_base'
    model_kwargs: Dict[str, Any] = field(default_factory=dict)  # added to (and overriding) the checkpoint's
    input_size: Optional[int] = None      # None: the checkpoint's (224 without one)
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
    epoch_size: Optional[int] = None      # train on a random subset of this many images (drawn once from seed)
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
    # run (and the fields of RunConfig)
    output_dir: str = 'runs/finetune'
    save_every: int = 1


def load_pretrained_encoder(model: torch.nn.Module, path, model_name: str) -> Dict[str, str]:
    """Load a GreenMIM/SimMIM checkpoint's encoder, an exported encoder or a classifier into ``model`` (a timm
    classifier of ``model_name``). The head is kept from ``model`` when absent or of another size. Returns the
    checkpoint's metadata; raises ``ValueError`` when the weights belong to another architecture."""
    weights, metadata = _read_pretrained(path, model_name)
    _load_encoder(model, weights, model_name, path)
    return metadata


def _read_pretrained(path, model_name: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    weights, metadata = read_checkpoint(resolve_checkpoint(path))
    check_written_for(metadata, model_name, path)
    return weights, metadata


def _load_encoder(model: torch.nn.Module, weights: Dict[str, torch.Tensor], model_name: str, path) -> None:
    if is_mim_state_dict(weights):
        weights = split_mim_state_dict(weights)[0]
    own = model.state_dict()
    weights = {k: v for k, v in weights.items()
               if not (k.startswith('head.') and (k not in own or own[k].shape != v.shape))}
    load_verified(model, weights, model_name, source=path, optional=('head.',))


def _architecture(config: 'FinetuneConfig', metadata: Dict[str, str]) -> Tuple[int, Dict[str, Any]]:
    """``(input size, model kwargs)``: the checkpoint's, overridden by those given in ``config``."""
    written = json.loads(metadata.get('model_kwargs', '{}'))
    written_size = written.pop('img_size', None)
    written.pop('num_classes', None)
    return config.input_size or written_size or 224, {**written, **config.model_kwargs}


def _describe_checkpoint(path, metadata: Dict[str, str], input_size: int, model_kwargs: Dict[str, Any]) -> str:
    source = resolve_checkpoint(path)
    step = re.fullmatch(r'step-0*(\d+)', source.parent.name)
    kwargs = ', '.join(f'{k}={v}' for k, v in model_kwargs.items())
    return (f'loaded {source}' + (f' (step {step.group(1)})' if step else '')
            + f': {metadata.get("kind", "weights")} of {metadata.get("model", "an unnamed model")} @ {input_size}px'
            + (f', {kwargs}' if kwargs else ''))


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset, batch_size: int, process: DistributedProcess, num_workers: int = 2,
             amp: Optional[torch.dtype] = None) -> Dict[str, float]:
    """Top-1 / top-5 accuracy (%) and loss over ``dataset``, sharded over ranks (readable images only)."""
    model.eval()
    sampler = (DistributedSampler(dataset, process.world_size, process.rank, shuffle=False) if process.distributed
               else None)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        collate_fn=collate_images)
    totals = torch.zeros(4, dtype=torch.float64)  # correct@1, correct@5, loss sum, count
    for batch in loader:
        if batch.images is None:
            continue
        images, labels = batch.images.to(process.device), batch.labels.to(process.device)
        with torch.autocast(process.device.type, dtype=amp, enabled=amp is not None):
            logits = model(images).float()
        top1, top5 = accuracy(logits, labels, topk=(1, min(5, logits.shape[1])))
        n = labels.shape[0]
        totals += torch.tensor([top1.item() * n / 100, top5.item() * n / 100,
                                torch.nn.functional.cross_entropy(logits, labels, reduction='sum').item(), n],
                               dtype=torch.float64)
    totals = all_reduce_sum(totals.to(process.device), process).cpu()
    count = max(totals[3].item(), 1)
    return {'val_top1': 100 * totals[0].item() / count, 'val_top5': 100 * totals[1].item() / count,
            'val_loss': totals[2].item() / count}


def finetune(config: FinetuneConfig) -> TrainSummary:
    """Fine-tune as configured; returns the :class:`~greenmim.train.engine.TrainSummary` (epoch metrics hold
    ``val_top1`` / ``val_top5`` when ``val_data`` is given)."""
    if config.data is None:
        raise ValueError('finetune needs labelled data (--data): an ImageFolder-layout folder, Parquet or a '
                         'Hugging Face dataset with a label column')
    with run_session(config) as process:
        return _finetune(config, process)


def _finetune(config: FinetuneConfig, process) -> TrainSummary:
    weights, metadata = _read_pretrained(config.checkpoint, config.model) if config.checkpoint else ({}, {})
    input_size, model_kwargs = _architecture(config, metadata)
    common = dict(with_labels=True, data_format=config.data_format, image_column=config.image_column,
                  label_column=config.label_column, min_size=config.min_image_size, seed=config.seed)
    train_tf = (finetune_transform(input_size, None, 0.0) if config.linear_probe
                else finetune_transform(input_size, config.auto_augment, config.reprob))
    dataset = build_dataset(config.data, train_tf, split=config.split, rank=process.rank,
                            world_size=process.world_size, **common)
    dataset = subset(dataset, config.epoch_size, config.seed)
    val_dataset = (build_dataset(config.val_data, eval_transform(input_size), split=config.val_split, **common)
                   if config.val_data else None)
    num_classes = config.num_classes or dataset.num_classes
    if not num_classes:
        raise ValueError('could not tell the number of classes from the data: pass --num-classes')
    if num_classes < 2:
        raise ValueError(f'{config.data} has {num_classes} class: a classifier needs at least 2')
    model = create_model(config.model, num_classes=num_classes, img_size=input_size,
                         drop_path_rate=0.0 if config.linear_probe else config.drop_path, **model_kwargs)
    if config.checkpoint:
        _load_encoder(model, weights, config.model, config.checkpoint)
        if process.is_main:
            print(_describe_checkpoint(config.checkpoint, metadata, input_size, model_kwargs), flush=True)
    elif process.is_main:
        print('warning: no checkpoint given, fine-tuning from random initialisation', flush=True)
    if config.linear_probe:
        head = set(id(p) for p in model.get_classifier().parameters())
        for p in model.parameters():
            p.requires_grad_(id(p) in head)
    model.to(process.device)

    mixup = (Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, label_smoothing=config.smoothing,
                   num_classes=num_classes) if config.mixup > 0 or config.cutmix > 0 else None)
    criterion = (SoftTargetCrossEntropy() if mixup else
                 LabelSmoothingCrossEntropy(config.smoothing) if config.smoothing > 0 else torch.nn.CrossEntropyLoss())

    if mixup is not None and config.batch_size == 1 and process.is_main:
        print('warning: --batch-size 1: Mixup/CutMix need two images per micro-batch, so no image is mixed (each '
              'is trained on its label-smoothed target)', flush=True)

    def loss_fn(net, images, labels):
        if mixup is not None and images.shape[0] == 1:  # no pair to mix (batch size 1, or the others unreadable)
            labels = mixup_target(labels, num_classes, smoothing=config.smoothing)
        elif mixup is not None:
            even = images.shape[0] // 2 * 2  # Mixup pairs images: drop an odd one (after skipped images)
            images, labels = mixup(images[:even], labels[:even])
        return criterion(net(images), labels)

    amp = amp_dtype(config.amp, process.device)

    def on_epoch_end(epoch: int) -> Dict[str, float]:
        if val_dataset is None:
            return {}
        return evaluate(model, val_dataset, config.batch_size, process, config.num_workers, amp)

    metadata = weights_metadata('classifier', config.model, dict(img_size=input_size, num_classes=num_classes,
                                                                 **model_kwargs))
    trainer = build_trainer(
        config, process, model, dataset, loss_fn, metadata=metadata, lr_batch=512,
        layer_decay=None if config.linear_probe else config.layer_decay, on_epoch_end=on_epoch_end,
        best_metric=('val_top1', 'max') if val_dataset is not None else ('train_loss', 'min'),
        description=f'{"linear probe" if config.linear_probe else "finetune"} {config.model} @ {input_size}px, '
                    f'{num_classes} classes, {len(dataset)} training images'
                    + (f', {len(val_dataset)} validation images' if val_dataset is not None else ''))
    summary = trainer.fit()
    if process.is_main:
        print_summary(summary, Path(config.output_dir), metrics=('val_top1', 'val_top5', 'val_loss'))
    return summary


HELP = {
    'checkpoint': 'pre-trained weights: a MIM run/checkpoint folder or a .safetensors (MIM or exported encoder)',
    'data': 'labelled training data: ImageFolder-layout folder, Parquet, or Hugging Face dataset name',
    'val_data': 'labelled validation data, evaluated (top-1/top-5) every epoch',
    'blr': 'base learning rate per 512 images (lr = blr x effective batch / 512)',
    'layer_decay': 'layer-wise lr decay (paper: 0.9 Swin-B, 0.8 Swin-L)',
    'linear_probe': 'train the classifier head only on frozen features',
    'model_kwargs': 'extra timm model kwargs, added to (and overriding) those the checkpoint was trained with',
    'input_size': 'image side in pixels (default: the checkpoint\'s, 224 without one)',
    'val_split': 'split of --val-data',
    'label_column': 'label column of a Hugging Face dataset (default: found automatically)',
    'num_classes': 'classes of the classifier (default: from the data)',
    'epoch_size': 'train on a random subset of this many images (drawn once from --seed); default: all',
    'mixup': 'Mixup alpha (0: off)',
    'cutmix': 'CutMix alpha (0: off)',
    'smoothing': 'label smoothing, in [0, 1)',
    'auto_augment': 'timm RandAugment policy',
    'reprob': 'random erasing probability',
}

add_arguments, run = config_command(FinetuneConfig, finetune, HELP)
