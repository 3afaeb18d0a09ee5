"""What every green family keeps (each family's own tests check forward_visible against its dense computation):
timm's state dict, API, dense forward and features; an all-visible mask is the dense forward; masked pixels are
ignored; bad inputs and mismatched layouts raise; forward_visible compiles as one graph."""
import dataclasses
import os

import pytest
import timm
import torch

import greenmim
from greenmim.masking import random_mask
from dense_reference import assert_stages_close
from families import FAMILIES, ORIGINALS, perturbed

SMALL = {f.model: f.small for f in FAMILIES}


def _model(name):
    return perturbed(name, **SMALL[name])


def test_every_green_model_has_a_family_row():
    assert sorted(ORIGINALS) == sorted(timm.list_models('green_*'))


@pytest.mark.parametrize('name', sorted(ORIGINALS))
def test_state_dict_matches_timm(name):
    with torch.device('meta'):
        ours = timm.create_model(name, num_classes=1000)
        ref = timm.create_model(ORIGINALS[name], num_classes=1000)  # timm's 192 px SwinV2: in22k heads
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {
        k: tuple(v.shape) for k, v in ref.state_dict().items()}


@pytest.mark.parametrize('name', sorted(SMALL))
def test_timm_model_api(name):
    model = timm.create_model(name, num_classes=10, **SMALL[name])
    ref = timm.create_model(ORIGINALS[name], num_classes=10, **SMALL[name])
    x = torch.randn(1, 3, 64, 64)
    assert model.forward_head(model.forward_features(x)).shape == (1, 10)
    _, inter = model.forward_intermediates(x)
    assert [t.shape for t in inter] == [t.shape for t in ref.forward_intermediates(x)[1]]
    model.reset_classifier(5)
    assert model(x).shape == (1, 5)
    assert model.no_weight_decay() == ref.no_weight_decay() and model.group_matcher() == ref.group_matcher()
    assert timm.create_model(f'{name}.mim_in1k', **SMALL[name]).num_classes == 0
    assert timm.create_model(name, **SMALL[name]).num_classes == 1000
    with pytest.raises(TypeError):
        timm.create_model(name, not_a_kwarg=1)


@pytest.mark.parametrize('name', sorted(SMALL))
def test_dense_forward_and_features_are_timm(name):
    ours = _model(name)
    ref = timm.create_model(ORIGINALS[name], **SMALL[name]).eval()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x))
    ours = timm.create_model(name, features_only=True, out_indices=(1, 3), **SMALL[name]).eval()
    ref = timm.create_model(ORIGINALS[name], features_only=True, out_indices=(1, 3), **SMALL[name]).eval()
    ref.load_state_dict(ours.state_dict())
    with torch.no_grad():
        for a, b in zip(ours(x), ref(x), strict=True):  # Swin NHWC, Twins NCHW, as timm's
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize('name', sorted(SMALL))
def test_all_visible_mask_is_the_dense_forward(name):
    model = _model(name)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = model.forward_visible(x, torch.ones(2, 2, dtype=torch.bool))
        dense = model.forward_intermediates(x, intermediates_only=True)  # NCHW, before the final norm
    assert_stages_close(ours, [d.flatten(2).transpose(1, 2) for d in dense])


@pytest.mark.parametrize('name', sorted(SMALL))
def test_masked_pixels_do_not_change_visible_outputs(name):
    model = _model(name)
    mask = random_mask((2, 2), 0.5, torch.Generator().manual_seed(3))
    x = torch.randn(2, 3, 64, 64)
    hidden = (~mask).repeat_interleave(32, 0).repeat_interleave(32, 1)
    y = torch.where(hidden, torch.randn_like(x) * 100, x)
    with torch.no_grad():
        for a, b in zip(model.forward_visible(x, mask), model.forward_visible(y, mask)):
            assert torch.equal(a, b)


@pytest.mark.parametrize('name', sorted(SMALL))
@pytest.mark.parametrize('images,mask,match', [
    (torch.randn(1, 3, 40, 64), torch.ones(2, 2, dtype=torch.bool), 'multiple of the 32-pixel'),
    (torch.randn(1, 3, 96, 96), torch.ones(3, 3, dtype=torch.bool), 'does not match the model'),
    (torch.randn(1, 3, 64, 64), torch.ones(2, 3, dtype=torch.bool), 'mask shape'),
    (torch.randn(1, 3, 64, 64), torch.ones(2, 2, dtype=torch.uint8), 'dtype'),
    (torch.randn(1, 3, 64, 64), torch.zeros(2, 2, dtype=torch.bool), 'no visible unit'),
    (torch.randn(3, 64, 64), torch.ones(2, 2, dtype=torch.bool), r'\[B, C, H, W\]'),
    (torch.randn(1, 1, 64, 64), torch.ones(2, 2, dtype=torch.bool), 'channels'),
    # per-image masks [B, Hm, Wm]
    (torch.randn(2, 3, 64, 64), torch.tensor([[[1, 0], [0, 0]], [[1, 1], [0, 0]]], dtype=torch.bool),
     'same number of visible units'),
    (torch.randn(2, 3, 64, 64), torch.tensor([[[1, 0], [0, 0]], [[0, 0], [0, 0]]], dtype=torch.bool),
     r'no visible unit \(image 1\)'),
    (torch.randn(3, 3, 64, 64), torch.eye(2, dtype=torch.bool).expand(4, 2, 2), '4 masks for 3 images'),
    (torch.randn(2, 3, 64, 64), torch.eye(2, dtype=torch.bool)[None, :1].expand(2, 1, 2), 'mask shape'),
    (torch.randn(2, 3, 64, 64), torch.eye(2, dtype=torch.bool).expand(1, 2, 2, 2), 'mask shape'),
])
def test_bad_inputs_raise(name, images, mask, match):
    model = _model(name)
    with pytest.raises(ValueError, match=match):
        model.forward_visible(images, mask)
    with pytest.raises(ValueError, match=match):
        greenmim.GreenMIM(model)(images, mask)
    with pytest.raises(ValueError, match=match):
        greenmim.SimMIM(model)(images, mask)


@pytest.mark.parametrize('name', sorted(SMALL))
def test_layout_must_match_batch_mask_and_model(name):
    """A layout passed to forward_visible is checked against what it was built for, not trusted."""
    model = _model(name)
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
        with pytest.raises(ValueError, match='3 stages, the model has 4'):
            model.forward_visible(x, mask, dataclasses.replace(layout, stages=layout.stages[:3]))
        with pytest.raises(ValueError, match='VisibleLayout'):
            model.forward_visible(x, mask, list(layout))


@pytest.mark.parametrize('name', sorted(SMALL))
@pytest.mark.parametrize('backend', ['torch', 'triton'])
def test_forward_visible_compiles_without_graph_breaks(name, backend, monkeypatch):
    if backend == 'triton' and os.environ.get('TRITON_INTERPRET') != '1' and not torch.cuda.is_available():
        pytest.skip('Triton needs CUDA or TRITON_INTERPRET=1 at start-up')
    monkeypatch.setenv('GREENMIM_BACKEND', backend)
    model = _model(name)
    x = torch.randn(2, 3, 64, 64)
    mask = torch.tensor([[True, False], [True, True]])
    layout = model.visible_layout(mask, 2)
    torch._dynamo.reset()
    compiled = torch.compile(model.forward_visible, fullgraph=True, backend='eager')
    with torch.no_grad():
        for a, b in zip(compiled(x, mask, layout), model.forward_visible(x, mask, layout), strict=True):
            torch.testing.assert_close(a, b)
    with pytest.raises(Exception, match='layout'):
        compiled(x, mask)
