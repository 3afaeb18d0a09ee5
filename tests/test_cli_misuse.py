"""The ``greenmim`` command under misuse: a table of bad flag values and broken files, each of which must end in a
one-line ``greenmim <command>: error: ...`` and a non-zero exit, never a traceback, and leave every existing
checkpoint as it was; then the run-folder protection and lock, and a full disk."""
import errno
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from timm.models.swin_transformer import PatchMerging

from greenmim.cli import main
from greenmim.train import pretrain, run_checkpoints
from greenmim.train.run_folder import LOCK_FILE
from train_fixtures import copy_photos, make_two_class_folder, tiny_pretrain_config

TINY = ['--model', 'green_swin_tiny', '--input-size', '64', '--model-kwargs', 'embed_dim=24', 'depths=(1,1,1,1)',
        'num_heads=(1,1,2,2)', 'window_size=2', '--num-workers', '0', '--warmup-epochs', '0', '--lr', '1e-3',
        '--batch-size', '4', '--epochs', '1']
PRETRAIN = ['pretrain', *TINY, '--decoder-dim', '32', '--vis-every', '0']


@pytest.fixture(scope='module')
def ctx(tmp_path_factory):
    """A finished 2-step run, the photos it trained on, and a 2-class folder; ``ctx.out`` is a fresh folder."""
    root = tmp_path_factory.mktemp('misuse')
    photos = copy_photos(root / 'photos', 8)
    pretrain(tiny_pretrain_config(root / 'run', data=str(photos)))
    return type('Ctx', (), dict(root=root, run=root / 'run', photos=photos, out=root / 'new',
                                classes=make_two_class_folder(root / 'classes', 2, seed=0),
                                one_class=copy_photos(root / 'one_class' / 'photos', 4).parent))


def tree_digest(folder: Path) -> str:
    """sha256 over every file's relative path and bytes under ``folder``."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob('*') if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b'\0' + path.read_bytes())
    return digest.hexdigest()


def run_cli(argv, capsys):
    """``(exit status, stderr)`` of ``greenmim ARGV`` run in this process (a usage error exits through argparse)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def assert_one_line_error(command, code, err, pattern):
    assert code != 0 and 'Traceback' not in err, err
    errors = [line for line in err.splitlines() if 'error:' in line]
    assert len(errors) == 1 and errors[0] == err.strip().splitlines()[-1], err
    assert errors[0].startswith(f'greenmim {command}: error: '), err
    assert re.search(pattern, errors[0]), (pattern, errors[0])


def copy_run(ctx, name):
    return Path(shutil.copytree(ctx.run, ctx.root / name, dirs_exist_ok=True))


def corrupt_weights(ctx):
    run = copy_run(ctx, 'corrupt_weights')
    weights = run / 'checkpoints' / 'step-00000002' / 'model.safetensors'
    weights.write_bytes(weights.read_bytes()[:5000])
    return [*PRETRAIN, '--data', ctx.photos, '--epochs', 2, '--resume', run, '--output-dir', run]


def corrupt_state(ctx):
    run = copy_run(ctx, 'corrupt_state')
    state = run / 'checkpoints' / 'step-00000002' / 'training_state.pt'
    state.write_bytes(state.read_bytes()[:3000])
    return [*PRETRAIN, '--data', ctx.photos, '--epochs', 2, '--resume', run, '--output-dir', run]


def pickled_class_in_state(ctx):
    run = copy_run(ctx, 'pickle_state')
    torch.save({'position': {}, 'hook': PatchMerging}, run / 'checkpoints' / 'step-00000002' / 'training_state.pt')
    return [*PRETRAIN, '--data', ctx.photos, '--epochs', 2, '--resume', run, '--output-dir', run]


def broken_pointer(ctx):
    run = copy_run(ctx, 'broken_pointer')
    (run / 'checkpoints' / 'last.json').write_text('{"checkpoint": ')
    return [*PRETRAIN, '--data', ctx.photos, '--epochs', 2, '--resume', run, '--output-dir', run]


def hub_folder(ctx, config_text):
    """A Hub-format folder (timm's weights file without greenmim metadata, and ``config_text`` as config.json)."""
    folder = ctx.root / f'hub_{hashlib.sha256(config_text.encode()).hexdigest()[:8]}'
    folder.mkdir(exist_ok=True)
    weights = safetensors.torch.load_file(run_checkpoints.resolve_checkpoint(ctx.run))
    safetensors.torch.save_file({k[len('encoder.'):]: v for k, v in weights.items() if k.startswith('encoder.')},
                                folder / 'model.safetensors', metadata={'format': 'pt'})
    (folder / 'config.json').write_text(config_text)
    return folder


