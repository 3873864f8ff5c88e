"""The budget dial (dit_mm.models.budget_dial), calibration
(dit_mm.analysis.calibration) and the EMA warm-up of the gates."""
from __future__ import annotations

import pytest
import torch

from conftest import make_dit, spread_gates
from dit_mm.analysis.calibration import apply_calibration, calibrate, spend, spend_at
from dit_mm.models.budget_dial import BudgetDial
from dit_mm.models.weights import check_dit_checkpoint


def _images(n: int = 4, size=(64, 96), seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 3, *size, generator=gen) for _ in range(n)]


def _model(**kwargs):
    model = make_dit('b0', **kwargs)
    spread_gates(model)
    return model.eval()


# ------------------------------------------------------------------- dial
def test_dial_inverts_a_monotone_curve():
    dial = BudgetDial()
    dial.set_curve([2.0, -2.0, 0.0], [2.0, 0.2, 1.0])  # unsorted on purpose
    assert dial.spend_range() == (pytest.approx(0.2), pytest.approx(2.0))
    assert dial.offset_for(1.0) == pytest.approx(0.0)
    assert dial.offset_for(0.6) == pytest.approx(-1.0)
    assert dial.offset_for(1.5) == pytest.approx(1.0)


def test_dial_flat_stretch_and_dip_are_handled():
    dial = BudgetDial()
    # a hair of non-monotonicity (0.51 after 0.52) and a flat stretch at 1.0
    dial.set_curve([-3, -2, -1, 0, 1, 2], [0.1, 0.52, 0.51, 1.0, 1.0, 1.4])
    assert -3 <= dial.offset_for(0.3) <= -2
    assert dial.offset_for(1.0) == pytest.approx(0.5)  # middle of the flat stretch


def test_dial_errors_name_the_range_and_the_tool():
    dial = BudgetDial()
    with pytest.raises(RuntimeError, match='calibrate_budget.py'):
        dial.offset_for(0.5)
    dial.set_curve([-1, 1], [0.3, 0.9])
    with pytest.raises(ValueError, match=r'\[0\.300, 0\.900\].*calibrate_budget'):
        dial.offset_for(0.95)
    with pytest.raises(ValueError, match='two or more'):
        dial.set_curve([0.0], [1.0])


def test_dial_state_dict_round_trip_with_other_curve_length():
    a, b = BudgetDial(), BudgetDial()
    a.set_curve([-1, 0, 1], [0.2, 0.6, 1.0])
    a.set_offset(0.25)
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.curve, a.curve) and float(b.offset) == 0.25


def test_checkpoint_without_dial_or_ema_steps_loads_as_trained():
    model = _model()
    old = {k: v for k, v in model.state_dict().items()
           if not k.startswith('dial.') and k != 'gate_ema_steps'}
    fresh = make_dit('b0')
    fresh.dial.set_offset(3.0)
    fresh.gate_ema_steps.fill_(7)
    result = fresh.load_state_dict(old, strict=True)  # strict: nothing reported missing
    assert not result.missing_keys
    assert float(fresh.dial.offset) == 0.0 and not fresh.dial.has_curve
    assert int(fresh.gate_ema_steps) == 0
    check_dit_checkpoint(fresh, old, 'old')  # no "missing tensors" error


# ----------------------------------------------------------------- offset
def test_offset_zero_is_the_model_as_trained_and_offsets_move_spend():
    model = _model()
    x = _images(1)[0]
    with torch.no_grad():
        ref = model(x)
        ref_masks = {k: v.clone() for k, v in model.last_record.masks.items()}
        model.dial.set_offset(0.0)
        again = model(x)
    assert all(torch.equal(a, b) for a, b in zip(ref, again))
    assert all(torch.equal(ref_masks[k], v) for k, v in model.last_record.masks.items())
    spends = [spend_at(model, [x], o) for o in (-50.0, -1.0, 0.0, 1.0, 50.0)]
    assert spends == sorted(spends) and spends[0] < spends[2] < spends[-1]
    cost = model.grid_cost(tuple(x.shape[2:]))
    gates = sum(n.row_gate for n in cost.nodes.values()) + sum(cost.col_gates.values())
    assert spends[-1] == pytest.approx((cost.full + gates) / cost.static, rel=1e-4)


