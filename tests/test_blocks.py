"""The three forwards of a routed stage agree for the same gate decisions."""
import pytest
import torch

from dit_mm.models.blocks import RoutedStage


def _stage(sr: int = 2) -> RoutedStage:
    stage = RoutedStage(dim=32, depth=2, num_heads=2, sr_ratio=sr, mlp_ratio=4)
    for p in stage.parameters():  # non-trivial norms/biases
        torch.nn.init.normal_(p, 0, 0.1)
    return stage.eval()


@pytest.mark.parametrize('native', [True, False])
@pytest.mark.parametrize('sr', [1, 2])
def test_masked_and_sparse_forwards_agree_with_unequal_counts(sr, native):
    stage = _stage(sr)
    stage.native = native  # the C++ stage program, or the packed path in Python
    x = torch.randn(3, 7 * 9, 32)
    keep = torch.rand(3, 63) < torch.tensor([[0.2], [0.7], [0.5]])
    with torch.no_grad():
        masked = stage.forward_masked(x, (7, 9), keep.float())
        sparse = stage.forward_sparse(x, (7, 9), keep)
    assert torch.allclose(masked, sparse, atol=1e-5)
    assert torch.equal(sparse[~keep], x[~keep])  # skipped tokens untouched
    assert not torch.allclose(sparse[keep], x[keep])


def test_only_a_middle_image_keeping_tokens_matches_the_masked_path():
    """One non-empty image takes a copy-free attention path; its position in
    the batch must still pick its own keys and values."""
    stage = _stage()
    x = torch.randn(3, 7 * 9, 32)
    keep = torch.zeros(3, 63, dtype=torch.bool)
    keep[1] = torch.rand(63) < 0.5
    with torch.no_grad():
        masked = stage.forward_masked(x, (7, 9), keep.float())
        sparse = stage.forward_sparse(x, (7, 9), keep)
    assert torch.allclose(masked, sparse, atol=1e-5)
    assert torch.equal(sparse[[0, 2]], x[[0, 2]])


def test_all_kept_equals_dense_and_none_kept_is_identity():
    stage = _stage()
    x = torch.randn(2, 36, 32)
    ones = torch.ones(2, 36, dtype=torch.bool)
    with torch.no_grad():
        dense = stage.forward_dense(x, (6, 6))
        assert torch.allclose(stage.forward_masked(x, (6, 6), ones.float()), dense, atol=1e-6)
        assert torch.equal(stage.forward_sparse(x, (6, 6), ones), dense)
        assert torch.equal(stage.forward_sparse(x, (6, 6), ~ones), x)
        # one image all skipped, the other all kept
        mixed = torch.stack([ones[0], ~ones[1]])
        out = stage.forward_sparse(x, (6, 6), mixed)
    assert torch.allclose(out[0], dense[0], atol=1e-5) and torch.equal(out[1], x[1])


def test_sparse_result_of_an_image_does_not_depend_on_the_batch():
    stage = _stage()
    x = torch.randn(4, 48, 32)
    keep = torch.rand(4, 48) < 0.5
    with torch.no_grad():
        batch = stage.forward_sparse(x, (6, 8), keep)
        alone = stage.forward_sparse(x[2:3], (6, 8), keep[2:3])
    assert torch.allclose(batch[2:3], alone, atol=1e-5)


def test_masked_gradient_reaches_the_gate_mask():
    stage = _stage().train()
    x = torch.randn(2, 36, 32)
    mask = torch.ones(2, 36, requires_grad=True)
    stage.forward_masked(x, (6, 6), mask).pow(2).sum().backward()
    assert mask.grad is not None and mask.grad.abs().sum() > 0


