"""Analysis of a trained DiT model: its token routing and its cost.

Shared by ``tools/get_flops.py``, ``tools/routing_stats.py`` and
``tools/visualize_routing.py``. Everything runs in eval mode, one image per
batch (each image at its own padded input size, as in inference).

How FLOPs are counted (all numbers are GFLOPs *per image*, where one FLOP is
one multiply-accumulate, the fvcore / mmengine ``FlopAnalyzer`` convention the
PVTv2 and DiT papers use):

* **Backbone, analytic** -- :meth:`dit_mm.models.backbone.DiT.flops` of the routed
  forward: ``real`` from the hard gate decisions of that image (kept tokens,
  open column edges, evaluated gates), ``expected`` from the gate
  probabilities (the quantity the budget loss trains), ``static`` = PVTv2's
  own path at the same input size (``C_base``) and ``full`` = the whole grid.
* **Backbone, counted (cross-check)** -- ``FlopAnalyzer`` (a jit trace) on the
  backbone with ``routing='static'`` at the same input, with every timm
  ``Attention`` switched to its explicit (non-fused) kernel so that ``QK^T``
  and ``AV`` are visible to the counter. It equals the analytic ``static``
  exactly; :func:`routing_stats` records it per input size. Optionally
  (``count_backbone=True``) the routed backbone is traced as well: the
  counter then sees the packed sparse path actually executed, which runs the
  MLP's 3x3 depthwise conv over the whole map (the analytic model charges it
  per kept token) and ``norm1`` on the kept queries as well as on the K/V
  map, so it lies a little above the analytic ``real`` (by exactly those
  two terms).
* **Neck + heads, counted** -- ``FlopAnalyzer`` on the model's tensor-mode
  ``_forward`` with the backbone replaced by a stub that returns the features
  the backbone produced for this image. It is counted twice per image: on the
  routed features (used for the DiT whole-model numbers) and on PVTv2's
  features (``routing='static'``, used for the baseline), because two-stage
  heads depend on the features through the number of proposals. Ops the
  counter does not know (RoIAlign, NMS, element-wise ops) count 0, as in
  mmdet's own ``get_flops.py``.
* **Whole model** = backbone (analytic) + neck and heads (counted), i.e.
  ``whole.real = backbone.real + neck_heads.routed``,
  ``whole.expected = backbone.expected + neck_heads.routed`` and
  ``whole.static = backbone.static + neck_heads.static`` (this last one is
  exactly what ``FlopAnalyzer`` gives for the whole PVTv2 model in tensor
  mode).
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import os.path as osp
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from mmengine.config import Config
from torch import nn

from ..engine.hooks import find_dit
from ..models.backbone import DiT, RoutingRecord
from ..models.grid import NUM_SCALES, Node, node_key

__all__ = [
    'COUNTING_METHOD',
    'ImageRecord',
    'analyse_batch',
    'SCOPES',
    'budget_mu',
    'count_flops',
    'count_neck_heads',
    'countable_attention',
    'dataset_item',
    'dataset_size',
    'denormalize',
    'grid_nodes',
    'iter_dataset_images',
    'load_config',
    'load_image',
    'load_model',
    'node_masks',
    'random_batch',
    'routing_mode',
    'routing_stats',
    'summarize',
    'task_of',
]

COUNTING_METHOD = {
    'unit': 'GFLOPs per image, 1 FLOP = 1 multiply-accumulate (fvcore / mmengine convention)',
    'backbone': 'analytic DiT.flops() of each image\'s routing: real = hard gate decisions, '
                'expected = gate probabilities, static = PVTv2 path (C_base), full = whole grid',
    'backbone.static_counted': 'mmengine FlopAnalyzer (jit trace) on the backbone with '
                               "routing='static' and explicit (non-fused) attention",
    'neck_heads': 'mmengine FlopAnalyzer on model._forward (tensor mode) with the backbone '
                  'replaced by its features: routed = DiT features of the image, static = '
                  'PVTv2 features; unknown ops (RoIAlign, NMS, element-wise) count 0',
    'whole': 'backbone (analytic) + neck_heads (counted): expected/real use neck_heads.routed, '
             'static uses neck_heads.static',
}
"""What the numbers of :func:`routing_stats` / ``tools/get_flops.py`` count."""

Batch = dict[str, Any]  # preprocessed: {'inputs': (B, C, H, W) tensor, 'data_samples': [...]}


def grid_nodes() -> list[Node]:
    """The 10 nodes ``(scale i, stage j)``, ``i <= j``, in execution order."""
    return [(i, j) for j in range(NUM_SCALES) for i in range(j + 1)]


# ----------------------------------------------------------------- loading
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


def _dataloader_cfg(cfg: Config, split: str) -> dict:
    key = {'val': 'val_dataloader', 'test': 'test_dataloader'}.get(split)
    if key is None:
        raise ValueError(f"split={split!r} must be 'val' or 'test'")
    if cfg.get(key) is None:
        raise ValueError(f'the config has no {key}')
    return cfg[key]


def _build_dataset(cfg: Config, split: str) -> Any:
    _, datasets = _registries(cfg)
    ds_cfg = _dataloader_cfg(cfg, split)['dataset']
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
        split: ``'val'`` or ``'test'``.
        num_images: Number of images (``None``: all).
    """
    from mmengine.runner import Runner
    _registries(cfg)
    loader_cfg = dict(_dataloader_cfg(cfg, split))
    loader_cfg.update(batch_size=1, num_workers=0, persistent_workers=False,
                      sampler={'type': 'DefaultSampler', 'shuffle': False})
    with _quiet():
        loader = Runner.build_dataloader(loader_cfg)
    if num_images is not None and num_images <= 0:
        return
    for k, data in enumerate(loader):
        yield model.data_preprocessor(data, False) if model is not None else data
        if num_images is not None and k + 1 >= num_images:
            break


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


