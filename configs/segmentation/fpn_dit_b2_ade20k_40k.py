# Semantic FPN + DiT-B2, ADE20K, 40k iterations at batch 16, 512x512.
# Paper Table 5: DiT-B2 43.4 GFLOPs, 47.4 mIoU (PVTv2-B2: 45.8 GFLOPs, 45.2).
_base_ = './_base_/fpn_dit_ade20k_40k.py'

# Official PVTv2-B2 ImageNet-1k weights (downloaded by mmengine).
pretrained = 'https://github.com/whai362/PVT/releases/download/v2/pvt_v2_b2.pth'
model = dict(backbone=dict(arch='b2', init_cfg=dict(checkpoint=pretrained)))
# Budget: the paper's GFLOPs ratio DiT-B2 / PVTv2-B2 (512x512) = 43.4 / 45.8.
# mu is a fraction of the PVTv2 *backbone* cost (C_base): the paper's whole-model
# saving (45.8 - 43.4 GFLOPs at 512x512), all of it in the backbone.
custom_hooks = [dict(_base_.custom_hooks[0], mu=0.90)]