def test_sparse_kernel_matches_the_dense_conv_fallback(monkeypatch):
    from dit_mm.accel.cpu import sparse_ops
    if not sparse_ops.extension_available():
        pytest.skip('no C++ compiler: only the fallback path exists here')
    stage = _stage()
    x = torch.randn(3, 9 * 11, 32)
    keep = torch.rand(3, 99) < torch.tensor([[0.1], [0.6], [0.9]])
    stage.native = False  # the Python packed path, with and without the kernel
    with torch.no_grad():
        fused = stage.forward_sparse(x, (9, 11), keep)
        monkeypatch.setattr(sparse_ops, 'kernel_applies', lambda t: False)
        fallback = stage.forward_sparse(x, (9, 11), keep)
    assert torch.allclose(fused, fallback, atol=1e-5)


@pytest.mark.parametrize('C', [37, 165, 512])
def test_kernel_conv_and_gelu_match_torch_at_kept_tokens(C):
    """The kernel's conv and its in-kernel GELU (rational erf) against
    ``F.conv2d`` + exact ``F.gelu`` on a zero-filled map, with values far
    beyond the erf clamp at +-4. C = 37 runs the scalar loop only, 165 the
    vector blocks and a scalar tail, 512 (PVTv2's stage-1 hidden) vector
    blocks only."""
    import torch.nn.functional as F

    from dit_mm.accel.cpu import sparse_ops
    if not sparse_ops.extension_available():
        pytest.skip('no C++ compiler: only the fallback path exists here')
    B, H, W = 2, 7, 9
    conv = torch.nn.Conv2d(C, C, 3, padding=1, groups=C)
    keep = torch.rand(B * H * W) < 0.6
    idx = keep.nonzero().squeeze(1)
    h = torch.randn(idx.numel(), C) * 6
    full = torch.zeros(B * H * W, C).index_copy_(0, idx, h)
    with torch.no_grad():
        dense = conv(full.view(B, H, W, C).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        dense = dense.reshape(-1, C)[idx]
        nbr = sparse_ops.neighbour_table(idx, B, (H, W))
        plain = sparse_ops.sparse_dwconv_gelu(h, nbr, conv, gelu=False)
        assert torch.allclose(plain, dense, atol=1e-4)
        fused = sparse_ops.sparse_dwconv_gelu(h, nbr, conv, gelu=True)
    assert dense.abs().max() > 8
    assert torch.allclose(fused, F.gelu(dense), atol=1e-5 * dense.abs().max().item())


def test_neighbour_table_marks_borders_and_skipped_tokens():
    from dit_mm.accel.cpu.sparse_ops import neighbour_table
    keep = torch.tensor([[1, 1, 0], [0, 1, 1]], dtype=torch.bool).reshape(-1)  # one 2x3 map
    nbr = neighbour_table(keep.nonzero().squeeze(1), 1, (2, 3))
    # token (0,0): up/left outside; right neighbour (0,1) is packed row 1,
    # below-right (1,1) is row 2, below (1,0) skipped
    assert nbr[0].tolist() == [-1, -1, -1, -1, 0, 1, -1, -1, 2]


def test_neighbour_table_kernel_matches_the_reference():
    from dit_mm.accel import reference
    from dit_mm.accel.cpu import sparse_ops
    if not sparse_ops.extension_available():
        pytest.skip('no C++ compiler: only the reference exists here')
    keep = torch.rand(3, 7 * 5) < torch.tensor([[0.05], [0.5], [1.0]])
    idx = keep.reshape(-1).nonzero().squeeze(1)
    fast = sparse_ops.neighbour_table(idx, 3, (7, 5))
    assert torch.equal(fast, reference.neighbour_table(idx, 3, (7, 5)))
    assert (fast >= 0).any() and (fast == -1).any()


def test_kernel_is_built_with_openmp():
    """``at::parallel_for`` is an OpenMP pragma in the header: a build
    without ``-fopenmp`` silently runs the kernel on one thread."""
    from dit_mm.accel.cpu import sparse_ops
    if not sparse_ops.extension_available():
        pytest.skip('no C++ compiler: only the reference exists here')
    with open(sparse_ops._extension().__file__, 'rb') as f:
        assert b'GOMP_parallel' in f.read()


def test_folded_norm_path_matches_the_plain_path_with_gradients(monkeypatch):
    """The packed path folds norm1's affine into the SR conv / kv linear;
    values and parameter gradients equal the unfolded computation."""
    from dit_mm.accel import folding
    for sr in (1, 2):
        stage = _stage(sr).train()
        x = torch.randn(2, 6 * 8, 32)
        keep = torch.rand(2, 48) < torch.tensor([[0.3], [0.8]])
        grads = []
        for foldable in (folding.foldable, lambda blk, eps: False):
            monkeypatch.setattr(folding, 'foldable', foldable)
            stage.zero_grad()
            out = stage.forward_sparse(x, (6, 8), keep)
            out.pow(2).sum().backward()
            blk = stage.blocks[0]
            sr_or_kv = blk.attn.sr if sr > 1 else blk.attn.kv
            grads.append((out.detach(), blk.norm1.weight.grad.clone(),
                          blk.norm1.bias.grad.clone(), sr_or_kv.weight.grad.clone()))
        for folded, plain in zip(*grads):
            assert torch.allclose(folded, plain, atol=1e-4, rtol=1e-4)
        assert grads[0][1].abs().sum() > 0


def test_prepared_weights_follow_parameter_updates():
    from dit_mm.accel.cache import prepared
    lin = torch.nn.Linear(4, 4)
    calls = []

    def double(w):
        calls.append(1)
        return w * 2
    with torch.no_grad():
        first = prepared(lin, 'w2', double, lin.weight)
        assert prepared(lin, 'w2', double, lin.weight) is first and len(calls) == 1
        lin.weight.add_(1.0)  # in-place update (optimiser step, load_state_dict)
        again = prepared(lin, 'w2', double, lin.weight)
    assert len(calls) == 2 and torch.allclose(again, lin.weight * 2)
    assert prepared(lin, 'w2', double, lin.weight).requires_grad  # autograd: never cached
    assert len(calls) == 3


def test_keep_freed_memory_takes_effect_on_glibc():
    """In a child process: the setting lasts for the process."""
    import platform
    import subprocess
    import sys
    if platform.libc_ver()[0] != 'glibc':
        pytest.skip('glibc malloc only')
    code = 'from dit_mm.engine.runtime import keep_freed_memory; print(keep_freed_memory())'
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[-1] == 'True'


def test_keep_freed_memory_keeps_more_than_two_gib():
    """Freed memory above ``mallopt``'s largest positive trim threshold
    (2 GiB; a training step frees more) is kept: allocating it again costs
    no page faults. With the threshold at ``2**31 - 1`` the second round
    faulted 83 % of its pages in again."""
    import platform
    import subprocess
    import sys
    if platform.libc_ver()[0] != 'glibc':
        pytest.skip('glibc malloc only')
    code = (
        'import resource, torch\n'
        'from dit_mm.engine.runtime import keep_freed_memory\n'
        'assert keep_freed_memory()\n'
        'xs = [torch.ones(2 ** 24) for _ in range(40)]; del xs\n'  # 40 x 64 MiB
        'f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n'
        'xs = [torch.ones(2 ** 24) for _ in range(40)]\n'
        'print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)\n')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         check=True).stdout.split()
    pages = 40 * 2 ** 26 // 4096
    # a block may not fit a freed one (alignment), and is faulted in fresh
    assert int(out[-1]) < pages // 10, f'{out[-1]} page faults for {pages} pages'


