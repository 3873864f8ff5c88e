# DiT-B2 ablation on ImageNet-1k, at the Table 1 budget (mu = 0.95; dit_b2_in1k.py).
# Table 7, 'random': row gates keep each token with a fixed probability; the column
# gates are learned. Paper: 79.4 % at 3.8 GFLOPs. random_keep_prob = 0.2883 spends mu = 0.95 at
# 224^2 with every column edge open (dit_mm.models.cost_model.uniform_keep_for_budget).
_base_ = './dit_b2_in1k.py'

model = dict(backbone=dict(gate='random', random_keep_prob=0.2883))
