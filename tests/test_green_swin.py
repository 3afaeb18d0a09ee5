"""green_swin: timm compatibility, forward_visible vs an independent dense computation, input checks."""
import dataclasses
import os

import pytest
import timm
import torch

import greenmim
from greenmim.masking import random_mask
from dense_reference import dense_key_masked_stages

TIMM_NAMES = {
    'green_swin_tiny': 'swin_tiny_patch4_window7_224',
    'green_swin_small': 'swin_small_patch4_window7_224',
    'green_swin_base': 'swin_base_patch4_window7_224',
    'green_swin_large': 'swin_large_patch4_window7_224',
}


def _model(name, **kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    with torch.no_grad():  # make the bias tables matter (timm initialises them near zero)
        for n, p in model.named_parameters():
            if n.endswith('relative_position_bias_table'):
                p.normal_()
    return model


def _rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize('name', sorted(TIMM_NAMES))
def test_state_dict_matches_timm_swin(name):
    with torch.device('meta'):
        ours = timm.create_model(name)
        ref = timm.create_model(TIMM_NAMES[name])
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == theirs


def test_dense_forward_is_timm_swin():
    ours = _model('green_swin_tiny')
    ref = timm.create_model('swin_tiny_patch4_window7_224').eval()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 224, 224)
    torch.testing.assert_close(ours(x), ref(x))


def test_timm_model_api():
    model = timm.create_model('green_swin_tiny', num_classes=10)
    x = torch.randn(1, 3, 224, 224)
    assert model.forward_head(model.forward_features(x)).shape == (1, 10)
    final, inter = model.forward_intermediates(x)
    assert [t.shape[1] for t in inter] == [96, 192, 384, 768]
    model.reset_classifier(5)
    assert model(x).shape == (1, 5)
    assert 'layers.0.blocks.0.attn.relative_position_bias_table' in model.no_weight_decay()
    assert model.group_matcher()['stem'] == r'^patch_embed'
    assert timm.create_model('green_swin_tiny.mim_in1k').num_classes == 0
    assert timm.create_model('green_swin_base').num_classes == 1000
    with pytest.raises(TypeError):
        timm.create_model('green_swin_tiny', not_a_kwarg=1)


@pytest.mark.parametrize('name,kwargs,ratio', [
    ('green_swin_tiny', {}, 0.75),
    ('green_swin_tiny', {}, 0.4),
    ('green_swin_base', {}, 0.75),
    ('green_swin_tiny', dict(window_size=14), 0.75),
])
def test_forward_visible_matches_dense_key_masked(name, kwargs, ratio):
    model = _model(name, **kwargs)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 224, 224, generator=gen)
    for _ in range(2):
        mask = random_mask((7, 7), ratio, gen)
        with torch.no_grad():
            ours = model.forward_visible(x, mask)
            dense = dense_key_masked_stages(model, x, mask)
        assert [t.shape for t in ours] == [t.shape for t in dense]
        for o, d in zip(ours, dense):
            assert _rel_err(o, d) < 1e-5


def test_features_only_is_timm_swin():
    torch.manual_seed(0)
    ours = timm.create_model('green_swin_tiny', features_only=True, out_indices=(1, 3)).eval()
    ref = timm.create_model('swin_tiny_patch4_window7_224', features_only=True, out_indices=(1, 3)).eval()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        feats, expected = ours(x), ref(x)
    assert [tuple(f.shape) for f in feats] == [(1, 28, 28, 192), (1, 7, 7, 768)]  # NHWC, as timm's Swin
    for a, b in zip(feats, expected):
        torch.testing.assert_close(a, b)


def test_dense_check_fails_for_attention_that_ignores_the_shift():
    """The dense comparison is sensitive to the shifted windows: the same model run with every block's attention
    laid out as for an unshifted window disagrees with the dense reference."""
    model = _model('green_swin_tiny')
    mask = random_mask((7, 7), 0.75, torch.Generator().manual_seed(5))
    x = torch.randn(1, 3, 224, 224)
    layout = model.visible_layout(mask, 1)
    unshifted = [dataclasses.replace(stage, attention={
        key: stage.attention[(key[0], (0, 0))] for key in stage.attention}) for stage in layout]
    assert any(shift != (0, 0) for stage in layout for _, shift in stage.attention)
    with torch.no_grad():
        dense = dense_key_masked_stages(model, x, mask)
        right = model.forward_visible(x, mask, layout)
        wrong = model.forward_visible(x, mask, unshifted)
    assert _rel_err(right[0], dense[0]) < 1e-5
    assert _rel_err(wrong[0], dense[0]) > 1e-3


