"""dit_mm: DiT (Dynamic Token Routing) backbones for MMDetection and MMSegmentation.

Importing the package registers ``DiT`` in mmengine's root ``MODELS`` registry
(found from the mmdet and mmseg scopes), ``BudgetLossHook`` in the root
``HOOKS`` registry and ``CPUAmpOptimWrapper`` in ``OPTIM_WRAPPERS``, and lets
``torch.load`` read mmengine checkpoints (resume). Use it from a config with
``custom_imports = dict(imports=['dit_mm'], allow_failed_imports=False)``.
"""
from .engine import BudgetLossHook, CPUAmpOptimWrapper, IterSeedHook, allow_mmengine_checkpoints
from .models import ARCH_SETTINGS, DiT, GridSpec, check_budget, resolve_arch

__all__ = ['DiT', 'BudgetLossHook', 'IterSeedHook', 'CPUAmpOptimWrapper', 'GridSpec',
           'ARCH_SETTINGS', 'resolve_arch', 'check_budget']
__version__ = '0.1.0'

allow_mmengine_checkpoints()
