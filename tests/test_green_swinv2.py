"""green_swinv2: forward_visible vs an independent dense SwinV2 computation (windows 8 and 16, clamped windows,
both backends, batch-wise and per-image masks, gradients), on weights perturbed away from timm's init, where every
res-post-norm is 0 and each block is the identity. What every family keeps is in test_visible_contract.py."""
import math

import pytest
import timm
import torch

from greenmim.masking import random_mask
from dense_reference import assert_stages_close, dense_swinv2_key_masked_stages, rel_err

NARROW = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4))  # the variants' windows and sizes


def perturbed(name, **kwargs):
    """``name`` with every weight moved off timm's init: res-post-norm and merge norms ``N(1, 0.3)`` (timm: 0),
    biases ``N(0, 0.1)``, logit scales spread over ``log(U(1, 200))`` (some above the clamp at 100), the position
    bias MLP ``N(0, 0.5)``."""
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith('logit_scale'):
                p.copy_(torch.empty_like(p).uniform_(1, 200).log())
            elif 'cpb_mlp' in n:
                p.normal_(0, 0.5)
            elif 'norm' in n and n.endswith('weight'):
                p.normal_(1, 0.3)
            elif n.endswith('bias') or n.endswith('q_bias') or n.endswith('v_bias'):
                p.normal_(0, 0.1)
    return model


def test_fresh_blocks_are_the_identity_and_perturbed_ones_are_not():
    """Why every test below perturbs: with timm's init each block returns its input."""
    fresh = timm.create_model('green_swinv2_tiny_window8_256', **NARROW).eval()
    x = torch.randn(1, 64, 128)  # the 8x8 tokens of the last stage, 128 wide
    layout = fresh.visible_layout(torch.ones(8, 8, dtype=torch.bool), 1)[3]
    blocks = fresh.layers[3].blocks
    with torch.no_grad():
        assert torch.equal(fresh._block_visible(blocks[0], x, layout), x)
        changed = perturbed('green_swinv2_tiny_window8_256', **NARROW)
        assert rel_err(changed._block_visible(changed.layers[3].blocks[0], x, layout), x) > 0.1
    assert any(p.max() > math.log(100) for n, p in changed.named_parameters() if n.endswith('logit_scale'))


@pytest.mark.parametrize('name', ['green_swinv2_tiny_window8_256', 'green_swinv2_tiny_window16_256'])
def test_forward_visible_matches_dense_key_masked(name, backend):
    """Window 8 (stages 64/32/16/8, shifted except on the last) and 16 (shifted on 64 and 32, one window on 16,
    clamped to 8 on the 8x8 stage), 75% masks, batch-wise and per image."""
    model = perturbed(name, **NARROW)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 256, 256, generator=gen)
    batch_mask = random_mask((8, 8), 0.75, gen)
    image_masks = random_mask((8, 8), 0.75, gen, batch_size=2)
    with torch.no_grad():
        assert_stages_close(model.forward_visible(x, batch_mask), dense_swinv2_key_masked_stages(model, x, batch_mask))
        ours = model.forward_visible(x, image_masks)
        for b in range(2):
            dense = dense_swinv2_key_masked_stages(model, x[b:b + 1], image_masks[b])
            assert_stages_close([o[b:b + 1] for o in ours], dense)


def test_window_clamped_to_small_stages():
    spec = timm.create_model('green_swinv2_tiny_window16_256', device='meta').stage_specs()
    assert [s.windows for s in spec] == [(((16, 16), (0, 0)), ((16, 16), (8, 8)))] * 2 + [
        (((16, 16), (0, 0)),), (((8, 8), (0, 0)),)]
    spec = timm.create_model('green_swinv2_base_window12_192', device='meta').stage_specs()
    assert spec[-1].grid_size == (6, 6) and spec[-1].windows == (((6, 6), (0, 0)),)


@pytest.mark.parametrize('name,kwargs', [
    ('green_swinv2_base_window12to16_192to256', dict(NARROW, num_heads=(1, 1, 2, 2))),  # pretrained windows 12
    ('green_swinv2_tiny_window8_256', dict(NARROW, img_size=192, window_size=6)),  # img_size / window_size kwargs
])
def test_other_sizes_and_pretrained_windows(name, kwargs):
    model = perturbed(name, **kwargs)
    grid = model.mask_grid_size
    mask = random_mask(grid, 0.75, torch.Generator().manual_seed(2))
    x = torch.randn(1, 3, 32 * grid[0], 32 * grid[1])
    with torch.no_grad():
        assert_stages_close(model.forward_visible(x, mask), dense_swinv2_key_masked_stages(model, x, mask))


