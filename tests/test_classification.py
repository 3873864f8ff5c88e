"""The classification path through mmpretrain (configs/classification).

* every ImageNet config loads, follows the paper's recipe and Table 1's
  budget, and its model (DiT-B0 substituted) takes one loss step with the
  budget loss;
* the toy classification set (generator);
* the toy config trains a few iterations through ``tools/train.py``, tests
  through ``tools/test.py``, and the analysis tools run on it;
* the hand-off: a classifier checkpoint written by ``tools/train.py``
  initialises the Mask R-CNN and Semantic FPN DiTs, every backbone tensor
  equal; a checkpoint of another arch fails with a clear message.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mm_utils import load_tool
from mmengine.config import Config

import dit_mm
from dit_mm.datasets.toy_classification import TOY_CLS_CLASSES, generate_toy_classification
from dit_mm.engine.hooks import BudgetLossHook, install_budget_loss

REPO = Path(__file__).resolve().parents[1]
CLS_DIR = REPO / 'configs' / 'classification'
IN1K = sorted(CLS_DIR.glob('dit_b*_in1k*.py'))
TOY = CLS_DIR / 'dit_b0_toy.py'
DET_TOY = REPO / 'configs' / 'detection' / 'mask_rcnn_dit_b0_toy.py'
SEG_TOY = REPO / 'configs' / 'segmentation' / 'fpn_dit_b0_toy.py'

# Table 1: DiT GFLOPs, PVTv2 GFLOPs, DiT top-1
TABLE1 = {'b1': (2.0, 2.1, 79.9), 'b2': (3.8, 4.0, 83.1), 'b3': (6.8, 6.9, 84.2),
          'b4': (9.9, 10.1, 84.5), 'b5': (10.3, 11.8, 84.8)}
ABLATIONS = {'static': dict(routing='static'), 'full': dict(routing='full'),
             'random_gate': dict(gate='random'), 'attention_gate': dict(gate='attention'),
             'scale_only': dict(depth_routing=False), 'depth_only': dict(scale_routing=False)}


_tool = load_tool


def _hook(cfg: Config) -> dict:
    return next(h for h in cfg.custom_hooks if h['type'] == 'BudgetLossHook')


def test_all_configs_found() -> None:
    names = {p.stem for p in IN1K}
    expected = {f'dit_b{i}_in1k' for i in range(1, 6)}
    expected |= {f'dit_b2_in1k_{a}' for a in ABLATIONS}
    assert expected == names, sorted(expected ^ names)
    listed = (REPO / 'configs' / 'README.md').read_text()
    for name in sorted(names | {TOY.stem}):
        assert f'{name}.py' in listed, f'configs/README.md does not list {name}.py'


@pytest.mark.parametrize('path', IN1K, ids=lambda p: p.stem)
def test_in1k_recipe(path: Path) -> None:
    cfg = Config.fromfile(str(path))
    arch, _, ablation = path.stem[len('dit_'):].partition('_in1k')
    ablation = ablation.lstrip('_')
    bb = cfg.model.backbone
    assert cfg.model.type == 'ImageClassifier' and bb.type == 'DiT'
    assert bb.arch == arch and bb.out_indices == (3, )
    assert cfg.model.head.in_channels == 512 and cfg.model.head.num_classes == 1000
    assert cfg.model.head.loss == dict(type='LabelSmoothLoss', label_smooth_val=0.1,
                                       mode='original')
    augments = {a['type']: a['alpha'] for a in cfg.model.train_cfg.augments}
    assert augments == {'Mixup': 0.8, 'CutMix': 1.0}
    train = {t['type']: t for t in cfg.train_dataloader.dataset.pipeline}
    assert train['RandomResizedCrop']['scale'] == 224 and 'RandomFlip' in train
    test = {t['type']: t for t in cfg.val_dataloader.dataset.pipeline}
    assert test['CenterCrop']['crop_size'] == 224
    assert cfg.val_dataloader.dataset.type == 'ImageNet'
    opt = cfg.optim_wrapper.optimizer
    assert (opt.type, opt.lr, opt.weight_decay, tuple(opt.betas)) == (
        'AdamW', 1e-3, 0.05, (0.9, 0.999))
    assert cfg.train_cfg.max_epochs == 300
    assert cfg.param_scheduler[-1]['type'] == 'CosineAnnealingLR'
    assert cfg.train_dataloader.batch_size == 128 and cfg.auto_scale_lr.base_batch_size == 1024
    dit_gf, pvt_gf, top1 = TABLE1[arch]
    assert _hook(cfg)['mu'] == pytest.approx(dit_gf / pvt_gf, abs=1e-3)
    header = path.read_text()
    if not ablation:  # each leaf names the top-1 and GFLOPs it targets
        assert f'top-1 {top1}' in header and f'{dit_gf} GFLOPs' in header
    for key, value in ABLATIONS.get(ablation, {}).items():
        assert bb[key] == value
    if ablation == 'random_gate':  # the keep probability spends mu at 224^2
        from dit_mm.models.cost_model import grid_cost, uniform_keep_for_budget
        from dit_mm.models.grid import resolve_arch
        p = uniform_keep_for_budget(grid_cost(resolve_arch('b2'), 224, 224), _hook(cfg)['mu'])
        assert bb.random_keep_prob == pytest.approx(p, abs=1e-4)


@pytest.mark.parametrize('path', IN1K, ids=lambda p: p.stem)
def test_in1k_build_and_step(path: Path) -> None:
    """The config's classifier, DiT-B0 substituted, one AdamW step with
    Mixup/CutMix and the budget loss on two fake 64x64 images."""
    from mmpretrain.registry import MODELS
    from mmpretrain.structures import DataSample
    from mmpretrain.utils import register_all_modules
    register_all_modules()
    cfg = Config.fromfile(str(path))
    cfg.model.backbone.arch = 'b0'
    cfg.model.head.in_channels = 256
    cfg.model.setdefault('data_preprocessor', cfg.data_preprocessor)
    model = MODELS.build(cfg.model)
    model.init_weights()
    hook = BudgetLossHook(**{k: v for k, v in _hook(cfg).items() if k != 'type'})
    install_budget_loss(model, hook)
    model.train()
    data = {'inputs': [torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8) for _ in range(2)],
            'data_samples': [DataSample().set_gt_label(k) for k in (3, 7)]}
    batch = model.data_preprocessor(data, True)
    assert batch['data_samples'][0].gt_score.shape == (1000, )  # Mixup/CutMix soft labels
    losses = model.loss(batch['inputs'], batch['data_samples'])
    gated = model.backbone.routing == 'dynamic'
    assert ('loss_budget' in losses) == gated
    total = sum(v for k, v in losses.items() if 'loss' in k)
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in model.backbone.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


# ------------------------------------------------------------ toy data set
def test_toy_classification_set(tmp_path: Path) -> None:
    info = generate_toy_classification(tmp_path / 'a', num_train=12, num_val=6,
                                       image_size=(64, 64), seed=3)
    assert info['regenerated'] and info['classes'] == TOY_CLS_CLASSES
    assert list(TOY_CLS_CLASSES) == sorted(TOY_CLS_CLASSES)  # CustomDataset's label order
    root = Path(info['root'])
    files = sorted((root / 'train').rglob('*.jpg'))
    assert len(files) == 12 and len(list((root / 'val').rglob('*.jpg'))) == 6
    counts = {c: len(list((root / 'train' / c).glob('*.jpg'))) for c in TOY_CLS_CLASSES}
    assert set(counts.values()) == {2}  # balanced
    meta = json.loads((root / 'meta' / 'train.json').read_text())
    lo, hi = info['size_range']
    assert all(lo <= m['size'] <= hi for m in meta)
    assert all(m['file'].split('/')[0] == TOY_CLS_CLASSES[m['label']] for m in meta)
    # same arguments: reused; same seed elsewhere: the same pixels
    assert not generate_toy_classification(root, num_train=12, num_val=6, image_size=(64, 64),
                                           seed=3)['regenerated']
    other = generate_toy_classification(tmp_path / 'b', num_train=12, num_val=6,
                                        image_size=(64, 64), seed=3)
    assert (Path(other['root']) / 'train' / meta[5]['file']).read_bytes() == (
        root / 'train' / meta[5]['file']).read_bytes()
    with pytest.raises(ValueError, match='32x32'):
        generate_toy_classification(tmp_path / 'c', image_size=(16, 64))
    (tmp_path / 'd' / 'train').mkdir(parents=True)
    with pytest.raises(FileExistsError):
        generate_toy_classification(tmp_path / 'd', num_train=6, num_val=6)


def test_toy_objects_span_scales() -> None:
    """Objects from a few pixels to most of the image: mask extents follow
    the requested size."""
    from dit_mm.datasets.toy_classification import render_object
    rng = np.random.default_rng(0)
    for name in TOY_CLS_CLASSES:
        for size in (6.0, 80.0):
            mask = render_object(rng, name, size, 96, 96)
            ys, xs = np.nonzero(mask)
            extent = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
            assert 0.5 * size <= extent <= 1.3 * size + 2, (name, size, extent)


# --------------------------------------------------- training and the tools
@pytest.fixture(scope='module')
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The toy config trained for 3 iterations on a tiny set through
    ``tools/train.py`` (evaluated at the end), and its checkpoint."""
    tmp = tmp_path_factory.mktemp('cls')
    data = generate_toy_classification(tmp / 'data', num_train=12, num_val=6,
                                       image_size=(64, 64))['root']
    opts = [f'{k}.dataset.data_root={data}'
            for k in ('train_dataloader', 'val_dataloader', 'test_dataloader')]
    work = tmp / 'work'
    train_opts = opts + ['train_cfg.max_iters=3', 'train_cfg.val_interval=3',
                         'param_scheduler.0.end=1', 'param_scheduler.1.begin=1',
                         'param_scheduler.1.end=3', 'custom_hooks.0.warmup_iters=1',
                         'default_hooks.checkpoint.interval=3', 'default_hooks.logger.interval=1',
                         'train_dataloader.batch_size=4']
    proc = subprocess.run([sys.executable, str(REPO / 'tools' / 'train.py'), str(TOY),
                           '--work-dir', str(work), '--cfg-options', *train_opts],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'accuracy/top1' in proc.stdout + proc.stderr
    ckpt = work / 'iter_3.pth'
    assert ckpt.is_file()
    return {'ckpt': str(ckpt), 'opts': opts, 'tmp': tmp}


def test_toy_test_tool(trained: dict) -> None:
    out = trained['tmp'] / 'metrics.json'
    proc = subprocess.run([sys.executable, str(REPO / 'tools' / 'test.py'), str(TOY),
                           trained['ckpt'], '--work-dir', str(trained['tmp'] / 'test'),
                           '--metrics-json', str(out), '--cfg-options', *trained['opts']],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    top1 = json.loads(out.read_text())['accuracy/top1']
    assert 0.0 <= top1 <= 100.0


def test_budget_terms_logged(trained: dict) -> None:
    scalars = sorted(Path(trained['ckpt']).parent.glob('*/vis_data/scalars.json'))[-1]
    logged = [json.loads(line) for line in scalars.read_text().splitlines()]
    train = [r for r in logged if 'loss' in r]
    assert len(train) == 3
    assert all('loss_budget' in r and 'flops_real' in r for r in train)


def test_get_flops_on_classifier(trained: dict) -> None:
    report = _tool('get_flops').main([str(TOY), '--checkpoint', trained['ckpt'],
                                      '--num-images', '3', '--cfg-options', *trained['opts']])
    bb = report['gflops']['backbone']
    assert bb['static_counted'] == pytest.approx(bb['static'], rel=1e-6)
    assert 0 < report['ratios']['real/C_base'] <= bb['full'] / bb['static'] + 1e-6
    assert report['mu'] == pytest.approx(0.95)


def test_routing_stats_side_by_side(trained: dict, tmp_path: Path, toy_root: Path) -> None:
    """Fig. 4 as one command: the classifier on its data beside a detector
    on the toy COCO set."""
    det_opts = [f'{k}.dataset.data_root={toy_root}/coco/' for k in
                ('val_dataloader', 'test_dataloader')]
    stats = _tool('routing_stats').main(
        [str(TOY), '--checkpoint', trained['ckpt'], '--num-images', '3', '--out-dir',
         str(tmp_path), '--cfg-options', *trained['opts'], '--compare', str(DET_TOY),
         '--compare-cfg-options', *det_opts, '--labels', 'toy cls', 'toy coco'])
    assert stats['task'] == 'classification' and stats['compare']['task'] == 'detection'
    assert stats['input_sizes'] == {'64x64': 3}
    assert stats['compare']['num_images'] == 3
    assert (tmp_path / 'routing_stats_compare.png').stat().st_size > 10_000
    both = json.loads((tmp_path / 'routing_stats_compare.json').read_text())
    assert set(both) == {'toy cls', 'toy coco'}
    with pytest.raises(SystemExit):
        _tool('routing_stats').main([str(TOY), '--labels', 'a', 'b'])


def test_visualize_routing_on_classifier(trained: dict, tmp_path: Path) -> None:
    out = tmp_path / 'r.png'
    _tool('visualize_routing').main([str(TOY), '--checkpoint', trained['ckpt'], '--index', '1',
                                     '--out', str(out), '--cfg-options', *trained['opts']])
    assert out.stat().st_size > 10_000


# ------------------------------------------------------------ the hand-off
def _backbone_state(ckpt: str) -> dict:
    sd = torch.load(ckpt, map_location='cpu', weights_only=False)['state_dict']
    return {k[len('backbone.'):]: v for k, v in sd.items() if k.startswith('backbone.')}


@pytest.mark.parametrize('config', [DET_TOY, SEG_TOY], ids=['mask_rcnn', 'semantic_fpn'])
def test_classifier_checkpoint_initialises_det_seg(trained: dict, config: Path) -> None:
    from dit_mm import analysis
    from dit_mm.analysis import loading
    cfg = analysis.load_config(str(config))
    cfg.model.backbone.init_cfg = dict(type='Pretrained', checkpoint=trained['ckpt'])
    models, _ = loading._registries(cfg)
    model = models.build(cfg.model)
    model.init_weights()
    want = _backbone_state(trained['ckpt'])
    got = model.backbone.state_dict()
    assert set(got) == set(want)
    unequal = [k for k in want if not torch.equal(got[k], want[k])]
    assert not unequal, unequal[:5]
    # what this checks is not trivial: the extra nodes, gates and EMA
    # buffers of the trained checkpoint differ from a fresh model's
    fresh = dit_mm.DiT(arch='b0')
    fresh.init_weights()
    for key in ('stages.s0_t3.blocks.0.mlp.fc1.weight', 'row_gates.s1_t2.proj.weight',
                'row_gates.s1_t2.ema_weight', 'col_gates.s1_t3.ema_bias'):
        assert key in got and not torch.equal(fresh.state_dict()[key], got[key]), key


def test_classifier_checkpoint_of_another_arch(trained: dict, tmp_path: Path) -> None:
    # other widths: b0 classifier into a b1 backbone
    model = dit_mm.DiT(arch='b1', init_cfg=dict(type='Pretrained', checkpoint=trained['ckpt']))
    with pytest.raises(ValueError, match="looks like arch 'b0'.*model is arch 'b1'"):
        model.init_weights()
    # same widths, other depths: a DiT-b1 classifier checkpoint into DiT-b2
    b1 = dit_mm.DiT(arch='b1')
    path = tmp_path / 'b1_cls.pth'
    torch.save({'state_dict': {f'backbone.{k}': v for k, v in b1.state_dict().items()}}, path)
    model = dit_mm.DiT(arch='b2', init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    with pytest.raises(ValueError) as err:
        model.init_weights()
    msg = str(err.value)
    assert "looks like arch 'b1'" in msg and "model is arch 'b2'" in msg
    assert re.search(r'\d+ missing', msg)


def test_imagenet_loading_on_local_files(tmp_path: Path) -> None:
    """The ImageNet configs' data path is real: mmpretrain's ``ImageNet``
    dataset reads a tiny local copy in its layout through the configs'
    train and test pipelines."""
    import cv2
    from mmpretrain.registry import DATASETS
    from mmpretrain.utils import register_all_modules
    register_all_modules()
    rng = np.random.default_rng(0)
    for split, name in (('train', 'n01440764/n01440764_1.JPEG'), ('val', 'ILSVRC2012_val_1.JPEG')):
        img = tmp_path / split / name
        img.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(img), rng.integers(0, 255, (300, 400, 3), dtype=np.uint8))
        (tmp_path / 'meta').mkdir(exist_ok=True)
        (tmp_path / 'meta' / f'{split}.txt').write_text(f'{name} 7\n')
    cfg = Config.fromfile(str(CLS_DIR / 'dit_b2_in1k.py'))
    for loader in ('train_dataloader', 'val_dataloader'):
        ds_cfg = cfg[loader].dataset
        ds_cfg.data_root = str(tmp_path)
        dataset = DATASETS.build(ds_cfg)
        assert len(dataset) == 1
        item = dataset[0]
        assert tuple(item['inputs'].shape) == (3, 224, 224), loader
        assert int(item['data_samples'].gt_label) == 7
