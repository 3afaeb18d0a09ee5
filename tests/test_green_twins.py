"""green_twins: forward_visible of every variant vs an independent dense computation (both backends,
gradients), models that do not line up with the mask units, the SimMIM dense path. What every family keeps is in
test_visible_contract.py."""

import pytest
import timm
import torch

from greenmim.masking import random_mask
from greenmim.models import GreenTwins
from dense_reference import assert_stages_close, dense_twins_key_masked_stages, rel_err

# each variant shrunk (narrower, fewer blocks) with its structure kept: heads, mlp ratios, windows (SVT: local and
# global blocks alternate), sub-sampling ratios 8/4/2/1, 224 px
SMALL = {
    'green_twins_svt_small': dict(embed_dims=(8, 16, 32, 64), depths=(2, 2, 3, 2)),
    'green_twins_svt_base': dict(embed_dims=(12, 24, 48, 96), depths=(2, 2, 4, 2)),
    'green_twins_svt_large': dict(embed_dims=(16, 32, 64, 128), depths=(2, 2, 4, 2)),
    'green_twins_pcpvt_small': dict(embed_dims=(8, 16, 40, 64), depths=(2, 2, 3, 2)),
    'green_twins_pcpvt_base': dict(embed_dims=(8, 16, 40, 64), depths=(2, 2, 4, 2)),
    'green_twins_pcpvt_large': dict(embed_dims=(8, 16, 40, 64), depths=(2, 3, 5, 2)),
}


def _model(name, **kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    with torch.no_grad():  # make the position encodings' biases matter (timm initialises them to zero)
        for block in model.pos_block:
            block.proj[0].bias.normal_()
    return model


@pytest.mark.parametrize('name,ratios', [
    ('green_twins_svt_small', (0.75, 0.4)),
    ('green_twins_svt_base', (0.75, 0.9)),
    ('green_twins_svt_large', (0.75, 0.6)),
    ('green_twins_pcpvt_small', (0.75, 0.4)),
    ('green_twins_pcpvt_base', (0.75, 0.9)),
    ('green_twins_pcpvt_large', (0.75, 0.6)),
])
def test_forward_visible_matches_dense_key_masked(name, ratios, backend):
    model = _model(name, **SMALL[name])
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 224, 224, generator=gen)
    for ratio in ratios:
        mask = random_mask((7, 7), ratio, gen)
        with torch.no_grad():
            assert_stages_close(model.forward_visible(x, mask), dense_twins_key_masked_stages(model, x, mask))


def test_dense_check_fails_without_the_position_encoding_residual(monkeypatch):
    """The authors' position encoding drops its residual: the dense comparison catches that."""
    model = _model('green_twins_pcpvt_small', **SMALL['green_twins_pcpvt_small'])
    mask = random_mask((7, 7), 0.75, torch.Generator().manual_seed(5))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        dense = dense_twins_key_masked_stages(model, x, mask)
        right = model.forward_visible(x, mask)
        with_residual = GreenTwins._pos_conv_visible
        monkeypatch.setattr(GreenTwins, '_pos_conv_visible', staticmethod(
            lambda block, x, layout: with_residual(block, x, layout) - x))
        wrong = model.forward_visible(x, mask)
    assert rel_err(right[0], dense[0]) < 1e-5
    assert rel_err(wrong[0], dense[0]) > 1e-2


@pytest.mark.parametrize('name', ['green_twins_svt_small', 'green_twins_pcpvt_small'])
def test_forward_visible_gradients_match_dense(name, backend):
    model = _model(name, **SMALL[name])
    mask = random_mask((7, 7), 0.75, torch.Generator().manual_seed(4))
    x = torch.randn(1, 3, 224, 224, requires_grad=True)
    sum(o.square().sum() for o in model.forward_visible(x, mask)).backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    ours_x, x.grad = x.grad.clone(), None
    model.zero_grad()
    sum(o.square().sum() for o in dense_twins_key_masked_stages(model, x, mask)).backward()
    assert set(ours) == {n for n, p in model.named_parameters() if p.grad is not None} and len(ours) > 100
    for n, p in model.named_parameters():
        if n in ours:
            assert rel_err(ours[n], p.grad) < 1e-4, n
    assert rel_err(ours_x, x.grad) < 1e-4


@pytest.mark.parametrize('kwargs,match', [
    (dict(img_size=256), 'not divisible by window'),  # 64x64 stage-1 grid, windows of 7
    (dict(sr_ratios=(16, 4, 2, 1)), 'straddles the mask units'),  # 16x16-token cells on 8x8-token units
])
def test_models_that_do_not_line_up_with_the_mask_units_raise(kwargs, match):
    model = timm.create_model('green_twins_svt_small', **dict(SMALL['green_twins_svt_small'], **kwargs))
    size = model.mask_grid_size
    x, mask = torch.randn(1, 3, 32 * size[0], 32 * size[1]), torch.ones(size, dtype=torch.bool)
    with pytest.raises(ValueError, match=match):
        model.forward_visible(x, mask)


def test_forward_masked_dense_is_timm_forward_with_mask_tokens():
    """SimMIM's dense path equals timm's own forward_features with the masked patch embeddings replaced (a hook on
    the first patch embedding)."""
    model = _model('green_twins_svt_small', **SMALL['green_twins_svt_small'])
    mask = random_mask((7, 7), 0.75, torch.Generator().manual_seed(6))
    x, token = torch.randn(2, 3, 224, 224), torch.randn(8)
    visible = mask.repeat_interleave(8, 0).repeat_interleave(8, 1).flatten()

    def replace_masked(module, args, output):
        tokens, size = output
        return torch.where(visible[None, :, None], tokens, token), size

    with torch.no_grad():
        ours = model.forward_masked_dense(x, mask, token)
        with model.patch_embeds[0].register_forward_hook(replace_masked):  # torch hook handles are context managers
            expected = model.forward_features(x)  # [B, 49, C] after the final norm
    assert ours.shape == (2, 64, 7, 7)
    torch.testing.assert_close(ours.flatten(2).transpose(1, 2), expected)
