"""PVTv2 checkpoints -> DiT: layout detection, conversion and loading, and
PVTv2's random init (:func:`init_pvt_module`) for what a checkpoint lacks.

Three PVTv2 layouts are accepted:

* the official release (``pvt_v2_b*.pth``: ``patch_embed1.proj``,
  ``block1.0.attn.q``, ``norm1`` ...), the files mmdet's configs reference;
* mmdet's ``PyramidVisionTransformerV2`` (``layers.0.0.projection``,
  ``attn.attn.in_proj_weight`` ...), bare or inside a detector/segmentor
  checkpoint (``backbone.`` prefix);
* timm's ``pvt_v2_b*`` (``patch_embed.proj``, ``stages.0.blocks.0`` ...).

All are brought to timm's layout (official -> timm by timm's own
``checkpoint_filter_fn``), then spread over the grid: PVTv2 stage ``i``
initialises every node of scale ``i`` (``(i, j)`` for ``j >= i``), so the
diagonal takes the weights as they are and the extra nodes start from the
same stage's blocks. Gates are not in PVTv2 and keep their own init.
"""
from __future__ import annotations

import math
import re
from collections import OrderedDict
from typing import Dict, List, Mapping, Tuple

import torch
import torch.nn as nn
from mmengine.logging import print_log
from mmengine.runner import CheckpointLoader
from timm.layers import trunc_normal_
from timm.models.pvt_v2 import checkpoint_filter_fn

from .grid import ARCH_SETTINGS, NUM_SCALES, node_key

Layout = str  # 'official' | 'mmdet' | 'timm' | 'dit'


def unwrap_state_dict(ckpt: Mapping) -> Dict[str, torch.Tensor]:
    """Takes the weights out of a checkpoint dict (``state_dict``/``model``
    wrappers, ``module.``/``backbone.`` prefixes of DDP and detectors)."""
    sd = ckpt
    for wrapper in ('state_dict', 'model', 'module'):
        if isinstance(sd, Mapping) and wrapper in sd and isinstance(sd[wrapper], Mapping):
            sd = sd[wrapper]
    sd = OrderedDict((k[7:] if k.startswith('module.') else k, v) for k, v in sd.items())
    if any(k.startswith('backbone.') for k in sd):
        sd = OrderedDict((k[9:], v) for k, v in sd.items() if k.startswith('backbone.'))
    # timm features_only models name their stages 'stages_N'
    return OrderedDict((re.sub(r'^stages_(\d+)\.', r'stages.\1.', k), v) for k, v in sd.items())


def detect_layout(sd: Mapping[str, torch.Tensor]) -> Layout:
    """Which PVTv2 layout a state dict uses.

    Raises:
        ValueError: when no known layout matches.
    """
    if 'stem.proj.weight' in sd:
        return 'dit'
    if 'patch_embed1.proj.weight' in sd:
        return 'official'
    if 'layers.0.0.projection.weight' in sd:
        return 'mmdet'
    if 'patch_embed.proj.weight' in sd and any(k.startswith('stages.0.blocks') for k in sd):
        return 'timm'
    sample = ', '.join(list(sd)[:5])
    raise ValueError('Not a PVTv2 checkpoint in a known layout (official release, mmdet '
                     f'PyramidVisionTransformerV2, timm pvt_v2, or DiT). First keys: {sample}')


