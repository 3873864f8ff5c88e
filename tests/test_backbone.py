"""DiT backbone: shapes, equivalence to PVTv2, gates, determinism, errors."""
import math

import pytest
import timm
import torch
from mmdet.models.backbones.pvt import PyramidVisionTransformerV2

from conftest import make_dit, spread_gates
from dit_mm import DiT
from dit_mm.models.weights import convert_pvt_state_dict, load_converted


def _perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


@pytest.mark.parametrize('size', [(32, 32), (64, 96), (97, 131)])
@pytest.mark.parametrize('routing', ['dynamic', 'static', 'full'])
def test_output_shapes(size, routing):
    model = make_dit('b0', routing=routing).eval()
    with torch.no_grad():
        outs = model(torch.randn(2, 3, *size))
    h, w = size
    for k, (o, c) in enumerate(zip(outs, (32, 64, 160, 256))):
        stride = 4 * 2 ** k
        assert o.shape == (2, c, -(-h // stride), -(-w // stride))
        assert o.is_contiguous() and torch.isfinite(o).all()


def test_out_indices():
    model = make_dit('b0', out_indices=(1, 3)).eval()
    outs = model(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [64, 256]


@pytest.mark.parametrize('arch, layers', [('b0', (32, [2, 2, 2, 2])), ('b2', (64, [3, 4, 6, 3]))])
def test_static_routing_reproduces_mmdet_pvtv2(arch, layers):
    ref = PyramidVisionTransformerV2(embed_dims=layers[0], num_layers=layers[1])
    ref.init_weights()
    ref = _perturb(ref).eval()
    # mmdet's PVTv2 uses eps=1e-6 in every LayerNorm (official/timm: 1e-5 in embeddings)
    model = DiT(arch, routing='static', embed_norm_eps=1e-6).eval()
    state, layout = convert_pvt_state_dict(ref.state_dict(), model)
    assert layout == 'mmdet'
    assert load_converted(model, state) == dict(missing=[], unexpected=[])
    x = torch.randn(2, 3, 97, 131)
    with torch.no_grad():
        for a, b in zip(ref(x), model(x)):
            assert (a - b).abs().max() < 1e-4


@pytest.mark.parametrize('arch', ['b0', 'b2'])
def test_static_routing_reproduces_timm_pvt_v2(arch):
    ref = _perturb(timm.create_model(f'pvt_v2_{arch}')).eval()
    model = DiT(arch, routing='static').eval()
    state, layout = convert_pvt_state_dict(ref.state_dict(), model)
    assert layout == 'timm'
    load_converted(model, state)
    x = torch.randn(2, 3, 97, 131)
    with torch.no_grad():
        expected = ref.forward_intermediates(x, intermediates_only=True)
        for a, b in zip(expected, model(x)):
            assert (a - b).abs().max() < 1e-4


def test_budget_gradient_reaches_every_gate_parameter():
    model = make_dit('b0').train()
    model(torch.randn(2, 3, 64, 96))
    model.budget_loss(0.5).backward()
    gates = [(n, p) for n, p in model.named_parameters() if '_gates.' in n]
    assert len(gates) == 2 * (10 + 3)  # weight + bias of 10 row and 3 column gates
    for name, p in gates:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_task_gradient_reaches_gates_through_straight_through():
    model = make_dit('b0').train()
    sum(o.square().mean() for o in model(torch.randn(2, 3, 64, 64))).backward()
    grads = [p.grad for n, p in model.named_parameters() if 'row_gates' in n]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_eval_is_deterministic_and_uses_ema_weights():
    model = make_dit('b0')
    spread_gates(model)
    x = torch.randn(2, 3, 64, 96)
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    masks = {k: v.clone() for k, v in model.last_record.masks.items()}
    with torch.no_grad():  # moving the live weights must not change eval routing
        for g in model.row_gates.values():
            g.proj.weight.normal_()
        model(x)
    assert all(torch.equal(masks[k], v) for k, v in model.last_record.masks.items())


def test_training_forward_updates_gate_ema():
    model = make_dit('b0', gate_momentum=0.5, gate_ema_warmup=False).train()
    gate = model.row_gates['s0_t0']
    with torch.no_grad():
        gate.proj.weight.add_(1.0)
    before = gate.ema_weight.clone()
    model(torch.randn(1, 3, 32, 32))
    assert torch.allclose(gate.ema_weight, 0.5 * before + 0.5 * gate.proj.weight)


def test_image_alone_equals_image_in_batch_dynamic():
    model = make_dit('b0')
    spread_gates(model)
    model.eval()
    x = torch.randn(4, 3, 96, 128)
    with torch.no_grad():
        batch = model(x)
        counts = [m.sum(dim=(1, 2)) for m in model.last_record.masks.values()]
        alone = model(x[1:2])
    assert any(len(set(c.tolist())) > 1 for c in counts)  # unequal keep counts per image
    for a, b in zip(batch, alone):
        assert (a[1:2] - b).abs().max() < 1e-4


def test_all_skipped_nodes_work():
    model = make_dit('b0', gate_init=dict(diagonal=-20.0, off_diagonal=-20.0, column=-20.0))
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        outs = model(x)
    assert all(torch.isfinite(o).all() for o in outs)
    assert all(not m.any() for m in model.last_record.masks.values())
    flops = model.flops()
    # only the mandatory patch embeddings and the gates are paid
    assert flops['real'] < 0.2 * flops['static']


def test_keep_ratio_per_image_and_as_attribute():
    model = make_dit('b0', routing='full').eval()
    model.keep_ratio = (1.0, 0.25)
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    real = model.flops(per_image=True)['real']
    assert real[0] > real[1]
    node = model.last_record.masks[(0, 0)]
    assert node[0].all() and node[1].float().mean() == pytest.approx(0.25, abs=0.02)


def test_keep_ratio_keeps_exactly_the_best_scored_tokens_even_with_ties():
    model = make_dit('b0', routing='full').eval()
    model.keep_ratio = (0.3, 0.7)
    x = torch.randn(2, 3, 64, 64)
    x[1] = 0  # a blank image: many tokens of a node tie (all of them at the first)
    with torch.no_grad():
        model(x)
    rec = model.last_record
    for node, mask in rec.masks.items():
        n = mask[0].numel()
        counts = mask.flatten(1).sum(dim=1).tolist()
        assert counts == [math.ceil(0.3 * n), math.ceil(0.7 * n)], node
    # image 0: no skipped token outscores a kept one at the first node
    with torch.no_grad():
        tokens = model.stem(x[:1])[0].reshape(1, -1, model.spec.embed_dims[0])
        score = model.row_gates['s0_t0'](tokens).score[0]
    kept = rec.masks[(0, 0)][0].flatten()
    assert score[kept].min() >= score[~kept].max()


@pytest.mark.parametrize('gate', ['random', 'attention'])
def test_ablation_gates_run_and_are_deterministic_in_eval(gate):
    model = make_dit('b0', gate=gate).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = model(x), model(x)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    keep = torch.cat([m.flatten() for m in model.last_record.masks.values()]).float().mean()
    assert 0.05 < keep < 0.95


def test_scale_and_depth_routing_switches():
    x = torch.randn(1, 3, 64, 64)
    depth_only = make_dit('b0', scale_routing=False).eval()
    with torch.no_grad():
        depth_only(x)
    assert set(depth_only.last_record.masks) == {(0, 0), (1, 1), (2, 2), (3, 3)}
    scale_only = make_dit('b0', depth_routing=False).eval()
    with torch.no_grad():
        scale_only(x)
    assert not scale_only.last_record.masks and len(scale_only.last_record.rows) == 10
    assert scale_only.last_record.col_gates == [(1, 2), (1, 3), (2, 3)]


@pytest.mark.parametrize('kwargs, match', [
    (dict(arch='b7'), 'Unknown DiT arch'),
    (dict(routing='sparse'), "routing='sparse' is not one of"),
    (dict(gate='magic'), "gate='magic'"),
    (dict(keep_ratio=0.0), 'keep_ratio'),
    (dict(keep_ratio=1.5), 'keep_ratio'),
    (dict(out_indices=(4,)), 'out_indices'),
])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiT(**dict(dict(arch='b0'), **kwargs))


@pytest.mark.parametrize('shape, match', [
    ((1, 3, 31, 64), 'at least 32x32'),
    ((1, 1, 64, 64), 'in_channels=3'),
    ((3, 64, 64), '4-D'),
])
def test_bad_inputs(shape, match):
    model = make_dit('b0').eval()
    with pytest.raises(ValueError, match=match):
        model(torch.randn(*shape))


def test_budget_validation():
    model = make_dit('b0')
    model(torch.randn(1, 3, 64, 64))
    for mu in (0.0, -1.0, model.max_budget((64, 64)) + 0.1):
        with pytest.raises(ValueError, match='budget mu'):
            model.budget_loss(mu)
    assert model.max_budget() > 1.0  # budgets above PVTv2's cost are legitimate
    model.budget_loss(1.5)


@pytest.mark.parametrize('scope', ['mmdet', 'mmseg'])
def test_builds_from_mm_registries(scope):
    from mmengine.registry import init_default_scope
    if scope == 'mmdet':
        from mmdet.registry import MODELS
    else:
        from mmseg.registry import MODELS
    init_default_scope(scope)
    model = MODELS.build(dict(type='DiT', arch='b0'))
    assert isinstance(model, DiT)


def test_sparse_training_matches_masked_values_and_trains_gates():
    model = make_dit('b0', sparse_training=True, drop_path_rate=0.0)
    spread_gates(model)
    model.train()
    x = torch.randn(2, 3, 64, 96)
    model.generator = torch.Generator().manual_seed(3)
    sparse = model(x)
    sum(o.square().mean() for o in sparse).backward()
    grads = [p.grad for n, p in model.named_parameters() if 'row_gates' in n]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    model.sparse_training = False
    model.generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        masked = model(x)
    for a, b in zip(sparse, masked):  # same Gumbel draws, same values
        assert torch.allclose(a, b, atol=1e-4)


def test_sparse_training_skips_closed_nodes_with_the_masked_paths_gradients():
    """Every row gate fully open (diagonal) or fully closed (the rest): the
    sparse path then runs no closed node at all, and its outputs and the
    gradients of every block, norm and embedding equal the masked path's,
    which computes the closed nodes and multiplies them by 0."""
    model = make_dit('b0', sparse_training=True, drop_path_rate=0.0)
    with torch.no_grad():
        for key, g in list(model.row_gates.items()) + list(model.col_gates.items()):
            i, j = key.split('_')
            g.proj.weight.zero_()
            g.proj.bias.copy_(torch.tensor([0.0, 20.0 if key in model.row_gates and i[1:] == j[1:]
                                            else -20.0]))
            g.reset_ema()
    model.train()
    x = torch.randn(2, 3, 64, 96)
    entered = []

    def traced(fn, key):
        def run(*args, **kwargs):
            entered.append(key)
            return fn(*args, **kwargs)
        return run
    for key, stage in model.stages.items():  # the backbone calls these methods directly
        for name in ('forward_dense', 'forward_masked', 'forward_sparse'):
            setattr(stage, name, traced(getattr(stage, name), key))

    def run(sparse):
        model.sparse_training = sparse
        model.zero_grad(set_to_none=True)
        model.generator = torch.Generator().manual_seed(3)
        out = model(x)
        sum(o.square().mean() for o in out).backward()
        return out, {n: p.grad for n, p in model.named_parameters() if 'gates' not in n}
    out_s, grads_s = run(True)
    ran_sparse = set(entered)
    entered.clear()
    out_m, grads_m = run(False)
    assert all(k.split('_')[0][1:] == k.split('_')[1][1:] for k in ran_sparse)
    assert set(entered) - ran_sparse  # the masked path ran the closed nodes
    for a, b in zip(out_s, out_m):
        assert torch.allclose(a, b, atol=1e-5)
    for n, g in grads_m.items():
        gs = grads_s[n]
        if gs is None:  # a closed node's weights: the masked path's gradient is zero
            assert g is None or not g.any(), n
        else:
            assert torch.allclose(gs, g, atol=1e-5), n


def test_weights_swapped_through_data_are_used_after_eval():
    """mmengine's EMAHook swaps weights with ``p.data.copy_`` (no version
    bump) before ``model.eval()``: the reordered / folded weights and the
    stage programs must not keep the old ones."""
    from dit_mm import DiT
    torch.manual_seed(0)
    old = DiT(arch='b0', routing='full', keep_ratio=0.5).eval()
    new = DiT(arch='b0', routing='full', keep_ratio=0.5).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = new(x)
        old(x)  # builds the caches
        for a, b in zip(old.state_dict().values(), new.state_dict().values()):
            a.data.copy_(b.data)
        old.train()
        old.eval()
        got = old(x)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-5)


# ----------------------------------------------------- mmdet-style options
def _frozen_param_ids(model: DiT) -> set:
    frozen = set()
    for m in model.frozen_modules():
        frozen |= {id(p) for p in m.parameters()}
    return frozen


@pytest.mark.parametrize('k', [0, 2, 4])
def test_frozen_stages_freeze_stem_nodes_edges_and_gates(k):
    model = make_dit('b0', frozen_stages=k, routing='dynamic')
    spread_gates(model)
    model.train()
    with torch.no_grad():  # live gate weights away from their EMA copies
        for g in list(model.row_gates.values()) + list(model.col_gates.values()):
            g.proj.weight.add_(0.1)
    ema_before = {n: b.clone() for n, b in model.named_buffers() if 'ema_' in n}
    frozen = _frozen_param_ids(model)
    prefixes = ['stem.'] if k >= 0 else []
    for (i, j) in model.spec.nodes:
        if j < k:
            prefixes += [f'stages.s{i}_t{j}.', f'row_gates.s{i}_t{j}.',
                         f'embeds.s{i}_t{j}.', f'col_gates.s{i}_t{j}.']
    for name, p in model.named_parameters():
        should = any(name.startswith(pre) for pre in prefixes)
        assert (id(p) in frozen) == should and p.requires_grad == (not should), name
    for name, m in model.named_modules():
        if any(name.startswith(pre) or name + '.' in prefixes for pre in prefixes):
            assert not m.training, name  # frozen parts stay in eval mode
    out = model(torch.randn(2, 3, 64, 64))
    if k == 4:  # everything frozen: nothing to train
        assert not any(o.requires_grad for o in out)
    else:
        (sum(o.square().mean() for o in out) + model.budget_loss(1.0)).backward()
        for name, p in model.named_parameters():
            if not p.requires_grad:
                assert p.grad is None, name
        assert all(p.grad is not None for n, p in model.named_parameters()
                   if p.requires_grad and n.startswith('stages.s3_t3.'))
    for name, b in model.named_buffers():
        if not name.endswith('ema_weight'):  # (the biases were not moved)
            continue
        gate_frozen = any(name.startswith(pre) for pre in prefixes)
        assert torch.equal(b, ema_before[name]) == gate_frozen, name  # no EMA update if frozen


def test_frozen_stages_survive_train_and_validate():
    model = make_dit('b0', frozen_stages=1)
    model.train()
    assert not model.stem.training and not model.stages['s0_t0'].training
    assert model.stages['s1_t1'].training
    model.eval().train()
    assert not model.row_gates['s0_t0'].training
    assert DiT('b0').frozen_modules() == []
    for bad in (-2, 5, 1.5, True):
        with pytest.raises(ValueError, match='frozen_stages'):
            DiT('b0', frozen_stages=bad)


@pytest.mark.parametrize('sparse_training', [False, True])
def test_drop_rates_reach_the_blocks_and_act_in_training(sparse_training):
    kwargs = dict(routing='full', keep_ratio=0.5, drop_path_rate=0.0,
                  sparse_training=sparse_training)
    model = make_dit('b0', drop_rate=0.3, attn_drop_rate=0.2, **kwargs)
    blk = model.stages['s1_t2'].blocks[0]
    assert blk.attn.proj_drop.p == 0.3 and blk.attn.attn_drop.p == 0.2
    assert blk.mlp.drop.p == 0.3
    plain = make_dit('b0', **kwargs)
    plain.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 64, 64)
    model.train()
    plain.train()
    a, b = model(x), model(x)
    assert any(not torch.equal(u, v) for u, v in zip(a, b))  # dropout draws differ
    c, d = plain(x), plain(x)
    assert all(torch.equal(u, v) for u, v in zip(c, d))  # no dropout: deterministic
    model.eval()
    plain.eval()
    with torch.no_grad():  # no dropout at inference
        for u, v in zip(model(x), plain(x)):
            assert torch.equal(u, v)
    for bad in (dict(drop_rate=1.0), dict(attn_drop_rate=-0.1)):
        with pytest.raises(ValueError, match='drop'):
            DiT('b0', **bad)


@pytest.mark.parametrize('routing, sparse_training', [
    ('static', False), ('dynamic', False), ('dynamic', True)])
def test_with_cp_gives_the_same_values_and_gradients(routing, sparse_training):
    """Activation checkpointing in the dense, masked and sparse training
    paths: equal outputs, equal gradients of every parameter (dropout and
    drop path replay their draws in the recomputation)."""
    kwargs = dict(routing=routing, sparse_training=sparse_training, drop_path_rate=0.2,
                  drop_rate=0.1)
    ref = make_dit('b0', **kwargs)
    spread_gates(ref)
    ckp = make_dit('b0', with_cp=True, **kwargs)
    ckp.load_state_dict(ref.state_dict())
    assert all(s.with_cp for s in ckp.stages.values())
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for model in (ref, ckp):
        model.train()
        model.generator = torch.Generator().manual_seed(3)  # same Gumbel draws
        torch.manual_seed(7)  # same dropout / drop path draws
        out = model(x.clone().requires_grad_())
        loss = sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in out)
        if routing == 'dynamic':
            loss = loss + model.budget_loss(1.0)
        loss.backward()
        grads.append(({n: p.grad.clone() for n, p in model.named_parameters()
                       if p.grad is not None}, [o.detach() for o in out]))
    (g_ref, o_ref), (g_cp, o_cp) = grads
    for a, b in zip(o_ref, o_cp):
        assert torch.allclose(a, b, atol=1e-5)
    assert g_ref.keys() == g_cp.keys() and len(g_ref) > 0
    if routing == 'dynamic':
        assert any(n.startswith('row_gates') for n in g_ref)
    for n in g_ref:
        assert torch.allclose(g_ref[n], g_cp[n], atol=1e-5, rtol=1e-4), n


@pytest.mark.parametrize('sparse_training', [False, True])
def test_with_cp_keeps_fewer_activations(sparse_training):
    """Checkpointed blocks keep (far) fewer tensors for the backward."""
    def saved_bytes(model):
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t
        model.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(torch.randn(1, 3, 64, 64))
        assert out[0].requires_grad
        return total[0]
    kwargs = dict(routing='dynamic', sparse_training=sparse_training, drop_path_rate=0.0)
    plain = make_dit('b0', **kwargs)
    assert saved_bytes(make_dit('b0', with_cp=True, **kwargs)) < 0.5 * saved_bytes(plain)
