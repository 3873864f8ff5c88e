"""Runtime glue for mmengine on any machine: CPU distributed training, CPU
mixed precision and resuming mmengine checkpoints on torch >= 2.6.

Used by ``tools/train.py`` and ``tools/test.py``; importing :mod:`dit_mm`
applies :func:`allow_mmengine_checkpoints` and registers
``CPUAmpOptimWrapper``.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist
from mmengine.config import Config
from mmengine.model import MMDistributedDataParallel, revert_sync_batchnorm
from mmengine.optim import OptimWrapper
from mmengine.registry import MODEL_WRAPPERS, OPTIM_WRAPPERS


def allow_mmengine_checkpoints() -> None:
    """Lets ``torch.load(weights_only=True)`` (the default since torch 2.6)
    read mmengine's own checkpoints.

    mmengine 0.10.7 calls ``torch.load`` without ``weights_only``; its
    checkpoints hold a ``MessageHub`` state with ``HistoryBuffer`` objects and
    numpy scalars/arrays, which the safe unpickler rejects ("Unsupported
    global ... HistoryBuffer"). They are plain data containers, so they are
    allow-listed here instead of switching the safe loader off.
    """
    import numpy as np
    from mmengine.logging import HistoryBuffer
    from mmengine.runner.checkpoint import CheckpointLoader
    from numpy._core import multiarray

    safe = [HistoryBuffer, np.dtype, np.ndarray, multiarray.scalar, multiarray._reconstruct]
    safe += [type(np.dtype(t)) for t in ('float64', 'float32', 'int64', 'int32', 'bool')]
    torch.serialization.add_safe_globals(safe)
    CheckpointLoader.register_scheme(prefixes='', force=True)(_load_local_checkpoint)


def _load_local_checkpoint(filename: str, map_location=None):
    """mmengine's local-file checkpoint loader, with ``builtins.getattr``
    allowed while it runs: ``HistoryBuffer`` pickles its statistics methods
    as ``getattr(HistoryBuffer, name)``. The safe unpickler still refuses to
    call anything that is not allow-listed."""
    filename = os.path.expanduser(filename)
    if not os.path.isfile(filename):
        raise FileNotFoundError(f'{filename} can not be found.')
    with torch.serialization.safe_globals([getattr]):
        return torch.load(filename, map_location=map_location)


@OPTIM_WRAPPERS.register_module()
class CPUAmpOptimWrapper(OptimWrapper):
    """Mixed precision on the CPU: ``torch.autocast('cpu', bfloat16)`` around
    the forward (mmengine's ``AmpOptimWrapper`` needs CUDA). bf16 has fp32's
    range, so no loss scaling is needed.

    Args:
        dtype: Autocast dtype, ``'bfloat16'`` (default) or ``'float16'``.
    """

    def __init__(self, *args, dtype: str = 'bfloat16', **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.cast_dtype = getattr(torch, dtype)

    @contextmanager
    def optim_context(self, model: torch.nn.Module) -> Iterator[None]:
        with super().optim_context(model), torch.autocast('cpu', dtype=self.cast_dtype):
            yield


@MODEL_WRAPPERS.register_module()
class MMCPUDistributedDataParallel(MMDistributedDataParallel):
    """mmengine's DDP wrapper for CPU modules: ``device_ids=None`` and
    ``SyncBatchNorm`` (CUDA only, used by mmseg's heads) reverted to
    ``BatchNorm``, as mmengine does for non-distributed runs. Batch-norm
    statistics are then per process."""

    def __init__(self, module: torch.nn.Module, detect_anomalous_params: bool = False,
                 **kwargs) -> None:
        kwargs['device_ids'] = None
        super().__init__(module=revert_sync_batchnorm(module),
                         detect_anomalous_params=detect_anomalous_params, **kwargs)


def enable_amp(cfg: Config) -> None:
    """Switches ``cfg.optim_wrapper`` to mixed precision: mmengine's
    ``AmpOptimWrapper`` on CUDA, :class:`CPUAmpOptimWrapper` on the CPU."""
    wrapper = cfg.optim_wrapper.get('type', 'OptimWrapper')
    if wrapper in ('AmpOptimWrapper', 'CPUAmpOptimWrapper'):
        return
    if wrapper != 'OptimWrapper':
        raise ValueError(f'--amp: optim_wrapper type {wrapper!r} is not OptimWrapper; '
                         'set the mixed-precision wrapper in the config yourself')
    if torch.cuda.is_available():
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')
    else:
        cfg.optim_wrapper.type = 'CPUAmpOptimWrapper'
        cfg.optim_wrapper.setdefault('dtype', 'bfloat16')


def setup_distributed(cfg: Config, launcher: str) -> None:
    """Prepares ``cfg`` for mmengine's launchers, on any machine.

    * Without CUDA (``pytorch`` launcher): mmengine's ``init_dist`` calls
      ``torch.cuda.set_device`` and its DDP wrapper passes
      ``device_ids=[LOCAL_RANK]``; both fail on CPU-only machines. This
      initialises the gloo process group itself (mmengine then skips its own
      ``init_dist``) and wraps the model with
      :class:`MMCPUDistributedDataParallel` (``device_ids=None``).
    * DiT in ``routing='dynamic'`` trains every parameter in every iteration
      (the masked training path runs all nodes, see docs/design.md), so DDP
      needs no ``find_unused_parameters``. With ``routing='static'``,
      ``scale_routing=False`` or ``sparse_training=True``, skipped nodes get
      no gradient, and ``find_unused_parameters=True`` is set.
    """
    cfg.launcher = launcher
    if launcher == 'none':
        return
    wrapper = cfg.get('model_wrapper_cfg') or dict(type='MMDistributedDataParallel')
    backbone = cfg.get('model', {}).get('backbone', {})
    if backbone.get('type') == 'DiT' and (backbone.get('routing', 'dynamic') == 'static'
                                          or not backbone.get('scale_routing', True)
                                          or backbone.get('sparse_training', False)):
        wrapper.setdefault('find_unused_parameters', True)
    if torch.cuda.is_available():
        cfg.model_wrapper_cfg = wrapper
        return
    if launcher != 'pytorch':
        raise ValueError(f'--launcher {launcher} needs CUDA; on the CPU use pytorch (torchrun)')
    if not dist.is_initialized():
        dist.init_process_group(backend='gloo', rank=int(os.environ['RANK']),
                                world_size=int(os.environ['WORLD_SIZE']))
    if wrapper.get('type', 'MMDistributedDataParallel') == 'MMDistributedDataParallel':
        wrapper['type'] = 'MMCPUDistributedDataParallel'
    wrapper['device_ids'] = None
    cfg.model_wrapper_cfg = wrapper  # Config stores a copy: assign when complete
    cfg.setdefault('env_cfg', {}).setdefault('dist_cfg', {})['backend'] = 'gloo'


def keep_freed_memory() -> bool:
    """Tells glibc's ``malloc`` to keep freed memory for reuse (CPU inference).

    By default glibc serves large blocks with fresh ``mmap`` pages and returns
    freed heap tops to the kernel, so every forward page-faults its
    activations back in: at 224x224, batch 1, a DiT-b2 full-grid forward took
    ~40k minor faults and ~25 % of its time in the kernel. This serves every
    block from the heap (``M_MMAP_MAX = 0``; raising ``M_MMAP_THRESHOLD``
    alone is capped at 32 MiB, and a 512x512 stage-1 hidden map is just above
    it: the dense grid then still took 0-12k faults per forward, varying
    between processes) and disables trimming, the runtime equivalent of
    ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...``. The process then keeps
    its peak heap. Call it before the first large allocation.

    Returns:
        Whether both settings took effect (``False`` off glibc).
    """
    import ctypes
    import ctypes.util
    name = ctypes.util.find_library('c')
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    ok = mallopt(m_mmap_max, 0) == 1
    return bool(ok and mallopt(m_trim_threshold, 2 ** 31 - 1) == 1)
