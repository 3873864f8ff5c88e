"""Data loaders built from a config, as inference sees the images: the
training set through the *test* pipeline (no augmentation), one image per
batch. Used by the end-of-training calibration (:mod:`.calibration`) and by
the analysis tools (:mod:`dit_mm.analysis.data`)."""
from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

from mmengine.config import Config
from torch import nn


def loader_cfg(cfg: Config, split: str) -> dict:
    """The data loader config of ``split``. ``'train'`` is the training set
    read through the *test* pipeline (no augmentation), as inference sees it."""
    key = {'val': 'val_dataloader', 'test': 'test_dataloader',
           'train': 'train_dataloader'}.get(split)
    if key is None:
        raise ValueError(f"split={split!r} must be 'train', 'val' or 'test'")
    if cfg.get(key) is None:
        raise ValueError(f'the config has no {key}')
    if split != 'train':
        return cfg[key]
    loader = copy.deepcopy(cfg[key])
    inner = loader['dataset']
    while 'pipeline' not in inner and 'dataset' in inner:  # RepeatDataset & co.
        inner = inner['dataset']
    inner['pipeline'] = test_pipeline(cfg, 'val' if cfg.get('val_dataloader') else 'test')
    loader['dataset'] = inner  # without the wrappers: each image once
    return loader


def test_pipeline(cfg: Config, split: str = 'val') -> list[dict]:
    """The pipeline of the ``split`` data loader (``'val'`` or ``'test'``),
    else the config's ``test_pipeline``."""
    ds_cfg = loader_cfg(cfg, split)['dataset']
    while 'pipeline' not in ds_cfg and 'dataset' in ds_cfg:  # dataset wrappers
        ds_cfg = ds_cfg['dataset']
    pipeline = ds_cfg.get('pipeline') or cfg.get('test_pipeline')
    if not pipeline:
        raise ValueError(f'no test pipeline found in the {split} data loader of the config')
    return [dict(t) for t in pipeline]


def image_loader(cfg: Config, split: str = 'val') -> Any:
    """A data loader of ``split``, one image per batch, in order, through
    the config's test pipeline (``'train'``: the training images, without
    augmentation). The config's default scope must be set (it is inside a
    runner)."""
    from mmengine.runner import Runner
    cfg_loader = dict(loader_cfg(cfg, split))
    cfg_loader.update(batch_size=1, num_workers=0, persistent_workers=False,
                      sampler={'type': 'DefaultSampler', 'shuffle': False})
    return Runner.build_dataloader(cfg_loader)


def iter_images(loader: Any, model: nn.Module | None = None,
                num_images: int | None = None) -> Iterator[dict[str, Any]]:
    """The first ``num_images`` batches of ``loader`` (:func:`image_loader`),
    through ``model.data_preprocessor(data, False)`` when ``model`` is given."""
    if num_images is not None and num_images <= 0:
        return
    for k, data in enumerate(loader):
        yield model.data_preprocessor(data, False) if model is not None else data
        if num_images is not None and k + 1 >= num_images:
            break
