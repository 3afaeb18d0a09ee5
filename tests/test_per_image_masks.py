"""Per-image masks ``[B, Hm, Wm]``: drawing and checks, the pooled Optimal Grouping over the batch, the per-image
layout, forward_visible per image vs the batch-wise path of each image alone and the dense reference (both
backends), GreenMIM / SimMIM losses, reconstructions, the pretrain CLI and the benchmark's smoke mode."""
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch

import greenmim
from greenmim import grouping
from greenmim.grouping import (
    grouping_cost, optimal_grouping, optimal_histogram_grouping, pack_histogram, pack_segments)
from greenmim.layout import build_visible_layout, layout_to
from greenmim.masking import check_mask, random_mask
from greenmim.train import pretrain
from greenmim.train.data import MaskCollate
from greenmim.train.reconstruction import reconstruct
from dense_reference import rel_err
from families import BY_MODEL, FAMILIES, dense_stages, perturbed
from train_fixtures import copy_photos, tiny_pretrain_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
def _model(name):
    return perturbed(name, **BY_MODEL[name].small)


# four different 2x2 masks with two visible units each
MASKS = torch.tensor([[[1, 0], [0, 1]], [[1, 1], [0, 0]], [[0, 1], [1, 0]], [[0, 0], [1, 1]]], dtype=torch.bool)


# ------------------------------------------------------------------------------------------------ masks
def test_random_mask_per_image():
    masks = random_mask((7, 7), 0.75, torch.Generator().manual_seed(0), batch_size=16)
    assert masks.dtype == torch.bool and masks.shape == (16, 7, 7)
    assert masks.flatten(1).sum(1).tolist() == [12] * 16
    assert len({m.flatten().tolist().__str__() for m in masks}) == 16  # different masks
    assert torch.equal(masks, random_mask((7, 7), 0.75, torch.Generator().manual_seed(0), batch_size=16))
    check_mask(masks, (7, 7), 16)


def test_per_image_mask_with_an_all_visible_image_raises():
    mim = greenmim.GreenMIM(_model('green_swin_tiny'))
    with pytest.raises(ValueError, match='no masked unit'):
        mim(torch.randn(2, 3, 64, 64), torch.stack([MASKS[0], torch.ones(2, 2, dtype=torch.bool)]))
    with pytest.raises(ValueError, match='mask_mode'):
        greenmim.GreenMIM(_model('green_swin_tiny'), mask_mode='pixel')


# ------------------------------------------------------------------------------------------------ grouping
@pytest.mark.parametrize('seed', range(40))
def test_histogram_packing_matches_pack_segments(seed):
    """Same number of groups as the item-by-item Algorithm 1 (and its bound), every segment placed once."""
    rng = random.Random(seed)
    sizes = [rng.randint(1, 49) for _ in range(rng.randint(1, 120))]
    g = rng.randint(max(sizes), max(sizes) + 40)
    packing = pack_histogram(np.bincount(sizes), g)
    groups = sum(r for _, r in packing)
    assert groups == len(pack_segments(sizes, g))
    assert groups < 2 * sum(sizes) / g + 1
    assert (sum(p * r for p, r in packing) == np.bincount(sizes)).all()
    assert all(p @ np.arange(len(p)) <= g for p, _ in packing)
    channels = rng.choice([8, 96, 128])
    (hist, hist_g), (ref, ref_g) = optimal_histogram_grouping(np.bincount(sizes), channels), optimal_grouping(
        sizes, channels)
    assert grouping_cost(sum(r for _, r in hist), hist_g, channels) == grouping_cost(len(ref), ref_g, channels)


def _exhaustive_pick(counts, channels, tolerance):
    """Every ``g_s`` packed: the least-cost one, and the fewest-padded (then cheapest, smallest) within
    ``tolerance`` of it."""
    total, largest = int(counts @ np.arange(len(counts))), int(np.nonzero(counts)[0][-1])
    rows = []
    for g in range(largest, total + 1):
        groups = sum(r for _, r in pack_histogram(counts, g))
        rows.append((groups * g - total, grouping_cost(groups, g, channels), g))
    least = min(cost for _, cost, _ in rows)
    return min(r for r in rows if r[1] <= least * (1 + tolerance)), least


