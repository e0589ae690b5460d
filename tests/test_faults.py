"""Faults and bad input: kill -9 at random moments, SIGTERM (one process and torchrun), damaged
checkpoints, non-finite losses and Hessian passes, a peer process that hangs or dies, and every
user mistake that must end in one line `error: ...`, exit status 2 and an untouched out_dir.

Runs that must end identical to an uninterrupted one are compared with `reference`, the same
config run straight through in this process: parameters, every optimizer state tensor and every
logged training loss, bit for bit. Every process runs on one thread: the machine's cores are
shared, and one thread everywhere also keeps the float summation order the same in every run."""

import copy
import glob
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from helpers import (ROOT, call_main, check_ok, make_char_dataset, read_metrics, run_main, run_script, tiny_args,
                     train_losses)

sys.path.insert(0, ROOT)
import checkpoint  # noqa: E402
import optimizers  # noqa: E402
import trainer  # noqa: E402

ONE_THREAD = {'OMP_NUM_THREADS': '1'}
# the shared run: a checkpoint every 2 iterations, a train row in metrics.jsonl every iteration
RUN = dict(max_iters=32, lr_decay_iters=32, checkpoint_interval=2, eval_interval=8, log_interval=1)
TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
WAIT = 180  # seconds: only a run that hangs, the failure these tests look for, comes near this

@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    return make_char_dataset(str(tmp_path_factory.mktemp('data') / 'tiny_char'))

@pytest.fixture(scope='module')
def reference(dataset, tmp_path_factory):
    """The shared run, uninterrupted."""
    out = str(tmp_path_factory.mktemp('reference') / 'out')
    assert run_main(tiny_args(dataset, out, **RUN)) == 0
    return out

def state_at(out_dir, iter_num):
    return checkpoint.load_checkpoint(os.path.join(out_dir, f'ckpt-{iter_num:08d}.pt'))

def newest_state(out_dir):
    return state_at(out_dir, checkpoint.list_checkpoints(out_dir)[0])

def tensors(state):
    """Every tensor of the model and the optimizer state, by name."""
    found = {f'model.{key}': value for key, value in state['model'].items()}
    for index, per_param in state['optimizer']['state'].items():
        found.update({f'optimizer.{index}.{key}': torch.as_tensor(value) for key, value in per_param.items()})
    return found

def assert_same_tensors(a, b, only=None):
    a, b = tensors(a), tensors(b)
    assert a.keys() == b.keys()
    for key in a:
        if only is None or only in key:
            assert torch.equal(a[key], b[key]), key

def assert_same_as_reference(out_dir, reference):
    a, b = newest_state(out_dir), newest_state(reference)
    assert a['iter_num'] == b['iter_num'] == RUN['max_iters']
    assert_same_tensors(a, b)
    assert train_losses(out_dir) == train_losses(reference)

def start(tmp_path, name, script, args, env=None, launcher=None):
    """Start a training script in the background, its output going to files <name>.out/.err."""
    command = (launcher or [sys.executable]) + [script if os.path.isabs(script) else os.path.join(ROOT, script)]
    with open(tmp_path / f'{name}.out', 'w') as out, open(tmp_path / f'{name}.err', 'w') as err:
        process = subprocess.Popen(command + list(args), stdout=out, stderr=err, cwd=ROOT,
                                   env=dict(os.environ, PYTHONUNBUFFERED='1', **ONE_THREAD, **(env or {})))
    process.output = lambda: ((tmp_path / f'{name}.out').read_text(), (tmp_path / f'{name}.err').read_text())
    return process

def stop_tree(process):
    """Kill a process we started and its children (torchrun starts its workers in new sessions)."""
    try:
        workers = children(process)
    except OSError:
        workers = []
    for pid in workers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.kill()
    process.wait()

def finish(process, timeout=WAIT):
    """Wait for a background run; a run that does not end in time is killed and fails the test."""
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_tree(process)
        pytest.fail(f"the run did not end within {timeout} s:\n" + '\n'.join(process.output())[-3000:])
    return process.output()

def wait_for_iteration(process, out_dir, iteration, after=0):
    """Poll metrics.jsonl (past byte `after`) until the run has logged a train row of `iteration` or
    later; return the train rows logged so far."""
    path = os.path.join(out_dir, 'metrics.jsonl')
    deadline = time.time() + WAIT
    while time.time() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the run ended (status {process.returncode}) before iteration {iteration}:\n"
                        + '\n'.join(process.output())[-3000:])
        if os.path.exists(path):
            with open(path) as f:
                f.seek(after)
                lines = f.read().split('\n')[:-1]  # the last piece is an unfinished line, or ''
            rows = [row for row in map(json.loads, lines) if row['kind'] == 'train']
            if any(row['iter'] >= iteration for row in rows):
                return rows
        time.sleep(0.005)
    stop_tree(process)
    pytest.fail(f"the run did not reach iteration {iteration} within {WAIT} s")

def metrics_size(out_dir):
    path = os.path.join(out_dir, 'metrics.jsonl')
    return os.path.getsize(path) if os.path.exists(path) else 0

# -----------------------------------------------------------------------------
# kill -9, SIGTERM

def test_kill_9_at_random_moments_loses_nothing(tmp_path, dataset, reference):
    """Four SIGKILLs at random moments (in an iteration, in a checkpoint write, the first one
    around the first checkpoint, maybe before it), each followed by --init_from=resume, end
    exactly where the uninterrupted run ends; no checkpoint left behind fails to verify."""
    out = str(tmp_path / 'out')
    args = tiny_args(dataset, out, **RUN)
    rng = random.Random(20240917)
    targets = [1] + sorted(rng.sample(range(3, RUN['max_iters'] - 6), 3))
    for attempt, target in enumerate(targets):
        # the new rows come after the old, or alone in a new log where no checkpoint was left
        after = metrics_size(out) if checkpoint.list_checkpoints(out) else 0
        process = start(tmp_path, f'attempt{attempt}', 'train_sophiag.py',
                        args + (['--init_from=resume'] if attempt else []))
        rows = wait_for_iteration(process, out, target, after)
        # somewhere in the next two iterations, checkpoint writes included, at any machine's speed
        time.sleep(rng.uniform(0, 2) * min(row['ms_per_iter'] for row in rows) / 1000)
        process.kill()
        process.wait()
        assert process.returncode == -signal.SIGKILL, process.output()
        print(f"killed after iteration {rows[-1]['iter']}, newest checkpoint "
              f"{checkpoint.list_checkpoints(out)[:1]}")
        left = sorted(glob.glob(os.path.join(out, 'ckpt-*.pt')))
        assert left or attempt == 0
        for path in left:
            checkpoint.verify(path)
    result = check_ok(run_script('train_sophiag.py', args + ['--init_from=resume'], env=ONE_THREAD))
    assert 'resuming from' in result.stdout
    assert_same_as_reference(out, reference)
    assert not [name for name in os.listdir(out) if '.tmp' in name]  # no partial writes left to fill the disk

def stop_line(stderr, name='SIGTERM'):
    """The last line of a run stopped by a signal: (iteration, checkpoint path)."""
    match = re.fullmatch(rf"stopped by {name} at iteration (\d+); checkpoint (\S+); "
                         r"resume with --init_from=resume", stderr.strip().splitlines()[-1])
    assert match, stderr[-2000:]
    return int(match[1]), match[2]

@pytest.mark.parametrize('signum, status', [(signal.SIGTERM, 143), (signal.SIGUSR1, 138)],
                         ids=['TERM', 'USR1'])