def _test_pipeline(cfg: Config, split: str = 'val') -> list[dict]:
    ds_cfg = _dataloader_cfg(cfg, split)['dataset']
    while 'pipeline' not in ds_cfg and 'dataset' in ds_cfg:  # dataset wrappers
        ds_cfg = ds_cfg['dataset']
    pipeline = ds_cfg.get('pipeline') or cfg.get('test_pipeline')
    if not pipeline:
        raise ValueError(f'no test pipeline found in the {split} data loader of the config')
    return [dict(t) for t in pipeline]


def load_image(cfg: Config, model: nn.Module, img: str, split: str = 'val') -> Batch:
    """Runs one image file through the config's test pipeline (annotation
    loading removed) and the model's data preprocessor."""
    if not osp.isfile(img):
        raise FileNotFoundError(f'image not found: {img}')
    from mmcv.transforms import Compose
    from mmengine.dataset import pseudo_collate
    _registries(cfg)
    steps = [t for t in _test_pipeline(cfg, split) if 'LoadAnnotations' not in str(t['type'])]
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


def budget_mu(cfg: Config) -> float | None:
    """``mu`` of the config's ``BudgetLossHook`` (``None`` without one)."""
    for hook in cfg.get('custom_hooks') or []:
        kind = hook.get('type')
        name = kind if isinstance(kind, str) else getattr(kind, '__name__', '')
        if name.split('.')[-1] == 'BudgetLossHook':
            return float(hook.get('mu', 1.0))
    return None


# ---------------------------------------------------------------- counting
@contextlib.contextmanager
def routing_mode(backbone: DiT, routing: str) -> Iterator[DiT]:
    """Temporarily switches ``backbone.routing`` (e.g. to ``'static'``)."""
    old = backbone.routing
    backbone.routing = routing
    try:
        yield backbone
    finally:
        backbone.routing = old


@contextlib.contextmanager
def countable_attention(module: nn.Module) -> Iterator[None]:
    """Sets ``fused_attn = False`` on every (timm) attention module inside
    ``module`` so that a jit-trace counter sees ``QK^T`` and ``AV`` as
    matmuls (``scaled_dot_product_attention`` counts 0); restores after."""
    changed = [m for m in module.modules() if getattr(m, 'fused_attn', False) is True]
    for m in changed:
        m.fused_attn = False
    try:
        yield
    finally:
        for m in changed:
            m.fused_attn = True


