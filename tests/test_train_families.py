"""Each family beyond Swin through the command line: pretrain (GreenMIM and SimMIM), export, finetune, publish; for
Twins also convert (SwinV2's convert is in test_hub_convert.py)."""
import json
from typing import NamedTuple

import pytest
import safetensors.torch
import timm
import torch
from huggingface_hub import ModelCard

import greenmim
from greenmim.checkpoint import read_checkpoint
from greenmim.cli import main
from greenmim.train.optim import build_optimizer
from greenmim.train.run_checkpoints import resolve_checkpoint
from train_fixtures import cli_kwargs, copy_photos, make_two_class_folder


class Case(NamedTuple):
    model: str
    kwargs: dict  # narrow, at 64 px (--input-size 64)
    encoder_key: str  # a key only this family's MIM checkpoint has
    head: str  # the classifier's weight
    card: tuple  # (hub tag, text in the card, ...)

    @property
    def width(self):  # stage-1 and final widths
        dims = self.kwargs.get('embed_dims') or [self.kwargs['embed_dim'] * 2 ** i for i in range(4)]
        return dims[0], dims[-1]

    def common(self):
        return ['--model', self.model, '--input-size', '64', *cli_kwargs(self.kwargs), '--num-workers', '0']


TWINS = Case('green_twins_svt_small',
             dict(embed_dims=(8, 16, 16, 32), num_heads=(1, 2, 2, 4), depths=(2, 2, 2, 2), wss=(2, 2, 2, 2)),
             'encoder.pos_block.0.proj.0.weight', 'head.weight',
             ('twins', 'A Twins encoder pre-trained with GreenMIM', 'global sub-sampling 8/4/2/1, local window 2',
              '[1, H/32 * W/32, C]'))
SWINV2 = Case('green_swinv2_tiny_window8_256',
              dict(embed_dim=8, num_heads=(1, 2, 2, 4), depths=(2, 2, 2, 2), window_size=2),
              'encoder.layers.0.blocks.0.attn.cpb_mlp.0.weight', 'head.fc.weight',
              ('swin-transformer-v2', 'A Swin Transformer V2 encoder pre-trained with GreenMIM',
               'widths 8/16/32/64, depths 2/2/2/2, windows 2/2/2/2, cosine attention', '[1, H/32, W/32, C]'))


@pytest.fixture(scope='module', params=[TWINS, SWINV2], ids=lambda c: c.model)
def case(request):
    return request.param


@pytest.fixture(scope='module')
def photos(tmp_path_factory):
    return copy_photos(tmp_path_factory.mktemp('photos'), 8)


@pytest.fixture(scope='module')
def pretrained(case, photos, tmp_path_factory):
    out = tmp_path_factory.mktemp('pretrain')
    assert main(['pretrain', '--data', str(photos), *case.common(), '--decoder-dim', '32', '--batch-size', '4',
                 '--epochs', '1', '--warmup-epochs', '0', '--lr', '1e-3', '--vis-every', '1',
                 '--output-dir', str(out)]) == 0
    return out


def test_pretrain_writes_a_mim_checkpoint(case, pretrained):
    weights, meta = read_checkpoint(resolve_checkpoint(pretrained))
    assert meta['model'] == case.model and meta['kind'] == 'mim' and meta['mim_class'] == 'GreenMIM'
    assert case.encoder_key in weights and 'decoder_pred.weight' in weights
    losses = [json.loads(line)['loss'] for line in (pretrained / 'log.jsonl').read_text().splitlines()
              if '"step"' in line]
    assert len(losses) == 2 and all(0 < loss < 10 for loss in losses)
    assert (pretrained / 'reconstructions' / 'epoch-0001.png').is_file()


def test_simmim_pretrains(case, photos, tmp_path):
    assert main(['pretrain', '--method', 'simmim', '--data', str(photos), *case.common(), '--batch-size', '4',
                 '--epochs', '1', '--warmup-epochs', '0', '--vis-every', '0', '--output-dir', str(tmp_path)]) == 0
    weights, meta = read_checkpoint(resolve_checkpoint(tmp_path))
    assert meta['mim_class'] == 'SimMIM' and weights['mask_token'].shape == (1, 1, 1, case.width[0])


