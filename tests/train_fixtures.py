"""Shared helpers for the training tests: tiny model settings, small image folders built from the embedded
photos, and the DDP worker (importable, so ``torch.multiprocessing.spawn`` can start it)."""
import os
import shutil
from pathlib import Path

import torch
from PIL import Image

from greenmim.data import IMAGES_DIR

TINY_MODEL = dict(model='green_swin_tiny', input_size=64, decoder_dim=32,
                  model_kwargs=dict(embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=2))


def tiny_pretrain_config(output_dir, **overrides):
    from greenmim.train import PretrainConfig
    values = dict(TINY_MODEL, batch_size=4, epochs=1, warmup_epochs=0, lr=1e-3, num_workers=0, vis_every=0,
                  output_dir=str(output_dir))
    values.update(overrides)
    return PretrainConfig(**values)


def copy_photos(folder, count: int, prefix: str = '') -> Path:
    """The first ``count`` embedded photos (sorted) copied into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for src in sorted(IMAGES_DIR.glob(f'{prefix}*.jpg'))[:count]:
        shutil.copy(src, folder / src.name)
    return folder


def make_two_class_folder(root, per_class: int, seed: int) -> Path:
    """ImageFolder layout ``root/{space,coffee}/*.png``: random 96-px crops of the Hubble deep field photos
    (class ``space``) and of the coffee-cup photos (class ``coffee``)."""
    g = torch.Generator().manual_seed(seed)
    for cls, prefix in (('space', 'hubble_deep_field'), ('coffee', 'coffee')):
        sources = [Image.open(p).convert('RGB') for p in sorted(IMAGES_DIR.glob(f'{prefix}_*.jpg'))]
        (Path(root) / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = sources[i % len(sources)]
            x = int(torch.randint(0, img.width - 96, (1,), generator=g))
            y = int(torch.randint(0, img.height - 96, (1,), generator=g))
            img.crop((x, y, x + 96, y + 96)).save(Path(root) / cls / f'{i:03d}.png')
    return Path(root)


def ddp_worker(rank: int, world_size: int, port: int, config, out_dir: str) -> None:
    """One rank of a gloo DDP pre-training run (torchrun's environment set by hand); records the masks it drew
    and a checksum of its final weights in ``out_dir/rank<r>.pt``."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR='127.0.0.1',
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from greenmim.train import pretrain
    from greenmim.train.data import MaskCollate
    masks = []
    original = MaskCollate.masks

    def recording_masks(self, batch_size, generator):
        mask = original(self, batch_size, generator)
        masks.append(mask.clone())
        return mask

    MaskCollate.masks = recording_masks
    from greenmim.train.engine import Trainer
    finish, weights = Trainer._finish, {}

    def recording_finish(self, *args):
        weights.update({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        return finish(self, *args)

    Trainer._finish = recording_finish
    try:
        summary = pretrain(config)
        torch.save({'masks': masks, 'losses': summary.losses, 'weights': weights}, Path(out_dir) / f'rank{rank}.pt')
    finally:
        torch.distributed.destroy_process_group()


def cli_kwargs(kwargs) -> list:
    """``--model-kwargs KEY=VALUE ...`` for ``kwargs``, e.g. ``depths=(1,1,1,1)``."""
    return ['--model-kwargs', *(f'{k}={v}'.replace(' ', '') for k, v in kwargs.items())]