@pytest.mark.parametrize('c_out', [160, 512])  # 512: the bias as an input channel
def test_linear_matches_f_linear_with_gradients(c_out):
    from dit_mm.accel.cpu.onednn import linear, onednn_applies
    x = torch.randn(3, 300, 96, requires_grad=True)  # above the oneDNN size
    w = torch.randn(c_out, 96, requires_grad=True)
    b = torch.randn(c_out, requires_grad=True)
    assert onednn_applies(x) == torch.backends.mkldnn.is_available()
    y = linear(x, w, b)
    ref = torch.nn.functional.linear(x, w, b)
    assert y.shape == ref.shape and torch.allclose(y, ref, atol=1e-4, rtol=1e-4)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, w, b), g)
    ref_grads = torch.autograd.grad(ref, (x, w, b), g)
    for a, r in zip(grads, ref_grads):
        assert torch.allclose(a, r, atol=1e-3, rtol=1e-4)


def test_large_packed_path_with_onednn_gemms_matches_the_masked_path():
    """Large enough for the oneDNN GEMMs (K ~ 900 of 1728 tokens, C = 64)."""
    from dit_mm.accel.cpu.onednn import onednn_applies
    stage = RoutedStage(dim=64, depth=2, num_heads=2, sr_ratio=2, mlp_ratio=4).eval()
    for p in stage.parameters():
        torch.nn.init.normal_(p, 0, 0.1)
    x = torch.randn(3, 24 * 24, 64)
    keep = torch.rand(3, 576) < torch.tensor([[0.2], [0.5], [0.9]])
    assert onednn_applies(x.reshape(-1, 64)[keep.reshape(-1)]) == \
        torch.backends.mkldnn.is_available()
    with torch.no_grad():
        sparse = stage.forward_sparse(x, (24, 24), keep)
        masked = stage.forward_masked(x, (24, 24), keep.float())
    assert torch.allclose(sparse, masked, atol=1e-4)
    assert torch.equal(sparse[~keep], x[~keep])


