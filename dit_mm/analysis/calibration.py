"""What a trained DiT really spends, and the gate offset that makes it spend
a budget: the engine of ``tools/calibrate_budget.py`` and
``tools/budget_sweep.py``. The calibration itself lives in
:mod:`dit_mm.engine.calibration` (``BudgetLossHook`` runs it at the end of
training) and is re-exported here; this module adds the images: a config's
split through its test pipeline and the model's data preprocessor, exactly
as inference sees them.
"""
from __future__ import annotations

import torch
from mmengine.config import Config
from torch import nn

from ..engine.calibration import (
    Calibration,
    Progress,
    apply_calibration,
    calibrate,
    offset_applied,
    spend,
    spend_and_keep_at,
    spend_at,
    spends,
)
from .data import iter_dataset_images

__all__ = ['Calibration', 'Progress', 'apply_calibration', 'calibrate', 'collect_inputs',
           'offset_applied', 'spend', 'spend_and_keep_at', 'spend_at', 'spends']


def collect_inputs(cfg: Config, model: nn.Module, split: str = 'train',
                   num_images: int | None = None) -> list[torch.Tensor]:
    """Preprocessed backbone inputs ``(1, C, H, W)`` of the first
    ``num_images`` images of ``split`` (``'train'``: the training images
    through the test pipeline).

    Raises:
        ValueError: if the split has no images.
    """
    inputs = [batch['inputs'] for batch in iter_dataset_images(cfg, model, split, num_images)]
    if not inputs:
        raise ValueError(f'the {split} split of the config has no images')
    return inputs


