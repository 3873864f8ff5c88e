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

The hook owns the schedules, all pure functions of the iteration and the
run's length (so a resumed run continues them exactly): linear warm-up of
``lambda`` and exponential annealing of the Gumbel temperature. It also
reseeds the backbone's Gumbel noise generator from ``(seed, rank,
iteration)`` every iteration, which makes gate sampling reproducible across
a resume.

At the last training iteration, before the last checkpoint is saved, it
calibrates the gates so that the checkpoint spends ``mu`` at inference
(:mod:`.calibration`), and warns when the spend at inference misses ``mu``
by more than 5 %. Why: training decides with noisy Gumbel samples and
inference thresholds the gate probabilities, so the two spend differently
even when the budget loss is met (``docs/user_guide.md``, "The budget hook").
"""
from __future__ import annotations

import math
import types
from typing import Any, Dict, List, Optional

import torch
from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from ..models.backbone import DiT
from .backbone import find_dit
from .calibration import apply_calibration, calibrate, spend
from .data import image_loader, iter_images

#: The Gumbel temperature the hook anneals to when ``tau_end`` is not given
#: (the value of every shipped config).
DEFAULT_TAU_END = 0.2

#: The end-of-training warning fires when the spend at inference misses
#: ``mu`` by more than this fraction of ``mu``.
SPEND_WARN_FRACTION = 0.05


@HOOKS.register_module()
class BudgetLossHook(Hook):
    """Adds DiT's budget loss (paper eqs. 6-7) to the model's loss dict, and
    leaves a checkpoint that spends ``mu`` at inference.

    With only ``mu`` given, the defaults are meant to work: ``lambda`` = 2,
    the Gumbel temperature annealed from 1 to 0.2 over the whole run (its
    length read from the runner), so that the noisy training decisions end
    close to the thresholded decisions of inference; and at the end a
    calibration of the gate offset on 64 training images, so that the saved
    checkpoint spends ``mu`` at inference.

    Args:
        mu: Budget as a fraction of PVTv2's static cost ``C_base``; must be in
            ``(0, C_full / C_base]`` at the training input size (values above 1
            spend more than PVTv2); checked on every batch.
        loss_weight: ``lambda_C`` after warm-up.
        warmup_iters: Iterations of linear warm-up of ``lambda`` from 0.
        tau_start: Gumbel-softmax temperature at iteration 0.
        tau_end: Temperature reached at ``tau_anneal_iters`` (exponential
            schedule), kept afterwards. Default :data:`DEFAULT_TAU_END`.
        tau_anneal_iters: Length of the annealing; ``None`` (default): the
            run's ``max_iters``; 0 keeps ``tau_start`` throughout.
        seed: Base seed of the Gumbel noise (combined with rank and iteration).
        calibrate_at_end: At the last training iteration, calibrate the gate
            offset so that the model spends ``mu`` at inference on
            ``calibration_images`` training images (through the test
            pipeline), and store the offset and the spend curve in the
            backbone's dial, which the last checkpoint saves. The run logs
            the spend before and after. Only for ``routing='dynamic'`` with
            learned gates and no ``keep_ratio``; otherwise nothing is done.
        calibration_images: Training images for the calibration (and for
            the check of the spend when ``calibrate_at_end=False``); 0 skips
            both.
        calibration_tol: Relative tolerance of the calibration on ``mu``.
    """

    priority = 'NORMAL'  # before CheckpointHook (VERY_LOW): the last checkpoint is calibrated

    def __init__(self, mu: float = 1.0, loss_weight: float = 2.0, warmup_iters: int = 0,
                 tau_start: float = 1.0, tau_end: Optional[float] = None,
                 tau_anneal_iters: Optional[int] = None, seed: int = 0,
                 calibrate_at_end: bool = True, calibration_images: int = 64,
                 calibration_tol: float = 0.01) -> None:
        tau_end = DEFAULT_TAU_END if tau_end is None else tau_end
        if not isinstance(mu, (int, float)) or mu <= 0:
            raise ValueError(f'BudgetLossHook: mu={mu!r} must be > 0 (a fraction of '
                             "PVTv2's static cost)")
        if not isinstance(loss_weight, (int, float)) or loss_weight < 0:
            raise ValueError(f'BudgetLossHook: loss_weight={loss_weight!r} must be >= 0')
        if warmup_iters < 0 or (tau_anneal_iters is not None and tau_anneal_iters < 0):
            raise ValueError('BudgetLossHook: warmup_iters and tau_anneal_iters must be >= 0')
        if tau_start <= 0 or tau_end <= 0:
            raise ValueError('BudgetLossHook: temperatures must be > 0')
        if not isinstance(calibration_images, int) or calibration_images < 0:
            raise ValueError(f'BudgetLossHook: calibration_images={calibration_images!r} must '
                             'be an integer >= 0')
        if not 0 < calibration_tol < 1:
            raise ValueError(f'BudgetLossHook: calibration_tol={calibration_tol!r} must be in '
                             '(0, 1)')
        self.mu = float(mu)
        self.loss_weight = float(loss_weight)
        self.warmup_iters = int(warmup_iters)
        self.tau_start = float(tau_start)
        self.tau_end = float(tau_end)
        self.tau_anneal_iters = None if tau_anneal_iters is None else int(tau_anneal_iters)
        self.seed = int(seed)
        self.calibrate_at_end = bool(calibrate_at_end)
        self.calibration_images = calibration_images
        self.calibration_tol = float(calibration_tol)
        self.current_weight = 0.0 if warmup_iters else self.loss_weight
        #: the annealing length in use: ``tau_anneal_iters``, or the run's
        #: ``max_iters`` once a runner has started (``before_train``)
        self.anneal_iters = self.tau_anneal_iters or 0
        #: what the end of training measured: ``spend_before``, ``spend``
        #: (x ``C_base`` on the calibration images), ``offset``, ``images``
        self.end_report: Dict[str, float] = {}

    # ------------------------------------------------------------- schedules
    def weight_at(self, it: int) -> float:
        """``lambda`` at iteration ``it`` (linear warm-up)."""
        if self.warmup_iters and it < self.warmup_iters:
            return self.loss_weight * (it + 1) / self.warmup_iters
        return self.loss_weight

    def tau_at(self, it: int) -> float:
        """Gumbel temperature at iteration ``it`` (exponential annealing over
        :attr:`anneal_iters`)."""
        if not self.anneal_iters:
            return self.tau_start
        t = min(it, self.anneal_iters) / self.anneal_iters
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
        if self.tau_anneal_iters is None:
            self.anneal_iters = int(runner.max_iters)
        dial = backbone.dial
        if float(dial.offset) != 0.0 or dial.has_curve:
            # a calibration fits the weights it was measured on; training moves them
            # (and a run resumed from its own last checkpoint must see what it saw)
            runner.logger.info(f'BudgetLossHook: training starts from the gates as trained: the '
                               f'calibration in the loaded weights (offset '
                               f'{float(dial.offset):+.3f}) is dropped')
            dial.clear()

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

    def after_train_iter(self, runner, batch_idx: int, data_batch: Any = None,
                         outputs: Any = None) -> None:
        if self.is_last_train_iter(runner):
            self.finish_training(runner)

    def finish_training(self, runner) -> None:
        """Calibrates the gates to ``mu`` (``calibrate_at_end``), or measures
        the spend, on training images, and warns when it misses ``mu``."""
        backbone = self._backbone
        if (backbone.routing != 'dynamic' or backbone.gate_type != 'learned'
                or backbone.keep_ratio is not None or not self.calibration_images):
            return
        logger = runner.logger
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        try:
            inputs = self._images(runner, model)
            if self.calibrate_at_end:
                cal = calibrate(model, inputs, self.mu, tol=self.calibration_tol,
                                max_curve_points=24, curve_gap=0.05, progress=None)
                apply_calibration(model, cal)
                self.end_report = dict(spend_before=cal.spend_before, spend=cal.spend,
                                       offset=cal.offset, images=len(inputs))
                logger.info(
                    f'BudgetLossHook: calibrated to mu={self.mu:g} on {len(inputs)} training '
                    f'images: spend at inference {cal.spend_before:.3f} -> {cal.spend:.3f} x '
                    f'C_base (gate offset {cal.offset:+.3f}, {cal.seconds:.0f} s); the '
                    'checkpoint keeps it')
            else:
                measured = spend(backbone, inputs)
                self.end_report = dict(spend_before=measured, spend=measured,
                                       offset=float(backbone.dial.offset), images=len(inputs))
                logger.info(f'BudgetLossHook: spend at inference on {len(inputs)} training '
                            f'images: {measured:.3f} x C_base (mu={self.mu:g})')
        except Exception as err:  # noqa: BLE001 -- never lose the last checkpoint to it
            # e.g. mu out of the gates' reach on these images, or a config whose
            # training set cannot be read through a test pipeline
            logger.warning(f'BudgetLossHook: could not calibrate to mu={self.mu:g} '
                           f'({type(err).__name__}: {err}). {self._fix(runner)}')
            return
        got = self.end_report['spend']
        if abs(got - self.mu) > SPEND_WARN_FRACTION * self.mu:
            logger.warning(f'BudgetLossHook: the model spends {got:.3f} x C_base at inference '
                           f'(mu={self.mu:g}, off by more than '
                           f'{SPEND_WARN_FRACTION:.0%}). {self._fix(runner)}')

    def _images(self, runner, model: torch.nn.Module) -> List[torch.Tensor]:
        """The first ``calibration_images`` training images, through the
        test pipeline and the model's data preprocessor."""
        loader = image_loader(runner.cfg, 'train')
        inputs = [b['inputs'] for b in iter_images(loader, model, self.calibration_images)]
        if not inputs:
            raise ValueError('the training set has no images')
        return inputs

    def _fix(self, runner) -> str:
        """The command that calibrates the last checkpoint (saved after this hook)."""
        from mmengine.runner import EpochBasedTrainLoop
        cfg = getattr(runner.cfg, 'filename', None) or 'CONFIG'
        last = (f'epoch_{runner.max_epochs}' if isinstance(runner.train_loop, EpochBasedTrainLoop)
                else f'iter_{runner.max_iters}')
        return ('To calibrate the checkpoint: python tools/calibrate_budget.py '
                f'{cfg} {runner.work_dir}/{last}.pth --mu {self.mu:g} --split train '
                f'--out {runner.work_dir}/calibrated.pth')

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
