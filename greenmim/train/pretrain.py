"""``greenmim pretrain``: masked-image-modeling pre-training of a green model (GreenMIM or the SimMIM baseline).

Python API::

    from greenmim.train import PretrainConfig, pretrain
    summary = pretrain(PretrainConfig(model='green_swin_tiny', epochs=10, batch_size=16, output_dir='runs/demo'))
"""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from timm.models import get_arch_name
from torch.utils.data import IterableDataset

from greenmim.checkpoint import weights_metadata
from greenmim.layout import layout_to
from greenmim.mim import MASK_MODES, GreenMIM, SimMIM
from greenmim.models.family import FAMILIES

from .config import amp_dtype, config_command, derived_seed
from .data import MaskCollate, build_dataset
from .engine import TrainSummary
from .reconstruction import save_reconstruction_grid
from .run import RunConfig, build_trainer, create_model, print_summary, run_session, subset
from .transforms import eval_transform, pretrain_transform

__all__ = ['PretrainConfig', 'pretrain', 'build_mim_model', 'add_arguments', 'run']

METHODS = {'greenmim': GreenMIM, 'simmim': SimMIM}


@dataclass
class PretrainConfig(RunConfig):
    """Pre-training settings; defaults follow the paper's recipe (AdamW, betas 0.9/0.95, weight decay 0.05,
    lr = blr x effective batch / 256, RandomResizedCrop 0.2-1 + flip, mask ratio 0.75)."""
    model: str = 'green_swin_base'
    method: str = 'greenmim'
    model_kwargs: Dict[str, Any] = field(default_factory=dict)  # extra timm kwargs, e.g. window_size, depths
    input_size: int = 224
    mask_ratio: float = 0.75
    mask_mode: str = 'batch'             # 'batch': one mask per micro-batch (the paper's); 'image': one per image
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
    epoch_size: Optional[int] = None     # a stream's size if it states none; else a random subset this large
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
    # run (and the fields of RunConfig)
    output_dir: str = 'runs/pretrain'
    save_every: int = 10                 # epochs between checkpoints (the last epoch, Ctrl-C and max_steps always save)
    vis_every: int = 1                   # epochs between reconstruction PNGs (0: never)
    vis_images: int = 4


def build_mim_model(config: PretrainConfig) -> torch.nn.Module:
    """The GreenMIM / SimMIM wrapper of ``config.model`` at ``config.input_size``; ``ValueError`` if the encoder is
    not a green model, or the image size does not suit it (mask units, windows) or the mask ratio."""
    if config.method not in METHODS:
        raise ValueError(f'--method must be one of {sorted(METHODS)}, got {config.method!r}')
    if config.mask_mode not in MASK_MODES:
        raise ValueError(f'--mask-mode must be one of {MASK_MODES}, got {config.mask_mode!r}')
    green = sorted(m for family in FAMILIES for m in family.models)
    if ':' not in config.model and get_arch_name(config.model) not in green:  # (local-dir:, hf-hub: checked built)
        raise ValueError(f'--model {config.model} is not a green model: pre-training needs one of {", ".join(green)}')
    encoder = create_model(config.model, num_classes=0, img_size=config.input_size, drop_path_rate=config.drop_path,
                           **config.model_kwargs)
    _check_encoder_fits(encoder, config)
    kwargs = {}
    if config.method == 'greenmim':
        kwargs.update(decoder_dim=config.decoder_dim, decoder_depth=config.decoder_depth,
                      norm_pix_loss=config.norm_pix_loss)
    return METHODS[config.method](encoder, mask_ratio=config.mask_ratio, mask_mode=config.mask_mode, **kwargs)


def _check_encoder_fits(encoder: torch.nn.Module, config: PretrainConfig) -> None:
    if not hasattr(encoder, 'forward_visible'):
        raise ValueError(f'--model {config.model} builds {type(encoder).__name__}, not a green model')
    unit = encoder.mask_unit_size
    if config.input_size % unit:
        raise ValueError(f'--input-size {config.input_size} is not a multiple of the {unit}-pixel mask unit of '
                         f'{config.model}')
    grid = config.input_size // unit
    encoder.check_mask(torch.ones(grid, grid, dtype=torch.bool))  # every stage grid must hold whole windows


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


def pretrain(config: PretrainConfig) -> TrainSummary:
    """Pre-train as configured; returns the run's :class:`~greenmim.train.engine.TrainSummary`.

    One step: a DataLoader worker collates a micro-batch and draws its masks and their layout
    (:class:`~greenmim.train.data.MaskCollate`, seeded by the batch's position); the loss function copies the
    layout to the device (one buffer) and the model (:meth:`greenmim.GreenMIM.forward`) encodes the visible
    tokens, decodes every unit and returns the loss on the masked ones; the shared
    :class:`~greenmim.train.engine.Trainer` does the rest. With ``--compile`` the layouts are static and the model
    step compiles once.

    Raises:
        ValueError: an unusable setting, model or output folder (before any data is read or file written), or
            data of which nothing could be trained.
        NonFiniteLossError: the loss became NaN/inf (the last checkpoint is left as it was).
    """
    with run_session(config) as process:
        return _pretrain(config, process)


