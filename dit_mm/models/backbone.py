"""The DiT backbone: PVTv2 as a routing grid with learned token routing."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from mmengine.model import BaseModule
from mmengine.registry import MODELS
from timm.models.pvt_v2 import OverlapPatchEmbed

from ..accel import conv2d, forget
from ..utils.profiling import scope
from . import slots as _slots
from .blocks import RoutedStage, tokens_to_map
from .budget_dial import CALIBRATE_HINT, BudgetDial
from .cost_model import LN, GridCost, block_elementwise, grid_cost
from .gates import ColumnGate, GateOutput, RowGate, attention_delta, random_delta, straight_through
from .grid import (
    GATE_TYPES,
    NUM_SCALES,
    ROUTING_MODES,
    GridSpec,
    Node,
    feature_sizes,
    node_key,
    resolve_arch,
)
from .slots import SLOT_POLICIES, choose_slots, slot_count
from .weights import init_pvt_module, load_pvt_pretrained

KeepRatio = Union[None, float, Sequence[float]]
Capacity = Union[None, float, Dict[Union[str, Node], float]]


@dataclass
class RoutingRecord:
    """What the last forward routed, per image (used by ``flops()`` and the
    visualisation tools).

    Attributes:
        size: Input ``(H, W)``.
        batch: Batch size.
        embeds: Column edge ``(i, j)`` -> ``(expected, real)`` open fraction
            per image; the diagonal edges are always open.
        rows: Node ``(i, j)`` -> ``(expected, real)`` kept-token fraction per
            image; ``expected`` is differentiable for learned gates.
        active: Gated node ``(i, j)`` -> probability per image that at least
            one token is kept, i.e. that the node's map-wise part runs.
        masks: Node ``(i, j)`` -> boolean ``(B, h, w)`` kept-token map.
        col_gates: Column edges whose gate was evaluated.
        row_gates: Nodes whose row gate was evaluated.

    A gated node is recorded by :meth:`add_gated_row` as its per-token
    probabilities and decisions; ``rows`` and ``active`` reduce them on first
    access: an inference that never asks for its cost skips ~10 small ops per
    node, a few per cent of a DiT-b2 forward at 224x224 (``docs/design.md``,
    "Where the packed path stops scaling").
    """

    size: Tuple[int, int]
    batch: int
    device: torch.device
    embeds: Dict[Node, Tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    masks: Dict[Node, torch.Tensor] = field(default_factory=dict)
    col_gates: List[Node] = field(default_factory=list)
    row_gates: List[Node] = field(default_factory=list)
    spent: Optional[Tuple[GridCost, torch.Tensor, torch.Tensor]] = None  # cache
    _rows: Dict[Node, Tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    _active: Dict[Node, torch.Tensor] = field(default_factory=dict)
    _pending: Dict[Node, Tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def rows(self) -> Dict[Node, Tuple[torch.Tensor, torch.Tensor]]:
        self._settle()
        return self._rows

    @property
    def active(self) -> Dict[Node, torch.Tensor]:
        self._settle()
        return self._active

    def add_row(self, node: Node, expected: torch.Tensor, real: torch.Tensor) -> None:
        """An ungated node's ``(expected, real)`` kept fractions per image."""
        self._rows[node] = (expected, real)

    def add_gated_row(self, node: Node, prob: torch.Tensor, keep: torch.Tensor) -> None:
        """A gated node's keep probabilities and hard decisions ``(B, N)``."""
        # holds the node's place in forward order until _settle fills it in
        self._rows[node] = None  # type: ignore[assignment]
        self._pending[node] = (prob, keep)

    def _settle(self) -> None:
        for node, (prob, keep) in self._pending.items():
            self._rows[node] = (prob.mean(dim=1), keep.detach().float().mean(dim=1))
            skip_all = torch.log1p(-prob.clamp(max=1 - 1e-6)).sum(dim=1)
            self._active[node] = -torch.expm1(skip_all)
        self._pending.clear()