def count_flops(module: nn.Module, inputs: tuple[Any, ...]) -> float:
    """FLOPs (multiply-accumulates) of ``module(*inputs)`` by mmengine's
    ``FlopAnalyzer``, with explicit attention and all counter warnings off."""
    from mmengine.analysis import FlopAnalyzer
    with torch.no_grad(), countable_attention(module), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        analyzer = FlopAnalyzer(module, inputs)
        analyzer.unsupported_ops_warnings(False)
        analyzer.uncalled_modules_warnings(False)
        analyzer.tracer_warnings('none')
        return float(analyzer.total())


class _FeatureStub(nn.Module):
    """Stands in for the backbone: returns features set from outside."""

    def __init__(self) -> None:
        super().__init__()
        self.feats: tuple[torch.Tensor, ...] = ()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.feats


class _NeckAndHeads(nn.Module):
    """``model._forward`` (tensor mode) with given backbone features; its
    traced inputs are ``(inputs, *features)``."""

    def __init__(self, model: nn.Module, data_samples: Any) -> None:
        super().__init__()
        self.model = model
        self.data_samples = data_samples

    def forward(self, inputs: torch.Tensor, *feats: torch.Tensor) -> Any:
        model = self.model
        backbone = model.backbone
        stub = _FeatureStub()
        stub.feats = tuple(feats)
        model._modules['backbone'] = stub
        try:
            if not hasattr(model, '_forward'):  # mmpretrain's ImageClassifier
                return model(inputs, self.data_samples, mode='tensor')
            return model._forward(inputs, self.data_samples)
        finally:
            model._modules['backbone'] = backbone


def count_neck_heads(model: nn.Module, inputs: torch.Tensor, data_samples: Any,
                     feats: Sequence[torch.Tensor]) -> float:
    """FLOPs of everything after the backbone (neck, RPN, RoI / decode
    heads) in tensor mode, on the given backbone features, for the batch."""
    return count_flops(_NeckAndHeads(model, data_samples), (inputs, *feats))


# ---------------------------------------------------------------- analysis
@dataclass
class ImageRecord:
    """Routing and cost of one image (GFLOPs per image).

    Attributes:
        size: Padded input ``(H, W)``.
        keep: Node -> ``(expected, real)`` kept-token fraction; nodes whose
            row edge did not run are absent.
        gated: Nodes whose tokens were gated (others ran densely).
        col_open: Gated column edge -> ``(expected, real)`` open fraction.
        backbone: ``expected``, ``real``, ``static``, ``full`` (analytic).
        backbone_counted: ``static`` (and ``real`` with ``count_backbone``)
            from the jit counter.
        neck_heads: ``routed`` / ``static``: counted neck + heads on the
            routed / PVTv2 features (empty when not counted).
    """

    size: tuple[int, int]
    keep: dict[Node, tuple[float, float]]
    gated: list[Node]
    col_open: dict[Node, tuple[float, float]]
    backbone: dict[str, float]
    backbone_counted: dict[str, float] = field(default_factory=dict)
    neck_heads: dict[str, float] = field(default_factory=dict)

    @property
    def whole(self) -> dict[str, float]:
        """Whole-model GFLOPs (empty when the neck and heads were not counted)."""
        if 'routed' not in self.neck_heads:
            return {}
        out = {'expected': self.backbone['expected'] + self.neck_heads['routed'],
               'real': self.backbone['real'] + self.neck_heads['routed']}
        if 'static' in self.neck_heads:
            out['static'] = self.backbone['static'] + self.neck_heads['static']
        return out


def _records_from(rec: RoutingRecord, flops: dict[str, Any]) -> list[ImageRecord]:
    out = []
    for b in range(rec.batch):
        keep = {n: (float(e[b]), float(r[b])) for n, (e, r) in rec.rows.items()}
        cols = {n: (float(rec.embeds[n][0][b]), float(rec.embeds[n][1][b]))
                for n in rec.col_gates}
        bb = {'expected': float(flops['expected'][b]), 'real': float(flops['real'][b]),
              'static': float(flops['static']), 'full': float(flops['full'])}
        out.append(ImageRecord(size=tuple(rec.size), keep=keep, gated=list(rec.masks),
                               col_open=cols, backbone=bb))
    return out


