"""Files written by earlier versions still resume, export and load (``tests/fixtures/pretrain_0.1.0``: a
pre-training checkpoint written by greenmim 0.1.0 before the checkpoint format had its own module)."""
import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from greenmim.layout import layout_to
from greenmim.train import PretrainConfig, export, pretrain
from greenmim.train.config import derived_seed
from greenmim.train.data import MaskCollate, ResumableSampler, build_dataset
from greenmim.train.pretrain import build_mim_model
from greenmim.train.transforms import pretrain_transform
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


def test_old_checkpoint_resumes_from_its_weights_and_position(old_run, tmp_path, monkeypatch, capsys):
    """0.1.0 drew batch-wise masks in the training process; the loader draws them now (seeded by position), so the
    resumed step's loss is the forward loss of the checkpoint's weights on the batch and mask of that position."""
    # 0.1.0's decoder added timm's sin-cos embedding ([sin row, sin col, cos row, cos col]); it is a fixed buffer,
    # not in the checkpoint, and became MAE's channel order before any release (commit 24ae326)
    from timm.layers import build_sincos2d_pos_embed
    monkeypatch.setattr('greenmim.mim.decoder_pos_embed', lambda grid, dim: build_sincos2d_pos_embed(list(grid), dim))
    photos = copy_photos(tmp_path / 'photos', 8)
    config = PretrainConfig(**SETTINGS, data=str(photos), output_dir=str(old_run), resume=str(old_run))
    summary = pretrain(config)
    assert summary.steps == 4 and 'drew batch-wise masks in the training process' in capsys.readouterr().out
    model = build_mim_model(config)
    model.load_state_dict(load_file(FIXTURE / 'checkpoints' / 'step-00000003' / 'model.safetensors'))
    dataset = build_dataset(str(photos), pretrain_transform(config.input_size), seed=config.seed)
    dataset.set_epoch(1)
    sampler = ResumableSampler(dataset, seed=config.seed)
    sampler.set_epoch(1)
    collate = MaskCollate(model.encoder.layout_specs, config.mask_ratio, per_image=False,
                          seed=derived_seed(config.seed, 0, 3)).at(1, 1)  # epoch 1, its second micro-batch
    batch = collate([dataset[i] for i in list(sampler)[4:8]])
    with torch.no_grad():
        expected = model(batch.images, layout=layout_to(batch.inputs['packed'], torch.device('cpu'))).loss.item()
    assert summary.losses == pytest.approx([expected], rel=1e-5)
    # the resumed epoch's mean covers the step taken before the checkpoint (the saved running epoch loss)
    assert summary.epoch_metrics[-1]['train_loss'] == pytest.approx((EXPECTED['losses'][2] + expected) / 2, rel=1e-5)


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


def test_file_converted_by_the_old_convert_exports_and_rebuilds_its_wrapper(tmp_path):
    """``greenmim convert`` wrote the wrapper's class name into ``format`` and no ``kind`` / ``mim_class``."""
    import greenmim
    from safetensors.torch import save_file
    from greenmim.hub import load_mim_pretrained
    from greenmim.train.finetune import load_pretrained_encoder
    kwargs = dict(img_size=64, embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), window_size=2)
    torch.manual_seed(0)
    mim = greenmim.GreenMIM('green_swin_tiny', **kwargs)  # the authors' decoder size: the wrapper's defaults
    old = tmp_path / 'converted.safetensors'
    save_file(mim.state_dict(), old, {'format': 'GreenMIM', 'model': 'green_swin_tiny', 'model_kwargs': json.dumps(
        kwargs), 'merge_order': 'swin', 'source': 'greenmim_swin_tiny.pth'})
    paths = export(old, tmp_path / 'export')
    loaded = load_mim_pretrained('green_swin_tiny.mim_in1k', pretrained_cfg_overlay=dict(file=str(paths['model'])),
                                 **kwargs)
    assert type(loaded) is greenmim.GreenMIM
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in mim.state_dict().items())
    classifier = timm.create_model('green_swin_tiny', num_classes=3, **kwargs)
    load_pretrained_encoder(classifier, old, 'green_swin_tiny')
    assert torch.equal(classifier.state_dict()['patch_embed.proj.weight'], mim.encoder.patch_embed.proj.weight)
