"""Summarise an Nsight Compute CSV of the project's kernels (``benchmarks/ncu_kernels.py``): per kernel, its time,
achieved DRAM bandwidth (and % of peak), achieved vs theoretical occupancy, registers, and the top warp-stall reasons.

    python benchmarks/ncu_summary.py --metrics            # the --metrics list to give ncu
    python benchmarks/ncu_summary.py ncu.csv --out ncu_summary.md

Reads ``ncu --csv --page raw`` (one row per launch, one column per metric, a units row under the header); launches
of one kernel are averaged.
"""
import argparse
import csv
import io
import statistics
import sys
from collections import defaultdict

STALLS = ('long_scoreboard', 'short_scoreboard', 'barrier', 'mio_throttle', 'math_pipe_throttle', 'wait',
          'not_selected', 'lg_throttle', 'no_instruction', 'dispatch_stall', 'membar', 'drain', 'imc_miss',
          'branch_resolving', 'tex_throttle', 'sleeping', 'selected')
COLUMNS = {  # shown name: metric
    'time (us)': 'gpu__time_duration.sum',
    'DRAM GB/s': 'dram__bytes.sum.per_second',
    'DRAM % of peak': 'dram__throughput.avg.pct_of_peak_sustained_elapsed',
    'SM % of peak': 'sm__throughput.avg.pct_of_peak_sustained_elapsed',
    'occupancy achieved %': 'sm__warps_active.avg.pct_of_peak_sustained_active',
    'occupancy theoretical %': 'sm__maximum_warps_per_active_cycle_pct',
    'registers': 'launch__registers_per_thread',
}
STALL_METRIC = 'smsp__average_warps_issue_stalled_{}_per_issue_active.ratio'
SCALE = {'us': 1.0, 'usecond': 1.0, 'ns': 1e-3, 'nsecond': 1e-3, 'ms': 1e3, 'msecond': 1e3,
         'byte/second': 1e-9, 'Kbyte/second': 1e-6, 'Mbyte/second': 1e-3, 'Gbyte/second': 1.0, 'Tbyte/second': 1e3}


def metrics() -> str:
    return ','.join([*COLUMNS.values(), *(STALL_METRIC.format(s) for s in STALLS)])


def _number(text: str) -> float:
    return float(text.replace(',', ''))


def summarise(text: str) -> list:
    """``[{kernel, launches, column: value, stalls: [(reason, ratio)]}]`` from ``ncu --csv --page raw`` output."""
    lines = [line for line in text.splitlines() if line.startswith('"')]  # skip ncu's own ==PROF== lines
    rows = list(csv.reader(io.StringIO('\n'.join(lines))))
    header, units, launches = rows[0], rows[1], rows[2:]
    by_kernel = defaultdict(list)
    for row in launches:
        record = dict(zip(header, row))
        by_kernel[record['Kernel Name'].split('(')[0]].append(record)
    unit_of = dict(zip(header, units))
    summary = []
    for kernel, records in by_kernel.items():
        entry = dict(kernel=kernel, launches=len(records))
        for name, metric in COLUMNS.items():
            values = [_number(r[metric]) for r in records if r.get(metric, '') not in ('', 'n/a')]
            scale = SCALE.get(unit_of.get(metric, ''), 1.0) if name in ('time (us)', 'DRAM GB/s') else 1.0
            entry[name] = statistics.mean(values) * scale if values else None
        stalls = []
        for reason in STALLS:
            values = [_number(r[STALL_METRIC.format(reason)]) for r in records
                      if r.get(STALL_METRIC.format(reason), '') not in ('', 'n/a')]
            if values:
                stalls.append((reason, statistics.mean(values)))
        entry['stalls'] = sorted(stalls, key=lambda s: -s[1])[:4]
        summary.append(entry)
    return summary


def markdown(summary: list) -> str:
    names = list(COLUMNS)
    out = ['| kernel | launches | ' + ' | '.join(names) + ' | top stalls (warps per issue) |',
           '|' + ' --- |' * (len(names) + 3)]
    for e in summary:
        cells = ['-' if e[n] is None else f'{e[n]:.1f}' for n in names]
        stalls = ', '.join(f'{r} {v:.2f}' for r, v in e['stalls'])
        out.append(f"| {e['kernel']} | {e['launches']} | " + ' | '.join(cells) + f' | {stalls} |')
    return '\n'.join(out) + '\n'


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('csv', nargs='?')
    parser.add_argument('--metrics', action='store_true', help='print the metrics to collect and exit')
    parser.add_argument('--out')
    args = parser.parse_args(argv)
    if args.metrics:
        print(metrics())
        return
    table = markdown(summarise(open(args.csv).read()))
    if args.out:
        open(args.out, 'w').write(table)
    sys.stdout.write(table)


if __name__ == '__main__':
    main()
