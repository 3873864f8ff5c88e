# Mask R-CNN + DiT-B4, 3x + multi-scale (36 epochs, 640-800), COCO.
# Accuracy and GFLOPs: not in our copy of the paper.
_base_ = './_base_/mask_rcnn_dit_3x.py'

# Official PVTv2-B4 ImageNet-1k weights (downloaded by mmengine).
pretrained = 'https://github.com/whai362/PVT/releases/download/v2/pvt_v2_b4.pth'
model = dict(backbone=dict(arch='b4', init_cfg=dict(checkpoint=pretrained)))
# Budget: no GFLOPs for this model in our copy of the paper, so a default of
# 95% of PVTv2's FLOPs.
custom_hooks = [dict(_base_.custom_hooks[0], mu=0.95)]
