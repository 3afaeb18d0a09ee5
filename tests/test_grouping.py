"""Optimal Grouping (DP vs brute force, sweep vs exhaustive sweep) and the visible-token layout."""
import itertools
import random

import numpy as np
import pytest
import timm
import torch

import greenmim  # noqa: F401  (registers the models)
from greenmim.grouping import grouping_cost, max_subset, optimal_grouping, pack_segments
from greenmim.layout import build_visible_layout
from greenmim.masking import num_visible, random_mask


@pytest.mark.parametrize('seed', range(30))
def test_max_subset_matches_brute_force(seed):
    rng = random.Random(seed)
    sizes = [rng.randint(1, 20) for _ in range(rng.randint(1, 10))]
    capacity = rng.randint(max(sizes), sum(sizes) + 3)
    best = max(sum(c) for r in range(len(sizes) + 1) for c in itertools.combinations(sizes, r)
               if sum(c) <= capacity)
    chosen = max_subset(sizes, capacity)
    assert len(set(chosen)) == len(chosen)
    assert sum(sizes[i] for i in chosen) == best


@pytest.mark.parametrize('seed', range(20))
def test_pack_assigns_every_segment_once_within_capacity(seed):
    rng = random.Random(seed)
    sizes = [rng.randint(1, 49) for _ in range(rng.randint(1, 40))]
    g = rng.randint(max(sizes), max(sizes) + 30)
    groups = pack_segments(sizes, g)
    assert sorted(i for grp in groups for i in grp) == list(range(len(sizes)))
    assert all(sum(sizes[i] for i in grp) <= g for grp in groups)


@pytest.mark.parametrize('seed', range(20))
def test_sweep_equals_exhaustive_sweep(seed):
    rng = random.Random(seed)
    sizes = [rng.randint(1, 49) for _ in range(rng.randint(1, 16))]
    channels = rng.choice([8, 96, 128])
    groups, g = optimal_grouping(sizes, channels)
    exhaustive = min(grouping_cost(len(pack_segments(sizes, s)), s, channels)
                     for s in range(max(sizes), sum(sizes) + 1))
    assert grouping_cost(len(groups), g, channels) == exhaustive


def test_fixed_group_size_and_too_small_group():
    groups, g = optimal_grouping([30, 20, 19, 10], 96, group_size=49)
    assert g == 49 and sorted(sum([30, 20, 19, 10][i] for i in grp) for grp in groups) == [30, 49]
    with pytest.raises(ValueError, match='smaller than the largest segment'):
        pack_segments([50, 3], 49)


def test_num_visible_rounding():
    assert num_visible(49, 0.75) == 12  # 37/49 = 75.5% masked
    assert num_visible(64, 0.75) == 16
    assert num_visible(4, 0.9) == 1
    assert num_visible(49, 0.0) == 49
    with pytest.raises(ValueError, match='mask_ratio'):
        num_visible(49, 1.0)


def test_random_mask_is_reproducible():
    a = random_mask((7, 7), 0.75, torch.Generator().manual_seed(0))
    b = random_mask((7, 7), 0.75, torch.Generator().manual_seed(0))
    assert a.dtype == torch.bool and a.shape == (7, 7) and int(a.sum()) == 12 and torch.equal(a, b)


@pytest.mark.parametrize('window_size', [7, 14])
def test_layout_covers_every_visible_token_once(window_size):
    model = timm.create_model('green_swin_tiny', window_size=window_size)
    mask = random_mask((7, 7), 0.75, torch.Generator().manual_seed(0))
    batch = 3
    layout = build_visible_layout(mask, model.stage_specs(), batch)
    for stage in layout:
        assert stage.num_tokens == int(mask.sum()) * (stage.grid_size[0] // 7) ** 2
        for (window, shift), att in stage.attention.items():
            index = att.index.numpy()
            valid = index >= 0
            assert sorted(index[valid].tolist()) == list(range(batch * stage.num_tokens))
            assert (att.segment.numpy()[~valid] == -1).all()
            assert (att.position.numpy()[valid] < window[0] * window[1]).all()
            # every group holds tokens of a single image
            image = np.where(valid, index // stage.num_tokens, -1)
            assert all(len(set(row[row >= 0].tolist())) == 1 for row in image if (row >= 0).any())


def test_layout_segments_follow_swin_shift_regions():
    """Tokens share a segment iff timm's dense shift mask lets them attend to each other."""
    model = timm.create_model('green_swin_tiny')
    block = model.layers[0].blocks[1]
    mask = torch.ones(7, 7, dtype=torch.bool)
    layout = build_visible_layout(mask, model.stage_specs(), 1)[0]
    att = layout.attention[(tuple(block.window_size), tuple(block.shift_size))]
    rw = layout.grid_size[1]
    slot_of = {int(t): (g, s) for g, row in enumerate(att.index) for s, t in enumerate(row) if t >= 0}
    # timm: attn_mask[w, i, j] == 0 iff i, j (in-window indices of window w in the rolled frame) may attend
    sh, sw = block.shift_size
    for w in (0, 7, 63):
        for i, j in [(0, 48), (3, 45), (24, 25), (40, 47)]:
            toks = []
            for p in (i, j):
                r, c = (w // 8) * 7 + p // 7, (w % 8) * 7 + p % 7
                toks.append(((r + sh) % 56) * rw + (c + sw) % 56)
            (g1, s1), (g2, s2) = slot_of[toks[0]], slot_of[toks[1]]
            same = g1 == g2 and int(att.segment[g1, s1]) == int(att.segment[g2, s2])
            assert same == (block.attn_mask[w, i, j].item() == 0)
