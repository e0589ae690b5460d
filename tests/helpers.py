"""Shared by the end-to-end tests: a tiny dataset, the tiny model's arguments, running the real
training scripts in a subprocess or their main() in this process, and reading what they wrote."""

import json
import os
import pickle
import signal
import subprocess
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import trainer  # noqa: E402
from optimizers import RECIPES, AdamWRecipe, MuonRecipe, SophiaGRecipe  # noqa: E402

def sophiag_defaults():
    return SophiaGRecipe.defaults()

def adam_defaults():
    return AdamWRecipe.defaults()

def muon_defaults():
    return MuonRecipe.defaults()

def make_char_dataset(folder):
    """A character-level dataset from this repository's own Python files (about 100k characters),
    written like data/*/prepare.py writes one: train.bin, val.bin, meta.pkl."""
    os.makedirs(folder, exist_ok=True)
    text = ''.join(open(os.path.join(ROOT, name)).read()
                   for name in sorted(os.listdir(ROOT)) if name.endswith('.py'))
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    ids = np.array([stoi[ch] for ch in text], dtype=np.uint16)
    split = int(0.9 * len(ids))
    ids[:split].tofile(os.path.join(folder, 'train.bin'))
    ids[split:].tofile(os.path.join(folder, 'val.bin'))
    with open(os.path.join(folder, 'meta.pkl'), 'wb') as f:
        pickle.dump({'vocab_size': len(chars), 'stoi': stoi, 'itos': dict(enumerate(chars)),
                     'dtype': 'uint16', 'train_tokens': split, 'val_tokens': len(ids) - split}, f)
    return folder

def tiny_args(dataset, out_dir, sophia=True, **overrides):
    """Arguments for a model small enough to take milliseconds per iteration on a CPU. An iteration
    is total_bs=8 sequences: 2 micro-batches of 4 in one process, 1 in each of two."""
    config = dict(dataset=dataset, out_dir=out_dir, device='cpu', dtype='float32', compile=False,
                  n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=4, total_bs=8,
                  gradient_accumulation_steps=0, max_iters=12, eval_interval=6, eval_iters=2,
                  log_interval=1, checkpoint_interval=6, warmup_iters=2, lr_decay_iters=12,
                  learning_rate=3e-3, min_lr=1e-4, wandb_run_name='tiny')
    if sophia:
        config.update(hess_interval=3)
    config.update(overrides)
    return [f'--{key}={value}' for key, value in config.items()]

def run_script(script, args, env=None, timeout=300, launcher=None):
    """Run train_sophiag.py / train_adam.py as a user would; returns the CompletedProcess."""
    command = (launcher or [sys.executable]) + [os.path.join(ROOT, script)] + list(args)
    full_env = dict(os.environ, PYTHONUNBUFFERED='1', WANDB_SILENT='true')
    full_env.update(env or {})
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=full_env,
                          cwd=ROOT)

def check_ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result

def read_metrics(out_dir, kind=None):
    with open(os.path.join(out_dir, 'metrics.jsonl')) as f:
        rows = [json.loads(line) for line in f]
    return [row for row in rows if kind is None or row['kind'] == kind]

def train_losses(out_dir):
    """{iter: loss} of the train rows; a later row for the same iteration wins, as after a resume."""
    return {row['iter']: row['loss'] for row in read_metrics(out_dir, 'train')}

def run_main(args, optimizer='sophiag'):
    """trainer.main in this process, as the training script calls it, on one thread; returns the
    exit status. The signal handlers main installs are put back afterwards."""
    handlers = {signum: signal.getsignal(signum) for signum in trainer.distributed.STOP_SIGNALS}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer.main(RECIPES[optimizer], args)
    except SystemExit as e:
        return e.code
    finally:
        torch.set_num_threads(threads)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    raise AssertionError("trainer.main returned instead of exiting")

def call_main(capsys, args, optimizer='sophiag'):
    """run_main, and what it printed: (status, stdout, stderr)."""
    capsys.readouterr()
    status = run_main(args, optimizer)
    out, err = capsys.readouterr()
    return status, out, err
