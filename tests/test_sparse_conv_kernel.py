"""Sparse (submanifold) depthwise convolution: the neighbour map, the PyTorch reference against a dense
``F.conv2d`` on the zero-filled masked grid, and the Triton kernels against the float64 reference.

CPU tests run the kernels in Triton's interpreter (tests/conftest.py sets ``TRITON_INTERPRET=1`` when there is no
CUDA device); ``@pytest.mark.gpu`` tests run the compiled kernels at Twins-L stage shapes and skip without CUDA.
"""
import importlib.util
import json
import os

import pytest
import torch

from greenmim.layout import StageSpec, build_visible_layout
from greenmim.kernels import neighbour_map, sparse_depthwise_conv, sparse_depthwise_conv_triton
from greenmim.kernels.reference import depthwise_conv_masked_grid, sparse_depthwise_conv_reference
from greenmim.masking import random_mask

TOLERANCES = {  # (atol relative to the largest entry of the float64 result, rtol), for outputs and gradients
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (1e-2, 1e-2),
    torch.float16: (2e-3, 2e-3),
}
TWINS_L = ((56, 128), (28, 256), (14, 512), (7, 1024))  # (grid, channels) of the stages at 224 px


def _token_index(grid, unit, ratio, seed=0, device='cpu'):
    """``StageLayout.token_index`` of a ``grid`` stage under a random mask of ``unit x unit``-token units."""
    mask = random_mask((grid[0] // unit, grid[1] // unit), ratio, torch.Generator().manual_seed(seed))
    spec = StageSpec(grid_size=grid, channels=8, windows=(), merges_previous_stage=False)
    return build_visible_layout(mask, [spec], 1, device)[0].token_index


def _inputs(num_tokens, channels, kernel, dtype, seed=0, device='cpu', weight_dtype=None):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, channels, generator=gen)
    weight = torch.randn(channels, 1, *kernel, generator=gen)
    bias = torch.randn(channels, generator=gen)
    dy = torch.randn(num_tokens, channels, generator=gen)
    weight_dtype = weight_dtype or dtype
    return x.to(device, dtype), weight.to(device, weight_dtype), bias.to(device, weight_dtype), dy.to(device, dtype)


def _conv_and_grads(fn, x, neighbours, weight, bias, dy):
    x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
    bias = None if bias is None else bias.detach().requires_grad_()
    y = fn(x, neighbours, weight, bias)
    y.backward(dy)
    return y.detach(), x.grad, weight.grad, None if bias is None else bias.grad


def _check_against_reference(neighbours, channels, kernel, dtype, seed=0, device='cpu', weight_dtype=None,
                             with_bias=True):
    x, weight, bias, dy = _inputs(neighbours.shape[0], channels, kernel, dtype, seed, device, weight_dtype)
    bias = bias if with_bias else None
    ours = _conv_and_grads(sparse_depthwise_conv_triton, x, neighbours, weight, bias, dy)
    ref = _conv_and_grads(sparse_depthwise_conv_reference, x.double(), neighbours, weight.double(),
                          None if bias is None else bias.double(), dy.double())
    atol, rtol = TOLERANCES[dtype]
    for name, a, b, like in zip(('y', 'dx', 'dweight', 'dbias'), ours, ref, (x, x, weight, bias)):
        if like is None:
            assert a is None and b is None
            continue
        assert a.dtype == like.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a.double(), b, atol=atol * max(1., b.abs().max().item()), rtol=rtol, msg=name)


# ---------------------------------------------------------------------------------------------- neighbour map
def test_neighbour_map_hand_example():
    # 3x3 grid, visible sites (raster) 0, 1, 4, 6, 8:   X X .
    #                                                    . X .
    #                                                    X . X
    expected = torch.tensor([
        [-1, -1, -1, -1, 0, 1, -1, -1, 2],
        [-1, -1, -1, 0, 1, -1, -1, 2, -1],
        [0, 1, -1, -1, 2, -1, 3, -1, 4],
        [-1, -1, 2, -1, 3, -1, -1, -1, -1],
        [2, -1, -1, -1, 4, -1, -1, -1, -1],
    ], dtype=torch.int32)
    nbr = neighbour_map(torch.tensor([0, 1, 4, 6, 8]), (3, 3), (3, 3), batch_size=2)
    assert nbr.dtype == torch.int32
    assert torch.equal(nbr, torch.cat([expected, torch.where(expected >= 0, expected + 5, -1)]))


