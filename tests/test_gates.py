import torch

from dit_mm.models.gates import ColumnGate, RowGate, attention_delta, hard_gumbel


def test_hard_gumbel_is_binary_with_straight_through_gradient():
    delta = torch.zeros(4, 1000, requires_grad=True)
    mask = hard_gumbel(delta, tau=1.0)
    assert set(mask.detach().unique().tolist()) <= {0.0, 1.0}
    assert 0.4 < mask.mean().item() < 0.6  # P(keep) = sigmoid(0)
    mask.sum().backward()
    assert delta.grad is not None and (delta.grad > 0).all()


def test_row_gate_train_samples_and_eval_uses_ema_without_noise():
    gate = RowGate(16, init_bias=0.0, momentum=0.5)
    x = torch.randn(2, 50, 16)
    gate.train()
    a, b = gate(x).mask, gate(x).mask
    assert not torch.equal(a, b)  # Gumbel noise in training
    with torch.no_grad():
        gate.proj.weight.add_(1.0)
    gate.eval()
    e1, e2 = gate(x), gate(x)
    assert torch.equal(e1.mask, e2.mask)
    # eval reads the EMA weights, which have not moved yet
    expected = (torch.nn.functional.linear(x, gate.ema_weight, gate.ema_bias).diff(dim=-1)
                .squeeze(-1) > 0).float()
    assert torch.equal(e1.mask, expected)
    gate.update_ema()
    assert torch.allclose(gate.ema_weight, 0.5 * (gate.proj.weight - 1.0) + 0.5 * gate.proj.weight)


def test_gate_init_bias_opens_gate():
    gate = RowGate(8, init_bias=4.0).eval()
    assert gate(torch.zeros(1, 10, 8)).prob.min() > 0.98


def test_column_gate_is_per_image():
    gate = ColumnGate(8)
    out = gate(torch.randn(3, 20, 8))
    assert out.mask.shape == (3,) and out.prob.shape == (3,)


def test_attention_delta_ranks_tokens_like_the_mean_query():
    x = torch.randn(1, 30, 8)
    x[0, 5] = x[0].mean(0) * 20  # aligned with the mean query
    assert attention_delta(x)[0].argmax() == 5
