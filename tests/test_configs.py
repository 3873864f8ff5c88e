"""The paper's experiment configs (configs/detection, configs/segmentation).

Every config is loaded and its recipe checked (DiT backbone and checkpoint,
budget hook, AdamW, schedule, multi-scale training, test scale), then its
model is built on the CPU with a DiT-B0 backbone and run on a 64x64 image.
Once per distinct detector/schedule, the datasets are built lazily and the
model takes one AdamW step on a fake sample with the budget loss installed.
The ``*_toy.py`` configs (trained for real elsewhere) and the ``_base_``
folders are skipped.
"""
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.logging import MMLogger
from mmengine.model import revert_sync_batchnorm
from mmengine.optim import build_optim_wrapper
from mmengine.registry import DATASETS, HOOKS, MODELS, init_default_scope

import dit_mm
from dit_mm.engine.hooks import install_budget_loss
from dit_mm.models.backbone import check_budget
from dit_mm.models.cost_model import grid_cost
from dit_mm.models.grid import resolve_arch

ROOT = Path(__file__).resolve().parents[1] / 'configs'
CONFIGS = sorted(p for kind in ('detection', 'segmentation')
                 for p in (ROOT / kind).rglob('*.py')
                 if '_base_' not in p.relative_to(ROOT).parts and not p.stem.endswith('_toy'))

PVT_URL = 'https://github.com/whai362/PVT/releases/download/v2/pvt_v2_{}.pth'
WIDTHS = [64, 128, 320, 512]  # PVTv2-B1..B4
B0_WIDTHS = [32, 64, 160, 256]
ITERS_PER_EPOCH = 118287 / 16  # COCO train2017 at batch 16 (~7.4k, ~7.33k after filtering)

# Budgets from the paper's GFLOPs ratios DiT / PVTv2; 0.95 where it has none.
# Paper whole-model GFLOPs (PVTv2-B2, DiT-B2) and the input they were measured at.
# mu attributes the whole saving to the backbone: 1 - (pvt - dit) / C_base.
PAPER_GFLOPS = {
    'mask_rcnn_dit_b2_3x': (309, 290, (800, 1280)),  # Table 3
    'mask_rcnn_dit_b2_1x': (309, 290, (800, 1280)),  # same model and input as the 3x row
    'cascade_mask_rcnn_dit_b2_1x': (788, 745, (800, 1280)),  # Table 2
    'atss_dit_b2_1x': (258, 247, (800, 1280)),
    'gfl_dit_b2_1x': (261, 235, (800, 1280)),
    'sparse_rcnn_dit_b2_1x': (215, 202, (800, 1280)),
    'fpn_dit_b2_ade20k_40k': (45.8, 43.4, (512, 512)),  # Table 5
}


def paper_mu(name: str) -> float:
    if name not in PAPER_GFLOPS:
        return 0.95
    pvt, dit, size = PAPER_GFLOPS[name]
    c_base = grid_cost(resolve_arch('b2'), *size).static / 1e9
    return 1 - (pvt - dit) / c_base



