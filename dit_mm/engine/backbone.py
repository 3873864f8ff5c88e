"""The DiT backbone inside a runner's model (DDP- or TTA-wrapped)."""
from __future__ import annotations

import torch
from mmengine.model import BaseTTAModel, is_model_wrapper

from ..models.backbone import DiT


def find_dit(model: torch.nn.Module) -> DiT:
    """The DiT backbone of a (possibly DDP- or TTA-wrapped) detector/segmentor.

    Raises:
        TypeError: if the model has no DiT backbone.
    """
    while is_model_wrapper(model) or isinstance(model, BaseTTAModel):
        model = model.module
    backbone = getattr(model, 'backbone', None)
    if isinstance(model, DiT):
        return model
    if not isinstance(backbone, DiT):
        raise TypeError(
            f'BudgetLossHook needs a model whose backbone is DiT; '
            f'{type(model).__name__}.backbone is {type(backbone).__name__}. Set '
            "model.backbone=dict(type='DiT', ...) or remove the hook from custom_hooks.")
    return backbone
