"""Conversion of the authors' GreenMIM / SimMIM / fine-tuned checkpoints (built here in their exact key layout)."""
import argparse
import json
import math
import re

import numpy as np
import pytest
import safetensors
import timm
import torch
from timm.models.swin_transformer import PatchMerging

import greenmim
from greenmim.hub import convert
from greenmim.checkpoint import split_mim_state_dict
from greenmim.cli import main
from train_fixtures import cli_kwargs

TINY = dict(embed_dim=16, depths=(1, 2, 1, 1), num_heads=(1, 2, 2, 2))
SWIN_ORDER = ('x00', 'x10', 'x01', 'x11')  # x{row}{col} neighbours of a 2x2 merge, as Swin concatenates them
EARLY_ORDER = ('x00', 'x01', 'x10', 'x11')  # the authors' early version


def to_authors_swin(state_dict, model):
    """Inverse of the conversion: a timm-layout Swin state dict in Microsoft's original layout (patch merging at
    the end of the previous stage, ``head.``, and the ``relative_position_index`` / ``attn_mask`` buffers)."""
    out = {}
    for k, v in state_dict.items():
        k = re.sub(r'^layers\.(\d+)\.downsample', lambda m: f'layers.{int(m.group(1)) - 1}.downsample', k)
        out[k.replace('head.fc.', 'head.')] = v.clone()
    for i, stage in enumerate(model.layers):
        for j, block in enumerate(stage.blocks):
            n = block.window_size[0] * block.window_size[1]
            out[f'layers.{i}.blocks.{j}.attn.relative_position_index'] = torch.randint(0, 9, (n, n))
            if any(block.shift_size):
                windows = (stage.output_resolution[0] // block.window_size[0]) ** 2
                out[f'layers.{i}.blocks.{j}.attn_mask'] = torch.zeros(windows, n, n)
    assert 'layers.0.downsample.reduction.weight' in out and not any(k.startswith('layers.3.downsample') for k in out)
    return out


def mae_decoder_pos_embed(grid: int, dim: int) -> torch.Tensor:
    """``[1, grid*grid, dim]``, MAE's ``get_2d_sincos_pos_embed(dim, grid)`` as the authors' decoder initialises its
    frozen ``decoder_pos_embed``, written out in numpy from MAE's definition (meshgrid(w, h): its first half,
    named ``emb_h``, encodes the column)."""
    def one_axis(d, pos):
        omega = 1. / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.))
        out = np.einsum('m,d->md', pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    grid_w, grid_h = np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32)
    first, second = np.meshgrid(grid_w, grid_h)  # xy indexing: first[i, j] = column j
    emb = np.concatenate([one_axis(dim // 2, first), one_axis(dim // 2, second)], axis=1)
    return torch.from_numpy(emb).float()[None]


def authors_greenmim(mim):
    """A GreenMIM checkpoint as LayneH/GreenMIM saves it (MAE-style)."""
    encoder, decoder = split_mim_state_dict(mim.state_dict())
    model = {f'encoder.{k}': v for k, v in to_authors_swin(encoder, mim.encoder).items()}
    model.update({k: v.clone() for k, v in decoder.items()})
    model['decoder_pos_embed'] = mae_decoder_pos_embed(mim.grid_size[0], mim.decoder_embed.out_features)
    args = argparse.Namespace(model='green_mim_swin_base_patch4_dec512b1', mask_ratio=0.75, norm_pix_loss=True)
    return {'model': model, 'optimizer': {'state': {}, 'param_groups': [{'lr': 1e-4}]}, 'epoch': 99,
            'scaler': {'scale': 65536.0}, 'args': args}


def early_merge_weights(state_dict):
    """Patch-merging weights for the early x00,x01,x10,x11 concatenation equivalent to Swin-order ``state_dict``,
    derived from the neighbour names (independently of ``convert.swap_merge_order``)."""
    out = dict(state_dict)
    for k, v in state_dict.items():
        if re.search(r'downsample\.(norm\.weight|norm\.bias|reduction\.weight)$', k):
            blocks = v.chunk(4, dim=-1)
            out[k] = torch.cat([blocks[SWIN_ORDER.index(name)] for name in EARLY_ORDER], dim=-1)
    return out


@pytest.fixture(scope='module')
def green():
    torch.manual_seed(0)
    return greenmim.GreenMIM('green_swin_tiny', decoder_dim=32, **TINY)


def assert_same(converted, reference):
    assert converted.keys() == reference.keys()
    for k, v in reference.items():
        assert torch.equal(converted[k], v), k


def test_greenmim_checkpoint_converts_key_for_key(green):
    converted, target, notes = convert.convert_state_dict(authors_greenmim(green)['model'], 'green_swin_tiny', **TINY)
    assert isinstance(target, greenmim.GreenMIM)
    assert_same(converted, green.state_dict())
    assert any('decoder_pos_embed' in n for n in notes)


def test_decoder_pos_embed_is_maes():
    """Ours equals MAE's embedding (built independently above), channel for channel, so a converted decoder sees
    the positions it was trained with; and the embedding tells rows and columns apart (not symmetric)."""
    ours = greenmim.GreenMIM('green_swin_tiny', decoder_dim=32, **TINY).decoder_pos_embed
    theirs = mae_decoder_pos_embed(7, 32)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    grid = ours[0].view(7, 7, 32)
    assert not torch.allclose(grid, grid.transpose(0, 1))
    torch.testing.assert_close(grid[0, 3, :8], torch.zeros(8).new_tensor(  # row 0, column 3: sin(3w) first
        [math.sin(3 * 10000 ** (-k / 8)) for k in range(8)]), atol=1e-6, rtol=0)


def test_converted_decoder_predicts_what_the_authors_decoder_does(green):
    """The authors' decoder forward (their ``decoder_pos_embed`` added to tokens at their units) equals ours after
    conversion."""
    checkpoint = authors_greenmim(green)['model']
    _, target, _ = convert.convert_state_dict(checkpoint, 'green_swin_tiny', **TINY)
    latent = torch.randn(2, 12, target.encoder.num_features)
    units = torch.randperm(49)[:12].sort().values
    with torch.no_grad():
        x = target.decoder_embed(latent)
        tokens = target.mask_token.expand(2, 49, -1).clone()
        tokens[:, units] = x
        theirs = target.decoder_pred(target.decoder_norm(target.decoder_blocks(tokens + checkpoint['decoder_pos_embed'])))
        torch.testing.assert_close(target.forward_decoder(latent, units), theirs)


def test_checkpoint_with_another_pos_embed_is_refused(green):
    checkpoint = authors_greenmim(green)['model']
    rows_first = checkpoint['decoder_pos_embed'].view(1, 7, 7, 32).transpose(1, 2).reshape(1, 49, 32)
    with pytest.raises(ValueError, match='decoder_pos_embed'):
        convert.convert_state_dict(dict(checkpoint, decoder_pos_embed=rows_first), 'green_swin_tiny', **TINY)


def test_simmim_checkpoint_converts_key_for_key():
    torch.manual_seed(1)
    sim = greenmim.SimMIM('green_swin_tiny', **TINY)
    encoder, _ = split_mim_state_dict(sim.state_dict())
    model = {f'encoder.{k}': v for k, v in to_authors_swin(encoder, sim.encoder).items()}
    model['encoder.mask_token'] = sim.mask_token.reshape(1, 1, -1).clone()
    model['decoder.0.weight'], model['decoder.0.bias'] = sim.decoder.weight.clone(), sim.decoder.bias.clone()
    assert convert.detect_kind(model) == 'simmim'
    converted, target, _ = convert.convert_state_dict(model, 'green_swin_tiny', **TINY)
    assert isinstance(target, greenmim.SimMIM)
    assert_same(converted, sim.state_dict())


def test_finetuned_classifier_converts_and_predicts_the_same():
    torch.manual_seed(2)
    model = timm.create_model('green_swin_tiny', num_classes=10, **TINY).eval()
    authors = to_authors_swin(model.state_dict(), model)
    assert 'head.weight' in authors
    converted, target, _ = convert.convert_state_dict(authors, 'green_swin_tiny', **TINY)
    assert_same(converted, model.state_dict())
    x = torch.randn(2, 3, 224, 224)
    torch.testing.assert_close(target.eval()(x), model(x), rtol=0, atol=0)


def test_early_merge_order_weights_are_what_the_early_code_computes():
    """The early order's weights, fed the early concatenation, reproduce timm's (Swin-order) patch merging."""
    torch.manual_seed(3)
    merge = PatchMerging(dim=8)
    torch.nn.init.normal_(merge.norm.weight)
    torch.nn.init.normal_(merge.norm.bias)
    swin = {f'layers.1.downsample.{k}': v for k, v in merge.state_dict().items()}
    early = early_merge_weights(swin)
    x = torch.randn(2, 6, 4, 8)  # [B, H, W, C]
    neighbours = {f'x{r}{c}': x[:, r::2, c::2] for r in (0, 1) for c in (0, 1)}
    concat = torch.cat([neighbours[n] for n in EARLY_ORDER], dim=-1)
    normed = torch.nn.functional.layer_norm(
        concat, (32,), early['layers.1.downsample.norm.weight'], early['layers.1.downsample.norm.bias'], merge.norm.eps)
    torch.testing.assert_close(normed @ early['layers.1.downsample.reduction.weight'].T, merge(x))
    # the conversion's permutation maps the early weights back onto Swin's
    assert_same(convert.swap_merge_order(early), swin)


def test_early_merge_order_checkpoint_is_fixed_by_the_option(green):
    checkpoint = authors_greenmim(green)['model']
    checkpoint = {f'encoder.{k}': v for k, v in early_merge_weights(
        {k[len('encoder.'):]: v for k, v in checkpoint.items() if k.startswith('encoder.')}).items()} | {
        k: v for k, v in checkpoint.items() if not k.startswith('encoder.')}
    fixed, _, notes = convert.convert_state_dict(checkpoint, 'green_swin_tiny', merge_order='early', **TINY)
    assert_same(fixed, green.state_dict())
    assert any('permuted' in n for n in notes)
    unfixed, _, _ = convert.convert_state_dict(checkpoint, 'green_swin_tiny', **TINY)
    key = 'encoder.layers.1.downsample.reduction.weight'
    assert not torch.equal(unfixed[key], green.state_dict()[key])


def test_missing_and_unexpected_keys_are_listed(green):
    model = authors_greenmim(green)['model']
    del model['encoder.layers.2.blocks.0.mlp.fc1.weight']
    model['encoder.layers.2.blocks.0.extra.weight'] = torch.zeros(1)
    with pytest.raises(ValueError, match=r'1 missing: encoder\.layers\.2\.blocks\.0\.mlp\.fc1\.weight.*'
                                         r'1 unexpected: encoder\.layers\.2\.blocks\.0\.extra\.weight'):
        convert.convert_state_dict(model, 'green_swin_tiny', **TINY)


def test_other_size_reports_shape_mismatches(green):
    with pytest.raises(ValueError, match=r'shape mismatch: encoder\.patch_embed\.proj\.weight: checkpoint '
                                         r'\(16, 3, 4, 4\) vs model \(32, 3, 4, 4\)'):
        convert.convert_state_dict(authors_greenmim(green)['model'], 'green_swin_tiny',
                                   **dict(TINY, embed_dim=32))


def test_other_window_size_is_refused_not_resampled():
    model = timm.create_model('green_swin_tiny', num_classes=10, window_size=14, **TINY)
    with pytest.raises(ValueError, match='window_size=14'):
        convert.convert_state_dict(to_authors_swin(model.state_dict(), model), 'green_swin_tiny', **TINY)


def test_encoder_without_decoder_needs_an_explicit_kind(green):
    encoder_only = {k: v for k, v in authors_greenmim(green)['model'].items() if k.startswith('encoder.')}
    with pytest.raises(ValueError, match='no known decoder'):
        convert.convert_state_dict(encoder_only, 'green_swin_tiny', **TINY)


def test_unsafe_pickle_is_refused_with_a_reason(tmp_path, capsys):
    path = tmp_path / 'ckpt.pth'
    torch.save({'model': {}, 'callback': PatchMerging}, path)
    assert main(['convert', str(path), str(tmp_path / 'out.safetensors'), '--model', 'green_swin_tiny']) == 2
    assert re.search(r'greenmim convert: error: .*PatchMerging\), which are not unpickled for safety',
                     capsys.readouterr().err)


def test_bad_merge_order_name():
    with pytest.raises(ValueError, match='merge_order'):
        convert.convert_state_dict({}, 'green_swin_tiny', merge_order='x00x01')


def test_command_writes_a_verified_safetensors_file(green, tmp_path):
    source = tmp_path / 'greenmim_swin_tiny.pth'
    torch.save(authors_greenmim(green), source)
    out = tmp_path / 'converted.safetensors'
    assert main(['convert', str(source), str(out), '--model', 'green_swin_tiny', *cli_kwargs(TINY)]) == 0
    with safetensors.safe_open(out, 'pt') as f:
        metadata = f.metadata()
    assert (metadata['format'], metadata['kind'], metadata['mim_class'], metadata['merge_order']) == (
        'greenmim', 'mim', 'GreenMIM', 'swin')
    assert json.loads(metadata['mim_kwargs'])['decoder_dim'] == 32
    assert_same(safetensors.torch.load_file(out), green.state_dict())


def test_merge_order_check_scores_each_order(green, tmp_path, capsys):
    checkpoint = authors_greenmim(green)
    images = convert.sample_images(green.encoder, limit=2)
    assert images.shape == (2, 3, 224, 224)
    losses = convert.merge_order_losses(checkpoint['model'], 'green_swin_tiny', images, num_masks=4, **TINY)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        expected = sum(green.eval()(images, generator=generator).loss.item() for _ in range(4)) / 4
    assert losses['swin'] == pytest.approx(expected) and losses['early'] != losses['swin']
    # predicting zeros scores the mean of each masked unit's normalised pixels squared: (n-1)/n for n pixels
    assert losses[convert.ZERO_PREDICTION] == pytest.approx(1 - 1 / (32 * 32 * 3), abs=1e-4)
    source = tmp_path / 'ckpt.pth'
    torch.save(checkpoint, source)
    assert main(['convert', str(source), str(tmp_path / 'unused.safetensors'), '--model', 'green_swin_tiny',
                 *cli_kwargs(TINY), '--check-merge-order', '--check-images', '2']) == 0
    report = capsys.readouterr().out.splitlines()
    assert report[0] == 'MIM loss on 2 sample photos, 4 masks each (lower is better):'
    assert re.fullmatch(rf"  --merge-order swin   {losses['swin']:.4f}   concatenation x00,x10,x01,x11 \(Swin's\), "
                        r"as the authors' code since their \"fix misalignment in PatchMerging\" commit", report[1])
    assert re.fullmatch(rf"  --merge-order early  {losses['early']:.4f}   concatenation x00,x01,x10,x11, as the "
                        r"authors' code before that commit and their original release", report[2])
    assert re.fullmatch(rf'  zero prediction +{losses[convert.ZERO_PREDICTION]:.4f}   for scale: .*', report[3])
    assert report[4] == f'lower loss: --merge-order {min(("swin", "early"), key=losses.get)}'
    assert not (tmp_path / 'unused.safetensors').exists()


def test_merge_order_check_refuses_a_classifier(tmp_path, capsys):
    model = timm.create_model('green_swin_tiny', num_classes=10, **TINY)
    source = tmp_path / 'classifier.pth'
    torch.save({'model': to_authors_swin(model.state_dict(), model)}, source)
    assert main(['convert', str(source), str(tmp_path / 'unused.safetensors'), '--model', 'green_swin_tiny',
                 *cli_kwargs(TINY), '--check-merge-order']) == 2
    assert re.fullmatch(r'greenmim convert: error: --check-merge-order needs a GreenMIM or SimMIM pre-training '
                        r'checkpoint .*\n', capsys.readouterr().err)
