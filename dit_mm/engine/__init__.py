"""mmengine integration: the budget and seed hooks, CPU mixed precision and
distributed training, resuming mmengine checkpoints.

* :mod:`.hooks`: ``BudgetLossHook`` and ``IterSeedHook`` (``HOOKS``);
* :mod:`.calibration`: the gate offset at which a model spends a budget
  (the hook runs it at the end of training; ``tools/calibrate_budget.py``);
* :mod:`.data`: a config's images as inference sees them (training images
  through the test pipeline);
* :mod:`.backbone`: ``find_dit``, the DiT inside a wrapped model;
* :mod:`.tta`: ``DetMaskTTAModel`` (``MODELS``), test-time augmentation
  for detectors with instance masks;
* :mod:`.runtime`: ``CPUAmpOptimWrapper`` (``OPTIM_WRAPPERS``), the CPU DDP
  wrapper (``MODEL_WRAPPERS``), ``enable_amp``, ``setup_distributed``,
  ``allow_mmengine_checkpoints``, ``keep_freed_memory``.
"""
from .backbone import find_dit
from .hooks import BudgetLossHook, IterSeedHook, install_budget_loss
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
