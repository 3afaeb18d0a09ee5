"""Convert the authors' GreenMIM and SimMIM checkpoints to this package's layout, verified key by key.

Source layouts (``{"model": {...}}``, as saved by the authors' training scripts):

- ``greenmim`` (LayneH/GreenMIM, MAE-style): ``encoder.*`` (Swin), ``mask_token`` ``[1, 1, D]``, ``decoder_embed.*``,
  ``decoder_pos_embed`` (MAE's fixed sin-cos, a parameter there; the same non-persistent buffer here, so checked
  and dropped),
  ``decoder_blocks.N.*``, ``decoder_norm.*``, ``decoder_pred.*``  ->  :class:`greenmim.GreenMIM`.
- ``simmim`` (microsoft/SimMIM): ``encoder.*`` (Swin) with ``encoder.mask_token`` ``[1, 1, E]``, and the 1x1-conv
  decoder ``decoder.0.{weight,bias}``  ->  :class:`greenmim.SimMIM` (``mask_token`` ``[1, 1, 1, E]``, ``decoder.*``).
- ``classifier`` (fine-tuned with SimMIM's code): the Swin keys without prefix and ``head.{weight,bias}``
  ->  the timm classifier.

The Swin keys follow Microsoft's original layout: patch merging ends a stage (``layers.{i}.downsample`` is timm's
``layers.{i+1}.downsample``), the classifier is ``head.`` (timm: ``head.fc.``), and the buffers
``relative_position_index`` / ``attn_mask`` are saved; the model family's ``original_to_timm`` (for Swin, timm's
``swin_transformer.checkpoint_filter_fn``) does that renaming. An early version of the authors' code concatenated
each 2x2 neighbourhood as x00,x01,x10,x11 instead of Swin's x00,x10,x01,x11: ``--merge-order early`` permutes the
4C input channels of every ``downsample.norm`` and ``downsample.reduction`` to fix such checkpoints (see
docs/hub.md for how to tell).

    python -m greenmim.hub.convert greenmim_swin_base.pth out.safetensors --model green_swin_base
"""
import argparse
import re
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import timm
import torch
from torch import nn

from greenmim.checkpoint import (
    is_mim_state_dict, read_checkpoint, save_weights, split_mim_state_dict, verify_state_dict, weights_metadata)
from greenmim.mim import GreenMIM, SimMIM
from greenmim.models.family import family_of
from greenmim.train.config import add_model_kwargs_argument
from greenmim.train.validation import check_model_name

__all__ = ['KINDS', 'MERGE_ORDERS', 'AUTHORS_CODE', 'ZERO_PREDICTION', 'detect_kind', 'swap_merge_order', 'build_target', 'convert_state_dict',
           'merge_order_losses', 'sample_images', 'add_arguments', 'run']

KINDS = ('greenmim', 'simmim', 'classifier')
MERGE_ORDERS = ('swin', 'early')
AUTHORS_CODE = {  # the authors' code that concatenated 2x2 neighbours in each order (see docs/hub.md)
    'swin': 'x00,x10,x01,x11 (Swin\'s), as the authors\' code since their "fix misalignment in PatchMerging" commit',
    'early': 'x00,x01,x10,x11, as the authors\' code before that commit and their original release',
}
ZERO_PREDICTION = 'zero prediction'
_MERGE_KEY = re.compile(r'(.*\.)?layers\.\d+\.downsample\.(norm\.weight|norm\.bias|reduction\.weight)')
_SWIN_ORDER_FROM_EARLY = (0, 2, 1, 3)  # Swin's x00,x10,x01,x11 taken from the early x00,x01,x10,x11


def detect_kind(state_dict: Dict[str, torch.Tensor]) -> str:
    """``greenmim``, ``simmim`` or ``classifier`` from the keys of a checkpoint (either layout)."""
    if 'decoder_pred.weight' in state_dict:
        return 'greenmim'
    if 'decoder.0.weight' in state_dict or 'decoder.weight' in state_dict:
        return 'simmim'
    if is_mim_state_dict(state_dict):
        raise ValueError('checkpoint has encoder.* keys but no known decoder (decoder_pred.* of GreenMIM or '
                         'decoder.0.* of SimMIM): pass --kind explicitly if it is an encoder-only export')
    return 'classifier'


