"""green_twins: timm compatibility, forward_visible vs an independent dense computation (both backends), gradients,
input checks, the SimMIM dense path, torch.compile."""
import os

import pytest
import timm
import torch

import greenmim
from greenmim.masking import random_mask
from greenmim.models import GreenTwins
from dense_reference import dense_twins_key_masked_stages

TIMM_NAMES = {f'green_twins_{kind}_{size}': f'twins_{kind}_{size}'
              for kind in ('svt', 'pcpvt') for size in ('small', 'base', 'large')}
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


def _tiny(name):
    """64 px: grids 16/8/4/2 under a 2x2 mask grid; SVT's local windows of 2."""
    kwargs = dict(img_size=64, embed_dims=(8, 16, 16, 32), num_heads=(1, 2, 2, 4), depths=(2, 2, 2, 2))
    return dict(kwargs, wss=(2, 2, 2, 2)) if '_svt_' in name else kwargs


BACKENDS = ['torch', 'triton']


def _model(name, **kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    with torch.no_grad():  # make the position encodings' biases matter (timm initialises them to zero)
        for block in model.pos_block:
            block.proj[0].bias.normal_()
    return model


def _rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    if request.param == 'triton' and os.environ.get('TRITON_INTERPRET') != '1' and not torch.cuda.is_available():
        pytest.skip('Triton needs CUDA or TRITON_INTERPRET=1 at start-up')
    monkeypatch.setenv('GREENMIM_BACKEND', request.param)
    return request.param


@pytest.mark.parametrize('name', sorted(TIMM_NAMES))
def test_state_dict_matches_timm_twins(name):
    with torch.device('meta'):
        ours = timm.create_model(name)
        ref = timm.create_model(TIMM_NAMES[name])
    assert isinstance(ours, GreenTwins)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {
        k: tuple(v.shape) for k, v in ref.state_dict().items()}


@pytest.mark.parametrize('name', ['green_twins_svt_small', 'green_twins_pcpvt_small'])
def test_dense_forward_is_timm_twins(name):
    ours = _model(name, **SMALL[name])
    ref = timm.create_model(TIMM_NAMES[name], **SMALL[name]).eval()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x))


def test_timm_model_api():
    model = timm.create_model('green_twins_svt_small', num_classes=10, **SMALL['green_twins_svt_small'])
    x = torch.randn(1, 3, 224, 224)
    assert model.forward_head(model.forward_features(x)).shape == (1, 10)
    final, inter = model.forward_intermediates(x)
    assert [t.shape[1] for t in inter] == [8, 16, 32, 64]
    model.reset_classifier(5)
    assert model(x).shape == (1, 5)
    assert 'pos_block.0.proj.0.weight' in model.no_weight_decay()
    assert model.group_matcher()['stem'] == r'^patch_embeds.0'
    assert timm.create_model('green_twins_pcpvt_small.mim_in1k').num_classes == 0
    assert timm.create_model('green_twins_svt_large').num_classes == 1000
    with pytest.raises(TypeError):
        timm.create_model('green_twins_svt_small', not_a_kwarg=1)


def test_features_only_is_timm_twins():
    torch.manual_seed(0)
    kwargs = dict(SMALL['green_twins_svt_small'], features_only=True, out_indices=(1, 3))
    ours = timm.create_model('green_twins_svt_small', **kwargs).eval()
    ref = timm.create_model('twins_svt_small', **kwargs).eval()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        feats, expected = ours(x), ref(x)
    assert [tuple(f.shape) for f in feats] == [(1, 16, 28, 28), (1, 64, 7, 7)]  # NCHW, as timm's Twins
    for a, b in zip(feats, expected):
        torch.testing.assert_close(a, b)


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
            ours = model.forward_visible(x, mask)
            dense = dense_twins_key_masked_stages(model, x, mask)
        assert [t.shape for t in ours] == [t.shape for t in dense]
        for o, d in zip(ours, dense):
            assert _rel_err(o, d) < 1e-5


