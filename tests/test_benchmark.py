"""Smoke test of benchmarks/bench_backbone.py (no timing is asserted: only
that the run completes and reports consistent, non-timing quantities)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_quick_benchmark_runs_and_reports_every_figure(tmp_path):
    out = tmp_path / 'bench.json'
    subprocess.run([sys.executable, str(REPO / 'benchmarks' / 'bench_backbone.py'), '--quick',
                    '--malloc', 'keep', '--batches', '1', '--threads', '2', '--out', str(out)],
                   check=True, cwd=REPO, capture_output=True, text=True, timeout=600)
    res = json.loads(out.read_text())
    (row,) = res['backbones']
    assert (row['size'], row['batch'], row['malloc']) == (224, 1, 'keep')
    assert row['static_over_pvt'] > 0
    skip = sorted(row['skip'], key=lambda s: -s['keep_ratio'])
    assert [s['keep_ratio'] for s in skip] == [1.0, 0.75, 0.5, 0.25]
    flops = [s['real_flops_ratio'] for s in skip]
    assert flops[0] == 1.0 and all(a > b for a, b in zip(flops, flops[1:]))
    assert all(s['latency_ratio'] > 0 for s in skip)
    assert all(set(row['samples_s'][k]) for k in row['samples_s'])
    for prof in res['profile']:  # the dit:: scopes were recorded
        assert 'dit::gate' in prof['share'] and 0 < prof['total_share'] < 1
