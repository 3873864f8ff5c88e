"""Analytic per-module cost model of the DiT grid (paper eq. 5).

Costs are multiply-accumulates counted the way fvcore/mmengine's
``FlopAnalyzer`` counts them (and the way the paper and PVTv2 report
"FLOPs"): ``in * out`` per token for a linear layer, ``k*k*Cin/groups*Cout``
per output pixel for a conv, ``2*Nq*Nk*C`` for attention (``QK^T`` and
``AV``), ``5`` per element for an affine ``LayerNorm``; activations and
softmax are free.

Every node splits into a *token-wise* part, paid per kept token (query,
attention, projection, MLP linears, depthwise conv at kept positions, norms on
kept tokens) and a *map-wise* part, paid once when a node runs (the
spatial-reduction conv and key/value projection over the full map, and the
norm that feeds them). Patch embeddings are paid per image on an open
column edge. Gates are paid whenever they are evaluated.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, Tuple

from .grid import NUM_SCALES, GridSpec, Node, feature_sizes

LN = 5  # FLOPs per element of an affine LayerNorm (mmengine/fvcore convention)


@dataclass(frozen=True)
class NodeCost:
    """Cost of one grid node for one image, in FLOPs.

    Attributes:
        token: Token-wise cost of one kept token through all blocks of the
            node (multiply by the number of kept tokens).
        map: Map-wise cost paid once when the node runs.
        tokens: Number of tokens of the node's map.
        row_gate: Cost of evaluating the row gate on the whole map.
    """

    token: float
    map: float
    tokens: int
    row_gate: float

    @property
    def dense(self) -> float:
        """Cost of the node with every token kept."""
        return self.map + self.token * self.tokens


@dataclass(frozen=True)
class GridCost:
    """All analytic costs of a grid at one input size (FLOPs per image)."""

    nodes: Dict[Node, NodeCost]
    embeds: Dict[Node, float]  # patch embedding into scale i at stage j (incl. stem)
    col_gates: Dict[Node, float]

    @property
    def static(self) -> float:
        """PVTv2's cost: the diagonal, every token, no gates (``C_base``)."""
        return sum(self.embeds[(i, i)] + self.nodes[(i, i)].dense for i in range(NUM_SCALES))

    @property
    def full(self) -> float:
        """Every node, every token, every column edge (no gates)."""
        return sum(self.embeds.values()) + sum(n.dense for n in self.nodes.values())


def block_costs(n: int, hw: Tuple[int, int], dim: int, sr: int, mlp_ratio: float
                ) -> Tuple[float, float]:
    """Token-wise and map-wise FLOPs of one PVTv2 block on an ``hw`` map.

    Returns:
        ``(per kept token, per map)``.
    """
    hidden = int(dim * mlp_ratio)
    if sr > 1:
        nk = (hw[0] // sr) * (hw[1] // sr)
        map_cost = (nk * dim * dim * sr * sr  # SR conv
                    + LN * nk * dim  # SR norm
                    + nk * 2 * dim * dim  # kv
                    + LN * n * dim)  # norm1 over the full map (K/V input)
    else:
        nk = n
        map_cost = nk * 2 * dim * dim + LN * n * dim
    token = (dim * dim  # q
             + 2 * nk * dim  # QK^T and AV
             + dim * dim  # proj
             + LN * dim  # norm2
             + dim * hidden + 9 * hidden + hidden * dim)  # fc1, dwconv, fc2
    return float(token), float(map_cost)


def block_elementwise(n: int, hw: Tuple[int, int], dim: int, sr: int,
                      mlp_ratio: float) -> Tuple[float, float]:
    """The element-wise share of :func:`block_costs` (norms and the
    depthwise conv's taps): what op-level counters of matmuls, convs and
    attention (``torch.utils.flop_counter``) do not see when the depthwise
    conv runs as taps through a neighbour table (:mod:`dit_mm.models.slots`).

    Returns:
        ``(per kept token, per map)``.
    """
    hidden = int(dim * mlp_ratio)
    nk = (hw[0] // sr) * (hw[1] // sr) if sr > 1 else n
    map_cost = LN * n * dim + (LN * nk * dim if sr > 1 else 0)
    return float(LN * dim + 9 * hidden), float(map_cost)


def embed_cost(hw_out: Tuple[int, int], c_in: int, c_out: int, k: int) -> float:
    """Overlapping patch embedding: ``k x k`` conv + LayerNorm."""
    n = hw_out[0] * hw_out[1]
    return float(n * c_in * c_out * k * k + LN * n * c_out)


@lru_cache(maxsize=256)
def grid_cost(spec: GridSpec, height: int, width: int) -> GridCost:
    """Analytic costs of every module of the grid for one ``height x width``
    image (cached per size)."""
    sizes = feature_sizes(height, width)
    nodes: Dict[Node, NodeCost] = {}
    embeds: Dict[Node, float] = {}
    col_gates: Dict[Node, float] = {}
    for (i, j) in spec.nodes:
        hw = sizes[i]
        n = hw[0] * hw[1]
        dim = spec.embed_dims[i]
        tok, mp = block_costs(n, hw, dim, spec.sr_ratios[i], spec.mlp_ratios[i])
        depth = spec.depth(i, j)
        nodes[(i, j)] = NodeCost(token=depth * tok + LN * dim, map=depth * mp, tokens=n,
                                 row_gate=float(n * dim * 2))
        if i == 0:
            if j == 0:
                embeds[(0, 0)] = embed_cost(hw, 3, dim, 7)
        else:
            embeds[(i, j)] = embed_cost(hw, spec.embed_dims[i - 1], dim, 3)
            if i < j:
                hp = sizes[i - 1]
                col_gates[(i, j)] = float(hp[0] * hp[1] * spec.embed_dims[i - 1]
                                          + spec.embed_dims[i - 1] * 2)
    return GridCost(nodes=nodes, embeds=embeds, col_gates=col_gates)


def uniform_keep_for_budget(cost: GridCost, mu: float) -> float:
    """Kept-token fraction ``p`` at which every row-gated node keeping
    ``p`` of its tokens, with every column edge open and every gate
    evaluated, spends ``mu * C_base``: the keep probability that starts
    ``gate='random'`` row gates at the budget (Table 7).

    Returns:
        ``p`` in ``[1e-3, 1]``; 1e-3 when even that spends more than ``mu``
        (the map-wise and embedding costs alone exceed the budget), 1 when
        every token fits.
    """
    fixed = (sum(cost.embeds.values()) + sum(cost.col_gates.values())
             + sum(n.map + n.row_gate for n in cost.nodes.values()))
    per_keep = sum(n.token * n.tokens for n in cost.nodes.values())
    p = (mu * cost.static - fixed) / per_keep
    return float(min(1.0, max(1e-3, p)))