@pytest.mark.parametrize('seed', range(30))
def test_pooled_sweep_takes_fewest_padded_slots_within_tolerance(seed):
    """The sweep's early stops keep the pick of an exhaustive sweep, with and without a tolerance."""
    rng = random.Random(seed)
    counts = np.bincount([rng.randint(1, 30) for _ in range(rng.randint(5, 80))])
    channels = rng.choice([32, 128, 512])
    for tolerance in (0.0, 0.005, 0.05):
        (padded, cost, g), least = _exhaustive_pick(counts, channels, tolerance)
        packing, g_s = optimal_histogram_grouping(counts, channels, tolerance=tolerance)
        groups = sum(r for _, r in packing)
        assert (g_s, groups * g_s - int(counts @ np.arange(len(counts)))) == (g, padded)
        assert grouping_cost(groups, g_s, channels) <= least * (1 + tolerance)


def test_per_image_layout_trades_eq8_cost_within_tolerance_for_padding():
    """Swin-B stage 3 at batch 128 (the benchmark's first mask draw): Eq. 8's least cost pads (g_s 28, 16 slots);
    the per-image layout takes a g_s without padding that costs a little more (0.12%)."""
    specs = timm.create_model('green_swin_base', device='meta').stage_specs()
    masks = random_mask((7, 7), 0.75, torch.Generator().manual_seed(0), batch_size=128)
    att = build_visible_layout(masks, specs, 128)[2].attention[((7, 7), (0, 0))]
    counts = np.bincount(torch.unique(att.segment[att.index >= 0], return_counts=True)[1].numpy())  # segment sizes
    (padded, _, g), least = _exhaustive_pick(counts, specs[2].channels, 0.0)
    assert padded > 0
    assert int((att.index < 0).sum()) == 0 and att.group_size != g
    assert least < grouping_cost(att.index.shape[0], att.group_size, specs[2].channels) <= least * (
        1 + grouping.POOLED_COST_TOLERANCE)


def test_histogram_packing_too_small_group():
    with pytest.raises(ValueError, match='smaller than the largest segment'):
        pack_histogram(np.bincount([50, 3]), 49)


@pytest.mark.parametrize('name,kwargs', [('green_swin_base', {}), ('green_twins_svt_small', {})])
def test_per_image_layout_covers_every_token_once_with_image_segments(name, kwargs):
    specs = timm.create_model(name, device='meta', **kwargs).stage_specs()
    batch = 8
    masks = random_mask((7, 7), 0.75, torch.Generator().manual_seed(1), batch_size=batch)
    layout = build_visible_layout(masks, specs, batch)
    for stage, spec in zip(layout, specs):
        n = stage.num_tokens
        assert stage.token_index.shape == (batch, n) and torch.equal(layout.mask, masks)
        for b in range(batch):  # each image's tokens are the ones its own mask keeps
            single = build_visible_layout(masks[b], specs, 1)[specs.index(spec)]
            assert torch.equal(stage.token_index[b], single.token_index)
        for att in stage.attention.values():
            index, segment = att.index.numpy(), att.segment.numpy()
            valid = index >= 0
            assert sorted(index[valid].tolist()) == list(range(batch * n))
            image = index // n
            for seg in np.unique(segment[valid]):  # a segment holds tokens of one image only
                assert len(set(image[segment == seg].tolist())) == 1


