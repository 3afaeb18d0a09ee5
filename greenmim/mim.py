"""Masked-image-modeling wrappers: GreenMIM (visible tokens only) and the SimMIM baseline (dense, mask token).

Both take images ``[B, C, H, W]`` and return :class:`MIMOutput` with ``pred`` as per-unit pixels ``[B, L, u*u*C]``
(``L`` mask units of ``u x u`` pixels, raster order; pixel layout ``(row, col, channel)`` inside a unit).
"""
import json
from typing import Dict, NamedTuple, Optional, Tuple, Union

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from greenmim.checkpoint import wrapper_metadata
from greenmim.layout import VisibleLayout
from greenmim.masking import num_visible, random_mask, upsample_mask

__all__ = ['MIMOutput', 'GreenMIM', 'SimMIM', 'patchify', 'unpatchify', 'mim_from_metadata', 'decoder_pos_embed',
           'MASK_MODES']

MASK_MODES = ('batch', 'image')  # one mask for the batch (the paper's), or one per image


class MIMOutput(NamedTuple):
    """``loss``: scalar; ``pred``: ``[B, L, u*u*C]`` predicted pixels per unit; ``mask``: the bool mask used,
    ``[Hm, Wm]`` (batch-wise) or ``[B, Hm, Wm]`` (per image; always with a static layout), on the images' device."""
    loss: torch.Tensor
    pred: torch.Tensor
    mask: torch.Tensor


def patchify(images: torch.Tensor, unit: int) -> torch.Tensor:
    """``[B, C, H, W] -> [B, (H/u)*(W/u), u*u*C]``."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // unit, unit, w // unit, unit)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // unit) * (w // unit), unit * unit * c)


def unpatchify(units: torch.Tensor, unit: int, grid_size) -> torch.Tensor:
    """``[B, L, u*u*C] -> [B, C, H, W]``, the inverse of :func:`patchify`."""
    b, _, d = units.shape
    hm, wm = grid_size
    c = d // (unit * unit)
    x = units.reshape(b, hm, wm, unit, unit, c)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, c, hm * unit, wm * unit)


def decoder_pos_embed(grid_size: Tuple[int, int], dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding ``[Hm * Wm, dim]`` (raster order) of the MAE-style decoder.

    Channels in MAE's order (the one the authors' GreenMIM decoders were trained with): ``[sin(col w), cos(col w),
    sin(row w), cos(row w)]``, each ``dim / 4`` wide, with frequencies ``w_k = 10000 ** (-k / (dim / 4))``;
    computed in float64 and returned as float32.
    """
    if dim % 4:
        raise ValueError(f'decoder width {dim} must be a multiple of 4 for the sin-cos position embedding')
    quarter = dim // 4
    freqs = 10000.0 ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid_size[0]), torch.arange(grid_size[1]), indexing='ij')
    parts = []
    for coord in (cols, rows):
        angles = coord.flatten().double()[:, None] * freqs
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, 1).float()


def _create_encoder(encoder: Union[str, nn.Module], **kwargs) -> nn.Module:
    if isinstance(encoder, str):
        encoder = timm.create_model(encoder, num_classes=0, **kwargs)
    elif kwargs:
        raise ValueError(f'encoder kwargs {sorted(kwargs)} given with a model instance')
    if not hasattr(encoder, 'forward_visible'):
        raise ValueError(f'{type(encoder).__name__} has no forward_visible: use a green_* model')
    return encoder


