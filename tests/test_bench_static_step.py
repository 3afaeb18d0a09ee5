"""Smoke runs of the static-step benchmarks (``bench_static_step.py``, ``bench_mim_step.py --modes compiled``) and the
Nsight Compute summary on a CSV in ncu's raw format."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks'))
import bench_mim_step  # noqa: E402
import bench_static_step  # noqa: E402
import ncu_summary  # noqa: E402

TINY = json.dumps(dict(img_size=64, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), window_size=2))


def test_static_step_benchmark_smoke(tmp_path):
    bench_static_step.main(['--smoke', '--out', str(tmp_path / 'static.json')])
    result = json.loads((tmp_path / 'static.json').read_text())
    assert result['compilations']['graphs_compiled'] == 1
    assert result['ops_per_step']['compiled'] > 0 and result['ops_per_step']['eager'] > 0
    swin, = result['tile_work']
    assert swin['per_image']['stage1 window7 shift0']['capacity_over_used_groups'] >= 1
    assert set(result['loader_wait']) == {'batch_wise_exact', 'batch_wise_static', 'per_image_exact',
                                          'per_image_static'}
    assert result['step_time']['static']['median_s'] > 0


def test_mim_step_benchmark_compiled_mode(tmp_path):
    bench_mim_step.main(['--models', 'green_swin_tiny', '--batch-size', '2', '--steps', '2', '--warmup', '1',
                         '--modes', 'eager', 'compiled', '--backend', 'aot_eager', '--model-kwargs', TINY,
                         '--out', str(tmp_path / 'step.json')])
    result = json.loads((tmp_path / 'step.json').read_text())
    eager, compiled = result['results']
    assert (eager['mode'], compiled['mode']) == ('eager', 'compiled')
    assert compiled['GreenMIM']['compilations'] == compiled['SimMIM']['compilations'] == 1
    assert result['best'][0]['speedup_vs_best_simmim'] > 0


def test_ncu_summary_reads_raw_csv(tmp_path):
    stall = ncu_summary.STALL_METRIC.format
    header = ['ID', 'Kernel Name', *ncu_summary.COLUMNS.values(), stall('long_scoreboard'), stall('barrier')]
    units = ['', '', 'usecond', 'Gbyte/second', '%', '%', '%', '%', 'register/thread', '', '']
    rows = [['0', '_group_attention_fwd_kernel(...)', '10', '100', '2.5', '30', '40', '50', '96', '5.0', '1.0'],
            ['1', '_group_attention_fwd_kernel(...)', '20', '300', '7.5', '30', '60', '50', '96', '7.0', '3.0'],
            ['2', '_sparse_conv_fwd_kernel', '5', '1,000', '25', '10', '80', '100', '40', '1.0', '0.5']]
    text = '==PROF== Connected\n' + '\n'.join(','.join(f'"{c}"' for c in r) for r in [header, units, *rows])
    attention, conv = ncu_summary.summarise(text)
    assert attention['kernel'] == '_group_attention_fwd_kernel' and attention['launches'] == 2
    assert attention['time (us)'] == 15 and attention['DRAM GB/s'] == 200
    assert attention['stalls'] == [('long_scoreboard', 6.0), ('barrier', 2.0)]
    assert conv['DRAM GB/s'] == 1000 and conv['occupancy achieved %'] == 80
    table = ncu_summary.markdown([attention, conv])
    assert '| _sparse_conv_fwd_kernel | 1 |' in table and 'long_scoreboard 6.00' in table
    with pytest.raises(KeyError):
        ncu_summary.summarise('"ID","Name"\n"",""\n"0","x"')