def swap_merge_order(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Permute the ``4C`` merged channels of every patch merging (``downsample.norm`` ``[4C]``,
    ``downsample.reduction`` ``[2C, 4C]``) from the early x00,x01,x10,x11 order to Swin's x00,x10,x01,x11.

    The permutation swaps the middle two ``C``-channel blocks, so it is its own inverse; LayerNorm statistics do
    not depend on the channel order, so the merged output is unchanged when the input order changes to match.
    """
    out = dict(state_dict)
    for k, v in state_dict.items():
        if _MERGE_KEY.fullmatch(k):
            blocks = v.chunk(4, dim=-1)
            out[k] = torch.cat([blocks[i] for i in _SWIN_ORDER_FROM_EARLY], dim=-1)
    return out


def _mim_decoder_kwargs(state_dict: Dict[str, torch.Tensor], decoder_heads: int) -> dict:
    """GreenMIM decoder size read off the decoder weights."""
    depth = len({k.split('.')[1] for k in state_dict if k.startswith('decoder_blocks.')})
    return dict(decoder_dim=state_dict['decoder_embed.weight'].shape[0], decoder_depth=depth,
                decoder_heads=decoder_heads)


def build_target(
        kind: str,
        model_name: str,
        state_dict: Dict[str, torch.Tensor],
        decoder_heads: int = 16,
        **model_kwargs,
) -> nn.Module:
    """The model a converted ``kind`` checkpoint must fit: GreenMIM / SimMIM around ``model_name``, or the timm
    classifier with as many classes as the checkpoint's head."""
    if kind == 'greenmim':
        return GreenMIM(model_name, **_mim_decoder_kwargs(state_dict, decoder_heads), **model_kwargs)
    if kind == 'simmim':
        return SimMIM(model_name, **model_kwargs)
    if kind == 'classifier':
        head = state_dict.get('head.fc.weight', state_dict.get('head.weight'))
        return timm.create_model(model_name, num_classes=0 if head is None else head.shape[0], **model_kwargs)
    raise ValueError(f'kind {kind!r} is not one of {KINDS}')


def convert_state_dict(
        state_dict: Dict[str, torch.Tensor],
        model_name: str,
        kind: str = 'auto',
        merge_order: str = 'swin',
        decoder_heads: int = 16,
        **model_kwargs,
) -> Tuple[Dict[str, torch.Tensor], nn.Module, List[str]]:
    """Authors' checkpoint -> ``(state dict in this package's layout, target model, notes)``.

    The state dict loads strictly into the returned target (a :class:`greenmim.GreenMIM`, :class:`greenmim.SimMIM`
    or timm classifier built from ``model_name`` and ``model_kwargs``); every key and shape is checked, and a
    ``ValueError`` lists missing, unexpected and mismatched keys otherwise.
    """
    if merge_order not in MERGE_ORDERS:
        raise ValueError(f'merge_order {merge_order!r} is not one of {MERGE_ORDERS}')
    kind = detect_kind(state_dict) if kind == 'auto' else kind
    target = build_target(kind, model_name, state_dict, decoder_heads, **model_kwargs)
    notes = []
    encoder, rest = (dict(state_dict), {}) if kind == 'classifier' else split_mim_state_dict(state_dict)
    encoder_model = target if kind == 'classifier' else target.encoder
    mask_token = encoder.pop('mask_token', None)  # SimMIM keeps it inside the encoder
    family = family_of(encoder_model)
    if family is None:
        raise ValueError(f'{model_name} is not a green model: convert writes checkpoints of green_* models')
    family.check_not_resampled(encoder, encoder_model)
    encoder = family.original_to_timm(encoder, encoder_model)
    if merge_order == 'early':
        encoder = swap_merge_order(encoder)
        notes.append('patch-merging channels permuted from x00,x01,x10,x11 to x00,x10,x01,x11')
    if kind == 'classifier':
        converted = encoder
    else:
        converted = {f'encoder.{k}': v for k, v in encoder.items()}
        if kind == 'simmim':
            if mask_token is not None:
                converted['mask_token'] = mask_token.reshape(1, 1, 1, -1)
            converted.update({re.sub(r'^decoder\.0\.', 'decoder.', k): v for k, v in rest.items()})
        else:
            pos_embed = rest.pop('decoder_pos_embed', None)
            if pos_embed is not None:
                ours = target.decoder_pos_embed
                diff = (pos_embed - ours).abs().max().item() if pos_embed.shape == ours.shape else float('inf')
                if not diff <= 1e-5:
                    raise ValueError(
                        f'decoder_pos_embed {tuple(pos_embed.shape)} is not the fixed MAE sin-cos embedding '
                        f'{tuple(ours.shape)} that GreenMIM decoders use (max |difference| {diff:.3g}): the converted '
                        'decoder would predict at the wrong positions')
                notes.append(f'dropped decoder_pos_embed (fixed sin-cos, equal to ours: max |difference| {diff:.1g})')
            converted.update(rest)
    verify_state_dict(converted, target.state_dict(), f'{type(target).__name__} around {model_name}')
    target.load_state_dict(converted)
    return converted, target, notes


def _mean_loss(target: nn.Module, images: torch.Tensor, num_masks: int) -> float:
    """Mean MIM loss of ``target`` over ``num_masks`` masks drawn from a generator seeded 0 (the same for every
    call)."""
    target.eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return sum(target(images, generator=generator).loss.item() for _ in range(num_masks)) / num_masks


def merge_order_losses(
        state_dict: Dict[str, torch.Tensor],
        model_name: str,
        images: torch.Tensor,
        num_masks: int = 4,
        decoder_heads: int = 16,
        **model_kwargs,
) -> Dict[str, float]:
    """MIM loss of a GreenMIM/SimMIM checkpoint converted with each merge order (keys :data:`MERGE_ORDERS`), on
    normalised ``images`` ``[B, 3, H, W]`` and ``num_masks`` fixed random masks, and under :data:`ZERO_PREDICTION`
    the loss of a decoder that predicts zeros with the same masks (for normalised pixels, about 1: a flat unit).
    A trained checkpoint reconstructs markedly better with the order it was trained with; with untrained weights
    the numbers say nothing."""
    losses = {}
    for order in MERGE_ORDERS:
        _, target, _ = convert_state_dict(state_dict, model_name, 'auto', order, decoder_heads, **model_kwargs)
        losses[order] = _mean_loss(target, images, num_masks)
    for p in (target.decoder_pred if isinstance(target, GreenMIM) else target.decoder).parameters():
        nn.init.zeros_(p)
    losses[ZERO_PREDICTION] = _mean_loss(target, images, num_masks)
    return losses


def sample_images(model: nn.Module, limit: int = 16) -> torch.Tensor:
    """The package's embedded photos (``greenmim.data``), preprocessed for ``model``: ``[N, 3, H, W]``."""
    from PIL import Image
    from greenmim.data import IMAGES_DIR
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    paths = sorted(IMAGES_DIR.glob('*.jpg'))[:limit]
    return torch.stack([transform(Image.open(p).convert('RGB')) for p in paths])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('checkpoint', type=Path, help="the authors' checkpoint (.pth / .safetensors)")
    parser.add_argument('output', type=Path, help='converted .safetensors file')
    parser.add_argument('--model', required=True, help='target timm model, e.g. green_swin_base')
    add_model_kwargs_argument(parser, 'extra timm kwargs for the target model, e.g. window_size=14')
    parser.add_argument('--kind', choices=('auto',) + KINDS, default='auto',
                        help='what the checkpoint holds (auto: from its keys)')
    parser.add_argument('--merge-order', choices=MERGE_ORDERS, default='swin',
                        help="the checkpoint's patch-merging concatenation: " + '; '.join(
                            f'{order}: {code}' for order, code in AUTHORS_CODE.items()) + ' (see docs/hub.md)')
    parser.add_argument('--decoder-heads', type=int, default=16, help='GreenMIM decoder heads (not in the weights)')
    parser.add_argument('--check-merge-order', action='store_true',
                        help='print the MIM loss on sample photos with each merge order (and of a zero prediction, '
                             'for scale), write nothing')
    parser.add_argument('--check-images', type=int, default=16, help='sample photos used by --check-merge-order')


def _report_merge_orders(state_dict: Dict[str, torch.Tensor], args: argparse.Namespace, num_masks: int = 4) -> None:
    """Print the MIM loss of each merge order, which authors' code concatenated in that order, and the loss of a
    zero prediction for scale."""
    if (args.kind if args.kind != 'auto' else detect_kind(state_dict)) == 'classifier':
        raise ValueError('--check-merge-order needs a GreenMIM or SimMIM pre-training checkpoint (it compares MIM '
                         'losses); a classifier fine-tuned with SimMIM\'s code uses Swin\'s order: convert it with '
                         'the default --merge-order swin')
    images = sample_images(timm.create_model(args.model, **args.model_kwargs), args.check_images)
    losses = merge_order_losses(state_dict, args.model, images, num_masks, args.decoder_heads, **args.model_kwargs)
    print(f'MIM loss on {len(images)} sample photos, {num_masks} masks each (lower is better):')
    for order in MERGE_ORDERS:
        print(f'  --merge-order {order:<5}  {losses[order]:.4f}   concatenation {AUTHORS_CODE[order]}')
    print(f'  {ZERO_PREDICTION:<20} {losses[ZERO_PREDICTION]:.4f}   for scale: a decoder that learned nothing')
    print(f'lower loss: --merge-order {min(MERGE_ORDERS, key=losses.get)}')


def run(args: argparse.Namespace) -> int:
    check_model_name(args.model)
    state_dict = read_checkpoint(args.checkpoint)[0]
    if args.check_merge_order:
        _report_merge_orders(state_dict, args)
        return 0
    converted, target, notes = convert_state_dict(
        state_dict, args.model, args.kind, args.merge_order, args.decoder_heads, **args.model_kwargs)
    is_mim = isinstance(target, (GreenMIM, SimMIM))
    metadata = weights_metadata('mim' if is_mim else 'classifier', args.model, args.model_kwargs,
                                wrapper=target if is_mim else None, merge_order=args.merge_order,
                                source=args.checkpoint.name)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    save_weights(converted, args.output, metadata)
    print(f'{args.checkpoint} -> {args.output}: {len(converted)} tensors verified against '
          f'{type(target).__name__}({args.model})')
    for note in notes:
        print(f'note: {note}')
    return 0


if __name__ == '__main__':  # python -m greenmim.hub.convert is `greenmim convert`
    from greenmim.cli import main
    sys.exit(main(['convert', *sys.argv[1:]]))
