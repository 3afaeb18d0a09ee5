"""Static layouts (one shape for every mask of a grid, visible count and batch size, batch-wise or per image), their
capacity bound, and the GreenMIM / SimMIM step compiled once over them (torch backend on the CPU)."""
import itertools
import json
from dataclasses import fields, is_dataclass

import numpy as np
import pytest
import timm
import torch

import greenmim
from greenmim.layout import StageSpec, VisibleLayout, build_visible_layout, group_capacity
from greenmim.masking import random_mask
from greenmim.train import pretrain
from dense_reference import rel_err
from train_fixtures import copy_photos, tiny_pretrain_config

# small models with every layer kind of their family; 128 px: a 4x4 mask grid
FAMILIES = {
    'green_swin_tiny': dict(img_size=128, window_size=4, embed_dim=24, depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 2)),
    'green_twins_svt_small': dict(img_size=128, embed_dims=[16, 32, 32, 64], num_heads=[1, 1, 2, 2],
                                  depths=[1, 1, 2, 1], wss=[4, 4, 4, 4], mlp_ratios=[1, 1, 1, 1]),
    'green_swinv2_tiny_window8_256': dict(img_size=128, window_size=4, embed_dim=24, depths=(1, 1, 2, 1),
                                          num_heads=(1, 1, 2, 2)),
}


def _encoder(name):
    torch.manual_seed(0)
    encoder = timm.create_model(name, drop_path_rate=0.0, **FAMILIES[name])
    with torch.no_grad():  # SwinV2's res-post-norms start at 0 (each block the identity): perturb every norm
        for module in encoder.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.5)
                module.bias.normal_(0.0, 0.2)
    return encoder


def _signature(value):
    """Everything a compiled step could guard on: tensor shapes and dtypes, every other value as it is."""
    if isinstance(value, torch.Tensor):
        return ('tensor', tuple(value.shape), value.dtype)
    if isinstance(value, VisibleLayout):
        return tuple((f.name, _signature(getattr(value, f.name))) for f in fields(value) if f.name != 'specs')
    if is_dataclass(value):
        return tuple((f.name, _signature(getattr(value, f.name))) for f in fields(value))
    if isinstance(value, dict):
        return tuple((k, _signature(v)) for k, v in value.items())
    if isinstance(value, (tuple, list)):
        return tuple(_signature(v) for v in value)
    return value


def _masks(grid, count, batch, ratio=0.75):
    """``count`` random masks, batch-wise and per image alternating."""
    return [random_mask(grid, ratio, torch.Generator().manual_seed(i), batch if i % 2 else None)
            for i in range(count)]


@pytest.mark.parametrize('name', sorted(FAMILIES))
def test_static_layouts_have_one_shape_for_both_mask_kinds(name):
    encoder = _encoder(name)
    grid = encoder.mask_grid_size
    masks = _masks(grid, 20, 3) + [torch.eye(4, dtype=torch.bool), torch.eye(4, dtype=torch.bool).flip(0)]
    signatures = {_signature(encoder.visible_layout(m, 3, static=True)) for m in masks}
    assert len(signatures) == 1
    exact = {_signature(encoder.visible_layout(m, 3)) for m in masks}
    assert len(exact) > 1  # exact layouts follow the mask: the test can tell shapes apart


def _check_covers_every_token_once(layout):
    for stage in layout:
        for att in stage.attention.values():
            index = att.index[att.index >= 0]
            assert torch.equal(index.sort()[0], torch.arange(layout.batch_size * stage.num_tokens, dtype=index.dtype))
            empty = (att.index < 0).all(1)
            assert not empty[:int((~empty).sum())].any()  # the spare groups come last


