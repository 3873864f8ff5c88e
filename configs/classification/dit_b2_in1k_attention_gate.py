# DiT-B2 ablation on ImageNet-1k, at the Table 1 budget (mu = 0.95; dit_b2_in1k.py).
# Table 7, 'attention': a token is kept when the map's mean query attends to it more
# than average (parameter-free); the column gates are learned. Paper: 81.3 % at 3.8 GFLOPs.
_base_ = './dit_b2_in1k.py'

model = dict(backbone=dict(gate='attention'))
