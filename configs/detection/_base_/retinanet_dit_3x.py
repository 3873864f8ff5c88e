# RetinaNet + FPN with a DiT backbone, 3x + multi-scale: 36 epochs (lr steps at
# 27 and 33), shorter side sampled in [640, 800] (max 1333), test at 1333x800.
# Leaf configs set arch, checkpoint, mu.
#
# mmdet's ms-640-800-3x base is "3x" through RepeatDataset(times=3) with
# max_epochs=12 and milestones [9, 11]; unwrapped here into a plain 36-epoch
# schedule (see mask_rcnn_dit_3x.py).
_base_ = ['mmdet::retinanet/retinanet_r50_fpn_ms-640-800-3x_coco.py', './dit_common.py']

model = dict(backbone=_base_.dit_backbone, neck=dict(in_channels=_base_.dit_neck_in_channels))
optim_wrapper = _base_.dit_optim_wrapper

train_dataloader = dict(dataset=dict(_delete_=True, **_base_.train_dataloader.dataset.dataset))
max_epochs = 36
train_cfg = dict(max_epochs=max_epochs, val_interval=3)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[27, 33],
         gamma=0.1),
]
# 3x COCO at batch 16: ~7.33k iters/epoch x 36 = ~264k iterations.
custom_hooks = [dict(_base_.custom_hooks[0], tau_anneal_iters=264000)]
# Batch 16 = 8 GPUs x 2 images (mmdet's default train_dataloader.batch_size=2).
auto_scale_lr = dict(enable=False, base_batch_size=16)
