"""Registers, spills, shared memory and occupancy of the Triton kernels at sm_80 and sm_90, without a GPU.

    python benchmarks/compile_report.py [--arch 80 90] [--out benchmarks/results/compile_report.json]

Each registered *case* runs a kernel's real launcher on small CPU tensors with the launches recorded instead of run
(``record_launches``), so the launch configs, the arguments and Triton's specialisation of them (ints equal to 1
become constants, 16-divisible ints and pointers get alignment hints) are exactly those of a GPU run. Every recorded
launch is compiled with ``triton.compile`` for ``GPUTarget('cuda', arch, 32)`` and run through the ptxas bundled with
Triton with ``-v`` (Triton's own invocation; its log is captured): registers, spill stores/loads, stack frame, and
from the compiled metadata the warps and shared memory; blocks and warps per SM follow from the per-SM limits.

To add a kernel, write a case function that calls its launcher once for a given (dtype, head_dim, ...) and list it
in ``REGISTRY`` with the parameter grid it should be measured on.
"""
import argparse
import contextlib
import io
import itertools
import os
import re
import sys
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

if os.environ.pop('TRITON_INTERPRET', None) == '1' and 'triton' in sys.modules:
    raise RuntimeError('compile_report needs compiled Triton: start Python without TRITON_INTERPRET=1')

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))

# per-SM limits (CUDA occupancy calculator): registers, warps, blocks, shared memory and what each block reserves
SM_LIMITS = {
    80: dict(registers=65536, warps=64, blocks=32, shared=167936, shared_reserved=1024),
    90: dict(registers=65536, warps=64, blocks=32, shared=233472, shared_reserved=1024),
}
REGISTER_UNIT = 256  # registers are allocated per warp in units of 256


@dataclass(frozen=True)
class Launch:
    """One recorded kernel launch: the JIT function, its grid and the arguments as passed by the launcher."""
    kernel: JITFunction
    grid: Tuple[int, ...]
    args: tuple
    kwargs: dict


@contextlib.contextmanager
def record_launches() -> Iterator[List[Launch]]:
    """Inside the block, ``kernel[grid](...)`` of any ``@triton.jit`` kernel records a :class:`Launch` instead of
    running (so launchers can be called with CPU tensors)."""
    launches: List[Launch] = []

    def run(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, tuple(grid), args, kwargs))

    original = JITFunction.run
    JITFunction.run = run
    try:
        yield launches
    finally:
        JITFunction.run = original


def ptxas_unavailable() -> Optional[str]:
    """Why nothing can be compiled to a cubin here (no CUDA backend in Triton, or no ptxas), or None."""
    try:
        make_backend(GPUTarget('cuda', 90, 32))
        knobs.nvidia.ptxas.path
    except Exception as e:  # Triton raises different errors for a missing backend or tool
        return f'no CUDA backend or ptxas in this Triton install ({type(e).__name__}: {e})'
    return None


def compile_launch(launch: Launch, arch: int):
    """``triton.compile`` of a recorded launch for ``sm_<arch>``, specialised as the runtime would: returns the
    compiled kernel and the ptxas ``-v`` log."""
    target = GPUTarget('cuda', arch, 32)
    backend = make_backend(target)
    kernel = launch.kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch.kwargs, bound, specialization, options)
    log = io.StringIO()
    compile_knobs, nvidia_knobs = knobs.compilation, knobs.nvidia
    saved = compile_knobs.always_compile, nvidia_knobs.dump_ptxas_log
    compile_knobs.always_compile, nvidia_knobs.dump_ptxas_log = True, True  # a cache hit would skip ptxas
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
    finally:
        compile_knobs.always_compile, nvidia_knobs.dump_ptxas_log = saved
    return compiled, log.getvalue()


_PTXAS = {
    'registers': r'Used (\d+) registers',
    'stack_bytes': r'(\d+) bytes stack frame',
    'spill_store_bytes': r'(\d+) bytes spill stores',
    'spill_load_bytes': r'(\d+) bytes spill loads',
}


def parse_ptxas_log(log: str, name: str) -> Dict[str, int]:
    """Registers, stack frame and spill bytes of entry function ``name`` from a ptxas ``-v`` log."""
    section = log[log.index(f"Compiling entry function '{name}'"):]
    found = {key: re.search(pattern, section) for key, pattern in _PTXAS.items()}
    missing = [key for key, m in found.items() if m is None]
    if missing:
        raise ValueError(f'ptxas log of {name} has no {missing}:\n{log}')
    return {key: int(m.group(1)) for key, m in found.items()}


