"""BudgetLossHook inside real mmdet/mmseg models and mmengine Runners."""
import copy

import pytest
import torch
from mm_utils import det_toy_cfg, seg_toy_cfg, shrink
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmengine.runner import Runner

from dit_mm import BudgetLossHook, DiT
from dit_mm.engine.hooks import install_budget_loss


def _scalar(runner, key):
    return runner.message_hub.get_scalar(f'train/{key}').current()


def test_schedules():
    hook = BudgetLossHook(mu=0.8, loss_weight=2.0, warmup_iters=10, tau_start=1.0,
                          tau_end=0.25, tau_anneal_iters=100)
    assert hook.weight_at(0) == pytest.approx(0.2) and hook.weight_at(50) == 2.0
    assert hook.tau_at(0) == 1.0 and hook.tau_at(50) == pytest.approx(0.5)
    assert hook.tau_at(1000) == pytest.approx(0.25)


@pytest.mark.parametrize('kwargs, match', [
    (dict(mu=0.0), 'mu=0.0 must be > 0'), (dict(mu=-1), 'must be > 0'),
    (dict(loss_weight=-1.0), 'loss_weight'), (dict(tau_start=0.0), 'temperatures')])
def test_hook_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BudgetLossHook(**kwargs)


def test_runner_step_logs_budget_and_gate_stats(toy_root, tmp_path):
    cfg = det_toy_cfg(toy_root, tmp_path, iters=2)
    runner = Runner.from_cfg(cfg)
    runner.train()
    for key in ('loss_budget', 'flops_exp', 'flops_real', 'keep_s0', 'keep_s3', 'gate_tau'):
        value = _scalar(runner, key)
        assert torch.isfinite(torch.tensor(value)), key
    # logged but not summed: the total equals the sum of the loss_* terms
    losses = [k for k in runner.message_hub.log_scalars if k.startswith('train/loss_')]
    total = sum(_scalar(runner, k[len('train/'):]) for k in losses)
    assert _scalar(runner, 'loss') == pytest.approx(total, rel=1e-4)
    assert type(runner.model).__name__ == 'MaskRCNN'  # the model's type is unchanged


def test_gradient_reaches_every_gate_in_a_detector(toy_root, tmp_path):
    cfg = det_toy_cfg(toy_root, tmp_path)
    init_default_scope('mmdet')
    from mmdet.registry import MODELS
    model = MODELS.build(cfg.model)
    model.init_weights()
    hook = BudgetLossHook(mu=0.5, loss_weight=1.0)
    install_budget_loss(model, hook)
    runner = Runner.from_cfg(cfg)  # only for its dataloader
    data = next(iter(runner.train_dataloader))
    data = model.data_preprocessor(data, True)
    losses = model(**data, mode='loss')
    assert 'loss_budget' in losses and losses['loss_budget'] > 0
    loss, _ = model.parse_losses(losses)
    loss.backward()
    gates = [(n, p) for n, p in model.named_parameters() if '_gates.' in n]
    assert len(gates) == 26
    for name, p in gates:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_stock_mmdet_config_with_only_the_backbone_swapped(toy_root, tmp_path):
    user_cfg = tmp_path / 'retinanet_dit.py'
    user_cfg.write_text(
        "_base_ = 'mmdet::pvt/retinanet_pvtv2-b0_fpn_1x_coco.py'\n"
        "custom_imports = dict(imports=['dit_mm'], allow_failed_imports=False)\n"
        "model = dict(backbone=dict(_delete_=True, type='DiT', arch='b0'))\n"
        "custom_hooks = [dict(type='BudgetLossHook', mu=1.0)]\n")
    cfg = Config.fromfile(str(user_cfg))
    # the toy data set instead of COCO, small images
    toy = det_toy_cfg(toy_root, tmp_path)
    cfg.train_dataloader = toy.train_dataloader
    cfg.test_dataloader = toy.test_dataloader  # the end-of-training calibration reads its pipeline
    cfg.model.bbox_head.num_classes = 3
    shrink(cfg, tmp_path, iters=3)
    runner = Runner.from_cfg(cfg)
    runner.train()
    assert type(runner.model).__name__ == 'RetinaNet'
    hook = next(h for h in runner.hooks if isinstance(h, BudgetLossHook))
    assert abs(hook.end_report['spend'] - 1.0) <= 0.01  # calibrated to mu at the end
    assert torch.isfinite(torch.tensor(_scalar(runner, 'loss_budget')))
    assert torch.isfinite(torch.tensor(_scalar(runner, 'loss')))


