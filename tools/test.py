"""Evaluate a DiT detector, segmentor or classifier (mmdet, mmseg or mmpretrain config).

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--metrics-json FILE]
                         [--budget B | --keep-ratio R] [--static-shapes] [--out OUT]
                         [--show-dir DIR]
                         [--show [--wait-time S]] [--tta]
    bash tools/dist_test.sh CONFIG CHECKPOINT 2

``--out``, ``--show``, ``--show-dir``, ``--wait-time`` and ``--tta`` behave
as in mmdet 3.3's, mmseg 1.2's and mmpretrain 1.2's own ``tools/test.py``,
chosen by the config's ``default_scope``:

* ``--out``: mmdet: the predictions to a ``.pkl``/``.pickle`` file
  (``DumpDetResults``, masks RLE-encoded), one entry per image; mmseg: a
  directory, one PNG of predicted labels per image (``output_dir`` and
  ``keep_results`` of ``test_evaluator``); mmpretrain: a ``.pkl`` file
  (mmengine's ``DumpResults``).
* ``--show-dir D``: the predictions painted on every test image. mmdet:
  into ``WORK_DIR/TIMESTAMP/D`` (``DetVisualizationHook.test_out_dir``; an
  absolute ``D`` as it is); mmseg: into ``D/vis_data/vis_image`` (the visualizer's
  ``save_dir``; every image, where mmseg's tool keeps the hook's interval,
  every 50th batch by default); mmpretrain: into ``D``
  (``VisualizationHook.out_dir``, every image).
* ``--show``, ``--wait-time``: the visualization hook's ``show`` and
  ``wait_time`` (a window per image: needs a display).
* ``--tta``: ``cfg.tta_model`` wraps ``cfg.model`` and ``cfg.tta_pipeline``
  replaces the test pipeline. Unlike mmdet's and mmpretrain's tools, a
  config without them is an error, not a flip TTA made up on the spot; for a
  detector with masks use ``DetMaskTTAModel`` (mmdet's ``DetTTAModel``
  refuses masks), as ``configs/detection/mask_rcnn_dit_b0_toy.py`` does.
"""
import argparse
import json
import os
import os.path as osp
import sys

from mmengine.config import Config, ConfigDict, DictAction
from mmengine.logging import print_log
from mmengine.runner import Runner

from dit_mm.engine.hooks import find_dit
from dit_mm.engine.runtime import allow_mmengine_checkpoints, keep_freed_memory, setup_distributed

SCOPES = ('mmdet', 'mmseg', 'mmpretrain')
PICKLE = ('.pkl', '.pickle')


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Test a DiT detector, segmentor or classifier')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='the dir to save logs and results')
    parser.add_argument('--metrics-json', help='also write the metrics to this JSON file')
    parser.add_argument('--out', help='mmdet, mmpretrain: dump the predictions to this .pkl '
                        'file; mmseg: save one PNG of predicted labels per image in this '
                        'directory')
    parser.add_argument('--show', action='store_true',
                        help='show the predictions, a window per image (needs a display)')
    parser.add_argument('--show-dir', help='save the painted predictions here (mmdet: under '
                        'WORK_DIR/TIMESTAMP/; mmseg: in DIR/vis_data/vis_image)')
    parser.add_argument('--wait-time', type=float, default=2,
                        help='seconds each --show window stays (default 2)')
    parser.add_argument('--tta', action='store_true',
                        help="test-time augmentation: the config's tta_model and tta_pipeline")
    parser.add_argument('--keep-ratio', type=float, default=None,
                        help="override the backbone's keep_ratio at inference")
    parser.add_argument('--budget', type=float, default=None,
                        help='inference budget (x C_base) read off the spend curve of a '
                             'checkpoint calibrated by tools/calibrate_budget.py')
    parser.add_argument('--static-shapes', action='store_true',
                        help='static-shape routing: every gated node on a fixed number of '
                             'token slots (capacities from --keep-ratio, or the per-node '
                             'capacities a calibrated checkpoint stores, read at --budget); '
                             'what tools/export.py deploys')
    parser.add_argument('--keep-freed-memory', action='store_true',
                        help='keep freed memory for reuse instead of page-faulting it back '
                             'in every forward (glibc; faster CPU inference, the process '
                             'keeps its peak heap)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value (xxx=yyy format)')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if args.budget is not None and args.keep_ratio is not None:
        parser.error('give --budget or --keep-ratio, not both (a keep ratio overrides the '
                     'row gates that the budget dials)')
    if args.wait_time < 0:
        parser.error(f'--wait-time {args.wait_time}: give seconds >= 0')
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def _scope(cfg: Config, flag: str) -> str:
    scope = cfg.get('default_scope')
    if scope not in SCOPES:
        raise SystemExit(f'{flag}: the config has default_scope={scope!r}; {flag} follows '
                         f'the test tool of {", ".join(SCOPES)}, so the config must name one')
    return scope


