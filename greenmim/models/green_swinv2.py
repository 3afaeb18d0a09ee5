"""Green SwinV2: timm's Swin Transformer V2 with a visible-tokens-only forward for masked image modeling.

The architecture, parameter names and dense forward are timm's ``SwinTransformerV2`` unchanged, so fine-tuning and
inference are plain timm. :meth:`GreenSwinTransformerV2.forward_visible` runs the encoder on the visible tokens of a
batch-wise or per-image mask of 32x32-pixel units only, as Swin V1 (:mod:`greenmim.models.green_swin`: the same
stages, windows, shifts and Optimal Grouping layout) with SwinV2's layers:

- cosine attention: q and k L2-normalised per head, q multiplied by the clamped ``exp(logit_scale)`` of its head
  (at most 100), then group window attention with scale 1;
- continuous position bias: ``16 * sigmoid(cpb_mlp(relative_coords_table))``, ``[(2Wh-1)(2Ww-1), heads]``, computed
  once per block call (it depends on the weights only) and looked up by the kernel as Swin's bias table, so its
  gradient flows back through the MLP;
- res-post-norm blocks (``x + norm1(attn(x))``, ``x + norm2(mlp(x))``) and ``PatchMerging`` as reduction then norm;
- windows clamped to small stage grids by timm (window 16 on an 8x8 stage is one 8x8 window, no shift).

The normalisation and the scale are one elementwise pass over q and k in PyTorch before the kernel; a kernel
prologue normalising the q and k tiles it loads (and scaling q per head) would save that pass and the ``[T, 3, H, D]``
copy (docs/kernels.md).
"""
import math
from typing import Dict

import torch
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from timm.models.swin_transformer_v2 import SwinTransformerV2, checkpoint_filter_fn
from torch import nn

from greenmim.checkpoint import check_patch_not_resampled
from greenmim.kernels import AttentionLayout, group_window_attention
from greenmim.layout import StageLayout
from greenmim.models.family import ModelFamily, register_family
from greenmim.models.green_swin import SwinVisibleMixin, create_swin_like, swin_cfg
from greenmim.models.manifest import pretrained_cfgs

__all__ = ['GreenSwinTransformerV2']

MAX_LOGIT_SCALE = math.log(1. / 0.01)  # SwinV2 clamps exp(logit_scale) at 100


