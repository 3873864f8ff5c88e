"""Tests of the synthetic toy data set generator (dit_mm.datasets.toy_data)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

from dit_mm.datasets.toy_data import (
    TOY_CLASSES,
    TOY_SEG_CLASSES,
    TOY_SEG_PALETTE,
    generate_toy_dataset,
)

REPO = Path(__file__).resolve().parents[1]
SIZE = (128, 160)
NUM_TRAIN, NUM_VAL = 12, 4


@pytest.fixture(scope='module')
def toy(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 16-image set shared by the read-only tests."""
    root = tmp_path_factory.mktemp('toy')
    return generate_toy_dataset(root, num_train=NUM_TRAIN, num_val=NUM_VAL, image_size=SIZE,
                                seed=0)


def _coco(info: dict, split: str) -> COCO:
    return COCO(info['coco_ann_files'][split])


def _anns_by_image(coco: COCO) -> dict[int, list[dict]]:
    out = defaultdict(list)
    for ann in coco.dataset['annotations']:
        out[ann['image_id']].append(ann)
    return {k: sorted(v, key=lambda a: a['id']) for k, v in out.items()}


def _shoelace(flat: list[float]) -> float:
    xy = np.asarray(flat, dtype=np.float64).reshape(-1, 2)
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def test_constants() -> None:
    assert TOY_CLASSES == ('circle', 'square', 'triangle')
    assert TOY_SEG_CLASSES == ('background', 'circle', 'square', 'triangle')
    assert len(TOY_SEG_PALETTE) == len(TOY_SEG_CLASSES)
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in TOY_SEG_PALETTE)
    assert len(set(TOY_SEG_PALETTE)) == len(TOY_SEG_PALETTE)


def test_layout_and_return_value(toy: dict) -> None:
    root = Path(toy['root'])
    assert toy['num_train'] == NUM_TRAIN and toy['num_val'] == NUM_VAL
    assert tuple(toy['image_size']) == SIZE
    assert tuple(toy['classes']) == TOY_CLASSES
    assert toy['regenerated'] is True
    assert toy['backgrounds'], 'no scikit-image photo was usable as background'
    assert (root / '.toy_meta.json').is_file()
    for split, seg_split, n in (('train', 'training', NUM_TRAIN), ('val', 'validation', NUM_VAL)):
        coco_imgs = sorted(p.name for p in (root / 'coco' / split).glob('*.jpg'))
        seg_imgs = sorted(p.stem for p in (root / 'seg' / 'images' / seg_split).glob('*.jpg'))
        seg_anns = sorted(p.stem for p in (root / 'seg' / 'annotations' / seg_split).glob('*.png'))
        assert len(coco_imgs) == n
        assert seg_imgs == seg_anns == [Path(f).stem for f in coco_imgs]
        assert Path(toy['coco_ann_files'][split]).is_file()
        img = cv2.imread(str(root / 'coco' / split / coco_imgs[0]), cv2.IMREAD_UNCHANGED)
        assert img.shape == (*SIZE, 3) and img.dtype == np.uint8
        # The background is a photo / texture, not a flat colour.
        assert img.std() > 5


def test_coco_annotations_match_masks(toy: dict) -> None:
    """(a) polygon masks agree with the stored area and lie inside the bbox."""
    h, w = SIZE
    for split in ('train', 'val'):
        coco = _coco(toy, split)
        assert [c['name'] for c in coco.loadCats(coco.getCatIds())] == list(TOY_CLASSES)
        assert coco.getCatIds() == [1, 2, 3]
        assert len(coco.getImgIds()) == toy[f'num_{split}']
        for img in coco.dataset['images']:
            assert (img['height'], img['width']) == (h, w)
            assert (Path(toy['coco_img_dirs'][split]) / img['file_name']).is_file()
        for per_img in _anns_by_image(coco).values():
            assert 1 <= len(per_img) <= 6
        for ann in coco.dataset['annotations']:
            assert ann['iscrowd'] == 0
            assert isinstance(ann['segmentation'], list) and len(ann['segmentation']) == 1
            poly = ann['segmentation'][0]
            assert len(poly) % 2 == 0 and len(poly) >= 6
            mask = coco.annToMask(ann).astype(bool)
            area = int(mask.sum())
            assert area > 0
            assert abs(area - ann['area']) <= max(2.0, 0.02 * ann['area'])
            # The rasterised mask is the drawn polygon (not e.g. a box).
            geo = _shoelace(poly)
            assert abs(area - geo) <= 0.2 * geo + 4 * np.sqrt(geo) + 4, (area, geo)
            # bbox contains the mask, and is tight around it.
            x, y, bw, bh = ann['bbox']
            ys, xs = np.nonzero(mask)
            assert xs.min() >= x and xs.max() < x + bw
            assert ys.min() >= y and ys.max() < y + bh
            assert xs.min() - x < 1 and (x + bw) - xs.max() <= 2
            assert ys.min() - y < 1 and (y + bh) - ys.max() <= 2
            assert 0 <= x and 0 <= y and x + bw <= w and y + bh <= h