@pytest.mark.parametrize('sparse_training', [False, True])
def test_mmseg_encoder_decoder_trains_with_the_hook(toy_root, tmp_path, sparse_training):
    cfg = seg_toy_cfg(toy_root, tmp_path, iters=3)
    cfg.model.backbone.sparse_training = sparse_training
    runner = Runner.from_cfg(cfg)
    runner.train()
    assert type(runner.model).__name__ == 'EncoderDecoder'
    assert _scalar(runner, 'loss_budget') >= 0
    assert 0.0 <= _scalar(runner, 'keep_s1') <= 1.0


def test_hook_without_dit_backbone_gives_a_clear_error(toy_root, tmp_path):
    cfg = det_toy_cfg(toy_root, tmp_path)
    cfg.model.backbone = dict(type='ResNet', depth=18, num_stages=4, out_indices=(0, 1, 2, 3),
                              init_cfg=None)
    cfg.model.neck.in_channels = [64, 128, 256, 512]
    runner = Runner.from_cfg(cfg)
    with pytest.raises(TypeError, match='backbone is DiT'):
        runner.train()


def test_mu_above_the_full_grid_is_rejected(toy_root, tmp_path):
    cfg = det_toy_cfg(toy_root, tmp_path)
    cfg.custom_hooks = [dict(type='BudgetLossHook', mu=50.0)]
    runner = Runner.from_cfg(cfg)
    with pytest.raises(ValueError, match='budget mu=50.0'):
        runner.train()


def test_eval_of_a_trained_toy_model(toy_root, tmp_path):
    """Inference through the Runner: the sparse path inside a real detector."""
    cfg = det_toy_cfg(toy_root, tmp_path, iters=1)
    cfg.test_dataloader.dataset.data_root = str(toy_root / 'coco') + '/'
    cfg.test_cfg = dict(type='TestLoop')
    cfg.test_evaluator = dict(type='CocoMetric', metric=['bbox'],
                              ann_file=str(toy_root / 'coco/annotations/instances_val.json'))
    runner = Runner.from_cfg(copy.deepcopy(cfg))
    runner.train()
    metrics = runner.test()
    assert 'coco/bbox_mAP' in metrics
    assert isinstance(runner.model.backbone, DiT) and not runner.model.training


def test_mu_is_checked_at_the_training_input_size(toy_root, tmp_path):
    """mu's bound C_full / C_base depends on the input size. A mu that is
    legal at the toy set's size but above the bound at 224x224 trains (the
    hook used to reject it before the first step); a mu above the bound at
    the real size fails at the first step, naming that size."""
    probe = DiT('b0')
    toy_bound, bound_224 = probe.max_budget((256, 320)), probe.max_budget((224, 224))
    assert toy_bound > bound_224
    cfg = det_toy_cfg(toy_root, tmp_path, iters=1)
    cfg.custom_hooks[0].mu = 0.5 * (toy_bound + bound_224)
    runner = Runner.from_cfg(cfg)
    runner.train()
    assert torch.isfinite(torch.tensor(_scalar(runner, 'loss_budget')))
    cfg = det_toy_cfg(toy_root, tmp_path / 'over', iters=1)
    cfg.custom_hooks[0].mu = toy_bound + 0.01
    with pytest.raises(ValueError, match=r'must be in \(0, [0-9.]+\].*at 256x320 inputs'):
        Runner.from_cfg(cfg).train()


def test_toy_configs_are_seeded(toy_root, tmp_path):
    """Two runs of the toy config give the same losses (init, data order,
    augmentations and gate noise all seeded)."""
    losses = []
    for run in range(2):
        runner = Runner.from_cfg(det_toy_cfg(toy_root, tmp_path / f'run{run}', iters=2))
        runner.train()
        losses.append([_scalar(runner, k) for k in ('loss', 'loss_budget', 'flops_real')])
    assert losses[0] == losses[1]