def _pretrain(config: PretrainConfig, process) -> TrainSummary:
    model = build_mim_model(config).to(process.device)  # checks the sizes before any data is read
    dataset = build_dataset(
        config.data, pretrain_transform(config.input_size), data_format=config.data_format, split=config.split,
        streaming=config.streaming, image_column=config.image_column, min_size=config.min_image_size,
        seed=config.seed, epoch_size=config.epoch_size, rank=process.rank, world_size=process.world_size)
    dataset = subset(dataset, config.epoch_size, config.seed)
    collate = MaskCollate(
        model.encoder.layout_specs, config.mask_ratio, per_image=config.mask_mode == 'image',
        seed=derived_seed(config.seed, process.rank, 3), layout=config.method == 'greenmim', static=config.compile,
        group_size=getattr(model, 'group_size', None))

    def loss_fn(net, images, labels, packed=None, mask=None):
        if packed is not None:
            return net(images, layout=layout_to(packed, images.device)).loss
        return net(images, mask=mask.to(images.device, non_blocking=True)).loss

    preview = (_preview_batch(dataset, config.vis_images, config.input_size)
               if process.is_main and config.vis_every else None)
    preview_mask = (model.sample_mask(torch.Generator().manual_seed(config.seed), len(preview))
                    if preview is not None else None)
    amp = amp_dtype(config.amp, process.device)

    def on_epoch_end(epoch: int) -> Dict[str, Any]:  # also at a --max-steps stop, which always gets its PNG
        last = epoch + 1 == config.epochs or (config.max_steps is not None and trainer.step >= config.max_steps)
        if preview is None or ((epoch + 1) % config.vis_every and not last):
            return {}
        path = Path(config.output_dir) / 'reconstructions' / f'epoch-{epoch + 1:04d}.png'
        with torch.autocast(process.device.type, dtype=amp, enabled=amp is not None):
            save_reconstruction_grid(model, preview.to(process.device), preview_mask, path)
        return {}

    num_images = len(dataset) * (process.world_size if isinstance(dataset, IterableDataset) else 1)
    metadata = weights_metadata('mim', config.model, dict(img_size=config.input_size, **config.model_kwargs),
                                wrapper=model, method=config.method)
    trainer = build_trainer(
        config, process, model, dataset, loss_fn, metadata=metadata, lr_batch=256, on_epoch_end=on_epoch_end,
        collate_at=collate.at,
        description=f'pretrain {config.method} {config.model} @ {config.input_size}px on '
                    f'{config.data or "the embedded sample photos"} ({num_images} images, {dataset.num_ignored} '
                    'non-image files ignored)')
    if process.is_main and config.resume and 'mask' in trainer.rng_after_step:
        print(f'note: {config.resume} was written by a version that drew batch-wise masks in the training process; '
              'from here on the data loader draws them, seeded by position, so the losses differ from those that '
              'version would have logged (the weights, optimizer state and data position continue exactly)',
              flush=True)
    summary = trainer.fit()
    if process.is_main:
        pngs = sorted((Path(config.output_dir) / 'reconstructions').glob('*.png'))
        print_summary(summary, Path(config.output_dir), extra=[f'  reconstructions: {pngs[-1]}'] if pngs else [])
    return summary


HELP = {
    'method': 'greenmim (visible tokens only) or simmim (dense baseline)',
    'mask_ratio': 'fraction of the 32x32 mask units masked, in (0, 1)',
    'norm_pix_loss': 'GreenMIM: predict per-unit normalised pixels',
    'decoder_dim': 'GreenMIM decoder width',
    'decoder_depth': 'GreenMIM decoder blocks',
    'streaming': 'stream a Hugging Face dataset instead of downloading it first',
    'vis_images': 'images in each reconstruction PNG',
    'data': 'image folder, Parquet file/folder, or Hugging Face dataset name; default: the embedded photos',
    'blr': 'base learning rate per 256 images (lr = blr x effective batch / 256)',
    'vis_every': 'epochs between reconstruction PNGs (0: never; the last epoch and a --max-steps stop get one)',
    'mask_mode': 'batch (one mask per micro-batch, the paper\'s) or image (one mask per image)',
}

add_arguments, run = config_command(PretrainConfig, pretrain, HELP, {'method': tuple(METHODS), 'mask_mode': MASK_MODES})
