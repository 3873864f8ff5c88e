"""The CPU executor: float32 CPU tensors.

* :mod:`.onednn`: GEMMs and convolutions through oneDNN with weights
  reordered once (``DIT_MM_NO_PACKED=1`` turns the reordered path off);
* :mod:`.sparse_ops`: the C++ extension (built at first use from
  ``csrc/``): the depthwise 3x3 conv + GELU at kept tokens, the neighbour
  table, row scatter (``DIT_MM_NO_EXT=1``: no extension, so no stage
  program either);
* :mod:`.native_stage`: a grid node's packed forward as one C++ call
  (``DIT_MM_NO_NATIVE=1`` or ``RoutedStage.native = False`` turn it off).

This package is what :mod:`dit_mm.accel` registers for ``'cpu'``: the names
below are the executor interface (:data:`dit_mm.accel.EXECUTOR_API`). Each
function handles what it covers and falls back to
:mod:`dit_mm.accel.reference` otherwise (``native_applies`` /
``kernel_applies`` say ``False`` where the program / kernel cannot run).
"""
import torch

from .native_stage import forget, native_applies, packed_forward
from .onednn import conv2d, linear, linear_module
from .sparse_ops import kernel_applies, neighbour_table, sparse_dwconv_gelu, write_rows

#: The dtypes the seam hands to this executor.
DTYPES = (torch.float32,)

__all__ = ['DTYPES', 'linear', 'linear_module', 'conv2d', 'write_rows', 'kernel_applies',
           'neighbour_table', 'sparse_dwconv_gelu', 'native_applies', 'packed_forward', 'forget']
