"""Topology of the DiT routing grid.

The grid is PVTv2 unrolled into response maps ``F[i][j]``: ``i`` is the scale
level (stride ``4 * 2**i``), ``j`` the stage. It is triangular: scale ``i``
exists from stage ``i`` on, so stage ``j`` holds the scales ``0..j``.

Inside stage ``j``:

* **column edges** come first, scale by scale from fine to coarse. Scale ``j``
  is new in this stage and has a single input, the patch embedding of scale
  ``j-1``; that edge is mandatory (no gate), so a map never starts empty. An
  existing scale ``0 < i < j`` *adds* the embedding of scale ``i-1`` behind a
  per-image column gate (paper eq. 4, the ``G_col * P(F[i-1][j])`` term).
* **row edges** follow: every scale ``i <= j`` runs its blocks ``B[i][j]``
  behind a per-token row gate, tokens with gate 0 take the identity path.

PVTv2's own path is the diagonal (scale ``j`` at stage ``j``): with
``routing='static'`` only the diagonal runs, every token, and DiT computes
exactly PVTv2. See ``docs/design.md``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Sequence, Tuple, Union

NUM_SCALES = 4
ROUTING_MODES = ('dynamic', 'static', 'full')
GATE_TYPES = ('learned', 'random', 'attention')

# PVTv2-B0..B5 (Wang et al., 2022): widths, heads, SR ratios, MLP ratios, depths.
_PVT_COMMON = dict(num_heads=(1, 2, 5, 8), sr_ratios=(8, 4, 2, 1), mlp_ratios=(8, 8, 4, 4))
ARCH_SETTINGS: Dict[str, Dict[str, Any]] = {
    'b0': dict(_PVT_COMMON, embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2)),
    'b1': dict(_PVT_COMMON, embed_dims=(64, 128, 320, 512), depths=(2, 2, 2, 2)),
    'b2': dict(_PVT_COMMON, embed_dims=(64, 128, 320, 512), depths=(3, 4, 6, 3)),
    'b3': dict(_PVT_COMMON, embed_dims=(64, 128, 320, 512), depths=(3, 4, 18, 3)),
    'b4': dict(_PVT_COMMON, embed_dims=(64, 128, 320, 512), depths=(3, 8, 27, 3)),
    'b5': dict(_PVT_COMMON, embed_dims=(64, 128, 320, 512), depths=(3, 6, 40, 3),
               mlp_ratios=(4, 4, 4, 4)),
}

Node = Tuple[int, int]  # (scale i, stage j)


def node_key(i: int, j: int) -> str:
    """Module-dict key of node (scale ``i``, stage ``j``)."""
    return f's{i}_t{j}'


@dataclass(frozen=True)
class GridSpec:
    """Resolved architecture of a DiT grid.

    Args:
        embed_dims: Channels per scale.
        num_heads: Attention heads per scale.
        sr_ratios: Spatial-reduction ratio of the attention per scale.
        mlp_ratios: MLP hidden ratio per scale.
        depths: Blocks per scale on the PVTv2 diagonal.
        grid_depths: ``((i, j), depth)`` pairs for off-diagonal nodes
            ``i < j``; a node not listed has the diagonal depth of its scale.
    """

    embed_dims: Tuple[int, ...]
    num_heads: Tuple[int, ...]
    sr_ratios: Tuple[int, ...]
    mlp_ratios: Tuple[float, ...]
    depths: Tuple[int, ...]
    grid_depths: Tuple[Tuple[Node, int], ...] = ()

    @property
    def nodes(self) -> List[Node]:
        """All row nodes ``(i, j)`` with ``i <= j``, in execution order."""
        return [(i, j) for j in range(NUM_SCALES) for i in range(j + 1)]

    @property
    def optional_column_edges(self) -> List[Node]:
        """Gated column edges into ``(i, j)``, ``0 < i < j``."""
        return [(i, j) for j in range(NUM_SCALES) for i in range(1, j)]

    def depth(self, i: int, j: int) -> int:
        """Number of blocks of node ``(i, j)``."""
        if i == j:
            return self.depths[i]
        return dict(self.grid_depths).get((i, j), self.depths[i])


def _check_tuple(name: str, value: Sequence, kind: type) -> Tuple:
    if not isinstance(value, (list, tuple)) or len(value) != NUM_SCALES:
        raise ValueError(f'arch[{name!r}] must be a list of {NUM_SCALES} values (one per '
                         f'scale), got {value!r}')
    if not all(isinstance(v, (int, float)) and v > 0 for v in value):
        raise ValueError(f'arch[{name!r}] must hold positive numbers, got {value!r}')
    return tuple(kind(v) for v in value)


def resolve_arch(arch: Union[str, Mapping[str, Any]]) -> GridSpec:
    """Turns ``'b0'..'b5'`` or a custom dict into a :class:`GridSpec`.

    A custom dict needs ``embed_dims``, ``num_heads``, ``sr_ratios``,
    ``mlp_ratios`` and ``depths`` (4 values each), and may add
    ``grid_depths``: a mapping ``{(i, j): depth}`` or a 4x4 nested list whose
    entries ``[i][j]`` with ``i < j`` give the off-diagonal node depths.

    Raises:
        ValueError: for an unknown name or a malformed dict, naming what is
            allowed.
    """
    if isinstance(arch, str):
        key = arch.lower().replace('pvt_v2_', '').replace('dit_', '').replace('dit-', '')
        if key not in ARCH_SETTINGS:
            raise ValueError(f'Unknown DiT arch {arch!r}; choose one of '
                             f'{sorted(ARCH_SETTINGS)} or pass a dict with keys '
                             'embed_dims, num_heads, sr_ratios, mlp_ratios, depths.')
        arch = ARCH_SETTINGS[key]
    if not isinstance(arch, Mapping):
        raise TypeError(f'arch must be a str or dict, got {type(arch).__name__}')
    required = ('embed_dims', 'num_heads', 'sr_ratios', 'mlp_ratios', 'depths')
    missing = [k for k in required if k not in arch]
    unknown = sorted(set(arch) - set(required) - {'grid_depths'})
    if missing or unknown:
        raise ValueError(f'Custom arch dict: missing keys {missing}, unknown keys {unknown}; '
                         f'expected {list(required)} (+ optional grid_depths).')
    dims = _check_tuple('embed_dims', arch['embed_dims'], int)
    heads = _check_tuple('num_heads', arch['num_heads'], int)
    for d, h in zip(dims, heads):
        if d % h:
            raise ValueError(f'embed_dims {dims} must be divisible by num_heads {heads}')
    grid_depths: Dict[Node, int] = {}
    raw = arch.get('grid_depths') or {}
    if isinstance(raw, Mapping):
        items = [(tuple(k), v) for k, v in raw.items()]
    else:
        items = [((i, j), raw[i][j]) for i in range(NUM_SCALES) for j in range(NUM_SCALES)
                 if i < j]
    for (i, j), depth in items:
        if not (0 <= i < j < NUM_SCALES) or int(depth) < 0:
            raise ValueError(f'grid_depths entry {(i, j)}: {depth} is invalid; keys are '
                             '(scale, stage) with scale < stage < 4, depths >= 0')
        grid_depths[(int(i), int(j))] = int(depth)
    return GridSpec(
        embed_dims=dims,
        num_heads=heads,
        sr_ratios=_check_tuple('sr_ratios', arch['sr_ratios'], int),
        mlp_ratios=_check_tuple('mlp_ratios', arch['mlp_ratios'], float),
        depths=_check_tuple('depths', arch['depths'], int),
        grid_depths=tuple(sorted(grid_depths.items())),
    )


def feature_sizes(height: int, width: int) -> List[Tuple[int, int]]:
    """Spatial size of each scale for an ``height x width`` input.

    Scale 0 comes from a 7x7 stride-4 conv with padding 3, every further scale
    from a 3x3 stride-2 conv with padding 1 (PVTv2's overlapping embeddings).
    """
    sizes = []
    h = (height + 2 * 3 - 7) // 4 + 1
    w = (width + 2 * 3 - 7) // 4 + 1
    sizes.append((h, w))
    for _ in range(1, NUM_SCALES):
        h = (h + 2 - 3) // 2 + 1
        w = (w + 2 - 3) // 2 + 1
        sizes.append((h, w))
    return sizes
