"""Green Swin: timm's Swin Transformer with a visible-tokens-only forward for masked image modeling.

The architecture, parameter names and dense forward are timm's ``SwinTransformer`` unchanged, so fine-tuning and
inference are plain timm. :meth:`GreenSwinTransformer.forward_visible` runs the encoder on the visible tokens of a
batch-wise or per-image mask of 32x32-pixel units only: patch embedding of visible 4x4 patches, group window
attention over packed windows (see :mod:`greenmim.layout`), and patch merging of all-visible 2x2 neighbourhoods.
"""
import math
from typing import List

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.swin_transformer import SwinTransformer, checkpoint_filter_fn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torch.utils.checkpoint import checkpoint

from greenmim.checkpoint import check_patch_not_resampled
from greenmim.kernels import AttentionLayout, group_window_attention
from greenmim.layout import StageLayout, StageSpec
from greenmim.masking import upsample_mask
from greenmim.models.family import ModelFamily, register_family
from greenmim.models.manifest import pretrained_cfgs, require_weights_source
from greenmim.models.visible import VisibleEncoderMixin

__all__ = ['GreenSwinTransformer', 'SwinVisibleMixin', 'create_swin_like', 'swin_cfg']


class SwinVisibleMixin(VisibleEncoderMixin):
    """What Swin V1 and V2 share on visible tokens: timm's ``patch_embed``, ``layers`` of stages (``downsample``,
    ``blocks`` with ``window_size`` / ``shift_size``, ``grad_checkpointing``) and ``norm``. A Swin-like family says
    how its patch merging (:meth:`_merge_visible`) and its blocks (:meth:`_block_visible`) run on visible tokens."""

    def first_patch_embed(self) -> nn.Module:
        return self.patch_embed

    def set_input_size(self, *args, **kwargs) -> None:
        """timm's ``set_input_size`` (new image or window size); the stage specs are rebuilt on next use."""
        super().set_input_size(*args, **kwargs)
        self._forget_layout_specs()

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
                children_order='columns',  # PatchMerging concatenates x00, x10, x01, x11
            ))
        return specs

    def _block_visible(self, block: nn.Module, x: torch.Tensor, layout: StageLayout) -> torch.Tensor:
        """One block of a stage on its visible tokens ``[B, N, C]``."""
        raise NotImplementedError

    def _stage_visible(self, stage: int, x: torch.Tensor, layout: StageLayout) -> torch.Tensor:
        layer = self.layers[stage]
        for block in layer.blocks:
            if layer.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(self._block_visible, block, x, layout, use_reentrant=False)
            else:
                x = self._block_visible(block, x, layout)
        return x

    def forward_masked_dense(self, x: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # [B, Rh, Rw, E]
        visible = upsample_mask(mask, x.shape[1] // mask.shape[-2])  # [Rh, Rw] or per image [B, Rh, Rw]
        x = torch.where(visible.view(-1, *visible.shape[-2:], 1), x, mask_token.to(x.dtype))
        return self.norm(self.layers(x)).permute(0, 3, 1, 2)


class GreenSwinTransformer(SwinVisibleMixin, SwinTransformer):
    """timm ``SwinTransformer`` plus :meth:`forward_visible` (GreenMIM pre-training on visible tokens)."""

    @staticmethod
    def _attention_visible(attn: nn.Module, x: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
        """timm ``WindowAttention`` on visible tokens ``[B, N, C]`` through the group layout."""
        b, n, _ = x.shape
        qkv = attn.qkv(x).view(b * n, 3, attn.num_heads, -1)
        out = group_window_attention(qkv, layout, attn.relative_position_bias_table, attn.scale)
        return attn.proj_drop(attn.proj(out.reshape(b, n, -1)))

    def _block_visible(self, block: nn.Module, x: torch.Tensor, layout: StageLayout) -> torch.Tensor:
        """timm ``SwinTransformerBlock`` on visible tokens ``[B, N, C]``."""
        attn_layout = layout.attention[(tuple(block.window_size), tuple(block.shift_size))]
        x = x + block.drop_path1(self._attention_visible(block.attn, block.norm1(x), attn_layout))
        return x + block.drop_path2(block.mlp(block.norm2(x)))

    def _merge_visible(self, stage: int, children: torch.Tensor) -> torch.Tensor:
        """timm ``PatchMerging`` (norm, then reduction) of each token's 2x2 children, x00 x10 x01 x11."""
        merge = self.layers[stage].downsample
        return merge.reduction(merge.norm(children))


def create_swin_like(cls: type, variant: str, pretrained: bool, filter_fn, **kwargs) -> nn.Module:
    """``build_model_with_cfg`` of a Swin-like green model ``cls`` (timm's Swin / SwinV2 feature and filter set-up:
    every stage a feature, ``filter_fn`` the original-to-timm checkpoint filter)."""
    require_weights_source(variant, pretrained, kwargs)
    out_indices = kwargs.pop('out_indices', tuple(range(len(kwargs.get('depths', (1, 1, 1, 1))))))
    return build_model_with_cfg(
        cls, variant, pretrained,
        pretrained_filter_fn=filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
        **kwargs)


def swin_cfg(**kwargs):
    """timm pretrained cfg shared by every Swin-like green tag (the weights source comes from the release manifest);
    ``kwargs`` override it (another ``input_size`` and ``pool_size``)."""
    return {
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': .9, 'interpolation': 'bicubic', 'fixed_input_size': True,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj', 'classifier': 'head.fc',
        **kwargs,
    }


def _create_green_swin(variant: str, pretrained: bool = False, **kwargs) -> GreenSwinTransformer:
    return create_swin_like(GreenSwinTransformer, variant, pretrained, checkpoint_filter_fn, **kwargs)


def _check_not_resampled(state_dict, model: GreenSwinTransformer) -> None:
    """Raise ``ValueError`` for weights of another patch or window size (timm's filter would resample the patch
    embedding and the relative-position tables to fit); the message names the size to pass."""
    check_patch_not_resampled(state_dict, model)
    reference = model.state_dict()
    for k, v in state_dict.items():
        if k.endswith('relative_position_bias_table') and k in reference and v.shape != reference[k].shape:
            window = (math.isqrt(v.shape[0]) + 1) // 2
            raise ValueError(f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(reference[k].shape)}: the checkpoint '
                             f'uses window_size={window} and {v.shape[1]} heads: pass them as model kwargs, e.g. '
                             f'\'{{"window_size": {window}}}\' (the tables are not resampled)')


def _describe(model: GreenSwinTransformer) -> str:
    widths = '/'.join(str(stage.blocks[0].dim) for stage in model.layers)
    depths = '/'.join(str(len(stage.blocks)) for stage in model.layers)
    return f'widths {widths}, depths {depths}, window {model.layers[0].blocks[0].window_size[0]}'


SWIN = register_family(ModelFamily(
    name='Swin Transformer', hub_tag='swin-transformer', model_class=GreenSwinTransformer,
    models=tuple(f'green_swin_{size}' for size in ('tiny', 'small', 'base', 'large')),
    original_to_timm=checkpoint_filter_fn, check_not_resampled=_check_not_resampled, describe=_describe,
    features_shape='[1, H/32, W/32, C]'))

default_cfgs = generate_default_cfgs(pretrained_cfgs(SWIN.models, swin_cfg()))


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
