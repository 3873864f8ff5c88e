"""Distributed training, exact resume, mixed precision, hostile inputs,
determinism and a soak run (issue: reliability)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mm_utils import ROOT, det_toy_cfg, seg_toy_cfg
from mmengine.config import Config
from mmengine.runner import Runner

from conftest import make_dit, spread_gates


def _write_cfg(cfg: Config, path: Path) -> Path:
    cfg.custom_imports = dict(imports=['dit_mm', 'probe_hooks'], allow_failed_imports=False)
    cfg.custom_hooks = list(cfg.custom_hooks) + [dict(type='ProbeHook')]
    cfg.dump(str(path))
    return path


def _run(cmd, **kw):
    env = dict(os.environ, PYTHONPATH=f'{ROOT}/tests:{ROOT}', OMP_NUM_THREADS='1')
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, **kw)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def _probe(work_dir: Path, rank: int = 0):
    return json.loads((work_dir / f'probe_rank{rank}.json').read_text())


def _seg_cfg(toy_root, work_dir, iters, **kw):
    """Toy Semantic FPN, deterministic pipeline (no random resize/crop/flip)."""
    cfg = seg_toy_cfg(toy_root, work_dir, iters=iters, **kw)
    cfg.train_dataloader.dataset.pipeline = [
        dict(type='LoadImageFromFile'), dict(type='LoadAnnotations', reduce_zero_label=False),
        dict(type='Resize', scale=(80, 64), keep_ratio=False), dict(type='PackSegInputs')]
    cfg.model.data_preprocessor.size = (64, 80)
    cfg.custom_hooks = [dict(type='BudgetLossHook', mu=1.0, loss_weight=2.0, warmup_iters=3,
                             tau_start=1.0, tau_end=0.3, tau_anneal_iters=iters),
                        dict(type='IterSeedHook', seed=1)]
    cfg.randomness = dict(seed=0)
    return cfg


@pytest.mark.slow
def test_two_process_ddp_on_cpu(toy_root, tmp_path):
    cfg = _write_cfg(_seg_cfg(toy_root, tmp_path, iters=4), tmp_path / 'ddp.py')
    _run(['bash', 'tools/dist_train.sh', str(cfg), '2', '--work-dir', str(tmp_path)],
         timeout=600)
    rows = [_probe(tmp_path, r) for r in (0, 1)]
    for r in rows:
        assert len(r) == 4 and all(math.isfinite(v) for row in r for v in row.values())
        assert all('loss_budget' in row for row in r)
    g0 = torch.load(tmp_path / 'gates_rank0.pt')
    g1 = torch.load(tmp_path / 'gates_rank1.pt')
    assert g0.keys() == g1.keys() and any('ema_weight' in k for k in g0)
    for k in g0:
        assert torch.equal(g0[k], g1[k]), k


@pytest.mark.slow
def test_resume_continues_exactly(toy_root, tmp_path):
    full, part = tmp_path / 'full', tmp_path / 'part'
    cfg = _seg_cfg(toy_root, full, iters=8)
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=4, by_epoch=False)
    path = _write_cfg(cfg, tmp_path / 'resume.py')
    _run([sys.executable, 'tools/train.py', str(path), '--work-dir', str(full)], timeout=600)
    # the same run, stopped after 4 iterations, then resumed to 8
    _run([sys.executable, 'tools/train.py', str(path), '--work-dir', str(part),
          '--cfg-options', 'train_cfg.max_iters=4'], timeout=600)
    _run([sys.executable, 'tools/train.py', str(path), '--work-dir', str(part),
          '--resume', str(part / 'iter_4.pth')], timeout=600)
    a, b = _probe(full), _probe(part)
    assert [r['iter'] for r in b] == [4, 5, 6, 7]  # 0-based, as runner.iter
    for ra, rb in zip(a[4:], b):
        for key in ('loss', 'loss_budget', 'flops_exp', 'flops_real', 'gate_tau'):
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), (ra['iter'], key)
    ga, gb = torch.load(full / 'gates_rank0.pt'), torch.load(part / 'gates_rank0.pt')
    for k in ga:
        assert torch.allclose(ga[k], gb[k], atol=1e-5), k


@pytest.mark.slow
def test_test_tool_metrics_do_not_depend_on_the_allocator(toy_root, tmp_path):
    """tools/test.py evaluates a trained checkpoint and writes its metrics;
    ``--keep-freed-memory`` changes speed, not results."""
    cfg = _seg_cfg(toy_root, tmp_path, iters=2)
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=2, by_epoch=False)
    path = _write_cfg(cfg, tmp_path / 'evaluate.py')
    _run([sys.executable, 'tools/train.py', str(path), '--work-dir', str(tmp_path)], timeout=600)
    results = []
    for extra in ([], ['--keep-freed-memory']):
        out = tmp_path / f'metrics{len(extra)}.json'
        _run([sys.executable, 'tools/test.py', str(path), str(tmp_path / 'iter_2.pth'),
              '--work-dir', str(tmp_path / 'test'), '--metrics-json', str(out)] + extra,
             timeout=600)
        results.append(json.loads(out.read_text()))
    assert 'mIoU' in results[0] and all(math.isfinite(v) for v in results[0].values())
    assert results[0] == results[1]


@pytest.mark.slow
def test_cpu_amp_bf16_training(toy_root, tmp_path):
    cfg = _seg_cfg(toy_root, tmp_path, iters=6)
    path = _write_cfg(cfg, tmp_path / 'amp.py')
    _run([sys.executable, 'tools/train.py', str(path), '--work-dir', str(tmp_path), '--amp'],
         timeout=600)
    rows = _probe(tmp_path)
    assert len(rows) == 6
    assert all(math.isfinite(v) for row in rows for v in row.values())
    dumped = Config.fromfile(str(next(tmp_path.glob('*/vis_data/config.py'))))
    assert dumped.optim_wrapper.type == 'CPUAmpOptimWrapper'
    gates = torch.load(tmp_path / 'gates_rank0.pt')
    init = torch.load(tmp_path / 'gates_init_rank0.pt')
    assert all(v.dtype == torch.float32 for v in gates.values())
    # the gates stayed trainable: weights and their EMA moved
    for key in ('row_gates.s0_t0.proj.weight', 'row_gates.s1_t2.ema_weight',
                'col_gates.s2_t3.proj.weight'):
        assert not torch.equal(gates[key], init[key]), key


def test_gates_and_budget_stay_float32_under_autocast():
    model = make_dit('b0').train()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        model(torch.randn(1, 3, 64, 64))
        loss = model.budget_loss(0.8)
    assert loss.dtype == torch.float32
    rec = model.last_record
    assert all(e.dtype == torch.float32 for e, _ in rec.rows.values())
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for n, p in model.named_parameters()
               if '_gates.' in n)


def _det_model(toy_root, tmp_path):
    from mmengine.registry import init_default_scope
    init_default_scope('mmdet')
    from mmdet.registry import MODELS
    cfg = det_toy_cfg(toy_root, tmp_path)
    model = MODELS.build(cfg.model)
    model.init_weights()
    spread_gates(model.backbone)
    return model.eval()


def _det_samples(sizes):
    from mmdet.structures import DetDataSample
    return [DetDataSample(metainfo=dict(img_shape=s, ori_shape=s, scale_factor=(1.0, 1.0)))
            for s in sizes]


def test_detector_handles_padded_mixed_sizes_and_black_images(toy_root, tmp_path):
    model = _det_model(toy_root, tmp_path)
    imgs = [torch.randint(0, 255, (3, 97, 131), dtype=torch.uint8),
            torch.zeros(3, 64, 64, dtype=torch.uint8),  # all black
            torch.randint(0, 255, (3, 120, 70), dtype=torch.uint8)]
    data = model.data_preprocessor(dict(inputs=imgs, data_samples=_det_samples(
        [tuple(i.shape[1:]) for i in imgs])), False)
    assert data['inputs'].shape[-2:] == (128, 160)  # padded to a multiple of 32
    with torch.no_grad():
        results = model.predict(data['inputs'], data['data_samples'])
    assert len(results) == 3
    for r in results:
        assert torch.isfinite(r.pred_instances.bboxes).all()


def test_detections_are_bit_identical_and_independent_of_the_batch(toy_root, tmp_path):
    model = _det_model(toy_root, tmp_path)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 96, 128, generator=gen)
    with torch.no_grad():
        a = model.predict(x, _det_samples([(96, 128)] * 4))
        b = model.predict(x, _det_samples([(96, 128)] * 4))
        alone = model.predict(x[2:3], _det_samples([(96, 128)]))
    for ra, rb in zip(a, b):
        assert torch.equal(ra.pred_instances.bboxes, rb.pred_instances.bboxes)
        assert torch.equal(ra.pred_instances.scores, rb.pred_instances.scores)
    sa, sb = a[2].pred_instances, alone[0].pred_instances
    assert len(sa) == len(sb)
    assert torch.allclose(sa.bboxes, sb.bboxes, atol=1e-3)
    assert torch.allclose(sa.scores, sb.scores, atol=1e-4)


_MODEL = {}


def _shared_model():
    if 'm' not in _MODEL:
        model = make_dit('b0', routing='full')
        spread_gates(model)
        _MODEL['m'] = model.eval()
    return _MODEL['m']


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(h=st.integers(32, 100), w=st.integers(32, 100), batch=st.integers(1, 3),
       ratios=st.lists(st.floats(0.05, 1.0), min_size=2, max_size=4, unique=True))
def test_property_shapes_finiteness_and_monotone_real_flops(h, w, batch, ratios):
    model = _shared_model()
    x = torch.randn(batch, 3, h, w)
    reals = []
    for r in sorted(ratios, reverse=True):
        model.keep_ratio = r
        with torch.no_grad():
            outs = model(x)
        for k, o in enumerate(outs):
            stride = 4 * 2 ** k
            assert o.shape[-2:] == (-(-h // stride), -(-w // stride))
            assert torch.isfinite(o).all()
        reals.append(model.flops()['real'])
    model.keep_ratio = None
    assert all(a >= b - 1e-9 for a, b in zip(reals, reals[1:]))


@pytest.mark.parametrize('size', [(32, 32), (33, 47), (64, 100)])
def test_smallest_and_non_multiple_of_32_sizes(size):
    model = make_dit('b0').eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, *size))
    assert outs[-1].shape[-2:] == (-(-size[0] // 32), -(-size[1] // 32))


def test_image_with_every_optional_node_skipped():
    model = make_dit('b0', gate_init=dict(diagonal=20.0, off_diagonal=-20.0, column=-20.0))
    model.eval()
    with torch.no_grad():
        dynamic = model(torch.ones(1, 3, 64, 64))
        model.routing = 'static'
        static = model(torch.ones(1, 3, 64, 64))
    for a, b in zip(dynamic, static):  # only PVTv2's path ran
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.slow
def test_soak_budget_converges(toy_root, tmp_path):
    """A few hundred iterations: the budget loss falls, the real FLOPs ratio
    settles within +-5% of mu, no NaN."""
    iters = int(os.environ.get('DIT_SOAK_ITERS', 200))
    cfg = _seg_cfg(toy_root, tmp_path, iters=iters)
    cfg.custom_hooks[0] = dict(type='BudgetLossHook', mu=0.8, loss_weight=4.0,
                               warmup_iters=20, tau_start=1.0, tau_end=0.2,
                               tau_anneal_iters=iters // 2)
    cfg.custom_hooks.append(dict(type='ProbeHook'))
    cfg.custom_imports = dict(imports=['dit_mm', 'probe_hooks'], allow_failed_imports=False)
    sys.path.insert(0, str(ROOT / 'tests'))
    runner = Runner.from_cfg(cfg)
    runner.train()
    rows = _probe(tmp_path)
    assert all(math.isfinite(v) for row in rows for v in row.values())
    tail = rows[-40:]
    real = np.mean([r['flops_real'] for r in tail])
    budget_start = np.mean([r['loss_budget'] for r in rows[20:40]])
    budget_end = np.mean([r['loss_budget'] for r in tail])
    (tmp_path / 'soak.json').write_text(json.dumps(rows))
    assert abs(real - 0.8) <= 0.05 * 0.8, real
    assert budget_end < budget_start
