"""Helpers for tests that build real mmdet/mmseg models and Runners on the
generated toy data set."""
from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from types import ModuleType

from mmengine.config import Config

ROOT = Path(__file__).resolve().parents[1]
DET_TOY = ROOT / 'configs/detection/mask_rcnn_dit_b0_toy.py'
SEG_TOY = ROOT / 'configs/segmentation/fpn_dit_b0_toy.py'


def load_tool(name: str) -> ModuleType:
    """``tools/<name>.py`` imported as a module (to call its ``main(argv)``)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / 'tools' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def det_toy_cfg(data_root: Path, work_dir: Path, iters: int = 2, **overrides) -> Config:
    """The toy Mask R-CNN config pointed at ``data_root`` (a generated toy set),
    shrunk to ``iters`` iterations without validation."""
    cfg = Config.fromfile(str(DET_TOY))
    coco = str(Path(data_root) / 'coco') + '/'
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[loader].dataset.data_root = coco
    cfg.val_evaluator.ann_file = coco + 'annotations/instances_val.json'
    cfg.test_evaluator = copy.deepcopy(cfg.val_evaluator)
    shrink(cfg, work_dir, iters)
    cfg.merge_from_dict(overrides)
    return cfg


def seg_toy_cfg(data_root: Path, work_dir: Path, iters: int = 2, **overrides) -> Config:
    cfg = Config.fromfile(str(SEG_TOY))
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[loader].dataset.data_root = str(Path(data_root) / 'seg')
    shrink(cfg, work_dir, iters)
    cfg.merge_from_dict(overrides)
    return cfg


def shrink(cfg: Config, work_dir: Path, iters: int) -> None:
    """Few iterations, no validation, logs every iteration, no checkpoints."""
    cfg.work_dir = str(work_dir)
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=iters, val_interval=10 ** 6)
    cfg.val_cfg = None
    cfg.val_dataloader = None
    cfg.val_evaluator = None
    cfg.param_scheduler = []
    cfg.default_hooks.logger = dict(type='LoggerHook', interval=1)
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=10 ** 6)
    cfg.default_hooks.pop('visualization', None)
    cfg.log_level = 'WARNING'
    cfg.train_dataloader.sampler = dict(type='InfiniteSampler', shuffle=True)
    cfg.train_dataloader.pop('batch_sampler', None)
