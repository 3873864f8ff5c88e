# DiT-B2 on ImageNet-1k, 224x224, 300 epochs, 8 GPUs x 128 (paper Table 1).
# Paper target: top-1 83.1 % at 3.8 GFLOPs (PVTv2-B2: 82.0 % at 4.0 GFLOPs).
# Budget mu = 3.8 / 4.0 = 0.95: spend that fraction of PVTv2-B2's cost.
_base_ = './_base_/dit_in1k.py'

model = dict(backbone=dict(arch='b2', drop_path_rate=0.1), head=dict(in_channels=512))
custom_hooks = [
    dict(type='BudgetLossHook', mu=0.95, loss_weight=2.0, warmup_iters=6260,
         tau_start=1.0, tau_end=0.2, tau_anneal_iters=375600),
    dict(type='IterSeedHook', seed=0),
]