def _check_out(cfg: Config, out: str) -> None:
    if _scope(cfg, '--out') == 'mmseg':
        if out.endswith(PICKLE) or osp.isfile(out):
            raise SystemExit(f'--out {out}: for an mmseg config --out is a directory (one PNG '
                             'of predicted labels per image), not a file')
    elif not out.endswith(PICKLE):
        raise SystemExit(f'--out {out}: predictions are dumped to a pickle file; give a path '
                         'ending in .pkl or .pickle')


def _has_display() -> bool:
    if not sys.platform.startswith('linux'):
        return True
    return bool(os.environ.get('DISPLAY') or os.environ.get('WAYLAND_DISPLAY'))


def _visualize(cfg: Config, args: argparse.Namespace) -> None:
    """Turns the config's visualization hook on, as each framework's tool does."""
    flag = '--show' if args.show else '--show-dir'
    scope = _scope(cfg, flag)
    if args.show and not _has_display():
        raise SystemExit('--show opens a window per image, and there is no display here '
                         '(DISPLAY is not set); use --show-dir DIR to save the pictures')
    if not cfg.get('default_hooks', {}).get('visualization'):
        kind = dict(mmdet='DetVisualizationHook', mmseg='SegVisualizationHook').get(
            scope, 'VisualizationHook')
        raise SystemExit(f'{flag}: the config has no default_hooks.visualization; add '
                         f"default_hooks=dict(visualization=dict(type='{kind}'))")
    if scope == 'mmdet':
        from mmdet.engine.hooks.utils import trigger_visualization_hook
        trigger_visualization_hook(cfg, args)
        return
    hook = cfg.default_hooks.visualization
    if scope == 'mmseg':  # mmseg 1.2 tools/test.py: trigger_visualization_hook
        hook.draw = True
        hook.interval = 1  # every image; mmseg's tool keeps the hook's (every 50th batch)
        if args.show:
            hook.show, hook.wait_time = True, args.wait_time
        if args.show_dir:
            cfg.visualizer.save_dir = args.show_dir
            # mmseg's configs name the visualizer 'visualizer', and mmengine hands a later
            # Runner of the same process the instance of that name, with the old save_dir;
            # unnamed, each Runner builds its own (named after the run)
            cfg.visualizer.pop('name', None)
        return
    # mmpretrain 1.2 tools/test.py (merge_args), every image (--interval 1)
    hook.update(enable=True, show=args.show, wait_time=args.wait_time, out_dir=args.show_dir,
                interval=1)


def _test_time_augmentation(cfg: Config, config_path: str) -> None:
    missing = [k for k in ('tta_model', 'tta_pipeline') if k not in cfg]
    if missing:
        raise SystemExit(
            f'--tta: {config_path} has no {" and no ".join(missing)}. Add them, e.g. '
            "mmdet's flip TTA: tta_model=dict(type='DetTTAModel' (or 'DetMaskTTAModel' for "
            "a detector with masks), tta_cfg=dict(nms=dict(type='nms', iou_threshold=0.5), "
            "max_per_img=100)) and a tta_pipeline with a TestTimeAug step (see "
            'configs/detection/mask_rcnn_dit_b0_toy.py)')
    roi_head = cfg.model.get('roi_head') or {}
    if cfg.tta_model.get('type') in ('DetTTAModel', 'mmdet.DetTTAModel') and \
            roi_head.get('mask_head') is not None:
        raise SystemExit("--tta: mmdet's DetTTAModel cannot merge instance masks, and this "
                         "model predicts them; use tta_model=dict(type='DetMaskTTAModel', "
                         'tta_cfg=...) (dit_mm)')
    cfg.model = ConfigDict(**cfg.tta_model, module=cfg.model)
    cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline


