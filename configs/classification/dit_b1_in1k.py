# DiT-B1 on ImageNet-1k, 224x224, 300 epochs, 8 GPUs x 128 (paper Table 1).
# Paper target: top-1 79.9 % at 2.0 GFLOPs (PVTv2-B1: 78.7 % at 2.1 GFLOPs).
# Budget mu = 2.0 / 2.1 = 0.952: spend that fraction of PVTv2-B1's cost.
_base_ = './_base_/dit_in1k.py'

model = dict(backbone=dict(arch='b1', drop_path_rate=0.1), head=dict(in_channels=512))
custom_hooks = [
    dict(type='BudgetLossHook', mu=0.952, loss_weight=2.0, warmup_iters=6260,
         tau_start=1.0, tau_end=0.2, tau_anneal_iters=375600),
    dict(type='IterSeedHook', seed=0),
]