@torch.no_grad()
def analyse_batch(model: nn.Module, batch: Batch, *, whole_model: bool = True,
                  count_backbone: bool = False,
                  static_cache: dict[tuple[int, int], float] | None = None
                  ) -> list[ImageRecord]:
    """Routes one preprocessed batch and measures it (see the module doc).

    Args:
        model: Detector / segmentor with a DiT backbone, in eval mode.
        batch: ``{'inputs', 'data_samples'}`` from the data preprocessor.
        whole_model: Also count neck + heads on the routed and on PVTv2's
            features (two jit traces per batch).
        count_backbone: Also trace the routed backbone with the counter.
        static_cache: Input size -> counted static backbone GFLOPs, filled
            on first use of a size (one trace per size).

    Returns:
        One :class:`ImageRecord` per image. With a batch of ``B > 1`` the
        counted neck/head FLOPs are the batch total divided by ``B``.
    """
    backbone = find_dit(model)
    inputs, samples = batch['inputs'], batch.get('data_samples')
    B = inputs.shape[0]
    feats = backbone(inputs)
    rec = backbone.last_record
    records = _records_from(rec, backbone.flops(per_image=True))
    size = tuple(rec.size)
    cache = {} if static_cache is None else static_cache
    if size not in cache:
        with routing_mode(backbone, 'static'):
            cache[size] = count_flops(backbone, (inputs[:1],)) / 1e9
    extra: dict[str, dict[str, float]] = {'backbone_counted': {'static': cache[size]},
                                          'neck_heads': {}}
    if count_backbone:
        extra['backbone_counted']['real'] = count_flops(backbone, (inputs,)) / 1e9 / B
    if whole_model:
        extra['neck_heads']['routed'] = count_neck_heads(model, inputs, samples, feats) / 1e9 / B
        with routing_mode(backbone, 'static'):
            static_feats = backbone(inputs)
        extra['neck_heads']['static'] = count_neck_heads(model, inputs, samples,
                                                         static_feats) / 1e9 / B
    backbone.last_record = rec  # the routed forward's record, not the baseline's
    for r in records:
        r.backbone_counted = dict(extra['backbone_counted'])
        r.neck_heads = dict(extra['neck_heads'])
    return records


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / n)


