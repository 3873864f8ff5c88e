# Sparse R-CNN + DiT-B2, 1x (12 epochs, single scale), COCO.
# Paper Table 2: DiT-B2 202 GFLOPs, 51.3 box AP (PVTv2-B2: 215 GFLOPs, 50.1).
_base_ = './_base_/sparse_rcnn_dit_1x.py'

# Official PVTv2-B2 ImageNet-1k weights (downloaded by mmengine).
pretrained = 'https://github.com/whai362/PVT/releases/download/v2/pvt_v2_b2.pth'
model = dict(backbone=dict(arch='b2', init_cfg=dict(checkpoint=pretrained)))
# Budget: the paper's GFLOPs ratio DiT-B2 / PVTv2-B2 (1280x800) = 202 / 215.
# mu is a fraction of the PVTv2 *backbone* cost (C_base, ~139 GFLOPs at 1280x800):
# the paper's whole-model saving (215 - 202) GFLOPs, all of it in the backbone.
custom_hooks = [dict(_base_.custom_hooks[0], mu=0.91)]