def test_mostly_kept_nodes_compute_densely_with_the_same_values():
    """The Python route (the C++ stage program packs at any kept fraction)."""
    stage = _stage()
    stage.native = False
    x = torch.randn(2, 64, 32)
    keep = torch.ones(2, 64, dtype=torch.bool)
    keep[0, 5] = keep[1, 17] = False  # 98 % kept
    from dit_mm.accel.cpu.packed import DENSE_ABOVE
    assert keep.float().mean() > DENSE_ABOVE
    calls = []
    held = stage.forward_masked  # the dense route: skipped tokens held
    stage.forward_masked = lambda *a: calls.append(1) or held(*a)
    with torch.no_grad():
        dense = stage.forward_sparse(x, (8, 8), keep)
        stage.dense_above = 1.0
        packed = stage.forward_sparse(x, (8, 8), keep)
        masked = held(x, (8, 8), keep.float())
    assert calls == [1]  # only the first call took the dense route
    assert torch.allclose(dense, packed, atol=1e-5)
    assert torch.allclose(dense, masked, atol=1e-5)
    assert torch.equal(dense[~keep], x[~keep])


def test_accelerator_threshold_does_not_apply_on_the_cpu():
    """Off the CPU partly kept nodes take the dense route above
    ``dense_above_accelerator``; CPU tensors keep packing whatever it says."""
    stage = _stage()
    assert stage.dense_above_accelerator == 0.6
    stage.dense_above_accelerator = 0.0
    x = torch.randn(2, 64, 32)
    keep = torch.rand(2, 64) < 0.5
    calls = []
    held = stage.forward_masked  # the dense route: skipped tokens held
    stage.forward_masked = lambda *a: calls.append(1) or held(*a)
    with torch.no_grad():
        packed = stage.forward_sparse(x, (8, 8), keep)
        masked = held(x, (8, 8), keep.float())
    assert calls == [] and torch.allclose(packed, masked, atol=1e-5)


def test_profiler_scopes_are_recorded_only_under_a_profiler(monkeypatch):
    """The benchmark's gate/gather/scatter shares read the ``dit::`` scopes;
    without a profiler they must not enter ``record_function`` at all."""
    from torch.profiler import ProfilerActivity, profile

    from dit_mm.utils import profiling
    stage = _stage()
    x = torch.randn(2, 48, 32)
    keep = torch.rand(2, 48) < 0.5
    entered = []
    real = profiling.record_function
    monkeypatch.setattr(profiling, 'record_function',
                        lambda name: entered.append(name) or real(name))
    with torch.no_grad():
        stage.forward_sparse(x, (6, 8), keep)
        assert entered == []
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            stage.forward_sparse(x, (6, 8), keep)
    names = {e.key for e in prof.key_averages()}
    assert {'dit::gather', 'dit::scatter'} <= names and 'dit::gather' in entered


