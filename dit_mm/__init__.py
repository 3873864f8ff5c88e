"""dit_mm: DiT (Dynamic Token Routing) backbones for MMDetection and MMSegmentation.

Importing the package registers ``DiT`` in mmengine's root ``MODELS`` registry
(found from the mmdet and mmseg scopes), ``BudgetLossHook`` in the root
``HOOKS`` registry, ``CPUAmpOptimWrapper`` in ``OPTIM_WRAPPERS`` and
``DetMaskTTAModel`` (test-time augmentation with masks) in ``MODELS``, and lets
``torch.load`` read mmengine checkpoints (resume). Use it from a config with
``custom_imports = dict(imports=['dit_mm'], allow_failed_imports=False)``.

Layout (map in ``docs/design.md``): :mod:`dit_mm.models` (the model in plain
PyTorch), :mod:`dit_mm.accel` (the dispatch seam and the executors of the
packed inference path; ``DIT_MM_ACCEL=0`` runs the reference),
:mod:`dit_mm.engine` (hooks, CPU AMP and DDP, checkpoints),
:mod:`dit_mm.analysis` (FLOPs, routing statistics), :mod:`dit_mm.datasets`
(toy data generators).
"""
from .engine import BudgetLossHook, CPUAmpOptimWrapper, IterSeedHook, allow_mmengine_checkpoints
from .models import ARCH_SETTINGS, DiT, GridSpec, check_budget, resolve_arch

__all__ = ['DiT', 'BudgetLossHook', 'IterSeedHook', 'CPUAmpOptimWrapper', 'GridSpec',
           'ARCH_SETTINGS', 'resolve_arch', 'check_budget']
__version__ = '0.1.0'

allow_mmengine_checkpoints()
