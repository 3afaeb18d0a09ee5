"""Pre-training pipeline: checkpoints, exact resume, Ctrl-C, NaN guard, reconstructions, CLI."""
import json
import signal

import pytest
import torch
from safetensors import safe_open

from greenmim.cli import main
from greenmim.mim import GreenMIM
from greenmim.train import NonFiniteLossError, NothingTrainedError, pretrain
from greenmim.train.run_checkpoints import read_training_state
from train_fixtures import copy_photos, tiny_pretrain_config


@pytest.fixture(scope='module')
def photos(tmp_path_factory):
    """8 embedded photos: 2 optimizer steps per epoch at batch size 4."""
    return copy_photos(tmp_path_factory.mktemp('photos'), 8)


@pytest.fixture(scope='module')
def full_run(photos, tmp_path_factory):
    """An uninterrupted 2-epoch (4-step) run, the reference for the resume tests."""
    return pretrain(tiny_pretrain_config(tmp_path_factory.mktemp('full'), data=str(photos), epochs=2))


def test_two_step_run_writes_checkpoint_log_and_reconstruction(photos, tmp_path):
    out = tmp_path / 'run'
    summary = pretrain(tiny_pretrain_config(out, data=str(photos), vis_every=1))
    assert summary.steps == 2 and len(summary.losses) == 2
    ckpt = out / 'checkpoints' / 'step-00000002'
    assert json.loads((out / 'checkpoints' / 'last.json').read_text())['checkpoint'] == ckpt.name
    assert json.loads((out / 'checkpoints' / 'best.json').read_text())['checkpoint'] == ckpt.name
    with safe_open(str(ckpt / 'model.safetensors'), 'pt') as f:
        assert f.metadata()['model'] == 'green_swin_tiny' and f.metadata()['kind'] == 'mim'
        assert any(k.startswith('encoder.layers.') for k in f.keys()) and 'mask_token' in f.keys()
    state = read_training_state(ckpt)
    assert state['position'] == dict(epoch=1, micro_batch=0, step=2, world_size=1, batch_size=4, accum_iter=1)
    assert {'optimizer', 'scheduler', 'scaler', 'rng'} <= set(state)
    steps = [json.loads(line) for line in (out / 'log.jsonl').read_text().splitlines()]
    assert [r['step'] for r in steps if r['type'] == 'step'] == [1, 2]
    png = out / 'reconstructions' / 'epoch-0001.png'
    from PIL import Image
    assert Image.open(png).size == (3 * 64 + 4 * 2, 4 * 64 + 5 * 2)  # 3 columns x 4 images, 2 px padding


def test_resume_mid_epoch_reproduces_uninterrupted_losses_bitwise(photos, full_run, tmp_path):
    first = pretrain(tiny_pretrain_config(tmp_path, data=str(photos), epochs=2, max_steps=3))
    assert first.losses == full_run.losses[:3]
    assert read_training_state(tmp_path)['position']['micro_batch'] == 1  # stopped inside epoch 1
    resumed = pretrain(tiny_pretrain_config(tmp_path, data=str(photos), epochs=2, resume=str(tmp_path)))
    assert resumed.steps == 4
    assert resumed.losses == full_run.losses[3:]  # bitwise equal
    assert resumed.epoch_metrics == full_run.epoch_metrics[1:]  # the resumed epoch's mean covers all its steps
    assert full_run.losses[0] != full_run.losses[3]


def test_ctrl_c_leaves_resumable_checkpoint(photos, full_run, tmp_path, monkeypatch):
    calls = {'n': 0}
    forward = GreenMIM.forward

    def forward_then_ctrl_c(self, *args, **kwargs):
        calls['n'] += 1
        if calls['n'] == 2:
            signal.raise_signal(signal.SIGINT)  # as if the user pressed Ctrl-C during step 2
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(GreenMIM, 'forward', forward_then_ctrl_c)
    stopped = pretrain(tiny_pretrain_config(tmp_path, data=str(photos), epochs=2))
    monkeypatch.setattr(GreenMIM, 'forward', forward)
    assert stopped.interrupted and stopped.steps == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    resumed = pretrain(tiny_pretrain_config(tmp_path, data=str(photos), epochs=2, resume=str(tmp_path)))
    assert stopped.losses + resumed.losses == full_run.losses