def test_write_rows_matches_index_copy_and_checks_indices():
    from dit_mm.accel.cpu import sparse_ops
    dst = torch.randn(50, 24)
    idx = torch.tensor([3, 7, 8, 20, 49])
    src = torch.randn(5, 24)
    with torch.no_grad():
        got = sparse_ops.write_rows(dst.clone(), idx, src)
        assert torch.equal(got, dst.clone().index_copy_(0, idx, src))
        if sparse_ops.extension_available():
            with pytest.raises(RuntimeError, match='out of range'):
                sparse_ops.write_rows(dst.clone(), torch.tensor([0, 1, 2, 3, 50]), src)


@pytest.mark.parametrize('C,scale,bias,gelu', [(24, 1.0, True, True), (70, 4.0, True, True),
                                              (16, 1.0, False, True), (24, 1.0, True, False)])
def test_sparse_kernel_gradients_match_the_reference(C, scale, bias, gelu):
    """Sparse training through the kernel (the fused conv + GELU, or the
    conv alone): its input, weight and bias gradients equal those of the
    plain-PyTorch definition, for channel counts with and without a scalar
    tail and conv outputs far into both tails of the GELU (``scale``)."""
    from dit_mm.accel import reference
    from dit_mm.accel.cpu import sparse_ops
    if not sparse_ops.extension_available():
        pytest.skip('C++ extension unavailable')
    torch.manual_seed(0)
    B, (H, W) = 2, (5, 7)
    keep = torch.rand(B * H * W) < 0.6
    idx = keep.nonzero().squeeze(1)
    nbr = sparse_ops.neighbour_table(idx, B, (H, W))
    conv = torch.nn.Conv2d(C, C, 3, padding=1, groups=C, bias=bias)
    h = (scale * torch.randn(idx.numel(), C)).requires_grad_()
    g = torch.randn(idx.numel(), C)
    grads = []
    for fn in (sparse_ops.sparse_dwconv_gelu, reference.sparse_dwconv_gelu):
        conv.zero_grad()
        h.grad = None
        (fn(h, nbr, conv, gelu=gelu) * g).sum().backward()
        grads.append((h.grad.clone(), conv.weight.grad.clone(),
                      *([conv.bias.grad.clone()] if bias else [])))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (a - b).abs().max()


@pytest.mark.parametrize('rows', [8, 200])  # below / above 4x the input channels
def test_masked_linear_equals_the_masked_output_in_both_forms(rows):
    """fc(x) * hard, whether the mask rides on the input (many rows) or is
    applied to the output (few rows); exactly zero where hard == 0, with the
    same gradients."""
    from dit_mm.accel.cpu.masked_ops import masked_linear as _masked_linear
    fc = torch.nn.Linear(16, 64)
    x = torch.randn(2, rows, 16, requires_grad=True)
    hard = (torch.rand(2, rows, 1) < 0.6).float()
    out = _masked_linear(fc, x, hard)
    ref_x = x.detach().clone().requires_grad_()
    ref = torch.nn.functional.linear(ref_x, fc.weight, fc.bias) * hard
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.equal(out[hard.squeeze(-1) == 0], torch.zeros_like(out[hard.squeeze(-1) == 0]))
    g = torch.randn_like(out)
    out.backward(g)
    grads = [p.grad.clone() for p in (x, fc.weight, fc.bias)]
    fc.zero_grad()
    ref.backward(g)
    for got, want in zip(grads, (ref_x.grad, fc.weight.grad, fc.bias.grad)):
        assert torch.allclose(got, want, atol=1e-4)


