# RetinaNet + FPN with a DiT backbone, 1x: 12 epochs, single scale 1333x800.
# Mirrors mmdet's own PVTv2 RetinaNet layout (pvt/retinanet_pvtv2-b*: a b0
# base, per-arch leaves overriding the backbone). Leaf configs set arch,
# checkpoint, mu.
_base_ = ['mmdet::pvt/retinanet_pvtv2-b0_fpn_1x_coco.py', './dit_common.py']

model = dict(backbone=_base_.dit_backbone, neck=dict(in_channels=_base_.dit_neck_in_channels))
# Replaces mmdet's PVTv2 RetinaNet optimizer (AdamW, weight decay 1e-4).
optim_wrapper = _base_.dit_optim_wrapper
# 1x COCO at batch 16: ~7.33k iters/epoch x 12 = ~88k iterations.
custom_hooks = [dict(_base_.custom_hooks[0], tau_anneal_iters=88000)]
# Batch 16 = 8 GPUs x 2 images (mmdet's default train_dataloader.batch_size=2).
auto_scale_lr = dict(enable=False, base_batch_size=16)
