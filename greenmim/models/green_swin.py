"""Green Swin: timm's Swin Transformer with a visible-tokens-only forward for masked image modeling.

The architecture, parameter names and dense forward are timm's ``SwinTransformer`` unchanged, so fine-tuning and
inference are plain timm. :meth:`GreenSwinTransformer.forward_visible` runs the encoder on the visible tokens of a
batch-wise mask of 32x32-pixel units only: patch embedding of visible 4x4 patches, group window attention over
packed windows (see :mod:`greenmim.grouping`), and patch merging of all-visible 2x2 neighbourhoods.
"""
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.swin_transformer import SwinTransformer, checkpoint_filter_fn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torch.utils.checkpoint import checkpoint

from greenmim.grouping import AttentionLayout, StageLayout, StageSpec, build_visible_layout
from greenmim.kernels import group_window_attention
from greenmim.masking import check_mask
from greenmim.models.family import ModelFamily, register_family
from greenmim.models.manifest import pretrained_cfgs

__all__ = ['GreenSwinTransformer']


class GreenSwinTransformer(SwinTransformer):
    """timm ``SwinTransformer`` plus :meth:`forward_visible` (GreenMIM pre-training on visible tokens)."""

    @property
    def mask_unit_size(self) -> int:
        """Side in pixels of a mask unit: the encoder's largest stride (32 for Swin)."""
        return self.patch_embed.patch_size[0] << (len(self.layers) - 1)

    def stage_specs(self) -> List[StageSpec]:
        """Static per-stage description (grid, width, block windows) used to lay out visible tokens."""
        specs = []
        for stage in self.layers:
            windows = tuple(dict.fromkeys((tuple(b.window_size), tuple(b.shift_size)) for b in stage.blocks))
            specs.append(StageSpec(
                grid_size=tuple(stage.output_resolution),
                channels=stage.blocks[0].dim,
                windows=windows,
                merges_previous_stage=not isinstance(stage.downsample, nn.Identity),
            ))
        return specs

    def check_images(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``x`` is a float ``[B, C, H, W]`` batch of this model's size and channels."""
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            raise ValueError(f'images must be a [B, C, H, W] tensor, got {getattr(x, "shape", type(x))}')
        if not x.is_floating_point():
            raise ValueError(f'images must be a floating-point tensor, got {x.dtype}')
        _, c, h, w = x.shape
        unit = self.mask_unit_size
        if h % unit or w % unit:
            raise ValueError(f'image size {h}x{w} is not a multiple of the {unit}-pixel mask unit')
        if (h, w) != tuple(self.patch_embed.img_size):
            raise ValueError(
                f'image size {h}x{w} does not match the model ({self.patch_embed.img_size[0]}x'
                f'{self.patch_embed.img_size[1]}); create the model with img_size=({h}, {w})')
        if c != self.in_chans:
            raise ValueError(f'images have {c} channels, the model expects {self.in_chans}')

    def check_mask(self, mask: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``mask`` is a bool mask-unit grid of this model's image size with a visible
        unit, and every stage grid holds whole windows."""
        h, w = self.patch_embed.img_size
        check_mask(mask, (h // self.mask_unit_size, w // self.mask_unit_size))
        for spec in self.stage_specs():
            for (wh, ww), _ in spec.windows:
                if spec.grid_size[0] % wh or spec.grid_size[1] % ww:
                    raise ValueError(
                        f'stage grid {spec.grid_size} is not divisible by window {(wh, ww)}: '
                        'forward_visible needs whole windows (choose img_size or window_size accordingly)')

    def visible_layout(
            self,
            mask: torch.Tensor,
            batch_size: int,
            device: Optional[torch.device] = None,
            group_size: Optional[int] = None,
    ) -> List[StageLayout]:
        """Layout of the visible tokens of every stage for ``mask`` (computed once per step, shared by all blocks);
        raises ``ValueError`` for a mask that does not suit the model (:meth:`check_mask`)."""
        self.check_mask(mask)
        device = device if device is not None else self.patch_embed.proj.weight.device
        return build_visible_layout(mask, self.stage_specs(), batch_size, device, group_size)

    def check_layout(self, layout: Sequence[StageLayout], x: torch.Tensor, mask: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``layout`` is :meth:`visible_layout` of ``mask`` for this model, the batch
        size of ``x`` and its device (host-side checks; no device sync for a CPU mask)."""
        if len(layout) != len(self.layers):
            raise ValueError(f'layout has {len(layout)} stages, the model has {len(self.layers)}')
        first = layout[0]
        if first.batch_size != x.shape[0]:
            raise ValueError(f'layout was built for batch size {first.batch_size}, the images have {x.shape[0]}')
        if first.token_index.device != x.device:
            raise ValueError(f'layout is on {first.token_index.device}, the images on {x.device}')
        if not isinstance(mask, torch.Tensor) or mask.shape != first.mask.shape or not torch.equal(
                mask.detach().to('cpu', torch.bool), first.mask):
            raise ValueError('layout was built for another mask: pass the mask it was built from '
                             '(or layout=None to build it)')

    def _embed_visible(self, x: torch.Tensor, layout: StageLayout) -> torch.Tensor:
        """Patch embedding of the visible patches: ``[B, C, H, W] -> [B, N, E]``."""
        b, c, h, w = x.shape
        ph, pw = self.patch_embed.patch_size
        rh, rw = layout.grid_size
        patches = x.reshape(b, c, rh, ph, rw, pw).permute(0, 2, 4, 1, 3, 5)
        patches = patches[:, layout.token_index // rw, layout.token_index % rw].flatten(2)  # [B, N, C*ph*pw]
        proj = self.patch_embed.proj
        x = F.linear(patches, proj.weight.flatten(1), proj.bias)
        return self.patch_embed.norm(x)

    @staticmethod
    def _attention_visible(attn: nn.Module, x: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
        """timm ``WindowAttention`` on visible tokens ``[B, N, C]`` through the group layout."""
        b, n, _ = x.shape
        qkv = attn.qkv(x).view(b * n, 3, attn.num_heads, -1)
        out = group_window_attention(
            qkv, layout.index, layout.segment, layout.position,
            attn.relative_position_bias_table, layout.window_size, attn.scale)
        return attn.proj_drop(attn.proj(out.reshape(b, n, -1)))

    def _block_visible(self, block: nn.Module, x: torch.Tensor, layout: StageLayout) -> torch.Tensor:
        """timm ``SwinTransformerBlock`` on visible tokens ``[B, N, C]``."""
        attn_layout = layout.attention[(tuple(block.window_size), tuple(block.shift_size))]
        x = x + block.drop_path1(self._attention_visible(block.attn, block.norm1(x), attn_layout))
        return x + block.drop_path2(block.mlp(block.norm2(x)))

    def forward_visible(
            self,
            x: torch.Tensor,
            mask: torch.Tensor,
            layout: Optional[Sequence[StageLayout]] = None,
    ) -> List[torch.Tensor]:
        """Encode the visible tokens only.

        Args:
            x: images ``[B, C, H, W]``, ``H, W`` the model's image size (multiples of :attr:`mask_unit_size`).
            mask: bool ``[H / 32, W / 32]``, True = visible, shared by the batch.
            layout: :meth:`visible_layout` of ``mask`` for this batch size, if already computed (required under
                ``torch.compile``, which then traces the whole encoder without graph breaks).

        Returns:
            One tensor per stage, ``[B, N_s, C_s]``: the visible tokens in raster order (stage outputs, before the
            final norm), equal to the dense forward at those positions when window attention also masks out the
            keys of masked tokens.
        """
        if torch.compiler.is_compiling():  # checks and layout are host work: done before the compiled region
            if layout is None:
                raise ValueError('under torch.compile, pass layout=model.visible_layout(mask, batch_size)')
        else:
            self.check_images(x)  # the mask is checked where its layout is built
            if self.training and any(b.attn.attn_drop.p > 0 for s in self.layers for b in s.blocks):
                raise ValueError('forward_visible does not implement attention dropout; build with attn_drop_rate=0')
            if layout is None:
                layout = self.visible_layout(mask, x.shape[0], x.device)
            else:
                self.check_layout(layout, x, mask)
        outputs = []
        for stage, stage_layout in zip(self.layers, layout):
            if stage_layout.merge_index is None:
                x = self._embed_visible(x, stage_layout)
            else:
                merge = stage.downsample
                children = x.index_select(1, stage_layout.merge_index.flatten())  # [B, 4N, C], x00 x10 x01 x11
                x = merge.reduction(merge.norm(children.view(x.shape[0], -1, 4 * x.shape[-1])))
            for block in stage.blocks:
                if stage.grad_checkpointing and torch.is_grad_enabled():
                    x = checkpoint(self._block_visible, block, x, stage_layout, use_reentrant=False)
                else:
                    x = self._block_visible(block, x, stage_layout)
            outputs.append(x)
        return outputs


def _create_green_swin(variant: str, pretrained: bool = False, **kwargs) -> GreenSwinTransformer:
    default_out_indices = tuple(i for i, _ in enumerate(kwargs.get('depths', (1, 1, 3, 1))))
    out_indices = kwargs.pop('out_indices', default_out_indices)
    return build_model_with_cfg(
        GreenSwinTransformer, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
        **kwargs)


def _cfg(**kwargs):
    """timm pretrained cfg shared by every green Swin tag (the weights source comes from the release manifest)."""
    return {
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': .9, 'interpolation': 'bicubic', 'fixed_input_size': True,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj', 'classifier': 'head.fc',
        'license': 'apache-2.0', 'paper_ids': 'arXiv:2205.13515',
        'paper_name': 'Green Hierarchical Vision Transformer for Masked Image Modeling', **kwargs,
    }


def _describe(model: GreenSwinTransformer) -> str:
    widths = '/'.join(str(stage.blocks[0].dim) for stage in model.layers)
    depths = '/'.join(str(len(stage.blocks)) for stage in model.layers)
    return f'widths {widths}, depths {depths}, window {model.layers[0].blocks[0].window_size[0]}'


SWIN = register_family(ModelFamily(
    name='Swin Transformer', hub_tag='swin-transformer', model_class=GreenSwinTransformer,
    models=tuple(f'green_swin_{size}' for size in ('tiny', 'small', 'base', 'large')),
    original_to_timm=checkpoint_filter_fn, describe=_describe))

default_cfgs = generate_default_cfgs(pretrained_cfgs(SWIN.models, _cfg()))


@register_model
def green_swin_tiny(pretrained: bool = False, **kwargs) -> GreenSwinTransformer:
    """Green Swin-T @ 224 (timm ``swin_tiny_patch4_window7_224`` layout)."""
    args = dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
    return _create_green_swin('green_swin_tiny', pretrained=pretrained, **dict(args, **kwargs))


@register_model
def green_swin_small(pretrained: bool = False, **kwargs) -> GreenSwinTransformer:
    """Green Swin-S @ 224 (timm ``swin_small_patch4_window7_224`` layout)."""
    args = dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
    return _create_green_swin('green_swin_small', pretrained=pretrained, **dict(args, **kwargs))


@register_model
def green_swin_base(pretrained: bool = False, **kwargs) -> GreenSwinTransformer:
    """Green Swin-B @ 224 (timm ``swin_base_patch4_window7_224`` layout)."""
    args = dict(patch_size=4, window_size=7, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
    return _create_green_swin('green_swin_base', pretrained=pretrained, **dict(args, **kwargs))


@register_model
def green_swin_large(pretrained: bool = False, **kwargs) -> GreenSwinTransformer:
    """Green Swin-L @ 224 (timm ``swin_large_patch4_window7_224`` layout)."""
    args = dict(patch_size=4, window_size=7, embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48))
    return _create_green_swin('green_swin_large', pretrained=pretrained, **dict(args, **kwargs))