def test_padded_attention_equals_one_call_per_image():
    """The packed queries of all images in one zero-padded attention call:
    the same values and gradients (queries, keys, values) as one call per
    image; padding is used only when it wastes little."""
    from dit_mm.accel.cpu.packed import _attention_packed, _padded_rows
    assert _padded_rows([10], torch.device('cpu')) is None  # one image: nothing to pad
    assert _padded_rows([10, 2], torch.device('cpu')) is None  # 20 rows for 12 kept
    counts = [9, 8, 7]
    padded = _padded_rows(counts, torch.device('cpu'))
    assert padded is not None and padded[1] == 9
    assert padded[0].tolist() == list(range(9)) + list(range(9, 17)) + list(range(18, 25))
    stage = _stage().train()
    attn = stage.blocks[0].attn
    q = torch.randn(sum(counts), 32, requires_grad=True)
    k = torch.randn(3, 2, 5, 16, requires_grad=True)
    v = torch.randn(3, 2, 5, 16, requires_grad=True)
    outs, grads = [], []
    for pad in (padded, None):
        for t in (q, k, v):
            t.grad = None
        out = _attention_packed(attn, q, k, v, counts, pad)
        out.pow(2).sum().backward()
        outs.append(out.detach())
        grads.append([t.grad.clone() for t in (q, k, v)])
    assert torch.allclose(outs[0], outs[1], atol=1e-6)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize('hw', [(16, 16), (17, 19)])  # the SR conv drops a border at 17 x 19
def test_touched_patches_are_the_sr_patches_that_hold_kept_tokens(hw):
    """Brute force: a patch is touched when the SR conv's window over it
    holds a kept token; ``rows[slots]`` are the kept tokens inside."""
    from dit_mm.accel.cpu.packed import _touched_patches
    sr = torch.nn.Conv2d(8, 8, 4, stride=4)
    B, (H, W) = 2, hw
    keep = torch.zeros(B, H * W, dtype=torch.bool)
    keep.view(-1)[torch.tensor([0, 5, 6, 70, H * W - 1, H * W + 3 * W + 2])] = True
    idx = keep.view(-1).nonzero().squeeze(1)
    got = _touched_patches(idx, B, hw, sr)
    window = torch.nn.functional.conv2d(keep.view(B, 1, H, W).float(), torch.ones(1, 1, 4, 4),
                                        stride=4)
    assert got.ids.tolist() == window.view(-1).nonzero().squeeze(1).tolist()
    assert got.rows.numel() == got.ids.numel() * 16
    inside = idx if got.inside is None else idx[got.inside]
    assert got.rows[got.slots].tolist() == inside.tolist()
    assert (got.inside is None) == (hw == (16, 16))  # the last token is outside at 17 x 19
    many = torch.arange(B * H * W)
    assert _touched_patches(many, B, hw, sr) is None  # every patch touched
    assert _touched_patches(idx, B, hw, None) is None  # no SR conv (stride 32)


@pytest.mark.parametrize('with_cp', [False, True])
@pytest.mark.parametrize('hw', [(16, 16), (17, 19)])
def test_few_kept_tokens_keys_values_without_rewriting_the_map(monkeypatch, hw, with_cp):
    """Sparse training with few kept tokens computes keys and values from
    the stage input's map plus the touched SR patches: the same values and
    gradients (input, gate, SR conv and norm weights) as rewriting the map
    at every block."""
    from dit_mm.accel.cpu import packed
    torch.manual_seed(0)
    stage = _stage(sr=4).train()
    stage.with_cp = with_cp
    B, N = 2, hw[0] * hw[1]
    x = torch.randn(B, N, 32, requires_grad=True)
    gate = torch.zeros(B, N)
    gate.view(-1)[torch.tensor([3, 40, 41, N - 1, N + 100])] = 1.0
    gate.requires_grad_(True)
    kept = gate.detach() > 0.5
    assert packed._touched_patches(kept.view(-1).nonzero().squeeze(1), B, hw,
                                   stage.blocks[0].attn.sr) is not None
    results = []
    for up_to in (packed.PATCH_KV_UP_TO, -1.0):  # -1: never patched
        monkeypatch.setattr(packed, 'PATCH_KV_UP_TO', up_to)
        stage.zero_grad()
        x.grad = gate.grad = None
        out = stage.forward_sparse(x, hw, kept, gate=gate)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        blk = stage.blocks[1]
        results.append((out.detach(), x.grad.clone(), gate.grad.clone(),
                        blk.attn.sr.weight.grad.clone(), blk.norm1.weight.grad.clone()))
    for patched, plain in zip(*results):
        assert torch.allclose(patched, plain, atol=1e-5, rtol=1e-4)
    assert results[0][3].abs().sum() > 0


