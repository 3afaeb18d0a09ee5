"""Reconstruction grids: original / masked / reconstruction, one row per image, saved as PNG."""
from pathlib import Path
from typing import Sequence

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.utils import save_image

from greenmim.mim import patchify, unpatchify

__all__ = ['reconstruct', 'save_reconstruction_grid']


@torch.no_grad()
def reconstruct(model, images: torch.Tensor, mask: torch.Tensor):
    """``(masked, reconstruction)`` images ``[B, C, H, W]`` in the input's (normalised) space, for ``mask``
    ``[Hm, Wm]`` (the batch's) or ``[B, Hm, Wm]`` (each image's own).

    Masked units of ``masked`` are 0 (the dataset mean colour). ``reconstruction`` keeps the visible units and
    fills the masked ones with the prediction; with ``norm_pix_loss`` the prediction is per-unit normalised, so
    it is mapped back with the mean and std of the original unit (the target's statistics).
    """
    pred = model(images, mask=mask).pred.float()  # [B, L, u*u*C]
    target = patchify(images.float(), model.unit)
    if getattr(model, 'norm_pix_loss', False):
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        pred = pred * (var + 1e-6) ** .5 + mean
    visible = mask.to(images.device).flatten(-2)  # [L] for the batch, or [B, L] per image
    visible = visible.view(-1, visible.shape[-1], 1)
    masked = unpatchify(target * visible, model.unit, model.grid_size)
    recon = unpatchify(torch.where(visible, target, pred), model.unit, model.grid_size)
    return masked, recon


def save_reconstruction_grid(model, images: torch.Tensor, mask: torch.Tensor, path,
                             mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                             std: Sequence[float] = IMAGENET_DEFAULT_STD) -> Path:
    """Write a PNG with rows ``original | masked | reconstruction`` for normalised ``images [B, C, H, W]``."""
    was_training = model.training
    model.eval()
    masked, recon = reconstruct(model, images, mask)
    model.train(was_training)
    mean = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    rows = torch.stack([images.float(), masked, recon], 1).flatten(0, 1) * std + mean  # [B*3, C, H, W]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(rows.clamp(0, 1).cpu(), str(path), nrow=3, padding=2, pad_value=1.0)
    return path