def summarize(records: Sequence[ImageRecord], mu: float | None = None) -> dict[str, Any]:
    """Aggregates per-image records into a JSON-able report.

    Returns:
        dict with ``num_images``, ``input_sizes`` (``'HxW'`` -> count),
        ``nodes`` (``node_key`` -> scale, stage, stride, diagonal,
        ``evaluated`` (row edge ran on some image), ``gated``,
        ``ran_frac`` (images where the node computed >= 1 token),
        ``skip_real`` / ``skip_real_std`` / ``skip_expected``: mean skipped
        fraction over images, 1 where the node did not run),
        ``column_edges`` (``node_key`` -> ``open_real``, ``open_expected``),
        ``gflops`` (``backbone``: expected, real, static, full,
        static_counted [, real_counted]; ``neck_heads``: routed, static;
        ``whole``: expected, real, static; per-image means) and ``ratios``
        (``real/C_base``, ``expected/C_base`` with ``C_base`` = backbone
        static; ``whole_real/whole_static``, ``whole_expected/whole_static``)
        and ``mu``.
    """
    if not records:
        raise ValueError('no images were analysed (empty data set or --num-images 0)')
    n = len(records)
    nodes: dict[str, Any] = {}
    for (i, j) in grid_nodes():
        keep = [r.keep.get((i, j)) for r in records]
        real = [1.0 - k[1] if k is not None else 1.0 for k in keep]
        exp = [1.0 - k[0] if k is not None else 1.0 for k in keep]
        mean, std = _mean_std(real)
        nodes[node_key(i, j)] = {
            'scale': i, 'stage': j, 'stride': 4 * 2 ** i, 'diagonal': i == j,
            'evaluated': any(k is not None for k in keep),
            'gated': any((i, j) in r.gated for r in records),
            'ran_frac': sum(1 for k in keep if k is not None and k[1] > 0) / n,
            'skip_real': mean, 'skip_real_std': std, 'skip_expected': _mean_std(exp)[0]}
    cols: dict[str, Any] = {}
    edges = sorted({e for r in records for e in r.col_open}, key=lambda e: (e[1], e[0]))
    for e in edges:
        vals = [r.col_open[e] for r in records if e in r.col_open]
        cols[node_key(*e)] = {'scale': e[0], 'stage': e[1],
                              'open_expected': _mean_std([v[0] for v in vals])[0],
                              'open_real': _mean_std([v[1] for v in vals])[0]}

    def avg(get: Callable[[ImageRecord], float | None]) -> float | None:
        vals = [get(r) for r in records]
        return None if any(v is None for v in vals) else sum(vals) / n

    bb = {k: avg(lambda r, k=k: r.backbone[k]) for k in ('expected', 'real', 'static', 'full')}
    bb['static_counted'] = avg(lambda r: r.backbone_counted.get('static'))
    real_counted = avg(lambda r: r.backbone_counted.get('real'))
    if real_counted is not None:
        bb['real_counted'] = real_counted
    gflops: dict[str, Any] = {'backbone': bb}
    heads = {k: avg(lambda r, k=k: r.neck_heads.get(k)) for k in ('routed', 'static')}
    if heads['routed'] is not None:
        gflops['neck_heads'] = heads
        gflops['whole'] = {k: avg(lambda r, k=k: r.whole.get(k))
                           for k in ('expected', 'real', 'static')}
    # ratios per image, then averaged (images of different sizes weigh the same)
    ratios = {'real/C_base': avg(lambda r: r.backbone['real'] / r.backbone['static']),
              'expected/C_base': avg(lambda r: r.backbone['expected'] / r.backbone['static'])}
    if 'whole' in gflops and gflops['whole']['static'] is not None:
        ratios['whole_real/whole_static'] = avg(lambda r: r.whole['real'] / r.whole['static'])
        ratios['whole_expected/whole_static'] = avg(
            lambda r: r.whole['expected'] / r.whole['static'])
    sizes = Counter(f'{r.size[0]}x{r.size[1]}' for r in records)
    return {'num_images': n, 'input_sizes': dict(sizes), 'nodes': nodes, 'column_edges': cols,
            'gflops': gflops, 'ratios': ratios, 'mu': mu}


def routing_stats(model: nn.Module, batches: Iterable[Batch], *, whole_model: bool = False,
                  count_backbone: bool = False, mu: float | None = None,
                  progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Routes every batch and summarises routing and cost.

    Args:
        model: Detector / segmentor with a DiT backbone (eval mode).
        batches: Preprocessed batches (:func:`iter_dataset_images`).
        whole_model: Count neck + heads too (see the module doc); slower.
        count_backbone: Trace the routed backbone with the counter too.
        mu: Budget to report next to the ratios.
        progress: Called with the number of images after each batch.

    Returns:
        The dict of :func:`summarize` (per node mean skip ratio, mean
        expected / real / static GFLOPs per image, ...), plus ``routing``.
    """
    backbone = find_dit(model)
    records: list[ImageRecord] = []
    cache: dict[tuple[int, int], float] = {}
    for batch in batches:
        new = analyse_batch(model, batch, whole_model=whole_model,
                            count_backbone=count_backbone, static_cache=cache)
        records.extend(new)
        if progress is not None:
            progress(len(new))
    out = summarize(records, mu=mu)
    out['routing'] = backbone.routing
    return out


def node_masks(backbone: DiT) -> dict[Node, torch.Tensor | None]:
    """Per node of the last forward: a boolean ``(h, w)`` map of computed
    tokens of image 0 (all True for a node that ran without a gate), or
    ``None`` for a node whose row edge did not run."""
    from ..models.grid import feature_sizes
    rec = backbone.last_record
    if rec is None:
        raise RuntimeError('run the model first: the backbone has no routing record')
    sizes = feature_sizes(*rec.size)
    out: dict[Node, torch.Tensor | None] = {}
    for node in grid_nodes():
        if node in rec.masks:
            out[node] = rec.masks[node][0].detach().cpu()
        elif node in rec.rows:
            out[node] = torch.ones(sizes[node[0]], dtype=torch.bool)
        else:
            out[node] = None
    return out
