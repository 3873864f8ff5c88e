"""Images and batches for the analysis tools: a config's val/test set through
its test pipeline and the model's data preprocessor, single image files,
random inputs of a fixed size, and preprocessed inputs back to pictures.
"""
from __future__ import annotations

import os.path as osp
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from mmengine.config import Config
from torch import nn

from ..engine.data import image_loader, iter_images, loader_cfg, test_pipeline
from ..engine.hooks import find_dit
from .loading import _quiet, _registries, _scope

Batch = dict[str, Any]  # preprocessed: {'inputs': (B, C, H, W) tensor, 'data_samples': [...]}


def _build_dataset(cfg: Config, split: str) -> Any:
    _, datasets = _registries(cfg)
    ds_cfg = loader_cfg(cfg, split)['dataset']
    with _quiet():
        return datasets.build(ds_cfg)


def iter_dataset_images(cfg: Config, model: nn.Module | None = None, split: str = 'val',
                        num_images: int | None = None) -> Iterator[Batch]:
    """Yields the first ``num_images`` images of the config's val/test set,
    one per batch, through the config's test pipeline.

    Args:
        cfg: The config.
        model: When given, batches are run through
            ``model.data_preprocessor(data, False)`` (normalised, padded
            ``inputs`` on the model's device); otherwise the raw collated
            batches of the data loader are yielded.
        split: ``'val'``, ``'test'`` or ``'train'`` (the training images
            through the test pipeline).
        num_images: Number of images (``None``: all).
    """
    _registries(cfg)
    with _quiet():
        loader = image_loader(cfg, split)
    yield from iter_images(loader, model, num_images)


def dataset_size(cfg: Config, split: str = 'val') -> int:
    """Number of images of the config's val/test set."""
    return len(_build_dataset(cfg, split))


def _data_sample(cfg: Config, meta: dict) -> Any:
    scope = _scope(cfg)
    if scope == 'mmseg':
        from mmseg.structures import SegDataSample as Sample
    elif scope == 'mmpretrain':
        from mmpretrain.structures import DataSample as Sample
    else:
        from mmdet.structures import DetDataSample as Sample
    sample = Sample()
    sample.set_metainfo(meta)
    return sample


def random_batch(cfg: Config, model: nn.Module, shape: Sequence[int], seed: int = 0) -> Batch:
    """A standard-normal input of ``shape = (H, W)`` (already "normalised")
    with matching metainfo, for measuring cost at a fixed size."""
    h, w = (int(v) for v in shape)
    gen = torch.Generator().manual_seed(seed)
    channels = find_dit(model).in_channels
    device = next(model.parameters()).device
    inputs = torch.randn(1, channels, h, w, generator=gen).to(device)
    meta = {'img_shape': (h, w), 'ori_shape': (h, w), 'pad_shape': (h, w),
            'batch_input_shape': (h, w), 'scale_factor': (1.0, 1.0), 'img_path': None}
    return {'inputs': inputs, 'data_samples': [_data_sample(cfg, meta)]}


def load_image(cfg: Config, model: nn.Module, img: str, split: str = 'val') -> Batch:
    """Runs one image file through the config's test pipeline (annotation
    loading removed) and the model's data preprocessor."""
    if not osp.isfile(img):
        raise FileNotFoundError(f'image not found: {img}')
    from mmcv.transforms import Compose
    from mmengine.dataset import pseudo_collate
    _registries(cfg)
    steps = [t for t in test_pipeline(cfg, split) if 'LoadAnnotations' not in str(t['type'])]
    data = Compose(steps)({'img_path': img, 'img_id': 0})
    return model.data_preprocessor(pseudo_collate([data]), False)


def dataset_item(cfg: Config, model: nn.Module, index: int, split: str = 'val') -> Batch:
    """Image ``index`` of the config's val/test set, preprocessed."""
    from mmengine.dataset import pseudo_collate
    dataset = _build_dataset(cfg, split)
    if not 0 <= index < len(dataset):
        raise IndexError(f'--index {index} is out of range: the {split} set has '
                         f'{len(dataset)} images')
    return model.data_preprocessor(pseudo_collate([dataset[index]]), False)


def denormalize(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Preprocessed ``(C, H, W)`` input back to a displayable RGB
    ``(H, W, 3)`` float image in ``[0, 1]``."""
    pre = model.data_preprocessor
    x = inputs.detach().float().cpu()
    if getattr(pre, '_enable_normalize', False):
        x = x * pre.std.cpu() + pre.mean.cpu()
    # mmengine's ImgDataPreprocessor (mmdet) names it _channel_conversion,
    # mmseg's SegDataPreProcessor channel_conversion, mmpretrain's to_rgb
    converted = getattr(pre, '_channel_conversion',
                        getattr(pre, 'channel_conversion', getattr(pre, 'to_rgb', False)))
    if x.shape[0] == 3 and not converted:
        x = x.flip(0)  # loaded as BGR and kept so
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    x = x[:3].permute(1, 2, 0)
    lo, hi = float(x.min()), float(x.max())
    if hi > 1.5:  # 0..255 range
        return (x / 255.0).clamp(0, 1)
    return ((x - lo) / max(hi - lo, 1e-6)).clamp(0, 1)