@pytest.mark.parametrize('window,shift', [((4, 4), (0, 0)), ((4, 4), (2, 2)), ((4, 4), (1, 3)), ((6, 6), (3, 3))])
@pytest.mark.parametrize('visible', [1, 2, 3, 4, 8])
def test_capacity_holds_for_every_mask_of_a_small_grid(window, shift, visible):
    """Every mask with ``visible`` of 16 units (all of them, or 1500 drawn for 8) on a 12x12 grid whose units
    (3x3 tokens) straddle the windows: the packing never needs more groups than :func:`group_capacity`, batch-wise
    or per image, and some mask needs its per-image share."""
    spec = StageSpec(grid_size=(12, 12), channels=16, windows=((window, shift),))
    units = list(itertools.combinations(range(16), visible))
    if len(units) > 1500:
        units = [units[i] for i in np.random.default_rng(0).choice(len(units), 1500, replace=False)]
    masks = torch.zeros(len(units), 16, dtype=torch.bool)
    for i, chosen in enumerate(units):
        masks[i, list(chosen)] = True
    masks = masks.view(-1, 4, 4)
    capacity = group_capacity((12, 12), window, shift, (4, 4), visible)
    most = 0
    for mask in masks:  # batch-wise: the builder raises if the bound is broken
        layout = build_visible_layout(mask, [spec], 2, static=True)
        att = layout[0].attention[(window, shift)]
        assert att.index.shape[0] == 2 * capacity
        most = max(most, int((att.index >= 0).any(1).sum()) // 2)
    assert most >= capacity // 2  # the bound is not loose by more than 2x on these masks
    for batch in masks.split(8):  # per image, pooled
        _check_covers_every_token_once(build_visible_layout(batch, [spec], len(batch), static=True))


def test_capacity_holds_with_every_visible_unit_in_its_own_window():
    """Swin-B at 224 px: 7x7 windows over 8x8-token units at stage 1 (every unit touches 4 windows); units spread
    so that no two share a window, and the same masks per image."""
    specs = timm.create_model('green_swin_base', device='meta').layout_specs
    spread = torch.zeros(7, 7, dtype=torch.bool)
    spread[::2, ::2] = True  # 16 units, pairwise two units apart
    corners = torch.zeros(7, 7, dtype=torch.bool)
    corners[[0, 0, 6, 6, 3, 3, 0, 6, 3, 1, 5, 1], [0, 6, 0, 6, 3, 0, 3, 3, 6, 1, 5, 5]] = True
    for mask in (spread, corners):
        for given in (mask, mask.expand(4, 7, 7)):
            layout = build_visible_layout(given, specs, 4, static=True)
            _check_covers_every_token_once(layout)


@pytest.mark.parametrize('name', sorted(FAMILIES))
def test_static_layout_gives_the_exact_layouts_encoder_output_and_loss(name, backend):
    encoder = _encoder(name).eval()
    mim = greenmim.GreenMIM(encoder, decoder_dim=32, decoder_heads=2).eval()
    images = torch.randn(3, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    for mask in _masks(encoder.mask_grid_size, 2, 3):
        static = encoder.visible_layout(mask, 3, static=True)
        with torch.no_grad():
            for a, b in zip(encoder.forward_visible(images, mask), encoder.forward_visible(images, layout=static),
                            strict=True):
                assert rel_err(b, a) < 1e-5
            exact, ours = mim(images, mask), mim(images, layout=static)
        assert abs(ours.loss.item() - exact.loss.item()) < 1e-5 * exact.loss.item()
        assert torch.equal(ours.mask, mask.expand(3, *mask.shape[-2:]))


def test_a_layout_holds_its_mask_and_refuses_another():
    encoder = _encoder('green_swin_tiny')
    mim = greenmim.GreenMIM(encoder, decoder_dim=32, decoder_heads=2)
    images = torch.randn(2, 3, 128, 128)
    mask, other = _masks(encoder.mask_grid_size, 4, 2)[::2]
    layout = encoder.visible_layout(mask, 2, static=True)
    mim(images, mask, layout=layout)
    for wrong, message in ((other, 'another mask'), (mask.to(torch.uint8), 'dtype torch.bool')):
        with pytest.raises(ValueError, match=message):
            mim(images, wrong, layout=layout)
    with pytest.raises(ValueError, match='batch size 2, the images have 3'):
        mim(torch.randn(3, 3, 128, 128), layout=layout)
    with pytest.raises(ValueError, match='built for another model'):
        greenmim.GreenMIM(_encoder('green_twins_svt_small'), decoder_dim=32, decoder_heads=2)(images, layout=layout)
    with pytest.raises(ValueError, match='group_size must be None'):
        build_visible_layout(mask, encoder.layout_specs, 2, group_size=16, static=True)


def _compile_steps(mim, encoder, count, backend='inductor'):
    """``count`` compiled GreenMIM steps (forward and backward) on static layouts of batch-wise and per-image masks,
    alternating: their losses and eager's, recompilation an error after the first."""
    step = torch.compile(mim, fullgraph=True, dynamic=False, backend=backend)
    images = torch.randn(4, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    losses = []
    torch._dynamo.reset()
    try:
        for i, mask in enumerate(_masks(encoder.mask_grid_size, count, 4)):
            layout = encoder.visible_layout(mask, 4, static=True)
            compiled = step(images, mask=mask, layout=layout).loss
            compiled.backward()
            losses.append((compiled.item(), mim(images, mask=mask, layout=layout).loss.item()))
            torch._dynamo.config.error_on_recompile = True  # after the first call
    finally:
        torch._dynamo.config.error_on_recompile = False
    return losses


@pytest.mark.parametrize('name,backend', [('green_swin_tiny', 'inductor'), ('green_twins_svt_small', 'inductor'),
                                          ('green_swinv2_tiny_window8_256', 'aot_eager')])
def test_greenmim_step_compiles_once_for_every_mask(name, backend):
    """The snippet of the static-step issue: ``torch.compile(mim, fullgraph=True, dynamic=False)``, six masks
    alternating batch-wise and per image, one compilation, the loss of eager (SwinV2 traced with AOTAutograd
    only, to spare CI a third Inductor build)."""
    encoder = _encoder(name)
    mim = greenmim.GreenMIM(encoder, mask_ratio=0.75, decoder_dim=32, decoder_heads=2)
    for compiled, eager in _compile_steps(mim, encoder, 6, backend):
        assert compiled == pytest.approx(eager, rel=1e-5)


def test_simmim_step_compiles_once_per_mask_kind():
    encoder = _encoder('green_swin_tiny')
    sim = greenmim.SimMIM(encoder, mask_ratio=0.75)
    step = torch.compile(sim, fullgraph=True, dynamic=False, backend='aot_eager')
    images = torch.randn(2, 3, 128, 128)
    torch._dynamo.reset()
    try:
        for i in range(4):
            mask = random_mask((4, 4), 0.75, torch.Generator().manual_seed(i))
            loss = step(images, mask=mask).loss
            loss.backward()
            assert loss.item() == pytest.approx(sim(images, mask=mask).loss.item(), rel=1e-5)
            torch._dynamo.config.error_on_recompile = True
    finally:
        torch._dynamo.config.error_on_recompile = False


def test_a_compiled_step_needs_a_layout():
    encoder = _encoder('green_swin_tiny')
    step = torch.compile(greenmim.GreenMIM(encoder, decoder_dim=32, decoder_heads=2), fullgraph=True,
                         backend='eager')
    torch._dynamo.reset()
    with pytest.raises(Exception, match='under torch.compile, pass layout='):
        step(torch.randn(2, 3, 128, 128), mask=random_mask((4, 4), 0.75))


@pytest.mark.parametrize('mask_mode', ['batch', 'image'])
def test_pretrain_compile_trains_once_compiled_and_resumes_bitwise(tmp_path, mask_mode, capsys):
    photos = copy_photos(tmp_path / 'photos', 8)
    config = dict(data=str(photos), epochs=2, compile=True, mask_mode=mask_mode)
    torch._dynamo.reset()  # else the graph another test compiled for these shapes serves this run too
    full = pretrain(tiny_pretrain_config(tmp_path / 'full', **config))
    assert full.graphs_compiled == 1 and 'torch.compile: compiled once' in capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / 'full' / 'log.jsonl').read_text().splitlines()]
    assert {'type': 'compile', 'graphs': 1, 'steps': full.steps} in records
    out = tmp_path / 'run'
    first = pretrain(tiny_pretrain_config(out, max_steps=3, **config))
    resumed = pretrain(tiny_pretrain_config(out, resume=str(out), **config))
    assert first.losses + resumed.losses == full.losses  # bitwise
    eager = pretrain(tiny_pretrain_config(tmp_path / 'eager', **dict(config, compile=False)))
    assert eager.graphs_compiled is None
    assert eager.losses == pytest.approx(full.losses, rel=1e-4)  # exact vs static layouts: float rounding only
