# Sparse R-CNN + FPN (100 proposals) with a DiT backbone, 1x: 12 epochs (lr
# steps at 8 and 11), single scale 1333x800 (Table 2 of the paper). Leaf
# configs set arch, checkpoint, mu.
_base_ = ['mmdet::sparse_rcnn/sparse-rcnn_r50_fpn_1x_coco.py', './dit_common.py']

model = dict(backbone=_base_.dit_backbone, neck=dict(in_channels=_base_.dit_neck_in_channels))
# mmdet's Sparse R-CNN uses AdamW lr 2.5e-5, weight decay 1e-4; the paper's
# recipe is lr 1e-4, weight decay 0.05. Sparse R-CNN's gradient clipping
# (max norm 1) is kept.
optim_wrapper = dict(_base_.dit_optim_wrapper, clip_grad=dict(max_norm=1, norm_type=2))
# 1x COCO at batch 16: ~7.33k iters/epoch x 12 = ~88k iterations.
custom_hooks = [dict(_base_.custom_hooks[0], tau_anneal_iters=88000)]
# Batch 16 = 8 GPUs x 2 images (mmdet's default train_dataloader.batch_size=2).
auto_scale_lr = dict(enable=False, base_batch_size=16)
