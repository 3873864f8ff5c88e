"""Test-time augmentation for detectors that predict instance masks.

mmdet 3.3's ``DetTTAModel`` merges the views of an image (flips, scales) by
flipping each view's boxes back and running class-wise NMS over all of them,
but refuses masks ("TTA of instance segmentation does not support now"), so
``tools/test.py --tta`` cannot run a Mask R-CNN with it.
:class:`DetMaskTTAModel` merges the boxes the same way and keeps, for every
detection that survives NMS, the mask its view predicted, flipped back.
"""
from __future__ import annotations

from typing import Any, List, Mapping

import torch
from mmengine.model import BaseTTAModel
from mmengine.registry import MODELS

_FLIP_DIMS = {'horizontal': (-1, ), 'vertical': (-2, ), 'diagonal': (-2, -1)}


@MODELS.register_module()
class DetMaskTTAModel(BaseTTAModel):
    """mmdet's ``DetTTAModel``, with instance masks.

    Every view's predictions are brought back to the original image (boxes
    with mmdet's ``bbox_flip``, masks flipped along the same axes; the
    detector already rescaled both to ``ori_shape``), concatenated, and
    reduced by mmcv's ``batched_nms`` with ``tta_cfg['nms']`` to at most
    ``tta_cfg['max_per_img']`` detections. A surviving detection keeps its
    own view's mask. Without masks in the predictions the result is what
    ``DetTTAModel`` returns.

    Example (mmdet's flip TTA, as in ``configs/detection/mask_rcnn_dit_b0_toy.py``)::

        tta_model = dict(type='DetMaskTTAModel',
                         tta_cfg=dict(nms=dict(type='nms', iou_threshold=0.5),
                                      max_per_img=100))

    Args:
        tta_cfg: ``nms`` (an mmcv ``batched_nms`` config) and ``max_per_img``.
        **kwargs: ``module`` (the detector) and the rest of ``BaseTTAModel``.

    Raises:
        ValueError: if ``tta_cfg`` lacks ``nms`` or ``max_per_img``.
    """

    def __init__(self, tta_cfg: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        missing = [k for k in ('nms', 'max_per_img') if k not in (tta_cfg or {})]
        if missing:
            raise ValueError(f'DetMaskTTAModel: tta_cfg={tta_cfg!r} lacks {missing}; give e.g. '
                             "tta_cfg=dict(nms=dict(type='nms', iou_threshold=0.5), "
                             'max_per_img=100)')
        super().__init__(**kwargs)
        self.tta_cfg = tta_cfg

    def merge_preds(self, data_samples_list: List[List[Any]]) -> List[Any]:
        """One merged ``DetDataSample`` per image.

        Args:
            data_samples_list: Per image, the predictions of its views.
        """
        return [self._merge_views(views) for views in data_samples_list]

    def _merge_views(self, views: List[Any]) -> Any:
        from mmcv.ops import batched_nms
        from mmdet.structures.bbox import bbox_flip
        from mmengine.structures import InstanceData

        with_masks = 'masks' in views[0].pred_instances
        boxes, scores, labels, masks = [], [], [], []
        for view in views:
            pred, meta = view.pred_instances, view.metainfo
            flip = meta.get('flip', False)
            direction = meta.get('flip_direction')
            b = pred.bboxes
            if flip:
                b = bbox_flip(bboxes=b, img_shape=meta['ori_shape'], direction=direction)
            boxes.append(b)
            scores.append(pred.scores)
            labels.append(pred.labels)
            if with_masks:
                m = pred.masks
                if not torch.is_tensor(m):
                    raise TypeError(f'DetMaskTTAModel: masks of type {type(m).__name__}; it '
                                    'merges the (N, H, W) tensors of mmdet 3 detectors')
                if flip:
                    if direction not in _FLIP_DIMS:
                        raise ValueError(f'DetMaskTTAModel: flip_direction={direction!r}; '
                                         f'expected one of {sorted(_FLIP_DIMS)}')
                    m = m.flip(_FLIP_DIMS[direction])
                masks.append(m)
        boxes, scores, labels = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
        if boxes.numel() == 0:
            return views[0]
        dets, keep = batched_nms(boxes, scores, labels, self.tta_cfg['nms'])
        top = self.tta_cfg['max_per_img']
        dets, keep = dets[:top], keep[:top]
        results = InstanceData(bboxes=dets[:, :-1], scores=dets[:, -1], labels=labels[keep])
        if with_masks:
            results.masks = torch.cat(masks)[keep]
        merged = views[0]
        merged.pred_instances = results
        return merged
