"""Tracing and export of DiT (``docs/deployment.md``).

Under ``torch.jit.trace``, ``torch.export`` and ``torch.onnx.export`` DiT
computes the masked dense form of its routing: the eval decisions of the
gates applied as 0/1 masks over every token, no data-dependent shapes. The
graphs are traced on one input and checked on others against the eager
forward, which routes with the packed path (only kept tokens computed).
"""
from typing import Sequence, Tuple, Union

import pytest
import torch

from conftest import make_dit, spread_gates
from dit_mm import DiT
from dit_mm.analysis.flops import count_flops
from dit_mm.models.blocks import RoutedStage
from dit_mm.models.grid import ARCH_SETTINGS, feature_sizes, node_key

# jit.trace warns where DiT reads shapes as Python numbers: a trace is for its input size
pytestmark = pytest.mark.filterwarnings('ignore::torch.jit.TracerWarning')

SIZE = (64, 96)
ATOL = 1e-4
#: another batch and image size (token counts that top-k rounds differently)
OTHER = torch.randn(3, 3, 96, 128, generator=torch.Generator().manual_seed(1))

#: routing configurations: learned dynamic routing (with and without top-k)
#: and, as controls, PVTv2's static path and the full grid
CONFIGS = {
    'dynamic': dict(routing='dynamic'),
    'dynamic_top_k': dict(routing='dynamic', keep_ratio=0.4),
    'static': dict(routing='static'),
    'full': dict(routing='full'),
}
DYNAMIC = ('dynamic', 'dynamic_top_k')
#: b0's widths, heads and ratios with one block per node, for torch.export:
#: its tracing costs per op (the whole b0: 17 s of CPU with dynamic shapes)
B0_SHALLOW = dict(ARCH_SETTINGS['b0'], depths=(1, 1, 1, 1))


def _model(name: str, arch: Union[str, dict] = 'b0') -> DiT:
    model = make_dit(arch, **CONFIGS[name]).eval()
    spread_gates(model)
    return model


def _inputs(batch: int = 2, size: Tuple[int, int] = SIZE) -> Tuple[torch.Tensor, torch.Tensor]:
    """Input ``A`` (traced) and ``B`` (checked): same shape, other values."""
    return torch.randn(batch, 3, *size), torch.randn(batch, 3, *size) * 1.5 + 0.2


