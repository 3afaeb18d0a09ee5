"""A run's ``checkpoints/`` folder: weights plus the training state, written atomically, with keep-last-N and
best/last pointers.

Layout::

    step-00000120/model.safetensors     weights in the checkpoint format of greenmim.checkpoint (kind mim | classifier)
    step-00000120/training_state.pt     optimizer, scheduler, scaler, RNG states of every rank, data position,
                                        config, metric history (torch.load(weights_only=True) safe)
    last.json, best.json                {"checkpoint": "step-00000120", "step": 120, ...}

A checkpoint folder is assembled under a temporary name and renamed into place (``os.replace``), and a pointer is
replaced only after its checkpoint is complete: an interrupted write leaves the previous checkpoint and pointers
intact.
"""
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import numpy as np
import torch
from safetensors.torch import save_file

from greenmim.checkpoint import WEIGHTS_FILE

__all__ = ['STATE_FILE', 'capture_rng_state', 'restore_rng_state', 'save_checkpoint', 'resolve_checkpoint',
           'read_training_state']

STATE_FILE = 'training_state.pt'


def capture_rng_state(generators: Mapping[str, torch.Generator] = None) -> Dict[str, Any]:
    """Python, numpy, torch (CPU and CUDA) RNG states and those of ``generators`` (by name, e.g. the mask
    generator as ``'mask'``), in types ``weights_only`` loads."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        'python': random.getstate(),
        'numpy': (kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss),
        'torch': torch.get_rng_state(),
        'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    state.update({name: generator.get_state() for name, generator in (generators or {}).items()})
    return state


def restore_rng_state(state: Dict[str, Any], generators: Mapping[str, torch.Generator] = None) -> None:
    """Inverse of :func:`capture_rng_state`."""
    python = state['python']
    random.setstate((python[0], tuple(python[1]), python[2]))
    kind, keys, pos, has_gauss, gauss = state['numpy']
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, gauss))
    torch.set_rng_state(state['torch'])
    if state['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])
    for name, generator in (generators or {}).items():
        if name in state:
            generator.set_state(state[name])


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f'.{path.name}.tmp')
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def save_checkpoint(
        root: Path,
        step: int,
        weights: Dict[str, torch.Tensor],
        metadata: Dict[str, str],
        training_state: Dict[str, Any],
        keep_last: int = 2,
        best: bool = False,
        pointer_fields: Optional[Dict[str, Any]] = None,
) -> Path:
    """Write ``root/step-<step>/`` atomically, point ``last.json`` (and ``best.json`` if ``best``) at it and delete
    all but the newest ``keep_last`` checkpoints (the best one is always kept). Returns the checkpoint folder."""
    root.mkdir(parents=True, exist_ok=True)
    name = f'step-{step:08d}'
    final, tmp = root / name, root / f'.{name}.tmp'
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / WEIGHTS_FILE), metadata)
    torch.save(training_state, tmp / STATE_FILE)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = dict(checkpoint=name, step=step, **(pointer_fields or {}))
    _write_json(root / 'last.json', pointer)
    if best:
        _write_json(root / 'best.json', pointer)
    keep = {name}
    if (root / 'best.json').exists():
        keep.add(json.loads((root / 'best.json').read_text())['checkpoint'])
    older = sorted(p.name for p in root.glob('step-*') if p.is_dir())
    for old in older[:max(len(older) - keep_last, 0)]:
        if old not in keep:
            shutil.rmtree(root / old)
    return final


def resolve_checkpoint(path) -> Path:
    """The weights file for ``path``: a ``.safetensors`` file, a checkpoint folder, a run's ``checkpoints/`` folder
    or a run folder (both resolved through ``last.json``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f'checkpoint {str(path)!r} does not exist')
    if path.is_file():
        if path.suffix != '.safetensors':
            raise ValueError(f'{str(path)!r} is not a .safetensors weights file')
        return path
    for folder in (path, path / 'checkpoints'):
        if (folder / WEIGHTS_FILE).is_file():
            return folder / WEIGHTS_FILE
        if (folder / 'last.json').is_file():
            return folder / json.loads((folder / 'last.json').read_text())['checkpoint'] / WEIGHTS_FILE
    raise FileNotFoundError(f'no {WEIGHTS_FILE} or last.json pointer in {str(path)!r}')


def read_training_state(path) -> Dict[str, Any]:
    """The training state stored beside the weights of the checkpoint at ``path`` (see :func:`resolve_checkpoint`)."""
    file = resolve_checkpoint(path).with_name(STATE_FILE)
    if not file.is_file():
        raise FileNotFoundError(f'{str(file)!r} not found: the checkpoint has no training state to resume from')
    return torch.load(file, map_location='cpu', weights_only=True)
