"""What a relaunch on a cluster meets: an out_dir whose attempt stopped before its first checkpoint
(killed, max_iters=0, eval_only, a non-finite stop), continued by the one documented command
--init_from=resume; eval_only of a checkpoint; a metrics.jsonl whose last line a kill cut; a
manifest a kill during rotation left without its checkpoint. Runs go through trainer.main in this
process (helpers.run_main), a kill through the real script."""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import (ROOT, call_main, make_char_dataset, read_metrics, run_main, tiny_args,
                     train_losses)

sys.path.insert(0, ROOT)
import checkpoint  # noqa: E402
import trainer  # noqa: E402

# checkpoints at 3 and 6, where val improves
RUN = dict(max_iters=6, lr_decay_iters=6, checkpoint_interval=100, eval_interval=3)

@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    return make_char_dataset(str(tmp_path_factory.mktemp('data') / 'tiny_char'))

@pytest.fixture(scope='module')
def straight(dataset, tmp_path_factory):
    """RUN from scratch, uninterrupted."""
    out = str(tmp_path_factory.mktemp('straight') / 'out')
    assert run_main(tiny_args(dataset, out, **RUN)) == 0
    return out

def final_state(out_dir):
    return checkpoint.load_checkpoint(os.path.join(out_dir, f"ckpt-{RUN['max_iters']:08d}.pt"))

def assert_same_run(out_dir, straight):
    a, b = final_state(out_dir), final_state(straight)
    assert a['model'].keys() == b['model'].keys()
    for key in a['model']:
        assert torch.equal(a['model'][key], b['model'][key]), key
    for index, per_param in a['optimizer']['state'].items():
        for key, value in per_param.items():
            other = b['optimizer']['state'][index][key]
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(other)), (index, key)
    assert train_losses(out_dir) == train_losses(straight)

def killed_before_its_first_checkpoint(tmp_path, dataset, out, monkeypatch, capsys):
    """The real script, killed with SIGKILL once it has logged iteration 2 of thousands."""
    far = 10000
    args = tiny_args(dataset, out, **dict(RUN, max_iters=far, lr_decay_iters=far,
                                          checkpoint_interval=far, eval_interval=far))
    with open(tmp_path / 'killed.err', 'w') as err:
        process = subprocess.Popen([sys.executable, os.path.join(ROOT, 'train_sophiag.py')] + args,
                                   cwd=ROOT, stdout=err, stderr=err,
                                   env=dict(os.environ, OMP_NUM_THREADS='1'))
    log = os.path.join(out, 'metrics.jsonl')
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if os.path.exists(log) and any(row['kind'] == 'train' and row['iter'] >= 2
                                       for row in read_metrics(out)):
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, (tmp_path / 'killed.err').read_text()[-2000:]

def nonfinite_stop(tmp_path, dataset, out, monkeypatch, capsys):
    """Every training loss NaN: max_nonfinite=2 stops the run at iteration 1, before any
    checkpoint."""
    real = trainer.forward_loss
    def nan_in_training(model, *args):
        return real(model, *args) * (float('nan') if model.training else 1.0)
    monkeypatch.setattr(trainer, 'forward_loss', nan_in_training)
    status, _, err = call_main(capsys, tiny_args(dataset, out, **dict(RUN, max_nonfinite=2)))
    monkeypatch.undo()
    assert status == 1
    assert err.strip().splitlines()[-1].endswith(
        'no checkpoint was saved yet. Lower the learning rate or raise rho and start '
        "again with --init_from=resume (from scratch, this attempt's log kept)")

def finishes(args):
    assert run_main(args) == 0

ATTEMPTS = {
    'killed before its first checkpoint': killed_before_its_first_checkpoint,
    'max_iters=0': lambda t, d, o, m, c: finishes(tiny_args(d, o, **dict(RUN, max_iters=0))),
    'eval_only from scratch': lambda t, d, o, m, c: finishes(tiny_args(d, o, eval_only=True,
                                                                       **RUN)),
    'a non-finite stop': nonfinite_stop,
}

