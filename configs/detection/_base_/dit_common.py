# Pieces shared by every DiT detection config. Inherited next to an mmdet
# config (`_base_ = ['mmdet::...', './dit_common.py']`); since mmengine does
# not allow two bases to define the same key, the pieces that the mmdet bases
# also define (model.backbone, optim_wrapper) live under `dit_*` names here and
# are copied in by the per-detector bases (`_base_.dit_backbone`, ...).
custom_imports = dict(imports=['dit_mm'], allow_failed_imports=False)

# DiT replaces the ResNet backbone entirely (`_delete_`). The leaf configs set
# `arch` and the matching official PVTv2 ImageNet checkpoint (the URLs used by
# mmdet::pvt/retinanet_pvtv2-b*_fpn_1x_coco.py).
dit_backbone = dict(
    _delete_=True,
    type='DiT',
    arch='b2',
    routing='dynamic',
    drop_path_rate=0.1,
    init_cfg=dict(
        type='Pretrained',
        checkpoint='https://github.com/whai362/PVT/releases/download/v2/pvt_v2_b2.pth'))
dit_neck_in_channels = [64, 128, 320, 512]  # PVTv2-B1..B5 widths

# Paper recipe (PVTv2's): AdamW, lr 1e-4, weight decay 0.05, batch 16. No
# weight decay on the routing gates and the norms. `_delete_` so that no SGD
# key (momentum, ...) of mmdet's schedules leaks into AdamW.
dit_optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=0.0001, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(custom_keys={
        'row_gates': dict(decay_mult=0.0),
        'col_gates': dict(decay_mult=0.0),
        'norm': dict(decay_mult=0.0)}))

# Budget loss (paper eqs. 6-7). `mu` is set per leaf config from the paper's
# GFLOPs ratio DiT / PVTv2; `tau_anneal_iters` per schedule.
custom_hooks = [
    dict(type='BudgetLossHook', mu=0.95, loss_weight=2.0, warmup_iters=1000,
         tau_start=1.0, tau_end=0.2, tau_anneal_iters=88000),
]
