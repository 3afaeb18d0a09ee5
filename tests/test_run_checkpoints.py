"""A run's checkpoints/ folder under faults: a kill inside an overwrite or a deletion, stale leftovers, a full disk."""
import errno
import json

import pytest
import torch

from greenmim.checkpoint import read_checkpoint
from greenmim.train import run_checkpoints
from greenmim.train.run_checkpoints import CheckpointWriteError, resolve_checkpoint, save_checkpoint


class Killed(BaseException):
    """Stands for the process dying at this point (nothing after it runs)."""


def save(root, step, value, **kwargs):
    return save_checkpoint(root, step, {'w': torch.full((3,), float(value))}, {'model': 'm'}, {'step': step},
                           **kwargs)


def weights_of(root):
    return read_checkpoint(resolve_checkpoint(root))[0]['w'][0].item()


def complete(folder):
    return sorted(p.name for p in folder.iterdir()) == ['model.safetensors', 'training_state.pt']


def test_kill_inside_an_overwrite_leaves_a_complete_pointed_checkpoint(tmp_path, monkeypatch):
    save(tmp_path, 2, 1.0)
    replace = run_checkpoints.os.replace

    def die_before_the_new_folder_arrives(src, dst):
        if str(src).endswith('.tmp'):
            raise Killed
        return replace(src, dst)

    monkeypatch.setattr(run_checkpoints.os, 'replace', die_before_the_new_folder_arrives)
    with pytest.raises(Killed):
        save(tmp_path, 2, 2.0)  # e.g. resumed from an older checkpoint and reached step 2 again
    monkeypatch.undo()
    assert weights_of(tmp_path) == 1.0  # last.json still leads to a complete checkpoint: the previous one
    save(tmp_path, 3, 3.0, keep_last=5)  # the next save puts step 2 back and clears the leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == ['last.json', 'step-00000002', 'step-00000003']
    assert complete(tmp_path / 'step-00000002') and weights_of(tmp_path / 'step-00000002') == 1.0


def test_overwrite_replaces_the_folder(tmp_path):
    save(tmp_path, 2, 1.0)
    save(tmp_path, 2, 2.0)
    assert weights_of(tmp_path) == 2.0 and sorted(p.name for p in tmp_path.iterdir()) == [
        'last.json', 'step-00000002']


def test_kill_inside_a_deletion_leaves_no_half_deleted_checkpoint(tmp_path, monkeypatch):
    save(tmp_path, 2, 1.0, keep_last=1)

    def delete_one_file_then_die(path, *args, **kwargs):
        next(p for p in sorted(path.iterdir())).unlink()
        raise Killed

    monkeypatch.setattr(run_checkpoints.shutil, 'rmtree', delete_one_file_then_die)
    with pytest.raises(Killed):
        save(tmp_path, 4, 2.0, keep_last=1)  # deletes step 2 (not the best: best.json is never written here)
    monkeypatch.undo()
    steps = sorted(tmp_path.glob('step-*'))
    assert [p.name for p in steps] == ['step-00000004'] and all(complete(p) for p in steps)
    save(tmp_path, 6, 3.0, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['last.json', 'step-00000006']


def test_stale_leftovers_of_interrupted_saves_are_removed(tmp_path):
    save(tmp_path, 2, 1.0)
    (tmp_path / '.step-00000009.tmp').mkdir()
    (tmp_path / '.step-00000009.tmp' / 'model.safetensors').write_bytes(b'partial')
    (tmp_path / '.last.json.tmp').write_text('{"checkp')
    save(tmp_path, 4, 2.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['last.json', 'step-00000002',
                                                           'step-00000004']


def test_full_disk_removes_the_partial_checkpoint_and_keeps_the_last(tmp_path, monkeypatch):
    save(tmp_path, 2, 1.0, best=True)
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob('*') if p.is_file()}

    def write_half_then_fail(obj, path):
        open(path, 'wb').write(b'\0' * 100)
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(run_checkpoints.torch, 'save', write_half_then_fail)
    with pytest.raises(CheckpointWriteError, match='could not write checkpoint step-00000004 in .*: the disk is full'):
        save(tmp_path, 4, 2.0, best=True)
    after = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob('*') if p.is_file()}
    assert after == before and json.loads((tmp_path / 'last.json').read_text())['checkpoint'] == 'step-00000002'