@pytest.fixture(scope='module', autouse=True)
def _one_thread():
    """Tiny tensors: one thread is faster and steadier than two on a busy
    2-core machine (OpenMP threads contend with other processes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_all_configs_found():
    names = {p.stem for p in CONFIGS}
    expected = {f'{d}_dit_b{i}_{s}' for d in ('mask_rcnn', 'retinanet')
                for i in range(1, 5) for s in ('1x', '3x')}
    expected |= {f'{d}_dit_b2_1x' for d in ('cascade_mask_rcnn', 'atss', 'gfl', 'sparse_rcnn')}
    expected |= {f'fpn_dit_b{i}_ade20k_40k' for i in range(1, 5)}
    assert expected <= names, sorted(expected - names)


def _ids(p: Path) -> str:
    return p.stem


def _is_seg(path: Path) -> bool:
    return 'segmentation' in path.relative_to(ROOT).parts


def _inner_dataset(dataset_cfg):
    while 'dataset' in dataset_cfg:  # RepeatDataset & co.
        dataset_cfg = dataset_cfg['dataset']
    return dataset_cfg


def _shorter_sides(transform) -> list:
    """Shorter sides an image-resize transform can produce (scale=(long, short))."""
    kind = transform['type']
    if kind == 'RandomResize':
        scales = transform['scale']
        assert 'ratio_range' not in transform or transform['ratio_range'] is None
        return [min(s) for s in scales] if isinstance(scales[0], (list, tuple)) \
            else [min(scales)]
    if kind == 'RandomChoiceResize':
        return [min(s) for s in transform['scales']]
    if kind == 'Resize':
        return [min(transform['scale'])]
    return []


def _resizes(pipeline) -> list:
    out = []
    for t in pipeline:
        if t['type'] in ('RandomChoice', 'RandomApply'):
            for group in t['transforms']:
                out += _resizes(group if isinstance(group, list) else [group])
        elif _shorter_sides(t):
            out.append(t)
    return out


@pytest.fixture(scope='module', params=CONFIGS, ids=_ids)
def cfg_and_path(request):
    path = request.param
    return Config.fromfile(str(path)), path


def test_recipe(cfg_and_path):
    cfg, path = cfg_and_path
    name = path.stem
    seg = _is_seg(path)
    arch = re.search(r'_dit_(b\d)_', name).group(1)
    schedule = '40k' if seg else re.search(r'_(\dx)$', name).group(1)

    assert 'dit_mm' in cfg.custom_imports['imports']
    assert cfg.custom_imports.get('allow_failed_imports') is False

    backbone = cfg.model.backbone
    assert backbone.type == 'DiT'
    assert backbone.arch == arch
    assert backbone.routing == 'dynamic'
    assert backbone.drop_path_rate == pytest.approx(0.1)
    assert not any(k in backbone for k in ('depth', 'num_stages', 'frozen_stages', 'style')), \
        'ResNet keys leaked into the DiT backbone (missing _delete_?)'
    assert backbone.init_cfg.type == 'Pretrained'
    assert backbone.init_cfg.checkpoint == PVT_URL.format(arch)
    assert list(cfg.model.neck.in_channels) == WIDTHS
    if seg:
        assert cfg.model.get('pretrained') is None  # mmseg's ResNet checkpoint is dropped
        assert cfg.model.decode_head.num_classes == 150

    hooks = [h for h in cfg.get('custom_hooks', []) if h['type'] == 'BudgetLossHook']
    assert len(hooks) == 1
    hook = hooks[0]
    assert 0 < hook['mu'] <= 1.0
    assert hook['mu'] == pytest.approx(paper_mu(name), abs=0.005)
    assert hook['loss_weight'] == 2.0 and hook['warmup_iters'] == 1000
    assert (hook['tau_start'], hook['tau_end']) == (1.0, 0.2)

    optim = cfg.optim_wrapper
    assert optim.type == 'OptimWrapper'
    assert optim.optimizer.type == 'AdamW'
    assert optim.optimizer.lr == pytest.approx(1e-4)
    assert optim.optimizer.weight_decay == pytest.approx(1e-4 if seg else 0.05)
    assert 'momentum' not in optim.optimizer, 'SGD keys leaked into AdamW'
    keys = optim.paramwise_cfg.custom_keys
    assert all(keys[k].decay_mult == 0.0 for k in ('row_gates', 'col_gates', 'norm'))
    if name.startswith('sparse_rcnn'):
        assert optim.clip_grad.max_norm == 1
    assert cfg.auto_scale_lr.base_batch_size == 16

    if seg:
        assert cfg.train_cfg.type == 'IterBasedTrainLoop'
        assert cfg.train_cfg.max_iters == 40000
        (poly,) = cfg.param_scheduler
        assert (poly.type, poly.power, poly.eta_min, poly.end) == ('PolyLR', 0.9, 0.0, 40000)
        assert hook['tau_anneal_iters'] == 40000
        assert cfg.train_dataloader.batch_size == 4  # x 4 GPUs = 16
        assert tuple(cfg.model.data_preprocessor.size) == (512, 512)
        crops = [t for t in cfg.train_dataloader.dataset.pipeline if t['type'] == 'RandomCrop']
        assert [tuple(t['crop_size']) for t in crops] == [(512, 512)]
        return

    epochs = {'1x': 12, '3x': 36}[schedule]
    assert cfg.train_cfg.type == 'EpochBasedTrainLoop'
    assert cfg.train_cfg.max_epochs == epochs
    steps = [s for s in cfg.param_scheduler if s.type == 'MultiStepLR']
    assert len(steps) == 1 and steps[0].end == epochs
    assert list(steps[0].milestones) == ([8, 11] if epochs == 12 else [27, 33])
    assert hook['tau_anneal_iters'] == pytest.approx(epochs * ITERS_PER_EPOCH, rel=0.05)
    assert cfg.train_dataloader.batch_size == 2  # x 8 GPUs = 16

    train = cfg.train_dataloader.dataset
    assert train.type == 'CocoDataset', '3x must be real epochs, not RepeatDataset x 12'
    sides = sorted(s for t in _resizes(train.pipeline) for s in _shorter_sides(t))
    assert all(t.get('keep_ratio', False) for t in _resizes(train.pipeline))
    if schedule == '3x':
        assert sides and sides[0] <= 640 and sides[-1] >= 800, sides
        assert any(t['type'] != 'Resize' for t in _resizes(train.pipeline))
    else:
        assert sides == [800]
    for loader in ('val_dataloader', 'test_dataloader'):
        test_resizes = _resizes(_inner_dataset(cfg[loader].dataset).pipeline)
        assert [(t['type'], tuple(t['scale'])) for t in test_resizes] == \
            [('Resize', (1333, 800))]


def _fake_det_sample(with_mask: bool):
    from mmdet.structures import DetDataSample
    from mmdet.structures.bbox import HorizontalBoxes
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData
    sample = DetDataSample(metainfo=dict(img_id=0, img_shape=(64, 64), ori_shape=(64, 64),
                                         scale_factor=(1.0, 1.0)))
    gt = InstanceData(bboxes=HorizontalBoxes(torch.tensor([[8., 8., 40., 48.]])),
                      labels=torch.tensor([1]))
    if with_mask:
        mask = np.zeros((1, 64, 64), dtype=np.uint8)
        mask[:, 8:48, 8:40] = 1
        gt.masks = BitmapMasks(mask, 64, 64)
    sample.gt_instances = gt
    return sample


def _fake_seg_sample():
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    sample = SegDataSample(metainfo=dict(img_shape=(64, 64), ori_shape=(64, 64)))
    sample.gt_sem_seg = PixelData(data=torch.randint(0, 150, (1, 64, 64)))
    return sample


# The heavy checks (datasets, optimizer, one loss step) run once per distinct
# set of settings: with the backbone shrunk to B0, the configs of one detector
# and schedule differ only in arch, checkpoint and mu.
_SEEN_DATASETS: set = set()
_SEEN_MODELS: set = set()


def _quiet_init(model) -> None:
    """``init_weights`` without mmengine logging every parameter's init."""
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        model.init_weights()
    finally:
        logger.setLevel(level)