def test_per_image_padding_and_cost_against_batch_wise():
    """Swin-B 224, ratio 0.75, batch 32, against each image's own Algorithm 1 layout: over all stages, the pooled
    packing pads less and costs less (Eq. 8); per stage, its padding stays within 0.5% of the visible tokens (one
    g_s for the batch cannot always pack as tightly as a g_s per image) and its cost within 2%."""
    specs = timm.create_model('green_swin_base', device='meta').stage_specs()
    masks = random_mask((7, 7), 0.75, torch.Generator().manual_seed(2), batch_size=32)
    pooled = build_visible_layout(masks, specs, len(masks))
    alone = [build_visible_layout(m, specs, 1) for m in masks]
    totals = np.zeros((2, 2))
    for s, spec in enumerate(specs):
        def padding_and_cost(layouts):
            atts = [att for layout in layouts for att in layout[s].attention.values()]
            return (sum(int((a.index < 0).sum()) for a in atts),
                    sum(grouping_cost(a.index.shape[0], a.group_size, spec.channels) for a in atts))
        ours, theirs = padding_and_cost([pooled]), padding_and_cost(alone)
        totals += [ours, theirs]
        assert ours[0] <= theirs[0] + 0.005 * len(masks) * pooled[s].num_tokens * len(spec.windows)
        assert ours[1] <= 1.02 * theirs[1]
    assert (totals[0] < totals[1]).all()


def test_mask_collate_and_layout_to():
    specs = _model('green_swin_tiny').layout_specs
    collate = MaskCollate(specs, 0.5, per_image=True, seed=0)
    batch = collate([(torch.randn(3, 64, 64), -1) for _ in range(3)])
    packed = batch.inputs['packed']
    assert batch.images.shape == (3, 3, 64, 64) and packed.host_mask.shape == (3, 2, 2)
    assert packed.buffer.ndim == 1  # one buffer: one shared-memory handle from a worker
    moved = layout_to(packed, torch.device('cpu'))
    mask = moved.host_mask
    built = build_visible_layout(mask, specs, 3)
    assert moved.batch_size == 3 and torch.equal(moved.mask, mask) and torch.equal(moved.masked_units,
                                                                                   built.masked_units)
    for a, b in zip(built, moved):
        assert a.token_index.dtype == b.token_index.dtype == torch.long
        assert torch.equal(a.token_index, b.token_index) and (a.merge_index is None or torch.equal(
            a.merge_index, b.merge_index))
        assert all(torch.equal(a.attention[k].index, b.attention[k].index) for k in a.attention)
    mim = greenmim.GreenMIM(_model('green_swin_tiny'), decoder_dim=32, decoder_heads=4).eval()
    with torch.no_grad():
        assert torch.equal(mim(batch.images, layout=moved).loss, mim(batch.images, mask).loss)
    again = MaskCollate(specs, 0.5, per_image=False, seed=0)([(torch.randn(3, 64, 64), -1)] * 2)
    assert again.inputs['packed'].host_mask.shape == (2, 2)
    masks_only = MaskCollate(specs, 0.5, per_image=False, seed=0, layout=False)([(torch.randn(3, 64, 64), -1)] * 2)
    assert masks_only.inputs['mask'].shape == (2, 2)


# ------------------------------------------------------------------------------------------------ encoders
def _check_per_image(model, images, masks):
    with torch.no_grad():
        ours = model.forward_visible(images, masks)
        for b in range(len(images)):
            alone = model.forward_visible(images[b:b + 1], masks[b])
            dense = dense_stages(model, images[b:b + 1], masks[b])
            for o, a, d in zip(ours, alone, dense, strict=True):
                assert rel_err(o[b:b + 1], a) < 1e-5 and rel_err(o[b:b + 1], d) < 1e-5


@pytest.mark.parametrize('name', sorted(BY_MODEL))
def test_forward_visible_per_image_equals_each_image_alone_and_dense(name, backend):
    model = _model(name)
    _check_per_image(model, torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)), MASKS)


@pytest.mark.parametrize('family', FAMILIES, ids=lambda f: f.model)
def test_forward_visible_per_image_at_224(family):
    """7x7 mask grid, window 7 (shifted for Swin), ratio 0.75, the torch backend."""
    model = perturbed(family.model, **family.at_224)
    gen = torch.Generator().manual_seed(3)
    _check_per_image(model, torch.randn(3, 3, 224, 224, generator=gen), random_mask((7, 7), 0.75, gen, 3))