def all_unreadable(ctx):
    bad = ctx.root / 'unreadable'
    bad.mkdir(exist_ok=True)
    for i in range(4):
        (bad / f'{i}.png').write_bytes(b'not a png')
    return [*PRETRAIN, '--data', bad, '--output-dir', ctx.out / 'unreadable']


def existing_file(ctx):
    (ctx.root / 'a_file').write_text('x')
    return ['export', ctx.run, '-o', ctx.root / 'a_file']


def broken_local_dir_model(ctx):
    folder = ctx.root / 'local_model'
    folder.mkdir(exist_ok=True)
    (folder / 'config.json').write_text('{"architecture": ')
    return [*PRETRAIN[:1], '--model', f'local-dir:{folder}', '--output-dir', ctx.out / 'local']


def pretrain_with(*flags):
    return lambda ctx: [*PRETRAIN, '--data', ctx.photos, '--output-dir', ctx.out / 'p', *flags]


def finetune_with(*flags):
    return lambda ctx: ['finetune', *TINY, '--data', ctx.classes, '--output-dir', ctx.out / 'f', *flags]


CASES = [  # (id, argv from ctx, what the error line says)
    ('save-every 0', pretrain_with('--save-every', 0), r'--save-every must be an integer >= 1, got 0'),
    ('log-every 0', pretrain_with('--log-every', 0), r'--log-every must be an integer >= 1'),
    ('batch-size 0', pretrain_with('--batch-size', 0), r'--batch-size must be an integer >= 1, got 0'),
    ('batch-size -2', pretrain_with('--batch-size', -2), r'--batch-size must be an integer >= 1, got -2'),
    ('accum-iter 0', pretrain_with('--accum-iter', 0), r'--accum-iter must be an integer >= 1'),
    ('epochs 0', pretrain_with('--epochs', 0), r'--epochs must be an integer >= 1'),
    ('max-steps 0', pretrain_with('--max-steps', 0), r'--max-steps must be an integer >= 1 \(or unset\)'),
    ('keep-last 0', pretrain_with('--keep-last', 0), r'--keep-last must be an integer >= 1'),
    ('lr -1', pretrain_with('--lr', -1), r'--lr must be a number > 0 \(or unset\), got -1.0'),
    ('lr nan', pretrain_with('--lr', 'nan'), r'--lr must be a number > 0'),
    ('blr 0', pretrain_with('--blr', 0), r'--blr must be a number > 0'),
    ('warmup -1', pretrain_with('--warmup-epochs', -1), r'--warmup-epochs must be a number >= 0'),
    ('workers -1', pretrain_with('--num-workers', -1), r'--num-workers must be an integer >= 0'),
    ('seed -1', pretrain_with('--seed', -1), r'--seed must be an integer >= 0'),
    ('betas', pretrain_with('--betas', 0.9, 1.5), r'--betas must each be a number in \[0, 1\)'),
    ('mask-ratio 0', pretrain_with('--mask-ratio', 0), r'--mask-ratio must be a number in \(0, 1\)'),
    ('mask-ratio 1', pretrain_with('--mask-ratio', 1), r'--mask-ratio must be a number in \(0, 1\)'),
    ('mask-ratio masks nothing', pretrain_with('--mask-ratio', 0.1), r'mask_ratio 0.1 masks no unit of the 2x2'),
    ('decoder-dim 0', pretrain_with('--decoder-dim', 0), r'--decoder-dim must be an integer >= 1'),
    ('input-size 48', pretrain_with('--input-size', 48), r'--input-size 48 is not a multiple of the 32-pixel mask'),
    ('input-size vs window', pretrain_with('--input-size', 96), r'stage grid \(3, 3\) is not divisible by window'),
    ('img_size kwarg', pretrain_with('--model-kwargs', 'img_size=64'), r'set the image size with --input-size'),
    ('batch-size abc', pretrain_with('--batch-size', 'abc'), r"argument --batch-size: invalid int value: 'abc'"),
    ('method', pretrain_with('--method', 'mae'), r"argument --method: invalid choice: 'mae'"),
    ('unknown model', pretrain_with('--model', 'green_swin_huge'), r"unknown model 'green_swin_huge'"),
    ('not a green model', pretrain_with('--model', 'resnet18'), r'--model resnet18 is not a green model'),
    ('unknown model kwarg', pretrain_with('--model-kwargs', 'wnidow_size=2'),
     r"--model green_swin_tiny does not take these arguments \(.*'wnidow_size'\): check --model-kwargs"),
    ('broken local-dir config.json', broken_local_dir_model, r'local_model/config.json is not valid JSON'),
    ('run folder exists', lambda ctx: [*PRETRAIN, '--data', ctx.photos, '--output-dir', ctx.run],
     r'already holds a run \(checkpoints, config.json, log.jsonl\): pass --resume .* --overwrite'),
    ('resume and overwrite', lambda ctx: [*PRETRAIN, '--data', ctx.photos, '--resume', ctx.run, '--output-dir',
                                          ctx.run, '--overwrite'], r'--overwrite would delete the checkpoint'),
    ('resume missing', pretrain_with('--resume', '/no/such/run'), r"checkpoint '/no/such/run' does not exist"),
    ('max-steps below resumed step', lambda ctx: [*PRETRAIN, '--data', ctx.photos, '--epochs', 3, '--max-steps', 2,
                                                  '--resume', ctx.run, '--output-dir', ctx.run],
     r'--max-steps 2 is not above step 2, where .* resumes: nothing to train'),
    ('resume a finished run', lambda ctx: [*PRETRAIN, '--data', ctx.photos, '--resume', ctx.run, '--output-dir',
                                           ctx.run], r'has completed 1 of --epochs 1: nothing to train'),
    ('corrupt model.safetensors', corrupt_weights, r'model.safetensors \(5000 bytes\) cannot be read: it is truncated'),
    ('corrupt training_state.pt', corrupt_state, r'training_state.pt \(3000 bytes\) cannot be read: it is truncated'),
    ('refused pickle', pickled_class_in_state,
     r'training_state.pt holds Python objects .*\(timm.models.swin_transformer.PatchMerging\), which are not '
     r'unpickled for safety'),
    ('broken last.json', broken_pointer, r'last.json is not a checkpoint pointer'),
    ('all images unreadable', all_unreadable, r'epoch 0 trained nothing: every micro-batch was skipped \(4 images'),
    ('num-classes 1', finetune_with('--num-classes', 1), r'--num-classes must be an integer >= 2 \(or unset\)'),
    ('one class', lambda ctx: ['finetune', *TINY, '--data', ctx.one_class, '--output-dir', ctx.out / 'f1'],
     r'has 1 class: a classifier needs at least 2'),
    ('smoothing 1', finetune_with('--smoothing', 1), r'--smoothing must be a number in \[0, 1\)'),
    ('layer-decay 0', finetune_with('--layer-decay', 0), r'--layer-decay must be a number in \(0, 1\]'),
    ('finetune without data', lambda ctx: ['finetune', *TINY, '--output-dir', ctx.out / 'f2'],
     r'finetune needs labelled data \(--data\)'),
    ('checkpoint of another architecture', lambda ctx: [
        'finetune', *TINY, '--data', ctx.classes, '--output-dir', ctx.out / 'f3', '--checkpoint',
        hub_folder(ctx, json.dumps({'architecture': 'green_swin_small', 'num_classes': 0}))],
     r"written for model 'green_swin_small', not 'green_swin_tiny'"),
    ('checkpoint with broken config.json', lambda ctx: [
        'finetune', *TINY, '--data', ctx.classes, '--output-dir', ctx.out / 'f4', '--checkpoint',
        hub_folder(ctx, '{"architecture": "green_swin_tiny",')], r'config.json is not valid JSON'),
    ('export -o an existing file', existing_file, r'a_file is an existing file'),
    ('export unknown model', lambda ctx: ['export', ctx.run, '--model', 'green_swin_huge', '-o', ctx.out / 'e'],
     r"unknown model 'green_swin_huge'"),
    ('export corrupt weights', lambda ctx: ['export', corrupt_weights(ctx)[-1], '-o', ctx.out / 'e2'],
     r'model.safetensors \(5000 bytes\) cannot be read'),
    ('convert unknown model', lambda ctx: ['convert', ctx.run / 'x.pth', ctx.out / 'c', '--model', 'swin_huge'],
     r"unknown model 'swin_huge'"),
    ('publish unknown model', lambda ctx: ['publish', ctx.run / 'x.pth', '--model', 'swin_huge', '--tag', 'mim_in1k',
                                           '--out', ctx.out / 'pub', '--dry-run'], r"unknown model 'swin_huge'"),
    ('convert model kwarg not KEY=VALUE', lambda ctx: [
        'convert', ctx.run / 'x.pth', ctx.out / 'c', '--model', 'green_swin_tiny', '--model-kwargs', '{"a": 1}'],
     r"argument --model-kwargs: '\{\"a\": 1\}' is not KEY=VALUE"),
    ('pretrain model kwarg not KEY=VALUE', pretrain_with('--model-kwargs', 'window_size'),
     r"argument --model-kwargs: 'window_size' is not KEY=VALUE"),
    ('amp choice', pretrain_with('--amp', 'fp32'),
     r"argument --amp: invalid choice: 'fp32' \(choose from '?auto'?, '?bf16"),
    ('convert missing file', lambda ctx: ['convert', ctx.root / 'missing.pth', ctx.out / 'c.safetensors', '--model',
                                          'green_swin_tiny'], r'missing.pth does not exist'),
]


