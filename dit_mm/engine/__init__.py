"""mmengine integration: the budget and seed hooks, CPU mixed precision and
distributed training, resuming mmengine checkpoints.

* :mod:`.hooks`: ``BudgetLossHook`` and ``IterSeedHook`` (``HOOKS``);
* :mod:`.tta`: ``DetMaskTTAModel`` (``MODELS``), test-time augmentation
  for detectors with instance masks;
* :mod:`.runtime`: ``CPUAmpOptimWrapper`` (``OPTIM_WRAPPERS``), the CPU DDP
  wrapper (``MODEL_WRAPPERS``), ``enable_amp``, ``setup_distributed``,
  ``allow_mmengine_checkpoints``, ``keep_freed_memory``.
"""
from .hooks import BudgetLossHook, IterSeedHook, find_dit, install_budget_loss
from .runtime import (
    CPUAmpOptimWrapper,
    MMCPUDistributedDataParallel,
    allow_mmengine_checkpoints,
    enable_amp,
    keep_freed_memory,
    setup_distributed,
)
from .tta import DetMaskTTAModel

__all__ = ['BudgetLossHook', 'IterSeedHook', 'find_dit', 'install_budget_loss',
           'CPUAmpOptimWrapper', 'MMCPUDistributedDataParallel', 'allow_mmengine_checkpoints',
           'enable_amp', 'keep_freed_memory', 'setup_distributed', 'DetMaskTTAModel']