def test_sigterm_saves_a_checkpoint_and_the_resumed_run_ends_identical(tmp_path, dataset, reference,
                                                                       signum, status):
    """SIGTERM, and SIGUSR1 (what SLURM sends ahead of a pre-emption), alike."""
    out = str(tmp_path / 'out')
    args = tiny_args(dataset, out, **dict(RUN, checkpoint_interval=100))  # the stop writes the checkpoint
    process = start(tmp_path, 'run', 'train_sophiag.py', args)
    wait_for_iteration(process, out, 5)
    process.send_signal(signum)
    _, err = finish(process)
    assert process.returncode == 128 + signum == status
    assert f'received {signum.name}: finishing this iteration and saving a checkpoint' in err
    iter_num, path = stop_line(err, signum.name)
    assert 5 <= iter_num < RUN['max_iters'] and path == os.path.join(out, f'ckpt-{iter_num:08d}.pt')
    assert checkpoint.load_checkpoint(path)['iter_num'] == iter_num
    result = check_ok(run_script('train_sophiag.py', args + ['--init_from=resume'], env=ONE_THREAD))
    assert f'resuming from {path}' in result.stdout
    assert_same_as_reference(out, reference)

def children(process):
    with open(f'/proc/{process.pid}/task/{process.pid}/children') as f:
        return [int(pid) for pid in f.read().split()]

@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1],
                         ids=['TERM', 'HUP', 'USR1'])
def test_torchrun_sigterm_stops_both_processes_at_one_iteration(tmp_path, dataset, signum):
    """torchrun passes SIGTERM and SIGHUP (a closed terminal) on to its workers. SIGUSR1 it does
    not handle, and dies of it; SLURM sends it to every process of the job step, torchrun and the
    workers alike, as here. The workers agree on the iteration to stop at, save once with both
    processes' RNG states, and exit."""
    out = str(tmp_path / 'out')
    process = start(tmp_path, 'run', 'train_sophiag.py',
                    tiny_args(dataset, out, **dict(RUN, checkpoint_interval=100)), launcher=TORCHRUN)
    wait_for_iteration(process, out, 4)
    workers = children(process)
    for pid in [process.pid] + (workers if signum == signal.SIGUSR1 else []):
        os.kill(pid, signum)
    finish(process)
    assert process.returncode != 0
    deadline = time.time() + WAIT
    while not all(map(ended, workers)) and time.time() < deadline:
        time.sleep(0.1)
    _, err = process.output()
    assert 'is gone' not in err  # the signal is acted on, not the launcher's death that followed
    assert err.count(f'received {signum.name}: finishing this iteration') == 2  # each worker got it
    assert len(re.findall(rf'^stopped by {signum.name} at iteration', err, re.M)) == 1  # said once
    last = next(line for line in err.splitlines() if line.startswith('stopped'))
    iter_num, path = stop_line(last, signum.name)
    state = checkpoint.load_checkpoint(path)
    assert state['iter_num'] == iter_num and len(state['rng']) == 2

# a wrapper around train_sophiag.py that makes process 1 fail at the top of iteration FAULT_ITER
FAULTY_SCRIPT = '''
import atexit, os, signal, sys, time
sys.path.insert(0, {root!r})
import checkpoint, trainer
from optimizers import SophiaGRecipe

fault, at, rank = os.environ['FAULT'], int(os.environ['FAULT_ITER']), int(os.environ['RANK'])
def note(event):  # when something happened, for the test to compare
    with open(os.path.join(os.environ['FAULT_LOG'], f'{{event}}-{{rank}}'), 'w') as f:
        f.write(repr(time.time()))
atexit.register(note, 'exit')
get_lr = trainer.get_lr
def faulty_get_lr(it, config):  # every process calls it at the top of every iteration
    if rank == 1 and it == at:
        if fault == 'hang':
            time.sleep(3600)
        elif fault == 'die':
            os._exit(7)
        elif fault == 'signal':  # the signal reaches this process only
            os.kill(os.getpid(), signal.SIGTERM)
    return get_lr(it, config)
trainer.get_lr = faulty_get_lr
if fault == 'signal' and rank == 0:
    save_checkpoint = checkpoint.save_checkpoint
    def slow_save_checkpoint(*args, **kwargs):  # a large checkpoint on a slow disk
        time.sleep(3)
        path = save_checkpoint(*args, **kwargs)
        note('saved')
        return path
    checkpoint.save_checkpoint = slow_save_checkpoint
if fault == 'disk_full' and rank == int(os.environ['FAULT_RANK']):  # the checkpoint of iteration `at`
    import errno
    import torch.distributed.checkpoint.filesystem as dcp_files
    def no_space(f):
        if f'ckpt-{{at:08d}}' in getattr(f, 'name', ''):
            f.write(b'part of a tensor')
            raise OSError(errno.ENOSPC, 'No space left on device')
    write_shard = dcp_files._write_item  # a sharded run's files, one per process
    def full_write_item(transforms, stream, *args, **kwargs):
        no_space(stream)
        return write_shard(transforms, stream, *args, **kwargs)
    dcp_files._write_item = full_write_item
    write_file = checkpoint.HashingWriter.write  # the single .pt file process 0 writes
    def full_write(self, data):
        no_space(self.f)
        return write_file(self, data)
    checkpoint.HashingWriter.write = full_write
trainer.main(SophiaGRecipe, sys.argv[1:])
'''

def faulty_script(tmp_path):
    path = tmp_path / 'faulty_train.py'
    path.write_text(FAULTY_SCRIPT.format(root=ROOT))
    return str(path)

def noted(tmp_path, event, rank):
    return float((tmp_path / f'{event}-{rank}').read_text())

def test_a_signal_to_one_torchrun_process_stops_both_and_the_checkpoint_resumes(tmp_path, dataset, reference):
    """Process 1 alone gets SIGTERM, and process 0 takes 3 s to write the checkpoint. Once a worker
    exits with an error status torchrun stops the others after a grace time (30 s), which a large
    checkpoint can outlast: so no process exits before the checkpoint is on disk. The resumed
    2-process run then matches the single-process reference up to float summation order."""
    out = str(tmp_path / 'out')
    args = tiny_args(dataset, out, **dict(RUN, max_iters=12, checkpoint_interval=100, ddp_timeout=60))
    env = dict(FAULT='signal', FAULT_ITER='3', FAULT_LOG=str(tmp_path))
    _, err = finish(start(tmp_path, 'run', faulty_script(tmp_path), args, env=env, launcher=TORCHRUN))
    assert 'stopped by SIGTERM at iteration 4' in err, err[-3000:]
    assert noted(tmp_path, 'exit', 1) >= noted(tmp_path, 'saved', 0)  # process 1 waited for the save
    path = os.path.join(out, 'ckpt-00000004.pt')
    state = checkpoint.load_checkpoint(path)
    assert state['iter_num'] == 4 and len(state['rng']) == 2
    result = check_ok(run_script('train_sophiag.py', args + ['--init_from=resume'], launcher=TORCHRUN,
                                 env=ONE_THREAD))
    assert f'resuming from {path}' in result.stdout
    resumed, straight = train_losses(out), train_losses(reference)
    assert sorted(resumed) == list(range(1, 13))
    for it in resumed:
        assert resumed[it] == pytest.approx(straight[it], rel=1e-4), it

