import pytest

from dit_mm.models.grid import ARCH_SETTINGS, feature_sizes, resolve_arch


def test_named_archs_follow_pvtv2():
    b2 = resolve_arch('b2')
    assert b2.embed_dims == (64, 128, 320, 512) and b2.depths == (3, 4, 6, 3)
    assert resolve_arch('b5').mlp_ratios == (4, 4, 4, 4)
    assert set(ARCH_SETTINGS) == {f'b{i}' for i in range(6)}


def test_triangular_topology():
    spec = resolve_arch('b0')
    assert spec.nodes == [(0, 0), (0, 1), (1, 1), (0, 2), (1, 2), (2, 2),
                          (0, 3), (1, 3), (2, 3), (3, 3)]
    assert spec.optional_column_edges == [(1, 2), (1, 3), (2, 3)]


def test_custom_grid_depths():
    arch = dict(ARCH_SETTINGS['b0'], grid_depths={(0, 3): 1, (1, 2): 0})
    spec = resolve_arch(arch)
    assert spec.depth(0, 3) == 1 and spec.depth(1, 2) == 0 and spec.depth(0, 1) == 2
    assert spec.depth(2, 2) == 2


@pytest.mark.parametrize('arch, match', [
    ('b9', 'Unknown DiT arch'),
    (dict(embed_dims=(1, 2, 3)), 'missing keys'),
    (dict(ARCH_SETTINGS['b0'], embed_dims=(32, 64, 160)), '4 values'),
    (dict(ARCH_SETTINGS['b0'], num_heads=(3, 2, 5, 8)), 'divisible'),
    (dict(ARCH_SETTINGS['b0'], grid_depths={(2, 1): 1}), 'grid_depths'),
    (dict(ARCH_SETTINGS['b0'], colour='red'), 'unknown keys'),
])
def test_bad_arch_errors(arch, match):
    with pytest.raises(ValueError, match=match):
        resolve_arch(arch)


def test_feature_sizes_odd_input():
    assert feature_sizes(97, 131) == [(25, 33), (13, 17), (7, 9), (4, 5)]
    assert feature_sizes(32, 32) == [(8, 8), (4, 4), (2, 2), (1, 1)]
