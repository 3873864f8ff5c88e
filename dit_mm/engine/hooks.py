"""``BudgetLossHook``: the paper's budget loss inside any mmdet/mmseg model.

Hooks run around ``train_step``, not inside the model's ``loss()``. The hook
therefore wraps the ``loss`` method of the (unwrapped) model instance once,
in ``before_train``: the wrapper calls the original ``loss()`` and adds

* ``loss_budget = lambda * (C_expected / C_base - mu)^2`` (summed into the
  total loss by mmengine's ``parse_losses``, because its key has ``loss``);
* ``flops_exp``, ``flops_real`` (expected and real FLOPs as fractions of
  ``C_base``) and ``keep_s0..keep_s3`` (kept-token fraction per scale): keys
  without ``loss``, so they are logged, not summed.

The model's type is unchanged, and since DDP calls ``module.forward`` which
calls ``module.loss``, the term is part of the synchronised graph. With
``routing='static'`` or ``'full'`` (no gates to train) no terms are added.

The hook owns the schedules, all pure functions of the iteration (so a
resumed run continues them exactly): linear warm-up of ``lambda`` and
exponential annealing of the Gumbel temperature. It also reseeds the
backbone's Gumbel noise generator from ``(seed, rank, iteration)`` every
iteration, which makes gate sampling reproducible across a resume.
"""
from __future__ import annotations

import math
import types
from typing import Any, Dict

import torch
from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmengine.model import BaseTTAModel, is_model_wrapper
from mmengine.registry import HOOKS

from ..models.backbone import DiT


def find_dit(model: torch.nn.Module) -> DiT:
    """The DiT backbone of a (possibly DDP- or TTA-wrapped) detector/segmentor.

    Raises:
        TypeError: if the model has no DiT backbone.
    """
    while is_model_wrapper(model) or isinstance(model, BaseTTAModel):
        model = model.module
    backbone = getattr(model, 'backbone', None)
    if isinstance(model, DiT):
        return model
    if not isinstance(backbone, DiT):
        raise TypeError(
            f'BudgetLossHook needs a model whose backbone is DiT; '
            f'{type(model).__name__}.backbone is {type(backbone).__name__}. Set '
            "model.backbone=dict(type='DiT', ...) or remove the hook from custom_hooks.")
    return backbone


