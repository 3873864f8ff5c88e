# DiT-B2 ablation on ImageNet-1k, at the Table 1 budget (mu = 0.95; dit_b2_in1k.py).
# Table 6, 'static': PVTv2's own path, every token (exactly PVTv2-B2). Paper: 80.7 % (PVTv2-B2 itself: 82.0 % at 4.0 GFLOPs).
_base_ = './dit_b2_in1k.py'

model = dict(backbone=dict(routing='static'))  # the budget hook adds no term