def _brute_force_map(token_index, grid, kernel, batch):
    rh, rw = grid
    kh, kw = kernel
    where = {int(p): i for i, p in enumerate(token_index)}
    rows = []
    for b in range(batch):
        for p in token_index.tolist():
            r, c = divmod(p, rw)
            row = []
            for i in range(kh):
                for j in range(kw):
                    rr, cc = r + i - kh // 2, c + j - kw // 2
                    s = where.get(rr * rw + cc, -1) if 0 <= rr < rh and 0 <= cc < rw else -1
                    row.append(s + b * len(token_index) if s >= 0 else -1)
            rows.append(row)
    return torch.tensor(rows, dtype=torch.int32).view(-1, kh * kw)


@pytest.mark.parametrize('grid, unit, ratio, kernel', [
    ((6, 10), 1, 0.5, (3, 3)),
    ((8, 12), 2, 0.5, (3, 3)),
    ((7, 5), 1, 0.3, (5, 3)),
    ((4, 9), 1, 0.6, (1, 5)),
])
def test_neighbour_map_matches_brute_force_and_reverses_onto_itself(grid, unit, ratio, kernel):
    token_index = _token_index(grid, unit, ratio, seed=grid[0])
    nbr = neighbour_map(token_index, grid, kernel, batch_size=3)
    assert torch.equal(nbr, _brute_force_map(token_index, grid, kernel, 3))
    # the inverse relation the backward relies on: nbr[t, k] = s  =>  nbr[s, K-1-k] = t (applied to every present
    # entry this is the "iff": the converse is the same statement for (s, K-1-k))
    t, k = (nbr >= 0).nonzero(as_tuple=True)
    s = nbr[t, k].long()
    assert torch.equal(nbr[s, nbr.shape[1] - 1 - k].long(), t)
    assert (nbr[:, nbr.shape[1] // 2] == torch.arange(nbr.shape[0])).all()  # the centre tap is the token itself


def test_neighbour_map_bad_inputs():
    index = torch.tensor([0, 3, 5])
    bad = [
        dict(token_index=index.expand(2, -1)), dict(token_index=index.float()), dict(token_index=index > 0),
        dict(kernel_size=(2, 3)), dict(batch_size=0), dict(grid_size=(2, 2)),  # index 5 outside a 2x2 grid
        dict(token_index=torch.tensor([0, 3, 3])), dict(token_index=torch.tensor([-1, 3])),
    ]
    for change in bad:
        args = dict(dict(token_index=index, grid_size=(3, 3), kernel_size=(3, 3), batch_size=1), **change)
        with pytest.raises(ValueError):
            neighbour_map(**args)


# ------------------------------------------------------------------------------------ reference vs dense conv
@pytest.mark.parametrize('grid, unit, ratio, kernel, batch', [
    ((8, 8), 2, 0.5, (3, 3), 2),
    ((12, 10), 1, 0.6, (3, 3), 3),  # single-token units: isolated tokens, masked neighbours everywhere
    ((14, 14), 7, 0.75, (3, 3), 2),  # large units: interior tokens with every neighbour present
    ((9, 7), 1, 0.3, (5, 3), 1),
])
def test_reference_matches_dense_conv_on_masked_grid(grid, unit, ratio, kernel, batch):
    """The key check: the submanifold convolution equals the dense depthwise conv of the zero-filled masked grid,
    read back at the visible sites (an independent computation: F.conv2d and its own scatter/gather)."""
    token_index = _token_index(grid, unit, ratio, seed=batch)
    nbr = neighbour_map(token_index, grid, kernel, batch)
    x, weight, bias, dy = _inputs(nbr.shape[0], 6, kernel, torch.float64, seed=1)
    for b in (bias, None):
        x_, w_ = x.clone().requires_grad_(), weight.clone().requires_grad_()
        x_d, w_d = x.clone().requires_grad_(), weight.clone().requires_grad_()
        ref = sparse_depthwise_conv_reference(x_, nbr, w_, b)
        dense = depthwise_conv_masked_grid(x_d, token_index, grid, w_d, b)
        torch.testing.assert_close(ref, dense, atol=1e-12, rtol=1e-12)
        ref.backward(dy)
        dense.backward(dy)
        torch.testing.assert_close(x_.grad, x_d.grad, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(w_.grad, w_d.grad, atol=1e-12, rtol=1e-12)


# -------------------------------------------------------------------------------- Triton kernels vs reference
@pytest.mark.parametrize('grid, unit, ratio, kernel, channels, batch', [
    ((8, 8), 2, 0.5, (3, 3), 64, 2),
    ((12, 10), 1, 0.6, (3, 3), 40, 3),  # isolated tokens, channels below one block (masked)
    ((14, 14), 7, 0.5, (3, 3), 160, 2),  # three channel blocks, the last partial
    ((9, 7), 1, 0.3, (5, 3), 24, 2),
])
def test_matches_reference_fp32(triton_mode, grid, unit, ratio, kernel, channels, batch):
    token_index = _token_index(grid, unit, ratio, seed=batch)
    nbr = neighbour_map(token_index, grid, kernel, batch)
    if unit == 1 and ratio == 0.6:
        alone = ((nbr >= 0).sum(1) == 1).any()
        assert alone, 'the mask must leave a token with no visible neighbour'
    _check_against_reference(nbr, channels, kernel, torch.float32)


@pytest.mark.parametrize('dtype, weight_dtype', [
    (torch.bfloat16, None), (torch.float16, None), (torch.bfloat16, torch.float32),  # the last: as under autocast
])
def test_matches_reference_low_precision(triton_mode, dtype, weight_dtype):
    token_index = _token_index((12, 12), 2, 0.5)
    nbr = neighbour_map(token_index, (12, 12), (3, 3), 2)
    _check_against_reference(nbr, 72, (3, 3), dtype, weight_dtype=weight_dtype)


def test_several_token_tiles_per_backward_program_and_no_bias(triton_mode, monkeypatch):
    from greenmim.kernels import sparse_conv
    monkeypatch.setattr(sparse_conv, 'TARGET_PROGRAMS', 2)
    token_index = _token_index((16, 16), 2, 0.25)
    nbr = neighbour_map(token_index, (16, 16), (3, 3), 2)  # 384 tokens: 6 tiles, 3 per program, 2 programs
    config = sparse_conv.launch_config(16, 9)
    assert sparse_conv.tiles_per_program(nbr.shape[0], 16, config) == 3
    _check_against_reference(nbr, 16, (3, 3), torch.float32, with_bias=False)


def test_strided_input_expanded_gradient_and_dispatch(triton_mode, monkeypatch):
    token_index = _token_index((8, 8), 2, 0.5)
    nbr = neighbour_map(token_index, (8, 8), (3, 3), 2)
    _, weight, bias, _ = _inputs(nbr.shape[0], 32, (3, 3), torch.float32)
    x = torch.randn(nbr.shape[0], 64)[:, ::2]  # channel stride 2
    results = {}
    for backend in ('triton', 'torch'):
        monkeypatch.setenv('GREENMIM_BACKEND', backend)
        x_, w_ = x.detach().requires_grad_(), weight.detach().requires_grad_()
        sparse_depthwise_conv(x_, nbr, w_, bias).sum().backward()  # dy: ones with stride 0
        results[backend] = x_.grad, w_.grad
    for a, b in zip(results['triton'], results['torch']):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_gradients_are_bitwise_reproducible(triton_mode):
    token_index = _token_index((14, 14), 7, 0.5)
    nbr = neighbour_map(token_index, (14, 14), (3, 3), 3)
    x, weight, bias, dy = _inputs(nbr.shape[0], 32, (3, 3), torch.float32)
    runs = [_conv_and_grads(sparse_depthwise_conv_triton, x, nbr, weight, bias, dy) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_opcheck(triton_mode):
    token_index = _token_index((8, 8), 2, 0.5)
    nbr = neighbour_map(token_index, (8, 8), (3, 3), 2)
    x, weight, bias, dy = _inputs(nbr.shape[0], 16, (3, 3), torch.float32)
    forward = torch.ops.greenmim.sparse_depthwise_conv.default
    torch.library.opcheck(torch.ops.greenmim.sparse_depthwise_conv_backward.default, (dy, x, nbr, weight))
    torch.library.opcheck(forward, (x, nbr, weight, None))
    torch.library.opcheck(forward, (x.requires_grad_(), nbr, weight.requires_grad_(), bias.requires_grad_()))


def test_torch_compile_fullgraph(triton_mode):
    token_index = _token_index((8, 8), 2, 0.5)
    nbr = neighbour_map(token_index, (8, 8), (3, 3), 2)
    x, weight, bias, dy = _inputs(nbr.shape[0], 16, (3, 3), torch.float32)

    def pos_conv(x, neighbours, weight, bias):  # Twins' PosConv on visible tokens: proj(x) + x
        return sparse_depthwise_conv_triton(x, neighbours, weight, bias) + x

    compiled = torch.compile(pos_conv, backend='eager', fullgraph=True)
    eager = _conv_and_grads(pos_conv, x, nbr, weight, bias, dy)
    traced = _conv_and_grads(compiled, x, nbr, weight, bias, dy)
    for a, b in zip(traced, eager):
        torch.testing.assert_close(a, b)


def test_bad_inputs_raise_value_error(monkeypatch):
    nbr = neighbour_map(torch.tensor([0, 1, 4]), (3, 3), (3, 3), 2)
    x, weight, bias, _ = _inputs(nbr.shape[0], 8, (3, 3), torch.float32)
    bad = [
        (x[None], nbr, weight, bias), (x.double(), nbr, weight, bias), (x.int(), nbr, weight, bias),
        (x, nbr.long(), weight, bias), (x, nbr[:-1], weight, bias), (x, nbr[:, :4], weight, bias),
        (x, nbr, weight.expand(8, 2, 3, 3), bias), (x, nbr, weight[:4], bias), (x, nbr, weight[:, 0], bias),
        (x, nbr, torch.zeros(8, 1, 2, 2), bias), (x, nbr, weight.double(), bias), (x, nbr, weight, bias[:4]),
        (x, nbr.to('meta'), weight, bias),
    ]
    for fn in (sparse_depthwise_conv_triton, sparse_depthwise_conv):
        for args in bad:
            with pytest.raises(ValueError):
                fn(*args)
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    with pytest.raises(ValueError, match='TRITON_INTERPRET'):
        sparse_depthwise_conv_triton(x, nbr, weight, bias)


# ------------------------------------------------------------------------------------------------- benchmark
def test_benchmark_smoke(tmp_path):
    path = os.path.join(os.path.dirname(__file__), '..', 'benchmarks', 'bench_sparse_conv.py')
    spec = importlib.util.spec_from_file_location('bench_sparse_conv', path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / 'sparse_conv.json'
    bench.main(['--smoke', '--out', str(out)])
    result = json.loads(out.read_text())
    assert result['env']['torch'] == torch.__version__ and len(result['stages']) == 4
    for stage in result['stages']:
        assert stage['sparse']['max_abs_err_vs_fp64'] < 1e-4 and stage['sparse']['fwd_bwd_ms'] > 0
        assert stage['dense']['max_abs_err_vs_fp64'] < 1e-4 and stage['dense']['fwd_ms'] > 0


# ---------------------------------------------------------------------------------------------------------- GPU
def _twins_l_maps(batch):
    mask = random_mask((7, 7), 0.75, torch.Generator().manual_seed(0))
    specs = [StageSpec(grid_size=(g, g), channels=c, windows=(), merges_previous_stage=False) for g, c in TWINS_L]
    stages = build_visible_layout(mask, specs, batch, 'cuda')
    return [(neighbour_map(s.token_index, s.grid_size, (3, 3), batch), c) for s, (_, c) in zip(stages, TWINS_L)]


@pytest.mark.gpu
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_twins_large_shapes_match_reference(triton_mode, dtype):
    for nbr, channels in _twins_l_maps(32):
        _check_against_reference(nbr, channels, (3, 3), dtype, device='cuda')


@pytest.mark.gpu
def test_gpu_gradients_are_bitwise_reproducible(triton_mode):
    (nbr, channels), = _twins_l_maps(128)[:1]
    x, weight, bias, dy = _inputs(nbr.shape[0], channels, (3, 3), torch.bfloat16, device='cuda',
                                  weight_dtype=torch.float32)
    runs = [_conv_and_grads(sparse_depthwise_conv_triton, x, nbr, weight, bias, dy) for _ in range(3)]
    assert all(torch.equal(a, b) for run in runs[1:] for a, b in zip(runs[0], run))
