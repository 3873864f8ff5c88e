"""The dispatch seam (dit_mm.accel): with acceleration off every forward
runs the plain-PyTorch reference, agrees with the accelerated one within
1e-5, and never enters an executor."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_dit, spread_gates
from dit_mm import accel
from dit_mm.accel import cache, reference
from dit_mm.accel.cpu import masked_ops, native_stage, onednn, packed, sparse_ops
from dit_mm.models.blocks import RoutedStage

ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-5


def _stage(sr: int = 2, dim: int = 32) -> RoutedStage:
    """As in test_blocks: random non-trivial norms and biases."""
    stage = RoutedStage(dim=dim, depth=2, num_heads=2, sr_ratio=sr, mlp_ratio=4)
    for p in stage.parameters():
        torch.nn.init.normal_(p, 0, 0.1)
    return stage.eval()


def _on_off(fn):
    """``fn()`` with acceleration on, then off (outputs cloned)."""
    with accel.set_enabled(True):
        on = fn()
    with accel.set_enabled(False):
        off = fn()
    return on, off


def _close(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and torch.allclose(a, b, atol=ATOL)
    return len(a) == len(b) and all(_close(u, v) for u, v in zip(a, b))


# ---------------------------------------------------------------- switch
def test_switch_is_a_call_and_a_context_manager():
    assert accel.enabled() == (os.environ.get('DIT_MM_ACCEL', '1') != '0')
    before = accel.enabled()
    with accel.set_enabled(False):
        assert not accel.enabled()
        assert accel.executor(torch.zeros(1)) is None
        with accel.set_enabled(True):
            assert accel.executor(torch.zeros(1)) is accel.EXECUTORS['cpu']
        assert not accel.enabled()
    assert accel.enabled() == before
    previous = accel.set_enabled(False).previous
    try:
        assert not accel.enabled()
    finally:
        accel.set_enabled(previous)
    assert accel.enabled() == before


def test_environment_switch_turns_acceleration_off():
    code = 'import dit_mm.accel as a; print(a.enabled())'
    for value, want in (('0', 'False'), ('1', 'True')):
        env = dict(os.environ, DIT_MM_ACCEL=value,
                   PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]))
        out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                             env=env, cwd=ROOT, check=True).stdout.split()
        assert out[-1] == want


def test_dispatch_by_device_and_dtype():
    with accel.set_enabled(True):
        assert accel.executor(torch.zeros(2)) is accel.EXECUTORS['cpu']
        assert accel.executor(torch.zeros(2, dtype=torch.float64)) is None
        assert accel.executor(torch.zeros(2, dtype=torch.bfloat16)) is None
        assert accel.executor(torch.zeros(2, device='meta')) is None


# ------------------------------------------------------- stage forwards
KEEPS = {
    'unequal counts': lambda: torch.rand(3, 63) < torch.tensor([[0.2], [0.7], [0.5]]),
    'only the middle image': lambda: torch.stack([torch.zeros(63, dtype=torch.bool),
                                                  torch.rand(63) < 0.5,
                                                  torch.zeros(63, dtype=torch.bool)]),
    'all kept': lambda: torch.ones(3, 63, dtype=torch.bool),
    'none kept': lambda: torch.zeros(3, 63, dtype=torch.bool),
    'all / none / half': lambda: torch.stack([torch.ones(63, dtype=torch.bool),
                                             torch.zeros(63, dtype=torch.bool),
                                             torch.rand(63) < 0.5]),
    'mostly kept (held route)': lambda: torch.rand(3, 63) < 0.97,
}


@pytest.mark.parametrize('native', [True, False])
@pytest.mark.parametrize('sr', [1, 2])
@pytest.mark.parametrize('keep', list(KEEPS))
def test_stage_forwards_agree_with_the_reference(keep, sr, native):
    stage = _stage(sr)
    stage.native = native
    x = torch.randn(3, 7 * 9, 32)
    mask = KEEPS[keep]()
    with torch.no_grad():
        on, off = _on_off(lambda: (stage.forward_sparse(x, (7, 9), mask),
                                   stage.forward_dense(x, (7, 9)),
                                   stage.forward_masked(x, (7, 9), mask.float())))
    assert _close(on, off)
    assert torch.equal(off[0][~mask], x[~mask])  # skipped tokens untouched


def test_large_stage_with_onednn_gemms_agrees_with_the_reference():
    """K ~ 900 of 1728 tokens, C = 64: the reordered GEMMs, not F.linear."""
    stage = _stage(2, dim=64)
    x = torch.randn(3, 24 * 24, 64)
    keep = torch.rand(3, 576) < torch.tensor([[0.2], [0.5], [0.9]])
    for native in (True, False):
        stage.native = native
        with torch.no_grad():
            on, off = _on_off(lambda: stage.forward_sparse(x, (24, 24), keep))
        assert _close(on, off)


def test_stage_training_forwards_and_gradients_agree_with_the_reference():
    """Autograd: the 1x1-convolution GEMMs (large inputs) and the folded
    packed path (sparse training) against F.linear and the plain path."""
    stage = _stage(2, dim=64).train()
    x = torch.randn(2, 24 * 24, 64)
    keep = torch.rand(2, 576) < torch.tensor([[0.3], [0.8]])

    def run():
        stage.zero_grad()
        out = (stage.forward_masked(x, (24, 24), keep.float()),
               stage.forward_sparse(x, (24, 24), keep))
        sum(o.pow(2).sum() for o in out).backward()
        return tuple(o.detach() for o in out) + tuple(p.grad.clone()
                                                      for p in stage.parameters())
    on, off = _on_off(run)
    assert _close(on[:2], off[:2])
    for g_on, g_off in zip(on[2:], off[2:]):
        assert torch.allclose(g_on, g_off, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------- whole backbone
CASES = [
    dict(routing='dynamic'),
    dict(routing='static'),
    dict(routing='full'),
    dict(routing='full', keep_ratio=0.5),
    dict(routing='full', keep_ratio=(1.0, 0.25)),
    dict(routing='dynamic', keep_ratio=(0.3, 0.7)),
    dict(routing='dynamic', scale_routing=False),
    dict(routing='dynamic', depth_routing=False),
    dict(routing='dynamic', gate='random'),
    dict(routing='dynamic', gate='attention'),
    dict(routing='dynamic', gate_init=dict(diagonal=-20.0, off_diagonal=-20.0, column=-20.0)),
]


@pytest.mark.parametrize('kwargs', CASES, ids=lambda kw: ','.join(f'{k}={v}' for k, v in
                                                                   kw.items()))
def test_backbone_agrees_with_the_reference(kwargs):
    model = make_dit('b0', **kwargs)
    spread_gates(model)
    model.eval()
    x = torch.randn(2, 3, 64, 96)

    def run():
        out = model(x)
        return out, {k: v.clone() for k, v in model.last_record.masks.items()}
    with torch.no_grad():
        (on, masks_on), (off, masks_off) = _on_off(run)
    assert masks_on.keys() == masks_off.keys()
    assert all(torch.equal(masks_on[k], masks_off[k]) for k in masks_on)  # same routes
    assert _close(on, off)


def test_batch_compositions_agree_with_the_reference():
    """Unequal kept counts per image, an odd input size, and one image alone
    against the same image inside the batch."""
    model = make_dit('b0')
    spread_gates(model)
    model.eval()
    x = torch.randn(4, 3, 97, 131)
    with torch.no_grad():
        on, off = _on_off(lambda: model(x))
        counts = [m.sum(dim=(1, 2)) for m in model.last_record.masks.values()]
        alone_on, alone_off = _on_off(lambda: model(x[1:2]))
    assert any(len(set(c.tolist())) > 1 for c in counts)
    assert _close(on, off) and _close(alone_on, alone_off)
    assert _close(tuple(o[1:2] for o in off), alone_off)


@pytest.mark.parametrize('sparse', [False, True])
def test_training_forward_agrees_with_the_reference(sparse):
    """The masked (default) and the packed (sparse_training) training paths,
    with the same Gumbel draws."""
    model = make_dit('b0', sparse_training=sparse, drop_path_rate=0.0)
    spread_gates(model)
    model.train()
    x = torch.randn(2, 3, 64, 96)

    def run():
        model.generator = torch.Generator().manual_seed(3)
        return tuple(o.detach() for o in model(x))
    on, off = _on_off(run)
    assert _close(on, off)


def test_sparse_training_gradients_agree_with_the_reference(monkeypatch):
    """Sparse training's backward through the executor (the sparse depthwise
    kernel's autograd function) gives the reference's gradients, and the
    kernel is on that path."""
    if not sparse_ops.extension_available():
        pytest.skip('C++ extension unavailable')
    model = make_dit('b0', sparse_training=True, drop_path_rate=0.0)
    spread_gates(model)
    model.train()
    x = torch.randn(2, 3, 64, 96)
    calls = _spy_fused_kernel(monkeypatch)
    on, off = _on_off(lambda: _gradients(model, x))
    assert calls and len(on) == len(off) > 0
    assert _close(on, off)


def _spy_fused_kernel(monkeypatch) -> list:
    """A list that grows by one per call of the fused conv + GELU kernel."""
    calls = []
    real = sparse_ops._SparseDWConvGELU.apply
    monkeypatch.setattr(sparse_ops._SparseDWConvGELU, 'apply',
                        lambda *a: calls.append(1) or real(*a))
    return calls


def _gradients(model, x) -> tuple:
    model.zero_grad(set_to_none=True)
    model.generator = torch.Generator().manual_seed(3)
    sum(o.square().mean() for o in model(x)).backward()
    return tuple(p.grad.clone() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize('kwargs', [dict(routing='dynamic'), dict(routing='full'),
                                    dict(routing='static'),
                                    dict(routing='dynamic', with_cp=True)],
                         ids=lambda kw: ','.join(f'{k}={v}' for k, v in kw.items()))
def test_dense_training_gradients_agree_with_the_reference(monkeypatch, kwargs):
    """The dense training paths (masked routing, full grid, static, with
    checkpointing) run the MLPs' conv + GELU through the fused kernel on the
    whole map, and their gradients are the reference's (oneDNN-free
    depthwise conv, PyTorch's GELU)."""
    if not sparse_ops.extension_available():
        pytest.skip('C++ extension unavailable')
    model = make_dit('b0', drop_path_rate=0.0, **kwargs)
    spread_gates(model)
    model.train()
    x = torch.randn(2, 3, 64, 96)
    calls = _spy_fused_kernel(monkeypatch)
    held = []
    real = masked_ops._HeldNorm.apply
    monkeypatch.setattr(masked_ops._HeldNorm, 'apply', lambda *a: held.append(1) or real(*a))
    on, off = _on_off(lambda: _gradients(model, x))
    assert calls and len(on) == len(off) > 0
    assert bool(held) == (kwargs['routing'] == 'dynamic')  # the masked path's node outputs
    assert _close(on, off)