def occupancy(registers: int, num_warps: int, shared: int, arch: int) -> dict:
    """Resident blocks and warps per SM of a kernel and the resource that limits them."""
    limits = SM_LIMITS[arch]
    regs_per_warp = -(-registers * 32 // REGISTER_UNIT) * REGISTER_UNIT
    by = dict(
        registers=limits['registers'] // regs_per_warp // num_warps,
        warps=limits['warps'] // num_warps,
        blocks=limits['blocks'],
        shared=limits['shared'] // (shared + limits['shared_reserved']),
    )
    blocks = min(by.values())
    return dict(blocks_per_sm=blocks, warps_per_sm=blocks * num_warps,
                occupancy=round(blocks * num_warps / limits['warps'], 3),
                limited_by=[k for k, v in by.items() if v == blocks])


def measure(launch: Launch, arch: int) -> dict:
    """Resource usage of one launch compiled for ``sm_<arch>``."""
    compiled, log = compile_launch(launch, arch)
    meta = compiled.metadata
    usage = parse_ptxas_log(log, meta.name)
    return dict(usage, num_warps=meta.num_warps, num_stages=meta.num_stages, shared_bytes=meta.shared,
                **occupancy(usage['registers'], meta.num_warps, meta.shared, arch))


# ------------------------------------------------------------------------------------------------- registry
def group_attention_case(dtype: torch.dtype, head_dim: int, group_size: int, has_bias: bool = True,
                         deterministic: bool = False, heads: int = 2, groups: int = 2, window: int = 7) -> None:
    """Forward and backward launches of the grouped attention at one shape (group ``g`` holds tokens of its own)."""
    from greenmim.kernels import group_attention as ga
    tokens = groups * group_size
    qkv = torch.zeros(tokens, 3, heads, head_dim, dtype=dtype)
    index = torch.arange(tokens, dtype=torch.int32).view(groups, group_size)
    segment = torch.zeros_like(index)
    position = index % (window * window)
    table = torch.zeros((2 * window - 1) ** 2, heads) if has_bias else None
    out, lse = ga.group_attention_forward(qkv, index, segment, position, table, (window, window), 0.2)
    ga.group_attention_backward(torch.zeros_like(out), qkv, out, lse, index, segment, position, table,
                                (window, window), 0.2, deterministic)


def sparse_conv_case(dtype: torch.dtype, channels: int, kernel_size: int = 3, has_bias: bool = True,
                     tokens: int = 4099) -> None:
    """Forward and backward launches of the sparse depthwise convolution on ``tokens`` rows of ``channels`` (not a
    multiple of 16, like most batches)."""
    from greenmim.kernels import sparse_conv as sc
    x = torch.zeros(tokens, channels, dtype=dtype)
    neighbours = torch.zeros(tokens, kernel_size * kernel_size, dtype=torch.int32)
    weight = torch.zeros(channels, 1, kernel_size, kernel_size, dtype=dtype)
    y = sc.sparse_conv_forward(x, neighbours, weight, torch.zeros(channels, dtype=dtype) if has_bias else None)
    sc.sparse_conv_backward(torch.zeros_like(y), x, neighbours, weight)


@dataclass(frozen=True)
class Entry:
    """A kernel family to report: the case function and the keyword arguments of each case."""
    case: Callable[..., None]
    cases: Sequence[dict]


def grid(**values: Sequence) -> List[dict]:
    """Every combination of the given keyword values."""
    return [dict(zip(values, combo)) for combo in itertools.product(*values.values())]


REGISTRY = {
    'group_attention': Entry(group_attention_case, [case for case in grid(
        dtype=(torch.float32, torch.bfloat16, torch.float16), head_dim=(32, 64),
        group_size=(12, 16, 32, 49, 64, 100, 196), has_bias=(True, False), deterministic=(False, True))
        if case['has_bias'] or not case['deterministic']]),  # the deterministic mode only changes the bias gradient
    # Twins' PosConv (3x3) at every channel width of the zoo (small/base/large: 64..1024)
    'sparse_conv': Entry(sparse_conv_case, grid(
        dtype=(torch.float32, torch.bfloat16, torch.float16), channels=(64, 96, 128, 192, 256, 384, 512, 768, 1024),
        has_bias=(True, False))),
}


def _key(launch: Launch) -> tuple:
    """What decides the compiled code: the kernel, its constexprs/options and the specialisation of its args."""
    spec = []
    for a in launch.args:
        if isinstance(a, torch.Tensor):
            spec.append((str(a.dtype), a.data_ptr() % 16 == 0))
        elif isinstance(a, int) and not isinstance(a, bool):
            spec.append((a == 1, a % 16 == 0))
        else:
            spec.append(type(a).__name__ if isinstance(a, float) else a)
    return launch.kernel.fn.__name__, tuple(spec), tuple(sorted((k, str(v)) for k, v in launch.kwargs.items()))


_OPTIONS = ('num_warps', 'num_stages', 'maxnreg')  # launch options besides the (upper-case) constexprs


def report(entries: Dict[str, Entry], archs: Sequence[int], log=print) -> List[dict]:
    """One row per (family, case, kernel launch, arch): ``family, case`` (its parameters), ``kernel, arch, config``
    (the launch's constexprs and options) and ``usage`` (:func:`measure`); identical compilations are measured once."""
    rows, cache = [], {}
    for family, entry in entries.items():
        for params in entry.cases:
            with record_launches() as launches:
                entry.case(**params)
            case = {k: str(v) if isinstance(v, torch.dtype) else v for k, v in params.items()}
            for launch in launches:
                config = {k: v for k, v in launch.kwargs.items() if k.isupper() or k in _OPTIONS}
                for arch in archs:
                    key = (_key(launch), arch)
                    if key not in cache:
                        cache[key] = measure(launch, arch)
                        log(f'{family} {launch.kernel.fn.__name__} sm_{arch} {config}: {cache[key]}')
                    rows.append(dict(family=family, case=case, kernel=launch.kernel.fn.__name__, arch=f'sm_{arch}',
                                     config=config, usage=cache[key]))
    return rows


def compact(rows: List[dict]) -> dict:
    """``{'variants': [...], 'rows': [...]}``: each distinct compiled kernel (kernel, arch, config, usage) once, and
    per row its family, case and variant index."""
    variants, index, compact_rows = [], {}, []
    for row in rows:
        variant = {k: row[k] for k in ('kernel', 'arch', 'config', 'usage')}
        key = repr(variant)
        if key not in index:
            index[key] = len(variants)
            variants.append(variant)
        compact_rows.append(dict(family=row['family'], case=row['case'], variant=index[key]))
    return dict(variants=variants, rows=compact_rows)


_WORST_OVER = ('has_bias', 'deterministic')  # case parameters the summary takes the worst case over


def summary(rows: List[dict]) -> str:
    """Markdown table: per (family, kernel, case shape: dtype, head_dim, group size or channels) and arch, the worst
    case over the other case parameters (bias, deterministic mode): most registers, most spill-store bytes, fewest
    warps per SM."""
    cells: Dict[tuple, Dict[str, tuple]] = {}
    for row in rows:
        key = (row['family'], row['kernel'].strip('_'),
               *(f'{k} {v}' for k, v in row['case'].items() if k not in _WORST_OVER))
        usage = row['usage']
        worst = cells.setdefault(key, {}).get(row['arch'], (0, 0, SM_LIMITS[90]['warps']))
        cells[key][row['arch']] = (max(worst[0], usage['registers']),
                                   max(worst[1], usage['spill_store_bytes']),
                                   min(worst[2], usage['warps_per_sm']))
    archs = sorted({arch for per_arch in cells.values() for arch in per_arch})
    lines = ['| family | kernel | case | ' + ' | '.join(
        f'{arch}: regs / spill stores (B) / warps per SM' for arch in archs) + ' |', '|' + ' --- |' * (3 + len(archs))]
    for key, per_arch in cells.items():
        params = ', '.join(str(v).replace('torch.', '') for v in key[2:])
        lines.append(f'| {key[0]} | {key[1]} | {params} | ' + ' | '.join(
            '{} / {} / {}'.format(*per_arch[a]) if a in per_arch else '' for a in archs) + ' |')
    return '\n'.join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--arch', type=int, nargs='+', default=[80, 90], choices=sorted(SM_LIMITS))
    parser.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'results', 'compile_report.json'))
    args = parser.parse_args(argv)
    from common import write_result
    rows = report(REGISTRY, args.arch)
    result = write_result(args.out, dict(kind='compile_report', sm_limits=SM_LIMITS, **compact(rows)))
    table = summary(rows)
    print(table)
    write_summary(os.path.splitext(args.out)[0] + '.md', table, result['env'])


def write_summary(path: str, table: str, env: dict) -> None:
    """The markdown summary with the environment it was compiled in."""
    with open(path, 'w') as f:
        f.write(f"# Compile report: registers, spills and occupancy\n\n`python benchmarks/compile_report.py` "
                f"(commit {env['commit']}, {env['date']}; triton {env['triton']}, torch {env['torch']}; ptxas bundled "
                f"with Triton; no GPU). Per shape, the worst case over bias / no bias and both bias-gradient "
                f"modes; warps per SM out of 64. Details per compiled variant: `{os.path.basename(path)[:-3]}.json`."
                f"\n\n{table}\n")
    print('wrote', path)


if __name__ == '__main__':
    main()