def file_digests(root: Path, fresh: Path):
    """sha256 of every file under ``root`` outside the fresh output area ``fresh``."""
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob('*')
            if p.is_file() and not p.is_relative_to(fresh)}


@pytest.mark.parametrize('make_argv,pattern', [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_a_one_line_error_and_changes_no_checkpoint(ctx, make_argv, pattern, capsys):
    argv = make_argv(ctx)
    before = file_digests(ctx.root, ctx.out)
    code, err = run_cli(argv, capsys)
    assert_one_line_error(argv[0], code, err, pattern)
    after = file_digests(ctx.root, ctx.out)
    assert {p: d for p, d in after.items() if p in before} == before  # nothing changed or removed
    assert all(p.name == '.greenmim.lock' for p in set(after) - set(before))  # at most the lock of a refused run


def test_a_run_folder_in_use_by_another_process_is_refused(ctx, capsys):
    out = ctx.out / 'in_use'
    out.mkdir(parents=True)
    holder = subprocess.Popen(  # another process holding the folder's lock, as a running greenmim run does
        [sys.executable, '-c', 'import fcntl, sys, time; f = open(sys.argv[1], "a+"); fcntl.flock(f, fcntl.LOCK_EX); '
         'f.write("4242"); f.flush(); print("locked", flush=True); time.sleep(120)', str(out / LOCK_FILE)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'locked'
        argv = [*PRETRAIN, '--data', ctx.photos, '--output-dir', out, '--max-steps', 1]
        code, err = run_cli(argv, capsys)
        assert_one_line_error('pretrain', code, err, r'output folder .*in_use is in use by another greenmim run '
                                                     r'\(pid 4242\): wait for it to end')
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert run_cli(argv, capsys)[0] == 0  # the lock went with the process


def test_overwrite_replaces_the_run_in_a_folder(ctx, capsys):
    run = copy_run(ctx, 'to_replace')
    (run / 'reconstructions').mkdir()
    (run / 'reconstructions' / 'epoch-0001.png').write_bytes(b'old')
    (run / 'notes.txt').write_text('not part of a run')
    code, _ = run_cli([*PRETRAIN, '--data', ctx.photos, '--output-dir', run, '--overwrite', '--max-steps', 1], capsys)
    assert code == 0
    assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE, 'checkpoints', 'config.json', 'log.jsonl',
                                                     'notes.txt']
    assert sorted(p.name for p in (run / 'checkpoints').iterdir()) == ['last.json', 'step-00000001']
    records = [json.loads(line) for line in (run / 'log.jsonl').read_text().splitlines()]
    assert [(r['type'], r['step']) for r in records] == [('step', 1), ('stop', 1)]


def test_full_disk_is_one_line_and_keeps_the_last_checkpoint(ctx, capsys, monkeypatch):
    run = copy_run(ctx, 'disk_full')
    before = tree_digest(run / 'checkpoints')

    def write_part_then_fail(obj, path):
        open(path, 'wb').write(b'\0' * 100)
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(run_checkpoints.torch, 'save', write_part_then_fail)
    code, err = run_cli([*PRETRAIN, '--data', ctx.photos, '--epochs', 2, '--resume', run, '--output-dir', run], capsys)
    assert code == 1
    assert_one_line_error('pretrain', code, err, r'could not write checkpoint step-00000004 in .*: the disk is full\. '
                                                 r'The partial files were removed')
    assert tree_digest(run / 'checkpoints') == before
