"""Green Twins: timm's Twins (SVT and PCPVT) with a visible-tokens-only forward for masked image modeling.

The architecture, parameter names and dense forward are timm's ``Twins`` unchanged, so fine-tuning and inference are
plain timm. With 32x32-pixel mask units every strided convolution of Twins lines up with the units, so
:meth:`GreenTwins.forward_visible` runs on the visible tokens only:

- patch embeddings (kernel = stride = 4, then 2, 2, 2): a GEMM over each visible token's patch or 2x2 children;
- locally-grouped attention (SVT, window 7, no shift): group window attention without a position bias over the
  Optimal Grouping layout (:mod:`greenmim.layout`);
- global sub-sampled attention: its stride-``sr`` convolution (``sr`` = 8, 4, 2, 1) is a GEMM over the ``sr x sr``
  tokens of each visible cell (one key/value token per mask unit), and the visible tokens attend to the key/value
  tokens of the visible cells of their own image;
- the position encoding generator (``PosConv``, depthwise 3x3 after the first block of a stage) with its residual:
  a submanifold convolution (:func:`greenmim.kernels.sparse_depthwise_conv`), masked neighbours contributing zero.
"""
from typing import List

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.twins import GlobalSubSampleAttn, LocallyGroupedAttn, Twins
from torch import nn

from greenmim.checkpoint import check_patch_not_resampled
from greenmim.kernels import group_window_attention, sparse_depthwise_conv
from greenmim.layout import StageLayout, StageSpec
from greenmim.masking import upsample_mask
from greenmim.models.family import ModelFamily, register_family
from greenmim.models.manifest import pretrained_cfgs, require_weights_source
from greenmim.models.visible import VisibleEncoderMixin, gather_children

__all__ = ['GreenTwins']


def _conv_as_linear(conv: nn.Conv2d, children: torch.Tensor) -> torch.Tensor:
    """A kernel = stride convolution applied to ``children [B, M, kh * kw * C_in]`` (children in raster
    ``(kh, kw)`` order, as :func:`gather_children` of a ``'rows'`` index gives them): ``[B, M, C_out]``."""
    return F.linear(children, conv.weight.permute(0, 2, 3, 1).flatten(1), conv.bias)


