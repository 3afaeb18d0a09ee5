"""What every green model family shares around ``forward_visible``: input checks, the layout of the visible tokens
(built once per step by :func:`greenmim.layout.build_visible_layout`), and the patch embedding of visible patches.

A family subclasses its timm model and :class:`VisibleEncoderMixin`, and says what its stages are
(:meth:`~VisibleEncoderMixin.stage_specs`), which module embeds the pixels
(:meth:`~VisibleEncoderMixin.first_patch_embed`; or the hooks built on it: :meth:`~VisibleEncoderMixin.image_size`,
:meth:`~VisibleEncoderMixin.pixel_patch_size`, :meth:`~VisibleEncoderMixin.embed_visible_patches`) and how each
stage runs on visible tokens (:meth:`~VisibleEncoderMixin._merge_visible`, :meth:`~VisibleEncoderMixin._stage_visible`;
or the whole :meth:`~VisibleEncoderMixin._encode_visible`). Besides, :class:`greenmim.GreenMIM` and
:class:`greenmim.SimMIM` use the timm model's ``norm`` (the final norm), ``num_features``, ``in_chans``,
``no_weight_decay`` and :meth:`~VisibleEncoderMixin.forward_masked_dense`.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from greenmim.layout import StageLayout, StageSpec, VisibleLayout, build_visible_layout, check_stage_specs
from greenmim.masking import check_mask

__all__ = ['VisibleEncoderMixin', 'gather_children']


def _describe_specs(specs) -> str:
    """Stage grids, widths and windows of a layout's specs, in a line."""
    return ', '.join(f'{s.grid_size[0]}x{s.grid_size[1]}/{s.channels}' + (
        f' windows {sorted({w for (w, _) in s.windows})}' if s.windows else '') for s in specs)