def test_sparse_training_blend_at_the_kept_rows_equals_the_full_blend():
    """``forward_sparse(..., gate=g)`` equals ``blend(x, forward_sparse(x), g)``:
    values, and gradients of the input, the gate and the weights."""
    from dit_mm.models.blocks import blend
    torch.manual_seed(0)
    stage = _stage().train()
    x = torch.randn(3, 6 * 8, 32, requires_grad=True)
    gate = (torch.rand(3, 48) < torch.tensor([[0.3], [0.9], [0.6]])).float().requires_grad_()
    kept = gate.detach() > 0.5
    results = []
    for rows in (True, False):
        stage.zero_grad()
        x.grad = gate.grad = None
        out = stage.forward_sparse(x, (6, 8), kept, gate=gate) if rows else \
            blend(x, stage.forward_sparse(x, (6, 8), kept), gate)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out.detach(), x.grad.clone(), gate.grad.clone(),
                        stage.blocks[0].mlp.fc1.weight.grad.clone()))
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-6)
    assert results[0][2][~kept].abs().sum() == 0  # y - x is 0 at skipped tokens
    assert results[0][2][kept].abs().sum() > 0


@pytest.mark.parametrize('few', [False, True])
def test_sparse_training_with_an_image_that_keeps_nothing_matches_the_masked_path(few):
    """Keys and values are computed only for the images that keep tokens;
    values and gradients (input, weights, the gate at kept tokens) equal the
    masked path's, with an image of the batch that keeps none. ``few``: a
    token or two in one image (the touched-patch keys and values)."""
    torch.manual_seed(0)
    stage = _stage(sr=4).train()
    B, hw = 3, (16, 16)
    N = hw[0] * hw[1]
    x = torch.randn(B, N, 32, requires_grad=True)
    gate = torch.zeros(B, N)
    if few:
        gate[2, [17, 18]] = 1.0
    else:
        gate[0] = (torch.rand(N) < 0.6).float()
        gate[2] = (torch.rand(N) < 0.3).float()
    gate.requires_grad_(True)
    kept = gate.detach() > 0.5
    weights = [stage.blocks[0].attn.sr.weight, stage.blocks[1].mlp.fc1.weight,
               stage.blocks[1].norm1.weight]
    results = []
    for sparse in (True, False):
        stage.zero_grad()
        x.grad = gate.grad = None
        out = stage.forward_sparse(x, hw, kept, gate=gate) if sparse else \
            stage.forward_masked(x, hw, gate)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out.detach(), x.grad.clone(), gate.grad[kept].clone(),
                        *[w.grad.clone() for w in weights]))
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    assert torch.equal(results[0][0][1], x.detach()[1])  # the image that keeps none
    assert results[0][3].abs().sum() > 0


