# Semantic FPN with a DiT backbone on ADE20K, PVTv2's recipe: 40k iterations,
# batch 16 (4 GPUs x 4 images: mmseg's default train_dataloader.batch_size=4
# is kept), 512x512 crops, AdamW lr 1e-4 weight decay 1e-4, poly lr (power
# 0.9) down to 0. Leaf configs set arch, checkpoint, mu.
_base_ = 'mmseg::sem_fpn/fpn_r50_4xb4-160k_ade20k-512x512.py'

custom_imports = dict(imports=['dit_mm'], allow_failed_imports=False)

model = dict(
    # mmseg's fpn_r50 sets model.pretrained='open-mmlab://resnet50_v1c', which
    # EncoderDecoder would push into the backbone as `pretrained=`.
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='DiT',
        arch='b2',
        routing='dynamic',
        drop_path_rate=0.1,
        init_cfg=dict(
            type='Pretrained',
            checkpoint='https://github.com/whai362/PVT/releases/download/v2/pvt_v2_b2.pth')),
    neck=dict(in_channels=[64, 128, 320, 512]),  # PVTv2-B1..B5 widths
    decode_head=dict(num_classes=150))

train_dataloader = dict(batch_size=4)  # x 4 GPUs = 16

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=0.0001, betas=(0.9, 0.999), weight_decay=0.0001),
    clip_grad=None,
    paramwise_cfg=dict(custom_keys={
        'row_gates': dict(decay_mult=0.0),
        'col_gates': dict(decay_mult=0.0),
        'norm': dict(decay_mult=0.0)}))
max_iters = 40000
param_scheduler = [
    dict(type='PolyLR', eta_min=0.0, power=0.9, begin=0, end=max_iters, by_epoch=False),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=4000)
default_hooks = dict(checkpoint=dict(by_epoch=False, interval=4000))

# Budget loss (paper eqs. 6-7); leaves set mu.
custom_hooks = [
    dict(type='BudgetLossHook', mu=0.95, loss_weight=2.0, warmup_iters=1000,
         tau_start=1.0, tau_end=0.2, tau_anneal_iters=max_iters),
]
# 4 GPUs x 4 images.
auto_scale_lr = dict(enable=False, base_batch_size=16)
