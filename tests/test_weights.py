"""PVTv2 checkpoints in all three layouts load into DiT."""
import re
import subprocess
import sys

import pytest
import timm
import torch
from mmdet.models.backbones.pvt import PyramidVisionTransformerV2

from conftest import make_dit
from dit_mm import DiT
from dit_mm.models.weights import detect_layout, unwrap_state_dict


def timm_to_official(sd):
    """Writes a timm pvt_v2 state dict in the official release's layout."""
    out = {}
    for k, v in sd.items():
        k = k.replace('patch_embed.', 'patch_embed1.')
        k = re.sub(r'stages\.(\d+)\.downsample\.', lambda m: f'patch_embed{int(m[1]) + 1}.', k)
        k = re.sub(r'stages\.(\d+)\.blocks\.', lambda m: f'block{int(m[1]) + 1}.', k)
        k = re.sub(r'stages\.(\d+)\.norm\.', lambda m: f'norm{int(m[1]) + 1}.', k)
        out[k.replace('mlp.dwconv.', 'mlp.dwconv.dwconv.')] = v
    return out


@pytest.fixture(scope='module')
def timm_b0():
    model = timm.create_model('pvt_v2_b0').eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def _outputs(model, x):
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize('layout', ['official', 'timm', 'mmdet-detector'])
def test_pretrained_init_cfg_loads_every_layout(tmp_path, timm_b0, layout):
    x = torch.randn(1, 3, 64, 96)
    if layout == 'official':
        sd = dict(timm_to_official(timm_b0.state_dict()))
        sd['head.weight'] = torch.zeros(1000, 256)
    elif layout == 'timm':
        sd = timm_b0.state_dict()
    else:
        ref = PyramidVisionTransformerV2(embed_dims=32, num_layers=[2, 2, 2, 2]).eval()
        ref.init_weights()
        sd = {'state_dict': {f'backbone.{k}': v for k, v in ref.state_dict().items()},
              'meta': {}}
    path = tmp_path / 'ckpt.pth'
    torch.save(sd, path)
    # mmdet's PVTv2 uses LayerNorm eps 1e-6 where the official/timm one uses 1e-5
    eps = 1e-6 if layout == 'mmdet-detector' else 1e-5
    model = DiT('b0', routing='static', embed_norm_eps=eps,
                init_cfg=dict(type='Pretrained', checkpoint=str(path))).eval()
    model.init_weights()
    got = _outputs(model, x)
    with torch.no_grad():
        if layout == 'mmdet-detector':
            want = ref(x)
        else:
            want = timm_b0.forward_intermediates(x, intermediates_only=True)
    for a, b in zip(want, got):
        assert (a - b).abs().max() < 1e-4
    # extra grid nodes start from the same stage's blocks
    dit = model.state_dict()
    assert torch.equal(dit['stages.s0_t3.blocks.1.mlp.fc1.weight'],
                       dit['stages.s0_t0.blocks.1.mlp.fc1.weight'])
    assert torch.equal(dit['embeds.s2_t3.proj.weight'], dit['embeds.s2_t2.proj.weight'])


def test_checkpoint_of_another_arch_gives_a_short_clear_error(tmp_path):
    path = tmp_path / 'b1.pth'
    torch.save(timm.create_model('pvt_v2_b1').state_dict(), path)
    model = DiT('b0', init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    with pytest.raises(ValueError, match='another arch') as info:
        model.init_weights()
    assert len(str(info.value)) < 500


def test_missing_and_unexpected_keys_are_reported_briefly(tmp_path, timm_b0):
    sd = dict(timm_b0.state_dict())
    for k in [k for k in sd if k.startswith('stages.3.blocks.1.')]:
        del sd[k]
    sd['extra.thing'] = torch.zeros(1)
    path = tmp_path / 'partial.pth'
    torch.save(sd, path)
    from dit_mm.models.weights import load_pvt_pretrained
    model = make_dit('b0')
    with pytest.raises(ValueError, match=r'weights are not in it.*allow_missing=True'):
        load_pvt_pretrained(model, str(path))  # missing PVTv2 weights: an error by default
    report = load_pvt_pretrained(model, str(path), allow_missing=True)
    assert report['unexpected'] == []  # unknown keys are dropped by the converter
    assert report['missing'] and all('stages.s3_t3.blocks.1.' in k for k in report['missing'])


def test_pvt_checkpoint_of_another_arch_with_the_same_widths_is_an_error(tmp_path):
    """timm pvt_v2_b1 into DiT-b2 (same widths, fewer blocks) used to load
    with only a warning and leave a half-initialised model."""
    path = tmp_path / 'timm_b1.pth'
    torch.save(timm.create_model('pvt_v2_b1').state_dict(), path)
    model = DiT('b2', init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    with pytest.raises(ValueError, match=r"looks like arch 'b1'.*model is arch 'b2'") as info:
        model.init_weights()
    assert 'allow_missing=True' in str(info.value) and len(str(info.value)) < 700
    # the explicit opt-out loads what there is and keeps the rest at its init
    model = DiT('b2', init_cfg=dict(type='Pretrained', checkpoint=str(path),
                                    allow_missing=True))
    model.init_weights()
    got = model.state_dict()['stages.s0_t0.blocks.0.attn.q.weight']
    assert torch.equal(got, torch.load(path)['stages.0.blocks.0.attn.q.weight'])


def test_convert_tool_rejects_another_arch(tmp_path):
    import importlib.util
    from pathlib import Path
    tool = Path(__file__).resolve().parents[1] / 'tools' / 'convert_pvtv2.py'
    spec = importlib.util.spec_from_file_location('convert_pvtv2', tool)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    src = tmp_path / 'timm_b1.pth'
    torch.save(timm.create_model('pvt_v2_b1').state_dict(), src)
    with pytest.raises(SystemExit, match=r"looks like arch 'b1'.*--allow-missing"):
        mod.main([str(src), str(tmp_path / 'out.pth'), '--arch', 'b2'])
    mod.main([str(src), str(tmp_path / 'out.pth'), '--arch', 'b2', '--allow-missing'])
    assert (tmp_path / 'out.pth').is_file()


def test_unknown_layout_is_rejected():
    with pytest.raises(ValueError, match='known layout'):
        detect_layout({'conv1.weight': torch.zeros(1)})


def test_unwrap_handles_wrappers_and_prefixes():
    sd = {'state_dict': {'module.backbone.stem.proj.weight': 1, 'module.neck.x': 2}}
    assert unwrap_state_dict(sd) == {'stem.proj.weight': 1}


def test_convert_tool_roundtrip(tmp_path, timm_b0):
    src, dst = tmp_path / 'pvt.pth', tmp_path / 'dit.pth'
    torch.save(timm_to_official(timm_b0.state_dict()), src)
    out = subprocess.run([sys.executable, 'tools/convert_pvtv2.py', str(src), str(dst),
                          '--arch', 'b0'], capture_output=True, text=True, check=True)
    assert 'official layout' in out.stdout
    model = DiT('b0', routing='static', init_cfg=dict(type='Pretrained', checkpoint=str(dst)))
    model.init_weights()
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = timm_b0.forward_intermediates(x, intermediates_only=True)
    for a, b in zip(want, _outputs(model, x)):
        assert (a - b).abs().max() < 1e-4
