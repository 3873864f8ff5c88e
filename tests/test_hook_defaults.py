"""BudgetLossHook with only ``mu``: its schedule follows the run, and the
checkpoint it leaves spends ``mu`` at inference (issue: a stock config
spends what it asks)."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from mm_utils import det_toy_cfg, load_tool, seg_toy_cfg, shrink
from mmengine.config import Config
from mmengine.logging import MMLogger
from mmengine.runner import Runner

from dit_mm import BudgetLossHook
from dit_mm.datasets.toy_classification import generate_toy_classification
from dit_mm.datasets.toy_data import generate_toy_dataset

ROOT = Path(__file__).resolve().parents[1]
CLS_TOY = ROOT / 'configs/classification/dit_b0_toy.py'
SIZE = (64, 80)  # toy detection / segmentation images, kept at this size
N_TRAIN = {'classification': 16, 'detection': 48, 'segmentation': 48}


def _visualizer_classes():
    from mmengine.visualization import Visualizer
    out, todo = [], [Visualizer]
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo += cls.__subclasses__()
    return out


@pytest.fixture(autouse=True)
def _forget_new_visualizers():
    """mmengine keeps every visualizer in process-wide registries, and a
    later runner's hooks take the latest one (``get_current_instance``):
    the ones these runners create are removed again afterwards."""
    before = {cls: set(cls._instance_dict) for cls in _visualizer_classes()}
    yield
    for cls in _visualizer_classes():
        for name in set(cls._instance_dict) - before.get(cls, set()):
            del cls._instance_dict[name]


def test_only_mu_anneals_the_temperature_over_the_run():
    hook = BudgetLossHook(mu=0.9)
    assert hook.tau_anneal_iters is None and hook.calibrate_at_end
    assert hook.tau_at(10 ** 6) == 1.0  # no runner yet: nothing to anneal over
    hook.anneal_iters = 400  # what before_train sets from runner.max_iters (tested below)
    assert hook.tau_at(0) == 1.0 and hook.tau_at(400) == pytest.approx(0.2)
    assert hook.tau_at(200) == pytest.approx(0.2 ** 0.5)
    fixed = BudgetLossHook(mu=0.9, tau_anneal_iters=0)  # explicit 0: the old constant tau
    assert fixed.tau_at(1000) == 1.0
    given = BudgetLossHook(mu=0.9, tau_end=0.5, tau_anneal_iters=10)
    assert given.anneal_iters == 10 and given.tau_at(10) == pytest.approx(0.5)


@pytest.mark.parametrize('kwargs, match', [
    (dict(calibration_images=-1), 'calibration_images'),
    (dict(calibration_images=2.5), 'calibration_images'),
    (dict(calibration_tol=0.0), 'calibration_tol'),
    (dict(tau_anneal_iters=-3), 'tau_anneal_iters')])
def test_bad_end_of_training_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BudgetLossHook(mu=1.0, **kwargs)


def _train(runner: Runner, level: int = logging.INFO) -> list:
    """Trains ``runner``; returns the messages mmengine logged at ``level`` or above."""
    messages = []
    handler = logging.Handler(level=level)
    handler.emit = lambda record: messages.append(record.getMessage())
    MMLogger.get_current_instance().addHandler(handler)
    try:
        runner.train()
    finally:
        MMLogger.get_current_instance().removeHandler(handler)
    return messages


def _det_or_seg(task: str, tmp_path: Path) -> Config:
    """The shrunk toy config on a 16 + 8 image set; its test loader (the val
    images) keeps them at ``SIZE``."""
    root = tmp_path / 'data'
    generate_toy_dataset(root, num_train=48, num_val=16, image_size=SIZE, seed=3)
    if task == 'detection':
        cfg = det_toy_cfg(root, tmp_path / 'work', iters=2)
        cfg.test_dataloader.dataset.pipeline[1].scale = (SIZE[1], SIZE[0])
        cfg.model.test_cfg.rpn.max_per_img = 50
        cfg.model.test_cfg.rpn.nms_pre = 200
    else:
        cfg = seg_toy_cfg(root, tmp_path / 'work', iters=2)
        resize = next(t for t in cfg.test_dataloader.dataset.pipeline if t.type == 'Resize')
        resize.scale = (SIZE[1], SIZE[0])
    cfg.visualizer.name = f'hook_defaults_{task}'  # see _forget_new_visualizers
    return cfg


def _cls(tmp_path: Path) -> Config:
    data = generate_toy_classification(tmp_path / 'data', num_train=16, num_val=8,
                                       image_size=(64, 64), seed=3)['root']
    cfg = Config.fromfile(str(CLS_TOY))
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[loader].dataset.data_root = data
    shrink(cfg, tmp_path / 'work', 2)
    cfg.train_dataloader.batch_size = 4
    cfg.visualizer.name = 'hook_defaults_classification'  # see _forget_new_visualizers
    return cfg


@pytest.mark.parametrize('task', ['classification', 'detection', 'segmentation'])
def test_a_hook_with_only_mu_leaves_a_checkpoint_that_spends_mu(task, tmp_path):
    """Trained two iterations with ``custom_hooks = [BudgetLossHook(mu)]``,
    the last checkpoint spends ``mu`` within 0.05 on held-out images
    (``tools/get_flops.py`` on the val split), and the run logged the spend
    before and after the calibration."""
    mu = 0.8
    cfg = _cls(tmp_path) if task == 'classification' else _det_or_seg(task, tmp_path)
    cfg.custom_hooks = [dict(type='BudgetLossHook', mu=mu)]
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=10 ** 6, by_epoch=False)
    runner = Runner.from_cfg(cfg)  # saves iter_2.pth at the last iteration
    logs = _train(runner)
    hook = next(h for h in runner.hooks if isinstance(h, BudgetLossHook))
    assert hook.anneal_iters == 2  # the run's length
    report = hook.end_report
    assert report["images"] == N_TRAIN[task] and abs(report['spend'] - mu) <= 0.01 * mu + 1e-9
    assert any('calibrated to mu=0.8' in m and '->' in m for m in logs), logs
    path = tmp_path / 'cfg.py'
    cfg.dump(str(path))
    flops = load_tool('get_flops').main([
        str(path), '--checkpoint', str(tmp_path / 'work' / 'iter_2.pth'), '--split', 'test',
        '--num-images', '16', '--backbone-only'])
    assert abs(flops['ratios']['real/C_base'] - mu) <= 0.05, flops['ratios']


def test_without_calibration_a_missed_budget_gets_one_warning_line(tmp_path):
    """``calibrate_at_end=False``: the spend is measured and, off by more than
    5 %, one warning names it, ``mu`` and the command that fixes it."""
    cfg = _det_or_seg('detection', tmp_path)
    cfg.custom_hooks = [dict(type='BudgetLossHook', mu=0.3, calibrate_at_end=False)]
    runner = Runner.from_cfg(cfg)
    warnings = _train(runner, logging.WARNING)
    hook = next(h for h in runner.hooks if isinstance(h, BudgetLossHook))
    spend = hook.end_report['spend']
    assert abs(spend - 0.3) > 0.05 * 0.3  # two iterations do not reach mu = 0.3
    lines = [w for w in warnings if 'BudgetLossHook' in w]
    assert len(lines) == 1, lines
    assert f'{spend:.3f} x C_base' in lines[0] and 'mu=0.3' in lines[0]
    assert 'tools/calibrate_budget.py' in lines[0] and '--mu 0.3' in lines[0]
    assert str(tmp_path / 'work' / 'iter_2.pth') in lines[0]


def test_a_budget_out_of_reach_warns_and_still_saves_the_checkpoint(tmp_path):
    """Calibration that cannot succeed (no gate setting spends mu = 0.01)
    ends the run with a warning and the command, and loses nothing: the
    last checkpoint is written, uncalibrated."""
    cfg = _det_or_seg('detection', tmp_path)
    cfg.custom_hooks = [dict(type='BudgetLossHook', mu=0.01)]
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=10 ** 6, by_epoch=False)
    runner = Runner.from_cfg(cfg)
    warnings = _train(runner, logging.WARNING)
    lines = [w for w in warnings if 'BudgetLossHook' in w]
    assert len(lines) == 1 and 'could not calibrate to mu=0.01' in lines[0], lines
    assert 'outside what the gates can spend' in lines[0]
    assert 'tools/calibrate_budget.py' in lines[0]
    ckpt = torch.load(tmp_path / 'work' / 'iter_2.pth', map_location='cpu', weights_only=False)
    assert float(ckpt['state_dict']['backbone.dial.offset']) == 0.0