def test_nan_loss_stops_with_clear_error_and_keeps_last_checkpoint(photos, tmp_path, monkeypatch):
    pretrain(tiny_pretrain_config(tmp_path, data=str(photos)))  # epoch 0: checkpoint at step 2
    last = (tmp_path / 'checkpoints' / 'last.json').read_text()
    weights = (tmp_path / 'checkpoints' / 'step-00000002' / 'model.safetensors').read_bytes()
    forward = GreenMIM.forward

    def nan_forward(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        return out._replace(loss=out.loss * float('nan'))

    monkeypatch.setattr(GreenMIM, 'forward', nan_forward)
    with pytest.raises(NonFiniteLossError, match='loss is nan at step 3'):
        pretrain(tiny_pretrain_config(tmp_path, data=str(photos), epochs=2, resume=str(tmp_path)))
    assert (tmp_path / 'checkpoints' / 'last.json').read_text() == last
    assert (tmp_path / 'checkpoints' / 'step-00000002' / 'model.safetensors').read_bytes() == weights
    assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['best.json', 'last.json', 'step-00000002']
    # the command line turns it into exit status 1
    cfg = tiny_pretrain_config(tmp_path, data=str(photos), epochs=2, resume=str(tmp_path))
    assert main(['pretrain', '--data', cfg.data, '--model', cfg.model, '--input-size', '64', '--decoder-dim', '32',
                 '--model-kwargs', 'embed_dim=24', 'depths=(1,1,1,1)', 'num_heads=(1,1,2,2)', 'window_size=2',
                 '--batch-size', '4', '--epochs', '2', '--num-workers', '0', '--vis-every', '0',
                 '--output-dir', str(tmp_path), '--resume', str(tmp_path)]) == 1


def test_resume_from_another_model_is_a_clear_error(photos, full_run, tmp_path):
    cfg = tiny_pretrain_config(tmp_path, data=str(photos), resume=full_run.output_dir)
    cfg.model_kwargs = dict(cfg.model_kwargs, embed_dim=32, num_heads=(1, 2, 2, 4))
    with pytest.raises(ValueError, match='does not fit green_swin_tiny.*another model'):
        pretrain(cfg)
    cfg = tiny_pretrain_config(tmp_path, data=str(photos), resume=full_run.output_dir, model='green_swin_small')
    with pytest.raises(ValueError, match="written for model 'green_swin_tiny', not 'green_swin_small'"):
        pretrain(cfg)


def test_cli_pretrain_with_grad_accumulation(photos, tmp_path):
    assert main(['pretrain', '--data', str(photos), '--input-size', '64', '--decoder-dim', '32', '--model',
                 'green_swin_tiny', '--model-kwargs', 'embed_dim=24', 'depths=(1,1,1,1)', 'num_heads=(1,1,2,2)',
                 'window_size=2', '--batch-size', '2', '--accum-iter', '2', '--epochs', '1', '--num-workers', '1',
                 '--output-dir', str(tmp_path)]) == 0
    state = read_training_state(tmp_path)
    assert state['position']['step'] == 2 and state['position']['accum_iter'] == 2
    assert (tmp_path / 'reconstructions' / 'epoch-0001.png').is_file()
    assert torch.isfinite(torch.tensor([json.loads(l)['loss'] for l in (tmp_path / 'log.jsonl').read_text().splitlines()
                                        if '"step"' in l])).all()


def test_reconstruction_undoes_the_per_unit_normalisation():
    from types import SimpleNamespace
    from greenmim.mim import unpatchify
    from greenmim.train.reconstruction import reconstruct

    # every unit is brightness + contrast x pattern, the pattern of mean 0 and (unbiased) variance 1
    pattern = torch.randn(2, 6, 32 * 32 * 3, dtype=torch.float64)
    pattern = ((pattern - pattern.mean(-1, keepdim=True)) / pattern.std(-1, keepdim=True)).float()
    contrast, brightness = torch.rand(2, 6, 1) * 3 + 0.2, torch.randn(2, 6, 1)
    images = unpatchify(contrast * pattern + brightness, 32, (2, 3))

    class PerfectPredictor(torch.nn.Module):
        """Predicts each unit's pattern: what GreenMIM's per-unit normalised target asks for."""
        unit, grid_size, norm_pix_loss = 32, (2, 3), True

        def forward(self, images, mask):
            return SimpleNamespace(pred=pattern)

    mask = torch.tensor([[True, False, False], [False, True, False]])
    masked, recon = reconstruct(PerfectPredictor(), images, mask)
    torch.testing.assert_close(recon, images, atol=1e-5, rtol=1e-5)
    assert torch.equal(masked[..., :32, :32], images[..., :32, :32]) and not masked[..., :32, 32:].any()


def test_skipped_micro_batches_do_not_count_and_a_run_that_trained_nothing_fails(tmp_path):
    data = copy_photos(tmp_path / 'some_bad', 3)
    for i in range(3):
        (data / f'bad{i}.png').write_bytes(b'not a png')
    summary = pretrain(tiny_pretrain_config(tmp_path / 'run', data=str(data), batch_size=1))
    records = [json.loads(line) for line in (tmp_path / 'run' / 'log.jsonl').read_text().splitlines()]
    step_losses = [r['loss'] for r in records if r['type'] == 'step']
    trained = [loss for loss in step_losses if loss is not None]
    assert len(step_losses) == 6 and len(trained) == 3 and summary.losses == trained
    assert summary.epoch_metrics[0]['train_loss'] == pytest.approx(sum(trained) / 3)

    bad = tmp_path / 'all_bad'
    bad.mkdir()
    for i in range(4):
        (bad / f'bad{i}.png').write_bytes(b'not a png')
    with pytest.raises(NothingTrainedError, match='epoch 0 trained nothing: every micro-batch was skipped'):
        pretrain(tiny_pretrain_config(tmp_path / 'bad_run', data=str(bad)))
    assert not (tmp_path / 'bad_run' / 'checkpoints').exists()
    cfg = tiny_pretrain_config(tmp_path / 'bad_run_max_steps', data=str(bad), batch_size=1, max_steps=2)
    with pytest.raises(NothingTrainedError, match='this run trained nothing'):
        pretrain(cfg)
    assert not (tmp_path / 'bad_run_max_steps' / 'checkpoints').exists()


def test_max_steps_stop_gets_its_reconstruction_and_the_bar_counts_to_it(photos, tmp_path, capsys):
    out = tmp_path / 'run'
    summary = pretrain(tiny_pretrain_config(out, data=str(photos), epochs=3, max_steps=3, vis_every=5))
    captured = capsys.readouterr()
    assert summary.steps == 3 and summary.epochs_completed == 1
    assert sorted(p.name for p in (out / 'reconstructions').iterdir()) == ['epoch-0002.png']  # only the stop's
    assert f'reconstructions: {out}/reconstructions/epoch-0002.png' in captured.out
    assert '3/3 [' in captured.err and '/6 [' not in captured.err  # the bar's total is --max-steps
    records = [json.loads(line) for line in (out / 'log.jsonl').read_text().splitlines()]
    assert records[-1] == {'type': 'stop', 'step': 3, 'epoch': 1}


def test_epoch_size_trains_a_seeded_subset_of_map_style_data(photos, tmp_path, capsys):
    summary = pretrain(tiny_pretrain_config(tmp_path / 'run', data=str(photos), epoch_size=4))
    assert summary.steps == 1  # 4 of the 8 photos at batch size 4
    assert '(4 images, 0 non-image files ignored)' in capsys.readouterr().out


def test_a_warmup_longer_than_the_run_is_clamped_with_a_warning(photos, tmp_path, capsys):
    summary = pretrain(tiny_pretrain_config(tmp_path / 'short', data=str(photos), epochs=2, warmup_epochs=40))
    assert ('warning: --warmup-epochs 40 is not shorter than --epochs 2, so the lr would never leave the warm-up: '
            'warming up over 0.2 epochs (a tenth of the run) instead') in capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / 'short' / 'log.jsonl').read_text().splitlines()]
    lrs = [r['lr'] for r in records if r['type'] == 'step']
    assert summary.steps == 4 and lrs[0] == pytest.approx(1e-3)  # warm-up rounds to 0 steps: lr from the start
    pretrain(tiny_pretrain_config(tmp_path / 'run', data=str(photos), epochs=4, warmup_epochs=2, max_steps=2))
    assert ('warning: --max-steps 2 stops inside the lr warm-up (4 steps of --warmup-epochs 2)'
            in capsys.readouterr().out)


def test_written_files_follow_the_umask(photos, tmp_path):
    import os
    from greenmim.train import export
    previous = os.umask(0o027)
    try:
        pretrain(tiny_pretrain_config(tmp_path / 'run', data=str(photos), max_steps=1))
        paths = export(tmp_path / 'run', tmp_path / 'export')
    finally:
        os.umask(previous)
    files = [*paths.values(), *(tmp_path / 'run' / 'checkpoints' / 'step-00000001').iterdir()]
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {'0o640'}


def test_local_parquet_data_prints_no_datasets_progress(tmp_path, capfd):
    from test_train_data import _write_parquet
    _write_parquet(tmp_path / 'train.parquet', 8)
    pretrain(tiny_pretrain_config(tmp_path / 'run', data=str(tmp_path / 'train.parquet'), max_steps=1))
    err = capfd.readouterr().err
    assert 'train:' in err and 'Generating train split' not in err and 'Downloading data' not in err