@HOOKS.register_module()
class BudgetLossHook(Hook):
    """Adds DiT's budget loss (paper eqs. 6-7) to the model's loss dict.

    Args:
        mu: Budget as a fraction of PVTv2's static cost ``C_base``; must be in
            ``(0, C_full / C_base]`` at the training input size (values above 1
            spend more than PVTv2); checked on every batch.
        loss_weight: ``lambda_C`` after warm-up.
        warmup_iters: Iterations of linear warm-up of ``lambda`` from 0.
        tau_start: Gumbel-softmax temperature at iteration 0.
        tau_end: Temperature reached at ``tau_anneal_iters`` (exponential
            schedule), kept afterwards.
        tau_anneal_iters: Length of the annealing; 0 keeps ``tau_start``.
        seed: Base seed of the Gumbel noise (combined with rank and iteration).
    """

    priority = 'NORMAL'

    def __init__(self, mu: float = 1.0, loss_weight: float = 2.0, warmup_iters: int = 0,
                 tau_start: float = 1.0, tau_end: float = 1.0, tau_anneal_iters: int = 0,
                 seed: int = 0) -> None:
        if not isinstance(mu, (int, float)) or mu <= 0:
            raise ValueError(f'BudgetLossHook: mu={mu!r} must be > 0 (a fraction of '
                             "PVTv2's static cost)")
        if not isinstance(loss_weight, (int, float)) or loss_weight < 0:
            raise ValueError(f'BudgetLossHook: loss_weight={loss_weight!r} must be >= 0')
        if warmup_iters < 0 or tau_anneal_iters < 0:
            raise ValueError('BudgetLossHook: warmup_iters and tau_anneal_iters must be >= 0')
        if tau_start <= 0 or tau_end <= 0:
            raise ValueError('BudgetLossHook: temperatures must be > 0')
        self.mu = float(mu)
        self.loss_weight = float(loss_weight)
        self.warmup_iters = int(warmup_iters)
        self.tau_start = float(tau_start)
        self.tau_end = float(tau_end)
        self.tau_anneal_iters = int(tau_anneal_iters)
        self.seed = int(seed)
        self.current_weight = 0.0 if warmup_iters else self.loss_weight

    # ------------------------------------------------------------- schedules
    def weight_at(self, it: int) -> float:
        """``lambda`` at iteration ``it`` (linear warm-up)."""
        if self.warmup_iters and it < self.warmup_iters:
            return self.loss_weight * (it + 1) / self.warmup_iters
        return self.loss_weight

    def tau_at(self, it: int) -> float:
        """Gumbel temperature at iteration ``it`` (exponential annealing)."""
        if not self.tau_anneal_iters:
            return self.tau_start
        t = min(it, self.tau_anneal_iters) / self.tau_anneal_iters
        return self.tau_start * math.exp(t * math.log(self.tau_end / self.tau_start))

    # ----------------------------------------------------------------- hooks
    def before_train(self, runner) -> None:
        # mu's upper bound C_full / C_base depends on the input size (2.63 at
        # 224x224, 2.65 on the toy set's 256x320): it is checked at the size
        # of every training batch, by DiT.budget_loss, from the first one on
        backbone = find_dit(runner.model)
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        if not getattr(model, '_dit_budget_wrapped', False):
            install_budget_loss(model, self)
        self._backbone = backbone

    def before_train_iter(self, runner, batch_idx: int, data_batch: Any = None) -> None:
        it = runner.iter
        self.current_weight = self.weight_at(it)
        backbone = self._backbone
        backbone.gate_tau = self.tau_at(it)
        ref = next(backbone.parameters())
        gen = backbone.generator
        if gen is None or gen.device != ref.device:
            gen = backbone.generator = torch.Generator(device=ref.device)
        gen.manual_seed(self.seed * 1_000_003 + get_rank() * 7_919 + it)

    def budget_terms(self, backbone: DiT) -> Dict[str, torch.Tensor]:
        """Loss and log entries of the backbone's last forward."""
        flops = backbone.flops()
        static = flops['static']
        terms: Dict[str, torch.Tensor] = {
            'loss_budget': self.current_weight * backbone.budget_loss(self.mu)}
        ref = terms['loss_budget']
        terms['flops_exp'] = flops['expected'].detach() / static
        terms['flops_real'] = ref.new_tensor(flops['real'] / static)
        terms['budget_mu'] = ref.new_tensor(self.mu)
        terms['gate_tau'] = ref.new_tensor(backbone.gate_tau)
        for k, v in backbone.keep_ratios().items():
            terms[k] = ref.new_tensor(v)
        return terms


def install_budget_loss(model: torch.nn.Module, hook: BudgetLossHook) -> None:
    """Wraps ``model.loss`` (instance attribute) so its dict gains the budget
    terms of ``hook``. Idempotent per model."""
    backbone = find_dit(model)
    original = model.loss

    def loss_with_budget(self, *args: Any, **kwargs: Any) -> Dict[str, Any]:
        losses = original(*args, **kwargs)
        if backbone.routing == 'dynamic':
            losses.update(hook.budget_terms(backbone))
        return losses

    model.loss = types.MethodType(loss_with_budget, model)
    model._dit_budget_wrapped = True



@HOOKS.register_module()
class IterSeedHook(Hook):
    """Reseeds torch's global RNG from ``(seed, rank, iteration)`` before
    every training iteration.

    mmengine does not checkpoint random states, so without this a resumed run
    draws different random numbers inside the model (e.g. mmdet's proposal
    samplers, drop path) than the uninterrupted run. With it, iteration ``k``
    sees the same random stream whether or not the run was resumed.
    Data-pipeline randomness (numpy, in the data loader) is not covered.

    Args:
        seed: Base seed.
    """

    priority = 'VERY_HIGH'

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)

    def before_train_iter(self, runner, batch_idx: int, data_batch: Any = None) -> None:
        torch.manual_seed(self.seed * 1_000_003 + get_rank() * 7_919 + runner.iter)
