"""A weights source as a user writes it -> the ``pretrained_cfg_overlay`` of ``timm.create_model(...,
pretrained=True)``, :func:`greenmim.hub.load_pretrained` and :func:`greenmim.hub.load_mim_pretrained`.

Sources:

- a Hub repository id, ``org/name``;
- ``local-dir:/path``, a folder holding ``model.safetensors`` (written by ``greenmim publish`` or ``greenmim export``);
- a weights file in timm's layout (``greenmim export``'s ``model.safetensors``; its ``mim_decoder.safetensors``
  beside it is the decoder);
- a MIM checkpoint (a ``greenmim pretrain`` run or checkpoint folder, a ``greenmim convert`` output): exported to
  timm's layout first (``greenmim export``), into ``<checkpoint stem>-timm/`` beside it.
"""
from pathlib import Path
from typing import Any, Dict, Optional

import safetensors

from greenmim.checkpoint import WEIGHTS_FILE, is_mim_state_dict
from greenmim.train.export import export
from greenmim.train.run_checkpoints import resolve_checkpoint

__all__ = ['weights_overlay']

_LOCAL_DIR = 'local-dir:'


def weights_overlay(weights: str, export_dir: Optional[str] = None) -> Dict[str, Any]:
    """The ``pretrained_cfg_overlay`` that loads ``weights`` (see the module docstring); a MIM checkpoint is
    exported to ``export_dir`` first (default ``<checkpoint stem>-timm/`` beside it; reused while newer than the
    checkpoint)."""
    if weights.startswith(_LOCAL_DIR):
        return dict(source='local-dir', file=weights[len(_LOCAL_DIR):])
    path = Path(weights).expanduser()
    if not path.exists():
        if weights.count('/') == 1 and not weights.startswith(('.', '/', '~')):
            return dict(hf_hub_id=weights)
        raise FileNotFoundError(f'weights {weights!r}: no such file or folder (nor a Hub id org/name)')
    if path.is_file() and path.suffix != '.safetensors':
        raise ValueError(f'{weights!r} is not a .safetensors file: convert the authors\' checkpoints with '
                         '`greenmim convert` first')
    source = resolve_checkpoint(path)
    with safetensors.safe_open(source, 'pt') as f:
        if not is_mim_state_dict(f.keys()):
            return dict(file=str(source))
    out = Path(export_dir) if export_dir else source.with_name(f'{source.stem}-timm')
    exported = out / WEIGHTS_FILE
    if not exported.is_file() or exported.stat().st_mtime < source.stat().st_mtime:
        export(source, out)
    return dict(file=str(exported))
