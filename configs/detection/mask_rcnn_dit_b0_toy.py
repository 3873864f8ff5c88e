# DiT-b0 Mask R-CNN with the budget loss on the generated toy set
# (tools/make_toy_data.py): the README's main job. Inherits mmdet's own
# Mask R-CNN; swaps the backbone for DiT and shrinks inputs and schedule to
# run on 2 CPU cores in minutes. Trained from scratch (no PVTv2 weights here).
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'

custom_imports = dict(imports=['dit_mm'], allow_failed_imports=False)

data_root = 'data/toy/coco/'
classes = ('circle', 'square', 'triangle')
metainfo = dict(classes=classes, palette=[(220, 20, 60), (0, 128, 255), (60, 180, 75)])
img_scale = (320, 256)  # (w, h) upper bounds, keep ratio
mu = 1.0  # budget: spend as much as PVTv2-b0 would

model = dict(
    backbone=dict(
        _delete_=True,
        type='DiT',
        arch='b0',
        routing='dynamic',
        drop_path_rate=0.0,
        gate_momentum=0.9,
        init_cfg=None),
    neck=dict(in_channels=[32, 64, 160, 256], out_channels=128),
    rpn_head=dict(in_channels=128, feat_channels=128),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=128),
        bbox_head=dict(in_channels=128, fc_out_channels=256, num_classes=len(classes)),
        mask_roi_extractor=dict(out_channels=128),
        mask_head=dict(in_channels=128, conv_out_channels=128, num_classes=len(classes))),
    train_cfg=dict(
        rpn_proposal=dict(nms_pre=1000, max_per_img=500),
        rcnn=dict(sampler=dict(num=128))),
    test_cfg=dict(rpn=dict(nms_pre=500, max_per_img=300), rcnn=dict(max_per_img=50)))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(
    batch_size=2,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    batch_sampler=None,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_train.json',
        data_prefix=dict(img='train/'),
        filter_cfg=dict(filter_empty_gt=True, min_size=4),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_val.json',
        data_prefix=dict(img='val/'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
# Test-time augmentation (tools/test.py --tta): mmdet's stock flip TTA.
# mmdet's DetTTAModel refuses masks; DetMaskTTAModel (dit_mm) merges the
# boxes the same way (flipped back, NMS over both views) and keeps the masks.
tta_model = dict(type='DetMaskTTAModel',
                 tta_cfg=dict(nms=dict(type='nms', iou_threshold=0.5), max_per_img=50))
tta_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='TestTimeAug',
         transforms=[
             [dict(type='Resize', scale=img_scale, keep_ratio=True)],
             [dict(type='RandomFlip', prob=1.), dict(type='RandomFlip', prob=0.)],
             [dict(type='LoadAnnotations', with_bbox=True, with_mask=True)],
             [dict(type='PackDetInputs',
                   meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                              'scale_factor', 'flip', 'flip_direction'))]]),
]
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json',
                     metric=['bbox', 'segm'])
test_evaluator = val_evaluator

max_iters = 300
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=max_iters,
                 val_interval=max_iters)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=30),
    dict(type='CosineAnnealingLR', by_epoch=False, begin=30, end=max_iters, eta_min=1e-5),
]
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=4e-4, betas=(0.9, 0.999), weight_decay=0.05),
    clip_grad=dict(max_norm=5.0, norm_type=2),
    paramwise_cfg=dict(custom_keys={
        'row_gates': dict(decay_mult=0.0, lr_mult=5.0),
        'col_gates': dict(decay_mult=0.0, lr_mult=5.0),
        'norm': dict(decay_mult=0.0)}))
custom_hooks = [
    # calibrate_at_end=False: the main job keeps the checkpoint as trained and
    # calibrates it in a step of its own (tools/calibrate_budget.py, 144 images),
    # so that its summary shows the spend before and after
    dict(type='BudgetLossHook', mu=mu, loss_weight=2.0, warmup_iters=50,
         tau_start=1.0, tau_end=0.2, tau_anneal_iters=max_iters, calibrate_at_end=False),
    # reseeds torch's RNG every iteration: a resumed run continues exactly
    dict(type='IterSeedHook', seed=0),
]
# seeds the init, the data order and the augmentations: two runs on the same
# thread count are equal
# (tools/train.py --cfg-options randomness.seed=K for another run)
randomness = dict(seed=0)
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=10),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=100, max_keep_ckpts=2))
log_processor = dict(by_epoch=False)
auto_scale_lr = dict(enable=False, base_batch_size=2)
