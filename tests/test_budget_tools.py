"""tools/calibrate_budget.py, tools/budget_sweep.py and tools/test.py --budget
on a tiny toy set with a randomly initialised DiT-b0 Mask R-CNN."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mm_utils import load_tool

from dit_mm import analysis
from dit_mm.analysis.calibration import collect_inputs, spend
from dit_mm.datasets.toy_data import generate_toy_dataset
from dit_mm.engine.hooks import find_dit

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / 'configs' / 'detection' / 'mask_rcnn_dit_b0_toy.py')
SIZE = (128, 160)


_tool = load_tool


@pytest.fixture(scope='module')
def toy(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 4 + 3 image toy set, the cfg options pointing the config at it, and
    a random-init checkpoint of the toy Mask R-CNN (gates spread so that
    they keep different tokens per image)."""
    root = tmp_path_factory.mktemp('toy_budget')
    info = generate_toy_dataset(root, num_train=4, num_val=3, image_size=SIZE)
    opts = [f"train_dataloader.dataset.data_root={info['coco_root']}/"]
    for loader in ('val_dataloader', 'test_dataloader'):
        opts += [f"{loader}.dataset.data_root={info['coco_root']}/",
                 f'{loader}.dataset.pipeline.1.scale=({SIZE[1]},{SIZE[0]})']
    opts += [f"val_evaluator.ann_file={info['coco_root']}/annotations/instances_val.json",
             f"test_evaluator.ann_file={info['coco_root']}/annotations/instances_val.json",
             'model.test_cfg.rpn.max_per_img=50', 'model.test_cfg.rpn.nms_pre=200']
    _, model = analysis.load_model(CONFIG)
    backbone = find_dit(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for g in list(backbone.row_gates.values()) + list(backbone.col_gates.values()):
            g.ema_weight.copy_(torch.randn(g.ema_weight.shape, generator=gen)
                               * 2.0 / g.ema_weight.shape[1] ** 0.5)
            g.ema_bias.zero_()
    ckpt = root / 'iter_1.pth'
    torch.save({'meta': {'iter': 1}, 'state_dict': model.state_dict()}, ckpt)
    return dict(opts=opts, ckpt=str(ckpt), root=root)


def _options(opts: list[str]) -> dict:
    import argparse

    from mmengine.config import DictAction
    parser = argparse.ArgumentParser()
    parser.add_argument('--o', nargs='+', action=DictAction)
    return parser.parse_args(['--o', *opts]).o


@pytest.fixture(scope='module')
def calibrated(toy: dict) -> dict:
    out = toy['root'] / 'calibrated.pth'
    report = _tool('calibrate_budget').main(
        [CONFIG, toy['ckpt'], '--mu', '0.9', '--split', 'train', '--out', str(out),
         '--report', str(toy['root'] / 'cal.json'), '--cfg-options', *toy['opts']])
    return dict(report=report, path=str(out))


def test_calibrate_budget_writes_a_checkpoint_that_spends_mu(toy, calibrated):
    rep = calibrated['report']
    assert abs(rep['spend'] - 0.9) <= 0.01 * 0.9
    assert rep['num_images'] == 4 and rep['split'] == 'train'
    assert json.loads((toy['root'] / 'cal.json').read_text())['offset'] == rep['offset']
    ckpt = torch.load(calibrated['path'], map_location='cpu', weights_only=False)
    assert ckpt['meta']['dit_calibration']['mu'] == 0.9
    assert float(ckpt['state_dict']['backbone.dial.offset']) == pytest.approx(rep['offset'])
    # loading it as usual runs the calibrated model
    cfg, model = analysis.load_model(CONFIG, calibrated['path'], _options(toy['opts']))
    inputs = collect_inputs(cfg, model, 'train')
    assert abs(spend(find_dit(model), inputs) - 0.9) <= 0.01 * 0.9
    # the source checkpoint is unchanged: offset 0, no curve
    _, plain = analysis.load_model(CONFIG, toy['ckpt'], _options(toy['opts']))
    assert float(find_dit(plain).dial.offset) == 0.0 and not find_dit(plain).dial.has_curve
    assert spend(find_dit(plain), inputs) == pytest.approx(rep['spend_before'], rel=1e-5)


def test_calibrate_budget_errors(toy, tmp_path):
    tool = _tool('calibrate_budget')
    with pytest.raises(SystemExit):
        tool.main([CONFIG, toy['ckpt'], '--mu', '0.5', '--out', toy['ckpt']])  # overwrite
    with pytest.raises(SystemExit, match='checkpoint not found'):
        tool.main([CONFIG, str(tmp_path / 'nope.pth'), '--mu', '0.5',
                   '--out', str(tmp_path / 'o.pth')])
    with pytest.raises(ValueError, match='outside what the gates can spend'):
        tool.main([CONFIG, toy['ckpt'], '--mu', '2.9', '--out', str(tmp_path / 'o.pth'),
                   '--cfg-options', *toy['opts']])


def test_budget_sweep_two_dials(toy, calibrated, tmp_path):
    lo, hi = calibrated['report']['spend_range']
    budgets = [0.6, 1.2]
    assert lo < budgets[0] and budgets[-1] < hi
    res = _tool('budget_sweep').main(
        [CONFIG, calibrated['path'], '--budgets', *map(str, budgets), '--keep-ratios', '0.5',
         '1.0', '--out-dir', str(tmp_path), '--cfg-options', *toy['opts']])
    rows = res['rows']
    assert [(r['dial'], r['setting']) for r in rows] == [
        ('budget', 0.6), ('budget', 1.2), ('keep_ratio', 0.5), ('keep_ratio', 1.0)]
    assert all('coco/bbox_mAP' in r['metrics'] and r['images'] == 3 for r in rows)
    budget_rows = [r for r in rows if r['dial'] == 'budget']
    assert budget_rows[0]['real'] < budget_rows[1]['real']
    keep_rows = [r for r in rows if r['dial'] == 'keep_ratio']
    assert keep_rows[0]['real'] < keep_rows[1]['real']
    for name in ('budget_sweep.json', 'budget_sweep.md', 'budget_sweep.png'):
        assert (tmp_path / name).stat().st_size > 0
    assert '| budget | 0.60' in (tmp_path / 'budget_sweep.md').read_text()


def test_budget_sweep_and_test_tool_refuse_what_the_curve_does_not_cover(toy, calibrated,
                                                                          tmp_path):
    with pytest.raises(SystemExit, match='no spend curve'):
        _tool('budget_sweep').main([CONFIG, toy['ckpt'], '--budgets', '0.5',
                                    '--out-dir', str(tmp_path), '--cfg-options', *toy['opts']])
    with pytest.raises(SystemExit, match='outside the calibrated range'):
        _tool('budget_sweep').main([CONFIG, calibrated['path'], '--budgets', '9.0',
                                    '--out-dir', str(tmp_path), '--cfg-options', *toy['opts']])
    test_tool = _tool('test')
    with pytest.raises(SystemExit, match='calibrate_budget.py'):
        test_tool.main([CONFIG, toy['ckpt'], '--budget', '0.5', '--work-dir', str(tmp_path),
                        '--cfg-options', *toy['opts']])
    with pytest.raises(SystemExit, match='outside the calibrated range'):
        test_tool.main([CONFIG, calibrated['path'], '--budget', '9.0',
                        '--work-dir', str(tmp_path), '--cfg-options', *toy['opts']])


def test_test_tool_budget_runs_the_dial(toy, calibrated, tmp_path):
    out = tmp_path / 'm.json'
    metrics = _tool('test').main([CONFIG, calibrated['path'], '--budget', '0.7',
                                  '--work-dir', str(tmp_path), '--metrics-json', str(out),
                                  '--cfg-options', *toy['opts']])
    assert 'coco/bbox_mAP' in metrics and out.is_file()
