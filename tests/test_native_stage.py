"""The C++ stage program (dit_mm.accel.cpu.native_stage) against the Python packed path."""
import pytest
import torch

from dit_mm import accel
from dit_mm.accel.cpu import native_stage, onednn, sparse_ops
from dit_mm.models.blocks import RoutedStage

pytestmark = pytest.mark.skipif(
    not accel.enabled() or not sparse_ops.extension_available()
    or not onednn.packed_ops_available(),
    reason='needs acceleration on (not DIT_MM_ACCEL=0), the C++ extension and the reordered '
    'oneDNN ops')


def _stage(dim: int = 40, sr: int = 2, depth: int = 2, heads: int = 2) -> RoutedStage:
    stage = RoutedStage(dim=dim, depth=depth, num_heads=heads, sr_ratio=sr, mlp_ratio=4)
    for p in stage.parameters():  # non-trivial norms/biases
        torch.nn.init.normal_(p, 0, 0.1)
    return stage.eval()


def _spy_program(monkeypatch) -> list:
    """A list that records, for every call of the stage program from the
    model, whether it ran (``packed_forward`` returned a result)."""
    ran = []
    real = native_stage.packed_forward

    def spy(*args):
        out = real(*args)
        ran.append(out is not None)
        return out
    monkeypatch.setattr(native_stage, 'packed_forward', spy)
    return ran


def _both(stage: RoutedStage, x, hw, keep, monkeypatch=None):
    """(native result, Python result, whether the native program ran)."""
    ran = [] if monkeypatch is None else _spy_program(monkeypatch)
    with torch.no_grad():
        stage.native = True
        fast = stage.forward_sparse(x, hw, keep)
        stage.native = False
        slow = stage.forward_sparse(x, hw, keep)
    stage.native = True
    return fast, slow, ran


@pytest.mark.parametrize('sr, dim, heads', [(1, 40, 2), (2, 40, 2), (2, 64, 1), (4, 24, 3)])
def test_native_stage_equals_the_python_path_bit_for_bit(monkeypatch, sr, dim, heads):
    """Same ops in the same order: identical values, at unequal per-image
    counts with an image that keeps nothing, without (sr = 1) and with a
    spatial reduction, channel counts off the vector width."""
    stage = _stage(dim, sr, depth=3, heads=heads)
    H, W = 8, 12
    x = torch.randn(4, H * W, dim)
    keep = torch.rand(4, H * W) < torch.tensor([[0.1], [0.0], [0.6], [0.85]])
    fast, slow, ran = _both(stage, x, (H, W), keep, monkeypatch)
    assert ran == [True]
    assert torch.equal(fast, slow)
    assert torch.equal(fast[~keep], x[~keep]) and not torch.allclose(fast[keep], x[keep])


def test_native_stage_at_batch_one_with_large_gemms(monkeypatch):
    """K large enough for the reordered oneDNN GEMMs (not only F.linear)."""
    stage = _stage(64, 2, depth=2, heads=2)
    x = torch.randn(1, 32 * 32, 64)
    keep = torch.rand(1, 1024) < 0.5
    fast, slow, ran = _both(stage, x, (32, 32), keep, monkeypatch)
    assert ran == [True] and torch.equal(fast, slow)


@pytest.mark.parametrize('sr', [1, 2])
def test_native_dense_stage_matches_pvtv2_blocks(monkeypatch, sr):
    """Every token kept: the program's dense mode (folded norms, batched
    attention, the kernel's depthwise conv) against timm's blocks in
    Python, and the packed route at 100 % kept takes it too."""
    stage = _stage(40, sr, depth=2)
    x = torch.randn(3, 48, 40)
    ran = _spy_program(monkeypatch)
    with torch.no_grad():
        fast = stage.forward_dense(x, (6, 8))
        packed = stage.forward_sparse(x, (6, 8), torch.ones(3, 48, dtype=torch.bool))
        stage.native = False
        slow = stage.forward_dense(x, (6, 8))
    assert ran == [True, True]  # both fast calls ran the program
    assert torch.equal(fast, packed)
    assert torch.allclose(fast, slow, atol=1e-5) and not torch.allclose(fast, x, atol=0.1)


def test_plan_follows_weight_and_module_changes(monkeypatch):
    """In-place updates, a weight swap through ``.data`` followed by
    ``eval()`` (mmengine's EMAHook), a cast, a replaced submodule and the
    fused-attention switch each rebuild the plan: the native result keeps
    equal to the Python path's."""
    stage = _stage()
    x = torch.randn(2, 48, 40)
    keep = torch.rand(2, 48) < 0.5
    idx = keep.reshape(-1).nonzero()[:, 0]
    blk = stage.blocks[0]

    def agree():
        fast, slow, ran = _both(stage, x, (6, 8), keep, monkeypatch)
        assert ran == [True]  # the program ran, and agrees
        assert torch.equal(fast, slow)
        return fast
    results = [agree()]
    with torch.no_grad():
        blk.mlp.fc1.weight.mul_(1.5)  # optimiser step / load_state_dict
    results.append(agree())
    blk.attn.q.bias.data.copy_(torch.randn(40))  # no version bump ...
    stage.eval()  # ... but the mode switch drops the plan
    results.append(agree())
    stage.half().float()  # _apply: new storages (values rounded to half)
    results.append(agree())
    blk.mlp.fc2 = torch.nn.Linear(blk.mlp.fc2.in_features, 40)  # a new module
    results.append(agree())
    assert all(not torch.equal(a, b) for a, b in zip(results, results[1:]))
    blk.attn.fused_attn = False  # explicit attention: not covered, Python path
    assert native_stage.packed_forward(stage, x, (6, 8), idx) is None
    blk.attn.fused_attn = True
    assert native_stage.packed_forward(stage, x, (6, 8), idx) is not None


def test_uncovered_stages_keep_the_python_path(monkeypatch):
    """A block the program does not compute (here: tanh GELU) gets no plan."""
    stage = _stage()
    stage.blocks[1].mlp.act = torch.nn.GELU(approximate='tanh')
    x = torch.randn(2, 48, 40)
    keep = torch.rand(2, 48) < 0.5
    fast, slow, ran = _both(stage, x, (6, 8), keep, monkeypatch)
    assert ran == [False] and torch.equal(fast, slow)


def test_switches_and_input_checks(monkeypatch):
    stage = _stage()
    x = torch.randn(1, 48, 40)
    with torch.no_grad():
        assert native_stage.native_applies(stage, x)
        monkeypatch.setenv('DIT_MM_NO_NATIVE', '1')
        assert not native_stage.native_applies(stage, x)
        monkeypatch.delenv('DIT_MM_NO_NATIVE')
        stage.native = False
        assert not native_stage.native_applies(stage, x)
        stage.native = True
        assert not native_stage.native_applies(stage, x.double())
        with pytest.raises(RuntimeError, match='strictly increasing'):
            native_stage.packed_forward(stage, x, (6, 8), torch.tensor([3, 2, 10]))
        with pytest.raises(RuntimeError, match='strictly increasing'):
            native_stage.packed_forward(stage, x, (6, 8), torch.tensor([3, 48]))
    assert not native_stage.native_applies(stage, x.requires_grad_())  # autograd
