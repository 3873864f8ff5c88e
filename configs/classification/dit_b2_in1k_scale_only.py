# DiT-B2 ablation on ImageNet-1k, at the Table 1 budget (mu = 0.95; dit_b2_in1k.py).
# Table 8, scale only: the grid's column gates route whole maps, every token of a
# running node is computed. Paper: 82.9 % at 8.4 GFLOPs (2.1x PVTv2-B2). In this grid the
# extra nodes always run, so the budget mu = 0.95 is out of reach: it costs >= 2.50x at 224^2.
_base_ = './dit_b2_in1k.py'

model = dict(backbone=dict(depth_routing=False))
