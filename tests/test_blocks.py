"""The three forwards of a routed stage agree for the same gate decisions."""
import pytest
import torch

from dit_mm.blocks import RoutedStage


def _stage(sr: int = 2) -> RoutedStage:
    stage = RoutedStage(dim=32, depth=2, num_heads=2, sr_ratio=sr, mlp_ratio=4)
    for p in stage.parameters():  # non-trivial norms/biases
        torch.nn.init.normal_(p, 0, 0.1)
    return stage.eval()


@pytest.mark.parametrize('sr', [1, 2])
def test_masked_and_sparse_forwards_agree_with_unequal_counts(sr):
    stage = _stage(sr)
    x = torch.randn(3, 7 * 9, 32)
    keep = torch.rand(3, 63) < torch.tensor([[0.2], [0.7], [0.5]])
    with torch.no_grad():
        masked = stage.forward_masked(x, (7, 9), keep.float())
        sparse = stage.forward_sparse(x, (7, 9), keep)
    assert torch.allclose(masked, sparse, atol=1e-5)
    assert torch.equal(sparse[~keep], x[~keep])  # skipped tokens untouched
    assert not torch.allclose(sparse[keep], x[keep])


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
    from dit_mm import blocks, sparse_ops
    if not sparse_ops.extension_available():
        pytest.skip('no C++ compiler: only the fallback path exists here')
    stage = _stage()
    x = torch.randn(3, 9 * 11, 32)
    keep = torch.rand(3, 99) < torch.tensor([[0.1], [0.6], [0.9]])
    with torch.no_grad():
        fused = stage.forward_sparse(x, (9, 11), keep)
        monkeypatch.setattr(blocks, 'kernel_applies', lambda t: False)
        fallback = stage.forward_sparse(x, (9, 11), keep)
    assert torch.allclose(fused, fallback, atol=1e-5)


def test_neighbour_table_marks_borders_and_skipped_tokens():
    from dit_mm.sparse_ops import neighbour_table
    keep = torch.tensor([[1, 1, 0], [0, 1, 1]], dtype=torch.bool).reshape(-1)  # one 2x3 map
    nbr = neighbour_table(keep.nonzero().squeeze(1), 1, (2, 3))
    # token (0,0): up/left outside; right neighbour (0,1) is packed row 1,
    # below-right (1,1) is row 2, below (1,0) skipped
    assert nbr[0].tolist() == [-1, -1, -1, -1, 0, 1, -1, -1, 2]


def test_neighbour_table_kernel_matches_the_reference():
    from dit_mm import sparse_ops
    if not sparse_ops.extension_available():
        pytest.skip('no C++ compiler: only the reference exists here')
    keep = torch.rand(3, 7 * 5) < torch.tensor([[0.05], [0.5], [1.0]])
    idx = keep.reshape(-1).nonzero().squeeze(1)
    fast = sparse_ops.neighbour_table(idx, 3, (7, 5))
    assert torch.equal(fast, sparse_ops.neighbour_table_reference(idx, 3, (7, 5)))
    assert (fast >= 0).any() and (fast == -1).any()