@pytest.mark.parametrize('kernel', [True, False])
def test_padded_packed_rows_change_no_value_or_gradient(monkeypatch, kernel):
    """Padding rows (:func:`dit_mm.accel.cpu.onednn.bucket_rows`) are isolated: sparse
    training with 37 of them gives the values and gradients (input, gate,
    weights) of the unpadded rows; with the dense-conv MLP (no kernel)
    nothing is padded."""
    from dit_mm.accel.cpu import onednn, sparse_ops
    torch.manual_seed(0)
    stage = _stage(sr=2).train()
    if not kernel:
        monkeypatch.setattr(sparse_ops, 'kernel_applies', lambda t: False)
    x = torch.randn(2, 8 * 8, 32, requires_grad=True)
    gate = (torch.rand(2, 64) < torch.tensor([[0.7], [0.4]])).float().requires_grad_()
    kept = gate.detach() > 0.5
    weights = [stage.blocks[0].attn.q.weight, stage.blocks[1].mlp.fc1.weight,
               stage.blocks[1].mlp.dwconv.weight, stage.blocks[0].attn.sr.weight]
    results = []
    for pad in (0, 37):
        monkeypatch.setattr(onednn, 'bucket_rows', lambda rows, x, pad=pad: rows + pad)
        stage.zero_grad()
        x.grad = gate.grad = None
        out = stage.forward_sparse(x, (8, 8), kept, gate=gate)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out.detach(), x.grad.clone(), gate.grad.clone(),
                        *[w.grad.clone() for w in weights]))
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize('pad', [0, 5])
def test_two_images_with_the_same_row_count_match_the_masked_path(monkeypatch, pad):
    """Two images keeping nearly as many tokens each hold half of the padded
    rows (:func:`dit_mm.accel.cpu.packed._row_layout`: padding before the first
    image and after the second), and the attention reads the queries in
    place. Values and gradients (input, gate, weights) equal the masked
    path's and the tail-padded layout's."""
    from dit_mm.accel.cpu import onednn, packed
    torch.manual_seed(0)
    stage = _stage(sr=2).train()
    x = torch.randn(2, 8 * 8, 32, requires_grad=True)
    gate = torch.zeros(2, 64)
    gate[0, torch.randperm(64)[:41]] = 1
    gate[1, torch.randperm(64)[:40]] = 1  # 2 * 41 - 81 = 1 <= 0.02 * 81 extra rows
    gate.requires_grad_()
    kept = gate.detach() > 0.5
    monkeypatch.setattr(onednn, 'bucket_rows', lambda rows, x: rows + pad)
    strides = []
    attention = packed._attention_packed

    def spy(*args):
        strides.append(args[-1])
        return attention(*args)
    monkeypatch.setattr(packed, '_attention_packed', spy)
    weights = [stage.blocks[0].attn.q.weight, stage.blocks[1].mlp.fc1.weight,
               stage.blocks[1].mlp.dwconv.weight, stage.blocks[0].attn.sr.weight,
               stage.blocks[1].norm1.weight, stage.blocks[1].norm1.bias]
    results = []
    for path, same in (('sparse', 0.02), ('sparse', -1.0), ('masked', 0.02)):
        monkeypatch.setattr(packed, 'SAME_COUNT_UP_TO', same)
        stage.zero_grad()
        x.grad = gate.grad = None
        if path == 'masked':
            out = stage.forward_masked(x, (8, 8), gate)
        else:
            out = stage.forward_sparse(x, (8, 8), kept, gate=gate)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out.detach(), x.grad.clone(), gate.grad[kept].clone(),
                        *[w.grad.clone() for w in weights]))
    # half of 2 * 41 + pad rows, rounded up to even, per image; then the tail layout
    assert strides == [(82 + pad + pad % 2) // 2] * 2 + [0] * 2
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_bucket_rows_pads_a_little_to_repeating_counts():
    from dit_mm.accel.cpu import onednn
    x = torch.zeros(1, 4096, onednn.ONEDNN_PACKED_UP_TO)
    if not onednn.onednn_applies(x):
        pytest.skip('no oneDNN')
    for rows in list(range(onednn.BUCKET_FROM, 40000, 997)) + [27500, 32700, 32768]:
        padded = onednn.bucket_rows(rows, x)
        assert rows <= padded <= rows * 1.032
        assert onednn._bucketed(padded, torch.zeros(512, onednn.ONEDNN_PACKED_UP_TO))
    assert {onednn.bucket_rows(r, x) for r in range(27000, 27500)} <= {27136, 27648}
    assert onednn.bucket_rows(onednn.BUCKET_FROM - 1, x) == onednn.BUCKET_FROM - 1
    # the stride-16 / stride-32 nodes' counts at 84 % kept repeat too
    assert len({onednn.bucket_rows(r, x) for r in range(1700, 1740)}) <= 3
    assert len({onednn.bucket_rows(r, x) for r in range(420, 440)}) <= 3
    with torch.no_grad():  # inference: no padding
        assert onednn.bucket_rows(27500, x) == 27500