def build_config(args: argparse.Namespace) -> Config:
    """The test config: the file, ``--cfg-options``, then the other flags."""
    for path in (args.config, args.checkpoint):
        if not osp.isfile(path):
            raise SystemExit(f'file not found: {path}')
    cfg = Config.fromfile(args.config)
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.keep_ratio is not None:
        cfg.model.backbone.keep_ratio = args.keep_ratio
    if args.static_shapes:
        cfg.model.backbone.static_shapes = True
    cfg.model.backbone.init_cfg = None  # weights come from the checkpoint
    cfg.work_dir = args.work_dir or cfg.get('work_dir') or osp.join(
        './work_dirs', osp.splitext(osp.basename(args.config))[0])
    cfg.load_from = args.checkpoint
    # a test needs no training loop, and building one builds the training data set:
    # mmseg's SegVisualizationHook reads runner.iter, which builds cfg.train_dataloader,
    # so --show-dir failed wherever the training images were not on disk
    for key in ('train_dataloader', 'train_cfg', 'optim_wrapper', 'param_scheduler'):
        cfg[key] = None
    if args.out is not None:
        _check_out(cfg, args.out)
        if cfg.get('default_scope') == 'mmseg':  # mmseg 1.2 tools/test.py
            evaluators = cfg.test_evaluator
            for metric in evaluators if isinstance(evaluators, list) else [evaluators]:
                metric.update(output_dir=args.out, keep_results=True)
    if args.show or args.show_dir:
        _visualize(cfg, args)
    if args.tta:
        _test_time_augmentation(cfg, args.config)  # after the edits of cfg.model
    setup_distributed(cfg, args.launcher)
    return cfg


def main(argv=None) -> dict:
    args = parse_args(argv)
    allow_mmengine_checkpoints()
    if args.keep_freed_memory and not keep_freed_memory():
        print_log('--keep-freed-memory: not glibc, ignored', logger='current', level=30)
    cfg = build_config(args)
    runner = Runner.from_cfg(cfg)
    if args.out is not None and cfg.get('default_scope') != 'mmseg':
        if cfg.get('default_scope') == 'mmdet':
            from mmdet.evaluation import DumpDetResults as Dump
        else:
            from mmengine.evaluator import DumpResults as Dump
        runner.test_evaluator.metrics.append(Dump(out_file_path=args.out))
    if args.budget is not None or args.static_shapes:
        # load now, so that a budget outside the stored curve, or a checkpoint
        # without capacities, fails before testing
        runner.load_or_resume()
        backbone = find_dit(runner.model)
        flag = f'--budget {args.budget}' if args.budget is not None else '--static-shapes'
        try:
            if args.budget is not None:
                backbone.budget = args.budget
            backbone.gate_offset()
            if args.static_shapes:
                backbone.capacity_fractions()
        except (RuntimeError, ValueError) as e:
            raise SystemExit(f'{flag}: {e}') from None
        if args.budget is not None:
            print_log(f'--budget {args.budget}: gate offset {backbone.gate_offset():+.4f} from '
                      f'the spend curve of {args.checkpoint}', logger='current')
        if args.static_shapes:
            caps = ', '.join(f's{i}_t{j} {f:.3f}'
                             for (i, j), f in backbone.capacity_fractions().items())
            print_log(f'--static-shapes: capacities (fraction of each node\'s tokens): '
                      f'{caps or "no gated node"}', logger='current')
    metrics = runner.test()
    if args.metrics_json and runner.rank == 0:
        with open(args.metrics_json, 'w') as f:
            json.dump({k: float(v) for k, v in metrics.items()}, f, indent=2)
    return metrics


if __name__ == '__main__':
    main()
