"""Tests of the analysis tools (dit_mm.analysis, tools/get_flops.py,
tools/visualize_routing.py, tools/routing_stats.py) on a tiny toy set with a
randomly initialised DiT-b0 Mask R-CNN."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import matplotlib.image as mpimg
import pytest
from mm_utils import load_tool

from dit_mm import analysis
from dit_mm.datasets.toy_data import generate_toy_dataset
from dit_mm.models.backbone import DiT

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / 'configs' / 'detection' / 'mask_rcnn_dit_b0_toy.py')
SIZE = (128, 160)  # toy images; the test pipeline below keeps them at this size
NODES = [f's{i}_t{j}' for j in range(4) for i in range(j + 1)]


_tool = load_tool


@pytest.fixture(scope='module')
def cfg_options(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """``--cfg-options`` pointing the toy config at a 4 + 3 image set, with
    small inputs (no upscaling) and few proposals to keep the tests fast."""
    root = tmp_path_factory.mktemp('toy')
    info = generate_toy_dataset(root, num_train=4, num_val=3, image_size=SIZE)
    opts = []
    for loader in ('val_dataloader', 'test_dataloader'):
        opts += [f"{loader}.dataset.data_root={info['coco_root']}/",
                 f'{loader}.dataset.pipeline.1.scale=({SIZE[1]},{SIZE[0]})']
    opts += ['model.test_cfg.rpn.max_per_img=50', 'model.test_cfg.rpn.nms_pre=200']
    return opts


def _static_gflops(size: tuple[int, int]) -> float:
    return DiT(arch='b0').grid_cost(size).static / 1e9


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def test_get_flops(cfg_options: list[str], tmp_path: Path) -> None:
    out = tmp_path / 'flops.json'
    report = _tool('get_flops').main([CONFIG, '--num-images', '2', '--out', str(out),
                                      '--cfg-options', *cfg_options])
    assert out.is_file()
    saved = json.loads(out.read_text())
    assert saved['num_images'] == 2 and saved['input_sizes'] == {f'{SIZE[0]}x{SIZE[1]}': 2}
    g, r = saved['gflops'], saved['ratios']
    for part, keys in (('backbone', ('expected', 'real', 'static', 'full', 'static_counted')),
                       ('neck_heads', ('routed', 'static')),
                       ('whole', ('expected', 'real', 'static'))):
        for k in keys:
            assert _finite(g[part][k]) and g[part][k] > 0, (part, k, g[part][k])
    for k in ('real/C_base', 'expected/C_base', 'whole_real/whole_static',
              'whole_expected/whole_static'):
        assert _finite(r[k]) and r[k] > 0
    assert saved['mu'] == 1.0  # the toy config's BudgetLossHook
    bb = g['backbone']
    assert bb['real'] <= bb['full'] + 1e-9 and bb['expected'] <= bb['full'] + 1e-9
    assert bb['static'] == pytest.approx(_static_gflops(SIZE), rel=1e-9)
    assert bb['static_counted'] == pytest.approx(bb['static'], rel=1e-6)  # counter agrees
    assert g['whole']['real'] > bb['real'] and g['whole']['static'] > bb['static']
    assert g['whole']['real'] == pytest.approx(bb['real'] + g['neck_heads']['routed'])
    assert r['real/C_base'] == pytest.approx(bb['real'] / bb['static'], rel=1e-6)
    assert report['gflops'] == saved['gflops']


def test_get_flops_random_shape_static_routing(cfg_options: list[str]) -> None:
    """--shape measures a random input; static routing is exactly PVTv2."""
    report = _tool('get_flops').main(
        [CONFIG, '--shape', '64', '96', '--backbone-only', '--cfg-options', *cfg_options,
         'model.backbone.routing=static'])
    bb = report['gflops']['backbone']
    assert report['num_images'] == 1 and report['input_sizes'] == {'64x96': 1}
    assert 'whole' not in report['gflops']
    assert bb['real'] == pytest.approx(bb['static']) == pytest.approx(_static_gflops((64, 96)))
    assert report['ratios']['real/C_base'] == pytest.approx(1.0)


def test_visualize_routing(cfg_options: list[str], tmp_path: Path) -> None:
    out = tmp_path / 'fig' / 'routing.png'
    result = _tool('visualize_routing').main([CONFIG, '--index', '1', '--out', str(out),
                                              '--cfg-options', *cfg_options])
    assert out.is_file()
    img = mpimg.imread(out)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400
    assert img.std() > 0.01  # not a blank canvas
    assert sorted(result['keep']) == sorted(NODES)
    assert all(0.0 <= v <= 1.0 for v in result['keep'].values())  # dynamic: every node ran
    assert result['gflops']['real'] <= result['gflops']['full']


def test_visualize_routing_image_file_static(cfg_options: list[str], tmp_path: Path) -> None:
    img = next((Path(cfg_options[0].split('=', 1)[1]) / 'val').glob('*.jpg'))
    out = tmp_path / 'static.png'
    result = _tool('visualize_routing').main([CONFIG, '--img', str(img), '--routing', 'static',
                                              '--out', str(out), '--cfg-options', *cfg_options])
    assert out.is_file() and mpimg.imread(out).size > 0
    keep = result['keep']
    assert all(keep[f's{i}_t{i}'] == 1.0 for i in range(4))  # PVTv2's diagonal, dense
    assert all(keep[k] is None for k in NODES if k[1] != k[4])  # off-diagonal: not run


def test_routing_stats(cfg_options: list[str], tmp_path: Path) -> None:
    stats = _tool('routing_stats').main([CONFIG, '--num-images', '3', '--out-dir',
                                         str(tmp_path), '--cfg-options', *cfg_options])
    png, csv_path, json_path = (tmp_path / f'routing_stats.{e}' for e in ('png', 'csv', 'json'))
    assert png.is_file() and csv_path.is_file() and json_path.is_file()
    assert mpimg.imread(png).size > 0
    saved = json.loads(json_path.read_text())
    assert saved['num_images'] == 3
    assert sorted(saved['nodes']) == sorted(NODES) and len(saved['nodes']) == 10
    for node in saved['nodes'].values():
        assert 0.0 <= node['skip_real'] <= 1.0 and 0.0 <= node['skip_expected'] <= 1.0
        assert _finite(node['skip_real_std'])
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    assert [r['node'] for r in rows] == NODES
    assert all(0.0 <= float(r['skip_real']) <= 1.0 for r in rows)
    bb = saved['gflops']['backbone']
    assert bb['static'] == pytest.approx(_static_gflops(SIZE), rel=1e-9)
    assert bb['real'] <= bb['full'] + 1e-9
    assert stats['nodes'] == saved['nodes']


@pytest.mark.parametrize('tool', ['get_flops', 'visualize_routing', 'routing_stats'])
def test_missing_files_give_clear_errors(tool: str, tmp_path: Path) -> None:
    main = _tool(tool).main
    with pytest.raises(SystemExit, match='config file not found'):
        main([str(tmp_path / 'nope.py')])
    with pytest.raises(SystemExit, match='checkpoint not found'):
        main([CONFIG, '--checkpoint', str(tmp_path / 'missing.pth')])


def test_load_model_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match='config file not found'):
        analysis.load_model(str(tmp_path / 'nope.py'))
    with pytest.raises(FileNotFoundError, match='checkpoint not found'):
        analysis.load_model(CONFIG, str(tmp_path / 'missing.pth'))


def test_get_flops_loads_mmengine_checkpoint(tmp_path: Path) -> None:
    """A checkpoint with a MessageHub (HistoryBuffer) loads with the safe
    unpickler, and the tool measures the loaded weights: gates whose eval
    (EMA) bias says "keep" route every token, which costs the full grid plus
    the gates (a random init keeps far fewer)."""
    import torch
    from mmengine.logging import MessageHub

    _, model = analysis.load_model(CONFIG)
    state = model.state_dict()
    for key in state:
        if key.endswith('ema_bias') and ('row_gates' in key or 'col_gates' in key):
            state[key] = torch.tensor([0.0, 50.0])  # keep logit >> skip logit
    hub = MessageHub.get_instance('test_tools_ckpt')
    hub.update_scalar('train/loss', 1.0)
    ckpt = tmp_path / 'iter_1.pth'
    torch.save({'meta': {'iter': 1}, 'state_dict': state, 'message_hub': hub.state_dict()},
               ckpt)
    report = _tool('get_flops').main([CONFIG, '--checkpoint', str(ckpt), '--shape', '64', '96',
                                      '--backbone-only'])
    bb = report['gflops']['backbone']
    assert report['checkpoint'] == str(ckpt)
    assert bb['full'] <= bb['real'] < 1.05 * bb['full']
    assert bb['expected'] == pytest.approx(bb['real'], rel=1e-3)


def test_train_keeps_freed_memory_on_the_cpu_unless_told_not_to(monkeypatch) -> None:
    """``tools/train.py`` sets glibc to keep freed memory before it builds
    anything when training on the CPU (``--no-keep-freed-memory``: not)."""
    import torch
    train = _tool('train')
    calls = []

    def stop(args):
        raise SystemExit('stopped before the Runner')
    monkeypatch.setattr(train, 'keep_freed_memory', lambda: calls.append(1) or True)
    monkeypatch.setattr(train, 'build_config', stop)
    cases = ((False, [], 1), (True, [], 0), (False, ['--no-keep-freed-memory'], 0),
             (True, ['--keep-freed-memory'], 1))
    for cuda, flags, expected in cases:
        monkeypatch.setattr(torch.cuda, 'is_available', lambda cuda=cuda: cuda)
        calls.clear()
        with pytest.raises(SystemExit, match='stopped'):
            train.main(['any_config.py', *flags])
        assert len(calls) == expected, (cuda, flags)
