# DiT-B2 ablation on ImageNet-1k, at the Table 1 budget (mu = 0.95; dit_b2_in1k.py).
# Table 8, depth only: token gates on PVTv2's topology (no extra scales). Paper:
# 82.2 % at 3.7 GFLOPs.
_base_ = './dit_b2_in1k.py'

model = dict(backbone=dict(scale_routing=False))
