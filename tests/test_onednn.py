"""oneDNN GEMMs / convolutions with weights reordered once (dit_mm.accel.cpu.onednn)."""
import copy
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dit_mm.accel import cache
from dit_mm.accel.cpu import onednn
from dit_mm.accel.cpu.onednn import (
    conv2d,
    linear,
    linear_module,
    packed_applies,
    packed_ops_available,
)

needs_packed = pytest.mark.skipif(not packed_ops_available(),
                                  reason='oneDNN reordered-weight ops not in this build')


@pytest.fixture(autouse=True)
def always_reorder(monkeypatch):
    """The small GEMMs below would take ``F.linear`` (onednn.plain_is_faster);
    these tests are about the reordered path, so it is forced."""
    monkeypatch.setattr(onednn, 'PLAIN_MACS', 0)


@needs_packed
@pytest.mark.parametrize('rows', [1, 7, 49, 300])
@pytest.mark.parametrize('bias', [True, False])
def test_packed_linear_equals_f_linear(rows, bias):
    layer = nn.Linear(96, 160, bias=bias)
    x = torch.randn(rows, 96)
    xt = torch.randn(96, rows).t()  # strided input
    with torch.no_grad():
        assert packed_applies(x)
        y = linear_module(layer, x)
        y3 = linear_module(layer, x.view(1, rows, 96))  # leading dims kept
        yt = linear_module(layer, xt)
        ref, ref_t = F.linear(x, layer.weight, layer.bias), F.linear(xt, layer.weight, layer.bias)
    assert torch.allclose(y, ref, atol=1e-4, rtol=1e-4)
    assert y3.shape == (1, rows, 160) and torch.allclose(y3[0], ref, atol=1e-4, rtol=1e-4)
    assert torch.allclose(yt, ref_t, atol=1e-4, rtol=1e-4)


@needs_packed
@pytest.mark.parametrize('spec', [
    dict(cin=32, cout=48, k=2, stride=2, padding=0, groups=1, hw=(14, 10)),  # SR conv
    dict(cin=3, cout=16, k=7, stride=4, padding=3, groups=1, hw=(33, 47)),  # stem
    dict(cin=64, cout=64, k=3, stride=1, padding=1, groups=64, hw=(9, 9)),  # depthwise
])
def test_packed_conv_equals_the_module(spec):
    conv = nn.Conv2d(spec['cin'], spec['cout'], spec['k'], spec['stride'], spec['padding'],
                     groups=spec['groups'])
    for fmt in (torch.channels_last, torch.contiguous_format):
        x = torch.randn(2, spec['cin'], *spec['hw']).contiguous(memory_format=fmt)
        with torch.no_grad():
            y = conv2d(conv, x)
            ref = conv(x)
            w2 = conv.weight * 0.5  # explicit weight/bias under their own key
            y2 = conv2d(conv, x, w2, conv.bias, key='half')
            ref2 = F.conv2d(x, w2, conv.bias, conv.stride, conv.padding, groups=conv.groups)
            fused = conv2d(conv, x, gelu=True)  # GELU as the conv's post-op
        assert torch.allclose(fused, F.gelu(ref), atol=1e-4, rtol=1e-4)
        assert y.shape == ref.shape and torch.allclose(y, ref, atol=1e-4, rtol=1e-4)
        assert torch.allclose(y2, ref2, atol=1e-4, rtol=1e-4)


@needs_packed
def test_reordered_weights_follow_updates_and_stay_out_of_copies():
    layer = nn.Linear(16, 8)
    x = torch.randn(5, 16)
    with torch.no_grad():
        before = linear_module(layer, x)
        layer.load_state_dict({'weight': torch.randn(8, 16), 'bias': torch.zeros(8)})
        after = linear_module(layer, x)
        expected_after = F.linear(x, layer.weight, layer.bias)
        for _ in range(3):  # replaced, not updated in place, with no forward between
            layer.weight.data = torch.randn(8, 16)
        replaced = linear_module(layer, x)
        expected_replaced = F.linear(x, layer.weight, layer.bias)
    assert not torch.allclose(before, after)
    assert torch.allclose(after, expected_after, atol=1e-5)
    assert torch.allclose(replaced, expected_replaced, atol=1e-5)
    # the cache is outside the module: deep copies and pickles never see it
    clone = copy.deepcopy(layer)
    pickle.dumps(layer)
    with torch.no_grad():
        assert torch.allclose(linear_module(clone, x), replaced)


@pytest.mark.filterwarnings('ignore::FutureWarning', 'ignore::torch.jit.TracerWarning')
def test_autograd_and_tracing_use_plain_aten_ops():
    layer = nn.Linear(16, 8)
    x = torch.randn(5, 16, requires_grad=True)
    assert not packed_applies(x)  # autograd on
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        assert not packed_applies(x)  # autocast picks the dtypes
        assert linear_module(layer, x).dtype == torch.bfloat16
    linear_module(layer, x).sum().backward()
    assert layer.weight.grad is not None and x.grad is not None

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = layer

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return linear_module(self.layer, t)
    with torch.no_grad():
        traced = torch.jit.trace(Wrapped(), torch.randn(5, 16))
    graph = str(traced.graph)
    assert 'mkldnn::' not in graph and ('aten::linear' in graph or 'aten::_convolution' in graph)


def test_switch_off_by_environment(monkeypatch):
    monkeypatch.setenv('DIT_MM_NO_PACKED', '1')
    onednn.packed_ops_available.cache_clear()
    try:
        with torch.no_grad():
            assert not packed_applies(torch.randn(3, 4))
            layer = nn.Linear(4, 2)
            x = torch.randn(3, 4)
            assert torch.allclose(linear(x, layer.weight, layer.bias, owner=layer),
                                  layer(x), atol=1e-6)
    finally:
        monkeypatch.delenv('DIT_MM_NO_PACKED')
        onednn.packed_ops_available.cache_clear()


@needs_packed
def test_small_gemms_take_f_linear_and_large_ones_the_reordered_weights(monkeypatch):
    monkeypatch.setattr(onednn, 'PLAIN_MACS', 2 ** 19)
    small, large = nn.Linear(64, 64), nn.Linear(512, 2048)
    with torch.no_grad():
        x = torch.randn(16, 64)
        assert torch.equal(linear_module(small, x), F.linear(x, small.weight, small.bias))
        assert 'linear' not in cache._PREPARED.get(small, {})
        y = torch.randn(1, 512)
        out = linear_module(large, y)
        assert 'linear' in cache._PREPARED[large]  # 1 x 512 x 2048: reordered
    assert torch.allclose(out, F.linear(y, large.weight, large.bias), atol=1e-4)
    w = torch.empty(1280, 320)
    assert onednn.plain_is_faster(1, w) and not onednn.plain_is_faster(4, w)
