"""Smoke test of benchmarks/bench_backbone.py (no timing is asserted: only
that the run completes and reports consistent, non-timing quantities)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_profile_ops_reports_every_kind_at_every_ratio(tmp_path):
    """benchmarks/profile_ops.py on a small model: every ratio gets a row in
    which the operators of a DiT forward land in their kinds (GEMMs, convs,
    attention, norms, gates: the profiler's op names are matched), and the
    FLOPs ratio falls with r (no timing is asserted)."""
    out = tmp_path / 'ops.json'
    subprocess.run([sys.executable, str(REPO / 'benchmarks' / 'profile_ops.py'), '--arch', 'b0',
                    '--size', '64', '--batch', '2', '--ratios', '0.3', '1', '--rounds', '1',
                    '--threads', '2', '--out', str(out)],
                   check=True, cwd=REPO, capture_output=True, text=True, timeout=300)
    res = json.loads(out.read_text())
    assert [row['keep_ratio'] for row in res['rows']] == [1.0, 0.3]
    for row in res['rows']:
        assert set(row['ms']) == {'gemm', 'conv', 'attention', 'depthwise_conv', 'layer_norm',
                                  'gates', 'other ops', 'outside ops'}
        assert all(v >= 0 for v in row['ms'].values()) and row['wall_ms'] > 0
        assert all(row['ms'][kind] > 0
                   for kind in ('gemm', 'conv', 'attention', 'layer_norm', 'gates')), row['ms']
    top, low = res['rows']
    assert top['real_flops_ratio'] == 1.0 and 0 < low['real_flops_ratio'] < 1


def test_profile_ops_rejects_bad_ratios():
    proc = subprocess.run([sys.executable, str(REPO / 'benchmarks' / 'profile_ops.py'),
                           '--ratios', '0', '--out', '/dev/null'],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and '--ratios must lie in (0, 1]' in proc.stderr


def test_profile_train_ops_costs_the_variant_at_the_baselines_per_call_times(tmp_path):
    """benchmarks/profile_train_ops.py on a small model: static against the
    full grid. The full step runs every operator of the static one and more,
    so its costing at static's per-call times is positive, and each top row's
    ratio is its per-call time over static's (no timing is asserted)."""
    out = tmp_path / 'ops.json'
    subprocess.run([sys.executable, str(REPO / 'benchmarks' / 'profile_train_ops.py'),
                    '--arch', 'b0', '--input', '64x64x1', '--rounds', '1', '--threads', '1',
                    '--top', '5', '--out', str(out)],
                   check=True, cwd=REPO, capture_output=True, text=True, timeout=300)
    res = json.loads(out.read_text())
    assert res['baseline'] == 'static' and list(res['variants']) == ['full']
    full = res['variants']['full']
    assert full['total_ms'] > 0 and full['at_base_per_call_ms'] > 0 and res['base_total_ms'] > 0
    assert len(full['top']) == 5
    for row in full['top']:
        assert row['ms_per_call'] == pytest.approx(row['ms_per_step'] / row['calls'])
        if row['base_ms_per_call']:
            assert row['slowdown'] == pytest.approx(row['ms_per_call'] / row['base_ms_per_call'])
    bad = subprocess.run([sys.executable, str(REPO / 'benchmarks' / 'profile_train_ops.py'),
                          '--variants', 'static', '--out', str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and 'a baseline and at least one variant' in bad.stderr


def test_ablations_quick_structure_and_merge(tmp_path):
    """benchmarks/ablations.py --quick: one classification and one detection
    run end to end (train, test, FLOPs); the JSON has the documented fields,
    a second call with another seed merges into it, and the table and plot
    are written. The numbers themselves are not asserted."""
    out = tmp_path / 'abl.json'
    cmd = [sys.executable, str(REPO / 'benchmarks' / 'ablations.py'), '--quick',
           '--work-dir', str(tmp_path / 'work'), '--out', str(out), '--variants', 'dynamic']
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, text=True, timeout=900)
    runs = json.loads(out.read_text())['runs']
    assert {(r['task'], r['variant'], r['seed']) for r in runs} == {
        ('classification', 'dynamic', 0), ('detection', 'dynamic', 0)}
    for r in runs:
        assert 0 < r['real_flops_ratio'] and r['mu'] is not None
        assert r['step_time_s'] > 0 and r['flops_images'] >= 1
    cls = next(r for r in runs if r['task'] == 'classification')
    det = next(r for r in runs if r['task'] == 'detection')
    assert 0 <= cls['accuracy/top1'] <= 100 and cls['metric'] == cls['accuracy/top1']
    assert {'coco/bbox_mAP', 'coco/segm_mAP'} <= set(det)
    subprocess.run(cmd[:-2] + ['--variants', 'static', '--tasks', 'classification',
                               '--seeds', '5'], check=True, cwd=REPO, capture_output=True,
                   text=True, timeout=900)
    runs = json.loads(out.read_text())['runs']
    assert len(runs) == 3 and ('classification', 'static', 5) in {
        (r['task'], r['variant'], r['seed']) for r in runs}
    table = out.with_suffix('.md').read_text()
    assert '| Table 6 | static |' in table and '| Table 6 | dynamic |' in table
    assert out.with_suffix('.png').stat().st_size > 10_000


def test_ablations_random_keep_prob_spends_mu():
    """The random gates' keep probability makes the cost model spend mu."""
    sys.path.insert(0, str(REPO / 'benchmarks'))
    from ablations import random_keep_prob

    from dit_mm.models.cost_model import grid_cost
    from dit_mm.models.grid import resolve_arch
    cost = grid_cost(resolve_arch('b0'), 96, 96)
    p = random_keep_prob(0.95)
    spent = (sum(cost.embeds.values()) + sum(cost.col_gates.values()) + sum(
        n.map + n.row_gate + p * n.token * n.tokens for n in cost.nodes.values()))
    assert spent / cost.static == pytest.approx(0.95, abs=1e-3)
    assert random_keep_prob(0.5) < p < random_keep_prob(1.5)


def test_bench_train_reports_times_memory_flops_and_nodes(tmp_path):
    out = tmp_path / 'train.json'
    subprocess.run([sys.executable, str(REPO / 'benchmarks' / 'bench_train.py'), '--inputs',
                    '64x64x1', '--rounds', '1', '--threads', '1', '--arch', 'b0',
                    '--variants', 'static', 'full', 'masked', 'masked_cp', 'sparse_mu086',
                    '--out', str(out)],
                   check=True, cwd=REPO, capture_output=True, text=True, timeout=600)
    res = json.loads(out.read_text())
    import platform
    modes = ['keep', 'system'] if platform.libc_ver()[0] == 'glibc' else ['system']
    assert [r['malloc'] for r in res['times']] == modes  # one process per allocator mode
    for run in res['times']:
        rows = run['variants']
        assert list(rows) == ['static', 'full', 'masked', 'masked_cp', 'sparse_mu086']
        assert all(r['step_s'] > 0 for r in rows.values())
        assert rows['static']['flops_computed'] == 1.0
        assert rows['masked']['flops_computed'] > 2.0  # the masked step runs the whole grid
        # the budget gates spend about mu, and the sparse step computes what it routes
        assert rows['sparse_mu086']['flops_routes'] == rows['sparse_mu086']['flops_computed']
        assert abs(rows['sparse_mu086']['flops_routes'] - res['mu']) < 0.1
        # the four targets, each from the measured values
        names = [t['target'].split(' <=')[0] for t in run['targets']]
        memory_target = ['masked with_cp peak memory / static'] if res['memory'][
            '64x64x1']['static'] > 0 else []  # a 64x64 static step may not grow the RSS
        assert names == ['full step / static', 'masked step / full step', *memory_target,
                         'sparse mu=0.86 step / static',
                         'sparse mu=0.86 step / (its routes x static)']
        sparse = rows['sparse_mu086']
        assert sparse['step_per_route_s'] == pytest.approx(
            sparse['samples_s'][0] / sparse['routes_samples'][0])  # one round
        full = run['targets'][0]
        assert full['value'] == pytest.approx(rows['full']['step_s'] / rows['static']['step_s'])
        assert full['bound'] == pytest.approx(1.2 * rows['full']['flops_computed'])
        assert full['met'] == (full['value'] <= full['bound'])
    assert set(res['memory']['64x64x1']) == set(res['times'][0]['variants'])
    nodes = res['nodes']['64x64x1']
    assert len(nodes) == 10
    assert sum(n['flops_share'] for n in nodes) == pytest.approx(1.0)
    assert sum(n['time_share'] for n in nodes) == pytest.approx(1.0)


def test_bench_fused_train_compares_both_settings_per_variant(tmp_path):
    from dit_mm.accel.cpu import sparse_ops
    if not sparse_ops.extension_available():
        pytest.skip('C++ extension unavailable')
    out = tmp_path / 'fused.json'
    subprocess.run([sys.executable, str(REPO / 'benchmarks' / 'bench_fused_train.py'),
                    '--inputs', '64x64x1', '--rounds', '1', '--threads', '1', '--arch', 'b0',
                    '--variants', 'static', 'masked', '--out', str(out)],
                   check=True, cwd=REPO, capture_output=True, text=True, timeout=600)
    res = json.loads(out.read_text())
    assert res['arch'] == 'b0' and len(res['runs']) == 1
    rows = res['runs'][0]['variants']
    assert list(rows) == ['static', 'masked']
    for r in rows.values():
        assert r['fused_s'] > 0 and r['unfused_s'] > 0
        assert r['fused_over_unfused'] == pytest.approx(r['fused_s'] / r['unfused_s'])
    assert rows['static']['over_static_fused'] == pytest.approx(1.0)
    bad = subprocess.run([sys.executable, str(REPO / 'benchmarks' / 'bench_fused_train.py'),
                          '--inputs', '8x8x1'], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and 'H, W >= 32' in bad.stderr


def test_bench_train_merge_replaces_runs_of_the_same_input_and_keeps_others():
    sys.path.insert(0, str(REPO / 'benchmarks'))
    from bench_train import merge_results

    def run(size, malloc, t):
        return dict(input=[size, size], batch=1, malloc=malloc, variants=dict(static=t))
    old = dict(times=[run(64, 'keep', 1.0), run(64, 'system', 2.0), run(32, 'keep', 3.0)],
               memory={'64x64x1': {'static': 0.1}, '32x32x1': {'static': 0.2}},
               nodes={'64x64x1': [1]})
    new = dict(times=[run(64, 'keep', 4.0)], memory={'64x64x1': {'static': 0.5}}, nodes={})
    merged = merge_results(old, new)
    got = [(r['input'][0], r['malloc'], r['variants']['static']) for r in merged['times']]
    assert got == [(32, 'keep', 3.0), (64, 'keep', 4.0), (64, 'system', 2.0)]
    assert merged['memory'] == {'64x64x1': {'static': 0.5}, '32x32x1': {'static': 0.2}}
    assert merged['nodes'] == {'64x64x1': [1]}


def test_budget_targets_fresh_images_are_new_and_the_config_reads_them(tmp_path, monkeypatch):
    """benchmarks/budget_targets.py --fresh: the fresh set is drawn with its
    own seed (none of its images is a val image of the main set) and the
    config's val split is pointed at it; the standard error is the stdev
    over the images / sqrt(n)."""
    import numpy as np
    from mmengine.config import Config
    from PIL import Image

    from dit_mm.datasets.toy_data import generate_toy_dataset
    monkeypatch.syspath_prepend(str(REPO / 'benchmarks'))
    import budget_targets
    base = generate_toy_dataset(tmp_path / 'base', num_train=0, num_val=2)  # the main set's seed
    cfg = Config.fromfile(str(REPO / budget_targets.CONFIG))
    fresh = budget_targets.fresh_config(cfg, tmp_path / 'fresh', 2)
    assert fresh.val_dataloader.dataset.data_root == str(tmp_path / 'fresh' / 'coco') + '/'
    assert cfg.val_dataloader.dataset.data_root != fresh.val_dataloader.dataset.data_root
    new = sorted((tmp_path / 'fresh' / 'coco' / 'val').glob('*.jpg'))
    old = sorted(Path(base['coco_root'], 'val').glob('*.jpg'))
    assert len(new) == 2
    for a in new:
        for b in old:
            pa, pb = np.asarray(Image.open(a)), np.asarray(Image.open(b))
            assert pa.shape != pb.shape or not np.array_equal(pa, pb)
    mean, se = budget_targets.mean_se([1.0, 2.0, 3.0])
    assert mean == 2.0 and abs(se - 1.0 / 3 ** 0.5) < 1e-12


def test_budget_targets_calibrate_on_the_runs_own_calibration_images(tmp_path, monkeypatch):
    """budget_targets calibrates on as many training images as the run's
    own calibration used (its calibration.json), all of them without one."""
    monkeypatch.syspath_prepend(str(REPO / 'benchmarks'))
    import budget_targets
    assert budget_targets.calibration_images(tmp_path) is None
    (tmp_path / 'calibration.json').write_text(json.dumps(dict(num_images=144, mu=1.0)))
    assert budget_targets.calibration_images(tmp_path) == 144


def test_bench_train_routes_are_those_of_the_timed_steps(monkeypatch):
    """A gated variant's routes are recorded at each step it takes (they
    vary with the sampled decisions), from the step's own forward."""
    import torch
    sys.path.insert(0, str(REPO / 'benchmarks'))
    import bench_train
    monkeypatch.setattr(bench_train, 'ARCH', 'b0')
    model, gated = bench_train.build_variant('sparse_mu086', (64, 64))
    routes: list = []
    step = bench_train.step_fn(model, gated, torch.randn(2, 3, 64, 64), routes)
    step()
    step()
    assert len(routes) == 2
    spent = model.flops()
    assert routes[-1] == pytest.approx(spent['real'] / spent['static'])
    assert all(0.3 < r < 1.5 for r in routes)