# ------------------------------------------------- the masked node output
def _held_chain(C: int, mask_grad: bool):
    """A node's last block output ``x`` (held at ``x0`` where the gate is
    0, as in forward_masked), its gate and a norm with a random affine."""
    torch.manual_seed(C)
    norm = torch.nn.LayerNorm(C, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x0 = torch.randn(2, 45, C, requires_grad=True)
    logit = torch.randn(2, 45, requires_grad=mask_grad)
    hard = (logit > 0).float()
    hard[1] = 0.0  # an image that holds every token
    branch = torch.randn(2, 45, C, requires_grad=True)
    return norm, x0, logit, hard, branch


@pytest.mark.parametrize('C,mask_grad', [(64, True), (320, True), (7, True), (64, False)])
def test_held_norm_kernel_agrees_with_the_reference(C, mask_grad):
    """The fused node output of the masked path gives the reference's
    values (exactly x0 at held rows) and gradients for the node input, the
    gate, the blocks and the norm's affine, though it returns the held
    rows' gradient through ``x`` instead of ``x0``."""
    if not sparse_ops.extension_available():
        pytest.skip('C++ extension unavailable')
    norm, x0, logit, hard, branch = _held_chain(C, mask_grad)
    g = torch.randn(2, 45, C)
    inputs = (x0, branch, norm.weight, norm.bias) + ((logit,) if mask_grad else ())
    results = []
    for fn in (masked_ops.held_norm, reference.held_norm):
        mask = hard + logit - logit.detach() if mask_grad else hard
        x = torch.addcmul(x0 * 1.0, hard.unsqueeze(-1), branch.tanh())  # held rows: x0
        out = fn(norm, x, x0, mask)
        results.append((out, *torch.autograd.grad(out, inputs, g)))
    (out, *grads), (ref, *ref_grads) = results
    held = hard == 0
    assert torch.equal(out[held], x0[held])
    assert torch.allclose(out, ref, atol=ATOL)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-5), (a - b).abs().max()


