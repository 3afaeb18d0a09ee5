"""A weights source as a user writes it -> the ``pretrained_cfg_overlay`` of ``timm.create_model(...,
pretrained=True)``, :func:`greenmim.hub.load_pretrained` and :func:`greenmim.hub.load_mim_pretrained`.

Sources:

- a Hub repository id, ``org/name``;
- ``local-dir:/path``, a folder holding ``model.safetensors`` (written by ``greenmim publish`` or ``greenmim export``);
- a weights file in timm's layout (``greenmim export``'s ``model.safetensors``; its ``mim_decoder.safetensors``
  beside it is the decoder);
- a MIM checkpoint (a ``greenmim pretrain`` run or checkpoint folder, a ``greenmim convert`` output): exported to
  timm's layout first (``greenmim export``), into a folder of the greenmim cache (``$XDG_CACHE_HOME/greenmim/
  exports``, default ``~/.cache``), never into the run.

The notebooks' other inputs, with errors of one line that say what to set instead: a Hugging Face dataset
(:func:`load_hub_dataset`) and a file on Google Drive (:func:`google_drive_file`).
"""
import hashlib
import os
from pathlib import Path
from typing import Any, Dict, Optional

import safetensors

from greenmim.checkpoint import WEIGHTS_FILE, is_mim_state_dict
from greenmim.offline import connection_error, hub_reachable, is_hub_id
from greenmim.train.export import export
from greenmim.train.run_checkpoints import resolve_checkpoint

__all__ = ['weights_overlay', 'export_cache_dir', 'load_hub_dataset', 'google_drive_file']

_LOCAL_DIR = 'local-dir:'
_WEIGHTS_KINDS = ('a greenmim pretrain run folder, a model.safetensors written by greenmim export (or '
                  'convert_official.ipynb), a local-dir:/path folder or a Hub id org/name')


def _first_line(error: Exception) -> str:
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)


def export_cache_dir(source: Path) -> Path:
    """Where :func:`weights_overlay` exports the MIM checkpoint ``source``: one folder per checkpoint file."""
    cache = Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache')
    key = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:16]
    return cache / 'greenmim' / 'exports' / f'{source.parent.name}-{key}'


def weights_overlay(weights: str, export_dir: Optional[str] = None) -> Dict[str, Any]:
    """The ``pretrained_cfg_overlay`` that loads ``weights`` (see the module docstring); a MIM checkpoint is
    exported to ``export_dir`` first (default :func:`export_cache_dir`; reused while newer than the checkpoint).
    ``FileNotFoundError`` (one line, naming what ``weights`` may be) when there is no such file or folder."""
    if weights.startswith(_LOCAL_DIR):
        return dict(source='local-dir', file=weights[len(_LOCAL_DIR):])
    path = Path(weights).expanduser()
    if not path.exists():
        if is_hub_id(weights):
            hub_reachable(weights)
            return dict(hf_hub_id=weights)
        raise FileNotFoundError(f'weights {weights!r}: no such file or folder. Set weights to {_WEIGHTS_KINDS}')
    if path.is_file() and path.suffix != '.safetensors':
        raise ValueError(f'{weights!r} is not a .safetensors file: convert the authors\' checkpoints with '
                         '`greenmim convert` first')
    source = resolve_checkpoint(path)
    with safetensors.safe_open(source, 'pt') as f:
        if not is_mim_state_dict(f.keys()):
            return dict(file=str(source))
    out = Path(export_dir) if export_dir else export_cache_dir(source)
    exported = out / WEIGHTS_FILE
    if not exported.is_file() or exported.stat().st_mtime < source.stat().st_mtime:
        export(source, out)
    return dict(file=str(exported))


def load_hub_dataset(name: str, split: str):
    """``datasets.load_dataset(name, split=split)`` from the Hub (or the HF cache offline); one-line
    ``FileNotFoundError`` saying to set a local image folder instead when it cannot be had."""
    from datasets import load_dataset
    hub_reachable(f'dataset {name}')
    try:
        return load_dataset(name, split=split)
    except Exception as e:  # datasets raises many types (connection, offline, missing repository or split)
        raise FileNotFoundError(f'dataset {name!r} (split {split!r}) could not be loaded ({_first_line(e)}): set '
                                'dataset to a local image folder laid out root/<class>/<image>') from None


def google_drive_file(file_id: str, path: Path) -> Path:
    """``path``, downloaded from Google Drive with ``gdown`` first if it is not there; one-line
    ``FileNotFoundError`` (download it by hand and set the notebook's ``checkpoint``) when that cannot be done."""
    path = Path(path)
    if path.is_file():
        return path
    url = f'https://drive.google.com/file/d/{file_id}/view'
    by_hand = f'download {url} by hand and set checkpoint to the file'
    error = connection_error('https://drive.google.com')
    if error is not None:
        raise FileNotFoundError(f'{path} is not there and Google Drive does not answer ({error}): {by_hand}')
    try:
        import gdown
    except ImportError:
        raise FileNotFoundError(f"{path} is not there and gdown is not installed (pip install -e '.[examples]'): "
                                f'{by_hand}') from None
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        gdown.download(id=file_id, output=str(path))
    except Exception as e:  # gdown raises many types (quota, permission, connection)
        raise FileNotFoundError(f'Google Drive refused {url} ({_first_line(e)}): {by_hand}') from None
    if not path.is_file():
        raise FileNotFoundError(f'gdown wrote no {path}: {by_hand}')
    return path