class GreenTwins(VisibleEncoderMixin, Twins):
    """timm ``Twins`` plus :meth:`forward_visible` (GreenMIM pre-training on visible tokens)."""

    def first_patch_embed(self) -> nn.Module:
        return self.patch_embeds[0]

    def stage_specs(self) -> List[StageSpec]:
        """Static per-stage description (grid, width, local windows, global attention's sub-sampling, position
        encoding kernel) used to lay out visible tokens."""
        specs = []
        for i, (embed, blocks, pos_block) in enumerate(zip(self.patch_embeds, self.blocks, self.pos_block)):
            attns = [block.attn for block in blocks]
            windows = tuple(dict.fromkeys(((a.ws, a.ws), (0, 0)) for a in attns if isinstance(a, LocallyGroupedAttn)))
            pools = {a.sr_ratio for a in attns if isinstance(a, GlobalSubSampleAttn) and a.sr is not None}
            specs.append(StageSpec(
                grid_size=(embed.H, embed.W),
                channels=self.embed_dims[i],
                windows=windows,
                merges_previous_stage=i > 0,
                pool_size=pools.pop() if pools else None,  # one sub-sampling ratio per stage
                conv_kernel=tuple(pos_block.proj[0].kernel_size),
            ))
        return specs

    @staticmethod
    def _local_attention_visible(attn: LocallyGroupedAttn, x: torch.Tensor, layout: StageLayout) -> torch.Tensor:
        """timm ``LocallyGroupedAttn`` (window attention, no bias) on visible tokens ``[B, N, C]``."""
        b, n, c = x.shape
        groups = layout.attention[((attn.ws, attn.ws), (0, 0))]
        qkv = attn.qkv(x).view(b * n, 3, attn.num_heads, -1)
        out = group_window_attention(qkv, groups, None, attn.scale)
        return attn.proj_drop(attn.proj(out.reshape(b, n, c)))

    @staticmethod
    def _global_attention_visible(attn: GlobalSubSampleAttn, x: torch.Tensor, layout: StageLayout) -> torch.Tensor:
        """timm ``GlobalSubSampleAttn`` on visible tokens ``[B, N, C]``: keys and values of the visible cells."""
        b, n, c = x.shape
        heads = attn.num_heads
        q = attn.q(x).view(b, n, heads, -1).transpose(1, 2)
        if attn.sr is not None:  # one key/value token per visible sr x sr cell
            x = attn.norm(_conv_as_linear(attn.sr, gather_children(x, layout.pool_index)))
        k, v = attn.kv(x).view(b, -1, 2, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
        return attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(b, n, c)))

    def _block_visible(self, block: nn.Module, x: torch.Tensor, layout: StageLayout) -> torch.Tensor:
        """timm Twins ``Block`` on visible tokens ``[B, N, C]``."""
        attention = (self._local_attention_visible if isinstance(block.attn, LocallyGroupedAttn)
                     else self._global_attention_visible)
        x = x + block.drop_path1(attention(block.attn, block.norm1(x), layout))
        return x + block.drop_path2(block.mlp(block.norm2(x)))

    @staticmethod
    def _pos_conv_visible(pos_block: nn.Module, x: torch.Tensor, layout: StageLayout) -> torch.Tensor:
        """timm ``PosConv`` (depthwise conv + residual) on visible tokens ``[B, N, C]``, masked neighbours zero."""
        conv = pos_block.proj[0]
        tokens = x.flatten(0, 1)
        return (sparse_depthwise_conv(tokens, layout.neighbours, conv.weight, conv.bias) + tokens).view_as(x)

    def _merge_visible(self, stage: int, children: torch.Tensor) -> torch.Tensor:
        """Strided patch embedding (kernel = stride = 2) of each token's 2x2 children, in raster order."""
        embed = self.patch_embeds[stage]
        return embed.norm(_conv_as_linear(embed.proj, children))

    def _stage_visible(self, stage: int, x: torch.Tensor, layout: StageLayout) -> torch.Tensor:
        """The stage's position dropout and blocks on visible tokens, the position encoding after the first block
        (masked tokens count as zeros before each position encoding)."""
        x = self.pos_drops[stage](x)
        for j, block in enumerate(self.blocks[stage]):
            x = self._block_visible(block, x, layout)
            if j == 0:
                x = self._pos_conv_visible(self.pos_block[stage], x, layout)
        return x

    def forward_masked_dense(self, x: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
        """Dense forward of images ``[B, C, H, W]`` with the patch embeddings of masked units (``mask``, bool
        ``[Hm, Wm]`` or per image ``[B, Hm, Wm]``, True = visible) replaced by ``mask_token [E]`` (SimMIM): the
        final-stage features after the final norm, ``[B, C_out, Hm, Wm]`` (timm's ``forward_features`` otherwise)."""
        b = x.shape[0]
        last = len(self.blocks) - 1
        for i, (embed, drop, blocks, pos_block) in enumerate(
                zip(self.patch_embeds, self.pos_drops, self.blocks, self.pos_block)):
            x, size = embed(x)
            if i == 0:
                visible = upsample_mask(mask, size[0] // mask.shape[-2]).flatten(-2)  # [L] or per image [B, L]
                x = torch.where(visible.view(-1, visible.shape[-1], 1), x, mask_token.to(x.dtype))
            x = drop(x)
            for j, block in enumerate(blocks):
                x = block(x, size)
                if j == 0:
                    x = pos_block(x, size)
            if i < last:
                x = x.reshape(b, *size, -1).permute(0, 3, 1, 2)
        return self.norm(x).transpose(1, 2).reshape(b, -1, *size)


def _original_to_timm(state_dict, model):
    """Twins' original key layout (Meituan-AutoML/Twins) is timm's: nothing to rename."""
    return state_dict


def _check_not_resampled(state_dict, model: GreenTwins) -> None:
    """Twins' only resampled weight would be the pixel patch embedding (timm's Twins filter resamples nothing)."""
    check_patch_not_resampled(state_dict, model, 'patch_embeds.0.proj.weight')


def _create_green_twins(variant: str, pretrained: bool = False, **kwargs) -> GreenTwins:
    require_weights_source(variant, pretrained, kwargs)
    out_indices = kwargs.pop('out_indices', 4)
    return build_model_with_cfg(
        GreenTwins, variant, pretrained,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs)


def _cfg(**kwargs):
    """timm pretrained cfg shared by every green Twins tag (the weights source comes from the release manifest)."""
    return {
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None,
        'crop_pct': .9, 'interpolation': 'bicubic', 'fixed_input_size': True,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embeds.0.proj', 'classifier': 'head',
        **kwargs,
    }


def _describe(model: GreenTwins) -> str:
    specs = model.stage_specs()
    widths = '/'.join(str(spec.channels) for spec in specs)
    depths = '/'.join(str(len(blocks)) for blocks in model.blocks)
    sub_sampling = '/'.join(str(spec.pool_size or 1) for spec in specs)
    windows = sorted({w for spec in specs for (w, _), _ in spec.windows})
    local = f', local window {"/".join(map(str, windows))}' if windows else ''
    return f'widths {widths}, depths {depths}, global sub-sampling {sub_sampling}{local}'


TWINS = register_family(ModelFamily(
    name='Twins', hub_tag='twins', model_class=GreenTwins,
    models=tuple(f'green_twins_{kind}_{size}' for kind in ('svt', 'pcpvt') for size in ('small', 'base', 'large')),
    original_to_timm=_original_to_timm, check_not_resampled=_check_not_resampled, describe=_describe,
    features_shape='[1, H/32 * W/32, C]'))

default_cfgs = generate_default_cfgs(pretrained_cfgs(TWINS.models, _cfg()))


@register_model
def green_twins_svt_small(pretrained: bool = False, **kwargs) -> GreenTwins:
    """Green Twins-SVT-S @ 224 (timm ``twins_svt_small`` layout)."""
    args = dict(patch_size=4, embed_dims=[64, 128, 256, 512], num_heads=[2, 4, 8, 16], mlp_ratios=[4, 4, 4, 4],
                depths=[2, 2, 10, 4], wss=[7, 7, 7, 7], sr_ratios=[8, 4, 2, 1])
    return _create_green_twins('green_twins_svt_small', pretrained=pretrained, **dict(args, **kwargs))


@register_model
def green_twins_svt_base(pretrained: bool = False, **kwargs) -> GreenTwins:
    """Green Twins-SVT-B @ 224 (timm ``twins_svt_base`` layout)."""
    args = dict(patch_size=4, embed_dims=[96, 192, 384, 768], num_heads=[3, 6, 12, 24], mlp_ratios=[4, 4, 4, 4],
                depths=[2, 2, 18, 2], wss=[7, 7, 7, 7], sr_ratios=[8, 4, 2, 1])
    return _create_green_twins('green_twins_svt_base', pretrained=pretrained, **dict(args, **kwargs))


@register_model
def green_twins_svt_large(pretrained: bool = False, **kwargs) -> GreenTwins:
    """Green Twins-SVT-L @ 224 (timm ``twins_svt_large`` layout)."""
    args = dict(patch_size=4, embed_dims=[128, 256, 512, 1024], num_heads=[4, 8, 16, 32], mlp_ratios=[4, 4, 4, 4],
                depths=[2, 2, 18, 2], wss=[7, 7, 7, 7], sr_ratios=[8, 4, 2, 1])
    return _create_green_twins('green_twins_svt_large', pretrained=pretrained, **dict(args, **kwargs))


@register_model
def green_twins_pcpvt_small(pretrained: bool = False, **kwargs) -> GreenTwins:
    """Green Twins-PCPVT-S @ 224 (timm ``twins_pcpvt_small`` layout)."""
    args = dict(patch_size=4, embed_dims=[64, 128, 320, 512], num_heads=[1, 2, 5, 8], mlp_ratios=[8, 8, 4, 4],
                depths=[3, 4, 6, 3], sr_ratios=[8, 4, 2, 1])
    return _create_green_twins('green_twins_pcpvt_small', pretrained=pretrained, **dict(args, **kwargs))


@register_model
def green_twins_pcpvt_base(pretrained: bool = False, **kwargs) -> GreenTwins:
    """Green Twins-PCPVT-B @ 224 (timm ``twins_pcpvt_base`` layout)."""
    args = dict(patch_size=4, embed_dims=[64, 128, 320, 512], num_heads=[1, 2, 5, 8], mlp_ratios=[8, 8, 4, 4],
                depths=[3, 4, 18, 3], sr_ratios=[8, 4, 2, 1])
    return _create_green_twins('green_twins_pcpvt_base', pretrained=pretrained, **dict(args, **kwargs))


@register_model
def green_twins_pcpvt_large(pretrained: bool = False, **kwargs) -> GreenTwins:
    """Green Twins-PCPVT-L @ 224 (timm ``twins_pcpvt_large`` layout)."""
    args = dict(patch_size=4, embed_dims=[64, 128, 320, 512], num_heads=[1, 2, 5, 8], mlp_ratios=[8, 8, 4, 4],
                depths=[3, 8, 27, 3], sr_ratios=[8, 4, 2, 1])
    return _create_green_twins('green_twins_pcpvt_large', pretrained=pretrained, **dict(args, **kwargs))
