"""``tools/test.py``: mmdet's, mmseg's and mmpretrain's test flags (``--out``,
``--show``, ``--show-dir``, ``--wait-time``, ``--tta``) on the toy configs
with randomly initialised checkpoints and tiny generated data sets, their
errors, and ``DetMaskTTAModel`` (flip TTA with instance masks)."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from mm_utils import load_tool
from mmengine.config import Config
from mmengine.model import BaseModel
from mmengine.registry import init_default_scope
from PIL import Image

from conftest import make_dit
from dit_mm.datasets.toy_classification import generate_toy_classification
from dit_mm.datasets.toy_data import generate_toy_dataset
from dit_mm.engine import DetMaskTTAModel, find_dit

REPO = Path(__file__).resolve().parents[1]
DET = str(REPO / 'configs' / 'detection' / 'mask_rcnn_dit_b0_toy.py')
SEG = str(REPO / 'configs' / 'segmentation' / 'fpn_dit_b0_toy.py')
CLS = str(REPO / 'configs' / 'classification' / 'dit_b0_toy.py')
SIZE = (128, 160)  # (h, w) of the generated images; the pipelines keep them at this size
NUM_VAL = 2


_tool = load_tool


TEST = _tool('test')


pytestmark = pytest.mark.usefixtures('one_thread')


def _checkpoint(config: str, scope: str, path: Path) -> str:
    """A randomly initialised model of ``config``, saved as a checkpoint."""
    from mmengine.registry import MODELS
    init_default_scope(scope)
    cfg = Config.fromfile(config)
    if 'data_preprocessor' in cfg and 'data_preprocessor' not in cfg.model:
        cfg.model.data_preprocessor = cfg.data_preprocessor
    model = MODELS.build(cfg.model)
    model.init_weights()
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, path)
    return str(path)


@pytest.fixture(scope='module')
def toy(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp('toy_test_tool')
    info = generate_toy_dataset(root / 'data', num_train=1, num_val=NUM_VAL, image_size=SIZE)
    coco, seg = info['coco_root'], info['seg_root']
    scale = f'({SIZE[1]},{SIZE[0]})'
    det = [f'test_dataloader.dataset.data_root={coco}/',
           f'test_dataloader.dataset.pipeline.1.scale={scale}',
           f'test_evaluator.ann_file={coco}/annotations/instances_val.json',
           f'tta_pipeline.1.transforms.0.0.scale={scale}',
           'model.test_cfg.rpn.max_per_img=50', 'model.test_cfg.rpn.nms_pre=200',
           'model.test_cfg.rcnn.max_per_img=20']
    seg_opts = [f'test_dataloader.dataset.data_root={seg}',
                f'test_dataloader.dataset.pipeline.1.scale={scale}']
    return dict(root=root, info=info, det=det, seg=seg_opts,
                det_ckpt=_checkpoint(DET, 'mmdet', root / 'det.pth'),
                seg_ckpt=_checkpoint(SEG, 'mmseg', root / 'seg.pth'))


def _val_images(toy: dict, kind: str) -> list[str]:
    folder = Path(toy['info']['coco_img_dirs']['val'] if kind == 'det'
                  else toy['info']['seg_img_dirs']['val'])
    names = sorted(p.name for p in folder.glob('*.jpg'))
    assert len(names) == NUM_VAL
    return names


# ------------------------------------------------------------------ mmdet
def test_det_out_pickle_and_show_dir(toy: dict, tmp_path: Path) -> None:
    out = tmp_path / 'preds.pkl'
    metrics = TEST.main([DET, toy['det_ckpt'], '--work-dir', str(tmp_path), '--out', str(out),
                         '--show-dir', 'painted', '--cfg-options', *toy['det']])
    assert 'coco/bbox_mAP' in metrics and 'coco/segm_mAP' in metrics
    with open(out, 'rb') as f:
        preds = pickle.load(f)
    assert isinstance(preds, list) and len(preds) == NUM_VAL  # one entry per image
    names = _val_images(toy, 'det')
    assert sorted(Path(p['img_path']).name for p in preds) == names
    for p in preds:
        inst = p['pred_instances']
        n = len(inst['scores'])
        assert inst['bboxes'].shape == (n, 4) and len(inst['labels']) == n <= 20
        assert len(inst['masks']) == n  # RLE-encoded masks, one per detection
        assert 'gt_instances' not in p
    # mmdet's DetVisualizationHook: WORK_DIR/TIMESTAMP/painted, one picture per image
    (painted, ) = tmp_path.glob('*/painted')
    assert sorted(p.name for p in painted.iterdir()) == names
    for name in names:  # ground truth beside the predictions
        assert Image.open(painted / name).size == (2 * SIZE[1], SIZE[0])


def test_det_tta(toy: dict, tmp_path: Path) -> None:
    out = tmp_path / 'tta.pickle'
    metrics = TEST.main([DET, toy['det_ckpt'], '--work-dir', str(tmp_path), '--tta',
                         '--out', str(out), '--cfg-options', *toy['det']])
    assert 'coco/bbox_mAP' in metrics and 'coco/segm_mAP' in metrics
    with open(out, 'rb') as f:
        preds = pickle.load(f)
    assert len(preds) == NUM_VAL
    for p in preds:
        assert p['flip'] is True  # the first of the two views (flip TTA) carries the result
        inst = p['pred_instances']
        assert len(inst['masks']) == len(inst['scores']) <= 50  # tta_cfg.max_per_img
        boxes = inst['bboxes']
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= SIZE[1]).all()


class _Detector(BaseModel):
    """What a TTA model wraps: anything with ``test_step``."""

    def forward(self, *args, **kwargs):
        raise NotImplementedError


def test_det_mask_tta_model_merges_views() -> None:
    """Two views of an 8 x 10 image: a horizontally flipped one with an
    object in flipped coordinates, and the plain one with the same object
    (lower score) and another one. NMS keeps the flipped view's object,
    brought back (box and mask), and the other one."""
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData
    h, w = 8, 10
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[1:5, 0:3] = True  # the object, at x in [0, 3)
    other = torch.zeros(h, w, dtype=torch.bool)
    other[5:8, 6:10] = True

    def view(flip, boxes, scores, masks):
        s = DetDataSample(metainfo=dict(ori_shape=(h, w), flip=flip,
                                        flip_direction='horizontal' if flip else None))
        s.pred_instances = InstanceData(bboxes=torch.tensor(boxes), scores=torch.tensor(scores),
                                        labels=torch.tensor([0] * len(scores)),
                                        masks=torch.stack(masks))
        return s

    flipped = view(True, [[7., 1., 10., 5.]], [0.9], [mask.flip(-1)])
    plain = view(False, [[0., 1., 3., 5.], [6., 5., 10., 8.]], [0.6, 0.7], [mask, other])
    tta = DetMaskTTAModel(module=_Detector(),
                          tta_cfg=dict(nms=dict(type='nms', iou_threshold=0.5), max_per_img=5))
    (merged, ) = tta.merge_preds([[flipped, plain]])
    pred = merged.pred_instances
    assert pred.scores.tolist() == pytest.approx([0.9, 0.7])
    assert pred.bboxes.tolist() == [[0., 1., 3., 5.], [6., 5., 10., 8.]]
    assert torch.equal(pred.masks[0], mask) and torch.equal(pred.masks[1], other)
    tta.tta_cfg['max_per_img'] = 1
    (top, ) = tta.merge_preds([[view(True, [[7., 1., 10., 5.]], [0.9], [mask.flip(-1)]),
                                view(False, [[6., 5., 10., 8.]], [0.7], [other])]])
    assert len(top.pred_instances) == 1 and torch.equal(top.pred_instances.masks[0], mask)
    with pytest.raises(ValueError, match='max_per_img'):
        DetMaskTTAModel(module=_Detector(), tta_cfg=dict(nms=dict(type='nms')))


def test_find_dit_through_a_tta_model() -> None:
    """``--budget`` with ``--tta`` finds the backbone inside the TTA wrapper."""
    detector = _Detector()
    detector.backbone = make_dit('b0')
    tta = DetMaskTTAModel(module=detector, tta_cfg=dict(nms=dict(type='nms'), max_per_img=1))
    assert find_dit(tta) is detector.backbone


# ------------------------------------------------------------------ mmseg
def test_seg_out_dir_and_show_dir(toy: dict, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # away from the repository, so that the config's training data (data/toy, relative)
    # is not there, as on a fresh clone: a test must not build the training data set
    monkeypatch.chdir(tmp_path)
    out, painted = tmp_path / 'labels', tmp_path / 'painted'
    metrics = TEST.main([SEG, toy['seg_ckpt'], '--work-dir', str(tmp_path / 'work'),
                         '--out', str(out), '--show-dir', str(painted),
                         '--cfg-options', *toy['seg']])
    assert 'mIoU' in metrics
    names = _val_images(toy, 'seg')
    stems = sorted(Path(n).stem for n in names)
    assert sorted(p.stem for p in out.glob('*.png')) == stems  # one label map per image
    for stem in stems:
        labels = np.array(Image.open(out / f'{stem}.png'))
        assert labels.shape == SIZE and labels.max() < 4  # the toy set's 4 classes
    # mmseg: the visualizer's save_dir, one picture per image
    pictures = sorted(painted.glob('vis_data/vis_image/*.png'))
    assert len(pictures) == NUM_VAL
    assert all(any(Path(n).name in p.name for p in pictures) for n in names)


# ------------------------------------------------------------- mmpretrain
def test_cls_out_pickle_and_show_dir(tmp_path: Path) -> None:
    data = generate_toy_classification(tmp_path / 'data', num_train=6, num_val=6,
                                       image_size=(64, 64))['root']
    ckpt = _checkpoint(CLS, 'mmpretrain', tmp_path / 'cls.pth')
    out, painted = tmp_path / 'preds.pkl', tmp_path / 'painted'
    metrics = TEST.main([CLS, ckpt, '--work-dir', str(tmp_path / 'work'), '--out', str(out),
                         '--show-dir', str(painted), '--cfg-options',
                         f'test_dataloader.dataset.data_root={data}'])
    assert 'accuracy/top1' in metrics
    with open(out, 'rb') as f:
        preds = pickle.load(f)
    assert len(preds) == 6 and all(p['pred_score'].shape == (6, ) for p in preds)
    assert len(list(painted.glob('*.png'))) == 6  # every image, not every 5000th


# ------------------------------------------------------ wiring and errors
@pytest.fixture()
def ckpt(tmp_path: Path) -> str:
    path = tmp_path / 'any.pth'
    path.write_bytes(b'')  # build_config only checks that it exists
    return str(path)


def _cfg(*argv: str) -> Config:
    return TEST.build_config(TEST.parse_args(list(argv)))


@pytest.mark.parametrize('config', [DET, SEG, CLS], ids=['mmdet', 'mmseg', 'mmpretrain'])
def test_show_is_wired(config: str, ckpt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A window cannot open here; the hook gets ``show`` and ``wait_time``."""
    monkeypatch.setenv('DISPLAY', ':99')
    hook = _cfg(config, ckpt, '--show', '--wait-time', '0.5').default_hooks.visualization
    assert hook.show is True and hook.wait_time == 0.5
    assert hook.get('draw', hook.get('enable')) is True
    monkeypatch.delenv('DISPLAY')
    monkeypatch.delenv('WAYLAND_DISPLAY', raising=False)
    with pytest.raises(SystemExit, match='no display'):
        _cfg(config, ckpt, '--show')


