"""Routing gates: per-token row gates and per-image column gates.

Both follow paper section 3.2: a linear layer ``d -> 2`` on the features (the
column gate first average-pools the map), a softmax over ``(skip, keep)``, and
a hard Gumbel-softmax sample with a straight-through gradient in training.
An exponential moving average (EMA) of the gate's weights is kept as buffers
and used, without noise, in eval (paper eq. 3).

With two classes, ``softmax`` + Gumbel reduces to a logistic: with
``delta = logit_keep - logit_skip`` and the temperature ``tau``, the gate keeps
a token when ``delta / tau + L > 0`` (``L`` standard logistic noise), i.e. with
probability ``p = sigmoid(delta / tau)``; its straight-through surrogate is
``sigmoid(delta / tau + L)``. The temperature tempers the logits (not only the
relaxation), so annealing it makes the sampled training decisions, and the
expected cost built from ``p``, converge to the deterministic eval decisions
``delta > 0`` and their real cost. All gate maths runs in float32, also under
autocast, because the budget term and the straight-through gradient are
sensitive to bf16 rounding.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_


class GateOutput(NamedTuple):
    """What a gate decided.

    Attributes:
        mask: Hard 0/1 decisions (float). In training it carries the
            straight-through gradient of the soft relaxation.
        prob: Keep probability (differentiable, float32); used by the
            expected cost.
        score: Keep logit ``delta`` used for ranking (top-k keep ratios).
    """

    mask: torch.Tensor
    prob: torch.Tensor
    score: torch.Tensor


def logistic_noise(shape: torch.Size, device: torch.device,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Difference of two Gumbel(0, 1) samples, i.e. Logistic(0, 1) noise."""
    u = torch.rand(shape, device=device, dtype=torch.float32, generator=generator)
    u = u.clamp_(1e-6, 1 - 1e-6)
    return torch.log(u) - torch.log1p(-u)


class _StraightThrough(torch.autograd.Function):
    """Returns ``hard`` exactly; passes the gradient to ``surrogate``."""

    @staticmethod
    def forward(ctx, hard: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
        return hard.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, grad


def straight_through(hard: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """``hard`` in the forward (exact 0/1 values, unlike ``hard + s - s.detach()``),
    the gradient of ``surrogate`` in the backward."""
    if not surrogate.requires_grad:
        return hard
    return _StraightThrough.apply(hard, surrogate)


def hard_gumbel(delta: torch.Tensor, tau: float,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Hard binary Gumbel-softmax sample of the tempered logits ``delta / tau``
    with a straight-through gradient: keeps with probability
    ``sigmoid(delta / tau)``, so a falling temperature makes the training
    decisions converge to the deterministic eval rule ``delta > 0``."""
    soft = torch.sigmoid(delta / tau + logistic_noise(delta.shape, delta.device, generator))
    return straight_through((soft > 0.5).to(soft.dtype), soft)


class _EMALinearGate(nn.Module):
    """Linear ``d -> 2`` gate with an EMA copy of its weights.

    Args:
        dim: Input feature dimension.
        init_bias: Initial keep logit ``delta`` (bias of keep minus skip).
            Positive values start the gate open.
        momentum: EMA momentum ``m`` of paper eq. 3.
    """

    def __init__(self, dim: int, init_bias: float = 0.0, momentum: float = 0.999) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f'gate momentum must be in [0, 1), got {momentum}')
        self.proj = nn.Linear(dim, 2)
        self.momentum = momentum
        self.init_bias = init_bias
        self.register_buffer('ema_weight', torch.zeros(2, dim))
        self.register_buffer('ema_bias', torch.zeros(2))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Small random weights, bias ``(0, init_bias)``; EMA starts equal."""
        trunc_normal_(self.proj.weight, std=0.02)
        with torch.no_grad():
            self.proj.bias.copy_(torch.tensor([0.0, float(self.init_bias)]))
        self.reset_ema()

    @torch.no_grad()
    def reset_ema(self) -> None:
        self.ema_weight.copy_(self.proj.weight)
        self.ema_bias.copy_(self.proj.bias)

    @torch.no_grad()
    def update_ema(self, momentum: Optional[float] = None) -> None:
        """One EMA step with ``momentum`` (default: the gate's own)."""
        m = self.momentum if momentum is None else momentum
        self.ema_weight.mul_(m).add_(self.proj.weight.detach(), alpha=1 - m)
        self.ema_bias.mul_(m).add_(self.proj.bias.detach(), alpha=1 - m)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """Keep logit ``logit_keep - logit_skip`` in float32 (..., d) -> (...)."""
        if self.training:
            w, b = self.proj.weight, self.proj.bias
        else:
            w, b = self.ema_weight, self.ema_bias
        if torch.is_autocast_enabled(x.device.type):  # the gate runs in float32
            with torch.autocast(device_type=x.device.type, enabled=False):
                logits = F.linear(x.float(), w.float(), b.float())
        else:  # (entering the context costs as much as the GEMV here)
            logits = F.linear(x.float(), w.float(), b.float())
        return logits[..., 1] - logits[..., 0]

    def decide(self, delta: torch.Tensor, tau: float,
               generator: Optional[torch.Generator]) -> GateOutput:
        prob = torch.sigmoid(delta / tau)
        if self.training:
            mask = hard_gumbel(delta, tau, generator)
        else:
            mask = (delta > 0).float()
        return GateOutput(mask, prob, delta)


class RowGate(_EMALinearGate):
    """Per-token gate of a grid node (paper eqs. 1-3).

    ``forward(x)`` takes tokens ``(B, N, C)`` and returns a :class:`GateOutput`
    with ``(B, N)`` tensors.
    """

    def forward(self, x: torch.Tensor, tau: float = 1.0,
                generator: Optional[torch.Generator] = None,
                offset: Optional[torch.Tensor] = None) -> GateOutput:
        """``offset``: added to the keep logit (the budget dial,
        :mod:`dit_mm.models.budget_dial`); ``None`` adds nothing."""
        delta = self.delta(x)
        return self.decide(delta if offset is None else delta + offset, tau, generator)


class ColumnGate(_EMALinearGate):
    """Per-image gate of a patch-embedding edge (paper section 3.2).

    ``forward(x)`` takes tokens ``(B, N, C)``, average-pools them and returns a
    :class:`GateOutput` with ``(B,)`` tensors.
    """

    def forward(self, x: torch.Tensor, tau: float = 1.0,
                generator: Optional[torch.Generator] = None,
                offset: Optional[torch.Tensor] = None) -> GateOutput:
        delta = self.delta(x.float().mean(dim=1))
        return self.decide(delta if offset is None else delta + offset, tau, generator)


def attention_delta(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free 'attention' score (Table 7): how much the map's mean
    query attends to each token, as a log-ratio to the uniform weight.

    ``delta > 0`` for tokens that get more than the average attention.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = F.layer_norm(x.float(), x.shape[-1:])
        query = x.mean(dim=1, keepdim=True)  # (B, 1, C)
        logits = (query * x).sum(-1) / x.shape[-1] ** 0.5  # (B, N)
        return torch.log_softmax(logits, dim=-1) + torch.log(
            torch.tensor(float(x.shape[1]), device=x.device))


def random_delta(shape: torch.Size, device: torch.device, keep_prob: float,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Random keep logits (Table 7 'random'): keeps each token with
    probability ``keep_prob`` when thresholded at 0."""
    logit = torch.logit(torch.tensor(keep_prob)).item()
    return logistic_noise(shape, device, generator) + logit
