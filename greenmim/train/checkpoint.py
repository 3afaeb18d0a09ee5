"""Checkpoints: weights as safetensors plus the training state, written atomically, with keep-last-N and
best/last pointers.

Layout of a run's ``checkpoints/`` folder::

    step-00000120/model.safetensors     weights; metadata: format, kind (mim | classifier), model, model_kwargs
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
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

__all__ = [
    'WEIGHTS_NAME', 'STATE_NAME', 'capture_rng_state', 'restore_rng_state', 'save_checkpoint', 'resolve_checkpoint',
    'read_weights', 'read_training_state', 'check_model_metadata', 'load_weights_into',
]

WEIGHTS_NAME = 'model.safetensors'
STATE_NAME = 'training_state.pt'


def capture_rng_state(mask_generator: Optional[torch.Generator] = None) -> Dict[str, Any]:
    """Python, numpy, torch (CPU and CUDA) and mask-generator RNG states, in types ``weights_only`` loads."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        'python': random.getstate(),
        'numpy': (kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss),
        'torch': torch.get_rng_state(),
        'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if mask_generator is not None:
        state['mask'] = mask_generator.get_state()
    return state


def restore_rng_state(state: Dict[str, Any], mask_generator: Optional[torch.Generator] = None) -> None:
    """Inverse of :func:`capture_rng_state`."""
    python = state['python']
    random.setstate((python[0], tuple(python[1]), python[2]))
    kind, keys, pos, has_gauss, gauss = state['numpy']
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, gauss))
    torch.set_rng_state(state['torch'])
    if state['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])
    if mask_generator is not None and 'mask' in state:
        mask_generator.set_state(state['mask'])


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
        pointer_info: Optional[Dict[str, Any]] = None,
) -> Path:
    """Write ``root/step-<step>/`` atomically, point ``last.json`` (and ``best.json`` if ``best``) at it and delete
    all but the newest ``keep_last`` checkpoints (the best one is always kept). Returns the checkpoint folder."""
    root.mkdir(parents=True, exist_ok=True)
    name = f'step-{step:08d}'
    final, tmp = root / name, root / f'.{name}.tmp'
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / WEIGHTS_NAME), metadata)
    torch.save(training_state, tmp / STATE_NAME)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    info = dict(checkpoint=name, step=step, **(pointer_info or {}))
    _write_json(root / 'last.json', info)
    if best:
        _write_json(root / 'best.json', info)
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
        if (folder / WEIGHTS_NAME).is_file():
            return folder / WEIGHTS_NAME
        if (folder / 'last.json').is_file():
            return folder / json.loads((folder / 'last.json').read_text())['checkpoint'] / WEIGHTS_NAME
    raise FileNotFoundError(f'no {WEIGHTS_NAME} or last.json pointer in {str(path)!r}')


def read_weights(path) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """``(state_dict, metadata)`` of the checkpoint at ``path`` (see :func:`resolve_checkpoint`)."""
    file = resolve_checkpoint(path)
    with safe_open(str(file), 'pt') as f:
        metadata = f.metadata() or {}
    return load_file(str(file)), metadata


def read_training_state(path) -> Dict[str, Any]:
    """The training state stored beside the weights of the checkpoint at ``path``."""
    file = resolve_checkpoint(path).with_name(STATE_NAME)
    if not file.is_file():
        raise FileNotFoundError(f'{str(file)!r} not found: the checkpoint has no training state to resume from')
    return torch.load(file, map_location='cpu', weights_only=True)


def check_model_metadata(metadata: Dict[str, str], model_name: str, source) -> None:
    """Raise ``ValueError`` if a greenmim checkpoint's metadata names another architecture than ``model_name``."""
    written_for = metadata.get('model')
    if written_for and written_for.split('.')[0] != model_name.split('.')[0]:
        raise ValueError(f'checkpoint {str(source)!r} was written for model {written_for!r}, not {model_name!r}: '
                         f'pass --model {written_for} or another checkpoint')


def load_weights_into(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], source, model_name: str,
                      optional_missing=()) -> None:
    """Load ``state_dict`` into ``model`` strictly, except keys starting with one of ``optional_missing``; raise
    ``ValueError`` naming the mismatch (another architecture or size) instead of a long ``RuntimeError``."""
    own = model.state_dict()
    unexpected = sorted(set(state_dict) - set(own))
    missing = sorted(k for k in set(own) - set(state_dict) if not k.startswith(tuple(optional_missing)))
    wrong = sorted(k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    if unexpected or missing or wrong:
        details = [f'{len(x)} {what}, e.g. {x[0]!r}' for x, what in (
            (missing, 'missing keys'), (unexpected, 'unexpected keys'), (wrong, 'tensors of another shape')) if x]
        raise ValueError(f'checkpoint {str(source)!r} does not fit {model_name} ({"; ".join(details)}): '
                         'was it written for another model or model size?')
    model.load_state_dict(state_dict, strict=False)
