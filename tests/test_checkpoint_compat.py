"""Files written by earlier versions still resume, export and load (``tests/fixtures/pretrain_0.1.0``: a
pre-training checkpoint written by greenmim 0.1.0 before the checkpoint format had its own module)."""
import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from greenmim.train import PretrainConfig, export, pretrain
from train_fixtures import copy_photos

FIXTURE = Path(__file__).parent / 'fixtures' / 'pretrain_0.1.0'
EXPECTED = json.loads((FIXTURE / 'expected.json').read_text())
SETTINGS = dict(EXPECTED['settings'], model_kwargs={
    k: tuple(v) if isinstance(v, list) else v for k, v in EXPECTED['settings']['model_kwargs'].items()})


@pytest.fixture
def old_run(tmp_path):
    """A run folder holding the 0.1.0 checkpoint (stopped at step 3 of 4, inside epoch 1)."""
    shutil.copytree(FIXTURE / 'checkpoints', tmp_path / 'run' / 'checkpoints')
    return tmp_path / 'run'


def test_old_checkpoint_resumes_to_the_losses_of_the_old_uninterrupted_run(old_run, tmp_path):
    photos = copy_photos(tmp_path / 'photos', 8)
    summary = pretrain(PretrainConfig(**SETTINGS, data=str(photos), output_dir=str(old_run), resume=str(old_run)))
    assert summary.steps == 4
    assert summary.losses == pytest.approx(EXPECTED['losses'][3:], rel=1e-5)
    # the resumed epoch's mean covers the step taken before the checkpoint (the saved running epoch loss)
    assert summary.epoch_metrics[-1]['train_loss'] == pytest.approx(EXPECTED['epoch_metrics'][-1]['train_loss'],
                                                                    rel=1e-5)


def test_old_checkpoint_exports_to_timm_and_back_to_greenmim(old_run, tmp_path):
    from greenmim.hub import load_mim_pretrained
    paths = export(old_run, tmp_path / 'export')
    kwargs = dict(img_size=SETTINGS['input_size'], **SETTINGS['model_kwargs'])
    encoder = timm.create_model('green_swin_tiny.mim_in1k', pretrained=True, **kwargs,
                                pretrained_cfg_overlay=dict(file=str(paths['model'])))
    mim = load_mim_pretrained('green_swin_tiny.mim_in1k', pretrained_cfg_overlay=dict(file=str(paths['model'])),
                              **kwargs)
    written = load_file(FIXTURE / 'checkpoints' / 'step-00000003' / 'model.safetensors')
    assert mim.state_dict().keys() == written.keys()
    for name, value in written.items():
        assert torch.equal(mim.state_dict()[name], value), name
    for name, value in encoder.state_dict().items():
        assert torch.equal(written[f'encoder.{name}'], value), name
