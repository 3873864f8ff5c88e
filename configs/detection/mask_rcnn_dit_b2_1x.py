# Mask R-CNN + DiT-B2, 1x (12 epochs, single scale), COCO.
# Accuracy: not in our copy of the paper (Table 3 is the 3x + MS schedule).
_base_ = './_base_/mask_rcnn_dit_1x.py'

# Official PVTv2-B2 ImageNet-1k weights (downloaded by mmengine).
pretrained = 'https://github.com/whai362/PVT/releases/download/v2/pvt_v2_b2.pth'
model = dict(backbone=dict(arch='b2', init_cfg=dict(checkpoint=pretrained)))
# Budget: the 3x row's GFLOPs ratio 290 / 309 (Table 3). FLOPs depend on the
# detector and the input size, not on the schedule, so the 1x model gets the same.
# mu is a fraction of the PVTv2 *backbone* cost (C_base, ~139 GFLOPs at 1280x800):
# the paper's whole-model saving (309 - 290) GFLOPs, all of it in the backbone.
custom_hooks = [dict(_base_.custom_hooks[0], mu=0.86)]
