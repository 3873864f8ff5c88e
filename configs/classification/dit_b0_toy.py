# DiT-b0 on the generated toy classification set (tools/make_toy_data.py
# --task classification): one textured shape per 96x96 photo crop, 6 classes,
# object extents 6-86 px. Trained from scratch in about 5 minutes on 2 CPU
# cores; benchmarks/ablations.py trains its Table 6-8 variants from this
# config. Inherits mmpretrain's runtime; the recipe is DeiT's, shrunk (no
# Mixup/CutMix/random crops: they would cut a 6 px object out of the label).
_base_ = 'mmpretrain::_base_/default_runtime.py'

custom_imports = dict(imports=['dit_mm'], allow_failed_imports=False)

data_root = 'data/toy_cls'
classes = ('circle', 'cross', 'ring', 'square', 'star', 'triangle')
mu = 0.95  # budget: the paper's DiT spends about PVTv2's cost (3.8 / 4.0 GFLOPs)
max_iters = 400
batch_size = 32

data_preprocessor = dict(num_classes=len(classes), mean=[123.675, 116.28, 103.53],
                         std=[58.395, 57.12, 57.375], to_rgb=True)
model = dict(
    type='ImageClassifier',
    backbone=dict(type='DiT', arch='b0', routing='dynamic', out_indices=(3, ),
                  drop_path_rate=0.0, gate_momentum=0.9, init_cfg=None),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(type='LinearClsHead', num_classes=len(classes), in_channels=256,
              loss=dict(type='LabelSmoothLoss', label_smooth_val=0.1, mode='original'),
              topk=(1, )))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='PackInputs'),
]
train_dataloader = dict(
    batch_size=batch_size,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(type='CustomDataset', data_root=data_root, data_prefix='train',
                 classes=classes, pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=50,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(type='CustomDataset', data_root=data_root, data_prefix='val',
                 classes=classes, pipeline=test_pipeline))
val_evaluator = dict(type='Accuracy', topk=(1, ))
test_dataloader = val_dataloader
test_evaluator = val_evaluator

train_cfg = dict(by_epoch=False, max_iters=max_iters, val_interval=max_iters)
val_cfg = dict()
test_cfg = dict()
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=30),
    dict(type='CosineAnnealingLR', by_epoch=False, begin=30, end=max_iters, eta_min=1e-5),
]
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-3, betas=(0.9, 0.999), weight_decay=0.05),
    clip_grad=dict(max_norm=5.0, norm_type=2),
    paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0, custom_keys={
        'row_gates': dict(decay_mult=0.0, lr_mult=5.0),
        'col_gates': dict(decay_mult=0.0, lr_mult=5.0)}))
custom_hooks = [
    dict(type='BudgetLossHook', mu=mu, loss_weight=2.0, warmup_iters=50,
         tau_start=1.0, tau_end=0.2, tau_anneal_iters=max_iters),
    dict(type='IterSeedHook', seed=0),
]
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=20),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=max_iters,
                    max_keep_ckpts=1))
log_processor = dict(by_epoch=False)
randomness = dict(seed=0)
auto_scale_lr = dict(enable=False, base_batch_size=batch_size)
