"""Synthetic toy data set for CPU demo training and tests.

:func:`generate_toy_dataset` renders simple filled shapes (circles, squares and
triangles) of widely different scales onto crops of real photos shipped with
scikit-image, and writes the same scenes twice:

* COCO instance format, for mmdet's ``CocoDataset`` / ``CocoMetric``::

    root/coco/train/000000.jpg ...
    root/coco/val/000000.jpg ...
    root/coco/annotations/instances_train.json
    root/coco/annotations/instances_val.json

* ADE20K-style semantic segmentation, for mmseg's ``BaseSegDataset`` /
  ``IoUMetric`` (``reduce_zero_label=False``; 0 = background)::

    root/seg/images/{training,validation}/000000.jpg
    root/seg/annotations/{training,validation}/000000.png

Instance masks are rasterised from the stored polygons with pycocotools and the
shapes are painted through exactly those masks, so annotations and pixels
agree. Later objects occlude earlier ones; occluded instance masks are not
recomputed (the semantic label maps do reflect the occlusion).
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from mmengine.logging import print_log
from pycocotools import mask as mask_utils

__all__ = [
    'TOY_CLASSES',
    'TOY_SEG_CLASSES',
    'TOY_SEG_PALETTE',
    'generate_toy_dataset',
    'load_backgrounds',
    'random_background',
    'random_texture',
]

TOY_CLASSES: tuple[str, ...] = ('circle', 'square', 'triangle')
"""Instance classes; COCO category ids are ``1..3`` in this order."""

TOY_SEG_CLASSES: tuple[str, ...] = ('background', ) + TOY_CLASSES
"""Semantic classes; the label value of each is its index here."""

TOY_SEG_PALETTE: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0),
    (220, 20, 60),
    (0, 130, 255),
    (255, 190, 0),
)
"""One RGB colour per entry of :data:`TOY_SEG_CLASSES`."""

_FORMAT_VERSION = 1
_META_NAME = '.toy_meta.json'
_LOCK_NAME = '.toy_data.lock'
_SPLITS = (('train', 'training'), ('val', 'validation'))
_MIN_OBJECTS, _MAX_OBJECTS = 1, 6
_MIN_SIZE = 8.0  # px, smallest object extent
_MAX_SIZE_FRAC = 0.6  # largest object extent, as a fraction of the short side
_MAX_OVERLAP = 0.7  # max intersection / smaller area between two objects
_PLACEMENT_TRIES = 8
_CIRCLE_VERTICES = 24
_JPEG_QUALITY = 92


def _to_rgb_uint8(img: np.ndarray) -> np.ndarray:
    """Converts a grey / RGB / RGBA / bool / float image to ``(H, W, 3)`` uint8."""
    img = np.asarray(img)
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    elif img.dtype != np.uint8:
        img = img.astype(np.float64)
        lo, hi = float(img.min()), float(img.max())
        img = ((img - lo) / max(hi - lo, 1e-12) * 255).round().astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3])


def _stereo_left() -> np.ndarray:
    from skimage import data
    return data.stereo_motorcycle()[0]


def _background_loaders() -> list[tuple[str, Callable[[], np.ndarray]]]:
    """Named loaders of photos that ship with scikit-image (no downloads)."""
    from skimage import data

    names = ('astronaut', 'coffee', 'chelsea', 'rocket', 'camera', 'coins',
             'hubble_deep_field', 'immunohistochemistry', 'retina', 'moon',
             'brick', 'grass', 'gravel', 'cell', 'clock', 'page')
    loaders: list[tuple[str, Callable[[], np.ndarray]]] = []
    for name in names:
        fn = getattr(data, name, None)
        if fn is not None:
            loaders.append((name, fn))
    loaders.append(('stereo_motorcycle', _stereo_left))
    return loaders


@functools.lru_cache(maxsize=1)
def load_backgrounds() -> tuple[tuple[str, np.ndarray], ...]:
    """Loads every background photo that is available offline.

    Files that are not part of the installed scikit-image (they would need a
    pooch download) raise and are skipped, as is anything else that fails.

    Returns:
        ``(name, RGB uint8 image)`` pairs, in a fixed order.
    """
    out = []
    for name, fn in _background_loaders():
        try:
            img = _to_rgb_uint8(fn())
        except Exception as exc:  # noqa: BLE001 - any failure means "skip it"
            logging.getLogger(__name__).debug('skipping skimage.data.%s: %s', name, exc)
            continue
        if min(img.shape[:2]) >= 64:
            out.append((name, img))
    return tuple(out)


def _procedural_background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Random colour gradient plus noise, used when no photo is available."""
    c0, c1 = rng.uniform(0, 255, size=(2, 3))
    t = np.linspace(0.0, 1.0, w)[None, :, None]
    if rng.random() < 0.5:
        t = np.linspace(0.0, 1.0, h)[:, None, None]
    img = c0 + (c1 - c0) * t + rng.normal(0.0, 12.0, size=(h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def random_background(rng: np.random.Generator, photos: tuple[tuple[str, np.ndarray], ...],
                       h: int, w: int) -> np.ndarray:
    """Random scaled crop of a random photo (or a procedural image), ``(h, w, 3)``."""
    if not photos:
        return _procedural_background(rng, h, w)
    src = photos[int(rng.integers(len(photos)))][1]
    sh, sw = src.shape[:2]
    # Largest crop with the target aspect ratio, then zoom in by up to 2x.
    scale = min(sh / h, sw / w) * rng.uniform(0.5, 1.0)
    ch, cw = max(1, round(h * scale)), max(1, round(w * scale))
    y0 = int(rng.integers(0, sh - ch + 1))
    x0 = int(rng.integers(0, sw - cw + 1))
    crop = src[y0:y0 + ch, x0:x0 + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    interp = cv2.INTER_AREA if ch > h else cv2.INTER_LINEAR
    img = cv2.resize(np.ascontiguousarray(crop), (w, h), interpolation=interp)
    gain = rng.uniform(0.8, 1.15)
    return np.clip(img.astype(np.float32) * gain, 0, 255).astype(np.uint8)


def _shape_polygon(rng: np.random.Generator, label: int, size: float) -> np.ndarray:
    """Polygon ``(N, 2)`` (x, y) centred at the origin for category ``label``.

    ``size`` is the circle diameter, the square side or the triangle side.
    """
    theta = rng.uniform(0.0, 2 * np.pi)
    if label == 1:  # circle
        ang = theta + np.linspace(0.0, 2 * np.pi, _CIRCLE_VERTICES, endpoint=False)
        radius = np.full_like(ang, size / 2)
    elif label == 2:  # square, axis-aligned half of the time
        if rng.random() < 0.5:
            theta = 0.0
        ang = theta + np.pi / 4 + np.arange(4) * np.pi / 2
        radius = np.full_like(ang, size / np.sqrt(2))
    else:  # triangle: roughly equilateral, jittered vertices
        ang = theta + np.arange(3) * 2 * np.pi / 3 + rng.uniform(-0.25, 0.25, 3)
        radius = size / np.sqrt(3) * rng.uniform(0.85, 1.15, 3)
    return np.stack([radius * np.cos(ang), radius * np.sin(ang)], axis=1)


def random_texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Solid random colour with a gentle shading gradient and pixel noise."""
    color = rng.uniform(20, 235, size=3)
    gy, gx = rng.uniform(-25, 25, size=2)
    yy = np.linspace(-0.5, 0.5, h)[:, None, None]
    xx = np.linspace(-0.5, 0.5, w)[None, :, None]
    tex = color + gy * yy + gx * xx + rng.normal(0.0, 6.0, size=(h, w, 3))
    return np.clip(tex, 0, 255).astype(np.uint8)


def _render_scene(rng: np.random.Generator, photos: tuple[tuple[str, np.ndarray], ...],
                  h: int, w: int) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Renders one scene.

    Returns:
        The RGB image ``(h, w, 3)``, the semantic label map ``(h, w)`` and a
        list of objects (``label``, ``polygon`` flat list, ``rle``), in
        drawing order.
    """
    img = random_background(rng, photos, h, w)
    seg = np.zeros((h, w), dtype=np.uint8)
    max_size = _MAX_SIZE_FRAC * min(h, w)
    min_size = min(_MIN_SIZE, max_size)
    masks: list[np.ndarray] = []
    objects: list[dict[str, Any]] = []
    for _ in range(int(rng.integers(_MIN_OBJECTS, _MAX_OBJECTS + 1))):
        label = int(rng.integers(1, len(TOY_CLASSES) + 1))
        size = float(np.exp(rng.uniform(np.log(min_size), np.log(max_size))))
        for _try in range(_PLACEMENT_TRIES):
            poly = _shape_polygon(rng, label, size)
            lo, hi = poly.min(axis=0), poly.max(axis=0)
            # Keep the whole shape inside the image.
            off_x = rng.uniform(-lo[0], max(-lo[0], w - 1 - hi[0]))
            off_y = rng.uniform(-lo[1], max(-lo[1], h - 1 - hi[1]))
            poly = np.round(poly + (off_x, off_y), 2)
            flat = [float(v) for v in poly.reshape(-1)]
            rle = mask_utils.merge(mask_utils.frPyObjects([flat], h, w))
            mask = mask_utils.decode(rle).astype(bool)
            area = int(mask.sum())
            if area == 0:
                continue
            if all((mask & m).sum() <= _MAX_OVERLAP * min(area, int(m.sum())) for m in masks):
                break
        else:
            continue  # could not place it without heavy overlap: drop it
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        tex = random_texture(rng, y1 - y0, x1 - x0)
        sub = mask[y0:y1, x0:x1]
        img[y0:y1, x0:x1][sub] = tex[sub]
        seg[mask] = label
        masks.append(mask)
        objects.append({'label': label, 'polygon': flat, 'rle': rle})
    return img, seg, objects


def _write_split(root: Path, split: str, seg_split: str, num_images: int,
                 image_size: tuple[int, int], seed: int, split_index: int,
                 photos: tuple[tuple[str, np.ndarray], ...]) -> int:
    """Renders and writes one split in both formats.

    Returns:
        Number of instances written.
    """
    h, w = image_size
    coco_img_dir = root / 'coco' / split
    seg_img_dir = root / 'seg' / 'images' / seg_split
    seg_ann_dir = root / 'seg' / 'annotations' / seg_split
    for d in (coco_img_dir, seg_img_dir, seg_ann_dir, root / 'coco' / 'annotations'):
        d.mkdir(parents=True, exist_ok=True)

    images, annotations = [], []
    for idx in range(num_images):
        # One stream per image: a split does not depend on the other's size.
        rng = np.random.default_rng([seed, split_index, idx])
        img, seg, objects = _render_scene(rng, photos, h, w)
        stem = f'{idx:06d}'
        bgr = np.ascontiguousarray(img[..., ::-1])
        jpg_ok, jpg = cv2.imencode('.jpg', bgr, [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY])
        png_ok, png = cv2.imencode('.png', seg)
        if not (jpg_ok and png_ok):
            raise RuntimeError(f'failed to encode toy image {split}/{stem}')
        jpg_bytes = jpg.tobytes()
        (coco_img_dir / f'{stem}.jpg').write_bytes(jpg_bytes)
        (seg_img_dir / f'{stem}.jpg').write_bytes(jpg_bytes)
        (seg_ann_dir / f'{stem}.png').write_bytes(png.tobytes())

        image_id = idx + 1
        images.append({'id': image_id, 'file_name': f'{stem}.jpg', 'height': h, 'width': w})
        for obj in objects:
            bbox = [float(v) for v in mask_utils.toBbox(obj['rle'])]
            annotations.append({
                'id': len(annotations) + 1,
                'image_id': image_id,
                'category_id': obj['label'],
                'bbox': bbox,
                'area': float(mask_utils.area(obj['rle'])),
                'iscrowd': 0,
                'segmentation': [obj['polygon']],
            })

    coco = {
        'info': {'description': 'dit_mm toy shapes', 'version': str(_FORMAT_VERSION)},
        'licenses': [],
        'images': images,
        'annotations': annotations,
        'categories': [
            {'id': i + 1, 'name': name, 'supercategory': 'shape'}
            for i, name in enumerate(TOY_CLASSES)
        ],
    }
    ann_file = root / 'coco' / 'annotations' / f'instances_{split}.json'
    ann_file.write_text(json.dumps(coco))
    return len(annotations)


def _outputs_exist(root: Path, num_train: int, num_val: int) -> bool:
    """Cheap completeness check of a previously generated set."""
    for (split, seg_split), n in zip(_SPLITS, (num_train, num_val), strict=True):
        if not (root / 'coco' / 'annotations' / f'instances_{split}.json').is_file():
            return False
        last = f'{n - 1:06d}' if n else None
        if last is not None and not all(
                p.is_file() for p in (root / 'coco' / split / f'{last}.jpg',
                                      root / 'seg' / 'images' / seg_split / f'{last}.jpg',
                                      root / 'seg' / 'annotations' / seg_split / f'{last}.png')):
            return False
    return True


def _result(root: Path, meta: dict[str, Any], regenerated: bool) -> dict[str, Any]:
    """Builds the return value of :func:`generate_toy_dataset`."""
    coco_root, seg_root = root / 'coco', root / 'seg'
    return {
        'root': str(root),
        'coco_root': str(coco_root),
        'seg_root': str(seg_root),
        'coco_ann_files': {
            s: str(coco_root / 'annotations' / f'instances_{s}.json') for s, _ in _SPLITS
        },
        'coco_img_dirs': {s: str(coco_root / s) for s, _ in _SPLITS},
        'seg_img_dirs': {s: str(seg_root / 'images' / t) for s, t in _SPLITS},
        'seg_ann_dirs': {s: str(seg_root / 'annotations' / t) for s, t in _SPLITS},
        'num_train': meta['num_train'],
        'num_val': meta['num_val'],
        'num_instances': dict(meta.get('num_instances', {})),
        'image_size': tuple(meta['image_size']),
        'seed': meta['seed'],
        'classes': TOY_CLASSES,
        'seg_classes': TOY_SEG_CLASSES,
        'seg_palette': TOY_SEG_PALETTE,
        'backgrounds': list(meta.get('backgrounds', [])),
        'regenerated': regenerated,
    }


@contextlib.contextmanager
def _exclusive(root: Path) -> Iterator[None]:
    """Holds an exclusive lock on ``root`` across processes (POSIX ``flock``).

    Two main jobs started at once on the same ``data/toy`` would otherwise
    both see a half-written set: one writing it, the other refusing it as
    foreign. The second now waits and then reuses what the first wrote. Where
    ``fcntl`` is missing (Windows) this does not lock.
    """
    root.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(root / _LOCK_NAME, 'a') as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def generate_toy_dataset(root: str | Path,
                         num_train: int = 576,
                         num_val: int = 144,
                         image_size: tuple[int, int] = (256, 320),
                         seed: int = 0,
                         overwrite: bool = False) -> dict[str, Any]:
    """Generates (or reuses) the toy shapes data set under ``root``.

    The output is deterministic given the arguments (and the installed
    scikit-image, whose photos are the backgrounds). If ``root/.toy_meta.json``
    records the same arguments and the files are present, nothing is written
    unless ``overwrite`` is true. When the arguments differ, the ``coco/`` and
    ``seg/`` sub-folders of a previous toy set are replaced.

    Args:
        root: Output folder; ``coco/`` and ``seg/`` are created inside it.
        num_train: Number of training images.
        num_val: Number of validation images.
        image_size: ``(height, width)`` of every image.
        seed: Seed of the random generator.
        overwrite: Regenerate even if a matching set already exists.

    Returns:
        A dict with ``root``, ``coco_root``, ``seg_root`` (paths as str),
        ``coco_ann_files``, ``coco_img_dirs``, ``seg_img_dirs``,
        ``seg_ann_dirs`` (dicts keyed by ``'train'`` / ``'val'``),
        ``num_train``, ``num_val``, ``num_instances`` (per split),
        ``image_size``, ``seed``, ``classes``, ``seg_classes``,
        ``seg_palette``, ``backgrounds`` (names of the photos used) and
        ``regenerated`` (False when an existing set was reused).

    Raises:
        ValueError: If a count is negative or the image size is too small.
        FileExistsError: If ``root`` holds ``coco/`` or ``seg/`` folders not
            made by this function and ``overwrite`` is false.
    """
    if num_train < 0 or num_val < 0:
        raise ValueError(f'counts must be >= 0, got {num_train=}, {num_val=}')
    h, w = (int(v) for v in image_size)
    if min(h, w) < 32:
        raise ValueError(f'image_size must be at least 32x32, got {image_size}')
    root = Path(root)
    with _exclusive(root):
        return _generate(root, num_train, num_val, (h, w), int(seed), overwrite)


def _generate(root: Path, num_train: int, num_val: int, image_size: tuple[int, int],
              seed: int, overwrite: bool) -> dict[str, Any]:
    """The body of :func:`generate_toy_dataset`, run under its lock."""
    h, w = image_size
    args = {'version': _FORMAT_VERSION, 'num_train': int(num_train), 'num_val': int(num_val),
            'image_size': [h, w], 'seed': int(seed)}
    meta_file = root / _META_NAME

    old_meta: dict[str, Any] | None = None
    if meta_file.is_file():
        try:
            old_meta = json.loads(meta_file.read_text())
        except (OSError, ValueError):
            old_meta = None
    if (not overwrite and old_meta is not None
            and {k: old_meta.get(k) for k in args} == args
            and _outputs_exist(root, num_train, num_val)):
        return _result(root, old_meta, regenerated=False)

    owned = [root / 'coco', root / 'seg']
    if old_meta is None and not overwrite and any(p.exists() for p in owned):
        raise FileExistsError(f'{root} already holds coco/ or seg/ that are not a toy set '
                              'made by generate_toy_dataset; pass overwrite=True to replace them')
    for p in owned:
        if p.is_dir():
            shutil.rmtree(p)
    meta_file.unlink(missing_ok=True)
    root.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    photos = load_backgrounds()
    if not photos:
        print_log('toy data: no scikit-image photos available, using procedural backgrounds',
                  logger='current', level=logging.WARNING)
    num_instances = {}
    counts = (num_train, num_val)
    for split_index, ((split, seg_split), n) in enumerate(zip(_SPLITS, counts, strict=True)):
        num_instances[split] = _write_split(root, split, seg_split, n, (h, w), int(seed),
                                            split_index, photos)
    meta = dict(args, num_instances=num_instances, backgrounds=[name for name, _ in photos])
    meta_file.write_text(json.dumps(meta, indent=1))
    print_log(f'toy data: wrote {num_train} train + {num_val} val images ({h}x{w}) to {root} '
              f'in {time.perf_counter() - start:.1f}s', logger='current')
    return _result(root, meta, regenerated=True)
