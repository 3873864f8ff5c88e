# DiT-B5 on ImageNet-1k, 224x224, 300 epochs, 8 GPUs x 128 (paper Table 1).
# Paper target: top-1 84.8 % at 10.3 GFLOPs (PVTv2-B5: 83.8 % at 11.8 GFLOPs).
# Budget mu = 10.3 / 11.8 = 0.873: spend that fraction of PVTv2-B5's cost.
_base_ = './_base_/dit_in1k.py'

model = dict(backbone=dict(arch='b5', drop_path_rate=0.3), head=dict(in_channels=512))
custom_hooks = [
    dict(type='BudgetLossHook', mu=0.873, loss_weight=2.0, warmup_iters=6260,
         tau_start=1.0, tau_end=0.2, tau_anneal_iters=375600),
    dict(type='IterSeedHook', seed=0),
]
