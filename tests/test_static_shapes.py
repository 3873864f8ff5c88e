"""Static-shape routing (dit_mm.models.slots, DiT(static_shapes=True)):
equal to the eager routing it stands for, free of data-dependent shapes
(torch.export, torch.compile fullgraph, ONNX), and really skipping (an
op-level FLOP count of the exported graph against the analytic cost)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.export import Dim
from torch.utils.flop_counter import FlopCounterMode

from conftest import make_dit, spread_gates
from dit_mm.analysis.calibration import apply_calibration, calibrate
from dit_mm.models.slots import (
    choose_slots,
    kept_slots,
    neighbour_slots,
    run_slots,
    slot_count,
)

SIZE = (96, 64)


def _model(**kwargs):
    model = make_dit('b0', **kwargs)
    spread_gates(model)
    return model.eval()


def _images(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, *SIZE, generator=torch.Generator().manual_seed(seed))


def _max_diff(a, b) -> float:
    return max(float((p - q).abs().max()) for p, q in zip(a, b))


def _explicit_attention(model) -> None:
    """FLOP counters see QK^T and AV as matmuls (the fused CPU kernel has
    no counter formula)."""
    for m in model.modules():
        if hasattr(m, 'fused_attn'):
            m.fused_attn = False


# ------------------------------------------------------------------ slots
def test_neighbour_taps_equal_a_dense_depthwise_conv_on_the_masked_map():
    torch.manual_seed(0)
    B, H, W, C, S = 2, 5, 7, 6, 20
    conv = torch.nn.Conv2d(C, C, 3, padding=1, groups=C)
    slots = torch.stack([torch.randperm(H * W)[:S] for _ in range(B)])
    valid = torch.rand(B, S) > 0.3
    h = torch.randn(B, S, C)
    dense = torch.zeros(B, H * W, C).scatter(
        1, slots.unsqueeze(-1).expand(-1, -1, C), h * valid.unsqueeze(-1))
    want = conv(dense.transpose(1, 2).reshape(B, C, H, W)).flatten(2).transpose(1, 2)
    want = want.gather(1, slots.unsqueeze(-1).expand(-1, -1, C))
    nbr = neighbour_slots(slots, valid, (H, W))
    rows = torch.cat([h, h.new_zeros(B, 1, C)], 1).reshape(-1, C)
    w = conv.weight.reshape(C, 9).t()
    got = sum(rows.index_select(0, nbr[k]) * w[k] for k in range(9)) + conv.bias
    assert torch.allclose(got.view(B, S, C), want, atol=1e-5)


def test_slot_policies_and_counts():
    score = torch.tensor([[3.0, -1.0, 2.0, -2.0], [-1.0, -2.0, -3.0, 1.0]])
    keep = (score > 0).float()
    slots, valid = choose_slots(score, keep, 2, 'threshold')
    assert sorted(slots[0].tolist()) == [0, 2] and valid[0].all()
    assert set(slots[1].tolist()) == {3, 0} and valid[1].sum() == 1  # one padding slot
    assert bool(valid[1][slots[1] == 3].all())
    _, valid = choose_slots(score, keep, 2, 'top')
    assert valid.all()
    assert [slot_count(f, 10) for f in (0.0, 0.01, 0.5, 0.55, 1.0)] == [0, 1, 5, 6, 10]
    with pytest.raises(ValueError, match='threshold'):
        choose_slots(score, keep, 2, 'random')


def test_kept_slots_put_each_images_kept_tokens_first():
    """The eager slot layout: every kept token in a valid slot, in token
    order, then skipped tokens as padding; distinct per image."""
    keep = torch.rand(3, 50) < torch.tensor([[0.2], [0.7], [0.0]])
    most = int(keep.sum(1).max())
    slots, valid = kept_slots(keep, most)
    assert slots.shape == valid.shape == (3, most)
    for b in range(3):
        n = int(keep[b].sum())
        assert valid[b].tolist() == [True] * n + [False] * (most - n)
        assert slots[b, :n].tolist() == keep[b].nonzero().squeeze(1).tolist()
        assert len(set(slots[b].tolist())) == most


@pytest.mark.parametrize('dwconv', ['taps', 'map'])
def test_slot_path_equals_the_masked_path_with_gradients(dwconv):
    """The model's own sparse path (slots, with the gate's blend) against the
    masked path: values, and gradients of input, gate and weights."""
    torch.manual_seed(0)
    stage = _model(keep_ratio=1.0).stages['s0_t1']  # eval: no drop path to replay
    hw = (12, 8)
    x = torch.randn(2, 96, 32, requires_grad=True)
    gate = (torch.rand(2, 96) < torch.tensor([[0.3], [0.8]])).float().requires_grad_()
    kept = gate.detach() > 0.5
    results = []
    for path in ('slots', 'masked'):
        stage.zero_grad()
        x.grad = gate.grad = None
        if path == 'masked':
            out = stage.forward_masked(x, hw, gate)
        else:
            slots, valid = kept_slots(kept, int(kept.sum(1).max()))
            y = run_slots(stage.blocks, stage.norm, x, hw, slots, valid, dwconv=dwconv)
            out = torch.lerp(x, y, gate.unsqueeze(-1))
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        # the masked path also gives skipped tokens' gate B(x) - x; compare kept ones
        results.append((out.detach(), x.grad.clone(), gate.grad[kept].clone(),
                        stage.blocks[0].mlp.dwconv.weight.grad.clone(),
                        stage.blocks[0].attn.q.weight.grad.clone()))
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_padding_slots_change_nothing():
    """Invalid slots are computed and dropped: the same valid tokens with
    more padding slots give the same output."""
    model = _model(keep_ratio=1.0)
    stage = model.stages['s0_t0']
    x = torch.randn(2, 24 * 16, 32)
    slots = torch.stack([torch.randperm(24 * 16)[:40] for _ in range(2)])
    valid = torch.zeros(2, 40, dtype=torch.bool)
    valid[:, :10] = True
    with torch.no_grad():
        a = run_slots(stage.blocks, stage.norm, x, (24, 16), slots, valid)
        b = run_slots(stage.blocks, stage.norm, x, (24, 16), slots[:, :10], valid[:, :10])
    assert torch.allclose(a, b, atol=1e-5)
    untouched = torch.ones(2, 24 * 16, dtype=torch.bool).scatter(1, slots[:, :10], False)
    assert torch.equal(a[untouched], x[untouched])


# --------------------------------------------------------------- equality
@pytest.mark.parametrize('ratio', [1.0, 0.5, 0.2])
def test_keep_ratio_equals_the_eager_top_k_routing(ratio):
    model = _model(keep_ratio=ratio)
    x = _images(3)
    with torch.no_grad():
        want = model(x)
        eager_real = model.flops(per_image=True)['real']
        model.static_shapes = True
        got = model(x)
        static_real = model.flops(per_image=True)['real']
    assert _max_diff(want, got) < 1e-4
    assert torch.allclose(eager_real, static_real)


def test_threshold_slots_equal_threshold_routing_where_an_image_fits():
    model = _model()
    x = _images(3, seed=1)
    with torch.no_grad():
        want = model(x)
        kept = {n: m.flatten(1).sum(1) for n, m in model.last_record.masks.items()}
        model.capacity = 1.0  # every image fits
        model.static_shapes = True
        got = model(x)
    assert _max_diff(want, got) < 1e-4
    # a capacity below some image's count: that image is cut to its best tokens
    node = max(kept, key=lambda n: int(kept[n].max()))
    n_tokens = model.last_record.masks[node][0].numel()
    frac = max(1, int(kept[node].max()) - 3) / n_tokens
    model.capacity = {node: frac}
    with torch.no_grad():
        model(x)
    assert int(model.last_record.masks[node].flatten(1).sum(1).max()) <= \
        slot_count(frac, n_tokens)


def test_a_capacity_of_zero_skips_the_node_and_its_gate():
    model = _model(static_shapes=True, capacity={'s0_t0': 0.0})
    with torch.no_grad():
        model(_images(2))
    assert (0, 0) not in model.last_record.row_gates
    assert float(model.last_record.rows[(0, 0)][1].max()) == 0.0
    assert model.slot_counts(SIZE)[(0, 0)] == 0


# ----------------------------------------------------------------- static
def _exported(model, batch=2):
    model.capacity_fractions()
    x = _images(batch)
    return torch.export.export(model, (x,), dynamic_shapes=({0: Dim('batch', min=1, max=16)},))


DATA_DEPENDENT = ('nonzero', '_local_scalar_dense', 'masked_select', 'unique', 'item')


@pytest.fixture(scope='module')
def exported():
    """A capacity-mode DiT (explicit attention, for the FLOP counter) and its
    ``torch.export`` program with a free batch."""
    model = _model(keep_ratio=0.4, static_shapes=True)
    _explicit_attention(model)
    return model, _exported(model)


def test_torch_export_with_a_free_batch_has_no_data_dependent_op(exported):
    model, ep = exported
    targets = [str(n.target) for n in ep.graph.nodes if n.op == 'call_function']
    assert not [t for t in targets if any(d in t.split('.')[-2:] for d in DATA_DEPENDENT)]
    assert any('topk' in t for t in targets) and any('index_put' in t for t in targets)
    assert not any(str(s).startswith('u') for s in ep.range_constraints)  # no unbacked symbol
    for batch in (1, 3):
        x = _images(batch, seed=5)
        with torch.no_grad():
            assert _max_diff(model(x), ep.module()(x)) < 1e-4


def test_exported_graph_flops_are_the_analytic_cost_of_the_capacity(exported):
    model, ep = exported
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        ep.module()(_images(1, seed=2))
    counted = counter.get_total_flops() / 2  # the counter counts 2 per MAC
    cost = model.static_shape_cost(SIZE)
    # matmuls, convs and attention exactly; the norms and depthwise taps
    # (element-wise ops) are what the counter does not see
    assert counted == pytest.approx(cost['total'] - cost['elementwise'], rel=1e-3)
    assert cost['elementwise'] < 0.1 * cost['total']
    # far below the whole grid, which the masked dense form computes
    assert counted < 0.6 * cost['full']


def test_torch_compile_fullgraph_has_no_graph_break():
    model = _model(keep_ratio=0.4, static_shapes=True)
    x = _images(2, seed=3)
    with torch.no_grad():
        want = model(x)
        torch._dynamo.reset()
        got = torch.compile(model, fullgraph=True, backend='aot_eager')(x)
    assert _max_diff(want, got) < 1e-4


def test_onnx_export_skips_and_matches_in_onnxruntime(tmp_path):
    onnx = pytest.importorskip('onnx')
    ort = pytest.importorskip('onnxruntime')
    model = _model(keep_ratio=0.5, static_shapes=True)
    path = tmp_path / 'dit.onnx'
    with torch.no_grad():
        torch.onnx.export(model, (_images(2),), str(path), dynamo=False, opset_version=17,
                          input_names=['inputs'])
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert 'NonZero' not in ops and 'TopK' in ops
    sess = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    x = _images(2, seed=9)
    with torch.no_grad():
        want = model(x)
    got = sess.run(None, {'inputs': x.numpy()})
    assert _max_diff(want, [torch.from_numpy(g) for g in got]) < 1e-4


# -------------------------------------------------------------- budgets
def test_calibration_stores_capacities_that_static_shapes_read_at_a_budget(tmp_path):
    model = _model()
    inputs = [_images(1, seed=s) for s in range(3)]
    cal = calibrate(model, inputs, mu=1.0, progress=None)
    apply_calibration(model, cal)
    assert model.dial.has_capacities
    lo, hi = model.dial.spend_range()
    budget = 0.5 * (lo + hi)
    model.budget = budget
    model.static_shapes = True
    fractions = model.capacity_fractions()
    assert set(fractions) == set(model.spec.nodes) and all(0 <= f <= 1 for f in
                                                           fractions.values())
    model.capacity_scale = 2.0  # more slots than the mean: fewer cut tokens
    assert model.capacity_fractions() == pytest.approx(
        {n: min(1.0, 2 * f) for n, f in fractions.items()})
    model.capacity_scale = 1.0
    # the graph's cost follows the budget
    low = model.static_shape_cost(SIZE)['total']
    model.budget = hi
    assert model.static_shape_cost(SIZE)['total'] > low
    # a new offset on the dial is a new set of capacities (no stale cache)
    model.budget = None
    at_offset = model.capacity_fractions()
    model.dial.set_offset(float(model.dial.curve[0, 0]))  # every learned gate closed
    assert sum(model.capacity_fractions().values()) < sum(at_offset.values())
    model.budget = budget
    # the capacities travel with the checkpoint
    fresh = make_dit('b0').eval()
    fresh.load_state_dict(model.state_dict())
    fresh.budget, fresh.static_shapes = budget, True
    assert fresh.capacity_fractions() == pytest.approx(fractions)


# ------------------------------------------------------------- bad input
def test_bad_static_shape_settings_get_clear_errors():
    model = _model(static_shapes=True)
    with pytest.raises(RuntimeError, match='calibrate_budget.py'):
        model(_images(1))
    with pytest.raises(ValueError, match=r'\(0, 1\]'):
        model.capacity = 1.5
    with pytest.raises(ValueError, match='unknown node'):
        model.capacity = {'s3_t0': 0.5}
    with pytest.raises(ValueError, match=r'\[0, 1\]'):
        model.capacity = {'s0_t0': -0.1}
    with pytest.raises(ValueError, match='capacity_scale'):
        model.capacity_scale = 0
    with pytest.raises(ValueError, match='slot_policy'):
        model.slot_policy = 'first'
    model.keep_ratio = (0.5, 0.6)
    with pytest.raises(ValueError, match='one keep_ratio'):
        model(_images(2))
    model.keep_ratio = 0.5
    model.train()
    x = _images(1).requires_grad_()
    with pytest.raises(RuntimeError, match='inference and export'):
        model(x)
    rnd = make_dit('b0', gate='random', static_shapes=True, keep_ratio=0.5).eval()
    with pytest.raises(RuntimeError, match="gate='random'"):
        rnd(_images(1))


def test_static_shapes_leave_the_eager_training_path_alone():
    model = _model(keep_ratio=0.5, static_shapes=True)
    model.static_shapes = False
    model.train()
    out = model(_images(2))
    sum(o.sum() for o in out).backward()
    assert F.relu(model.stem.proj.weight.grad.abs()).sum() > 0


def test_gpu_benchmark_script_runs_on_the_cpu(tmp_path):
    """``benchmarks/bench_gpu.py --device cpu --quick``: the prepared GPU
    command, checked here (the GPU figures need a GPU)."""
    import json
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import bench_gpu
    out = tmp_path / 'gpu.json'
    res = bench_gpu.main(['--device', 'cpu', '--quick', '--rounds', '1', '--out', str(out)])
    saved = json.loads(out.read_text())
    assert saved['machine']['device'] == 'cpu' and saved['arch'] == 'b0'
    rows = [r for r in res['results'] if 'ms' in r]
    assert {r['dtype'] for r in rows} == {'float32', 'bfloat16'}
    for r in rows:
        assert set(r['ms']) == {'pvtv2', 'dit_mu0.86', 'dit_r0.5', 'dit_full'}
        assert r['flops_over_c_base']['dit_mu0.86'] == pytest.approx(0.86, abs=0.03)
