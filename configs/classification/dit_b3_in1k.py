# DiT-B3 on ImageNet-1k, 224x224, 300 epochs, 8 GPUs x 128 (paper Table 1).
# Paper target: top-1 84.2 % at 6.8 GFLOPs (PVTv2-B3: 83.2 % at 6.9 GFLOPs).
# Budget mu = 6.8 / 6.9 = 0.986: spend that fraction of PVTv2-B3's cost.
_base_ = './_base_/dit_in1k.py'

model = dict(backbone=dict(arch='b3', drop_path_rate=0.3), head=dict(in_channels=512))
custom_hooks = [
    dict(type='BudgetLossHook', mu=0.986, loss_weight=2.0, warmup_iters=6260,
         tau_start=1.0, tau_end=0.2, tau_anneal_iters=375600),
    dict(type='IterSeedHook', seed=0),
]
