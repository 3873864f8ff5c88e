# DiT-B2 ablation on ImageNet-1k, at the Table 1 budget (mu = 0.95; dit_b2_in1k.py).
# Table 6, 'fully': every node, edge and token of the grid, no gates. Paper: 83.5 % at
# 15.6 GFLOPs (4.1x); this triangular grid costs 2.55x PVTv2-B2 at 224^2 (docs/design.md).
_base_ = './dit_b2_in1k.py'

model = dict(backbone=dict(routing='full'))  # the budget hook adds no term