def test_object_scales_span_a_wide_range(toy: dict) -> None:
    """(b) object sizes differ widely over the 16-image set; all classes occur."""
    sides, cats = [], set()
    for split in ('train', 'val'):
        for ann in _coco(toy, split).dataset['annotations']:
            sides.append(np.sqrt(ann['area']))
            cats.add(ann['category_id'])
    assert len(sides) >= 16
    assert max(sides) / min(sides) > 4, (min(sides), max(sides))
    assert min(sides) < 16 and max(sides) > 0.3 * min(SIZE)
    assert cats == {1, 2, 3}


def test_semantic_labels_agree_with_coco_masks(toy: dict) -> None:
    """(c) png labels: union of instance masks, topmost object fully labelled."""
    for split in ('train', 'val'):
        coco = _coco(toy, split)
        by_img = _anns_by_image(coco)
        seg_dir = Path(toy['seg_ann_dirs'][split])
        for img in coco.dataset['images']:
            seg = cv2.imread(str(seg_dir / Path(img['file_name']).with_suffix('.png')),
                             cv2.IMREAD_UNCHANGED)
            assert seg.dtype == np.uint8 and seg.shape == SIZE
            assert set(np.unique(seg)) <= {0, 1, 2, 3}
            anns = by_img[img['id']]
            masks = [coco.annToMask(a).astype(bool) for a in anns]
            np.testing.assert_array_equal(seg > 0, np.logical_or.reduce(masks))
            # The last drawn object is not occluded: every pixel carries its class.
            top, top_mask = anns[-1], masks[-1]
            assert (seg[top_mask] == top['category_id']).all()
            # Its pixels in the photo are the painted solid colour (low spread).
            photo = cv2.imread(str(Path(toy['coco_img_dirs'][split]) / img['file_name']))
            inner = cv2.erode(top_mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
            if inner.sum() >= 30:
                assert photo[inner].astype(np.float64).std(axis=0).max() < 20
            # Every object keeps its class on at least part of its mask.
            for ann, mask in zip(anns, masks, strict=True):
                assert (seg[mask] == ann['category_id']).any()


def test_mmdet_coco_dataset_loads(toy: dict) -> None:
    """(d) mmdet's CocoDataset reads the instance split, masks included."""
    from mmdet.datasets import CocoDataset
    from mmdet.utils import register_all_modules
    register_all_modules(init_default_scope=True)

    for split, n in (('train', NUM_TRAIN), ('val', NUM_VAL)):
        ds = CocoDataset(
            data_root=toy['coco_root'],
            ann_file=f'annotations/instances_{split}.json',
            data_prefix={'img': f'{split}/'},
            metainfo={'classes': TOY_CLASSES},
            pipeline=[])
        assert len(ds) == n
        assert ds.metainfo['classes'] == TOY_CLASSES
        num_inst = sum(len(ds.get_data_info(i)['instances']) for i in range(len(ds)))
        assert num_inst == toy['num_instances'][split]

    ds = CocoDataset(
        data_root=toy['coco_root'],
        ann_file='annotations/instances_train.json',
        data_prefix={'img': 'train/'},
        metainfo={'classes': TOY_CLASSES},
        pipeline=[
            {'type': 'LoadImageFromFile'},
            {'type': 'LoadAnnotations', 'with_bbox': True, 'with_mask': True},
        ])
    item = ds[0]
    assert item['img'].shape == (*SIZE, 3)
    assert len(item['gt_bboxes']) == len(item['gt_masks']) == len(item['gt_bboxes_labels']) > 0
    assert set(item['gt_bboxes_labels'].tolist()) <= {0, 1, 2}
    assert item['gt_masks'].to_ndarray().sum() > 0


def test_mmseg_dataset_loads(toy: dict) -> None:
    """(d) mmseg's BaseSegDataset reads the semantic split."""
    from mmseg.datasets import BaseSegDataset
    from mmseg.utils import register_all_modules
    register_all_modules(init_default_scope=True)

    for seg_split, n in (('training', NUM_TRAIN), ('validation', NUM_VAL)):
        ds = BaseSegDataset(
            data_root=toy['seg_root'],
            data_prefix={'img_path': f'images/{seg_split}',
                         'seg_map_path': f'annotations/{seg_split}'},
            img_suffix='.jpg',
            seg_map_suffix='.png',
            metainfo={'classes': TOY_SEG_CLASSES, 'palette': [list(c) for c in TOY_SEG_PALETTE]},
            reduce_zero_label=False,
            pipeline=[])
        assert len(ds) == n
        assert tuple(ds.metainfo['classes']) == TOY_SEG_CLASSES
        for i in range(len(ds)):
            info = ds.get_data_info(i)
            assert Path(info['img_path']).is_file() and Path(info['seg_map_path']).is_file()
            assert Path(info['img_path']).stem == Path(info['seg_map_path']).stem


def test_idempotent_and_seeded(tmp_path: Path) -> None:
    """(e) no rewrite without overwrite; seeds are deterministic and matter."""
    kw = {'num_train': 4, 'num_val': 2, 'image_size': SIZE}
    root = tmp_path / 'toy'
    first = generate_toy_dataset(root, seed=0, **kw)
    assert first['regenerated'] is True
    files = sorted(p for p in root.rglob('*') if p.is_file())
    assert len(files) == 2 + 2 + 3 * (4 + 2)  # two json, meta, lock, jpg+jpg+png per image
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    img0 = (root / 'coco' / 'train' / '000000.jpg').read_bytes()
    ann0 = (root / 'coco' / 'annotations' / 'instances_train.json').read_text()

    again = generate_toy_dataset(root, seed=0, **kw)
    assert again['regenerated'] is False
    assert again['num_instances'] == first['num_instances']
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes

    # Same seed elsewhere: byte-identical output.
    twin = generate_toy_dataset(tmp_path / 'twin', seed=0, **kw)
    assert (Path(twin['coco_img_dirs']['train']) / '000000.jpg').read_bytes() == img0
    assert Path(twin['coco_ann_files']['train']).read_text() == ann0

    # Different seed with overwrite: new images and annotations.
    other = generate_toy_dataset(root, seed=1, overwrite=True, **kw)
    assert other['regenerated'] is True
    assert (root / 'coco' / 'train' / '000000.jpg').read_bytes() != img0
    assert (root / 'coco' / 'annotations' / 'instances_train.json').read_text() != ann0
    assert json.loads((root / '.toy_meta.json').read_text())['seed'] == 1

    # Changed arguments regenerate and leave no stale files behind.
    fewer = generate_toy_dataset(root, seed=1, num_train=2, num_val=1, image_size=SIZE)
    assert fewer['regenerated'] is True
    assert len(list((root / 'coco' / 'train').glob('*.jpg'))) == 2
    assert len(list((root / 'seg' / 'annotations' / 'validation').glob('*.png'))) == 1


def test_concurrent_generation_into_one_root(tmp_path: Path) -> None:
    """Two processes started at once (two main jobs) both get the same set.

    Without the lock the second saw the first's half-written ``coco/`` with no
    meta file yet and raised ``FileExistsError``.
    """
    root = tmp_path / 'toy'
    code = ('import sys, json; from dit_mm.datasets.toy_data import generate_toy_dataset; '
            f'r = generate_toy_dataset({str(root)!r}, num_train=6, num_val=2, '
            f'image_size={SIZE!r}, seed=0); print(json.dumps(r["regenerated"]))')
    procs = [subprocess.Popen([sys.executable, '-c', code], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    # Exactly one of them wrote the set; the other waited and reused it.
    assert sorted(out.strip().splitlines()[-1] for out, _ in outs) == ['false', 'true']
    assert len(list((root / 'coco' / 'train').glob('*.jpg'))) == 6


def test_refuses_foreign_folders(tmp_path: Path) -> None:
    (tmp_path / 'coco').mkdir()
    with pytest.raises(FileExistsError):
        generate_toy_dataset(tmp_path, num_train=1, num_val=1, image_size=SIZE)
    with pytest.raises(ValueError):
        generate_toy_dataset(tmp_path / 'x', num_train=-1, num_val=1, image_size=SIZE)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location('make_toy_data',
                                                  REPO / 'tools' / 'make_toy_data.py')
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path / 'cli'
    info = cli.main(['--out', str(out), '--num-train', '2', '--num-val', '1', '--size', '96',
                     '128', '--seed', '3'])
    assert info['num_train'] == 2 and tuple(info['image_size']) == (96, 128)
    assert len(list((out / 'coco' / 'train').glob('*.jpg'))) == 2
    printed = capsys.readouterr().out
    assert str(out) in printed and '2 train + 1 val' in printed