def _eager(model: DiT, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return model(x)


def _assert_close(got: Sequence, want: Sequence[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(torch.as_tensor(g), w, atol=ATOL, rtol=0)


def _masks(model: DiT, x: torch.Tensor) -> dict:
    _eager(model, x)
    return {n: m.clone() for n, m in model.last_record.masks.items()}


def _assert_routes_differ(model: DiT, a: torch.Tensor, b: torch.Tensor) -> None:
    """The gates decide differently on ``a`` and ``b`` (so a graph that froze
    the decisions of ``a`` would fail on ``b``), and skip some tokens."""
    ma, mb = _masks(model, a), _masks(model, b)
    assert ma and any(not torch.equal(ma[n], mb[n]) for n in ma)
    assert any(not m.all() for m in mb.values())


def test_masked_form_equals_the_packed_path_at_every_node():
    """What the export relies on: per node, the masked dense form in eval
    gives the packed forward's values at kept tokens and passes skipped
    tokens through unchanged, with the node's own eval gate decisions."""
    model = _model('dynamic')
    sizes = feature_sizes(*SIZE)
    mixed = 0
    for (i, j) in model.spec.nodes:
        key = node_key(i, j)
        stage: RoutedStage = model.stages[key]
        x = torch.randn(2, sizes[i][0] * sizes[i][1], stage.dim)
        with torch.no_grad():
            keep = model.row_gates[key](x).mask > 0.5
            masked = stage.forward_masked(x, sizes[i], keep.float())
            packed = stage.forward_sparse(x, sizes[i], keep)
        torch.testing.assert_close(masked[keep], packed[keep], atol=1e-5, rtol=0)
        assert torch.equal(masked[~keep], x[~keep])
        assert torch.equal(packed[~keep], x[~keep])
        mixed += bool(keep.any() and not keep.all())
    assert mixed >= len(model.spec.nodes) // 2  # most nodes keep some tokens, not all


@pytest.mark.parametrize('name', list(CONFIGS))
def test_jit_trace_matches_eager_on_other_inputs(name):
    """On other values and on another batch and image size (the graph reads
    the sizes; top-k counts follow them)."""
    model = _model(name)
    a, b = _inputs()
    if name in DYNAMIC:
        _assert_routes_differ(model, a, b)
    with torch.no_grad():  # dynamic routing: also jit's own check (trace vs eager on a)
        traced = torch.jit.trace(model, a, check_trace=name in DYNAMIC)
    graph = str(traced.inlined_graph)
    assert 'aten::nonzero' not in graph and 'aten::index_add' not in graph
    assert 'mkldnn' not in graph  # the seam's reference ops, no reordered weights
    for x in (b, OTHER):
        want = _eager(model, x)
        with torch.no_grad():
            _assert_close(traced(x), want)


def test_torch_export_matches_eager_on_other_inputs_and_sizes():
    """Exported with a free batch size and spatial size (top-k row decisions,
    learned column gates; plain learned row gates are exported in
    :func:`test_graphs_use_the_gate_offset_in_force_at_trace_time`)."""
    from torch.export import Dim
    model = _model('dynamic_top_k', B0_SHALLOW)
    a, b = _inputs()
    _assert_routes_differ(model, a, b)
    shapes = {'x': {0: Dim('batch', max=64), 2: Dim.AUTO, 3: Dim.AUTO}}
    with torch.no_grad():
        exported = torch.export.export(model, (a,), dynamic_shapes=shapes).module()
    for x in (b, OTHER):
        want = _eager(model, x)
        with torch.no_grad():
            _assert_close(exported(x), want)


@pytest.mark.parametrize('name', ['dynamic', 'dynamic_top_k', 'static'])
def test_onnx_export_runs_in_onnxruntime(name, tmp_path):
    """Exported with free batch and image size axes; run on other values and
    another size."""
    onnx = pytest.importorskip('onnx')
    ort = pytest.importorskip('onnxruntime')
    model = _model(name)
    a, b = _inputs()
    path = tmp_path / 'dit.onnx'
    with torch.no_grad():  # the TorchScript-based exporter (no onnxscript needed)
        torch.onnx.export(model, (a,), str(path), dynamo=False, opset_version=17,
                          input_names=['images'],
                          dynamic_axes={'images': {0: 'batch', 2: 'height', 3: 'width'}})
    onnx.checker.check_model(str(path))
    assert onnx.load(str(path)).opset_import[0].version >= 17
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    for x in (b, OTHER):
        _assert_close(session.run(None, {'images': x.numpy()}), _eager(model, x))


def test_graphs_use_the_gate_offset_in_force_at_trace_time():
    """The dial's offset is a buffer of the graph; a budget's offset is a
    constant of it. Both change the decisions, and the graphs follow."""
    model = _model('dynamic', B0_SHALLOW)
    a, b = _inputs()
    at_zero = _eager(model, b)
    model.dial.set_offset(-0.7)
    want = _eager(model, b)
    assert any(not torch.allclose(w, z, atol=ATOL) for w, z in zip(want, at_zero))
    with torch.no_grad():
        program = torch.export.export(model, (a,))
        _assert_close(program.module()(b), want)

    model.dial.set_offset(0.0)
    model.dial.set_curve([-2.0, 0.0, 2.0], [0.5, 1.0, 1.5])
    model.budget = 0.8  # offset -0.8 on that curve
    want = _eager(model, b)
    assert any(not torch.allclose(w, z, atol=ATOL) for w, z in zip(want, at_zero))
    with torch.no_grad():
        traced = torch.jit.trace(model, a, check_trace=False)
        _assert_close(traced(b), want)


def test_eager_forward_keeps_its_packed_path_and_savings_after_a_trace(monkeypatch):
    model = _model('dynamic')
    a, b = _inputs()
    before = _eager(model, b)
    with torch.no_grad():
        torch.jit.trace(model, a, check_trace=False)  # (the check runs an eager forward)
    assert model.last_record is None  # no traced tensor kept for flops()
    calls = {'sparse': 0, 'masked': 0}
    for path in calls:
        original = getattr(RoutedStage, f'forward_{path}')

        def spy(*args, _original=original, _path=path, **kwargs):
            calls[_path] += 1
            return _original(*args, **kwargs)
        monkeypatch.setattr(RoutedStage, f'forward_{path}', spy)
    after = _eager(model, b)
    assert all(torch.equal(x, y) for x, y in zip(before, after))
    assert calls['sparse'] > 0 and calls['masked'] == 0
    flops = model.flops()
    assert flops['real'] < flops['full']


def test_flop_counters_trace_the_packed_path_with_trace_packed():
    """A traced FLOP count (mmengine's FlopAnalyzer) of the masked dense form
    is the whole grid; with ``trace_packed`` it counts what the packed path
    runs (tools/get_flops.py --count-backbone)."""
    model = _model('dynamic')
    x = _inputs(batch=1)[1]
    _eager(model, x)
    flops = model.flops()
    dense = count_flops(model, (x,)) / 1e9
    model.trace_packed = True
    packed = count_flops(model, (x,)) / 1e9
    assert dense >= flops['full']
    assert flops['real'] <= packed < dense


def test_jit_script_fails_with_a_clear_message():
    with pytest.raises(RuntimeError, match='torch.jit.trace, torch.export'):
        torch.jit.script(make_dit('b0'))


def test_random_gates_refuse_to_be_traced():
    model = make_dit('b0', gate='random').eval()
    with pytest.raises(RuntimeError, match="gate='random'"), torch.no_grad():
        torch.jit.trace(model, _inputs()[0])