@pytest.mark.parametrize('attempt', list(ATTEMPTS))
def test_an_attempt_without_a_checkpoint_is_continued_by_resume(tmp_path, dataset, straight,
                                                                monkeypatch, capsys, attempt):
    """The attempt leaves a log and no checkpoint; --init_from=scratch still refuses the out_dir
    (it holds a run), and --init_from=resume starts over from scratch, keeping the attempt's log
    as metrics-1.jsonl byte for byte, and ends exactly as a run that was never interrupted."""
    out = str(tmp_path / 'out')
    ATTEMPTS[attempt](tmp_path, dataset, out, monkeypatch, capsys)
    assert checkpoint.list_checkpoints(out) == []
    assert os.path.exists(os.path.join(out, 'metrics.jsonl'))
    with open(os.path.join(out, 'metrics.jsonl'), 'rb') as f:
        earlier = f.read()
    status, _, err = call_main(capsys, tiny_args(dataset, out, **RUN))
    assert status == 2
    assert 'already holds a run (metrics.jsonl); continue it with --init_from=resume' in err
    status, stdout, _ = call_main(capsys, tiny_args(dataset, out, init_from='resume', **RUN))
    assert status == 0
    assert (f"{out} holds no checkpoint yet: starting from scratch (the earlier attempt's log kept "
            f"as metrics-1.jsonl)") in stdout
    with open(os.path.join(out, 'metrics-1.jsonl'), 'rb') as f:
        assert f.read() == earlier
    assert_same_run(out, straight)
    assert [row['kind'] for row in read_metrics(out)][0] == 'config'  # a log of this run alone
    assert sorted(os.listdir(out)) == ['best.json', 'best.pt', 'ckpt-00000003.json',
                                       'ckpt-00000003.pt', 'ckpt-00000006.json', 'ckpt-00000006.pt',
                                       'metrics-1.jsonl', 'metrics.jsonl']

def test_a_second_start_over_keeps_both_earlier_logs(tmp_path, dataset, capsys):
    out = str(tmp_path / 'out')
    for init_from in ('scratch', 'resume'):
        assert run_main(tiny_args(dataset, out, init_from=init_from, **dict(RUN, max_iters=0))) == 0
    status, stdout, _ = call_main(capsys, tiny_args(dataset, out, init_from='resume',
                                                    **dict(RUN, max_iters=0)))
    assert status == 0 and "(the earlier attempt's log kept as metrics-2.jsonl)" in stdout
    assert {'metrics.jsonl', 'metrics-1.jsonl', 'metrics-2.jsonl'} <= set(os.listdir(out))

def test_eval_only_evaluates_the_checkpoint_it_continues(tmp_path, dataset, straight, capsys):
    """--eval_only=True with --init_from=resume, or with a checkpoint file into another out_dir,
    prints the losses of the checkpoint's model and writes no checkpoint."""
    out = str(tmp_path / 'out')
    shutil.copytree(straight, out)
    checkpoints = snapshot(out)
    checkpoints.pop('metrics.jsonl')
    status, stdout, _ = call_main(capsys, tiny_args(dataset, out, init_from='resume',
                                                    eval_only=True, **RUN))
    assert status == 0
    evaluated = [line for line in stdout.splitlines() if line.startswith('step ')]
    assert len(evaluated) == 1 and evaluated[0].startswith('step 6: train loss ')
    val_loss = read_metrics(straight, 'eval')[-1]['val/loss']
    assert read_metrics(out, 'eval')[-1]['val/loss'] == val_loss
    after = snapshot(out)
    after.pop('metrics.jsonl')
    assert after == checkpoints
    other = str(tmp_path / 'other')
    status, stdout, _ = call_main(capsys, tiny_args(dataset, other, eval_only=True, **RUN)
                                  + [f"--init_from={os.path.join(straight, 'ckpt-00000006.pt')}"])
    assert status == 0 and 'step 6: train loss ' in stdout
    assert checkpoint.list_checkpoints(other) == []

def test_a_cut_log_line_and_an_orphan_manifest_are_set_aside_on_resume(tmp_path, dataset, capsys):
    """A kill while a row was written leaves half a line: the resume moves it to
    metrics.jsonl.damaged and the log stays one JSON object per line. A kill during rotation
    leaves a manifest without its checkpoint: the resume deletes it."""
    out = str(tmp_path / 'out')
    assert run_main(tiny_args(dataset, out, **dict(RUN, max_iters=3, checkpoint_interval=3))) == 0
    with open(os.path.join(out, 'metrics.jsonl'), 'ab') as f:
        f.write(b'{"kind": "train", "iter": 4, "lo')
    orphan = os.path.join(out, 'ckpt-00000001.json')
    shutil.copyfile(os.path.join(out, 'ckpt-00000003.json'), orphan)
    status, stdout, _ = call_main(capsys, tiny_args(dataset, out, init_from='resume', **RUN))
    assert status == 0
    assert f"warning: the last line of {out}/metrics.jsonl was cut short (32 bytes" in stdout
    with open(os.path.join(out, 'metrics.jsonl.damaged'), 'rb') as f:
        assert f.read() == b'{"kind": "train", "iter": 4, "lo\n'
    with open(os.path.join(out, 'metrics.jsonl')) as f:
        rows = [json.loads(line) for line in f]  # every line whole
    assert [row['iter'] for row in rows if row['kind'] == 'train'] == [1, 2, 3, 4, 5, 6]
    assert not os.path.exists(orphan)
    assert 'Hessian pass after every 3rd step' in stdout

