"""Synthetic toy classification set in which object scale matters.

:func:`generate_toy_classification` renders one textured shape per image,
of one of :data:`TOY_CLS_CLASSES` (each class a shape and a hue), onto a
crop of a real photo shipped with scikit-image (the same backgrounds as
:mod:`dit_mm.datasets.toy_data`). The shape's
extent is log-uniform between a few pixels and most of the image, so a
classifier must find small objects among background clutter as well as
recognise large ones: the case where routing tokens by scale should pay.

The layout is mmpretrain's ``CustomDataset`` folder format (class folders,
sorted names give the label ids)::

    root/train/circle/000000.jpg ...
    root/val/star/000123.jpg ...
    root/meta/train.json, root/meta/val.json   # per image: label, size (px)

Classes are balanced (image ``k`` of a split has class ``k % K``). The output
is deterministic given the arguments and the installed scikit-image.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from mmengine.logging import print_log

from .toy_data import load_backgrounds, random_background

__all__ = ['TOY_CLS_CLASSES', 'class_texture', 'generate_toy_classification', 'render_object']

TOY_CLS_CLASSES: tuple[str, ...] = ('circle', 'cross', 'ring', 'square', 'star', 'triangle')
"""Class names in label order (sorted, as ``CustomDataset`` assigns ids)."""

_FORMAT_VERSION = 2
_META_NAME = '.toy_cls_meta.json'
_SPLITS = ('train', 'val')
_MIN_SIZE = 6.0  # px, smallest object extent
_MAX_SIZE_FRAC = 0.9  # largest extent, as a fraction of the short side
_SUBPIXEL = 4  # cv2 fixed-point bits for sub-pixel polygon vertices
_JPEG_QUALITY = 92
_HUE_JITTER = 12.0  # degrees around the class hue


def _polygon(rng: np.random.Generator, name: str, size: float) -> np.ndarray:
    """Vertices ``(N, 2)`` (x, y) around the origin, extent about ``size``."""
    theta = rng.uniform(0.0, 2 * np.pi)
    r = size / 2
    if name in ('circle', 'ring'):
        ang = theta + np.linspace(0.0, 2 * np.pi, 32, endpoint=False)
        rad = np.full_like(ang, r)
    elif name == 'square':
        ang = theta + np.pi / 4 + np.arange(4) * np.pi / 2
        rad = np.full_like(ang, r)
    elif name == 'triangle':
        ang = theta + np.arange(3) * 2 * np.pi / 3 + rng.uniform(-0.2, 0.2, 3)
        rad = r * rng.uniform(0.9, 1.1, 3)
    elif name == 'star':  # five points, inner radius 0.45
        ang = theta + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
    elif name == 'cross':  # plus sign with arms of width 0.36 * size
        a, b = r, 0.36 * r
        pts = np.array([(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a),
                        (-b, b), (-a, b), (-a, -b), (-b, -b)])
        c, s = np.cos(theta), np.sin(theta)
        return pts @ np.array([[c, s], [-s, c]])
    else:
        raise ValueError(f'unknown toy class {name!r}')
    return np.stack([rad * np.cos(ang), rad * np.sin(ang)], axis=1)


def class_texture(rng: np.random.Generator, label: int, h: int, w: int) -> np.ndarray:
    """RGB ``(h, w, 3)`` uint8 fill of class ``label``: the class's hue
    (evenly spaced around the colour wheel) jittered by a few degrees, random
    saturation and value, a shading gradient and pixel noise. Colour is a cue
    but not a giveaway: the photo backgrounds hold every hue too."""
    hue = (360.0 * label / len(TOY_CLS_CLASSES) + rng.uniform(-_HUE_JITTER, _HUE_JITTER)) % 360
    sat, val = rng.uniform(0.45, 1.0), rng.uniform(0.45, 1.0)
    hsv = np.array([[[hue / 2, sat * 255, val * 255]]], np.float32)  # OpenCV: H in [0, 180)
    color = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)[0, 0].astype(np.float64)
    gy, gx = rng.uniform(-25, 25, size=2)
    yy = np.linspace(-0.5, 0.5, h)[:, None, None]
    xx = np.linspace(-0.5, 0.5, w)[None, :, None]
    tex = color + gy * yy + gx * xx + rng.normal(0.0, 6.0, size=(h, w, 3))
    return np.clip(tex, 0, 255).astype(np.uint8)


def render_object(rng: np.random.Generator, name: str, size: float, h: int,
                  w: int) -> np.ndarray:
    """Boolean ``(h, w)`` mask of one shape of class ``name`` and extent
    ``size`` px, at a random position fully inside the image."""
    poly = _polygon(rng, name, size)
    lo, hi = poly.min(axis=0), poly.max(axis=0)
    off = (rng.uniform(-lo[0], max(-lo[0], w - 1 - hi[0])),
           rng.uniform(-lo[1], max(-lo[1], h - 1 - hi[1])))
    pts = np.round((poly + off) * (1 << _SUBPIXEL)).astype(np.int32)
    mask = np.zeros((h, w), np.uint8)
    cv2.fillPoly(mask, [pts], 1, lineType=cv2.LINE_8, shift=_SUBPIXEL)
    if name == 'ring':  # cut out the inner 55 % of the radius
        centre = np.round(np.asarray(off) * (1 << _SUBPIXEL)).astype(int)
        inner = int(round(0.55 * size / 2 * (1 << _SUBPIXEL)))
        cv2.circle(mask, tuple(int(v) for v in centre), inner, 0, -1, lineType=cv2.LINE_8,
                   shift=_SUBPIXEL)
    if not mask.any():  # sub-pixel shapes: at least the centre pixel
        cx, cy = (int(min(max(round(v), 0), m - 1)) for v, m in zip(off, (w, h)))
        mask[cy, cx] = 1
    return mask.astype(bool)


def _render(rng: np.random.Generator, photos: tuple[tuple[str, np.ndarray], ...], label: int,
            h: int, w: int) -> tuple[np.ndarray, float]:
    """One RGB image of class ``label`` and the object's extent in px."""
    img = random_background(rng, photos, h, w)
    max_size = _MAX_SIZE_FRAC * min(h, w)
    size = float(np.exp(rng.uniform(np.log(min(_MIN_SIZE, max_size)), np.log(max_size))))
    mask = render_object(rng, TOY_CLS_CLASSES[label], size, h, w)
    tex = class_texture(rng, label, h, w)
    img[mask] = tex[mask]
    return img, size


