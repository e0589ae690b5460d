"""What the loop trains on and with which learning rate: get_batch's windows of the token file (the
targets one token after the inputs, every window inside the file, a sequence the same however the
stream is split), the evaluation batches the same for every seed and every evaluation, and the
logged learning rate against the schedule's formula written out here."""

import math
import os
import sys

import numpy as np
import pytest
import torch

from helpers import ROOT, make_char_dataset, read_metrics, run_main, tiny_args

sys.path.insert(0, ROOT)
import batches  # noqa: E402
import checkpoint  # noqa: E402
import trainer  # noqa: E402
from batches import EVAL_STREAMS, HESSIAN_STREAM, TRAIN_STREAM, TokenFiles, window_starts  # noqa: E402

@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    return make_char_dataset(str(tmp_path_factory.mktemp('data') / 'tiny_char'))

def batch(path, seed, stream, first, batch_size, block_size=32, vocab_size=1 << 16):
    data = TokenFiles({'train': path}, 'test', vocab_size, batch_size, block_size, 'cpu')
    return batches.get_batch(data, 'train', seed, stream, first)

# -----------------------------------------------------------------------------
# get_batch

def test_targets_are_the_inputs_one_token_later_in_the_file(dataset):
    """Each row is a window of the token file itself at the offset window_starts gives: the inputs
    its first block_size tokens, the targets the block_size tokens one later."""
    path = os.path.join(dataset, 'train.bin')
    data = np.memmap(path, dtype=np.uint16, mode='r')
    for seed, stream, first in ((1337, TRAIN_STREAM, 0), (7, HESSIAN_STREAM, 123),
                                (0, EVAL_STREAMS['val'], 40)):
        X, Y = batch(path, seed, stream, first, 6)
        assert X.shape == Y.shape == (6, 32) and X.dtype == Y.dtype == torch.int64
        starts = window_starts(seed, stream, first, 6, len(data) - 32)
        for row, start in enumerate(starts):
            assert X[row].tolist() == data[start:start + 32].tolist()
            assert Y[row].tolist() == data[start + 1:start + 33].tolist()
        assert torch.equal(Y[:, :-1], X[:, 1:]) and not torch.equal(X, Y)

def test_every_window_lies_inside_the_file_and_the_last_one_is_drawn(tmp_path):
    """A file of 40 tokens 0..39 and blocks of 32 hold 8 windows of 33 tokens (inputs and the
    targets' last token): sequences drawn from it start at 0..7 and no other, each of the 8 is
    drawn, and the last one's targets end at the file's last token."""
    path = str(tmp_path / 'tokens.bin')
    np.arange(40, dtype=np.uint16).tofile(path)
    X, Y = batch(path, 1337, TRAIN_STREAM, 0, 400)
    starts = X[:, 0]
    assert torch.equal(X, starts[:, None] + torch.arange(32)) and torch.equal(Y, X + 1)
    assert set(starts.tolist()) == set(range(8))
    assert Y.max().item() == 39

def test_a_sequence_is_the_same_however_the_stream_is_split(dataset):
    """Sequence j of a stream is a function of (seed, stream, j) alone: one batch of 8 equals two
    of 4 and eight of 1, which is what lets any number of processes and any micro-batch size
    train on the same global batches."""
    path = os.path.join(dataset, 'train.bin')
    whole = batch(path, 1337, TRAIN_STREAM, 16, 8)
    halves = [batch(path, 1337, TRAIN_STREAM, 16 + 4 * i, 4) for i in range(2)]
    singles = [batch(path, 1337, TRAIN_STREAM, 16 + i, 1) for i in range(8)]
    for parts in (halves, singles):
        assert torch.equal(whole[0], torch.cat([x for x, _ in parts]))
        assert torch.equal(whole[1], torch.cat([y for _, y in parts]))
    # another seed, another stream or other sequences are other windows
    for other in (batch(path, 1338, TRAIN_STREAM, 16, 8), batch(path, 1337, HESSIAN_STREAM, 16, 8),
                  batch(path, 1337, TRAIN_STREAM, 24, 8)):
        assert (other[0] != whole[0]).any(dim=1).all()