class _MIMBase(nn.Module):
    """Encoder, mask grid, mask sampling and the call shared by GreenMIM and SimMIM (which implement
    :meth:`forward_masked`)."""

    def __init__(self, encoder, mask_ratio: float, mask_mode: str = 'batch', **encoder_kwargs):
        super().__init__()
        if mask_mode not in MASK_MODES:
            raise ValueError(f'mask_mode must be one of {MASK_MODES}, got {mask_mode!r}')
        self.encoder = _create_encoder(encoder, **encoder_kwargs)
        self.mask_ratio = mask_ratio
        self.mask_mode = mask_mode
        self.unit = self.encoder.mask_unit_size
        self.grid_size = self.encoder.mask_grid_size
        units = self.grid_size[0] * self.grid_size[1]
        if num_visible(units, mask_ratio) == units:
            fix = (f'use a ratio above 1/(2*{units}) = {1 / (2 * units):.3g}' if units > 1 else
                   'a single unit is always kept visible: use larger images')
            raise ValueError(
                f'mask_ratio {mask_ratio} masks no unit of the {self.grid_size[0]}x{self.grid_size[1]} mask grid '
                f'(all {units} stay visible), so there is nothing to reconstruct: {fix}')

    def sample_mask(self, generator: Optional[torch.Generator] = None, batch_size: Optional[int] = None
                    ) -> torch.Tensor:
        """A random bool mask (True = visible) on the CPU: ``[Hm, Wm]``, or with ``mask_mode='image'`` one per
        image, ``[batch_size, Hm, Wm]``."""
        per_image = self.mask_mode == 'image'
        if per_image and batch_size is None:
            raise ValueError("mask_mode='image' draws one mask per image: pass batch_size")
        return random_mask(self.grid_size, self.mask_ratio, generator, batch_size if per_image else None)

    def wrapper_kwargs(self) -> dict:
        """Keyword arguments that rebuild this wrapper (decoder included) around the same encoder."""
        return {'mask_ratio': self.mask_ratio, 'mask_mode': self.mask_mode}

    def no_weight_decay(self):
        return {f'encoder.{n}' for n in self.encoder.no_weight_decay()} | {'mask_token'}

    def forward(
            self,
            images: torch.Tensor,
            mask: Optional[torch.Tensor] = None,
            generator: Optional[torch.Generator] = None,
            layout: Optional[VisibleLayout] = None,
    ) -> MIMOutput:
        """Images ``[B, C, H, W]`` -> :class:`MIMOutput`. ``mask`` (bool ``[Hm, Wm]`` for the batch or ``[B, Hm, Wm]``
        per image, True = visible) is sampled from ``generator`` (:meth:`sample_mask`) when neither it nor a layout
        is given. GreenMIM takes the encoder's ``layout`` of the mask instead if already built (e.g. in DataLoader
        workers by :class:`greenmim.train.data.LayoutCollate`); a layout holds its mask, so ``mask`` may then be
        left out (and is not read under ``torch.compile``: :meth:`~greenmim.models.visible.VisibleEncoderMixin.
        resolve_layout`). Masks are checked where their layout is built, and in eager mode against it."""
        if layout is None:
            if mask is None:
                mask = self.sample_mask(generator, images.shape[0])
            if not torch.compiler.is_compiling():
                self.encoder.check_images(images)
                if (isinstance(mask, torch.Tensor) and mask.dtype == torch.bool
                        and tuple(mask.shape[-2:]) == self.grid_size and bool(mask.flatten(-2).all(-1).any())):
                    raise ValueError('mask has no masked unit (all True = visible): MIM needs at least one unit to '
                                     'reconstruct')
                self.encoder.check_mask(mask, images.shape[0])
        return self.forward_masked(images, mask, layout)

    def forward_masked(self, images: torch.Tensor, mask: Optional[torch.Tensor], layout=None) -> MIMOutput:
        """:meth:`forward` with a given mask (checked) or layout (GreenMIM)."""
        raise NotImplementedError


