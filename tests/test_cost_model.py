"""The analytic cost model against mmengine's FLOP counter."""
import pytest
import torch
from mmengine.analysis import FlopAnalyzer

from conftest import make_dit
from dit_mm.models.cost_model import grid_cost
from dit_mm.models.grid import resolve_arch


def _count(model, x) -> int:
    for m in model.modules():  # the counter cannot read fused attention
        if hasattr(m, 'fused_attn'):
            m.fused_attn = False
    analyzer = FlopAnalyzer(model, (x,))
    analyzer.unsupported_ops_warnings(False)
    analyzer.uncalled_modules_warnings(False)
    return analyzer.total()


@pytest.mark.parametrize('routing', ['static', 'full'])
@pytest.mark.parametrize('size', [(128, 160), (97, 131)])
def test_analytic_cost_matches_flop_counter(routing, size):
    model = make_dit('b0', routing=routing).eval()
    counted = _count(model, torch.randn(1, 3, *size))
    cost = grid_cost(model.spec, *size)
    analytic = cost.static if routing == 'static' else cost.full
    assert abs(analytic - counted) / counted < 0.02


def test_static_cost_of_pvtv2_b2_at_224():
    cost = grid_cost(resolve_arch('b2'), 224, 224)
    # PVTv2-B2 is reported at 4.0 GFLOPs (Wang et al.); our count excludes the
    # classifier head
    assert 3.7e9 < cost.static < 4.1e9
    assert cost.full > 2 * cost.static


def test_keep_ratio_lowers_real_flops_monotonically():
    model = make_dit('b0', routing='full').eval()
    x = torch.randn(2, 3, 96, 128)
    reals = []
    for r in (1.0, 0.75, 0.5, 0.25):
        model.keep_ratio = r
        with torch.no_grad():
            model(x)
        reals.append(model.flops()['real'])
    assert all(a > b for a, b in zip(reals, reals[1:]))
    assert reals[0] <= model.flops()['full'] * 1.01