def mmdet_to_timm(sd: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """mmdet ``PyramidVisionTransformerV2`` keys -> timm ``pvt_v2`` keys
    (the inverse of ``mmdet.models.backbones.pvt.pvt_convert`` + timm's
    filter)."""
    out: Dict[str, torch.Tensor] = OrderedDict()
    for k, v in sd.items():
        m = re.match(r'layers\.(\d+)\.(\d+)\.(.*)', k)
        if m is None:
            continue  # e.g. a classifier head
        i, part, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        if part == 0:  # patch embedding
            prefix = 'patch_embed' if i == 0 else f'stages.{i}.downsample'
            out[f'{prefix}.{rest.replace("projection.", "proj.")}'] = v
        elif part == 2:  # stage norm
            out[f'stages.{i}.norm.{rest}'] = v
        else:  # blocks
            bm = re.match(r'(\d+)\.(.*)', rest)
            b, name = int(bm.group(1)), bm.group(2)
            dst = f'stages.{i}.blocks.{b}.'
            if name.startswith('attn.attn.in_proj_'):
                kind = name.rsplit('_', 1)[1]  # weight | bias
                dim = v.shape[0] // 3
                out[dst + f'attn.q.{kind}'] = v[:dim]
                out[dst + f'attn.kv.{kind}'] = v[dim:]
            elif name.startswith('attn.attn.out_proj.'):
                out[dst + 'attn.proj.' + name.rsplit('.', 1)[1]] = v
            elif name.startswith('ffn.layers.'):
                layer, kind = name[len('ffn.layers.'):].split('.')
                target = {'0': 'fc1', '1': 'dwconv', '4': 'fc2'}[layer]
                if target != 'dwconv' and kind == 'weight':
                    v = v.flatten(1)  # 1x1 conv -> linear
                out[dst + f'mlp.{target}.{kind}'] = v
            else:  # norm1, norm2, attn.sr, attn.norm
                out[dst + name] = v
    return out


def to_timm_layout(sd: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Layout]:
    """Any accepted PVTv2 layout -> timm's, plus the detected layout."""
    layout = detect_layout(sd)
    if layout == 'official':
        return checkpoint_filter_fn(dict(sd), None), layout
    if layout == 'mmdet':
        return mmdet_to_timm(sd), layout
    return dict(sd), layout


def timm_to_dit(sd: Mapping[str, torch.Tensor], depths: Dict[Tuple[int, int], int]
                ) -> Dict[str, torch.Tensor]:
    """Spreads timm-layout PVTv2 weights over the DiT grid.

    Args:
        sd: timm-layout state dict.
        depths: Node ``(i, j)`` -> number of blocks in the DiT model. Block
            ``k`` of an extra node takes PVTv2 block ``k mod depth_i``, where
            ``depth_i`` is the model's diagonal depth (so blocks absent from
            the checkpoint stay missing and get reported).
    """
    pvt_depth = [depths[(i, i)] for i in range(NUM_SCALES)]
    out: Dict[str, torch.Tensor] = OrderedDict()
    for k, v in sd.items():
        if k.startswith('patch_embed.'):
            out['stem.' + k[len('patch_embed.'):]] = v
            continue
        m = re.match(r'stages\.(\d+)\.(downsample|norm|blocks)\.?(.*)', k)
        if m is None:
            continue  # head, final norm of the classifier
        i, part, rest = int(m.group(1)), m.group(2), m.group(3)
        for j in range(i, NUM_SCALES):
            key = node_key(i, j)
            if part == 'downsample':
                out[f'embeds.{key}.{rest}'] = v
            elif part == 'norm':
                out[f'stages.{key}.norm.{rest}'] = v
            else:
                b, name = rest.split('.', 1)
                for kk in range(depths.get((i, j), 0)):
                    if pvt_depth[i] and kk % pvt_depth[i] == int(b):
                        out[f'stages.{key}.blocks.{kk}.{name}'] = v
    return out


def convert_pvt_state_dict(ckpt: Mapping, model: torch.nn.Module
                           ) -> Tuple[Dict[str, torch.Tensor], Layout]:
    """A PVTv2 (or DiT) checkpoint -> a DiT state dict for ``model``."""
    sd = unwrap_state_dict(ckpt)
    layout = detect_layout(sd)
    if layout == 'dit':
        return dict(sd), layout
    timm_sd, layout = to_timm_layout(sd)
    depths = {n: model.spec.depth(*n) for n in model.spec.nodes}
    return timm_to_dit(timm_sd, depths), layout


def describe_dit_checkpoint(sd: Mapping[str, torch.Tensor]) -> str:
    """What a DiT-layout state dict looks like: ``'b2'`` when its widths and
    diagonal depths are those of a named arch, otherwise the numbers."""
    dims, depths = [], []
    for i in range(NUM_SCALES):
        norm = sd.get(f'stages.{node_key(i, i)}.norm.weight')
        dims.append(int(norm.shape[0]) if norm is not None else None)
        blocks = {int(m.group(1)) for k in sd
                  if (m := re.match(rf'stages\.{node_key(i, i)}\.blocks\.(\d+)\.', k))}
        depths.append(max(blocks) + 1 if blocks else 0)
    for name, arch in ARCH_SETTINGS.items():
        if list(arch['embed_dims']) == dims and list(arch['depths']) == depths:
            return f"arch '{name}'"
    return f'embed_dims {tuple(dims)}, depths {tuple(depths)} (no named arch)'


def check_dit_checkpoint(model: torch.nn.Module, sd: Mapping[str, torch.Tensor],
                         source: str) -> None:
    """A DiT checkpoint must cover the whole DiT it is loaded into: every
    node, column edge, gate and EMA buffer.

    Raises:
        ValueError: naming the arch the checkpoint looks like, when tensors
            are missing, unexpected or of another shape.
    """
    own = model.state_dict()
    optional = tuple(getattr(model, 'optional_state_keys', ()))
    missing = [k for k in own if k not in sd and k not in optional]
    unexpected = [k for k in sd if k not in own]
    mismatched = [k for k in sd if k in own and k not in optional
                  and own[k].shape != sd[k].shape]
    if not (missing or unexpected or mismatched):
        return
    parts = [f'{len(v)} {name} (e.g. {_short(v, 3)})'
             for name, v in (('missing', missing), ('unexpected', unexpected),
                             ('of another shape', mismatched)) if v]
    raise ValueError(
        f'{source}: this DiT checkpoint looks like {describe_dit_checkpoint(sd)}, but the '
        f"model is arch {getattr(model, 'arch_name', '?')!r}: tensors {'; '.join(parts)}. Set "
        "the backbone's arch to the checkpoint's (the classifier's config), or use a "
        'checkpoint of this arch.')


def _short(keys: List[str], n: int = 6) -> str:
    keys = sorted(keys)
    more = f' ... (+{len(keys) - n} more)' if len(keys) > n else ''
    return ', '.join(keys[:n]) + more


def load_converted(model: torch.nn.Module, state: Mapping[str, torch.Tensor],
                   source: str = 'checkpoint', strict: bool = False) -> Dict[str, List[str]]:
    """Loads a converted state dict with a short, readable report.

    Gate weights (and the gate temperature) are never in a PVTv2 checkpoint;
    their absence is expected and not reported. Shape mismatches (e.g. a
    checkpoint of another arch) raise a ``ValueError`` that names the arch
    difference.

    Returns:
        dict with ``missing`` and ``unexpected`` key lists.
    """
    own = model.state_dict()
    optional = tuple(getattr(model, 'optional_state_keys', ()))
    mismatched = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items()
                  if k in own and k not in optional and own[k].shape != v.shape]
    if mismatched:
        k, got, want = mismatched[0]
        raise ValueError(
            f'{source}: {len(mismatched)} tensors have the wrong shape for this DiT '
            f'(arch {getattr(model, "arch_name", "?")}, embed_dims '
            f'{getattr(getattr(model, "spec", None), "embed_dims", "?")}); e.g. {k}: '
            f'checkpoint {got} vs model {want}. Is the checkpoint of another arch?')
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys
               if '_gates.' not in k and k != 'gate_temperature']
    unexpected = list(result.unexpected_keys)
    if strict and (missing or unexpected):
        raise ValueError(f'{source}: missing keys: {_short(missing)}; unexpected keys: '
                         f'{_short(unexpected)}')
    if missing:
        print_log(f'{source}: {len(missing)} model weights not in the checkpoint (left at '
                  f'their init): {_short(missing)}', logger='current', level=30)
    if unexpected:
        print_log(f'{source}: {len(unexpected)} checkpoint weights not used: '
                  f'{_short(unexpected)}', logger='current', level=30)
    return dict(missing=missing, unexpected=unexpected)