def snapshot(folder):
    """Every file in folder with its bytes."""
    found = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), 'rb') as f:
            found[name] = f.read()
    return found

def fail_reading(monkeypatch, where, path):
    """An intact checkpoint that cannot be read: permission denied (as a non-root user meets it
    while hashing), or an I/O error of a network filesystem while unpickling."""
    if where == 'permission':
        real = checkpoint.file_digest
        def digest(p):
            if p == path:
                raise PermissionError(13, 'Permission denied', p)
            return real(p)
        monkeypatch.setattr(checkpoint, 'file_digest', digest)
    else:
        real_load = torch.load
        def load(p, *args, **kwargs):
            if p == path:
                raise OSError(5, 'Input/output error')
            return real_load(p, *args, **kwargs)
        monkeypatch.setattr(torch, 'load', load)

@pytest.mark.parametrize('where', ['permission', 'I/O error'])
def test_a_checkpoint_that_cannot_be_read_is_reported_not_renamed(tmp_path, dataset, straight,
                                                                   monkeypatch, capsys, where):
    """Only a failed verification makes a checkpoint .damaged; one that cannot be read stops the
    resume with one line and exit 2, every file in out_dir as it was (no fallback to an older
    one)."""
    out = str(tmp_path / 'out')
    shutil.copytree(straight, out)
    before = snapshot(out)
    newest = os.path.join(out, 'ckpt-00000006.pt')
    fail_reading(monkeypatch, where, newest)
    status, stdout, err = call_main(capsys, tiny_args(dataset, out, init_from='resume',
                                                      **dict(RUN, max_iters=9)))
    assert status == 2
    cause = 'Permission denied' if where == 'permission' else 'Input/output error'
    assert err == (f"error: {newest} cannot be read ({cause}); it is left as it is: fix the "
                   f"permissions or the filesystem and run again\n")
    assert 'warning' not in stdout
    assert snapshot(out) == before

def test_a_full_disk_is_one_line_and_loses_no_checkpoint(tmp_path, dataset, monkeypatch, capsys):
    """A planted ENOSPC in the middle of a checkpoint write (torch.save turns it into a
    RuntimeError of its own): one line naming out_dir and the bytes needed, exit 2, the earlier
    checkpoints as they were and no temporary file left."""
    out = str(tmp_path / 'out')
    assert run_main(tiny_args(dataset, out, **dict(RUN, max_iters=3, checkpoint_interval=3))) == 0
    before = snapshot(out)
    written = []
    real = checkpoint.HashingWriter.write
    def write(self, data):
        written.append(len(data))
        if sum(written) > 20000:
            raise OSError(errno.ENOSPC, 'No space left on device')
        return real(self, data)
    monkeypatch.setattr(checkpoint.HashingWriter, 'write', write)
    status, _, err = call_main(capsys, tiny_args(dataset, out, init_from='resume', **RUN))
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and 'Traceback' not in err
    assert re.fullmatch(rf"error: out_dir={re.escape(repr(out))} has no space left for the "
                        r"checkpoint of iteration 6 \(about [\d,]+ bytes; [\d,]+ free\); the "
                        r"earlier checkpoints are intact: free some space, or lower keep_last, and "
                        r"resume with --init_from=resume", lines[0])
    after = snapshot(out)
    # the log gained the rows of iterations 4-6
    assert after.pop('metrics.jsonl').startswith(before.pop('metrics.jsonl'))
    assert after == before

def test_an_out_dir_of_damaged_checkpoints_alone_is_not_started_over(tmp_path, dataset, straight,
                                                                    capsys):
    """Every checkpoint set aside as damaged by an earlier resume: the out_dir has a log and no
    checkpoint, like an attempt killed before its first one, but its run is not started over
    unasked: one line, exit 2, nothing moved."""
    out = str(tmp_path / 'out')
    shutil.copytree(straight, out)
    for name in os.listdir(out):
        if name.startswith('best.'):
            os.remove(os.path.join(out, name))
        elif name.endswith('.pt'):
            os.replace(os.path.join(out, name), os.path.join(out, name + '.damaged'))
    before = snapshot(out)
    status, _, err = call_main(capsys, tiny_args(dataset, out, init_from='resume', **RUN))
    assert status == 2
    assert err == (f"error: --init_from=resume but every checkpoint in {out} is damaged "
                   f"(ckpt-00000003.pt.damaged, ckpt-00000006.pt.damaged); put a good one in "
                   f"place, or start over in another --out_dir\n")
    assert snapshot(out) == before
