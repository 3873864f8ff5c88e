"""dit_mm: DiT (Dynamic Token Routing) backbones for MMDetection and MMSegmentation.

Importing the package registers ``DiT`` in mmengine's root ``MODELS`` registry
(found from the mmdet and mmseg scopes) and ``BudgetLossHook`` in its root
``HOOKS`` registry. Use it from a config with
``custom_imports = dict(imports=['dit_mm'], allow_failed_imports=False)``.
"""
from .backbone import DiT, check_budget
from .hooks import BudgetLossHook
from .runtime import CPUAmpOptimWrapper, allow_mmengine_checkpoints
from .grid import ARCH_SETTINGS, GridSpec, resolve_arch

__all__ = ['DiT', 'BudgetLossHook', 'GridSpec', 'ARCH_SETTINGS', 'resolve_arch', 'check_budget', 'CPUAmpOptimWrapper']
__version__ = '0.1.0'

allow_mmengine_checkpoints()
