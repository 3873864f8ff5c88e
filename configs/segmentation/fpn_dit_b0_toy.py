# DiT-b0 Semantic FPN with the budget loss on the generated toy set
# (tools/make_toy_data.py, seg/ part). Inherits mmseg's own Semantic FPN and
# swaps the backbone for DiT; small crops and a short schedule for the CPU.
_base_ = 'mmseg::sem_fpn/fpn_r50_4xb4-160k_ade20k-512x512.py'

custom_imports = dict(imports=['dit_mm'], allow_failed_imports=False)

data_root = 'data/toy/seg/'
crop_size = (128, 160)
metainfo = dict(classes=('background', 'circle', 'square', 'triangle'),
                palette=[[0, 0, 0], [220, 20, 60], [0, 128, 255], [60, 180, 75]])

model = dict(
    pretrained=None,  # the base's ResNet checkpoint
    data_preprocessor=dict(size=crop_size),
    backbone=dict(
        _delete_=True,
        type='DiT',
        arch='b0',
        routing='dynamic',
        drop_path_rate=0.0,
        gate_momentum=0.9,
        init_cfg=None),
    neck=dict(in_channels=[32, 64, 160, 256], out_channels=64),
    decode_head=dict(in_channels=[64, 64, 64, 64], channels=64, num_classes=4))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=False),
    dict(type='RandomResize', scale=(320, 256), ratio_range=(0.5, 1.5), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.9),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(320, 256), keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=False),
    dict(type='PackSegInputs'),
]
dataset = dict(type='BaseSegDataset', data_root=data_root, metainfo=metainfo,
               img_suffix='.jpg', seg_map_suffix='.png', reduce_zero_label=False)
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(dataset, _delete_=True, pipeline=train_pipeline,
                 data_prefix=dict(img_path='images/training',
                                  seg_map_path='annotations/training')))
val_dataloader = dict(
    batch_size=1, num_workers=0, persistent_workers=False,
    dataset=dict(dataset, _delete_=True, pipeline=test_pipeline,
                 data_prefix=dict(img_path='images/validation',
                                  seg_map_path='annotations/validation')))
test_dataloader = val_dataloader

max_iters = 200
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
param_scheduler = [dict(type='PolyLR', eta_min=0.0, power=0.9, begin=0, end=max_iters,
                        by_epoch=False)]
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=4e-4, betas=(0.9, 0.999), weight_decay=1e-4),
    clip_grad=dict(max_norm=5.0, norm_type=2),
    paramwise_cfg=dict(custom_keys={
        'row_gates': dict(decay_mult=0.0, lr_mult=5.0),
        'col_gates': dict(decay_mult=0.0, lr_mult=5.0)}))
custom_hooks = [
    dict(type='BudgetLossHook', mu=1.0, loss_weight=2.0, warmup_iters=20,
         tau_start=1.0, tau_end=0.2, tau_anneal_iters=max_iters),
    # reseeds torch's RNG every iteration: a resumed run continues exactly
    dict(type='IterSeedHook', seed=0),
]
# seeds the init, the data order and the augmentations: two runs on the same
# thread count are equal
# (tools/train.py --cfg-options randomness.seed=K for another run)
randomness = dict(seed=0)
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=10, log_metric_by_epoch=False),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=100, max_keep_ckpts=2))
