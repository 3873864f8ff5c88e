"""The CPU executor: float32 CPU tensors.

* :mod:`.onednn`: GEMMs and convolutions through oneDNN with weights
  reordered once (``DIT_MM_NO_PACKED=1`` turns the reordered path off);
* :mod:`.sparse_ops`: the C++ extension (built at first use from
  ``csrc/``): the depthwise 3x3 conv + GELU at kept tokens, the neighbour
  table, row scatter (``DIT_MM_NO_EXT=1``: no extension, so no stage
  program either);
* :mod:`.masked_ops`: the masked training path's node output (final norm
  and held rows) in one C++ pass each way, from the same extension;
* :mod:`.native_stage`: a grid node's packed forward as one C++ call
  (``DIT_MM_NO_NATIVE=1`` or ``RoutedStage.native = False`` turn it off);
* :mod:`.packed`: :func:`run_node`, the node forward on the kept tokens (the
  stage program where it applies, else a packed path in Python with the
  CPU's training tricks).

This package is what :mod:`dit_mm.accel` registers for ``'cpu'``: the names
below are the executor interface (:data:`dit_mm.accel.EXECUTOR_API`). Each
function handles what it covers and falls back to
:mod:`dit_mm.accel.reference` otherwise (``run_node``: to ``None``, the
model's own path).
"""
from typing import Optional

import torch
import torch.nn as nn

from . import onednn
from .masked_ops import held_norm, masked_linear
from .native_stage import forget
from .onednn import linear, linear_module
from .packed import run_node
from .sparse_ops import dwconv_gelu_map, training_dwconv_applies

#: The dtypes the seam hands to this executor.
DTYPES = (torch.float32,)


def conv2d(conv: nn.Conv2d, x: torch.Tensor, weight: Optional[torch.Tensor] = None,
           bias: Optional[torch.Tensor] = None, key: str = 'conv',
           gelu: bool = False) -> torch.Tensor:
    """:func:`.onednn.conv2d`, except the MLP's depthwise conv + GELU under
    autograd (training), which runs the fused C++ kernel of
    :func:`.sparse_ops.dwconv_gelu_map` on the whole map."""
    if gelu and weight is None and training_dwconv_applies(conv, x):
        return dwconv_gelu_map(conv, x)
    return onednn.conv2d(conv, x, weight, bias, key, gelu)


__all__ = ['DTYPES', 'run_node', 'linear', 'linear_module', 'conv2d', 'masked_linear',
           'held_norm', 'forget']