class GreenSwinTransformerV2(SwinVisibleMixin, SwinTransformerV2):
    """timm ``SwinTransformerV2`` plus :meth:`forward_visible` (GreenMIM pre-training on visible tokens)."""

    @staticmethod
    def _cosine_qkv(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``[B, N, C] -> [B * N, 3, H, D]``: the qkv projection with q and k L2-normalised, q times its head's
        clamped ``exp(logit_scale)``, so that attention with scale 1 is SwinV2's cosine attention."""
        b, n, _ = x.shape
        bias = None if attn.q_bias is None else torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        q, k, v = F.linear(x, attn.qkv.weight, bias).view(b * n, 3, attn.num_heads, -1).unbind(1)
        logit_scale = torch.clamp(attn.logit_scale, max=MAX_LOGIT_SCALE).exp().view(-1, 1)  # [H, 1]
        return torch.stack((F.normalize(q, dim=-1) * logit_scale, F.normalize(k, dim=-1), v), 1)

    @staticmethod
    def _position_bias_table(attn: nn.Module) -> torch.Tensor:
        """SwinV2's continuous position bias as a Swin bias table ``[(2Wh-1)(2Ww-1), H]``."""
        return 16 * torch.sigmoid(attn.cpb_mlp(attn.relative_coords_table).view(-1, attn.num_heads))

    def _attention_visible(self, attn: nn.Module, x: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
        """timm V2 ``WindowAttention`` on visible tokens ``[B, N, C]`` through the group layout."""
        b, n, _ = x.shape
        out = group_window_attention(self._cosine_qkv(attn, x), layout, self._position_bias_table(attn), 1.0)
        return attn.proj_drop(attn.proj(out.reshape(b, n, -1)))

    def _block_visible(self, block: nn.Module, x: torch.Tensor, layout: StageLayout) -> torch.Tensor:
        """timm ``SwinTransformerV2Block`` (res-post-norm) on visible tokens ``[B, N, C]``."""
        attn_layout = layout.attention[(tuple(block.window_size), tuple(block.shift_size))]
        x = x + block.drop_path1(block.norm1(self._attention_visible(block.attn, x, attn_layout)))
        return x + block.drop_path2(block.norm2(block.mlp(x)))

    def _merge_visible(self, stage: int, children: torch.Tensor) -> torch.Tensor:
        """timm V2 ``PatchMerging`` (reduction, then norm) of each token's 2x2 children, x00 x10 x01 x11."""
        merge = self.layers[stage].downsample
        return merge.norm(merge.reduction(children))


def _check_not_resampled(state_dict, model: GreenSwinTransformerV2) -> None:
    """Raise ``ValueError`` for weights of another patch size, or (original layout, which saves every attention's
    ``relative_coords_table``) another window or pretrained window than ``model``'s: timm's filter drops those
    tables and loads the position-bias MLPs into any window, which changes the biases they compute."""
    check_patch_not_resampled(state_dict, model)
    buffers = dict(model.named_buffers())
    for k, v in state_dict.items():
        if not k.endswith('relative_coords_table') or k not in buffers:
            continue
        ours = buffers[k]
        if v.shape != ours.shape:
            window = (v.shape[1] + 1) // 2
            raise ValueError(f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(ours.shape)}: the checkpoint uses '
                             f'window_size={window} there: pass it as a model kwarg, e.g. '
                             f'\'{{"window_size": {window}}}\' (the position bias is not moved to another window)')
        if not torch.allclose(v.float(), ours.float(), atol=1e-5):
            raise ValueError(f'{k}: the checkpoint normalises relative coordinates by another pretrained window '
                             'than the model: pass its pretrained_window_sizes as a model kwarg')


def _describe(model: GreenSwinTransformerV2) -> str:
    widths = '/'.join(str(stage.blocks[0].dim) for stage in model.layers)
    depths = '/'.join(str(len(stage.blocks)) for stage in model.layers)
    windows = '/'.join(str(stage.blocks[0].window_size[0]) for stage in model.layers)
    return f'widths {widths}, depths {depths}, windows {windows}, cosine attention, continuous position bias'


_SIZES = {  # size: (embed_dim, depths, num_heads)
    'tiny': (96, (2, 2, 6, 2), (3, 6, 12, 24)),
    'small': (96, (2, 2, 18, 2), (3, 6, 12, 24)),
    'base': (128, (2, 2, 18, 2), (4, 8, 16, 32)),
    'large': (192, (2, 2, 18, 2), (6, 12, 24, 48)),
}
_VARIANTS = {  # green model: (size, window, timm kwargs beyond the size, input size) -- timm's swinv2_* list
    **{f'green_swinv2_{size}_window{w}_256': (size, w, {}, 256)
       for size in ('tiny', 'small', 'base') for w in (8, 16)},
    **{f'green_swinv2_{size}_window12_192': (size, 12, {}, 192) for size in ('base', 'large')},
    **{f'green_swinv2_{size}_window12to{w}_192to{px}': (size, w, dict(pretrained_window_sizes=(12, 12, 12, 6)), px)
       for size in ('base', 'large') for w, px in ((16, 256), (24, 384))},
}


def _variant_cfgs() -> Dict[str, dict]:
    """The cfgs of every variant at its input size (timm builds the model at the cfg's size)."""
    cfgs = {}
    for px in sorted({v[3] for v in _VARIANTS.values()}):
        names = [name for name, v in _VARIANTS.items() if v[3] == px]
        cfgs.update(pretrained_cfgs(names, swin_cfg(input_size=(3, px, px), pool_size=(px // 32, px // 32))))
    return cfgs


SWINV2 = register_family(ModelFamily(
    name='Swin Transformer V2', hub_tag='swin-transformer-v2', model_class=GreenSwinTransformerV2,
    models=tuple(_VARIANTS), original_to_timm=checkpoint_filter_fn, check_not_resampled=_check_not_resampled,
    describe=_describe, features_shape='[1, H/32, W/32, C]'))

default_cfgs = generate_default_cfgs(_variant_cfgs())


def _create_variant(name: str, pretrained: bool, **kwargs) -> GreenSwinTransformerV2:
    size, window, extra, _ = _VARIANTS[name]
    embed_dim, depths, num_heads = _SIZES[size]
    args = dict(window_size=window, embed_dim=embed_dim, depths=depths, num_heads=num_heads, **extra)
    return create_swin_like(GreenSwinTransformerV2, name, pretrained, checkpoint_filter_fn, **dict(args, **kwargs))


@register_model
def green_swinv2_tiny_window8_256(pretrained: bool = False, **kwargs) -> GreenSwinTransformerV2:
    """Green SwinV2-T @ 256, window 8 (timm ``swinv2_tiny_window8_256`` layout)."""
    return _create_variant('green_swinv2_tiny_window8_256', pretrained, **kwargs)


@register_model
def green_swinv2_tiny_window16_256(pretrained: bool = False, **kwargs) -> GreenSwinTransformerV2:
    """Green SwinV2-T @ 256, window 16 (timm ``swinv2_tiny_window16_256`` layout)."""
    return _create_variant('green_swinv2_tiny_window16_256', pretrained, **kwargs)


@register_model
def green_swinv2_small_window8_256(pretrained: bool = False, **kwargs) -> GreenSwinTransformerV2:
    """Green SwinV2-S @ 256, window 8 (timm ``swinv2_small_window8_256`` layout)."""
    return _create_variant('green_swinv2_small_window8_256', pretrained, **kwargs)


@register_model
def green_swinv2_small_window16_256(pretrained: bool = False, **kwargs) -> GreenSwinTransformerV2:
    """Green SwinV2-S @ 256, window 16 (timm ``swinv2_small_window16_256`` layout)."""
    return _create_variant('green_swinv2_small_window16_256', pretrained, **kwargs)


@register_model
def green_swinv2_base_window8_256(pretrained: bool = False, **kwargs) -> GreenSwinTransformerV2:
    """Green SwinV2-B @ 256, window 8 (timm ``swinv2_base_window8_256`` layout)."""
    return _create_variant('green_swinv2_base_window8_256', pretrained, **kwargs)


@register_model
def green_swinv2_base_window16_256(pretrained: bool = False, **kwargs) -> GreenSwinTransformerV2:
    """Green SwinV2-B @ 256, window 16 (timm ``swinv2_base_window16_256`` layout)."""
    return _create_variant('green_swinv2_base_window16_256', pretrained, **kwargs)


@register_model
def green_swinv2_base_window12_192(pretrained: bool = False, **kwargs) -> GreenSwinTransformerV2:
    """Green SwinV2-B @ 192, window 12 (timm ``swinv2_base_window12_192`` layout)."""
    return _create_variant('green_swinv2_base_window12_192', pretrained, **kwargs)


@register_model
def green_swinv2_large_window12_192(pretrained: bool = False, **kwargs) -> GreenSwinTransformerV2:
    """Green SwinV2-L @ 192, window 12 (timm ``swinv2_large_window12_192`` layout)."""
    return _create_variant('green_swinv2_large_window12_192', pretrained, **kwargs)


@register_model
def green_swinv2_base_window12to16_192to256(pretrained: bool = False, **kwargs) -> GreenSwinTransformerV2:
    """Green SwinV2-B @ 256, window 16, position bias of window 12 (timm ``swinv2_base_window12to16_192to256``)."""
    return _create_variant('green_swinv2_base_window12to16_192to256', pretrained, **kwargs)


@register_model
def green_swinv2_base_window12to24_192to384(pretrained: bool = False, **kwargs) -> GreenSwinTransformerV2:
    """Green SwinV2-B @ 384, window 24, position bias of window 12 (timm ``swinv2_base_window12to24_192to384``)."""
    return _create_variant('green_swinv2_base_window12to24_192to384', pretrained, **kwargs)


@register_model
def green_swinv2_large_window12to16_192to256(pretrained: bool = False, **kwargs) -> GreenSwinTransformerV2:
    """Green SwinV2-L @ 256, window 16, position bias of window 12 (timm ``swinv2_large_window12to16_192to256``)."""
    return _create_variant('green_swinv2_large_window12to16_192to256', pretrained, **kwargs)


@register_model
def green_swinv2_large_window12to24_192to384(pretrained: bool = False, **kwargs) -> GreenSwinTransformerV2:
    """Green SwinV2-L @ 384, window 24, position bias of window 12 (timm ``swinv2_large_window12to24_192to384``)."""
    return _create_variant('green_swinv2_large_window12to24_192to384', pretrained, **kwargs)
