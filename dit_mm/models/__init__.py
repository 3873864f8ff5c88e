"""The DiT model in plain PyTorch: what it computes.

* :mod:`.grid`: the routing grid (scales x stages), architectures;
* :mod:`.gates`: row and column gates (EMA linear + Gumbel);
* :mod:`.blocks`: :class:`RoutedStage`, a grid node's PVTv2 blocks with
  dense, masked (training) and packed (inference) forwards;
* :mod:`.cost_model`: analytic FLOPs per node and edge;
* :mod:`.backbone`: :class:`DiT`, registered in mmengine's ``MODELS``;
* :mod:`.weights`: PVTv2 checkpoints -> DiT.
"""
from .backbone import DiT, RoutingRecord, check_budget
from .blocks import RoutedStage
from .grid import ARCH_SETTINGS, GridSpec, resolve_arch

__all__ = ['DiT', 'RoutingRecord', 'check_budget', 'RoutedStage', 'ARCH_SETTINGS', 'GridSpec',
           'resolve_arch']
