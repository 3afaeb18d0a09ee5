"""Host work of one grouped-attention call: the aten ops and Triton launches of a forward and of a backward.

    TRITON_INTERPRET=1 python benchmarks/count_host_ops.py [--out FILE]

Runs ``group_window_attention_triton`` on CPU tensors (the kernels in Triton's interpreter) on green_swin layouts --
one group per tile (window 7) and several tiles (window 14), with and without the bias table -- and counts, with a
``TorchDispatchMode``, every op dispatched below autograd by the forward call and by ``backward()``. Each kernel launch
is counted and run outside the mode, so the interpreter's own tensor work is not counted. On a GPU each aten op and
each launch costs host time (microseconds each); these counts are device independent.
"""
import argparse
import collections
import contextlib
import os
import sys

if os.environ.get('TRITON_INTERPRET') != '1':
    raise SystemExit('run with TRITON_INTERPRET=1 in the environment (the kernels run in the interpreter on the CPU)')

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from greenmim.layout import StageSpec, build_visible_layout  # noqa: E402
from greenmim.kernels import group_attention_op, group_window_attention_triton  # noqa: E402
from greenmim.masking import random_mask  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
_CUSTOM_OPS = {  # op name -> its Python implementation
    f'greenmim::{name}': op._init_fn for name, op in (
        ('group_window_attention', group_attention_op._forward_op),
        ('group_window_attention_backward', group_attention_op._backward_op))}


class _OpCounter(TorchDispatchMode):
    """Counts the ops dispatched inside the mode, by name; the project's custom ops (``greenmim::``) are counted and
    their Python implementations run inside the mode, so the ops they issue are counted too."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        if func.namespace == 'greenmim':
            with self:
                return _CUSTOM_OPS[func.name()](*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_host_work():
    """Yields ``(ops Counter, launches Counter)`` filled by what runs inside the block."""
    counter, launches = _OpCounter(), collections.Counter()
    run = InterpretedFunction.run

    def counted_run(self, *args, **kwargs):
        launches[self.fn.__name__] += 1
        with _disable_current_modes():
            return run(self, *args, **kwargs)

    InterpretedFunction.run = counted_run
    try:
        with counter:
            yield counter.ops, launches
    finally:
        InterpretedFunction.run = run


def _layout(window: int, batch: int = 2):
    """green_swin-like stage-1 layout (shifted windows) on a random mask of 2x2-token units."""
    grid = (2 * window, 2 * window)
    mask = random_mask((window, window), 0.5, torch.Generator().manual_seed(0))
    spec = StageSpec(grid_size=grid, channels=32, windows=(((window, window), (window // 2, window // 2)),),
                     merges=False)
    stage = build_visible_layout(mask, [spec], batch, 'cpu')[0]
    return next(iter(stage.attention.values())), batch * stage.num_tokens


def measure(window: int, has_bias: bool, heads: int = 2, head_dim: int = 16) -> dict:
    """Op and launch counts of one forward and one backward call, bf16 qkv and an fp32 table (as under autocast)."""
    layout, num_tokens = _layout(window)
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(num_tokens, 3, heads, head_dim, generator=gen).bfloat16().requires_grad_()
    wh, ww = layout.window_size
    table = torch.randn((2 * wh - 1) * (2 * ww - 1), heads, generator=gen, requires_grad=True) if has_bias else None
    dout = torch.randn(num_tokens, heads, head_dim, generator=gen).bfloat16()
    row = dict(window=window, group_size=layout.group_size, bias=has_bias)
    with count_host_work() as (ops, launches):
        out = group_window_attention_triton(qkv, layout, table, head_dim ** -0.5)
    row['forward'] = dict(aten_ops=sum(ops.values()), launches=sum(launches.values()), ops=dict(ops),
                          kernels=dict(launches))
    with count_host_work() as (ops, launches):
        out.backward(dout)
    row['backward'] = dict(aten_ops=sum(ops.values()), launches=sum(launches.values()), ops=dict(ops),
                           kernels=dict(launches))
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', help='write the counts as JSON here')
    args = parser.parse_args(argv)
    rows = [measure(window, bias) for window in (7, 14) for bias in (True, False)]
    for row in rows:
        print(f"window {row['window']} (S={row['group_size']}) bias={row['bias']}: "
              f"forward {row['forward']['aten_ops']} ops + {row['forward']['launches']} launches, "
              f"backward {row['backward']['aten_ops']} ops + {row['backward']['launches']} launches")
        for part in ('forward', 'backward'):
            print(f'  {part}: {row[part]["ops"]} {row[part]["kernels"]}')
    if args.out:
        from common import write_result
        write_result(args.out, dict(kind='host_ops', rows=rows))
    return rows


if __name__ == '__main__':
    main()
