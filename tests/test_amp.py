"""``--amp`` on the CPU (``CPUAmpOptimWrapper``, bf16) for every model family
with configs here.

Each shipped detection config's family (Mask R-CNN, RetinaNet, Cascade Mask
R-CNN, ATSS, GFL, Sparse R-CNN), Semantic FPN and the toy classifier: the
config with a DiT-B0 backbone, few proposals and small fake images, switched
to mixed precision as ``tools/train.py --amp`` does, takes a few training
steps (``model.train_step``, what the Runner's loop calls) with the budget
loss installed. Losses and gradients must be finite, the backbone and neck
must compute in bf16 and the heads in float32. With the whole forward under
autocast, Mask R-CNN and Cascade Mask R-CNN failed in mmcv's ``nms`` and
Sparse R-CNN in ``RoIAlign`` (no bf16 CPU kernels).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.logging import MMLogger
from mmengine.model import BaseModel, revert_sync_batchnorm
from mmengine.optim import build_optim_wrapper
from mmengine.registry import HOOKS, MODELS, init_default_scope

from dit_mm.engine.hooks import install_budget_loss
from dit_mm.engine.runtime import CPUAmpOptimWrapper, enable_amp

CONFIGS = Path(__file__).resolve().parents[1] / 'configs'
FAMILIES = {
    'mask_rcnn': 'detection/mask_rcnn_dit_b2_1x.py',
    'retinanet': 'detection/retinanet_dit_b2_1x.py',
    'cascade_mask_rcnn': 'detection/cascade_mask_rcnn_dit_b2_1x.py',
    'atss': 'detection/atss_dit_b2_1x.py',
    'gfl': 'detection/gfl_dit_b2_1x.py',
    'sparse_rcnn': 'detection/sparse_rcnn_dit_b2_1x.py',
    'semantic_fpn': 'segmentation/fpn_dit_b2_ade20k_40k.py',
    'classifier': 'classification/dit_b0_toy.py',
}
B0_WIDTHS = [32, 64, 160, 256]
H, W = 64, 96  # fake images (multiples of 32: no padding)
STEPS = 3


pytestmark = pytest.mark.usefixtures('one_thread')


def _shrink(cfg: Config, family: str) -> None:
    """DiT-B0, no download, few proposals and RoIs."""
    cfg.model.backbone.update(arch='b0', init_cfg=None)
    if family == 'classifier':
        return
    cfg.model.neck.in_channels = B0_WIDTHS
    if family == 'semantic_fpn':
        cfg.model.data_preprocessor.size = (H, W)
        return
    train = cfg.model.train_cfg
    if 'rpn_proposal' in train:
        train.rpn_proposal.update(nms_pre=200, max_per_img=64)
        for stage in train.rcnn if isinstance(train.rcnn, list) else [train.rcnn]:
            stage.sampler.num = 32
    if family == 'sparse_rcnn':
        cfg.model.rpn_head.num_proposals = 16


def _det_sample():
    from mmdet.structures import DetDataSample
    from mmdet.structures.bbox import HorizontalBoxes
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData
    sample = DetDataSample(metainfo=dict(img_shape=(H, W), ori_shape=(H, W), pad_shape=(H, W),
                                         scale_factor=(1.0, 1.0)))
    boxes = torch.tensor([[4., 6., 40., 50.], [44., 10., 90., 60.]])
    masks = np.zeros((2, H, W), dtype=np.uint8)
    for m, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
        m[y0:y1, x0:x1] = 1
    sample.gt_instances = InstanceData(bboxes=HorizontalBoxes(boxes), labels=torch.tensor([1, 2]),
                                       masks=BitmapMasks(masks, H, W))
    return sample


def _seg_sample():
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    sample = SegDataSample(metainfo=dict(img_shape=(H, W), ori_shape=(H, W)))
    sample.gt_sem_seg = PixelData(data=torch.randint(0, 150, (1, H, W)))
    return sample


def _cls_sample():
    from mmpretrain.structures import DataSample
    return DataSample().set_gt_label(int(torch.randint(0, 6, ())))


def _batch(family: str) -> dict:
    make = {'semantic_fpn': _seg_sample, 'classifier': _cls_sample}.get(family, _det_sample)
    return dict(inputs=[torch.randint(0, 256, (3, H, W), dtype=torch.uint8) for _ in range(2)],
                data_samples=[make() for _ in range(2)])


def _first_compute_module(module: torch.nn.Module) -> torch.nn.Module:
    return next(m for m in module.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))


def _build(family: str):
    cfg = Config.fromfile(str(CONFIGS / FAMILIES[family]))
    scope = {'semantic_fpn': 'mmseg', 'classifier': 'mmpretrain'}.get(family, 'mmdet')
    init_default_scope(cfg.get('default_scope', scope))
    _shrink(cfg, family)
    if 'data_preprocessor' in cfg and 'data_preprocessor' not in cfg.model:
        cfg.model.data_preprocessor = cfg.data_preprocessor  # mmpretrain's top-level key
    enable_amp(cfg)  # what tools/train.py --amp does
    assert cfg.optim_wrapper.type == 'CPUAmpOptimWrapper'
    model = revert_sync_batchnorm(MODELS.build(cfg.model))
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        model.init_weights()
        optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    finally:
        logger.setLevel(level)
    hook = HOOKS.build(next(h for h in cfg.custom_hooks if h['type'] == 'BudgetLossHook'))
    hook.current_weight = hook.loss_weight
    install_budget_loss(model, hook)
    return model.train(), optim_wrapper


@pytest.mark.parametrize('family', list(FAMILIES))
def test_amp_training_steps(family: str) -> None:
    model, optim_wrapper = _build(family)
    assert isinstance(optim_wrapper, CPUAmpOptimWrapper)
    heads = [m for name, m in model.named_children()
             if name not in ('backbone', 'neck', 'data_preprocessor')]
    probes = {'backbone': _first_compute_module(model.backbone),
              'head': _first_compute_module(torch.nn.ModuleList(heads))}
    if getattr(model, 'neck', None) is not None and list(model.neck.parameters()):
        probes['neck'] = _first_compute_module(model.neck)
    seen: dict = {k: set() for k in probes}
    for key, module in probes.items():
        module.register_forward_hook(lambda m, a, out, key=key: seen[key].add(out.dtype))
    gate = model.backbone.row_gates['s0_t0'].proj.weight
    before = gate.detach().clone()
    grads: list = []
    gate.register_hook(grads.append)
    for _ in range(STEPS):
        log = model.train_step(_batch(family), optim_wrapper)
        assert 'loss_budget' in log
        assert all(math.isfinite(float(v)) for v in log.values()), log
    assert seen['backbone'] == {torch.bfloat16}  # autocast pays here
    assert seen.get('neck', {torch.bfloat16}) == {torch.bfloat16}
    assert seen['head'] == {torch.float32}  # box maths, mmcv ops, losses: float32
    assert not torch.is_autocast_enabled('cpu')  # the region ended with the step
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert len(grads) == STEPS and all(torch.isfinite(g).all() for g in grads)
    assert grads[0].dtype == torch.float32 and grads[0].abs().sum() > 0
    assert not torch.equal(gate.detach(), before)  # the gates train


class _Toy(BaseModel):
    """A backbone that raises on request, a neck and a head."""

    def __init__(self, with_backbone: bool = True) -> None:
        super().__init__()
        layer = torch.nn.Linear(4, 4)
        if with_backbone:
            self.backbone, self.neck = layer, torch.nn.Linear(4, 4)
        else:
            self.body = layer
        self.head = torch.nn.Linear(4, 1)
        self.fail = False
        self.dtypes: list = []

    def forward(self, inputs, data_samples=None, mode='loss'):
        if hasattr(self, 'backbone'):
            if self.fail:
                raise RuntimeError('backbone failed')
            x = self.neck(self.backbone(inputs))
        else:
            x = self.body(inputs)
        self.dtypes.append(x.dtype)
        return dict(loss=self.head(x).float().mean())


def _wrapper(model: torch.nn.Module, **kwargs) -> CPUAmpOptimWrapper:
    return CPUAmpOptimWrapper(optimizer=torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def test_scopes_and_the_region_ends_when_the_backbone_raises() -> None:
    model = _Toy()
    x = torch.randn(2, 4)
    with _wrapper(model).optim_context(model):
        model(x)
    with _wrapper(model, scope='model').optim_context(model):
        model(x)
        assert torch.is_autocast_enabled('cpu')
    assert model.dtypes == [torch.float32, torch.bfloat16]  # neck output: cast back or not
    model.fail = True
    with pytest.raises(RuntimeError, match='backbone failed'):
        with _wrapper(model).optim_context(model):
            model(x)
    assert not torch.is_autocast_enabled('cpu')
    assert not model.backbone._forward_pre_hooks and not model.backbone._forward_hooks
    plain = _Toy(with_backbone=False)  # no backbone: the whole forward is autocast
    with _wrapper(plain).optim_context(plain):
        plain(x)
    assert plain.dtypes == [torch.bfloat16]


def test_bad_dtype_and_scope() -> None:
    model = _Toy()
    with pytest.raises(ValueError, match="dtype='float64'"):
        _wrapper(model, dtype='float64')
    with pytest.raises(ValueError, match="scope='heads'"):
        _wrapper(model, scope='heads')