def recorded_batches(monkeypatch, dataset, out, seed):
    """Run 4 AdamW iterations in this process, evaluating at 0, 2 and 4; return the batches
    get_batch gave out, as (split file, stream, first sequence, X, Y)."""
    calls = []
    get_batch = trainer.get_batch
    def recording(data, split, seed_, stream, first):
        X, Y = get_batch(data, split, seed_, stream, first)
        calls.append((os.path.basename(data.paths[split]), stream, first, X, Y))
        return X, Y
    monkeypatch.setattr(trainer, 'get_batch', recording)
    assert run_main(tiny_args(dataset, out, False, seed=seed, max_iters=4, eval_interval=2, eval_iters=3,
                              checkpoint_interval=100), 'adamw') == 0
    monkeypatch.undo()
    return calls

def test_evaluation_batches_are_the_same_for_every_seed_and_every_evaluation(dataset, tmp_path, monkeypatch):
    """The loss estimates of runs with different seeds, and the successive estimates of one run, are
    measured on identical batches (README, Comparing runs); the training batches follow the seed."""
    runs = {seed: recorded_batches(monkeypatch, dataset, str(tmp_path / f'seed{seed}'), seed) for seed in (1, 2)}
    eval_streams = set(EVAL_STREAMS.values())
    evaluations = {}
    for seed, calls in runs.items():
        evals = [call for call in calls if call[1] in eval_streams]
        # 3 evaluations of eval_iters=3 batches of each split, in order: train split, then val
        per_evaluation = [('train.bin', EVAL_STREAMS['train'], 4 * k) for k in range(3)] + \
                         [('val.bin', EVAL_STREAMS['val'], 4 * k) for k in range(3)]
        assert [call[:3] for call in evals] == per_evaluation * 3
        for i in range(6, len(evals)):
            assert torch.equal(evals[i][3], evals[i % 6][3]) and torch.equal(evals[i][4], evals[i % 6][4])
        evaluations[seed] = evals[:6]
    for a, b in zip(evaluations[1], evaluations[2]):
        assert torch.equal(a[3], b[3]) and torch.equal(a[4], b[4])
    training = {seed: torch.cat([call[3] for call in calls if call[1] == TRAIN_STREAM])
                for seed, calls in runs.items()}
    assert training[1].shape == training[2].shape == (4 * 8, 32)  # 4 iterations of 8 sequences
    assert (training[1] != training[2]).any(dim=1).all()

# -----------------------------------------------------------------------------
# the learning-rate schedule

def expected_lr(it, learning_rate, min_lr, warmup_iters, lr_decay_iters):
    """Linear warmup from learning_rate / (warmup_iters + 1) over warmup_iters iterations, a cosine
    from learning_rate at warmup_iters to min_lr at lr_decay_iters, then min_lr."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:
        return min_lr
    progress = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    return min_lr + (learning_rate - min_lr) * (1 + math.cos(math.pi * progress)) / 2

@pytest.mark.parametrize('decay_lr', [True, False])
def test_the_logged_and_applied_lr_follow_the_schedule(dataset, tmp_path, decay_lr):
    """A train row every iteration: row k logs the lr of iteration k - 1, 3 of warmup, 7 of
    cosine decay and 4 at the floor; the optimizer's every param group holds the last of them."""
    out = str(tmp_path / 'out')
    schedule = dict(learning_rate=1e-2, min_lr=1e-3, warmup_iters=3, lr_decay_iters=10)
    assert run_main(tiny_args(dataset, out, False, max_iters=14, eval_interval=100, checkpoint_interval=100,
                              decay_lr=decay_lr, **schedule), 'adamw') == 0
    rows = read_metrics(out, 'train')
    assert [row['iter'] for row in rows] == list(range(1, 15))
    def lr(it):
        return expected_lr(it, **schedule) if decay_lr else schedule['learning_rate']
    for row in rows:
        assert row['lr'] == pytest.approx(lr(row['iter'] - 1), rel=1e-12, abs=0), row['iter']
    if decay_lr:  # the three phases are really there: rising, falling, flat
        logged = [row['lr'] for row in rows]
        assert logged[0] < logged[1] < logged[2] < logged[3] == pytest.approx(schedule['learning_rate'])
        assert logged[3] > logged[6] > logged[9] > logged[10] == logged[13] == schedule['min_lr']
    groups = checkpoint.load_checkpoint(os.path.join(out, 'ckpt-00000014.pt'))['optimizer']['param_groups']
    assert len(groups) == 2 and all(group['lr'] == pytest.approx(lr(13), rel=1e-12, abs=0) for group in groups)
