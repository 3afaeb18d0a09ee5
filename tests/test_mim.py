"""GreenMIM and SimMIM: the decoder sees each visible token at its own unit, losses, and a dense re-computation."""
import pytest
import timm
import torch

import greenmim
from greenmim.masking import random_mask
from greenmim.checkpoint import split_mim_state_dict
from greenmim.mim import patchify, unpatchify
from families import FAMILIES


ENCODERS = {f.model: (f.at_224, f.dense) for f in FAMILIES}  # name: (kwargs at 224 px, the dense reference)


def _green(name='green_swin_tiny', **kwargs):
    torch.manual_seed(0)
    return greenmim.GreenMIM(name, **ENCODERS[name][0], **kwargs).eval()


def test_patchify_roundtrip():
    x = torch.randn(2, 3, 64, 96)
    units = patchify(x, 32)
    assert units.shape == (2, 6, 32 * 32 * 3)
    assert torch.equal(units[0, 1].view(32, 32, 3)[5, 7], x[0, :, 5, 32 + 7])
    assert torch.equal(unpatchify(units, 32, (2, 3)), x)


@pytest.mark.parametrize('name', sorted(ENCODERS))
def test_green_mim_matches_dense_placement(name):
    """Recompute the whole model densely: every unit's decoder input is its own final-stage token (visible) or the
    mask token; a scrambled placement (as in the authors' code) would change the prediction."""
    mim = _green(name)
    mask = random_mask((7, 7), 0.75, torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        out = mim(x, mask)
        latent = mim.decoder_embed(mim.encoder.norm(ENCODERS[name][1](mim.encoder, x, mask)[-1]))
        tokens = mim.mask_token.expand(2, 49, -1).clone()
        tokens[:, mask.flatten()] = latent
        dense = mim.decoder_pred(mim.decoder_norm(mim.decoder_blocks(tokens + mim.decoder_pos_embed)))
    assert ((out.pred - dense).norm() / dense.norm()) < 1e-5
    assert out.pred.shape == (2, 49, 3072) and torch.equal(out.mask, mask)


def test_green_mim_decoder_positions_are_not_interchangeable():
    mim = _green()
    latent = torch.randn(1, 2, mim.encoder.num_features)
    with torch.no_grad():
        a = mim.forward_decoder(latent, torch.tensor([3, 40]))
        b = mim.forward_decoder(latent.flip(1), torch.tensor([40, 3]))
        c = mim.forward_decoder(latent, torch.tensor([40, 3]))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def _zero_decoder(mim):
    with torch.no_grad():
        mim.decoder_pred.weight.zero_()
        mim.decoder_pred.bias.zero_()
    return mim


def test_green_mim_loss_of_a_zero_prediction():
    """Predicting 0 everywhere costs the mean square of the masked pixels (raw targets), and (D - 1) / D with
    per-unit standardised targets (D = 32 * 32 * 3 values per unit, standardised with the unbiased variance)."""
    mask = random_mask((7, 7), 0.75, torch.Generator().manual_seed(1))
    x = torch.randn(2, 3, 224, 224) * 3 + 1
    hidden = (~mask).repeat_interleave(32, 0).repeat_interleave(32, 1)
    d = 32 * 32 * 3
    for norm_pix_loss, expected in ((False, x[:, :, hidden].square().mean()), (True, torch.tensor((d - 1) / d))):
        with torch.no_grad():
            loss = _zero_decoder(_green(norm_pix_loss=norm_pix_loss))(x, mask).loss
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)