def test_held_norm_takes_the_reference_where_the_kernel_does_not_apply():
    norm, x0, logit, hard, branch = _held_chain(16, True)
    x = x0 + branch
    with torch.no_grad():  # inference: the masked path is the export form only
        assert not masked_ops.held_norm_applies(norm, x, x0, hard)
    plain = torch.nn.LayerNorm(16, elementwise_affine=False)
    assert not masked_ops.held_norm_applies(plain, x, x0, hard)
    assert not masked_ops.held_norm_applies(norm, x.double(), x0.double(), hard.double())
    assert torch.equal(masked_ops.held_norm(plain, x, x0, hard),
                       reference.held_norm(plain, x, x0, hard))


# ------------------------------------------- the executors are not entered
def _trap(monkeypatch):
    """Every entry into the CPU executor and the weight cache raises."""
    def raiser(*args, **kwargs):
        raise RuntimeError('accelerated path entered')
    for name in accel.EXECUTOR_API:
        if name not in ('DTYPES', 'forget'):  # forget only drops caches
            monkeypatch.setattr(accel.cpu, name, raiser)
    for module, names in ((onednn, ('linear', 'linear_module', 'conv2d', 'packed_applies',
                                    '_packed_conv', 'packed_ops_available')),
                          (sparse_ops, ('_extension', 'kernel_applies', 'write_rows',
                                        'neighbour_table', 'sparse_dwconv_gelu')),
                          (native_stage, ('packed_forward', 'native_applies', '_plan')),
                          (packed, ('run_node', 'forward_packed')),
                          (masked_ops, ('held_norm', 'masked_linear')), (cache, ('prepared',))):
        for name in names:
            monkeypatch.setattr(module, name, raiser)


