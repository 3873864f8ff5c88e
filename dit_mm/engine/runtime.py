"""Runtime glue for mmengine on any machine: CPU distributed training, CPU
mixed precision and resuming mmengine checkpoints on torch >= 2.6.

Used by ``tools/train.py`` and ``tools/test.py``; importing :mod:`dit_mm`
applies :func:`allow_mmengine_checkpoints` and registers
``CPUAmpOptimWrapper``.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.distributed as dist
from mmengine.config import Config
from mmengine.model import MMDistributedDataParallel, is_model_wrapper, revert_sync_batchnorm
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


#: Where :class:`CPUAmpOptimWrapper` autocasts (its ``scope`` argument).
AUTOCAST_SCOPES = ('features', 'model')


@OPTIM_WRAPPERS.register_module()
class CPUAmpOptimWrapper(OptimWrapper):
    """Mixed precision on the CPU: ``torch.autocast('cpu', bfloat16)`` in the
    training forward (mmengine's ``AmpOptimWrapper`` needs CUDA). bf16 has
    fp32's range, so no loss scaling is needed.

    **Where it autocasts.** With ``scope='features'`` (the default) only the
    model's ``backbone`` and ``neck`` run under autocast; what leaves each of
    them is cast back to float32, and the heads, their box maths and losses
    run in float32. Autocasting the whole forward (``scope='model'``, what
    this wrapper did before) breaks two-stage detectors: mmcv's CPU ``nms``
    (the RPN's ``batched_nms``) and ``RoIAlign`` have no bf16 kernels
    ("expected scalar type Float but found BFloat16" in Mask R-CNN and
    Cascade Mask R-CNN, "ROIAlign_forward not implemented for 'BFloat16'" in
    Sparse R-CNN). Casting to float32 around each mmcv op instead would
    leave the heads' box maths in bf16, whose 8-bit mantissa resolves a
    coordinate near 1000 px only to 4 px, and the next head with an op
    without a bf16 kernel would fail again. The backbone and the neck are
    convolutions, GEMMs and attention, where bf16 pays; the heads run as
    they do without ``--amp``. Tested with every detector family that has
    configs here (Mask R-CNN, RetinaNet, Cascade Mask R-CNN, ATSS, GFL,
    Sparse R-CNN), Semantic FPN and the toy classifier. A model without a
    ``backbone`` is autocast as a whole. DiT's gates, gate probabilities
    and budget term stay float32 inside the autocast region.

    ``scope='model'`` autocasts the whole forward, heads included: for
    models whose heads have bf16 CPU kernels throughout (Semantic FPN, the
    classifiers and the one-stage detectors here train that way); it fails
    for the two-stage detectors above.

    Args:
        dtype: Autocast dtype, ``'bfloat16'`` (default) or ``'float16'``.
        scope: ``'features'`` (default: backbone and neck) or ``'model'``
            (the whole forward).
        *args, **kwargs: Passed to mmengine's ``OptimWrapper``.

    Raises:
        ValueError: for another ``dtype`` or ``scope``.
    """

    def __init__(self, *args, dtype: str = 'bfloat16', scope: str = 'features',
                 **kwargs) -> None:
        if dtype not in ('bfloat16', 'float16'):
            raise ValueError(f"CPUAmpOptimWrapper: dtype={dtype!r}; use 'bfloat16' (or "
                             "'float16')")
        if scope not in AUTOCAST_SCOPES:
            raise ValueError(f'CPUAmpOptimWrapper: scope={scope!r}; use one of '
                             f'{AUTOCAST_SCOPES} (see its docstring)')
        super().__init__(*args, **kwargs)
        self.cast_dtype = getattr(torch, dtype)
        self.scope = scope

    @contextmanager
    def optim_context(self, model: torch.nn.Module) -> Iterator[None]:
        """mmengine's context (gradient accumulation), with autocast in the
        modules that :attr:`scope` names, for the forward run inside it."""
        inner = model.module if is_model_wrapper(model) else model
        parts = [getattr(inner, name, None) for name in ('backbone', 'neck')]
        parts = [m for m in parts if isinstance(m, torch.nn.Module)]
        with super().optim_context(model):
            if self.scope == 'model' or getattr(inner, 'backbone', None) is None:
                with torch.autocast('cpu', dtype=self.cast_dtype):
                    yield
                return
            handles = []
            try:
                for module in parts:
                    region = _AutocastRegion(self.cast_dtype)
                    handles.append(module.register_forward_pre_hook(region.enter))
                    handles.append(module.register_forward_hook(region.exit, always_call=True))
                yield
            finally:
                for handle in handles:
                    handle.remove()


class _AutocastRegion:
    """CPU autocast from a module's forward pre-hook to its forward hook
    (registered with ``always_call=True``, so it also ends when the forward
    raises); the module's floating outputs leave it as float32."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.active: list = []  # one context per call in flight (re-entrant)

    def enter(self, module: torch.nn.Module, args: tuple) -> None:
        ctx = torch.autocast('cpu', dtype=self.dtype)
        ctx.__enter__()
        self.active.append(ctx)

    def exit(self, module: torch.nn.Module, args: tuple, output: Any) -> Any:
        if self.active:  # empty only if an earlier pre-hook raised before enter()
            self.active.pop().__exit__(None, None, None)
        return _to_float32(output)


def _to_float32(obj: Any) -> Any:
    """``obj`` with its half-precision tensors (also inside tuples, lists and
    dicts) cast to float32; anything else is returned as it is."""
    if torch.is_tensor(obj):
        return obj.float() if obj.dtype in (torch.bfloat16, torch.float16) else obj
    if isinstance(obj, (tuple, list)):
        items = [_to_float32(o) for o in obj]
        return type(obj)(*items) if hasattr(obj, '_fields') else type(obj)(items)
    if isinstance(obj, dict):
        return type(obj)((k, _to_float32(v)) for k, v in obj.items())
    return obj


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
    """Tells glibc's ``malloc`` to keep freed memory for reuse (CPU inference
    and training).

    By default glibc serves large blocks with fresh ``mmap`` pages and returns
    freed heap tops to the kernel, so every forward page-faults its
    activations back in: at 224x224, batch 1, a DiT-b2 full-grid forward took
    ~40k minor faults and ~25 % of its time in the kernel. This serves every
    block from the heap (``M_MMAP_MAX = 0``; raising ``M_MMAP_THRESHOLD``
    alone is capped at 32 MiB, and a 512x512 stage-1 hidden map is just above
    it: the dense grid then still took 0-12k faults per forward, varying
    between processes) and disables trimming (``M_TRIM_THRESHOLD = -1``, which
    ``mallopt(3)`` documents as "disables trimming completely"), the runtime
    equivalent of ``MALLOC_MMAP_MAX_=0`` with trimming off. The process then
    keeps its peak heap. Call it before the first large allocation.

    The largest positive threshold ``mallopt`` takes is ``2**31 - 1``, and a
    training step frees more than that: with it, the full grid of DiT-b2 at
    512x512, batch 2, page-faulted 540-660k pages back in at every step
    (4.9-5.8 s per step), and the static steps interleaved with it 0-120k
    (1.42-1.61 s); never trimming, 3.7 s and 1.35-1.37 s once the heap had
    settled (Intel Xeon, 2 threads).

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
    return bool(ok and mallopt(m_trim_threshold, -1) == 1)  # -1: never trim