def test_green_mim_loss_ignores_brightness_and_contrast_of_each_masked_unit():
    """The target is standardised per unit and the encoder never sees masked pixels: an affine change of each
    masked unit leaves the loss as it was; changing the pattern inside masked units does not."""
    mim = _green()
    mask = random_mask((7, 7), 0.75, torch.Generator().manual_seed(1))
    x = torch.randn(2, 3, 224, 224)
    hidden = (~mask).repeat_interleave(32, 0).repeat_interleave(32, 1)
    per_unit = lambda t: t.repeat_interleave(32, -2).repeat_interleave(32, -1)  # noqa: E731
    scale, shift = per_unit(torch.rand(2, 1, 7, 7) * 2 + 0.5), per_unit(torch.randn(2, 1, 7, 7) * 5)
    with torch.no_grad():
        loss = mim(x, mask).loss
        affine = mim(torch.where(hidden, x * scale + shift, x), mask).loss
        flipped = mim(torch.where(hidden, x.flip(-1), x), mask).loss
    torch.testing.assert_close(affine, loss, rtol=1e-5, atol=0)
    assert not torch.allclose(flipped, loss, rtol=1e-3)


def test_green_mim_trains():
    mim = _green().train()
    opt = torch.optim.AdamW(mim.parameters(), lr=1e-3)
    x = torch.randn(2, 3, 224, 224)
    mask = random_mask((7, 7), 0.75, torch.Generator().manual_seed(2))
    losses = []
    for _ in range(8):
        loss = mim(x, mask).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert all(p.grad is not None for n, p in mim.named_parameters() if not n.startswith('encoder.head'))


def test_green_mim_samples_masks_from_generator():
    mim = _green()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        a = mim(x, generator=torch.Generator().manual_seed(5))
        b = mim(x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.mask, b.mask) and int(a.mask.sum()) == 12 and torch.equal(a.loss, b.loss)


@pytest.mark.parametrize('name', sorted(ENCODERS))
def test_simmim_baseline(name):
    torch.manual_seed(0)
    sim = greenmim.SimMIM(name, **ENCODERS[name][0]).eval()
    mask = random_mask((7, 7), 0.75, torch.Generator().manual_seed(3))
    x = torch.randn(1, 3, 224, 224)
    hidden = (~mask).repeat_interleave(32, 0).repeat_interleave(32, 1)
    with torch.no_grad():
        out = sim(x, mask)
        out2 = sim(torch.where(hidden, torch.randn_like(x), x), mask)
    torch.testing.assert_close(out.pred, out2.pred)  # masked pixels are replaced by the mask token
    recon = unpatchify(out.pred, 32, (7, 7))
    expected = (recon - x).abs()[:, :, hidden].mean()
    torch.testing.assert_close(out.loss, expected)


def test_wrappers_accept_instances_and_reject_others():
    enc = timm.create_model('green_swin_tiny', num_classes=0)
    assert greenmim.GreenMIM(enc).encoder is enc
    with pytest.raises(ValueError, match='forward_visible'):
        greenmim.GreenMIM(timm.create_model('resnet18'))
    with pytest.raises(ValueError, match='kwargs'):
        greenmim.SimMIM(enc, drop_path_rate=0.1)


def test_split_state_dict():
    mim = _green()
    encoder, decoder = split_mim_state_dict(mim.state_dict())
    timm.create_model('green_swin_tiny', num_classes=0, **ENCODERS['green_swin_tiny'][0]).load_state_dict(encoder)
    assert 'mask_token' in decoder and not any(k.startswith('encoder.') for k in decoder)


@pytest.mark.parametrize('cls', [greenmim.GreenMIM, greenmim.SimMIM])
def test_ratio_or_mask_that_masks_nothing_is_refused(cls):
    """An all-visible mask leaves nothing to reconstruct (the loss would be 0/0 = NaN): refused up front."""
    for ratio in (0.0, 0.01):  # 0.01 < 1/(2*49): round(49 * 0.99) = 49 units stay visible
        with pytest.raises(ValueError, match=f'mask_ratio {ratio} masks no unit of the 7x7'):
            cls('green_swin_tiny', mask_ratio=ratio)
    mim = cls('green_swin_tiny', mask_ratio=0.75)
    with pytest.raises(ValueError, match='no masked unit'):
        mim(torch.randn(1, 3, 224, 224), torch.ones(7, 7, dtype=torch.bool))
    out = cls('green_swin_tiny', mask_ratio=0.011)(torch.randn(1, 3, 224, 224))  # just above 1/(2*49): one unit
    assert int((~out.mask).sum()) == 1 and torch.isfinite(out.loss)