def _write_split(root: Path, split: str, num_images: int, image_size: tuple[int, int],
                 seed: int, split_index: int,
                 photos: tuple[tuple[str, np.ndarray], ...]) -> list[dict[str, Any]]:
    h, w = image_size
    for name in TOY_CLS_CLASSES:
        (root / split / name).mkdir(parents=True, exist_ok=True)
    records = []
    for idx in range(num_images):
        rng = np.random.default_rng([seed, split_index, idx])
        label = idx % len(TOY_CLS_CLASSES)
        img, size = _render(rng, photos, label, h, w)
        ok, jpg = cv2.imencode('.jpg', np.ascontiguousarray(img[..., ::-1]),
                               [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY])
        if not ok:
            raise RuntimeError(f'failed to encode toy image {split}/{idx}')
        rel = f'{TOY_CLS_CLASSES[label]}/{idx:06d}.jpg'
        (root / split / rel).write_bytes(jpg.tobytes())
        records.append({'file': rel, 'label': label, 'size': round(size, 2)})
    (root / 'meta').mkdir(exist_ok=True)
    (root / 'meta' / f'{split}.json').write_text(json.dumps(records))
    return records


def _complete(root: Path, counts: dict[str, int]) -> bool:
    for split, n in counts.items():
        meta = root / 'meta' / f'{split}.json'
        if not meta.is_file():
            return False
        if n and not (root / split / TOY_CLS_CLASSES[(n - 1) % len(TOY_CLS_CLASSES)]
                      / f'{n - 1:06d}.jpg').is_file():
            return False
    return True


def generate_toy_classification(root: str | Path, num_train: int = 1800, num_val: int = 600,
                                image_size: tuple[int, int] = (96, 96), seed: int = 0,
                                overwrite: bool = False) -> dict[str, Any]:
    """Generates (or reuses) the toy classification set under ``root``.

    A set already at ``root`` with the same arguments is reused unless
    ``overwrite``; with other arguments the split folders are replaced.

    Args:
        root: Output folder (``train/``, ``val/``, ``meta/`` inside).
        num_train: Training images (balanced over the classes).
        num_val: Validation images.
        image_size: ``(height, width)``.
        seed: Seed of the generator.
        overwrite: Regenerate even if a matching set exists.

    Returns:
        dict with ``root``, ``classes``, ``num_train``, ``num_val``,
        ``image_size``, ``seed``, ``size_range`` (object extents in px) and
        ``regenerated``.

    Raises:
        ValueError: for negative counts or an image smaller than 32x32.
        FileExistsError: if ``root`` holds ``train/`` or ``val/`` folders
            that this function did not make, and ``overwrite`` is false.
    """
    if num_train < 0 or num_val < 0:
        raise ValueError(f'counts must be >= 0, got {num_train=}, {num_val=}')
    h, w = (int(v) for v in image_size)
    if min(h, w) < 32:
        raise ValueError(f'image_size must be at least 32x32 (DiT\'s minimum), got {image_size}')
    root = Path(root)
    args = {'version': _FORMAT_VERSION, 'num_train': int(num_train), 'num_val': int(num_val),
            'image_size': [h, w], 'seed': int(seed)}
    counts = {'train': int(num_train), 'val': int(num_val)}
    meta_file = root / _META_NAME
    old = None
    if meta_file.is_file():
        try:
            old = json.loads(meta_file.read_text())
        except (OSError, ValueError):
            old = None
    size_range = [min(_MIN_SIZE, _MAX_SIZE_FRAC * min(h, w)), _MAX_SIZE_FRAC * min(h, w)]
    result = dict(root=str(root), classes=TOY_CLS_CLASSES, num_train=counts['train'],
                  num_val=counts['val'], image_size=(h, w), seed=int(seed),
                  size_range=size_range)
    if (not overwrite and old is not None and {k: old.get(k) for k in args} == args
            and _complete(root, counts)):
        return dict(result, regenerated=False)
    owned = [root / s for s in _SPLITS] + [root / 'meta']
    if old is None and not overwrite and any(p.exists() for p in owned):
        raise FileExistsError(f'{root} holds train/, val/ or meta/ folders that are not a toy '
                              'classification set; pass overwrite=True to replace them')
    for p in owned:
        if p.is_dir():
            shutil.rmtree(p)
    meta_file.unlink(missing_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    photos = load_backgrounds()
    if not photos:
        print_log('toy classification: no scikit-image photos, using procedural backgrounds',
                  logger='current', level=logging.WARNING)
    for k, split in enumerate(_SPLITS):
        _write_split(root, split, counts[split], (h, w), int(seed), k, photos)
    meta_file.write_text(json.dumps(args, indent=1))
    print_log(f'toy classification: wrote {num_train} train + {num_val} val images ({h}x{w}, '
              f'{len(TOY_CLS_CLASSES)} classes) to {root} in {time.perf_counter() - start:.1f}s',
              logger='current')
    return dict(result, regenerated=True)
