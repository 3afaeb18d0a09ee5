"""A run's ``checkpoints/`` folder: weights plus the training state, written atomically, with keep-last-N and
best/last pointers.

Layout::

    step-00000120/model.safetensors     weights in the checkpoint format of greenmim.checkpoint (kind mim | classifier)
    step-00000120/training_state.pt     optimizer, scheduler, scaler, RNG states of every rank, data position,
                                        config, metric history (torch.load(weights_only=True) safe)
    last.json, best.json                {"checkpoint": "step-00000120", "step": 120, ...}

A checkpoint folder is assembled under a temporary name (``.step-N.tmp``) and renamed into place (``os.replace``),
and a pointer is replaced only after its checkpoint is complete: an interrupted write leaves the previous checkpoint
and pointers intact. Overwriting an existing ``step-N`` renames it to ``.step-N.old`` first and deletes that only
after the new folder is in place; if the process dies between the two renames, readers take ``.step-N.old`` and the
next save puts it back. A checkpoint is deleted by renaming it to ``.step-N.trash`` first, so an interrupted
deletion never leaves a half-deleted folder under a checkpoint's name. Each save first clears what an interrupted one
left (``.tmp``, ``.trash``, ``.old``). A failed write (disk full) removes its partial folder and raises
:class:`CheckpointWriteError`; the previous checkpoint and pointers stay as they were.
"""
import errno
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import numpy as np
import torch

from greenmim.checkpoint import WEIGHTS_FILE, load_torch_file, save_weights

__all__ = ['STATE_FILE', 'CheckpointWriteError', 'capture_rng_state', 'restore_rng_state', 'save_checkpoint',
           'resolve_checkpoint', 'training_state_file', 'read_training_state']

STATE_FILE = 'training_state.pt'


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. the disk is full); the previous checkpoint and pointers are intact."""


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


def _write_failed(what: str, root: Path, error: OSError) -> CheckpointWriteError:
    cause = 'the disk is full' if error.errno == errno.ENOSPC else (error.strerror or str(error))
    return CheckpointWriteError(
        f'could not write {what} in {root}: {cause}. The partial files were removed; the previous checkpoint and '
        'last.json / best.json are unchanged (free space, then --resume)')


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f'.{path.name}.tmp')
    try:
        tmp.write_text(json.dumps(obj, indent=1))
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _write_failed(path.name, path.parent, e) from e
    os.replace(tmp, path)


def _clear_interrupted_saves(root: Path) -> None:
    """Remove what an interrupted save or deletion left in ``root``; put back a ``step-N`` that an overwrite had
    moved aside when the new one never arrived."""
    for leftover in [*root.glob('.step-*.tmp'), *root.glob('.step-*.trash')]:
        shutil.rmtree(leftover)
    for leftover in root.glob('.*.json.tmp'):
        leftover.unlink()
    for previous in root.glob('.step-*.old'):
        final = root / previous.name[1:-len('.old')]
        if final.exists():
            shutil.rmtree(previous)
        else:
            os.replace(previous, final)


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename the complete ``tmp`` to ``final``; an existing ``final`` is moved aside first and deleted after."""
    if not final.exists():
        os.replace(tmp, final)
        return
    previous = final.with_name(f'.{final.name}.old')
    os.replace(final, previous)
    os.replace(tmp, final)
    shutil.rmtree(previous)


def _delete(folder: Path) -> None:
    trash = folder.with_name(f'.{folder.name}.trash')
    os.replace(folder, trash)
    shutil.rmtree(trash)


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
    all but the newest ``keep_last`` checkpoints (the best one is always kept). Returns the checkpoint folder.

    Raises:
        CheckpointWriteError: writing failed (e.g. the disk is full); nothing partial is left behind.
    """
    root.mkdir(parents=True, exist_ok=True)
    _clear_interrupted_saves(root)
    name = f'step-{step:08d}'
    final, tmp = root / name, root / f'.{name}.tmp'
    try:
        tmp.mkdir()
        save_weights(weights, tmp / WEIGHTS_FILE, metadata)
        torch.save(training_state, tmp / STATE_FILE)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_failed(f'checkpoint {name}', root, e) from e
    _move_into_place(tmp, final)
    pointer = dict(checkpoint=name, step=step, **(pointer_fields or {}))
    _write_json(root / 'last.json', pointer)
    if best:
        _write_json(root / 'best.json', pointer)
    keep = {name}
    if (root / 'best.json').exists():
        keep.add(_pointed_name(root, 'best.json'))
    older = sorted(p.name for p in root.glob('step-*') if p.is_dir())
    for old in older[:max(len(older) - keep_last, 0)]:
        if old not in keep:
            _delete(root / old)
    return final


def _pointed_name(folder: Path, pointer: str) -> str:
    path = folder / pointer
    try:
        return json.loads(path.read_text())['checkpoint']
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f'{path} is not a checkpoint pointer ({{"checkpoint": "step-..."}}): {e}') from e


def _pointed_checkpoint(folder: Path) -> Path:
    """The checkpoint folder ``folder/last.json`` points at (its ``.old`` copy while an overwrite of it was
    interrupted between its two renames)."""
    name = _pointed_name(folder, 'last.json')
    target, previous = folder / name, folder / f'.{name}.old'
    return previous if not target.is_dir() and previous.is_dir() else target


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
            return _pointed_checkpoint(folder) / WEIGHTS_FILE
    raise FileNotFoundError(f'no {WEIGHTS_FILE} or last.json pointer in {str(path)!r}')


def training_state_file(path) -> Path:
    """The training state file beside the weights of the checkpoint at ``path`` (see :func:`resolve_checkpoint`);
    ``FileNotFoundError`` if either is missing."""
    weights = resolve_checkpoint(path)
    if not weights.is_file():
        raise FileNotFoundError(f'{str(weights)!r} not found: the checkpoint {str(path)!r} points at has no weights')
    file = weights.with_name(STATE_FILE)
    if not file.is_file():
        raise FileNotFoundError(f'{str(file)!r} not found: the checkpoint has no training state to resume from')
    return file


def read_training_state(path) -> Dict[str, Any]:
    """The training state stored beside the weights of the checkpoint at ``path`` (see :func:`resolve_checkpoint`)."""
    return load_torch_file(training_state_file(path))