@pytest.mark.parametrize('name', ['green_twins_svt_small', 'green_twins_pcpvt_small'])
def test_all_visible_mask_is_timm_dense_forward(name):
    model = _model(name, **SMALL[name])
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ours = model.forward_visible(x, torch.ones(7, 7, dtype=torch.bool))
        dense = model.forward_intermediates(x, intermediates_only=True)  # NCHW, before the final norm
    for o, d in zip(ours, dense):
        assert _rel_err(o, d.flatten(2).transpose(1, 2)) < 1e-5


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
    assert _rel_err(right[0], dense[0]) < 1e-5
    assert _rel_err(wrong[0], dense[0]) > 1e-2


@pytest.mark.parametrize('name', ['green_twins_svt_small', 'green_twins_pcpvt_small'])
def test_masked_pixels_do_not_change_visible_outputs(name):
    model = _model(name, **SMALL[name])
    mask = random_mask((7, 7), 0.75, torch.Generator().manual_seed(3))
    x = torch.randn(1, 3, 224, 224)
    hidden = (~mask).repeat_interleave(32, 0).repeat_interleave(32, 1)
    y = torch.where(hidden, torch.randn_like(x) * 100, x)
    with torch.no_grad():
        for a, b in zip(model.forward_visible(x, mask), model.forward_visible(y, mask)):
            assert torch.equal(a, b)


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
            assert _rel_err(ours[n], p.grad) < 1e-4, n
    assert _rel_err(ours_x, x.grad) < 1e-4


@pytest.mark.parametrize('images,mask,match', [
    (torch.randn(1, 3, 40, 64), torch.ones(2, 2, dtype=torch.bool), 'multiple of the 32-pixel'),
    (torch.randn(1, 3, 96, 96), torch.ones(3, 3, dtype=torch.bool), 'does not match the model'),
    (torch.randn(1, 3, 64, 64), torch.ones(2, 3, dtype=torch.bool), 'mask shape'),
    (torch.randn(1, 3, 64, 64), torch.ones(2, 2, dtype=torch.uint8), 'dtype'),
    (torch.randn(1, 3, 64, 64), torch.zeros(2, 2, dtype=torch.bool), 'no visible unit'),
    (torch.randn(3, 64, 64), torch.ones(2, 2, dtype=torch.bool), r'\[B, C, H, W\]'),
    (torch.randn(1, 1, 64, 64), torch.ones(2, 2, dtype=torch.bool), 'channels'),
])
def test_bad_inputs_raise(images, mask, match):
    model = timm.create_model('green_twins_svt_small', **_tiny('green_twins_svt_small'))
    with pytest.raises(ValueError, match=match):
        model.forward_visible(images, mask)
    with pytest.raises(ValueError, match=match):
        greenmim.GreenMIM(model)(images, mask)
    with pytest.raises(ValueError, match=match):
        greenmim.SimMIM(model)(images, mask)


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


def test_layout_must_match_batch_mask_and_model():
    model = _model('green_twins_svt_small', **_tiny('green_twins_svt_small'))
    mask = torch.tensor([[True, False], [False, True]])
    layout = model.visible_layout(mask, 2)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model.forward_visible(x, mask, layout)
        with pytest.raises(ValueError, match='batch size 2, the images have 4'):
            model.forward_visible(torch.randn(4, 3, 64, 64), mask, layout)
        with pytest.raises(ValueError, match='another mask'):
            model.forward_visible(x, ~mask, layout)
        with pytest.raises(ValueError, match='stages'):
            model.forward_visible(x, mask, layout[:3])


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


@pytest.mark.parametrize('name', ['green_twins_svt_small', 'green_twins_pcpvt_small'])
def test_forward_visible_compiles_without_graph_breaks(name, backend):
    model = _model(name, **_tiny(name))
    x = torch.randn(2, 3, 64, 64)
    mask = torch.tensor([[True, False], [True, True]])
    layout = model.visible_layout(mask, 2)
    torch._dynamo.reset()
    compiled = torch.compile(model.forward_visible, fullgraph=True, backend='eager')
    with torch.no_grad():
        for a, b in zip(compiled(x, mask, layout), model.forward_visible(x, mask, layout)):
            torch.testing.assert_close(a, b)
    with pytest.raises(Exception, match='layout'):
        compiled(x, mask)
