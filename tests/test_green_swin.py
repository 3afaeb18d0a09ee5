"""green_swin: forward_visible vs an independent dense computation (forward, shifted windows, gradients,
other sizes). What every family keeps is in test_visible_contract.py."""
import dataclasses

import pytest
import timm
import torch

from greenmim.masking import random_mask
from dense_reference import assert_stages_close, dense_key_masked_stages, rel_err


def _model(name, **kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    with torch.no_grad():  # make the bias tables matter (timm initialises them near zero)
        for n, p in model.named_parameters():
            if n.endswith('relative_position_bias_table'):
                p.normal_()
    return model


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
            assert_stages_close(model.forward_visible(x, mask), dense_key_masked_stages(model, x, mask))


def test_dense_check_fails_for_attention_that_ignores_the_shift():
    """The dense comparison is sensitive to the shifted windows: the same model run with every block's attention
    laid out as for an unshifted window disagrees with the dense reference."""
    model = _model('green_swin_tiny')
    mask = random_mask((7, 7), 0.75, torch.Generator().manual_seed(5))
    x = torch.randn(1, 3, 224, 224)
    layout = model.visible_layout(mask, 1)
    unshifted = dataclasses.replace(layout, stages=tuple(dataclasses.replace(stage, attention={
        key: stage.attention[(key[0], (0, 0))] for key in stage.attention}) for stage in layout))
    assert any(shift != (0, 0) for stage in layout for _, shift in stage.attention)
    with torch.no_grad():
        dense = dense_key_masked_stages(model, x, mask)
        right = model.forward_visible(x, mask, layout)
        wrong = model.forward_visible(x, mask, unshifted)
    assert rel_err(right[0], dense[0]) < 1e-5
    assert rel_err(wrong[0], dense[0]) > 1e-3


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
            assert rel_err(ours[n], p.grad) < 1e-4, n


def test_other_image_size_via_kwargs():
    model = _model('green_swin_tiny', img_size=448)
    mask = random_mask((14, 14), 0.75, torch.Generator().manual_seed(0))
    x = torch.randn(1, 3, 448, 448)
    with torch.no_grad():
        assert_stages_close(model.forward_visible(x, mask), dense_key_masked_stages(model, x, mask))
