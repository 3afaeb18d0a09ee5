"""Triton group window attention vs the PyTorch reference (float64), on real and hand-made layouts.

CPU tests run the kernels in Triton's interpreter, which Triton only enables when ``TRITON_INTERPRET=1`` is in the
environment when ``triton`` is imported (it decorates its own ``tl.max``/``tl.sum`` then, and timm/torch._dynamo
import triton early): tests/conftest.py sets it on machines without CUDA; without it these tests skip.
``@pytest.mark.gpu`` tests run the compiled kernels at Swin-B shapes and are skipped without CUDA.
"""
import importlib.util
import json
import os
from dataclasses import replace

import pytest
import timm
import torch

import greenmim  # noqa: F401  (registers the green models)
from greenmim.kernels import group_window_attention, group_window_attention_triton
from greenmim.kernels.reference import group_window_attention_reference
from greenmim.layout import StageSpec, build_visible_layout
from greenmim.masking import random_mask

TOLERANCES = {  # (atol, rtol) of kernel vs float64 reference, for outputs and gradients
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (3e-2, 3e-2),
    torch.float16: (4e-3, 4e-3),
}


pytestmark = pytest.mark.usefixtures('triton_mode')  # tests/conftest.py: interpreter on the CPU, or CUDA


def _layout(grid, window, shift, batch=1, ratio=0.5, seed=0, group_size=None, channels=32, device='cpu',
            static=False):
    """Attention layout of one stage from a random mask of 2x2-token units (``build_visible_layout``)."""
    mask = random_mask((grid[0] // 2, grid[1] // 2), ratio, torch.Generator().manual_seed(seed))
    spec = StageSpec(grid_size=grid, channels=channels, windows=((window, shift),), merges_previous_stage=False)
    stage = build_visible_layout(mask, [spec], batch, device, group_size, static)[0]
    return stage.attention[(window, shift)], batch * stage.num_tokens


def _scramble(layout, seed=0):
    """Permute the slots of every group and append a fully padded group: padding anywhere, segments interleaved."""
    gen = torch.Generator().manual_seed(seed)
    groups, size = layout.index.shape
    order = torch.stack([torch.randperm(size, generator=gen) for _ in range(groups)])
    pad = [torch.full((1, size), -1, dtype=torch.int32), torch.full((1, size), -1, dtype=torch.int32),
           torch.zeros((1, size), dtype=torch.int32)]
    maps = [torch.cat([t.gather(1, order), p]) for t, p in zip((layout.index, layout.segment, layout.position), pad)]
    return type(layout)(*maps, layout.window_size)


def _inputs(layout, num_tokens, heads, head_dim, dtype, seed=0, device='cpu'):
    gen = torch.Generator().manual_seed(seed)
    wh, ww = layout.window_size
    qkv = torch.randn(num_tokens, 3, heads, head_dim, generator=gen).to(device, dtype)
    table = torch.randn((2 * wh - 1) * (2 * ww - 1), heads, generator=gen).to(device, dtype)
    return qkv, table


def _attention_and_grads(fn, qkv, table, layout, scale, dout, **kwargs):
    """``(out, dqkv, dbias)`` of ``fn``; ``table=None``: no bias (``dbias`` None)."""
    qkv = qkv.detach().requires_grad_()
    if table is not None:
        table = table.detach().requires_grad_()
    out = fn(qkv, layout, table, scale, **kwargs)
    out.backward(dout)
    return out.detach(), qkv.grad, table.grad if table is not None else None


def _check_against_reference(layout, num_tokens, heads, head_dim, dtype, seed=0, device='cpu', bias=True):
    qkv, table = _inputs(layout, num_tokens, heads, head_dim, dtype, seed, device)
    table = table if bias else None
    scale = head_dim ** -0.5
    dout = torch.randn(num_tokens, heads, head_dim, generator=torch.Generator().manual_seed(seed + 1)).to(device, dtype)
    ours = _attention_and_grads(group_window_attention_triton, qkv, table, layout, scale, dout)
    ref = _attention_and_grads(group_window_attention_reference, qkv.double(),
                               table.double() if bias else None, layout, scale, dout.double())
    atol, rtol = TOLERANCES[dtype]
    if not bias:
        assert ours[2] is None and ref[2] is None
    for name, a, b in list(zip(('out', 'dqkv', 'dbias'), ours, ref))[:3 if bias else 2]:
        assert a.dtype == dtype, name
        # gradients scale with the number of summed terms: tolerances relative to the tensor's largest entry
        torch.testing.assert_close(a.double(), b, atol=atol * max(1., b.abs().max().item()), rtol=rtol, msg=name)


@pytest.mark.parametrize('window, shift, group_size', [
    ((4, 4), (0, 0), None),
    ((4, 4), (2, 2), None),  # several shift regions (segments) per window
    ((7, 7), (3, 3), None),
    ((7, 7), (0, 0), 70),  # S above one 64-slot tile, windows packed across tiles
    ((14, 14), (0, 0), None),  # ~100 tokens in one window: blocked loop over key tiles
    ((14, 14), (7, 7), None),
])
def test_matches_reference_fp32(window, shift, group_size):
    grid = (2 * window[0], 2 * window[1]) if window[0] < 14 else window
    layout, num_tokens = _layout(grid, window, shift, batch=2 if window[0] < 14 else 1, group_size=group_size)
    if group_size:
        assert layout.group_size == group_size
    _check_against_reference(layout, num_tokens, heads=2, head_dim=16, dtype=torch.float32)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_matches_reference_low_precision(dtype):
    layout, num_tokens = _layout((14, 14), (7, 7), (3, 3), batch=2)
    _check_against_reference(layout, num_tokens, heads=2, head_dim=32, dtype=dtype)


@pytest.mark.parametrize('head_dim', [8, 24, 64])
def test_head_dims_padded_to_power_of_two(head_dim):
    layout, num_tokens = _layout((8, 8), (4, 4), (2, 2))
    _check_against_reference(layout, num_tokens, heads=1, head_dim=head_dim, dtype=torch.float32)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize('window, shift, group_size', [
    ((7, 7), (3, 3), None),  # one tile: dq in the dk/dv kernel
    ((7, 7), (0, 0), 70),  # two tiles: the dq kernel
])
def test_no_bias_matches_reference(dtype, window, shift, group_size):
    """``bias_table=None`` (Twins' locally-grouped attention): output and dqkv against the reference, no dbias."""
    layout, num_tokens = _layout((14, 14), window, shift, group_size=group_size)
    _check_against_reference(layout, num_tokens, heads=2, head_dim=32, dtype=dtype, seed=5, bias=False)


def test_scrambled_slots_single_token_segments_and_padded_group():
    layout, num_tokens = _layout((8, 8), (4, 4), (1, 1), ratio=0.25, group_size=20)
    counts = torch.unique(layout.segment[layout.segment >= 0], return_counts=True)[1]
    assert (counts == 1).any(), 'shift (1, 1) must leave single-token corner segments'
    scrambled = _scramble(layout)
    assert (scrambled.index[-1] == -1).all() and (scrambled.index[:-1] == -1).any()
    _check_against_reference(scrambled, num_tokens, heads=3, head_dim=16, dtype=torch.float32, seed=3)


@pytest.mark.parametrize('window, shift', [((4, 4), (2, 2)), ((14, 14), (7, 7))])
def test_static_layout_with_spare_groups_matches_reference(window, shift):
    """A static layout's capacity past its packing is all-padding groups, which every kernel skips."""
    grid = (2 * window[0], 2 * window[1]) if window[0] < 14 else window
    layout, num_tokens = _layout(grid, window, shift, batch=2, static=True)
    assert (layout.index < 0).all(1).any()
    _check_against_reference(layout, num_tokens, heads=2, head_dim=16, dtype=torch.float32, seed=7)


def test_non_contiguous_qkv_and_dispatch():
    layout, num_tokens = _layout((8, 8), (4, 4), (0, 0))
    heads, head_dim = 2, 16
    qkv_wide, table = _inputs(layout, num_tokens, heads, 2 * head_dim, torch.float32)
    qkv = qkv_wide[..., ::2]  # strided last dim
    out = group_window_attention(qkv, layout, table, 0.25, backend='triton')
    torch.testing.assert_close(out, group_window_attention_reference(qkv, layout, table, 0.25), atol=2e-5, rtol=2e-5)


def test_deterministic_bias_gradient_is_bitwise_reproducible():
    layout, num_tokens = _layout((14, 14), (7, 7), (3, 3), batch=2)
    qkv, table = _inputs(layout, num_tokens, 2, 16, torch.float32)
    dout = torch.randn(num_tokens, 2, 16)
    runs = [_attention_and_grads(group_window_attention_triton, qkv, table, layout, 0.25, dout, deterministic=d)
            for d in (True, True, False)]
    assert torch.equal(runs[0][2], runs[1][2]) and torch.equal(runs[0][1], runs[1][1])
    torch.testing.assert_close(runs[0][2], runs[2][2], atol=1e-5, rtol=1e-5)


def test_deterministic_mode_follows_torch_flag(monkeypatch):
    from greenmim.kernels import group_attention
    seen = []
    backward = group_attention.group_attention_backward
    monkeypatch.setattr(group_attention, 'group_attention_backward', lambda *a: seen.append(a[-1]) or backward(*a))
    layout, num_tokens = _layout((8, 8), (4, 4), (0, 0))
    qkv, table = _inputs(layout, num_tokens, 1, 16, torch.float32)
    dout = torch.randn(num_tokens, 1, 16)
    _attention_and_grads(group_window_attention_triton, qkv, table, layout, 0.25, dout)
    monkeypatch.setattr(torch, 'are_deterministic_algorithms_enabled', lambda: True)
    _attention_and_grads(group_window_attention_triton, qkv, table, layout, 0.25, dout)
    assert seen == [False, True]


def test_opcheck():
    layout, num_tokens = _layout((8, 8), (4, 4), (2, 2))
    qkv, table = _inputs(layout, num_tokens, 2, 16, torch.float32)
    args = (qkv.requires_grad_(), layout.index, layout.segment, layout.position, table.requires_grad_(), 4, 4, 0.25)
    for deterministic in (False, True):
        torch.library.opcheck(torch.ops.greenmim.group_window_attention.default, (*args, deterministic))
    no_bias = (qkv, layout.index, layout.segment, None, None, 0, 0, 0.25, False)
    torch.library.opcheck(torch.ops.greenmim.group_window_attention.default, no_bias)


@pytest.mark.parametrize('bias', [True, False])
def test_torch_compile_fullgraph(bias):
    layout, num_tokens = _layout((14, 14), (7, 7), (3, 3))
    qkv, table = _inputs(layout, num_tokens, 2, 16, torch.float32)
    table = table if bias else None
    dout = torch.randn(num_tokens, 2, 16)

    def attention(qkv, groups, table, scale):
        return group_window_attention_triton(qkv * 1.5, groups, table, scale).relu()

    compiled = torch.compile(attention, backend='eager', fullgraph=True)
    eager = _attention_and_grads(attention, qkv, table, layout, 0.3, dout)
    traced = _attention_and_grads(compiled, qkv, table, layout, 0.3, dout)
    for a, b in zip(traced, eager):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b)


def test_green_swin_blocks_compile_fullgraph_on_triton_backend(monkeypatch):
    """The attention path of green_swin (every block of the first stage, plain and shifted windows) traces as one
    graph on the Triton backend (the whole step on the torch backend: tests/test_static_step.py)."""
    monkeypatch.setenv('GREENMIM_BACKEND', 'triton')
    model = timm.create_model(
        'green_swin_tiny', img_size=64, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2),
        num_classes=0).eval()
    mask = random_mask((8, 8), 0.5, torch.Generator().manual_seed(0))
    stage = model.visible_layout(mask, batch_size=2)[0]
    assert len(stage.attention) == 2
    x = torch.randn(2, stage.num_tokens, 16)

    def blocks(x):
        for block in model.layers[0].blocks:
            x = model._block_visible(block, x, stage)
        return x

    out = torch.compile(blocks, backend='eager', fullgraph=True)(x)
    monkeypatch.setenv('GREENMIM_BACKEND', 'torch')
    torch.testing.assert_close(out, blocks(x), atol=1e-5, rtol=1e-5)