def test_export_loads_into_timm_and_publishes(case, pretrained, tmp_path):
    assert main(['export', str(pretrained), '-o', str(tmp_path / 'export')]) == 0
    mim, _ = read_checkpoint(resolve_checkpoint(pretrained))
    model = timm.create_model(f'{case.model}.mim_in1k', pretrained=True, img_size=64, **case.kwargs,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / 'export' / 'model.safetensors')))
    assert all(torch.equal(v, mim[f'encoder.{k}']) for k, v in model.state_dict().items())
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, case.width[1])
    repo = tmp_path / 'repo'
    assert main(['publish', str(tmp_path / 'export' / 'model.safetensors'), '--decoder',
                 str(tmp_path / 'export' / 'mim_decoder.safetensors'), '--model', case.model, '--tag', 'mim_in1k',
                 '--out', str(repo), '--dry-run', '--decoder-heads', '16',
                 *cli_kwargs(dict(case.kwargs, img_size=64))]) == 0
    config = json.loads((repo / 'config.json').read_text())
    assert config['architecture'] == case.model and config['model_args']['depths'] == [2, 2, 2, 2]
    card = ModelCard.load(repo / 'README.md')
    tag, *texts = case.card
    assert tag in card.data.tags and all(text in card.text for text in texts)


def test_finetune_from_the_mim_checkpoint(case, pretrained, tmp_path):
    train = make_two_class_folder(tmp_path / 'train', 8, seed=0)
    out = tmp_path / 'ft'
    assert main(['finetune', '--checkpoint', str(pretrained), '--data', str(train), *case.common(), '--batch-size', '8',
                 '--epochs', '1', '--warmup-epochs', '0', '--output-dir', str(out)]) == 0
    weights, meta = read_checkpoint(resolve_checkpoint(out))
    assert meta['kind'] == 'classifier' and weights[case.head].shape == (2, case.width[1])
    timm.create_model(case.model, num_classes=2, img_size=64, **case.kwargs).load_state_dict(weights)


def test_layer_decay_groups_follow_the_group_matcher(case):
    model = timm.create_model(case.model, num_classes=2, img_size=64, **case.kwargs)
    optimizer = build_optimizer(model, 1e-3, 0.05, layer_decay=0.5)
    scales = sorted({g['lr_scale'] for g in optimizer.param_groups})
    assert len(scales) > 4 and scales[-1] == 1.0 and scales[0] < 0.1


@pytest.mark.parametrize('method', ['greenmim', 'simmim'])
def test_convert_a_twins_checkpoint(method, tmp_path):
    """Twins' original key layout is timm's: an authors'-style checkpoint ({"model": ...}, SimMIM's mask token
    inside the encoder and its decoder as decoder.0) converts key for key."""
    MODEL, KWARGS = TWINS.model, TWINS.kwargs
    torch.manual_seed(0)
    if method == 'greenmim':
        source = greenmim.GreenMIM(MODEL, img_size=64, decoder_dim=32, **KWARGS)
        authors = dict(source.state_dict())
    else:
        source = greenmim.SimMIM(MODEL, img_size=64, **KWARGS)
        authors = {k: v for k, v in source.state_dict().items() if k != 'mask_token'}
        authors['encoder.mask_token'] = source.mask_token.reshape(1, 1, -1)
        authors = {k.replace('decoder.', 'decoder.0.'): v for k, v in authors.items()}
    torch.save({'model': authors}, tmp_path / 'authors.pth')
    out = tmp_path / 'converted.safetensors'
    assert main(['convert', str(tmp_path / 'authors.pth'), str(out), '--model', MODEL,
                 *cli_kwargs(dict(KWARGS, img_size=64))]) == 0
    converted = safetensors.torch.load_file(out)
    assert converted.keys() == source.state_dict().keys()
    assert all(torch.equal(converted[k], v) for k, v in source.state_dict().items())
