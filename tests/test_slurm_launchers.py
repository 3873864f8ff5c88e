"""tools/slurm_train.sh and tools/slurm_test.sh, through DRY_RUN=1: the srun
command they would run (partition, job name, resources, config, work dir or
checkpoint, ``--launcher=slurm``, extra arguments passed through, env
overrides), and a usage message with a nonzero exit on bad input. No Slurm
is needed: a dry run prints the command instead of running it."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / 'tools' / 'slurm_train.sh'
TEST = REPO / 'tools' / 'slurm_test.sh'
ENV_KEYS = ('GPUS', 'GPUS_PER_NODE', 'CPUS_PER_TASK', 'SRUN_ARGS', 'PYTHON', 'DRY_RUN')

pytestmark = pytest.mark.skipif(shutil.which('bash') is None, reason='needs bash')


def _run(script: Path, *args: str, dry: bool = True, cwd: Path = REPO, **env):
    full_env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
    full_env['PYTHONPATH'] = '/some/where'
    if dry:
        full_env['DRY_RUN'] = '1'
    full_env.update(env)
    return subprocess.run(['bash', str(script), *args], env=full_env, cwd=cwd,
                          capture_output=True, text=True, timeout=30)


def _command(script: Path, *args: str, **env) -> list:
    proc = _run(script, *args, **env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    return shlex.split(lines[0])


def _srun_opts(cmd: list) -> dict:
    """The ``--key=value`` / ``-p value`` options between ``srun`` and the
    interpreter."""
    assert cmd[1] == 'srun'
    opts, i = {}, 2
    while cmd[i].startswith('-'):
        if cmd[i] == '-p':
            opts['-p'] = cmd[i + 1]
            i += 2
            continue
        key, _, value = cmd[i].partition('=')
        opts[key] = value
        i += 1
    return opts


def _program(cmd: list) -> list:
    """The interpreter and everything after it."""
    i = next(i for i, tok in enumerate(cmd) if tok == 'python' or tok.endswith('/python'))
    return cmd[i:]


def test_scripts_are_executable_bash():
    for script in (TRAIN, TEST):
        assert os.access(script, os.X_OK), f'chmod +x {script.name}'
        assert script.read_text().startswith('#!/usr/bin/env bash\n')
        subprocess.run(['bash', '-n', str(script)], check=True)


def test_train_defaults():
    cmd = _command(TRAIN, 'gpu', 'dit_mrcnn', 'configs/detection/mask_rcnn_dit_b2_3x.py',
                   'work_dirs/mrcnn')
    assert cmd[0] == f'PYTHONPATH={REPO}:/some/where'
    assert _srun_opts(cmd) == {
        '-p': 'gpu', '--job-name': 'dit_mrcnn', '--gres': 'gpu:8', '--ntasks': '8',
        '--ntasks-per-node': '8', '--cpus-per-task': '5', '--kill-on-bad-exit': '1'}
    assert _program(cmd) == ['python', '-u', str(REPO / 'tools' / 'train.py'),
                             'configs/detection/mask_rcnn_dit_b2_3x.py',
                             '--work-dir=work_dirs/mrcnn', '--launcher=slurm']


def test_test_defaults():
    cmd = _command(TEST, 'gpu', 'dit_eval', 'configs/classification/dit_b2_in1k.py',
                   'work_dirs/dit_b2_in1k/epoch_300.pth')
    assert _srun_opts(cmd)['-p'] == 'gpu'
    assert _srun_opts(cmd)['--job-name'] == 'dit_eval'
    assert _srun_opts(cmd)['--ntasks'] == '8'
    assert _program(cmd) == ['python', '-u', str(REPO / 'tools' / 'test.py'),
                             'configs/classification/dit_b2_in1k.py',
                             'work_dirs/dit_b2_in1k/epoch_300.pth', '--launcher=slurm']


@pytest.mark.parametrize('script', [TRAIN, TEST], ids=['train', 'test'])
def test_extra_args_pass_through(script):
    """Arguments after the fourth go to the Python tool, quoting kept."""
    cmd = _command(script, 'p', 'j', 'c.py', 'w', '--amp', '--cfg-options',
                   'model.backbone.arch=b1', 'work_dir=a b')
    assert _program(cmd)[-4:] == ['--amp', '--cfg-options', 'model.backbone.arch=b1',
                                  'work_dir=a b']
    assert _program(cmd)[-5] == '--launcher=slurm'


@pytest.mark.parametrize('script', [TRAIN, TEST], ids=['train', 'test'])
def test_env_overrides(script):
    cmd = _command(script, 'big', 'job', 'c.py', 'w', GPUS='16', CPUS_PER_TASK='8',
                   SRUN_ARGS='--quotatype=auto --mem 64G', PYTHON='/opt/py/bin/python')
    opts = _srun_opts(cmd)
    assert (opts['--ntasks'], opts['--ntasks-per-node'], opts['--gres']) == \
        ('16', '8', 'gpu:8')  # two nodes of 8
    assert opts['--cpus-per-task'] == '8'
    assert opts['--quotatype'] == 'auto' and opts['--mem'] == ''  # split on spaces
    assert cmd[cmd.index('--mem') + 1] == '64G'
    assert _program(cmd)[0] == '/opt/py/bin/python'

    opts = _srun_opts(_command(script, 'p', 'j', 'c.py', 'w', GPUS='16', GPUS_PER_NODE='4'))
    assert (opts['--ntasks'], opts['--ntasks-per-node'], opts['--gres']) == \
        ('16', '4', 'gpu:4')
    # fewer GPUs than a node: only those GPUs, unless GPUS_PER_NODE says otherwise
    opts = _srun_opts(_command(script, 'p', 'j', 'c.py', 'w', GPUS='1'))
    assert (opts['--ntasks'], opts['--ntasks-per-node'], opts['--gres']) == ('1', '1', 'gpu:1')
    opts = _srun_opts(_command(script, 'p', 'j', 'c.py', 'w', GPUS='2', GPUS_PER_NODE='8'))
    assert (opts['--ntasks'], opts['--ntasks-per-node'], opts['--gres']) == ('2', '8', 'gpu:8')


def test_runs_from_any_directory(tmp_path):
    cmd = _command(TRAIN, 'p', 'j', 'c.py', 'w', cwd=tmp_path, PYTHONPATH='')
    assert cmd[0] == f'PYTHONPATH={REPO}'
    assert _program(cmd)[2] == str(REPO / 'tools' / 'train.py')


@pytest.mark.parametrize('script,last', [(TRAIN, 'WORK_DIR'), (TEST, 'CHECKPOINT')],
                         ids=['train', 'test'])
def test_usage_on_missing_arguments(script, last):
    for args in ([], ['p'], ['p', 'j', 'c.py']):
        for dry in (True, False):  # never reaches srun
            proc = _run(script, *args, dry=dry)
            assert proc.returncode != 0
            assert proc.stdout == ''
            assert 'usage:' in proc.stderr
            assert f'PARTITION JOB_NAME CONFIG {last}' in proc.stderr


@pytest.mark.parametrize('script', [TRAIN, TEST], ids=['train', 'test'])
def test_bad_numbers(script):
    for env in (dict(GPUS='0'), dict(GPUS='eight'), dict(GPUS_PER_NODE='-1'),
                dict(CPUS_PER_TASK='4.5')):
        proc = _run(script, 'p', 'j', 'c.py', 'w', **env)
        assert proc.returncode != 0, env
        assert proc.stdout == ''
        assert 'must be a positive integer' in proc.stderr