class GreenMIM(_MIMBase):
    """GreenMIM: green encoder on visible tokens + MAE-style decoder predicting the masked units' pixels.

    Args:
        encoder: a green model name (``num_classes=0`` is set) or instance with ``forward_visible``.
        mask_ratio: fraction of mask units hidden (see :func:`greenmim.masking.num_visible` for the rounding).
        decoder_dim, decoder_depth, decoder_heads: the decoder transformer (defaults 512, 1, 16).
        norm_pix_loss: regress per-unit normalised pixels (mean 0, variance 1 per unit and image).
        group_size: fixed attention group size ``g_s`` instead of the Optimal Grouping sweep.
        mask_mode: what :meth:`sample_mask` draws: ``'batch'`` (one mask for the batch, the paper's) or ``'image'``
            (one per image, the same number of visible units each).
        **encoder_kwargs: passed to ``timm.create_model`` when ``encoder`` is a name.
    """

    def __init__(
            self,
            encoder: Union[str, nn.Module] = 'green_swin_base',
            mask_ratio: float = 0.75,
            decoder_dim: int = 512,
            decoder_depth: int = 1,
            decoder_heads: int = 16,
            norm_pix_loss: bool = True,
            group_size: Optional[int] = None,
            mask_mode: str = 'batch',
            **encoder_kwargs,
    ):
        super().__init__(encoder, mask_ratio, mask_mode, **encoder_kwargs)
        self.norm_pix_loss = norm_pix_loss
        self.group_size = group_size
        self.decoder_heads = decoder_heads
        self.decoder_embed = nn.Linear(self.encoder.num_features, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer(
            'decoder_pos_embed', decoder_pos_embed(self.grid_size, decoder_dim)[None], persistent=False)
        self.decoder_blocks = nn.Sequential(*[
            Block(decoder_dim, decoder_heads, mlp_ratio=4., qkv_bias=True) for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.unit * self.unit * self.encoder.in_chans)
        nn.init.normal_(self.mask_token, std=.02)

    def wrapper_kwargs(self) -> dict:
        return dict(super().wrapper_kwargs(), decoder_dim=self.decoder_embed.out_features,
                    decoder_depth=len(self.decoder_blocks), decoder_heads=self.decoder_heads,
                    norm_pix_loss=self.norm_pix_loss, group_size=self.group_size)

    def forward_decoder(self, latent: torch.Tensor, visible_units: torch.Tensor) -> torch.Tensor:
        """Final-stage tokens ``[B, n, C]`` at units ``visible_units`` (``[n]`` for the batch, or ``[B, n]``) ->
        pixels of every unit ``[B, L, u*u*C]``."""
        x = self.decoder_embed(latent)
        b, n, d = x.shape
        tokens = self.mask_token.to(x.dtype).expand(b, self.decoder_pos_embed.shape[1], d)
        x = tokens.scatter(1, visible_units.expand(b, n)[..., None].expand(b, n, d), x)
        x = x + self.decoder_pos_embed.to(x.dtype)
        x = self.decoder_blocks(x)
        return self.decoder_pred(self.decoder_norm(x))

    def loss(self, images: torch.Tensor, pred: torch.Tensor, masked_units: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the masked units' (normalised) pixels; ``masked_units`` ``[m]`` for the batch or
        ``[B, m]`` per image."""
        target = patchify(images, self.unit)
        index = masked_units.expand(target.shape[0], -1)[..., None].expand(-1, -1, target.shape[-1])
        target = target.gather(1, index).float()
        if self.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** .5
        return F.mse_loss(pred.gather(1, index).float(), target)

    def forward_masked(self, images: torch.Tensor, mask: Optional[torch.Tensor],
                       layout: Optional[VisibleLayout] = None) -> MIMOutput:
        """Encoder on the visible tokens -> decoder on every unit -> loss on the masked units, laid out by
        ``layout`` (the encoder's :meth:`visible_layout` of ``mask``; built here if not given)."""
        if layout is None:
            if torch.compiler.is_compiling():
                raise ValueError('under torch.compile, pass layout=model.encoder.visible_layout(mask, batch_size, '
                                 'static=True)')
            layout, mask = self.encoder.visible_layout(mask, images.shape[0], images.device, self.group_size), None
        if layout.masked_units.shape[-1] == 0:  # a static shape: free under torch.compile
            raise ValueError('mask has no masked unit (all True = visible): MIM needs at least one unit to '
                             'reconstruct')
        latent = self.encoder.norm(self.encoder.forward_visible(images, mask, layout)[-1])
        pred = self.forward_decoder(latent, layout[-1].token_index)
        return MIMOutput(self.loss(images, pred, layout.masked_units), pred, layout.mask)


class SimMIM(_MIMBase):
    """SimMIM baseline: the dense encoder on all tokens with a learned mask token, a linear (1x1 conv + pixel
    shuffle) decoder, and L1 loss on masked pixels. Same call and output as :class:`GreenMIM`."""

    def __init__(self, encoder: Union[str, nn.Module] = 'green_swin_base', mask_ratio: float = 0.75,
                 mask_mode: str = 'batch', **encoder_kwargs):
        super().__init__(encoder, mask_ratio, mask_mode, **encoder_kwargs)
        embed_dim = self.encoder.layout_specs[0].channels
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, embed_dim))
        self.decoder = nn.Conv2d(self.encoder.num_features, self.unit ** 2 * self.encoder.in_chans, kernel_size=1)
        nn.init.trunc_normal_(self.mask_token, std=.02)

    def forward_masked(self, images: torch.Tensor, mask: torch.Tensor, layout=None) -> MIMOutput:
        """Dense encoder with the mask token at masked tokens -> 1x1-conv decoder -> L1 on the masked pixels."""
        if layout is not None:
            raise ValueError('SimMIM runs the dense encoder on every token: it takes no layout (pass layout=None)')
        mask = mask.to(images.device)
        x = self.encoder.forward_masked_dense(images, mask, self.mask_token.view(-1))
        recon = F.pixel_shuffle(self.decoder(x), self.unit)  # [B, C, H, W]
        hidden = upsample_mask(~mask, self.unit)
        hidden = hidden.view(-1, 1, *hidden.shape[-2:])  # [1 or B, 1, H, W]
        l1 = (recon.float() - images.float()).abs() * hidden
        loss = l1.sum() / hidden.expand_as(images).sum()
        return MIMOutput(loss, patchify(recon, self.unit), mask)


def mim_from_metadata(encoder: nn.Module, metadata: Dict[str, str]) -> nn.Module:
    """The :class:`GreenMIM` / :class:`SimMIM` a checkpoint's metadata describes (``mim_class``, ``mim_kwargs``; see
    :mod:`greenmim.checkpoint`), around ``encoder``."""
    wrapper = wrapper_metadata(metadata)
    cls = {'GreenMIM': GreenMIM, 'SimMIM': SimMIM}.get(wrapper.get('mim_class'))
    if cls is None:
        raise ValueError(f'metadata "mim_class" is {wrapper.get("mim_class")!r}, not GreenMIM or SimMIM')
    return cls(encoder, **json.loads(wrapper.get('mim_kwargs', '{}')))