def test_flags_leave_the_config_alone_when_not_given(ckpt: str) -> None:
    cfg = _cfg(DET, ckpt)
    assert not cfg.default_hooks.visualization.get('draw', False)
    assert 'test_out_dir' not in cfg.default_hooks.visualization
    assert cfg.model.type == 'MaskRCNN'
    tta = _cfg(DET, ckpt, '--tta', '--keep-ratio', '0.5')
    assert tta.model.type == 'DetMaskTTAModel' and tta.model.module.type == 'MaskRCNN'
    assert tta.model.module.backbone.keep_ratio == 0.5
    assert tta.test_dataloader.dataset.pipeline[1]['type'] == 'TestTimeAug'
    seg = _cfg(SEG, ckpt, '--out', 'labels')
    assert seg.test_evaluator.output_dir == 'labels' and seg.test_evaluator.keep_results


@pytest.mark.parametrize('config, argv, message', [
    (DET, ['--out', 'preds.json'], r'\.pkl or \.pickle'),
    (CLS, ['--out', 'preds'], r'\.pkl or \.pickle'),
    (SEG, ['--out', 'preds.pkl'], 'is a directory'),
    (CLS, ['--tta'], 'no tta_model and no tta_pipeline'),
    (DET, ['--tta', '--cfg-options', 'tta_model.type=DetTTAModel'], 'DetMaskTTAModel'),
    (DET, ['--show-dir', 'x', '--cfg-options', 'default_hooks.visualization=None'],
     'no default_hooks.visualization'),
    (DET, ['--out', 'x.pkl', '--cfg-options', 'default_scope=None'], 'default_scope=None'),
], ids=['det-suffix', 'cls-suffix', 'seg-file', 'no-tta', 'det-tta-masks', 'no-vis-hook',
        'no-scope'])
