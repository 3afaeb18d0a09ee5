"""What the benchmarks share: what every result records (device, library versions, commit and date) and the timer."""
import datetime
import json
import os
import platform
import statistics
import subprocess
import time

import timm
import torch


def environment() -> dict:
    """Device, versions, git commit and UTC date of this run."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True,
                                cwd=os.path.dirname(__file__), check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f'CPU: {_cpu_name()} ({torch.get_num_threads()} threads)'
    return dict(
        device=device, torch=torch.__version__, triton=triton_version, timm=timm.__version__,
        python=platform.python_version(), commit=commit,
        date=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ'),
    )


def _cpu_name() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown'


def write_result(path: str, result: dict) -> dict:
    """Write ``result`` (with :func:`environment` under ``env``) as JSON to ``path``; returns what was written."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    result = dict(env=environment(), **result)
    with open(path, 'w') as f:
        json.dump(result, f, indent=2)
        f.write('\n')
    return result


def median_ms(fn, repeats: int, warmup: int, device: str) -> float:
    """Median wall time of ``fn()`` in milliseconds (CUDA events on the GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device == 'cuda':
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)