def test_bad_inputs_raise_value_error():
    layout, num_tokens = _layout((8, 8), (4, 4), (0, 0))
    qkv, table = _inputs(layout, num_tokens, 2, 16, torch.float32)
    bad = [(qkv[:, :2], layout, table), (qkv, replace(layout, index=layout.index.long()), table),
           (qkv, replace(layout, segment=layout.segment[:, :-1]), table), (qkv, layout, table[:-1])]
    for args in bad:
        with pytest.raises(ValueError):
            group_window_attention_triton(*args, 0.25)
    with pytest.raises(ValueError, match='head_dim'):
        group_window_attention_triton(torch.zeros(num_tokens, 3, 2, 256), layout, table, 0.25)
    with pytest.raises(ValueError, match='float'):
        group_window_attention_triton(qkv.double(), layout, table, 0.25)
    with pytest.raises(ValueError, match='position'):
        group_window_attention_triton(qkv, replace(layout, position=layout.position[:, :-1]), table, 0.25)
    with pytest.raises(ValueError, match='segment'):
        group_window_attention_triton(qkv, replace(layout, segment=layout.segment[:, :-1]), None, 0.25)


def test_benchmark_smoke(tmp_path):
    path = os.path.join(os.path.dirname(__file__), '..', 'benchmarks', 'bench_group_attention.py')
    spec = importlib.util.spec_from_file_location('bench_group_attention', path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(['--smoke', '--skip-step', '--out', str(tmp_path)])
    result = json.loads((tmp_path / 'group_attention_cpu_smoke.json').read_text())
    row, = result['layouts']
    assert row['ours']['max_abs_err_vs_fp32_reference'] < 1e-4 and row['ours']['fwd_bwd_ms'] > 0
    assert row['sdpa']['max_abs_err_vs_fp32_reference'] < 1e-4 and row['flex']['max_abs_err_vs_fp32_reference'] < 1e-4
    assert result['env']['torch'] == torch.__version__


# ---------------------------------------------------------------------------------------------------------- GPU
def _swin_base_layouts(batch, window, static=False):
    model_specs = timm.create_model('green_swin_base', window_size=window, pretrained=False).stage_specs()
    mask = random_mask((7, 7), 0.75, torch.Generator().manual_seed(0))
    stages = build_visible_layout(mask, model_specs, batch, 'cuda', static=static)
    return [(stage, spec) for stage, spec in zip(stages, model_specs)]


@pytest.mark.gpu
@pytest.mark.parametrize('static', [False, True])
@pytest.mark.parametrize('window', [7, 14])
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_swin_base_shapes_match_reference(window, dtype, static):
    heads = (4, 8, 16, 32)
    for (stage, spec), h in zip(_swin_base_layouts(32, window, static), heads):
        for layout in stage.attention.values():
            _check_against_reference(layout, 32 * stage.num_tokens, h, 32, dtype, device='cuda')


@pytest.mark.gpu
def test_gpu_deterministic_bias_gradient_is_bitwise_reproducible():
    (stage, _), = _swin_base_layouts(128, 7)[:1]
    layout = stage.attention[((7, 7), (3, 3))]
    num_tokens = 128 * stage.num_tokens
    qkv, table = _inputs(layout, num_tokens, 4, 32, torch.bfloat16, device='cuda')
    table = table.float()
    dout = torch.randn(num_tokens, 4, 32, device='cuda', dtype=torch.bfloat16)
    grads = [_attention_and_grads(group_window_attention_triton, qkv, table, layout, 32 ** -0.5, dout,
                                  deterministic=True)[2] for _ in range(3)]
    assert all(torch.equal(grads[0], g) for g in grads[1:])