def init_pvt_module(m: nn.Module) -> None:
    """PVTv2's init: truncated normal linears, fan-out normal convs."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def pvt_missing(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> List[str]:
    """Weights of ``model`` that a converted PVTv2 state dict should cover
    and does not: everything but the gates (never in PVTv2) and the
    optional entries (gate temperature, EMA step count, budget dial)."""
    optional = set(getattr(model, 'optional_state_keys', ())) | {'gate_temperature'}
    return [k for k in model.state_dict()
            if k not in state and '_gates.' not in k and k not in optional]


def check_pvt_checkpoint(model: torch.nn.Module, state: Mapping[str, torch.Tensor],
                         source: str, allow_missing: bool = False) -> None:
    """A PVTv2 checkpoint must cover the DiT's PVTv2 weights (every node,
    column edge and norm: the gates excepted).

    Raises:
        ValueError: naming the arch the checkpoint looks like and the count
            of missing weights, unless ``allow_missing`` (then a warning).
    """
    missing = pvt_missing(model, state)
    if not missing:
        return
    text = (f'{source}: this PVTv2 checkpoint looks like {describe_dit_checkpoint(state)}, but '
            f"the model is arch {getattr(model, 'arch_name', '?')!r}: {len(missing)} model "
            f'weights are not in it (e.g. {_short(missing, 3)})')
    if not allow_missing:
        raise ValueError(f'{text}. Use a checkpoint of this arch, or set the arch to the '
                         "checkpoint's; to keep the missing weights at their random init on "
                         "purpose, pass init_cfg=dict(type='Pretrained', checkpoint=..., "
                         'allow_missing=True)')
    print_log(f'{text}; left at their init (allow_missing=True)', logger='current', level=30)


def load_pvt_pretrained(model: torch.nn.Module, checkpoint: str,
                        allow_missing: bool = False) -> Dict[str, List[str]]:
    """Initialises ``model`` (a DiT) from a PVTv2 or DiT checkpoint file/URL.

    The gates keep their init (re-initialised so their EMA copies match).

    Args:
        model: The DiT.
        checkpoint: File path or URL.
        allow_missing: Accept a PVTv2 checkpoint that does not cover the
            model (another arch of the same widths, a truncated file): the
            weights it lacks keep PVTv2's random init, with a warning.
            Without it that is an error.
    """
    ckpt = CheckpointLoader.load_checkpoint(checkpoint, map_location='cpu', logger='current')
    state, layout = convert_pvt_state_dict(ckpt, model)
    if layout == 'dit':
        check_dit_checkpoint(model, state, f'{checkpoint} (dit layout)')
    else:
        check_pvt_checkpoint(model, state, f'{checkpoint} ({layout} layout)', allow_missing)
        model.apply(init_pvt_module)  # modules the checkpoint does not cover
        for g in list(model.row_gates.values()) + list(model.col_gates.values()):
            g.reset_parameters()
    report = load_converted(model, state, source=f'{checkpoint} ({layout} layout)')
    print_log(f'DiT: loaded {len(state)} tensors from {checkpoint} ({layout} layout)',
              logger='current')
    return report
