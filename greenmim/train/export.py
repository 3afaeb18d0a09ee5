"""``greenmim export``: a checkpoint's encoder as timm weights.

Writes ``model.safetensors`` in timm's layout (for a MIM checkpoint: the encoder without the ``encoder.`` prefix
and no head; for a fine-tuned classifier: the whole model) and, for MIM checkpoints, ``mim_decoder.safetensors`` with
the decoder and mask token (file names and metadata: :mod:`greenmim.checkpoint`). Load the encoder with::

    timm.create_model('green_swin_base.mim_in1k', pretrained=True,
                      pretrained_cfg_overlay=dict(file='export/model.safetensors'))
"""
import argparse
import json
from pathlib import Path
from typing import Dict, Optional

import timm

from greenmim.checkpoint import (
    DECODER_FILE, WEIGHTS_FILE, check_written_for, is_mim_state_dict, load_verified, read_checkpoint,
    save_weights, split_mim_state_dict, weights_metadata, wrapper_metadata)

from .run_checkpoints import resolve_checkpoint
from .validation import check_model_name

__all__ = ['export', 'add_arguments', 'run']


def export(checkpoint, output_dir, model: Optional[str] = None, verify: bool = True) -> Dict[str, Path]:
    """Export ``checkpoint`` (run folder, checkpoint folder or ``.safetensors``) to the folder ``output_dir``.

    ``model`` is the architecture, read from the checkpoint's metadata when not given. With ``verify`` the written
    weights are loaded strictly into ``timm.create_model(model, **model_kwargs)``. Returns the written paths.
    """
    if model is not None:
        check_model_name(model)
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f'output folder {out} is an existing file: export writes model.safetensors (and '
                         f'{DECODER_FILE}) into a folder; pass another --output-dir')
    source = resolve_checkpoint(checkpoint)
    weights, metadata = read_checkpoint(source)
    name = model or metadata.get('model')
    if not name:
        raise ValueError(f'checkpoint {str(checkpoint)!r} does not name its model: pass model')
    check_written_for(metadata, name, checkpoint)
    is_mim = is_mim_state_dict(weights)
    encoder, decoder = split_mim_state_dict(weights) if is_mim else (weights, {})
    model_kwargs = json.loads(metadata.get('model_kwargs', '{}'))
    if is_mim:
        model_kwargs['num_classes'] = 0
    if verify:
        load_verified(timm.create_model(name, **model_kwargs), encoder, name, source=checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    paths = {'model': out / WEIGHTS_FILE}
    kind = 'encoder' if is_mim else 'classifier'
    save_weights(encoder, paths['model'], weights_metadata(kind, name, model_kwargs, source=str(source)))
    if decoder:
        paths['decoder'] = out / DECODER_FILE
        decoder_meta = weights_metadata('decoder', name, model_kwargs, source=str(source))
        save_weights(decoder, paths['decoder'], dict(decoder_meta, **wrapper_metadata(metadata)))
    return paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('checkpoint', help='run folder, checkpoint folder or .safetensors file')
    parser.add_argument('--output-dir', '-o', default='export', help='where to write model.safetensors')
    parser.add_argument('--model', default=None, help='architecture (default: from the checkpoint metadata)')
    parser.add_argument('--no-verify', dest='verify', action='store_false',
                        help='skip loading the exported weights into the timm model')


def run(args: argparse.Namespace) -> int:
    paths = export(args.checkpoint, args.output_dir, args.model, args.verify)
    for kind, path in paths.items():
        print(f'{kind}: {path}')
    return 0