def test_bad_combinations(config: str, argv: list, message: str, ckpt: str) -> None:
    with pytest.raises(SystemExit, match=message):
        _cfg(config, ckpt, *argv)


def test_bad_wait_time(ckpt: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        TEST.parse_args([DET, ckpt, '--show', '--wait-time', '-1'])
    assert '--wait-time -1' in capsys.readouterr().err


def test_det_static_shapes_equal_the_eager_keep_ratio(toy: dict, tmp_path: Path) -> None:
    """``--static-shapes`` with ``--keep-ratio``: the same predictions as the
    eager top-k routing (the static-shape form computes the same tokens)."""
    preds = {}
    for name, flags in (('eager', []), ('static', ['--static-shapes'])):
        out = tmp_path / f'{name}.pkl'
        TEST.main([DET, toy['det_ckpt'], '--work-dir', str(tmp_path / name), '--keep-ratio',
                   '0.5', '--out', str(out), *flags, '--cfg-options', *toy['det']])
        with open(out, 'rb') as f:
            preds[name] = pickle.load(f)
    for a, b in zip(preds['eager'], preds['static']):
        ia, ib = a['pred_instances'], b['pred_instances']
        assert len(ia['scores']) == len(ib['scores']) > 0
        assert torch.allclose(torch.as_tensor(ia['scores']), torch.as_tensor(ib['scores']),
                              atol=1e-4)
        assert torch.allclose(torch.as_tensor(ia['bboxes']), torch.as_tensor(ib['bboxes']),
                              atol=1e-2)


def test_static_shapes_without_capacities_names_the_calibration(toy: dict,
                                                                 tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match='calibrate_budget.py'):
        TEST.main([DET, toy['det_ckpt'], '--work-dir', str(tmp_path), '--static-shapes',
                   '--cfg-options', *toy['det']])