def test_all_visible_mask_is_dense_forward():
    model = _model('green_swin_tiny')
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ours = model.forward_visible(x, torch.ones(7, 7, dtype=torch.bool))[-1]
        dense = model.layers(model.patch_embed(x)).flatten(1, 2)
    assert _rel_err(ours, dense) < 1e-5


def test_masked_pixels_do_not_change_visible_outputs():
    model = _model('green_swin_tiny')
    mask = random_mask((7, 7), 0.75, torch.Generator().manual_seed(3))
    x = torch.randn(1, 3, 224, 224)
    hidden = (~mask).repeat_interleave(32, 0).repeat_interleave(32, 1)
    y = torch.where(hidden, torch.randn_like(x) * 100, x)
    with torch.no_grad():
        for a, b in zip(model.forward_visible(x, mask), model.forward_visible(y, mask)):
            assert torch.equal(a, b)


def test_forward_visible_gradients_match_dense():
    model = _model('green_swin_tiny')
    mask = random_mask((7, 7), 0.75, torch.Generator().manual_seed(4))
    x = torch.randn(1, 3, 224, 224)
    model.forward_visible(x, mask)[-1].square().sum().backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    dense_key_masked_stages(model, x, mask)[-1].square().sum().backward()
    for n, p in model.named_parameters():
        if n in ours:
            assert _rel_err(ours[n], p.grad) < 1e-4, n


@pytest.mark.parametrize('images,mask,match', [
    (torch.randn(1, 3, 200, 224), torch.ones(7, 7, dtype=torch.bool), 'multiple of the 32-pixel'),
    (torch.randn(1, 3, 256, 256), torch.ones(8, 8, dtype=torch.bool), 'does not match the model'),
    (torch.randn(1, 3, 224, 224), torch.ones(7, 6, dtype=torch.bool), 'mask shape'),
    (torch.randn(1, 3, 224, 224), torch.ones(7, 7, dtype=torch.uint8), 'dtype'),
    (torch.randn(1, 3, 224, 224), torch.zeros(7, 7, dtype=torch.bool), 'no visible unit'),
    (torch.randn(3, 224, 224), torch.ones(7, 7, dtype=torch.bool), r'\[B, C, H, W\]'),
    (torch.randn(1, 1, 224, 224), torch.ones(7, 7, dtype=torch.bool), 'channels'),
])
def test_bad_inputs_raise(images, mask, match):
    model = timm.create_model('green_swin_tiny')
    with pytest.raises(ValueError, match=match):
        model.forward_visible(images, mask)
    with pytest.raises(ValueError, match=match):
        greenmim.GreenMIM(model)(images, mask)
    with pytest.raises(ValueError, match=match):
        greenmim.SimMIM(model)(images, mask)


def test_other_image_size_via_kwargs():
    model = _model('green_swin_tiny', img_size=448)
    mask = random_mask((14, 14), 0.75, torch.Generator().manual_seed(0))
    x = torch.randn(1, 3, 448, 448)
    with torch.no_grad():
        for o, d in zip(model.forward_visible(x, mask), dense_key_masked_stages(model, x, mask)):
            assert _rel_err(o, d) < 1e-5


@pytest.mark.parametrize('backend', ['torch', 'triton'])
def test_forward_visible_compiles_without_graph_breaks(backend, monkeypatch):
    if backend == 'triton' and os.environ.get('TRITON_INTERPRET') != '1' and not torch.cuda.is_available():
        pytest.skip('Triton needs CUDA or TRITON_INTERPRET=1 at start-up')
    monkeypatch.setenv('GREENMIM_BACKEND', backend)
    model = _model('green_swin_tiny', img_size=64, window_size=2, depths=(2, 2, 2, 2), embed_dim=32,
                   num_heads=(1, 2, 4, 8))
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


def test_layout_must_match_batch_mask_and_model():
    """A layout passed to forward_visible is checked against what it was built for, not trusted."""
    model = _model('green_swin_tiny', img_size=64, window_size=2, depths=(1, 1, 1, 1), embed_dim=16,
                   num_heads=(1, 1, 2, 2))
    mask = torch.tensor([[True, False], [False, True]])
    layout = model.visible_layout(mask, 2)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model.forward_visible(x, mask, layout)
        with pytest.raises(ValueError, match='batch size 2, the images have 4'):
            model.forward_visible(torch.randn(4, 3, 64, 64), mask, layout)
        with pytest.raises(ValueError, match='batch size 2, the images have 8'):
            model.forward_visible(torch.randn(8, 3, 64, 64), mask, layout)
        with pytest.raises(ValueError, match='another mask'):
            model.forward_visible(x, ~mask, layout)
        with pytest.raises(ValueError, match='stages'):
            model.forward_visible(x, mask, layout[:3])