def test_dense_check_fails_without_cosine_attention_clamp_or_post_norm(monkeypatch):
    """The comparison sees each SwinV2 ingredient: pre-norm blocks, q and k not normalised, or the logit scale not
    clamped at 100 each disagree with the dense reference."""
    model = perturbed('green_swinv2_tiny_window8_256', **NARROW)
    mask = random_mask((8, 8), 0.75, torch.Generator().manual_seed(5))
    x = torch.randn(1, 3, 256, 256)

    def pre_norm(block, x, layout):  # x + attn(norm1(x)): Swin V1's residuals
        key = (tuple(block.window_size), tuple(block.shift_size))
        x = x + model._attention_visible(block.attn, block.norm1(x), layout.attention[key])
        return x + block.mlp(block.norm2(x))

    def unnormalised(attn, x):
        qkv = attn.qkv(x) + torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        return qkv.view(-1, 3, attn.num_heads, x.shape[-1] // attn.num_heads)

    def unclamped(attn, x):
        qkv = cosine_qkv(attn, x)
        clamped = attn.logit_scale.clamp(max=math.log(100)).exp().view(-1, 1)
        return torch.stack((qkv[:, 0] / clamped * attn.logit_scale.exp().view(-1, 1), qkv[:, 1], qkv[:, 2]), 1)

    cosine_qkv = model._cosine_qkv
    with torch.no_grad():
        dense = dense_swinv2_key_masked_stages(model, x, mask)[0]
        assert rel_err(model.forward_visible(x, mask)[0], dense) < 1e-5
        for name, wrong in (('_block_visible', pre_norm), ('_cosine_qkv', unnormalised), ('_cosine_qkv', unclamped)):
            with monkeypatch.context() as patch:
                patch.setattr(model, name, wrong)
                assert rel_err(model.forward_visible(x, mask)[0], dense) > 1e-3, wrong.__name__


def test_forward_visible_gradients_match_dense(backend):
    """Gradients of every weight, the position-bias MLP and logit scales included (a logit scale's gradient sums
    logit-sized terms, up to 100, that mostly cancel: 1e-3 in fp32)."""
    model = perturbed('green_swinv2_tiny_window16_256', **NARROW)
    mask = random_mask((8, 8), 0.75, torch.Generator().manual_seed(4))
    x = torch.randn(1, 3, 256, 256)
    model.forward_visible(x, mask)[-1].square().sum().backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    dense_swinv2_key_masked_stages(model, x, mask)[-1].square().sum().backward()
    assert any('cpb_mlp' in n for n in ours) and any('logit_scale' in n for n in ours)
    for n, p in model.named_parameters():
        if n in ours and p.grad.norm() > 0:
            assert rel_err(ours[n], p.grad) < (1e-3 if n.endswith('logit_scale') else 1e-4), n


@pytest.mark.gpu
@pytest.mark.parametrize('name', ['green_swinv2_base_window8_256', 'green_swinv2_base_window16_256'])
def test_gpu_compiled_kernels_match_dense(name, monkeypatch):
    """SwinV2-B at 256 px on the compiled kernels (fp32, per-image 75% masks, batch 4): outputs and the gradients
    of the position-bias MLPs and logit scales against the dense reference."""
    monkeypatch.setenv('GREENMIM_BACKEND', 'triton')
    model = perturbed(name).cuda()
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(4, 3, 256, 256, generator=gen).cuda()
    masks = random_mask((8, 8), 0.75, gen, batch_size=4)
    ours = model.forward_visible(x, masks)
    sum(o.square().mean() for o in ours).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if 'cpb_mlp' in n or 'logit_scale' in n}
    model.zero_grad()
    total = 0
    for b in range(4):
        dense = dense_swinv2_key_masked_stages(model, x[b:b + 1], masks[b].cuda())
        assert_stages_close([o[b:b + 1].detach() for o in ours], [d.detach() for d in dense], tol=1e-4)
        total = total + sum(d.square().sum() / o.numel() for d, o in zip(dense, ours))
    total.backward()
    for n, g in grads.items():
        assert rel_err(g, dict(model.named_parameters())[n].grad) < 1e-3, n


def test_gradient_checkpointing_gives_the_same_gradients():
    model = perturbed('green_swinv2_tiny_window8_256', **NARROW)
    mask = random_mask((8, 8), 0.75, torch.Generator().manual_seed(7))
    x = torch.randn(1, 3, 256, 256)
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        model.forward_visible(x, mask)[-1].square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and all(torch.allclose(grads[0][n], grads[1][n]) for n in grads[0])