def ended(pid):
    """Whether a process that is not our child has ended (exited, or a zombie nobody reaped)."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] == 'Z'
    except FileNotFoundError:
        return True

def test_one_run_per_out_dir_and_no_orphan_after_its_launcher(tmp_path, dataset):
    """While a 2-process run trains (paused here, so nothing in out_dir moves), a second launch on
    its out_dir is refused by every process in one line naming the holder's host and pid, out_dir
    untouched. Then torchrun is killed with SIGKILL: its workers notice, save and exit within
    seconds, and a relaunch continues their checkpoint."""
    out = str(tmp_path / 'out')
    args = tiny_args(dataset, out, **dict(RUN, max_iters=10 ** 6, lr_decay_iters=10 ** 6,
                                          checkpoint_interval=10 ** 6, eval_interval=10 ** 6))
    first = start(tmp_path, 'first', 'train_sophiag.py', args, launcher=TORCHRUN)
    workers = []
    try:
        wait_for_iteration(first, out, 2)
        workers = children(first)
        assert len(workers) == 2
        host, pid = open(os.path.join(out, 'run.lock')).read().split()
        assert host == socket.gethostname() and int(pid) in workers
        for paused in [first.pid] + workers:
            os.kill(paused, signal.SIGSTOP)
        try:
            before = snapshot(out)
            second = start(tmp_path, 'second', 'train_sophiag.py', args + ['--init_from=resume'],
                           launcher=TORCHRUN)
            _, err = finish(second)
            assert second.returncode != 0
            assert [line for line in err.splitlines() if line.startswith('error')] == [
                f"error: out_dir={out!r} is in use by another run (process {pid} on {host} holds "
                f"{os.path.join(out, 'run.lock')}); wait for it to end or stop it, or choose "
                f"another --out_dir"]
            # torchrun's own report of the failure, with a traceback, follows the line
            assert 'Traceback' not in err.split('error: ')[0]
            assert snapshot(out) == before
        finally:
            for paused in [first.pid] + workers:
                os.kill(paused, signal.SIGCONT)
        first.kill()
        first.wait()
        deadline = time.time() + 30
        while not all(map(ended, workers)) and time.time() < deadline:
            time.sleep(0.1)
        assert all(map(ended, workers)), '\n'.join(first.output())[-3000:]
    finally:
        for pid_ in workers:
            if not ended(pid_):
                os.kill(pid_, signal.SIGKILL)
    err = first.output()[1]
    assert err.count(f'the launcher (process {first.pid}) is gone: stopping') == 2
    iter_num, path = stop_line(next(line for line in err.splitlines() if line.startswith('stopped')))
    relaunch = args + ['--init_from=resume', f'--max_iters={iter_num + 2}']
    result = check_ok(run_script('train_sophiag.py', relaunch, launcher=TORCHRUN, env=ONE_THREAD))
    assert f'resuming from {path}' in result.stdout
    assert not os.path.exists(os.path.join(out, 'run.lock'))  # a run that ended removed it

def test_a_second_signal_exits_at_once(monkeypatch):
    exits = []
    monkeypatch.setattr(os, '_exit', exits.append)
    flag = trainer.SignalFlag()
    flag.handle(signal.SIGTERM, None)
    assert flag.signum == signal.SIGTERM and exits == []
    flag.handle(signal.SIGTERM, None)
    assert exits == [143]
    # Ctrl-C can reach a torchrun worker as SIGINT and SIGTERM at once: that is one request
    flag = trainer.SignalFlag()
    flag.handle(signal.SIGINT, None)
    flag.handle(signal.SIGTERM, None)
    assert exits == [143] and flag.signum == signal.SIGINT

@pytest.mark.parametrize('signalled', [False, True])
def test_a_worker_whose_launcher_is_gone_stops_once(monkeypatch, signalled):
    """The launcher's death asks for a stop as SIGTERM would; where a signal (SLURM's SIGUSR1 to
    every process) asked for one already, more than a second before, it is not a second signal,
    which would exit without saving."""
    exits = []
    monkeypatch.setattr(os, '_exit', exits.append)
    parents = iter([100] + [1] * 1000)  # the launcher, then init adopting the worker
    monkeypatch.setattr(os, 'getppid', lambda: next(parents))
    flag = trainer.SignalFlag()
    if signalled:
        flag.handle(signal.SIGUSR1, None)
        flag.when -= 2
    trainer.distributed.watch_launcher(flag, every=0.01)
    time.sleep(0.5)
    assert exits == [] and flag.signum == (signal.SIGUSR1 if signalled else signal.SIGTERM)

# a wrapper around train_sophiag.py whose first training forward runs one CPU kernel of tens of
# seconds (a matmul of two 10,000 x 10,000 matrices), noting when it starts and whether it ended
LONG_KERNEL_SCRIPT = '''
import os, sys, torch
sys.path.insert(0, {root!r})
import trainer
from optimizers import SophiaGRecipe
forward_loss = trainer.forward_loss
def slow_forward_loss(model, X, Y, autocast):
    if model.training and not os.path.exists({started!r}):
        open({started!r}, 'w').close()
        a = torch.randn(10000, 10000)
        a @ a  # no Python signal handler can run in this thread until it returns
        open({ended!r}, 'w').close()
    return forward_loss(model, X, Y, autocast)
trainer.forward_loss = slow_forward_loss
trainer.main(SophiaGRecipe, sys.argv[1:])
'''

def test_a_second_signal_exits_at_once_inside_a_long_kernel(tmp_path, dataset):
    """The first SIGTERM asks for a checkpoint after the iteration; the second ends the process at
    once, although the main thread is inside a kernel that would hold a Python handler back."""
    started, ended = tmp_path / 'kernel-started', tmp_path / 'kernel-ended'
    script = tmp_path / 'long_kernel.py'
    script.write_text(LONG_KERNEL_SCRIPT.format(root=ROOT, started=str(started), ended=str(ended)))
    process = start(tmp_path, 'run', str(script), tiny_args(dataset, str(tmp_path / 'out')))
    deadline = time.time() + WAIT
    while not started.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.01)
    assert started.exists(), process.output()
    time.sleep(0.5)  # well inside the kernel
    process.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, err = finish(process)
    assert process.returncode == 128 + signal.SIGTERM
    assert 'received SIGTERM: finishing this iteration' in err and 'received SIGTERM again: exiting now' in err
    assert not ended.exists()  # it did not wait for the kernel to return

def test_log_lines_time_training_alone_and_say_what_is_left(tmp_path, dataset, monkeypatch, capsys):
    """ms/iter and tokens/s count training iterations only: each evaluation here takes 3 s more,
    timed on its own line; the lines say iter k/N, an ETA that counts the evaluations still to
    come, and while Sophia's Hessian EMA is still warming up."""
    real = trainer.estimate_loss
    def slow_estimate_loss(*args, **kwargs):
        time.sleep(3)
        return real(*args, **kwargs)
    monkeypatch.setattr(trainer, 'estimate_loss', slow_estimate_loss)
    out = str(tmp_path / 'out')
    status, stdout, _ = call_main(capsys, tiny_args(dataset, out, max_iters=12, eval_interval=4,
                                                    checkpoint_interval=100))
    assert status == 0
    evaluations = re.findall(r'^step (\d+): train loss [\d.]+, val loss [\d.]+ \(evaluation ([\d.]+) s\)$', stdout, re.M)
    assert [int(it) for it, _ in evaluations] == [0, 4, 8, 12] and all(float(s) >= 3 for _, s in evaluations)
    assert all(row['eval_seconds'] >= 3 for row in read_metrics(out, 'eval'))
    rows = read_metrics(out, 'train')
    assert rows[-1]['time'] == pytest.approx(sum(row['ms_per_iter'] for row in rows) / 1000, rel=1e-3)
    assert rows[-1]['time'] < 3  # no evaluation inside: 12 tiny iterations
    lines = re.findall(r'^iter (\d+)/12: .*, eta (\d+)s$', stdout, re.M)
    assert [int(it) for it, _ in lines] == list(range(1, 13))
    eta = {int(it): int(seconds) for it, seconds in lines}
    assert eta[1] >= 3 * 3 and eta[5] >= 2 * 3 and eta[9] >= 3 and eta[12] == 0  # evaluations to come
    for row in rows:
        updates = row['iter'] // 3  # hess_interval=3
        assert row['hessian_ema_scale'] == pytest.approx(1 - 0.99 ** updates)
    assert f"(Hessian EMA warming up: 4% of its scale after 4 updates)" in stdout

