"""Routing of a DiT forward: the grid's nodes in execution order, switching
the routing mode temporarily, and the per-node kept-token masks the
visualisation draws.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..models.backbone import DiT
from ..models.grid import NUM_SCALES, Node, feature_sizes


def grid_nodes() -> list[Node]:
    """The 10 nodes ``(scale i, stage j)``, ``i <= j``, in execution order."""
    return [(i, j) for j in range(NUM_SCALES) for i in range(j + 1)]



@contextlib.contextmanager
def routing_mode(backbone: DiT, routing: str) -> Iterator[DiT]:
    """Temporarily switches ``backbone.routing`` (e.g. to ``'static'``)."""
    old = backbone.routing
    backbone.routing = routing
    try:
        yield backbone
    finally:
        backbone.routing = old



def node_masks(backbone: DiT) -> dict[Node, torch.Tensor | None]:
    """Per node of the last forward: a boolean ``(h, w)`` map of computed
    tokens of image 0 (all True for a node that ran without a gate), or
    ``None`` for a node whose row edge did not run."""
    rec = backbone.last_record
    if rec is None:
        raise RuntimeError('run the model first: the backbone has no routing record')
    sizes = feature_sizes(*rec.size)
    out: dict[Node, torch.Tensor | None] = {}
    for node in grid_nodes():
        if node in rec.masks:
            out[node] = rec.masks[node][0].detach().cpu()
        elif node in rec.rows:
            out[node] = torch.ones(sizes[node[0]], dtype=torch.bool)
        else:
            out[node] = None
    return out
