"""``greenmim export``: a checkpoint's encoder as timm weights.

Writes ``model.safetensors`` in timm's layout (for a MIM checkpoint: the encoder without the ``encoder.`` prefix
and no head; for a fine-tuned classifier: the whole model) and, for MIM checkpoints, ``mim_decoder.safetensors`` with
the decoder and mask token. Load the encoder with::

    timm.create_model('green_swin_base.mim_in1k', pretrained=True,
                      pretrained_cfg_overlay=dict(file='export/model.safetensors'))
"""
import argparse
import json
from pathlib import Path
from typing import Dict, Optional

import timm
from safetensors.torch import save_file

from greenmim.mim import DECODER_FILE, split_mim_state_dict

from .checkpoint import check_model_metadata, load_weights_into, read_weights, resolve_checkpoint

__all__ = ['export', 'add_arguments', 'run']


def export(checkpoint, output_dir, model: Optional[str] = None, verify: bool = True) -> Dict[str, Path]:
    """Export ``checkpoint`` (run folder, checkpoint folder or ``.safetensors``) to ``output_dir``.

    ``model`` is the architecture, read from the checkpoint's metadata when not given. With ``verify`` the written
    weights are loaded strictly into ``timm.create_model(model, **model_kwargs)``. Returns the written paths.
    """
    weights, metadata = read_weights(checkpoint)
    name = model or metadata.get('model')
    if not name:
        raise ValueError(f'checkpoint {str(checkpoint)!r} does not name its model: pass model')
    check_model_metadata(metadata, name, checkpoint)
    is_mim = any(k.startswith('encoder.') for k in weights)
    encoder, decoder = split_mim_state_dict(weights) if is_mim else (weights, {})
    model_kwargs = json.loads(metadata.get('model_kwargs', '{}'))
    if is_mim:
        model_kwargs['num_classes'] = 0
    info = {'format': 'greenmim', 'kind': 'encoder' if is_mim else 'classifier', 'model': name,
            'model_kwargs': json.dumps(model_kwargs), 'source': str(resolve_checkpoint(checkpoint))}
    if verify:
        load_weights_into(timm.create_model(name, **model_kwargs), encoder, checkpoint, name)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {'model': out / 'model.safetensors'}
    save_file({k: v.contiguous() for k, v in encoder.items()}, str(paths['model']), info)
    if decoder:
        paths['decoder'] = out / DECODER_FILE
        save_file({k: v.contiguous() for k, v in decoder.items()}, str(paths['decoder']), dict(info, kind='decoder', **{k: metadata[k] for k in ('mim_class', 'mim_kwargs') if k in metadata}))
    return paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('checkpoint', help='run folder, checkpoint folder or .safetensors file')
    parser.add_argument('--output-dir', '-o', default='export', help='where to write model.safetensors (default: export)')
    parser.add_argument('--model', default=None, help='architecture (default: from the checkpoint metadata)')
    parser.add_argument('--no-verify', dest='verify', action='store_false',
                        help='skip loading the exported weights into the timm model')


def run(args: argparse.Namespace) -> int:
    paths = export(args.checkpoint, args.output_dir, args.model, args.verify)
    for kind, path in paths.items():
        print(f'{kind}: {path}')
    return 0