@MODELS.register_module()
class DiT(BaseModule):
    """DiT: PVTv2 with dynamic token routing over a grid of scales x stages.

    Paper: "DiT: Efficient Vision Transformers with Dynamic Token Routing"
    (Ma et al.). The grid is described in :mod:`dit_mm.models.grid` and
    ``docs/design.md``. Outputs are NCHW maps at strides 4, 8, 16 and 32.

    Args:
        arch: ``'b0'`` ... ``'b5'`` (PVTv2-B0..B5 widths, depths, heads, SR
            and MLP ratios) or a dict, see :func:`dit_mm.models.grid.resolve_arch`.
        routing: ``'dynamic'`` (learned gates), ``'static'`` (PVTv2's own
            path, every token: exactly PVTv2) or ``'full'`` (every node and
            edge, every token). Table 6 of the paper.
        gate: Row-gate type (Table 7): ``'learned'`` (linear + Gumbel),
            ``'random'`` (keeps each token with ``random_keep_prob``) or
            ``'attention'`` (keeps tokens that the map's mean query attends to
            more than average). Column gates are always learned.
        scale_routing: Use the off-diagonal grid (extra scales and column
            edges). Off means PVTv2's topology. Table 8.
        depth_routing: Gate tokens on the row edges. Off means every token of
            an active node is computed. Table 8.
        keep_ratio: ``None``, a float in (0, 1], or one float per image. When
            set, every gated node keeps the top fraction of its tokens by gate
            score (in ``'dynamic'`` and ``'full'`` routing). Settable on a
            built model: ``model.backbone.keep_ratio = 0.5``.
        in_channels: Input channels.
        out_indices: Scales to output (0..3 = strides 4..32).
        drop_path_rate: Stochastic-depth rate, linear over PVTv2's blocks;
            off-diagonal nodes reuse the rates of their scale.
        drop_rate: Dropout after the attention projection and in the MLPs
            (mmdet's ``drop_rate``; timm's ``proj_drop``).
        attn_drop_rate: Dropout of the attention weights.
        with_cp: Activation checkpointing of every block (mmdet's name and
            semantics: when the block's input requires grad), in the masked
            and the sparse training paths: less memory for a recomputed
            forward in the backward; same values and gradients.
        frozen_stages: mmdet's convention: ``-1`` freezes nothing, ``k``
            freezes the stem and stages ``1..k``, i.e. every grid node,
            column edge and gate of grid columns ``0..k-1``. Frozen parts
            stay in eval mode (no dropout or drop path; their gates decide
            deterministically from their EMA weights), get no gradients and
            no EMA updates.
        gate_init: Initial keep logits: ``diagonal`` (PVTv2's nodes),
            ``off_diagonal`` (extra nodes) and ``column`` (column edges).
        gate_momentum: EMA momentum of the gate weights (paper eq. 3).
        gate_ema_warmup: Ramp the EMA momentum up with the number of EMA
            steps ``n`` taken so far: ``min(gate_momentum, (1 + n) / (10 + n))``.
            Without it, after ``n`` steps the EMA still holds
            ``gate_momentum ** n`` of the initial gate weights (74 % after 300
            steps at 0.999), so a short run or fine-tune is evaluated with
            gates it has mostly not learned. ``n`` is a checkpointed buffer
            (``gate_ema_steps``), so a resumed run continues the ramp exactly.
        gate_tau: Gumbel-softmax temperature (annealed by ``BudgetLossHook``).
        random_keep_prob: Keep probability of ``gate='random'``.
        sparse_training: Train with the packed path too: only kept tokens
            and open column edges are computed, so a step costs what the
            routes cost. The straight-through gradient then reaches a gate
            only where its path was taken (``B(x)`` is not computed for
            skipped tokens), and drop path is not applied inside gated
            nodes. Off by default: the dense masked path gives every token's
            gate its task gradient.
        budget: Inference budget (x ``C_base``) read off the spend curve that
            ``tools/calibrate_budget.py`` stores in the checkpoint: sets the
            gates' logit offset to spend that much, without retraining.
            ``None``: the checkpoint's own offset (0, i.e. the model as
            trained, unless calibrated). Settable on a built model:
            ``model.backbone.budget = 0.6``. See
            :mod:`dit_mm.models.budget_dial`.
        static_shapes: Static-shape routing (inference and export; see
            :mod:`dit_mm.models.slots` and ``docs/deployment.md``): every
            row-gated node runs on a fixed number of token slots per image,
            its *capacity*, and column edges are computed for every image
            and multiplied by their gate. No data-dependent shape, host sync
            or per-image loop: the forward exports with real skipping,
            compiles with ``fullgraph=True`` and suits CUDA graphs. The
            capacity of each node comes from, in this order: ``keep_ratio``
            (a float; slots = the top ``ceil(r * N)`` tokens, exactly the
            eager top-k routing), ``capacity``, or the per-node keep
            fractions that ``tools/calibrate_budget.py`` stores beside the
            spend curve, read at ``budget`` (or at the checkpoint's own
            offset). Settable: ``model.backbone.static_shapes = True``.
        capacity: Static-shape capacities without calibration: one fraction
            in ``(0, 1]`` for every gated node, or a dict ``{'s0_t1': 0.5,
            ...}`` / ``{(0, 1): 0.5}`` with a fraction in ``[0, 1]`` per
            node (0 skips the node; unlisted nodes get 1).
        capacity_scale: Multiplies the calibrated capacities (clamped at
            every token): above 1, fewer kept tokens are cut from images
            that keep more than the calibration's mean, at a dearer graph.
        slot_policy: Which tokens fill the slots of a calibrated or
            ``capacity`` node: ``'threshold'`` (the gate's kept tokens,
            best first; leftover slots are padding whose outputs are
            dropped, so an image that fits gets exactly threshold routing)
            or ``'top'`` (the best-scored tokens, all kept).
        embed_norm_eps: eps of the LayerNorms in the patch embeddings and the
            attention's spatial reduction: 1e-5 in the official PVTv2 and
            timm; mmdet's ``PyramidVisionTransformerV2`` uses 1e-6.
        pretrained: Deprecated spelling of ``init_cfg=dict(type='Pretrained',
            checkpoint=pretrained)`` (mmseg's ``EncoderDecoder`` passes its
            ``model.pretrained`` here).
        init_cfg: ``dict(type='Pretrained', checkpoint=PATH)`` loads PVTv2
            weights (official release, mmdet or timm layout; see
            :mod:`dit_mm.models.weights`), otherwise PVTv2's random init. A
            PVTv2 checkpoint that does not cover the model (e.g. of another
            arch with the same widths) is an error unless
            ``allow_missing=True`` is added to the dict.
    """

    min_size = 32
    #: under ``torch.jit.trace``, run the packed path anyway instead of the
    #: masked dense form (:meth:`_exporting`): for FLOP counters that trace
    #: (``count_backbone`` in :mod:`dit_mm.analysis.records`); such a trace
    #: is no deployable graph (its shapes are the traced input's decisions)
    trace_packed = False
    #: state-dict entries newer than the first checkpoints: a checkpoint
    #: without them loads (EMA ramp restarted, offset 0, no spend curve)
    optional_state_keys = ('gate_ema_steps', 'dial.offset', 'dial.curve', 'dial.keep')

    def __init__(self,
                 arch: Union[str, dict] = 'b2',
                 routing: str = 'dynamic',
                 gate: str = 'learned',
                 scale_routing: bool = True,
                 depth_routing: bool = True,
                 keep_ratio: KeepRatio = None,
                 in_channels: int = 3,
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 drop_path_rate: float = 0.1,
                 drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0,
                 frozen_stages: int = -1,
                 with_cp: bool = False,
                 gate_init: Optional[dict] = None,
                 gate_momentum: float = 0.999,
                 gate_ema_warmup: bool = True,
                 gate_tau: float = 1.0,
                 random_keep_prob: float = 0.5,
                 sparse_training: bool = False,
                 budget: Optional[float] = None,
                 static_shapes: bool = False,
                 capacity: Capacity = None,
                 capacity_scale: float = 1.0,
                 slot_policy: str = 'threshold',
                 embed_norm_eps: float = 1e-5,
                 pretrained: Optional[str] = None,
                 init_cfg: Optional[dict] = None) -> None:
        if pretrained is not None:  # mmseg's EncoderDecoder passes model.pretrained here
            if init_cfg is not None:
                raise ValueError('DiT: give either init_cfg or pretrained, not both')
            init_cfg = dict(type='Pretrained', checkpoint=pretrained)
        super().__init__(init_cfg=init_cfg)
        self.spec: GridSpec = resolve_arch(arch)
        self.arch_name = arch if isinstance(arch, str) else 'custom'
        if gate not in GATE_TYPES:
            raise ValueError(f'gate={gate!r} is not one of {GATE_TYPES}')
        bad = [i for i in out_indices if i not in range(NUM_SCALES)]
        if bad or not out_indices:
            raise ValueError(f'out_indices={tuple(out_indices)} must be a non-empty subset of '
                             f'{tuple(range(NUM_SCALES))} (strides 4, 8, 16, 32)')
        for name, rate in (('drop_path_rate', drop_path_rate), ('drop_rate', drop_rate),
                           ('attn_drop_rate', attn_drop_rate)):
            if not 0.0 <= rate < 1.0:
                raise ValueError(f'{name} must be in [0, 1), got {rate}')
        if isinstance(frozen_stages, bool) or not isinstance(frozen_stages, int) \
                or not -1 <= frozen_stages <= NUM_SCALES:
            raise ValueError(f'frozen_stages={frozen_stages!r} must be an int in '
                             f'[-1, {NUM_SCALES}]: -1 freezes nothing, k the stem and stages '
                             '1..k')
        self.frozen_stages = frozen_stages
        self.with_cp = bool(with_cp)
        if not gate_tau > 0:
            raise ValueError(f'gate_tau must be > 0, got {gate_tau}')
        if not 0.0 < random_keep_prob < 1.0:
            raise ValueError(f'random_keep_prob must be in (0, 1), got {random_keep_prob}')
        self.routing = routing
        self.gate_type = gate
        self.scale_routing = bool(scale_routing)
        self.depth_routing = bool(depth_routing)
        self._fractions: Optional[Dict[Node, float]] = None  # resolved capacities
        self._fractions_of = -1  # ... at this dial version (BudgetDial.version)
        self.keep_ratio = keep_ratio
        self.in_channels = in_channels
        self.out_indices = tuple(out_indices)
        # the Gumbel temperature is model state (checkpointed): the expected
        # cost reported at inference uses the temperature the model ended with
        self.register_buffer('gate_temperature', torch.tensor(float(gate_tau)))
        self.random_keep_prob = random_keep_prob
        self.gate_ema_warmup = bool(gate_ema_warmup)
        self.register_buffer('gate_ema_steps', torch.zeros((), dtype=torch.long))
        # the budget dial: calibrated gate offset and spend curve (buffers)
        self.dial = BudgetDial()
        self._budget: Optional[float] = None
        self._budget_offset: Optional[float] = None  # resolved from the curve
        self.budget = budget
        self.sparse_training = bool(sparse_training)
        self.static_shapes = static_shapes
        self.capacity = capacity
        self.capacity_scale = capacity_scale
        self.slot_policy = slot_policy
        self.generator: Optional[torch.Generator] = None  # Gumbel noise source
        inits = dict(diagonal=2.0, off_diagonal=0.0, column=0.0)
        inits.update(gate_init or {})

        spec = self.spec
        dims = spec.embed_dims
        rates = torch.linspace(0, drop_path_rate, sum(spec.depths)).tolist()
        offsets = [sum(spec.depths[:i]) for i in range(NUM_SCALES)]
        self.stem = OverlapPatchEmbed(patch_size=7, stride=4, in_chans=in_channels,
                                      embed_dim=dims[0])
        self.embeds = nn.ModuleDict()
        self.stages = nn.ModuleDict()
        self.row_gates = nn.ModuleDict()
        self.col_gates = nn.ModuleDict()
        for (i, j) in spec.nodes:
            key = node_key(i, j)
            depth = spec.depth(i, j)
            dp = [rates[offsets[i] + min(k, spec.depths[i] - 1)] for k in range(depth)]
            self.stages[key] = RoutedStage(dims[i], depth, spec.num_heads[i], spec.sr_ratios[i],
                                           spec.mlp_ratios[i], drop_path=dp, drop=drop_rate,
                                           attn_drop=attn_drop_rate, with_cp=with_cp)
            self.row_gates[key] = RowGate(
                dims[i], inits['diagonal' if i == j else 'off_diagonal'], gate_momentum)
            if i > 0:
                self.embeds[key] = OverlapPatchEmbed(patch_size=3, stride=2,
                                                     in_chans=dims[i - 1], embed_dim=dims[i])
            if 0 < i < j:
                self.col_gates[key] = ColumnGate(dims[i - 1], inits['column'], gate_momentum)
        for name, mod in self.named_modules():
            if isinstance(mod, nn.LayerNorm) and (name.startswith(('stem', 'embeds'))
                                                  or name.endswith('attn.norm')):
                mod.eps = embed_norm_eps
        self.last_record: Optional[RoutingRecord] = None
        self._offset_now: Optional[float] = None
        self._recording = False  # this forward is traced or exported (_exporting)
        self._freeze_stages()

    # ------------------------------------------------------------ properties
    @property
    def gate_tau(self) -> float:
        """Gumbel-softmax temperature of the gates (a checkpointed buffer)."""
        return float(self.gate_temperature)

    @gate_tau.setter
    def gate_tau(self, value: float) -> None:
        if not value > 0:
            raise ValueError(f'gate_tau must be > 0, got {value}')
        self.gate_temperature.fill_(float(value))

    @property
    def routing(self) -> str:
        return self._routing

    @routing.setter
    def routing(self, value: str) -> None:
        if value not in ROUTING_MODES:
            raise ValueError(f'routing={value!r} is not one of {ROUTING_MODES} '
                             "('dynamic': learned gates, 'static': PVTv2's path, "
                             "'full': every node and token)")
        self._routing = value

    @property
    def keep_ratio(self) -> KeepRatio:
        return self._keep_ratio

    @keep_ratio.setter
    def keep_ratio(self, value: KeepRatio) -> None:
        if value is not None:
            values = [value] if isinstance(value, (int, float)) else list(value)
            if not values or not all(isinstance(v, (int, float)) and 0.0 < v <= 1.0
                                     for v in values):
                raise ValueError(f'keep_ratio must be None, a float in (0, 1] or one such '
                                 f'float per image; got {value!r}')
            value = float(value) if isinstance(value, (int, float)) else tuple(map(float, values))
        self._keep_ratio = value
        self._fractions = None

    @property
    def budget(self) -> Optional[float]:
        """Inference budget on the calibrated spend curve (``None``: the
        checkpoint's own gate offset). Setting it checks it against the
        stored curve at once; before a checkpoint with a curve is loaded
        (a ``budget`` constructor argument), at the first forward."""
        return self._budget

    @budget.setter
    def budget(self, value: Optional[float]) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not value > 0):
            raise ValueError(f'budget={value!r} must be None or a positive fraction of '
                             "PVTv2's static cost C_base")
        self._budget = None if value is None else float(value)
        self._budget_offset = None
        self._fractions = None
        if value is not None and self.dial.has_curve:
            self._budget_offset = self.dial.offset_for(self._budget)

    @property
    def static_shapes(self) -> bool:
        """Static-shape routing on (see the class docstring)."""
        return self._static_shapes

    @static_shapes.setter
    def static_shapes(self, value: bool) -> None:
        self._static_shapes = bool(value)
        self._fractions = None

    @property
    def capacity(self) -> Capacity:
        """Explicit static-shape capacities (see the class docstring)."""
        return self._capacity

    @capacity.setter
    def capacity(self, value: Capacity) -> None:
        if value is not None:
            if isinstance(value, dict):
                keys = {node_key(i, j): (i, j) for (i, j) in self.spec.nodes}
                table = {}
                for k, v in value.items():
                    node = keys.get(k) if isinstance(k, str) else tuple(k)
                    if node not in keys.values():
                        raise ValueError(f'capacity: unknown node {k!r}; nodes are '
                                         f'{sorted(keys)}')
                    if isinstance(v, bool) or not isinstance(v, (int, float)) \
                            or not 0.0 <= v <= 1.0:
                        raise ValueError(f'capacity[{k!r}]={v!r} must be a fraction of the '
                                         "node's tokens in [0, 1] (0 skips the node)")
                    table[node] = float(v)
                value = table
            elif isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not 0.0 < value <= 1.0:
                raise ValueError(f'capacity={value!r} must be None, a fraction in (0, 1] of '
                                 "every gated node's tokens, or a dict of per-node fractions")
            else:
                value = float(value)
        self._capacity = value
        self._fractions = None

    @property
    def capacity_scale(self) -> float:
        """Factor on the calibrated capacities (see the class docstring)."""
        return self._capacity_scale

    @capacity_scale.setter
    def capacity_scale(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f'capacity_scale={value!r} must be a positive number (1: the '
                             "calibration's mean keep fractions)")
        self._capacity_scale = float(value)
        self._fractions = None

    @property
    def slot_policy(self) -> str:
        return self._slot_policy

    @slot_policy.setter
    def slot_policy(self, value: str) -> None:
        if value not in SLOT_POLICIES:
            raise ValueError(f'slot_policy={value!r} is not one of {SLOT_POLICIES}')
        self._slot_policy = value

    def capacity_fractions(self) -> Dict[Node, float]:
        """The static-shape capacity of every row-gated node, as a
        fraction of its tokens (see ``static_shapes``). Resolved eagerly and
        cached until a setting or the checkpoint changes: call it (or run one
        eager forward) before ``torch.export``, which cannot read the dial.

        Raises:
            RuntimeError: for a checkpoint without stored capacities, naming
                the calibration command.
            ValueError: for per-image keep ratios, or a budget outside the
                calibrated range.
        """
        if self._fractions is not None and self._fractions_of == self.dial.version:
            return self._fractions
        gated = [n for n in self.spec.nodes if self._row_gated(*n)]
        if self.keep_ratio is not None:
            if not isinstance(self.keep_ratio, float):
                raise ValueError('static_shapes needs one keep_ratio for every image, got '
                                 f'{self.keep_ratio!r}')
            fractions = {n: self.keep_ratio for n in gated}
        elif isinstance(self.capacity, float):
            fractions = {n: self.capacity for n in gated}
        elif isinstance(self.capacity, dict):
            fractions = {n: self.capacity.get(n, 1.0) for n in gated}
        elif not gated:
            fractions = {}
        else:
            if not self.dial.has_capacities:
                raise RuntimeError(
                    'DiT: static_shapes needs a capacity per gated node: give keep_ratio or '
                    'capacity, or use a checkpoint whose calibration stored capacities; '
                    f'{CALIBRATE_HINT}')
            table = self.dial.keep_at(self.gate_offset())
            fractions = {n: min(1.0, self.capacity_scale * table[k])
                         for k, n in enumerate(self.spec.nodes) if n in gated}
        self._fractions, self._fractions_of = fractions, self.dial.version
        return fractions

    def slot_counts(self, size: Tuple[int, int]) -> Dict[Node, int]:
        """Slots per image of every row-gated node at input ``size``."""
        sizes = feature_sizes(int(size[0]), int(size[1]))
        return {(i, j): slot_count(f, sizes[i][0] * sizes[i][1])
                for (i, j), f in self.capacity_fractions().items()}

    def gate_offset(self) -> float:
        """The logit offset the learned gates use now: the budget's, read
        off the spend curve, or the checkpoint's calibrated offset.

        Raises:
            RuntimeError: if ``budget`` is set and no spend curve is loaded.
        """
        if self._budget is None:
            return float(self.dial.offset)
        if self._budget_offset is None:
            if not self.dial.has_curve:
                raise RuntimeError(
                    f'DiT: budget={self._budget} is read off the spend curve of a calibrated '
                    f'checkpoint, and this model has none; {CALIBRATE_HINT}, then load it '
                    '(or set budget=None)')
            self._budget_offset = self.dial.offset_for(self._budget)
        return self._budget_offset

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        missing_keys: List[str] = args[2] if len(args) > 2 else kwargs['missing_keys']
        before = set(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        key = prefix + 'gate_ema_steps'
        if key in missing_keys and key not in before:  # a checkpoint older than the ramp
            missing_keys.remove(key)
            self.gate_ema_steps.zero_()
        self._budget_offset = None  # a new curve may have come with it
        self._fractions = None

    # ------------------------------------------------------------------ init
    def init_weights(self) -> None:
        """PVTv2's init, or PVTv2 weights from ``init_cfg`` (type 'Pretrained')."""
        if self.init_cfg is not None and self.init_cfg.get('type') == 'Pretrained':
            load_pvt_pretrained(self, self.init_cfg['checkpoint'],
                                allow_missing=bool(self.init_cfg.get('allow_missing', False)))
            return
        self.apply(init_pvt_module)
        for g in list(self.row_gates.values()) + list(self.col_gates.values()):
            g.reset_parameters()

    def train(self, mode: bool = True) -> DiT:
        # prepared (reordered, folded) weights are rebuilt after a mode switch:
        # mmengine's EMAHook swaps weights with p.data.copy_, which bumps no
        # version counter, just before validation
        forget(self)
        super().train(mode)
        self._freeze_stages()
        return self

    def frozen_modules(self) -> List[nn.Module]:
        """The stem and every node, column edge and gate of the frozen
        grid columns (``frozen_stages``)."""
        if self.frozen_stages < 0:
            return []
        mods: List[nn.Module] = [self.stem]
        for (i, j) in self.spec.nodes:
            if j >= self.frozen_stages:
                continue
            key = node_key(i, j)
            mods += [self.stages[key], self.row_gates[key]]
            if key in self.embeds:
                mods.append(self.embeds[key])
            if key in self.col_gates:
                mods.append(self.col_gates[key])
        return mods

    def _freeze_stages(self) -> None:
        for m in self.frozen_modules():
            m.eval()
            for p in m.parameters():
                p.requires_grad = False

    def ema_momentum(self) -> float:
        """Momentum of the next EMA step (ramped with ``gate_ema_warmup``)."""
        m = next(iter(self.row_gates.values())).momentum
        if not self.gate_ema_warmup:
            return m
        n = int(self.gate_ema_steps)
        return min(m, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update_gate_ema(self) -> None:
        """One EMA step of every gate (paper eq. 3). Runs at the start of
        every training forward (with gradients on), i.e. once per iteration,
        on the weights left by the previous optimizer step."""
        m = self.ema_momentum()
        for g in list(self.row_gates.values()) + list(self.col_gates.values()):
            if g.training:  # frozen gates stay as they are
                g.update_ema(m)
        self.gate_ema_steps.add_(1)

    # --------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """Args:
            x: Images ``(B, C, H, W)`` with ``H, W >= 32``.

        Returns:
            NCHW feature maps at the scales in ``out_indices``.
        """
        self._check_input(x)
        self._recording = self._exporting()
        if self.static_shapes:
            self._check_static_shapes()
        if self.training and torch.is_grad_enabled() and not self._recording:
            self.update_gate_ema()
        if self._recording or self.static_shapes:  # a graph input/buffer, not a float
            # read off a (fake) tensor: no host sync, so a CUDA graph can capture it
            self._offset_now = self._traced_offset()
        else:
            offset = self.gate_offset()
            self._offset_now = None if offset == 0.0 else offset
        B, _, H, W = x.shape
        sizes = feature_sizes(H, W)
        rec = RoutingRecord(size=(H, W), batch=B, device=x.device)
        maps: List[Optional[torch.Tensor]] = [None] * NUM_SCALES
        maps[0] = _patch_embed(self.stem, x).reshape(B, -1, self.spec.embed_dims[0])
        ones = x.new_ones(B, dtype=torch.float32)
        rec.embeds[(0, 0)] = (ones, ones)
        for j in range(NUM_SCALES):
            for i in range(1, j + 1):
                maps[i] = self._column_edge(i, j, maps, sizes, rec)
            for i in range(j + 1):
                maps[i] = self._row_edge(i, j, maps[i], sizes[i], rec)
        if self._recording:  # keep no traced or fake tensor: flops() needs an eager forward
            self.last_record, self._offset_now, self._recording = None, None, False
        else:
            self.last_record = rec
        return tuple(maps[i].transpose(1, 2).reshape(B, -1, *sizes[i]).contiguous()
                     for i in self.out_indices)

    def _exporting(self) -> bool:
        """Whether a tracer or exporter records this forward
        (``torch.jit.trace``, ``torch.export``, ``torch.onnx.export``).

        Then DiT computes the *masked dense form*: the same gate decisions
        and values as the eager forward, with every token and column edge
        computed and the decisions applied as 0/1 masks (no data-dependent
        shapes, no savings); the executors of :mod:`dit_mm.accel` stay off
        (:func:`dit_mm.accel.recording`). With ``static_shapes`` it computes
        the static-shape form instead, which skips. ``torch.compile`` without
        autograd counts as recording too: its graph must not depend on the
        data either.
        :attr:`trace_packed` keeps the packed path under ``torch.jit.trace``.
        """
        tracing = torch.jit.is_tracing() and not self.trace_packed
        # torch.compile at inference only: a compiled training step keeps the
        # eager semantics (EMA steps, the routing record the budget loss reads)
        compiling = torch.compiler.is_compiling() and not torch.is_grad_enabled()
        return (tracing or torch.compiler.is_exporting() or compiling
                or torch.onnx.is_in_onnx_export())

    def _check_static_shapes(self) -> None:
        """Static-shape routing is an inference form with resolvable capacities."""
        if self.training and torch.is_grad_enabled():
            raise RuntimeError('DiT: static_shapes is an inference and export form; train with '
                               'the masked path (static_shapes=False) and switch it on in eval')
        if self.gate_type == 'random' and self.routing == 'dynamic' and self.depth_routing:
            raise RuntimeError("DiT: static_shapes with gate='random': its decisions come from "
                               'a seeded generator, which a static graph cannot hold; use '
                               "gate='learned' or 'attention'")
        if not self._recording:
            self.capacity_fractions()
        elif self._fractions is None:
            if torch.compiler.is_compiling():
                raise RuntimeError('DiT: static_shapes capacities are read off the checkpoint '
                                   'eagerly; call model.backbone.capacity_fractions() (or run '
                                   'one eager forward) before torch.export / torch.compile')
            self.capacity_fractions()

    def _traced_offset(self) -> Union[float, torch.Tensor]:
        """The gate offset of a recorded forward: the dial's buffer (it stays
        a tensor in the graph), or a budget's offset as a constant."""
        if self._budget is None:
            return self.dial.offset
        if self._budget_offset is None and torch.compiler.is_exporting():
            raise RuntimeError(
                f'DiT: budget={self._budget} is read off the spend curve, which torch.export '
                'cannot read; set model.backbone.budget after loading the checkpoint (or run '
                'one eager forward) before exporting')
        return self.gate_offset()

    def __prepare_scriptable__(self) -> DiT:
        """``torch.jit.script`` is not supported: fails with a clear message."""
        raise RuntimeError(
            'DiT cannot be compiled with torch.jit.script: its forward routes tokens with '
            'Python control flow and containers (RoutingRecord, keyword-configured gates) '
            'that TorchScript does not compile. Use torch.jit.trace, torch.export or '
            'torch.onnx.export instead: under a tracer or exporter DiT computes the masked '
            'dense form of its routing (docs/deployment.md)')

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError('DiT expects a 4-D tensor (B, C, H, W), got '
                             f'{getattr(x, "shape", type(x))}')
        if x.shape[1] != self.in_channels:
            raise ValueError(f'DiT was built with in_channels={self.in_channels} but the input '
                             f'has {x.shape[1]} channels (shape {tuple(x.shape)})')
        if min(x.shape[2:]) < self.min_size:
            raise ValueError(f'DiT needs images of at least {self.min_size}x{self.min_size} '
                             f'(one token at stride 32); got {tuple(x.shape[2:])}')

    def _embed(self, key: str, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        y = _patch_embed(self.embeds[key], tokens_to_map(x, hw))
        return y.reshape(x.shape[0], -1, y.shape[-1])

    @property
    def _grid_runs(self) -> bool:
        """Whether the off-diagonal nodes and column edges run."""
        return self.routing == 'full' or (self.routing == 'dynamic' and self.scale_routing)

    def _column_edge(self, i: int, j: int, maps: List[Optional[torch.Tensor]],
                     sizes: List[Tuple[int, int]], rec: RoutingRecord) -> Optional[torch.Tensor]:
        """Adds the patch embedding of scale ``i - 1`` into scale ``i``."""
        key = node_key(i, j)
        src, dst = maps[i - 1], maps[i]
        B = src.shape[0]
        ones = src.new_ones(B, dtype=torch.float32)
        if i == j:  # single input: always taken, so the map is never empty
            rec.embeds[(i, j)] = (ones, ones)
            return self._embed(key, src, sizes[i - 1])
        if not self._grid_runs:
            return dst
        if self.routing == 'full':
            rec.embeds[(i, j)] = (ones, ones)
            return dst + self._embed(key, src, sizes[i - 1])
        with scope('dit::gate'):
            out = self.col_gates[key](src, self._tau(), self._noise_generator(src),
                                      self._offset_now)
        rec.col_gates.append((i, j))
        rec.embeds[(i, j)] = (out.prob, out.mask.detach())
        gate = out.mask.to(dst.dtype).view(B, 1, 1)  # exact 0/1, straight-through grad
        if (self.training and not self.sparse_training) or self._recording \
                or self.static_shapes:
            return dst + gate * self._embed(key, src, sizes[i - 1])
        sel = out.mask.detach().nonzero().squeeze(1)  # only the images whose edge is open
        if sel.numel() == 0:
            return dst
        if sel.numel() == B:
            return dst + gate * self._embed(key, src, sizes[i - 1])
        emb = self._embed(key, src.index_select(0, sel), sizes[i - 1])
        return dst.index_add(0, sel, gate.index_select(0, sel) * emb)

    def _row_edge(self, i: int, j: int, x: torch.Tensor, hw: Tuple[int, int],
                  rec: RoutingRecord) -> torch.Tensor:
        """Runs the blocks of node ``(i, j)`` on the tokens its gate keeps."""
        stage = self.stages[node_key(i, j)]
        B, N, _ = x.shape
        if i != j and not self._grid_runs:
            return x
        if not self._row_gated(i, j):
            ones = x.new_ones(B, dtype=torch.float32)
            rec.add_row((i, j), ones, ones)
            return stage.forward_dense(x, hw)
        if self.static_shapes:
            return self._row_edge_slots(i, j, x, hw, rec)
        with scope('dit::gate'):
            out = self._row_gate(i, j, x)
            keep = out.mask
            if self.keep_ratio is not None:
                keep = self._top_k(out, N)
        rec.row_gates.append((i, j))
        rec.add_gated_row((i, j), out.prob, keep)
        kept = keep.detach() > 0.5
        rec.masks[(i, j)] = kept.view(B, *hw)
        if self._recording:  # the same decisions, dense compute (see _exporting)
            return stage.forward_masked(x, hw, keep)
        if self.training:
            if self.sparse_training:
                if not bool(kept.any()):  # y would be x: the same value and gradients, and
                    return x  # the gate's task gradient, y - x, is zero either way
                return stage.forward_sparse(x, hw, kept, gate=keep)
            return stage.forward_masked(x, hw, keep)
        return stage.forward_sparse(x, hw, kept)

    def _row_gated(self, i: int, j: int) -> bool:
        """Whether node ``(i, j)`` runs behind its row gate (when it runs)."""
        return self.routing != 'static' and (
            self.keep_ratio is not None or (self.routing == 'dynamic' and self.depth_routing))

    def _row_edge_slots(self, i: int, j: int, x: torch.Tensor, hw: Tuple[int, int],
                        rec: RoutingRecord) -> torch.Tensor:
        """Static-shape row edge: the node's blocks on its capacity's token
        slots (:mod:`dit_mm.models.slots`); a capacity of 0 skips the node
        and its gate."""
        B, N, _ = x.shape
        slots_per_image = slot_count(self._fractions[(i, j)], N)
        if slots_per_image == 0:
            zeros = x.new_zeros(B, dtype=torch.float32)
            rec.add_row((i, j), zeros, zeros)
            return x
        out = self._row_gate(i, j, x)
        policy = 'top' if self.keep_ratio is not None else self.slot_policy
        slots, valid = choose_slots(out.score, out.mask, slots_per_image, policy)
        keep = torch.zeros_like(out.score).scatter(1, slots, valid.to(out.score.dtype))
        rec.row_gates.append((i, j))
        rec.add_gated_row((i, j), out.prob, keep)
        rec.masks[(i, j)] = (keep > 0.5).view(B, *hw)
        return self.stages[node_key(i, j)].forward_slots(x, hw, slots, valid)

    def _row_gate(self, i: int, j: int, x: torch.Tensor) -> GateOutput:
        if self.gate_type == 'learned':
            return self.row_gates[node_key(i, j)](x, self._tau(), self._noise_generator(x),
                                                  self._offset_now)
        if self.gate_type == 'attention':
            delta = attention_delta(x.detach())
        elif self._recording:
            raise RuntimeError("DiT: gate='random' draws its eval decisions from a seeded "
                               'generator, which a trace or export cannot record; export a '
                               "model with gate='learned' or 'attention'")
        else:
            gen = self._noise_generator(x) if self.training else _fixed_generator(x, i, j)
            delta = random_delta(x.shape[:2], x.device, self.random_keep_prob, gen)
        hard = (delta > 0).float()
        prob = torch.full_like(delta, self.random_keep_prob) if self.gate_type == 'random' \
            else torch.sigmoid(delta)
        return GateOutput(hard, prob, delta)

    def _tau(self) -> Union[float, torch.Tensor]:
        """The gate temperature: the buffer itself in a recorded forward."""
        return self.gate_temperature if self._recording else self.gate_tau

    def _top_k(self, out: GateOutput, n: int) -> torch.Tensor:
        """Keeps the ``ceil(r * n)`` best-scored tokens of each image; carries
        the straight-through gradient of ``out.mask`` in training."""
        ratios = self.keep_ratio
        if self._recording and isinstance(ratios, float):  # one batched top-k: an
            # exported graph keeps its batch size free
            k = _top_k_count(ratios, n)
            hard = torch.zeros_like(out.score).scatter_(
                1, out.score.detach().topk(k, dim=1, sorted=False).indices, 1.0)
            return straight_through(hard, out.mask)
        B = out.score.shape[0]
        if isinstance(ratios, float):
            ratios = [ratios] * B
        if len(ratios) != B:
            raise ValueError(f'keep_ratio has {len(ratios)} per-image values for a batch of {B}')
        score = out.score.detach()
        hard = torch.zeros_like(score)
        for b, r in enumerate(ratios):  # an unsorted top-k per image: far
            # cheaper than a batched argsort (docs/design.md)
            k = _top_k_count(r, n)
            hard[b].index_fill_(0, score[b].topk(k, sorted=False).indices, 1.0)
        return straight_through(hard, out.mask)

    def _noise_generator(self, ref: torch.Tensor) -> Optional[torch.Generator]:
        gen = self.generator
        if gen is not None and gen.device != ref.device:
            raise RuntimeError(f'DiT.generator is on {gen.device}, inputs on {ref.device}')
        return gen

    # ------------------------------------------------------------------ cost
    def grid_cost(self, size: Optional[Tuple[int, int]] = None) -> GridCost:
        """Analytic costs at ``size`` (default: the last forward's input)."""
        if size is None:
            if self.last_record is None:
                raise RuntimeError('grid_cost() without size needs a forward first')
            size = self.last_record.size
        return grid_cost(self.spec, int(size[0]), int(size[1]))

    def flops(self, per_image: bool = False) -> Dict[str, Union[float, torch.Tensor]]:
        """GFLOPs per image of the last forward.

        Returns:
            dict with ``expected`` (from gate probabilities, a differentiable
            0-d tensor), ``real`` (from the hard decisions), ``static`` (the
            PVTv2 path, ``C_base``) and ``full`` (every node and token).
            With ``per_image=True``, ``expected`` and ``real`` are ``(B,)``.
        """
        cost, exp, real = self._last_spent('flops()')
        out: Dict[str, Union[float, torch.Tensor]] = dict(
            expected=exp / 1e9 if per_image else exp.mean() / 1e9,
            real=real / 1e9 if per_image else float(real.mean()) / 1e9,
            static=cost.static / 1e9, full=cost.full / 1e9)
        return out

    def _last_spent(self, caller: str) -> Tuple[GridCost, torch.Tensor, torch.Tensor]:
        """Costs, expected and real FLOPs per image of the last forward
        (computed once per forward: the hook asks for both the loss and the
        log values)."""
        rec = self.last_record
        if rec is None:
            raise RuntimeError(f'{caller} reports the last forward; run the model first')
        if rec.spent is None:
            cost = self.grid_cost(rec.size)
            rec.spent = (cost, *self._spent(rec, cost))
        return rec.spent

    @staticmethod
    def _spent(rec: RoutingRecord, cost: GridCost) -> Tuple[torch.Tensor, torch.Tensor]:
        """Expected and real FLOPs per image ``(B,)`` of a record."""
        exp = torch.zeros(rec.batch, device=rec.device)
        real = torch.zeros(rec.batch, device=rec.device)
        gates = (sum(cost.nodes[n].row_gate for n in rec.row_gates)
                 + sum(cost.col_gates[n] for n in rec.col_gates))
        for node, (e, r) in rec.embeds.items():
            exp = exp + e * cost.embeds[node]
            real = real + r * cost.embeds[node]
        for node, (e, r) in rec.rows.items():
            nc = cost.nodes[node]
            active = rec.active.get(node, 1.0)
            exp = exp + active * nc.map + e * nc.token * nc.tokens
            real = real + (r > 0).float() * nc.map + r * nc.token * nc.tokens
        return exp + gates, real.detach() + gates

    def static_shape_cost(self, size: Tuple[int, int]) -> Dict[str, float]:
        """Analytic FLOPs per image of the static-shape forward at ``size``
        (``static_shapes``): every column edge the grid runs is computed,
        every gated node costs its map-wise part, its gate and its capacity
        in tokens (padding slots included), whatever the images decide.

        Returns:
            dict with ``total``, ``elementwise`` (its norms, pooling and
            depthwise taps, which op-level counters of matmuls, convs and
            attention do not see), ``static`` (``C_base``) and ``full``.
        """
        H, W = int(size[0]), int(size[1])
        cost = grid_cost(self.spec, H, W)
        sizes = feature_sizes(H, W)
        slots = self.slot_counts((H, W)) if self.static_shapes else {}
        dims = self.spec.embed_dims
        total = elementwise = 0.0
        for (i, j), c in cost.embeds.items():
            if i < j and not self._grid_runs:
                continue
            total += c
            elementwise += LN * sizes[i][0] * sizes[i][1] * dims[i]
            if i < j and self.routing == 'dynamic':
                total += cost.col_gates[(i, j)]
                elementwise += sizes[i - 1][0] * sizes[i - 1][1] * dims[i - 1]
        for (i, j), nc in cost.nodes.items():
            if i != j and not self._grid_runs:
                continue
            n = nc.tokens
            tok_e, map_e = block_elementwise(n, sizes[i], dims[i], self.spec.sr_ratios[i],
                                             self.spec.mlp_ratios[i])
            depth = self.spec.depth(i, j)
            gated = self._row_gated(i, j)
            kept = slots.get((i, j), n) if gated else n  # slots
            if kept == 0:
                continue
            taps = 9 * int(dims[i] * self.spec.mlp_ratios[i])
            dense_dw = 0.0
            if not (gated and self.static_shapes) or _slots.DWCONV == 'map':
                tok_e -= taps  # a dense depthwise conv: a conv, not taps
                if gated and self.static_shapes:  # over the zero-filled hidden map
                    dense_dw = depth * taps * (n - kept)
            total += nc.map + nc.token * kept + (nc.row_gate if gated else 0) + dense_dw
            elementwise += depth * (map_e + tok_e * kept) + LN * dims[i] * kept
        return dict(total=total, elementwise=elementwise, static=cost.static, full=cost.full)

    def max_budget(self, size: Tuple[int, int] = (224, 224)) -> float:
        """``C_full / C_base``: the largest meaningful budget ``mu``."""
        cost = self.grid_cost(size)
        return cost.full / cost.static

    def budget_loss(self, mu: float) -> torch.Tensor:
        """Budget term ``(C_expected / C_base - mu)^2`` of the last forward
        (paper eq. 6), averaged over the images of the batch."""
        cost, exp, _ = self._last_spent('budget_loss()')
        check_budget(mu, cost.full / cost.static, self.last_record.size)
        return ((exp / cost.static - mu) ** 2).mean()

    def keep_ratios(self) -> Dict[str, float]:
        """Mean real kept-token fraction per scale over gated nodes of the
        last forward (for logging)."""
        rec = self.last_record
        out: Dict[str, float] = {}
        if rec is None:
            return out
        for i in range(NUM_SCALES):
            vals = [float(r.mean()) for (si, _), (_, r) in rec.rows.items() if si == i]
            if vals:
                out[f'keep_s{i}'] = sum(vals) / len(vals)
        return out


def check_budget(mu: float, max_mu: float, size: Optional[Tuple[int, int]] = None) -> None:
    """Raises a clear error for a budget outside ``(0, C_full / C_base]``
    (``max_mu``, at the input ``size`` when given)."""
    if not isinstance(mu, (int, float)) or not 0.0 < mu <= max_mu + 1e-9:
        at = f' at {size[0]}x{size[1]} inputs' if size is not None else ''
        raise ValueError(f'budget mu={mu!r} must be in (0, {max_mu:.3f}]: it is a fraction of '
                         "PVTv2's static cost C_base, and the full grid costs "
                         f'{max_mu:.3f} x C_base{at}')


def _top_k_count(r: float, n: Union[int, torch.Tensor]) -> Union[int, torch.Tensor]:
    """``ceil(r * n)`` tokens, at least 1 and at most ``n``. The token count
    ``n`` is a traced 0-d tensor under ``torch.jit.trace``: then so is the
    result, computed in float64 as Python rounds it, so that a traced graph
    follows the input size (a symbolic int under ``torch.export``)."""
    if isinstance(n, torch.Tensor):  # r in (0, 1]: the ceiling is in [1, n]
        return torch.ceil(n.to(torch.float64) * r).long()
    return torch.sym_min(n, torch.sym_max(1, math.ceil(r * n)))


def _fixed_generator(ref: torch.Tensor, i: int, j: int) -> torch.Generator:
    """Deterministic generator for 'random' gates in eval."""
    gen = torch.Generator(device=ref.device)
    gen.manual_seed(1000 * i + j)
    return gen


def _patch_embed(embed: OverlapPatchEmbed, x: torch.Tensor) -> torch.Tensor:
    """timm's ``OverlapPatchEmbed`` (conv, then LayerNorm on NHWC), with the
    conv's weight reordered once at inference (:func:`dit_mm.accel.cpu.onednn.conv2d`)."""
    return embed.norm(conv2d(embed.proj, x).permute(0, 2, 3, 1))