def test_build_and_step(cfg_and_path):
    """Builds the datasets (lazily: no COCO/ADE20K here), the model with a
    DiT-B0 backbone and the optimizer; one loss step with the budget loss."""
    cfg, path = cfg_and_path
    cfg = cfg.copy()
    seg = _is_seg(path)
    init_default_scope(cfg.get('default_scope', 'mmseg' if seg else 'mmdet'))

    datasets_key = repr([cfg[k].dataset for k in ('train_dataloader', 'val_dataloader')])
    if datasets_key not in _SEEN_DATASETS:
        for loader in ('train_dataloader', 'val_dataloader'):
            dataset = DATASETS.build(dict(cfg[loader].dataset, lazy_init=True))
            assert len(dataset.pipeline.transforms) == \
                len(_inner_dataset(cfg[loader].dataset).pipeline)
        _SEEN_DATASETS.add(datasets_key)

    spec = resolve_arch(cfg.model.backbone.arch)  # the real arch: widths match the neck
    assert list(spec.embed_dims) == list(cfg.model.neck.in_channels)
    cost = grid_cost(spec, 800, 1280)
    mu = cfg.custom_hooks[0]['mu']
    check_budget(mu, cost.full / cost.static)

    cfg.model.backbone.init_cfg = None  # no download
    cfg.model.backbone.arch = 'b0'
    cfg.model.neck.in_channels = B0_WIDTHS
    if seg:
        cfg.model.data_preprocessor.size = (64, 64)
    model = MODELS.build(cfg.model)
    model = revert_sync_batchnorm(model)  # mmseg's SyncBN, on one CPU process
    assert isinstance(model.backbone, dit_mm.DiT)
    model.backbone.init_weights()
    model.eval()
    with torch.no_grad():
        feats = model.extract_feat(torch.randn(1, 3, 64, 64))
    assert isinstance(feats, tuple) and all(torch.is_tensor(f) for f in feats)
    assert all(torch.isfinite(f).all() for f in feats)

    model_key = repr((cfg.model, cfg.optim_wrapper, cfg.custom_hooks))
    model_key = model_key.replace(repr(mu), 'MU')
    if model_key in _SEEN_MODELS:
        return
    _SEEN_MODELS.add(model_key)
    _quiet_init(model)  # heads too (Sparse R-CNN's initial proposals)

    optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    assert type(optim_wrapper.optimizer).__name__ == 'AdamW'
    gate = model.backbone.row_gates['s0_t0'].proj.weight
    gate_groups = [g for g in optim_wrapper.optimizer.param_groups
                   if any(p is gate for p in g['params'])]
    assert gate_groups and gate_groups[0]['weight_decay'] == 0.0

    hook = HOOKS.build(cfg.custom_hooks[0])
    hook.current_weight = hook.loss_weight
    install_budget_loss(model, hook)
    model.train()
    if seg:
        sample = _fake_seg_sample()
    else:
        sample = _fake_det_sample(with_mask=getattr(model, 'with_mask', False))
    data = dict(inputs=[torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)],
                data_samples=[sample])
    data = model.data_preprocessor(data, training=True)
    losses = model(**data, mode='loss')
    assert 'loss_budget' in losses
    assert losses['budget_mu'].item() == pytest.approx(mu)
    loss, _ = model.parse_losses(losses)
    assert torch.isfinite(loss)
    optim_wrapper.backward(loss)
    assert gate.grad is not None
    optim_wrapper.step()