# ------------------------------------------------------------------------------------------------ wrappers
@pytest.mark.parametrize('cls', [greenmim.GreenMIM, greenmim.SimMIM])
def test_per_image_loss_is_the_mean_of_each_image_alone(cls):
    """Equal masked counts per image: the batch loss is the mean of each image's own batch-wise loss."""
    torch.manual_seed(0)
    kwargs = dict(decoder_dim=32, decoder_heads=4) if cls is greenmim.GreenMIM else {}
    mim = cls(_model('green_swin_tiny'), mask_ratio=0.5, **kwargs).eval()
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = mim(images, MASKS)
        alone = [mim(images[b:b + 1], MASKS[b]) for b in range(4)]
    assert torch.equal(out.mask, MASKS)
    torch.testing.assert_close(out.loss, torch.stack([a.loss for a in alone]).mean(), rtol=1e-5, atol=0)
    torch.testing.assert_close(out.pred, torch.cat([a.pred for a in alone]), rtol=1e-5, atol=1e-6)


def test_a_prebuilt_layout_gives_the_same_output_and_simmim_refuses_one():
    torch.manual_seed(0)
    mim = greenmim.GreenMIM(_model('green_swin_tiny'), mask_ratio=0.5, decoder_dim=32, decoder_heads=4).eval()
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    layout = mim.encoder.visible_layout(MASKS, 4)
    with torch.no_grad():
        assert torch.equal(mim(images, MASKS, layout=layout).pred, mim(images, MASKS).pred)
    with pytest.raises(ValueError, match='SimMIM runs the dense encoder on every token: it takes no layout'):
        greenmim.SimMIM(mim.encoder, mask_ratio=0.5)(images, MASKS, layout=layout)


def test_mask_mode_image_draws_one_mask_per_image_and_round_trips():
    mim = greenmim.GreenMIM(_model('green_swin_tiny'), mask_ratio=0.5, decoder_dim=32, decoder_heads=4,
                            mask_mode='image')
    out = mim(torch.randn(3, 3, 64, 64), generator=torch.Generator().manual_seed(0))
    assert out.mask.shape == (3, 2, 2) and out.mask.flatten(1).sum(1).tolist() == [2, 2, 2]
    assert mim.wrapper_kwargs()['mask_mode'] == 'image'
    assert greenmim.mim.mim_from_metadata(mim.encoder, {'mim_class': 'GreenMIM', 'mim_kwargs': json.dumps(
        mim.wrapper_kwargs())}).mask_mode == 'image'


def test_reconstruction_shows_each_images_own_mask():
    mim = greenmim.GreenMIM(_model('green_swin_tiny'), mask_ratio=0.5, decoder_dim=32, decoder_heads=4)
    images = torch.randn(4, 3, 64, 64)
    masked, recon = reconstruct(mim, images, MASKS)
    for b in range(4):
        visible = MASKS[b].repeat_interleave(32, 0).repeat_interleave(32, 1)
        assert torch.equal(masked[b][:, ~visible], torch.zeros_like(masked[b][:, ~visible]))
        torch.testing.assert_close(masked[b][:, visible], images[b][:, visible])
        torch.testing.assert_close(recon[b][:, visible], images[b][:, visible])


