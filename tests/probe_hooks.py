"""Hooks that tests add to configs (via custom_imports) to look inside runs,
also in subprocesses and DDP ranks."""
import json
import os.path as osp

import torch
from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from dit_mm.engine.hooks import find_dit


@HOOKS.register_module()
class ProbeHook(Hook):
    """Writes, per rank, every iteration's scalar outputs to
    ``work_dir/probe_rank{r}.json`` and the gate weights and EMA buffers before
    and after training to ``work_dir/gates_{init_,}rank{r}.pt``."""

    priority = 'LOWEST'

    def before_run(self, runner):
        self.rows = []

    def before_train(self, runner):
        torch.save(self._gates(runner), osp.join(runner.work_dir,
                                                 f'gates_init_rank{get_rank()}.pt'))

    @staticmethod
    def _gates(runner):
        backbone = find_dit(runner.model)
        return {k: v.clone() for k, v in backbone.state_dict().items() if '_gates.' in k}

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        row = {'iter': runner.iter}
        row.update({k: float(v) for k, v in (outputs or {}).items()})
        self.rows.append(row)

    def after_train(self, runner):
        rank = get_rank()
        with open(osp.join(runner.work_dir, f'probe_rank{rank}.json'), 'w') as f:
            json.dump(self.rows, f)
        torch.save(self._gates(runner), osp.join(runner.work_dir, f'gates_rank{rank}.pt'))
