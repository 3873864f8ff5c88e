"""Configs and models for the analysis tools: reading an mmdet / mmseg /
mmpretrain config, building its model with a DiT backbone in eval mode and
loading a checkpoint.
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import os.path as osp
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from mmengine.config import Config
from torch import nn

from ..engine.hooks import find_dit


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silences mmengine's INFO logging and stray prints (pycocotools)."""
    from mmengine.logging import MMLogger
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def add_model_args(parser: Any) -> None:
    """The arguments every analysis tool takes: config, checkpoint, device,
    config overrides."""
    from mmengine.config import DictAction
    parser.add_argument('config', help='mmdet / mmseg / mmpretrain config file')
    parser.add_argument('--checkpoint', help='checkpoint of the whole model (default: random '
                        'init)')
    parser.add_argument('--device', default='cpu', help='torch device (default: cpu)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value (xxx=yyy format)')


def check_paths(config: str, checkpoint: str | None) -> None:
    """Exits with a one-line message when the config or checkpoint is missing."""
    if not osp.isfile(config):
        raise SystemExit(f'config file not found: {config}')
    if checkpoint is not None and not osp.isfile(checkpoint):
        raise SystemExit(f'checkpoint not found: {checkpoint}')


def load_config(config: str | Config, cfg_options: dict | None = None) -> Config:
    """Reads an mmdet / mmseg / mmpretrain config and applies ``cfg_options``.

    Raises:
        FileNotFoundError: if the config file does not exist.
    """
    import dit_mm  # noqa: F401  (registers DiT and BudgetLossHook)
    from dit_mm.engine.runtime import allow_mmengine_checkpoints
    allow_mmengine_checkpoints()
    if isinstance(config, Config):
        cfg = config
    else:
        if not osp.isfile(config):
            raise FileNotFoundError(f'config file not found: {config}')
        cfg = Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg


SCOPES = ('mmdet', 'mmseg', 'mmpretrain')
"""The OpenMMLab scopes whose configs the analysis tools read."""


def _scope(cfg: Config) -> str:
    scope = cfg.get('default_scope') or 'mmdet'
    if scope not in SCOPES:
        raise ValueError(f"default_scope={scope!r}: only {', '.join(map(repr, SCOPES))} "
                         'configs are supported')
    return scope


def task_of(cfg: Config) -> str:
    """``'detection'``, ``'segmentation'`` or ``'classification'`` from the
    config's scope."""
    return {'mmdet': 'detection', 'mmseg': 'segmentation',
            'mmpretrain': 'classification'}[_scope(cfg)]


def _registries(cfg: Config) -> tuple[Any, Any]:
    """``(MODELS, DATASETS)`` of the config's scope, with the scope set."""
    from mmengine.registry import init_default_scope
    scope = _scope(cfg)
    init_default_scope(scope)
    if scope == 'mmseg':
        from mmseg.registry import DATASETS, MODELS
        from mmseg.utils import register_all_modules
    elif scope == 'mmpretrain':
        from mmpretrain.registry import DATASETS, MODELS
        from mmpretrain.utils import register_all_modules
    else:
        from mmdet.registry import DATASETS, MODELS
        from mmdet.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    return MODELS, DATASETS


def load_model(config: str | Config, checkpoint: str | None = None,
               cfg_options: dict | None = None, device: str = 'cpu',
               seed: int | None = 0) -> tuple[Config, nn.Module]:
    """Builds the detector / segmentor / classifier of a config, in eval mode.

    Args:
        config: Config path (or a loaded :class:`~mmengine.config.Config`).
        checkpoint: mmengine checkpoint of the whole model. When given, the
            backbone's ``init_cfg`` is dropped (no PVTv2 weights are loaded
            first) and the checkpoint is loaded non-strictly; when ``None``
            the model gets its random init (and a configured PVTv2
            ``Pretrained`` init only if that file exists).
        cfg_options: Overrides merged into the config (``key.sub=value``).
        device: Torch device.
        seed: Seed of the random init when no checkpoint is given (so that
            repeated runs measure the same random model); the global RNG
            state is left untouched. ``None``: unseeded.

    Returns:
        ``(cfg, model)``; ``model.backbone`` is a :class:`~dit_mm.DiT`.

    Raises:
        FileNotFoundError: for a missing config or checkpoint file.
        TypeError: if the model's backbone is not DiT.
    """
    cfg = load_config(config, cfg_options)
    if checkpoint is not None and not osp.isfile(checkpoint):
        raise FileNotFoundError(f'checkpoint not found: {checkpoint}')
    models, _ = _registries(cfg)
    model_cfg = copy.deepcopy(cfg.model)
    if cfg.get('data_preprocessor') is not None:  # mmpretrain's top-level key (as the Runner)
        model_cfg.setdefault('data_preprocessor', copy.deepcopy(cfg.data_preprocessor))
    backbone_cfg = model_cfg.get('backbone', {})
    init_cfg = backbone_cfg.get('init_cfg')
    if checkpoint is not None:
        backbone_cfg['init_cfg'] = None
    elif init_cfg and init_cfg.get('type') == 'Pretrained' and not osp.isfile(
            str(init_cfg.get('checkpoint', ''))):
        warnings.warn(f"backbone init_cfg checkpoint {init_cfg.get('checkpoint')!r} not found; "
                      'using the random init', stacklevel=2)
        backbone_cfg['init_cfg'] = None
    with _quiet(), torch.random.fork_rng():
        if seed is not None:
            torch.manual_seed(seed)
        model = models.build(model_cfg)
        if checkpoint is None:
            model.init_weights()
    find_dit(model)  # raises a clear TypeError for a non-DiT backbone
    if checkpoint is not None:
        _load_weights(model, checkpoint)
    model.to(device)
    model.eval()
    return cfg, model


def _load_weights(model: nn.Module, checkpoint: str) -> None:
    """``mmengine.runner.load_checkpoint`` (non-strict); mmengine training
    checkpoints load through the loader that
    :func:`dit_mm.engine.runtime.allow_mmengine_checkpoints` registers."""
    from mmengine.runner import load_checkpoint
    load_checkpoint(model, checkpoint, map_location='cpu')


def budget_mu(cfg: Config) -> float | None:
    """``mu`` of the config's ``BudgetLossHook`` (``None`` without one)."""
    for hook in cfg.get('custom_hooks') or []:
        kind = hook.get('type')
        name = kind if isinstance(kind, str) else getattr(kind, '__name__', '')
        if name.split('.')[-1] == 'BudgetLossHook':
            return float(hook.get('mu', 1.0))
    return None