def _workload():
    stage = _stage(2)
    x = torch.randn(3, 63, 32)
    keep = torch.rand(3, 63) < torch.tensor([[0.2], [0.7], [0.5]])
    model = make_dit('b0', routing='full', keep_ratio=(1.0, 0.25))
    spread_gates(model)
    model.eval()
    img = torch.randn(2, 3, 64, 64)
    train = make_dit('b0', sparse_training=True)
    spread_gates(train)
    train.train()

    def run():
        with torch.no_grad():
            stage.forward_sparse(x, (7, 9), keep)
            stage.forward_dense(x, (7, 9))
            model(img)
        sum(o.sum() for o in train(torch.randn(2, 3, 64, 96))).backward()
    return run


def test_with_acceleration_off_no_executor_is_entered(monkeypatch):
    run = _workload()
    _trap(monkeypatch)
    with accel.set_enabled(False):
        run()


def test_with_acceleration_on_the_trapped_entries_are_on_the_path(monkeypatch):
    """The control for the test above: the same traps do fire when on."""
    run = _workload()
    _trap(monkeypatch)
    with accel.set_enabled(True), pytest.raises(RuntimeError, match='accelerated path'):
        run()


# ------------------------------------------------------ reference ops
def test_reference_sparse_dwconv_matches_the_dense_conv_and_the_kernel():
    C, B, H, W = 48, 2, 7, 9
    conv = torch.nn.Conv2d(C, C, 3, padding=1, groups=C)
    keep = torch.rand(B * H * W) < 0.6
    idx = keep.nonzero().squeeze(1)
    h = torch.randn(idx.numel(), C)
    full = torch.zeros(B * H * W, C).index_copy_(0, idx, h)
    with torch.no_grad():
        dense = conv(full.view(B, H, W, C).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        dense = torch.nn.functional.gelu(dense.reshape(-1, C)[idx])
        nbr = reference.neighbour_table(idx, B, (H, W))
        ref = reference.sparse_dwconv_gelu(h, nbr, conv)
        assert torch.allclose(ref, dense, atol=1e-5)
        if sparse_ops.extension_available():
            assert torch.allclose(sparse_ops.sparse_dwconv_gelu(h, nbr, conv), ref, atol=1e-5)


# ------------------------------------------- packed rows under autograd
@pytest.mark.parametrize('mkl_native', [True, False])
def test_rows_vary_sends_training_gemms_past_onednn_where_mkl_is_native(monkeypatch, mkl_native):
    """With ``rows_vary`` and native MKL a training GEMM takes ``F.linear``
    (oneDNN would build a primitive for every new kept count); without
    either, oneDNN's 1x1 convolution. Same values either way."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip('no oneDNN in this build')
    x = torch.randn(401, 64, requires_grad=True)  # above onednn_applies' size; no bucket count
    w, b = torch.randn(32, 64, requires_grad=True), torch.randn(32, requires_grad=True)
    assert onednn.onednn_applies(x)
    monkeypatch.setattr(onednn, 'mkl_is_native', lambda: mkl_native)
    calls = []
    real_conv = torch.nn.functional.conv2d

    def spy(*args, **kwargs):
        calls.append(1)
        return real_conv(*args, **kwargs)
    monkeypatch.setattr(onednn.F, 'conv2d', spy)
    varying = onednn.linear(x, w, b, rows_vary=True)
    assert bool(calls) != mkl_native
    calls.clear()
    fixed = onednn.linear(x, w, b)
    assert calls
    assert torch.allclose(varying, fixed, atol=ATOL)


def test_sparse_training_marks_its_token_gemms_as_varying(monkeypatch):
    """Every GEMM on packed kept tokens in sparse training says ``rows_vary``;
    the map-wide ones (keys/values) do not."""
    stage = _stage(2).train()
    x = torch.randn(2, 16 * 16, 32, requires_grad=True)
    keep = torch.rand(2, 256) < 0.6
    seen = []
    real = onednn.linear

    def spy(x, weight, bias=None, owner=None, key='linear', rows_vary=False):
        seen.append((x.shape[0] if x.dim() == 2 else None, rows_vary))
        return real(x, weight, bias, owner, key, rows_vary=rows_vary)
    monkeypatch.setattr(onednn, 'linear', spy)
    monkeypatch.setattr(onednn, 'linear_module', lambda layer, x, rows_vary=False: spy(
        x, layer.weight, layer.bias, layer, rows_vary=rows_vary))
    stage.forward_sparse(x, (16, 16), keep).sum().backward()
    kept = int(keep.sum())
    packed = [v for rows, v in seen if rows == kept]
    assert packed and all(packed)
    assert any(not v for rows, v in seen if rows != kept)