# ------------------------------------------------------------------------------------------------ CLI, benchmark
def test_pretrain_mask_mode_image_runs_and_resumes(tmp_path):
    photos = copy_photos(tmp_path / 'photos', 8)
    full = pretrain(tiny_pretrain_config(tmp_path / 'full', data=str(photos), epochs=2, mask_mode='image'))
    out = tmp_path / 'run'
    first = pretrain(tiny_pretrain_config(out, data=str(photos), epochs=2, max_steps=3, mask_mode='image',
                                          vis_every=1))
    assert json.loads((out / 'config.json').read_text())['mask_mode'] == 'image'
    from safetensors import safe_open
    with safe_open(str(out / 'checkpoints' / 'step-00000003' / 'model.safetensors'), 'pt') as f:
        assert json.loads(f.metadata()['mim_kwargs'])['mask_mode'] == 'image'
    assert (out / 'reconstructions' / 'epoch-0001.png').exists()
    resumed = pretrain(tiny_pretrain_config(out, data=str(photos), epochs=2, mask_mode='image', resume=str(out)))
    assert first.losses + resumed.losses == full.losses  # bitwise
    batch = pretrain(tiny_pretrain_config(tmp_path / 'batch', data=str(photos), epochs=2))
    assert batch.losses != full.losses
    with pytest.raises(ValueError, match='trained with --mask-mode image, this run has --mask-mode batch'):
        pretrain(tiny_pretrain_config(tmp_path / 'full', data=str(photos), epochs=3, resume=str(tmp_path / 'full')))


@pytest.mark.parametrize('mask_mode', ['batch', 'image'])
def test_pretrain_masks_and_layouts_come_from_the_loader(tmp_path, monkeypatch, mask_mode):
    """Both mask modes draw each micro-batch's masks and build their layout in the loader (DataLoader workers, the
    collate's own builder), from a seed of the micro-batch's position: the model's own mask sampling and layout
    builder are never called, and 2 workers give the losses of none."""
    def refuse(*args, **kwargs):
        raise AssertionError('the training process drew a mask or built a layout')
    monkeypatch.setattr(greenmim.models.visible.VisibleEncoderMixin, 'visible_layout', refuse)
    monkeypatch.setattr(greenmim.models.visible, 'build_visible_layout', refuse)
    monkeypatch.setattr(greenmim.GreenMIM, 'sample_mask', refuse)
    photos = copy_photos(tmp_path / 'photos', 12)
    config = dict(data=str(photos), epochs=2, mask_mode=mask_mode, accum_iter=1)
    workers = pretrain(tiny_pretrain_config(tmp_path / 'workers', num_workers=2, **config))
    in_process = pretrain(tiny_pretrain_config(tmp_path / 'main', num_workers=0, **config))
    assert len(workers.losses) == 6 and workers.losses == in_process.losses


def test_pretrain_cli_mask_mode_flag(tmp_path):
    from greenmim.cli import main
    cfg = tiny_pretrain_config(tmp_path, data=str(copy_photos(tmp_path / 'photos', 4)))
    args = ['pretrain', '--data', cfg.data, '--model', cfg.model, '--input-size', '64', '--decoder-dim', '32',
            '--model-kwargs', 'embed_dim=24', 'depths=(1,1,1,1)', 'num_heads=(1,1,2,2)', 'window_size=2',
            '--batch-size', '4', '--epochs', '1', '--num-workers', '0', '--vis-every', '0',
            '--output-dir', str(tmp_path / 'run')]
    assert main(args + ['--mask-mode', 'image']) == 0
    assert json.loads((tmp_path / 'run' / 'config.json').read_text())['mask_mode'] == 'image'
    with pytest.raises(SystemExit) as refused:  # a value outside the flag's choices: argparse's one-line error
        main(args + ['--mask-mode', 'pixel', '--output-dir', str(tmp_path / 'bad')])
    assert refused.value.code == 2 and not (tmp_path / 'bad').exists()


def test_benchmark_smoke(tmp_path):
    out = tmp_path / 'result.json'
    subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'bench_per_image_masks.py'), '--smoke',
                    '--out', str(out)], check=True, cwd=ROOT, timeout=600)
    result = json.loads(out.read_text())
    assert {'padding', 'model_tile_ratio', 'layout_time', 'step_time'} <= set(result)
    assert all(v['draws_with_more_padding'] <= result['draws'] and v['tile_ratio'] > 0
               for v in result['padding'].values())