# -----------------------------------------------------------------------------
# damaged checkpoints

@pytest.mark.parametrize('damage', ['truncate', 'flip a byte'])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, dataset, reference, capsys, damage):
    out = str(tmp_path / 'out')
    args = tiny_args(dataset, out, **RUN)
    assert run_main(args + ['--max_iters=12']) == 0  # checkpoints 8, 10, 12 kept
    damaged = os.path.join(out, 'ckpt-00000012.pt')
    data = bytearray(open(damaged, 'rb').read())
    if damage == 'truncate':
        data = data[:len(data) // 2]
    else:
        data[len(data) // 2] ^= 0x01
    with open(damaged, 'wb') as f:
        f.write(data)
    status, stdout, _ = call_main(capsys, args + ['--init_from=resume'])
    assert status == 0
    warning = next(line for line in stdout.splitlines() if line.startswith('warning:'))
    assert damaged in warning and ('truncated' if damage == 'truncate' else 'sha256') in warning
    assert f"resuming from {os.path.join(out, 'ckpt-00000010.pt')}" in stdout
    assert os.path.exists(damaged + '.damaged')  # kept for inspection, no longer a checkpoint
    assert_same_as_reference(out, reference)

class Killed(BaseException):
    """Stands for kill -9 at one chosen point of a checkpoint write."""

@pytest.mark.parametrize('at', ['in torch.save', '.json', '.pt'])  # or at the rename to that name
def test_a_write_cut_short_leaves_no_checkpoint_that_fails_to_verify(tmp_path, monkeypatch, at):
    """The random kills above rarely land in the few milliseconds of a write; here the cut comes
    exactly at each step of one. Whatever was cut, every ckpt-*.pt under its final name verifies,
    the previous checkpoint is the one resumed, and what a real kill would leave behind (the
    temporary file) is cleared by the resume."""
    out = str(tmp_path)
    state = dict(format_version=checkpoint.FORMAT_VERSION, weights=torch.arange(10000.0))
    checkpoint.save_checkpoint(out, dict(state, iter_num=2), 2, keep_last=3, is_best=False)
    def cut(*args, **kwargs):
        raise Killed()
    if at == 'in torch.save':
        monkeypatch.setattr(checkpoint.HashingWriter, 'write', cut)
    else:
        replace = os.replace
        monkeypatch.setattr(os, 'replace', lambda a, b: cut() if b.endswith(at) else replace(a, b))
    with pytest.raises(Killed):
        checkpoint.save_checkpoint(out, dict(state, iter_num=4), 4, keep_last=3, is_best=False)
    monkeypatch.undo()
    assert checkpoint.list_checkpoints(out) == [2]
    checkpoint.verify(os.path.join(out, 'ckpt-00000002.pt'))
    stale = os.path.join(out, 'ckpt-00000004.pt.tmp12345')  # what kill -9 leaves, unlike an exception
    open(stale, 'wb').close()
    loaded, path = checkpoint.load_latest(out, quarantine=True)
    assert loaded['iter_num'] == 2 and path.endswith('ckpt-00000002.pt')
    assert not os.path.exists(stale)

@pytest.mark.parametrize('at', ['best.json', 'best.pt'])  # a kill at the rename to that name
def test_a_kill_while_best_is_replaced_leaves_a_best_that_verifies(tmp_path, monkeypatch, at):
    """best.pt keeps its name from one best to the next: its manifest is published first and also
    lists the best.pt it replaces, so a kill between the two renames leaves the previous best,
    which verifies and loads (sample.py reads best.pt)."""
    out = str(tmp_path)
    state = dict(format_version=checkpoint.FORMAT_VERSION, weights=torch.arange(10000.0))
    checkpoint.save_checkpoint(out, dict(state, iter_num=2), 2, keep_last=3, is_best=True)
    replace = os.replace
    def cut(a, b):
        if b.endswith(at):
            raise Killed()
        replace(a, b)
    monkeypatch.setattr(os, 'replace', cut)
    with pytest.raises(Killed):
        checkpoint.save_checkpoint(out, dict(state, iter_num=4, weights=-state['weights']), 4,
                                   keep_last=3, is_best=True)
    monkeypatch.undo()
    assert checkpoint.load_checkpoint(os.path.join(out, 'best.pt'))['iter_num'] == 2
    checkpoint.save_checkpoint(out, dict(state, iter_num=6), 6, keep_last=3, is_best=True)
    assert checkpoint.load_checkpoint(os.path.join(out, 'best.pt'))['iter_num'] == 6

# -----------------------------------------------------------------------------
# non-finite losses, gradients and Hessian passes

NAN_RUN = dict(max_iters=7, checkpoint_interval=1, keep_last=100, eval_interval=100)  # Hessian passes at 2, 5

def poison(monkeypatch, module, name, bad_calls, counted=lambda *args: True):
    """Make module.name return NaN at the given calls (numbered from 0 among the calls for which
    counted(*args) holds)."""
    real, calls = getattr(module, name), []
    def poisoned(*args, **kwargs):
        value = real(*args, **kwargs)
        if counted(*args):
            calls.append(len(calls))
            if calls[-1] in bad_calls:
                return value * float('nan')
        return value
    monkeypatch.setattr(module, name, poisoned)

def around_each_step(monkeypatch):
    """The model and optimizer state (as a checkpoint holds them) before and after each call of
    clip_and_step, in a list filled as the run goes."""
    real, steps = trainer.clip_and_step, []
    def state(run):
        return copy.deepcopy({'model': run.raw_model.state_dict(),
                              'optimizer': run.optimizer.state_dict()})
    def recorded(run, *args):
        before = state(run)
        result = real(run, *args)
        steps.append((before, state(run)))
        return result
    monkeypatch.setattr(trainer, 'clip_and_step', recorded)
    return steps

def training_call(model, *args):
    return model.training  # not the evaluations

def rows_by_iter(out_dir):
    return {row['iter']: row for row in read_metrics(out_dir, 'train')}

@pytest.mark.parametrize('optimizer', ['sophiag', 'adamw'])
def test_a_nan_loss_skips_the_update_and_touches_no_state(tmp_path, dataset, monkeypatch, capsys, optimizer):
    poison(monkeypatch, trainer, 'forward_loss', {2 * 3 + 1}, training_call)  # micro-batch 1 of iteration 3
    steps = around_each_step(monkeypatch)
    out = str(tmp_path / 'out')
    status, stdout, _ = call_main(capsys, tiny_args(dataset, out, optimizer == 'sophiag', **NAN_RUN), optimizer)
    assert status == 0
    assert 'iter 3: non-finite loss or gradient, update skipped (1 in a row)' in stdout
    assert_same_tensors(*steps[3])  # parameters, momentum, Hessian EMA, step count
    with pytest.raises(AssertionError):
        assert_same_tensors(*steps[4])  # whereas a normal iteration changes them
    # no checkpoint after a non-finite iteration: none at 4, though checkpoint_interval=1
    assert checkpoint.list_checkpoints(out) == [7, 6, 5, 3, 2, 1]
    assert 'iter 4: no checkpoint after a non-finite iteration; the newest is ' in stdout
    assert state_at(out, 5)['nonfinite_in_a_row'] == 0
    rows = rows_by_iter(out)
    assert [rows[it]['skipped'] for it in range(1, 8)] == [0, 0, 0, 1, 0, 0, 0]
    assert rows[4]['loss'] is None and rows[5]['loss'] is not None

def test_a_nan_hessian_pass_leaves_the_hessian_untouched(tmp_path, dataset, monkeypatch, capsys):
    poison(monkeypatch, optimizers, 'sampled_loss', {2})  # the second pass (iteration 5), first micro-batch
    out = str(tmp_path / 'out')
    status, _, _ = call_main(capsys, tiny_args(dataset, out, **NAN_RUN))
    assert status == 0
    def hessians(iter_num):
        return [s['hessian'] for s in state_at(out, iter_num)['optimizer']['state'].values()]
    assert any(not torch.equal(a, b) for a, b in zip(hessians(2), hessians(3)))  # the first pass ran
    assert any(h.sum() > 0 for h in hessians(5))
    assert all(torch.equal(a, b) for a, b in zip(hessians(5), hessians(6)))  # the second was skipped
    with pytest.raises(AssertionError):
        assert_same_tensors(state_at(out, 5), state_at(out, 6), only='model')  # but the step was taken
    rows = rows_by_iter(out)
    assert [rows[it]['hessian_skipped'] for it in range(1, 8)] == [0, 0, 0, 0, 0, 1, 0]
    assert all(rows[it]['skipped'] == 0 for it in rows)

@pytest.mark.parametrize('bad_calls, skipped', [({0}, 1), ({0, 2}, 2)])  # the first pass; both passes
def test_a_log_row_counts_every_skipped_hessian_pass_since_the_last(tmp_path, dataset, monkeypatch, capsys,
                                                                   bad_calls, skipped):
    poison(monkeypatch, optimizers, 'sampled_loss', bad_calls)
    out = str(tmp_path / 'out')
    status, _, _ = call_main(capsys, tiny_args(dataset, out, **dict(NAN_RUN, log_interval=7)))
    assert status == 0
    assert rows_by_iter(out)[7]['hessian_skipped'] == skipped  # passes at 2 and 5, one row at 7

@pytest.mark.parametrize('first_bad, checkpoint_interval, named', [
    (4, 1, 'the last good checkpoint is {out}/ckpt-00000004.pt'),
    (0, 100, 'no checkpoint was saved yet')])
def test_max_nonfinite_in_a_row_stops_the_run(tmp_path, dataset, monkeypatch, capsys, first_bad,
                                              checkpoint_interval, named):
    """Iterations first_bad .. first_bad+2 are non-finite. No checkpoint is written inside the
    streak (at 5 and 6 here, though checkpoint_interval=1 and keep_last=2 asks for them), so the
    one named is from before it, rotation kept it, it holds no streak, and resuming it as advised
    trains on."""
    bad = set(range(2 * first_bad, 2 * first_bad + 6))  # 2 micro-batches an iteration
    poison(monkeypatch, trainer, 'forward_loss', bad, training_call)
    out = str(tmp_path / 'out')
    args = tiny_args(dataset, out, max_nonfinite=3, max_iters=12,
                     checkpoint_interval=checkpoint_interval, keep_last=2)
    status, _, err = call_main(capsys, args)
    assert status == 1 and 'Traceback' not in err
    last = err.strip().splitlines()[-1]
    assert f'3 iterations in a row with a non-finite loss or gradient, the last at iteration {first_bad + 2}' in last
    assert named.format(out=out) in last
    if checkpoint_interval == 1:
        assert checkpoint.list_checkpoints(out) == [4, 3]
        assert state_at(out, 4)['nonfinite_in_a_row'] == 0
    monkeypatch.undo()  # the lower learning rate the line advises, standing in
    status, stdout, _ = call_main(capsys, args + ['--init_from=resume'])
    assert status == 0 and 'non-finite' not in stdout
    assert newest_state(out)['iter_num'] == 12

def test_float16_overflow_is_the_grad_scalers_not_a_skipped_iteration(tmp_path, dataset, monkeypatch, capsys):
    """Under float16 a gradient that overflows is the GradScaler's business: it skips the step and
    lowers the scale; the run does not count it as a non-finite iteration."""
    real = trainer.forward_loss
    calls = []
    def huge_at_iteration_3(model, X, Y, autocast):
        loss = real(model, X, Y, autocast)
        if model.training:
            calls.append(None)
            if len(calls) - 1 == 2 * 3:
                return loss * 1e6  # times the scale 65536: the float16 gradients overflow
        return loss
    monkeypatch.setattr(trainer, 'forward_loss', huge_at_iteration_3)
    out = str(tmp_path / 'out')
    status, stdout, _ = call_main(capsys, tiny_args(dataset, out, dtype='float16', **NAN_RUN))
    assert status == 0 and 'non-finite' not in stdout
    assert all(row['skipped'] == 0 for row in read_metrics(out, 'train'))
    before, after = state_at(out, 3), state_at(out, 4)
    assert after['scaler']['scale'] < before['scaler']['scale']
    assert_same_tensors(before, after, only='model')  # the scaler skipped the step

# -----------------------------------------------------------------------------
# a process that hangs or dies

def assert_communication_error(err):
    lines = [line for line in err.splitlines() if line.startswith('error: ')]
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith('error: process 0: communication with the other processes failed or '
                               'timed out: a peer process died or hung (')
    assert lines[0].endswith('); resume with --init_from=resume')
    assert 'Traceback' not in err.split('error: ')[0]  # nothing raised past main
    return lines[0]

def test_a_hung_process_makes_the_others_stop_within_ddp_timeout(tmp_path, dataset):
    """Process 1 hangs at iteration 3; process 0 waits at most ddp_timeout in a collective, then
    says so in one line and exits. Both processes are started by hand, as torchrun would start
    them, to watch process 0 alone: torchrun itself kills a hung worker 30 s after another failed."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    out = str(tmp_path / 'out')
    args = tiny_args(dataset, out, **dict(RUN, max_iters=12, ddp_timeout=5))
    processes = [start(tmp_path, f'rank{rank}', faulty_script(tmp_path), args,
                       env=dict(FAULT='hang', FAULT_ITER='3', FAULT_LOG=str(tmp_path), RANK=str(rank),
                                LOCAL_RANK=str(rank), WORLD_SIZE='2', LOCAL_WORLD_SIZE='2',
                                MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port)))
                 for rank in (0, 1)]
    try:
        _, err = finish(processes[0])  # the bound a hang would reach
        assert processes[0].returncode == 1
        assert processes[1].poll() is None  # still hanging: process 0 did not wait for it to go
    finally:
        stop_tree(processes[1])
    assert 'Timed out' in assert_communication_error(err)

def test_a_dead_process_ends_the_torchrun_run(tmp_path, dataset):
    """Process 1 dies at iteration 3: process 0's next collective fails at once, it says so in one
    line, and torchrun reports the failure."""
    out = str(tmp_path / 'out')
    args = tiny_args(dataset, out, **dict(RUN, max_iters=12, ddp_timeout=5))
    env = dict(FAULT='die', FAULT_ITER='3', FAULT_LOG=str(tmp_path))
    process = start(tmp_path, 'run', faulty_script(tmp_path), args, env=env, launcher=TORCHRUN)
    _, err = finish(process)
    assert process.returncode != 0
    assert_communication_error(err)

@pytest.mark.parametrize('data_parallel, full_on', [('fsdp', 1), ('ddp', 0)])
def test_a_full_disk_stops_every_process_with_one_line(tmp_path, dataset, data_parallel, full_on):
    """A planted ENOSPC while one process writes its part of a checkpoint (a sharded run's process 1,
    or DDP's process 0, which writes the whole .pt): every process stops at that checkpoint, one
    line names out_dir and the bytes, and out_dir is as before but for the log's new rows: the
    earlier checkpoints intact, no temporary file or folder left."""
    out = str(tmp_path / 'out')
    args = tiny_args(dataset, out, **dict(RUN, max_iters=3, lr_decay_iters=6, checkpoint_interval=3,
                                          eval_interval=3, data_parallel=data_parallel))
    check_ok(run_script('train_sophiag.py', args, env=ONE_THREAD, launcher=TORCHRUN, timeout=WAIT))
    before = snapshot(out)
    env = dict(FAULT='disk_full', FAULT_ITER='6', FAULT_RANK=str(full_on), FAULT_LOG=str(tmp_path))
    process = start(tmp_path, 'full', faulty_script(tmp_path), args + ['--max_iters=6', '--init_from=resume'],
                    env=env, launcher=TORCHRUN)
    _, err = finish(process)
    assert process.returncode != 0
    lines = [line for line in err.splitlines() if line.startswith('error: ')]
    # (what follows the line is torchrun's own report of the failed processes)
    assert len(lines) == 1 and 'Traceback' not in err.split('error: ')[0], err[-3000:]
    assert 'communication' not in err
    assert re.fullmatch(rf"error: out_dir={re.escape(repr(out))} has no space left for the checkpoint "
                        r"of iteration 6 \(about [\d,]+ bytes; [\d,]+ free\); the earlier checkpoints are "
                        r"intact: free some space, or lower keep_last, and resume with --init_from=resume",
                        lines[0])
    assert re.findall(r'exitcode *: (\d+) \(pid', err) == ['2', '2'], err[-3000:]  # both processes
    after = snapshot(out)
    assert after.pop('metrics.jsonl')[0] > before.pop('metrics.jsonl')[0]  # the rows of iterations 4-6
    assert after == before

def test_a_finished_run_exits_0_on_every_process_under_load(tmp_path, dataset):
    """A 2-process run that trained to its end exits 0 on both processes, also on a machine busier
    than its cores (a CPU-bound process per core beside the job): the processes leave the group
    together, after process 0's last checkpoint, before the interpreter exits. Once, in a suite run
    on a loaded machine, process 1 aborted at exit after its run had finished (`terminate called
    without an active exception`) and torchrun reported the job failed; this repeats that exit, with
    DDP and with FSDP (whose checkpoint writes run threads of their own)."""
    # busy until the test's process is gone, even where a killed pytest never reaches `finally`
    busy = f'import os\nwhile os.getppid() == {os.getpid()}: pass'
    load = [subprocess.Popen([sys.executable, '-c', busy]) for _ in range(os.cpu_count() or 2)]
    try:
        for n, data_parallel in enumerate(('ddp', 'fsdp', 'ddp')):
            out = str(tmp_path / f'out{n}')
            args = tiny_args(dataset, out, **dict(RUN, max_iters=2, lr_decay_iters=2, eval_interval=2,
                                                  data_parallel=data_parallel))
            result = run_script('train_sophiag.py', args, env=ONE_THREAD, launcher=TORCHRUN, timeout=WAIT)
            assert result.returncode == 0 and 'terminate called' not in result.stderr, \
                f"{data_parallel}, run {n}: exit {result.returncode}\n{result.stderr[-3000:]}"
            assert checkpoint.list_checkpoints(out)[0] == 2
    finally:
        for process in load:
            process.kill()
            process.wait()

# -----------------------------------------------------------------------------
# bad input: one line, exit status 2, nothing in out_dir overwritten

@pytest.fixture(scope='module')
def finished_run(dataset, tmp_path_factory):
    """A small finished Sophia-G run, copied into place as the pre-existing out_dir."""
    out = str(tmp_path_factory.mktemp('finished') / 'out')
    assert run_main(tiny_args(dataset, out, max_iters=4, checkpoint_interval=2, eval_interval=2)) == 0
    return out

def damaged_dataset(dataset, folder, kind):
    """A copy of the tiny dataset: with an empty train.bin, or with token ids from another, larger
    vocabulary ('foreign'), with a meta.pkl that claims a vocabulary smaller than its ids ('small'),
    that is cut short ('meta'), that lacks the vocabulary size ('novocab') or that records another
    dtype ('dtype'), with token files of int32 ('int32') or a train.bin cut short ('cut')."""
    shutil.copytree(dataset, folder)
    if kind == 'empty':
        open(os.path.join(folder, 'train.bin'), 'wb').close()
    if kind == 'foreign':
        for split in ('train', 'val'):
            path = os.path.join(folder, f'{split}.bin')
            (np.fromfile(path, dtype=np.uint16) + 1000).tofile(path)
    if kind in ('foreign', 'small'):
        with open(os.path.join(folder, 'meta.pkl'), 'wb') as f:
            pickle.dump({'vocab_size': 2000 if kind == 'foreign' else 10}, f)
    if kind == 'int32':  # the same ids in 4 bytes: an even byte count, every id in the vocabulary
        for split in ('train', 'val'):
            path = os.path.join(folder, f'{split}.bin')
            np.fromfile(path, dtype=np.uint16).astype(np.int32).tofile(path)
    if kind == 'cut':
        with open(os.path.join(folder, 'train.bin'), 'r+b') as f:
            f.truncate(os.path.getsize(os.path.join(folder, 'train.bin')) - 64)
    if kind == 'dtype':
        with open(os.path.join(folder, 'meta.pkl'), 'rb') as f:
            meta = pickle.load(f)
        with open(os.path.join(folder, 'meta.pkl'), 'wb') as f:
            pickle.dump(dict(meta, dtype='int32'), f)
    if kind == 'meta':  # cut short
        with open(os.path.join(folder, 'meta.pkl'), 'r+b') as f:
            f.truncate(10)
    if kind == 'novocab':
        with open(os.path.join(folder, 'meta.pkl'), 'wb') as f:
            pickle.dump({'stoi': {}}, f)
    return folder

def damaged_copy(dataset, tmp, kind):
    return damaged_dataset(dataset, os.path.join(tmp, kind), kind)

def config_file(tmp, text):
    path = os.path.join(tmp, 'config.py')
    with open(path, 'w') as f:
        f.write(text)
    return path

def fake_gpu_without_bfloat16(monkeypatch):
    """What setup_distributed sees on a GPU without bfloat16 (a V100, a T4)."""
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    monkeypatch.setattr(torch.cuda, 'set_device', lambda device: None)
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *args, **kwargs: False)
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda *args: 'Tesla V100-SXM2-16GB')

def resume(dataset, out, **overrides):
    return tiny_args(dataset, out, init_from='resume', **overrides)

def finished_checkpoint(tmp):
    """The copy of finished_run's last checkpoint that the test puts in its tmp dir."""
    return os.path.join(tmp, 'finished', 'ckpt-00000004.pt')

def nanogpt_checkpoint_of_another_optimizer_layout(tmp):
    """A checkpoint as nanoGPT writes one (no format_version, no optimizer_name), of the finished
    run's model, but with an optimizer state of one group of two tensors: another model's."""
    state = checkpoint.load_checkpoint(finished_checkpoint(tmp))
    path = os.path.join(tmp, 'nanogpt.pt')
    model_args = {key: state['model_args'][key] for key in ('n_layer', 'n_head', 'n_embd', 'block_size', 'bias',
                                                            'vocab_size')}
    torch.save(dict(model=state['model'], model_args=model_args, iter_num=4, best_val_loss=3.0, config={},
                    optimizer={'state': {}, 'param_groups': [dict(lr=1e-3, params=[0, 1])]}), path)
    return path

def hf_model_with_a_small_vocabulary(tmp, monkeypatch):
    """A Hugging Face GPT-2 folder whose 50-token vocabulary cannot hold the character dataset's."""
    import transformers
    config = transformers.GPT2Config(n_positions=32, n_embd=16, n_layer=1, n_head=2, vocab_size=50,
                                     bos_token_id=49, eos_token_id=49)
    path = os.path.join(tmp, 'hf')
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    return path

# case: (a function of (dataset, out_dir, tmp dir, monkeypatch) returning (optimizer, arguments),
#        the out_dir: 'run' (a copy of finished_run), 'fresh' (none yet) or 'files' (a folder of
#        the user's that holds no run: a file and an empty folder), what the line must say)
BAD_INPUTS = {
    'unknown key in a config file': (
        lambda d, o, t, m: ('sophiag', [config_file(t, 'max_iters = 8\nlearning_rat = 1e-3\n')] + resume(d, o)),
        'run', ["config.py:2: 'learning_rat' is not a config key (did you mean 'learning_rate'?)"]),
    'unknown key on the command line': (
        lambda d, o, t, m: ('sophiag', resume(d, o) + ['--learning_rat=1e-3']),
        'run', ["'learning_rat' is not a config key (did you mean 'learning_rate'?)"]),
    'mistyped value in a config file': (
        lambda d, o, t, m: ('sophiag', [config_file(t, "batch_size = 'four'\n")] + resume(d, o)),
        'run', ["batch_size='four'", "config.py:1", 'expected an integer']),
    'mistyped value on the command line': (
        lambda d, o, t, m: ('sophiag', resume(d, o) + ['--batch_size=four']),
        'run', ["cannot read 'four' as an integer for batch_size"]),
    'mistyped boolean': (
        lambda d, o, t, m: ('sophiag', resume(d, o) + ['--compile=maybe']),
        'run', ['compile', 'a boolean']),
    'Sophia key given to AdamW': (
        lambda d, o, t, m: ('adamw', resume(d, o, sophia=False) + ['--rho=0.05']),
        'run', ["'rho' is a key of Sophia-G, which train_sophiag.py trains"]),
    'negative gradient accumulation': (
        lambda d, o, t, m: ('sophiag', resume(d, o) + ['--gradient_accumulation_steps=-1']),
        'run', ['gradient_accumulation_steps=-1', 'must be >= 0']),
    'block longer than the data': (
        lambda d, o, t, m: ('sophiag', resume(d, o) + ['--block_size=100000']),
        'run', ['too few for block_size=100000']),
    'processes x batch x accumulation is not total_bs': (
        lambda d, o, t, m: (m.setenv('WORLD_SIZE', '2'), m.setenv('RANK', '0'),
                            ('sophiag', resume(d, o) + ['--gradient_accumulation_steps=3']))[-1],
        'run', ['2 processes x batch_size=4', 'gradient_accumulation_steps=3', '= 24 sequences per iteration, '
                'but total_bs=8', '--total_bs=24']),
    'total_bs that the processes cannot split': (
        lambda d, o, t, m: (m.setenv('WORLD_SIZE', '3'), m.setenv('RANK', '0'), ('sophiag', resume(d, o)))[-1],
        'run', ['total_bs=8', 'cannot be split into micro-batches of batch_size=4', 'on 3 processes']),
    'missing data': (
        lambda d, o, t, m: ('sophiag', resume(os.path.join(t, 'nowhere'), o)),
        'run', [os.path.join('nowhere', 'train.bin'), 'missing or empty']),
    'empty data': (
        lambda d, o, t, m: ('sophiag', resume(damaged_dataset(d, os.path.join(t, 'empty'), 'empty'), o)),
        'run', [os.path.join('empty', 'train.bin'), 'missing or empty']),
    'token ids beyond the vocabulary (resume)': (
        lambda d, o, t, m: ('sophiag', resume(damaged_dataset(d, os.path.join(t, 'foreign'), 'foreign'), o)),
        'run', ['token id', "the model's vocab_size"]),
    'token ids beyond the vocabulary (new run)': (
        lambda d, o, t, m: ('sophiag', tiny_args(damaged_dataset(d, os.path.join(t, 'small'), 'small'), o)),
        'files', ['token id', "the model's vocab_size 10"]),
    'checkpoint of another model shape': (
        lambda d, o, t, m: ('sophiag', resume(d, o, n_layer=3)),
        'run', ['of another model:', 'n_layer=3 (checkpoint: 2)']),
    'checkpoint with another GELU': (
        lambda d, o, t, m: ('sophiag', resume(d, o, gelu='exact')),
        'run', ['of another model:', "gelu='exact' (checkpoint: 'tanh')"]),
    'checkpoint of another optimizer': (
        lambda d, o, t, m: ('adamw', resume(d, o, sophia=False)),
        'run', ['trained with sophiag, not adamw', 'train_sophiag.py']),
    'out_dir not writable': (
        lambda d, o, t, m: ('sophiag', tiny_args(d, os.path.join(o, 'metrics.jsonl', 'run'))),
        'run', ['is not writable', 'choose another --out_dir']),
    'out_dir holds another run': (
        lambda d, o, t, m: ('sophiag', tiny_args(d, o)),
        'run', ['already holds a run', '--init_from=resume']),
    'nothing to resume': (
        lambda d, o, t, m: ('sophiag', resume(d, o)),
        'fresh', ['holds no checkpoint', '--init_from=scratch']),
    'unknown init_from': (
        lambda d, o, t, m: ('sophiag', tiny_args(d, o, init_from='gpt3')),
        'run', ["init_from='gpt3'", 'expected scratch, resume']),
    'malformed meta.pkl': (
        lambda d, o, t, m: ('sophiag', resume(damaged_copy(d, t, 'meta'), o)),
        'run', [os.path.join('meta', 'meta.pkl'), 'cannot be read (UnpicklingError']),
    'meta.pkl without a vocabulary': (
        lambda d, o, t, m: ('sophiag', resume(damaged_copy(d, t, 'novocab'), o)),
        'run', [os.path.join('novocab', 'meta.pkl'), "cannot be read (KeyError: 'vocab_size')"]),
    'a manifest that is JSON but no object': (
        lambda d, o, t, m: (open(finished_checkpoint(t)[:-3] + '.json', 'w').write('[1, 2]'),
                            ('sophiag', tiny_args(d, o, init_from=finished_checkpoint(t))))[-1],
        'files', ['ckpt-00000004.json is damaged: it holds a list, not a manifest']),
    'a negative seed': (
        lambda d, o, t, m: ('sophiag', resume(d, o, seed=-1)),
        'run', ['seed=-1 (argument --seed=-1): must be in [0, 2**63)']),
    'a seed past 64 bits': (
        lambda d, o, t, m: ('sophiag', resume(d, o, seed=2 ** 64)),
        'run', [f'seed={2 ** 64}', 'must be in [0, 2**63)']),
    'a NaN learning rate in a config file': (
        lambda d, o, t, m: ('sophiag',
                            resume(d, o) + [config_file(t, "learning_rate = float('nan')")]),
        'run', ['learning_rate=nan', 'config.py:1', 'must be > 0']),
    'an infinite learning rate': (
        lambda d, o, t, m: ('sophiag', resume(d, o, learning_rate='1e999')),
        'run', ['learning_rate=inf', 'must be finite']),
    'token files of another dtype': (
        lambda d, o, t, m: ('sophiag', resume(damaged_copy(d, t, 'int32'), o)),
        'run', [os.path.join('int32', 'train.bin'), 'bytes but', 'uint16 tokens',
                'of another dtype or dataset']),
    'a token file cut short': (
        lambda d, o, t, m: ('sophiag', resume(damaged_copy(d, t, 'cut'), o)),
        'run', [os.path.join('cut', 'train.bin'), 'bytes but', 'or cut short']),
    'meta.pkl of another dtype': (
        lambda d, o, t, m: ('sophiag', resume(damaged_copy(d, t, 'dtype'), o)),
        'run', [os.path.join('dtype', 'meta.pkl'), "records dtype 'int32'", 'reads uint16']),
    'missing config file': (
        lambda d, o, t, m: ('sophiag', [os.path.join(t, 'nope.py')] + resume(d, o)),
        'run', ['nope.py not found']),
    'device=cuda without CUDA': (
        lambda d, o, t, m: ('sophiag', resume(d, o, device='cuda')),
        'run', ["device='cuda' but CUDA is not available", '--device=cpu']),
    'dataset that does not exist': (
        lambda d, o, t, m: ('sophiag', resume('nonexistent', o)),
        'run', ["dataset 'nonexistent' does not exist: data/ has ", 'stdlib_char']),
    'nccl backend on a CPU': (
        lambda d, o, t, m: ('sophiag', resume(d, o, backend='nccl')),
        'run', ["backend='nccl'", 'needs CUDA devices', '--backend=gloo']),
    "an official config's optimizer_name for the other script": (
        lambda d, o, t, m: ('sophiag', resume(d, o) + ['--optimizer_name=adamw']),
        'run', ["optimizer_name='adamw'", 'train_sophiag.py trains sophiag', 'run train_adam.py']),
    'init_from a file that is no checkpoint': (
        lambda d, o, t, m: (torch.save({'weights': torch.zeros(2)}, os.path.join(t, 'w.pt')),
                            ('sophiag', tiny_args(d, o, init_from=os.path.join(t, 'w.pt'))))[-1],
        'fresh', ['w.pt is not a training checkpoint']),
    'FSDP on a device it cannot run on': (
        lambda d, o, t, m: ('sophiag', resume(d, o, data_parallel='fsdp', device='mps')),
        'run', ["data_parallel='fsdp'", "cannot run on device='mps'", '--data_parallel=ddp']),
    'HSDP shard groups that do not divide the processes': (
        lambda d, o, t, m: (m.setenv('WORLD_SIZE', '3'), m.setenv('RANK', '0'),
                            ('sophiag', resume(d, o, data_parallel='hsdp', shard_group_size=2)))[-1],
        'run', ["data_parallel='hsdp'", 'shard groups of 2 processes', 'do not divide the 3 processes']),
    'Sophia-H under FSDP': (
        lambda d, o, t, m: ('sophiag', resume(d, o, data_parallel='fsdp', hessian_estimator='hutchinson')),
        'run', ["hessian_estimator='hutchinson'", 'double backward', '--hessian_estimator=gnb']),
    'dtype=bfloat16 on a GPU without it': (
        lambda d, o, t, m: (fake_gpu_without_bfloat16(m),
                            ('sophiag', resume(d, o, device='cuda', dtype='bfloat16')))[-1],
        'run', ["dtype='bfloat16' is not supported on Tesla V100", '--dtype=float16']),
    # new runs started from a file or folder into an out_dir of the user's: found inside train()
    'init_from a checkpoint of another optimizer': (
        lambda d, o, t, m: ('adamw', tiny_args(d, o, False, init_from=finished_checkpoint(t))),
        'files', ['trained with sophiag, not adamw', 'train_sophiag.py']),
    'init_from a checkpoint of another model shape': (
        lambda d, o, t, m: ('sophiag', tiny_args(d, o, n_layer=3, init_from=finished_checkpoint(t))),
        'files', ['of another model:', 'n_layer=3 (checkpoint: 2)']),
    "init_from a nanoGPT checkpoint whose optimizer state is another model's": (
        lambda d, o, t, m: ('adamw', tiny_args(d, o, False,
                                               init_from=nanogpt_checkpoint_of_another_optimizer_layout(t))),
        'files', ["does not match this model's parameters", 'cannot be continued here']),
    'init_from a Hugging Face model with a smaller vocabulary than the data': (
        lambda d, o, t, m: ('adamw', tiny_args(d, o, False, init_from=hf_model_with_a_small_vocabulary(t, m))),
        'files', ['has vocab_size', "larger than", "'s 50; use a GPT-2 BPE dataset"]),
}

# the cases that main() finds before train() runs (parsing, check_config, setup_distributed): out_dir
# is never looked at, so for them the snapshot below cannot fail. Every other case must reach
# train(), where out_dir exists and holds what the snapshot compares
FOUND_BEFORE_TRAIN = {
    'unknown key in a config file', 'unknown key on the command line', 'mistyped value in a config file',
    'mistyped value on the command line', 'mistyped boolean', 'Sophia key given to AdamW',
    'negative gradient accumulation', 'processes x batch x accumulation is not total_bs',
    'total_bs that the processes cannot split', 'unknown init_from', 'missing config file',
    'a negative seed', 'a seed past 64 bits', 'a NaN learning rate in a config file',
    'an infinite learning rate',
    'device=cuda without CUDA', 'nccl backend on a CPU', "an official config's optimizer_name for the other script",
    'FSDP on a device it cannot run on', 'HSDP shard groups that do not divide the processes', 'Sophia-H under FSDP',
    'dtype=bfloat16 on a GPU without it',
}

def snapshot(folder):
    """Every file under folder with its size and sha256, and every folder under it, an empty one
    too (the folder itself is left out: a new run may create its out_dir, which blocks no retry)."""
    found = {}
    for parent, folders, names in os.walk(folder):
        for name in folders:
            found[os.path.relpath(os.path.join(parent, name), folder) + os.sep] = 'folder'
        for name in names:
            path = os.path.join(parent, name)
            with open(path, 'rb') as f:
                found[os.path.relpath(path, folder)] = (os.path.getsize(path), hashlib.sha256(f.read()).hexdigest())
    return found

def users_files(folder):
    """An out_dir the user made that holds no run: notes and an empty folder for plots."""
    os.makedirs(os.path.join(folder, 'plots'))
    with open(os.path.join(folder, 'notes.txt'), 'w') as f:
        f.write('lr sweep: try 3e-3 next\n')

@pytest.mark.parametrize('case', list(BAD_INPUTS))
def test_bad_input_is_one_line_and_touches_nothing(tmp_path, dataset, finished_run, monkeypatch, capsys, case):
    if case == 'device=cuda without CUDA' and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    call, out_dir_kind, expected = BAD_INPUTS[case]
    out = str(tmp_path / 'out')
    if out_dir_kind == 'run':
        shutil.copytree(finished_run, out)
    elif out_dir_kind == 'files':
        users_files(out)
    shutil.copytree(finished_run, tmp_path / 'finished')  # for the cases that start from its checkpoint
    before = snapshot(out)
    assert before or out_dir_kind == 'fresh'
    entered = []
    train = trainer.train
    monkeypatch.setattr(trainer, 'train', lambda *args: (entered.append(True), train(*args))[1])
    optimizer, args = call(dataset, out, str(tmp_path), monkeypatch)
    status, _, err = call_main(capsys, args, optimizer)
    assert status == 2, err[-3000:]
    assert 'Traceback' not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), err[-3000:]
    for fragment in expected:
        assert fragment in lines[0]
    assert bool(entered) == (case not in FOUND_BEFORE_TRAIN)
    assert snapshot(out) == before  # sizes and hashes; nothing added, removed or emptied

def test_the_script_itself_prints_only_the_line(tmp_path, dataset):
    """The same through the real script in a subprocess: stderr is the one line, nothing more."""
    args = tiny_args(dataset, str(tmp_path / 'out'), sophia=False) + ['--hess_interval=3']
    result = run_script('train_adam.py', args)
    assert result.returncode == 2
    assert result.stderr == ("error: argument --hess_interval=3: 'hess_interval' is a key of Sophia-G, which "
                             "train_sophiag.py trains; train_adam.py trains AdamW and has no such key\n")