def gather_children(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Tokens ``x [B, N, C]`` and ``index`` (a layout's ``merge_index`` or ``pool_index``: ``[M, k]`` into each
    image's ``N`` tokens, or per image ``[B, M, k]`` into the flattened ``B * N``) -> the ``k`` children of each of
    the ``M`` cells, concatenated: ``[B, M, k * C]``."""
    if index.ndim == 2:
        return x.index_select(1, index.flatten()).view(x.shape[0], index.shape[0], -1)
    return x.flatten(0, 1).index_select(0, index.flatten()).view(*index.shape[:2], -1)


class VisibleEncoderMixin:
    """Checks and layout of the visible tokens for a timm encoder whose last stage has one token per mask unit."""

    # host-side helpers: not part of a TorchScript model
    __jit_unused_properties__ = ['mask_grid_size', 'mask_unit_size', 'layout_specs']

    def stage_specs(self) -> List[StageSpec]:
        """Static per-stage description used to lay out the visible tokens."""
        raise NotImplementedError

    @property
    def layout_specs(self) -> Tuple[StageSpec, ...]:
        """:meth:`stage_specs`, built once (a family whose stage grids or windows can change, e.g. by timm's
        ``set_input_size``, calls :meth:`_forget_layout_specs` there)."""
        specs = self.__dict__.get('_layout_specs')
        if specs is None:
            specs = self.__dict__['_layout_specs'] = tuple(self.stage_specs())
        return specs

    def _forget_layout_specs(self) -> None:
        self.__dict__.pop('_layout_specs', None)

    def first_patch_embed(self) -> nn.Module:
        """The patch embedding of the pixels (timm ``PatchEmbed``: ``img_size``, ``patch_size``, ``proj``, ``norm``)."""
        raise NotImplementedError

    def image_size(self) -> Tuple[int, int]:
        """``(H, W)``: the image size the model is built for."""
        return tuple(self.first_patch_embed().img_size)

    def pixel_patch_size(self) -> int:
        """Side in pixels of the first stage's tokens."""
        return self.first_patch_embed().patch_size[0]

    @property
    def mask_grid_size(self) -> Tuple[int, int]:
        """``(Hm, Wm)``: the mask-unit grid, the token grid of the last stage."""
        return tuple(self.layout_specs[-1].grid_size)

    @property
    def mask_unit_size(self) -> int:
        """Side in pixels of a mask unit: the encoder's total stride (32 for Swin and Twins), the pixel patch times 2
        for each stage that merges 2x2 tokens of the previous one (known for any image size, unlike the grids)."""
        merges = sum(spec.merges_previous_stage for spec in self.layout_specs)
        return self.pixel_patch_size() << merges

    def forward_visible(
            self,
            x: torch.Tensor,
            mask: Optional[torch.Tensor] = None,
            layout: Optional[VisibleLayout] = None,
    ) -> List[torch.Tensor]:
        """Encode the visible tokens only.

        Args:
            x: images ``[B, C, H, W]``, ``H, W`` the model's image size (multiples of :attr:`mask_unit_size`).
            mask: bool ``[H / 32, W / 32]`` shared by the batch, or ``[B, H / 32, W / 32]`` one per image (the same
                number of visible units each); True = visible. Optional with a ``layout`` (which holds its mask).
            layout: :meth:`visible_layout` of the mask for this batch size, if already built (required under
                ``torch.compile``, which then traces the whole encoder without graph breaks).

        Returns:
            One tensor per stage, ``[B, N_s, C_s]``: the visible tokens in raster order (stage outputs, before the
            final norm), equal to the family's dense forward at those positions when masked tokens are kept out of
            the keys of every attention (and zeroed before a convolution over tokens).
        """
        return self._encode_visible(x, self.resolve_layout(x, mask, layout))

    def _encode_visible(self, x: torch.Tensor, layout: VisibleLayout) -> List[torch.Tensor]:
        """The encoder on the visible tokens of images ``x`` laid out by ``layout`` (checked): per stage, the
        visible patch embedding (first stage) or :meth:`_merge_visible` of each token's children, then
        :meth:`_stage_visible`; the stage outputs ``[B, N_s, C_s]``."""
        outputs = []
        for i, stage_layout in enumerate(layout.stages):
            if stage_layout.merge_index is None:
                x = self.embed_visible_patches(x, stage_layout)
            else:
                x = self._merge_visible(i, gather_children(x, stage_layout.merge_index))
            x = self._stage_visible(i, x, stage_layout)
            outputs.append(x)
        return outputs

    def _merge_visible(self, stage: int, children: torch.Tensor) -> torch.Tensor:
        """Stage ``stage``'s embedding of the previous stage's tokens: ``children [B, N, f * f * C]`` (each token's
        children concatenated in its spec's ``children_order``) -> ``[B, N, C_s]``."""
        raise NotImplementedError

    def _stage_visible(self, stage: int, x: torch.Tensor, layout: StageLayout) -> torch.Tensor:
        """The blocks of stage ``stage`` on its visible tokens ``[B, N, C_s]`` laid out by ``layout``."""
        raise NotImplementedError

    def forward_masked_dense(self, x: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
        """Dense forward of images ``[B, C, H, W]`` with the patch embeddings of masked units (``mask``, bool
        ``[Hm, Wm]`` or per image ``[B, Hm, Wm]``, True = visible) replaced by ``mask_token [E]`` (SimMIM): the
        final-stage features after the final norm, ``[B, C_out, Hm, Wm]``."""
        raise NotImplementedError

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
        img_size = self.image_size()
        if (h, w) != img_size:
            raise ValueError(f'image size {h}x{w} does not match the model ({img_size[0]}x{img_size[1]}); '
                             f'create the model with img_size=({h}, {w})')
        if c != self.in_chans:
            raise ValueError(f'images have {c} channels, the model expects {self.in_chans}')

    def check_mask(self, mask: torch.Tensor, batch_size: Optional[int] = None) -> None:
        """Raise ``ValueError`` unless ``mask`` is a bool mask-unit grid of this model's image size with a visible
        unit (or ``batch_size`` of them with equal visible counts: :func:`greenmim.masking.check_mask`), and the
        stages line up with the mask units (e.g. every stage grid holds whole windows)."""
        check_mask(mask, self.mask_grid_size, batch_size)
        check_stage_specs(self.layout_specs, self.mask_grid_size)

    def visible_layout(
            self,
            mask: torch.Tensor,
            batch_size: int,
            device: Optional[torch.device] = None,
            group_size: Optional[int] = None,
            static: bool = False,
    ) -> VisibleLayout:
        """Layout of the visible tokens of every stage for ``mask`` (``[Hm, Wm]``, or ``[B, Hm, Wm]`` per image;
        computed once per step, shared by all blocks); raises ``ValueError`` for a mask that does not suit the model
        (:meth:`check_mask`). ``static``: the same shapes for every mask of this batch size and visible count, of
        either kind (for a compiled step; :mod:`greenmim.layout`)."""
        check_mask(mask, self.mask_grid_size, batch_size)
        device = device if device is not None else self.first_patch_embed().proj.weight.device
        return build_visible_layout(mask, self.layout_specs, batch_size, device, group_size, static)

    def check_layout(self, layout: VisibleLayout, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> None:
        """Raise ``ValueError`` unless ``layout`` is a :meth:`visible_layout` for this model, the batch size and
        device of ``x``, and (if given) ``mask``: host-side checks, no device sync."""
        if not isinstance(layout, VisibleLayout):
            raise ValueError(f'layout must be the VisibleLayout of model.visible_layout(...), got '
                             f'{type(layout).__name__}')
        if len(layout.stages) != len(self.layout_specs):
            raise ValueError(f'layout has {len(layout.stages)} stages, the model has {len(self.layout_specs)}')
        if layout.specs != self.layout_specs:
            raise ValueError(f'layout was built for another model: {_describe_specs(layout.specs)}; this model has '
                             f'{_describe_specs(self.layout_specs)}')
        if layout.batch_size != x.shape[0]:
            raise ValueError(f'layout was built for batch size {layout.batch_size}, the images have {x.shape[0]}')
        if layout.device != x.device:
            raise ValueError(f'layout is on {layout.device}, the images on {x.device}')
        if mask is not None:
            check_mask(mask, self.mask_grid_size, x.shape[0])
            given = mask.detach().cpu().expand_as(layout.host_mask) if layout.static else mask.detach().cpu()
            if given.shape != layout.host_mask.shape or not torch.equal(given, layout.host_mask):
                raise ValueError('layout was built for another mask: pass the mask it was built from, or only the '
                                 'layout (it holds its mask)')

    def resolve_layout(
            self,
            x: torch.Tensor,
            mask: Optional[torch.Tensor],
            layout: Optional[VisibleLayout],
    ) -> VisibleLayout:
        """The layout ``forward_visible`` runs on: ``layout`` checked against ``x`` (and ``mask`` if given), or built
        for ``mask``. Under ``torch.compile`` the step does device work only: ``layout`` is required and its shapes
        alone are checked (free: they are static), so ``mask`` is not read -- the layout's own mask is used."""
        if torch.compiler.is_compiling():
            if layout is None:
                raise ValueError('under torch.compile, pass layout=model.visible_layout(mask, batch_size, '
                                 'static=True)')
            if layout.batch_size != x.shape[0]:
                raise ValueError(f'layout was built for batch size {layout.batch_size}, the images have '
                                 f'{x.shape[0]}')
            return layout
        self.check_images(x)
        if self.training and any(m.p > 0 for n, m in self.named_modules() if n.endswith('attn_drop')):
            raise ValueError('forward_visible does not implement attention dropout; build with attn_drop_rate=0')
        if layout is None:
            if mask is None:
                raise ValueError('forward_visible needs a mask or its layout')
            return self.visible_layout(mask, x.shape[0], x.device)
        self.check_layout(layout, x, mask)
        return layout

    def embed_visible_patches(self, x: torch.Tensor, layout: StageLayout) -> torch.Tensor:
        """:meth:`first_patch_embed` of the visible patches: images ``[B, C, H, W] -> [B, N, E]`` (the conv as a
        GEMM over the gathered patches, in the weight's ``(c, kh, kw)`` order), then its norm. A family whose pixel
        embedding is not a timm ``PatchEmbed`` overrides this, :meth:`image_size` and :meth:`pixel_patch_size`."""
        b, c, _, _ = x.shape
        embed = self.first_patch_embed()
        ph, pw = embed.patch_size
        rh, rw = layout.grid_size
        patches = x.reshape(b, c, rh, ph, rw, pw).permute(0, 2, 4, 1, 3, 5)
        index = layout.token_index.expand(b, -1)  # [B, N], per image or shared
        image = torch.arange(b, device=index.device)[:, None]
        patches = patches[image, index // rw, index % rw].flatten(2)  # [B, N, C*ph*pw]
        return embed.norm(F.linear(patches, embed.proj.weight.flatten(1), embed.proj.bias))
