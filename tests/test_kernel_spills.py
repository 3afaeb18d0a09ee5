"""Every Triton kernel of the project, at the launch configs its launcher picks, compiles for sm_80 and sm_90
(Triton -> PTX -> the ptxas bundled with Triton; no GPU needed) without spilling registers to local memory.
Compiling also catches what the interpreter lets through (types, layouts, constexpr use). The full table is
``benchmarks/compile_report.py``; this checks the variants that differ in code (one-tile, several-tile and 16-slot
groups, each dtype, head_dim 32/64, both bias-gradient modes, no bias; the convolution at the narrowest and widest
Twins channels, with and without bias)."""
import json
import os
import subprocess
import sys

import pytest

_CHECK = """
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import compile_report as cr
reason = cr.ptxas_unavailable()
if reason:
    print(json.dumps(dict(skip=reason)))
    raise SystemExit
entries = dict(
    group_attention=cr.Entry(cr.group_attention_case, [
        dict(dtype=torch.bfloat16, head_dim=32, group_size=49),
        dict(dtype=torch.float16, head_dim=64, group_size=100, deterministic=True),
        dict(dtype=torch.float32, head_dim=64, group_size=49, has_bias=False),
        dict(dtype=torch.bfloat16, head_dim=32, group_size=12),
    ]),
    sparse_conv=cr.Entry(cr.sparse_conv_case, [
        dict(dtype=torch.bfloat16, channels=64), dict(dtype=torch.float32, channels=1024, has_bias=False),
    ]),
)
print(json.dumps(dict(rows=cr.report(entries, [80, 90], log=lambda *a: None)), default=str))
"""

KERNELS = {
    '_group_attention_fwd_kernel', '_group_attention_bwd_kv_kernel', '_group_attention_bwd_q_kernel',
    '_sparse_conv_fwd_kernel', '_sparse_conv_bwd_kernel',
}


def test_kernels_compile_without_spills():
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    benchmarks = os.path.join(os.path.dirname(__file__), '..', 'benchmarks')
    proc = subprocess.run([sys.executable, '-c', _CHECK, benchmarks], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    if 'skip' in result:
        pytest.skip(result['skip'])
    assert {row['kernel'] for row in result['rows']} == KERNELS
    assert {row['arch'] for row in result['rows']} == {'sm_80', 'sm_90'}
    spilled = [row for row in result['rows'] if row['usage']['spill_store_bytes'] or row['usage']['spill_load_bytes']]
    assert not spilled, json.dumps(spilled, indent=1)