def test_offset_moves_column_gates_too():
    model = _model()
    x = _images(1)[0]
    with torch.no_grad():
        model.dial.set_offset(50.0)
        model(x)
        assert all(float(r.min()) == 1.0 for n, (_, r) in model.last_record.embeds.items())
        model.dial.set_offset(-50.0)
        model(x)
        opened = [float(r.max()) for (i, j), (_, r) in model.last_record.embeds.items()
                  if 0 < i < j]
    assert opened and max(opened) == 0.0


# ------------------------------------------------------------- calibration
@pytest.mark.parametrize('mu', [0.5, 1.0])
def test_calibrate_reaches_mu_and_stores_a_dial(mu):
    model = _model()
    imgs = _images(3)
    cal = calibrate(model, imgs, mu, tol=0.01, progress=None)
    assert abs(cal.spend - mu) <= 0.01 * mu
    assert spend(model, imgs) == pytest.approx(cal.spend_before)  # model left as it was
    apply_calibration(model, cal)
    assert abs(spend(model, imgs) - mu) <= 0.01 * mu
    lo, hi = model.dial.spend_range()
    assert lo < 0.5 and hi > 2.0  # from every gate closed to every gate open
    # the dial: budgets off the curve, no recalibration
    for b in (0.4, 0.8, 1.5):
        model.budget = b
        assert abs(spend(model, imgs) - b) <= 0.05
    model.budget = None  # back to the calibrated offset
    assert abs(spend(model, imgs) - mu) <= 0.01 * mu


def test_budget_without_curve_or_out_of_range_is_a_clear_error():
    model = _model(budget=0.6)  # a constructor budget waits for a checkpoint's curve
    with pytest.raises(RuntimeError, match='calibrate_budget.py'):
        model(_images(1)[0])
    model.budget = None
    model(_images(1)[0])
    model.dial.set_curve([-1, 1], [0.3, 0.9])
    with pytest.raises(ValueError, match='outside the calibrated range'):
        model.budget = 1.2
    with pytest.raises(ValueError, match='positive'):
        model.budget = -1


def test_constructor_budget_resolves_from_a_loaded_checkpoint():
    src = _model()
    cal = calibrate(src, _images(2), 0.8, progress=None)
    apply_calibration(src, cal)
    dst = make_dit('b0', budget=0.6).eval()
    dst.load_state_dict(src.state_dict())
    assert dst.gate_offset() == pytest.approx(src.dial.offset_for(0.6))
    assert abs(spend(dst, _images(2)) - 0.6) <= 0.05


def test_calibrate_rejects_what_it_cannot_calibrate():
    with pytest.raises(ValueError, match="routing='dynamic'"):
        calibrate(make_dit('b0', routing='static'), _images(1), 0.5, progress=None)
    with pytest.raises(ValueError, match='keep_ratio'):
        calibrate(make_dit('b0', keep_ratio=0.5), _images(1), 0.5, progress=None)
    with pytest.raises(ValueError, match='outside what the gates can spend'):
        calibrate(_model(), _images(1), 2.9, progress=None)


# -------------------------------------------------------------- EMA ramp
def test_ema_warmup_ramps_momentum_and_survives_a_resume():
    model = make_dit('b0', gate_momentum=0.999).train()
    x = torch.randn(1, 3, 32, 32)
    seen = []
    for _ in range(3):
        seen.append(model.ema_momentum())
        model(x)
    assert seen == pytest.approx([1 / 10, 2 / 11, 3 / 12])
    assert int(model.gate_ema_steps) == 3
    resumed = make_dit('b0', gate_momentum=0.999)
    resumed.load_state_dict(model.state_dict())
    assert resumed.ema_momentum() == pytest.approx(4 / 13)
    gate, g2 = model.row_gates['s0_t0'], resumed.row_gates['s0_t0']
    with torch.no_grad():
        gate.proj.weight.add_(1.0)
        g2.proj.weight.add_(1.0)
    before = gate.ema_weight.clone()
    model(x)
    resumed.train()(x)
    m = 4 / 13
    assert torch.allclose(gate.ema_weight, m * before + (1 - m) * gate.proj.weight)
    assert torch.equal(gate.ema_weight, g2.ema_weight)
    late = make_dit('b0', gate_momentum=0.9)
    late.gate_ema_steps.fill_(10_000)
    assert late.ema_momentum() == 0.9  # the ramp ends at the configured momentum


def test_ema_warmup_off_keeps_the_configured_momentum():
    model = make_dit('b0', gate_momentum=0.5, gate_ema_warmup=False).train()
    assert model.ema_momentum() == 0.5
