"""End to end: the real training scripts through the real configurator on a tiny dataset."""

import glob
import os
import shutil
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import ROOT, check_ok, make_char_dataset, read_metrics, run_main, run_script, tiny_args, train_losses

sys.path.insert(0, ROOT)
import checkpoint  # noqa: E402
import trainer  # noqa: E402
from batches import EVAL_STREAMS, model_vocab_size, window_starts  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    return make_char_dataset(str(tmp_path_factory.mktemp('data') / 'tiny_char'))

def eval_loss_by_hand(state, dataset, split):
    """A checkpoint's model's mean loss over the evaluation windows of a split, the windows read here
    from the token file: inputs a window's first block_size tokens, targets the block_size after
    the first. What estimate_loss must log for that model."""
    config = state['config']
    model = GPT(GPTConfig(**state['model_args']))
    model.load_state_dict(state['model'])
    model.eval()
    data = np.memmap(os.path.join(dataset, f'{split}.bin'), dtype=np.uint16, mode='r')
    block, batch = config['block_size'], config['batch_size']
    losses = []
    for k in range(config['eval_iters']):  # seed 0: the same windows for every run
        starts = window_starts(0, EVAL_STREAMS[split], k * batch, batch, len(data) - block)
        windows = torch.from_numpy(np.stack([data[s:s + block + 1] for s in starts]).astype(np.int64))
        with torch.no_grad():
            logits, _ = model(windows[:, :-1], all_logits=True)
        losses.append(F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item())
    return sum(losses) / len(losses)

def final_model(out_dir):
    state = torch.load(sorted(glob.glob(os.path.join(out_dir, 'ckpt-*.pt')))[-1], weights_only=True)
    return state

@pytest.mark.parametrize('script, sophia', [('train_sophiag.py', True), ('train_adam.py', False)])
def test_training_lowers_the_loss_and_logs_everything(tmp_path, dataset, script, sophia):
    out = str(tmp_path / 'out')
    result = check_ok(run_script(script, tiny_args(dataset, out, sophia, max_iters=30, eval_interval=15,
                                                   lr_decay_iters=30, log_interval=5)))
    assert 'tokens per iteration: 2 accumulation x 4 batch x 32 block = 256' in result.stdout
    config_row = read_metrics(out, 'config')[0]
    assert config_row['optimizer'] == ('sophiag' if sophia else 'adamw')
    assert config_row['config']['n_layer'] == 2 and config_row['run_name'] == 'tiny'
    evals = read_metrics(out, 'eval')
    assert [row['iter'] for row in evals] == [0, 15, 30]
    assert evals[-1]['val/loss'] < evals[0]['val/loss'] - 0.5  # ln(vocab) ~ 4.4 at the start
    # and the logged losses are next-token losses on windows of the token files: targets taken from
    # the inputs themselves would drop faster and pass the line above
    for split in ('train', 'val'):
        assert evals[-1][f'{split}/loss'] == pytest.approx(eval_loss_by_hand(final_model(out), dataset, split),
                                                          rel=1e-5)
    train = read_metrics(out, 'train')
    assert [row['iter'] for row in train] == [5, 10, 15, 20, 25, 30]
    assert train[-1]['tokens'] == 30 * 256 and train[-1]['time'] > 0
    for key in ('loss', 'lr', 'ms_per_iter', 'tokens_per_s', 'param_norm', 'train/clip_rate'):
        assert train[-1][key] is not None, key
    assert train[-1]['mfu'] is None  # no peak FLOP/s known for a CPU: MFU omitted, not invented
    if sophia:
        for key in ('train/win_rate', 'hessian_norm', 'hessian_norm2', 'momentum_norm'):
            assert train[-1][key] is not None and train[-1][key] >= 0, key
        assert 0 < train[-1]['train/win_rate'] <= 1
        assert train[-1]['hessian_norm'] > 0  # the Hessian passes ran (at iterations 2, 5, 8, ...)
    else:
        assert 'train/win_rate' not in train[-1]
    # checkpoints are written every checkpoint_interval=6, at the end, and at an evaluation that
    # improves val loss (15, or none): the newest keep_last=3 of them are 18, 24 and 30 either way,
    # beside best, each with its manifest
    assert sorted(os.listdir(out)) == ['best.json', 'best.pt', 'ckpt-00000018.json', 'ckpt-00000018.pt',
                                       'ckpt-00000024.json', 'ckpt-00000024.pt', 'ckpt-00000030.json',
                                       'ckpt-00000030.pt', 'metrics.jsonl']
    best = min(evals[1:], key=lambda row: row['val/loss'])  # iteration 0 is evaluated, never saved
    assert checkpoint.load_checkpoint(os.path.join(out, 'best.pt'))['iter_num'] == best['iter']  # verified, loaded
    state = final_model(out)  # loads with weights_only=True
    assert state['iter_num'] == 30 and state['optimizer_name'] == config_row['optimizer']
    assert state['config']['max_iters'] == 30
    if sophia:
        hessians = [s['hessian'] for s in state['optimizer']['state'].values()]
        assert all(h.min() >= 0 for h in hessians) and any(h.sum() > 0 for h in hessians)

def test_resume_continues_exactly(tmp_path, dataset):
    """2N iterations in one run, and N iterations then N more after a resume, give identical losses
    and identical parameters."""
    straight, split = str(tmp_path / 'straight'), str(tmp_path / 'split')
    check_ok(run_script('train_sophiag.py', tiny_args(dataset, straight, max_iters=12, checkpoint_interval=100)))
    check_ok(run_script('train_sophiag.py', tiny_args(dataset, split, max_iters=6, checkpoint_interval=100)))
    result = check_ok(run_script('train_sophiag.py', tiny_args(dataset, split, max_iters=12, checkpoint_interval=100,
                                                               init_from='resume')))
    assert 'resuming from' in result.stdout and 'ckpt-00000006.pt' in result.stdout
    assert train_losses(straight) == train_losses(split)
    assert len(train_losses(split)) == 12
    a, b = final_model(straight), final_model(split)
    assert a['iter_num'] == b['iter_num'] == 12
    for key in a['model']:
        assert torch.equal(a['model'][key], b['model'][key]), key
    for index, state in a['optimizer']['state'].items():
        for name in ('exp_avg', 'hessian'):
            assert torch.equal(state[name], b['optimizer']['state'][index][name]), (index, name)
    assert [r['val/loss'] for r in read_metrics(straight, 'eval')] == \
        [r['val/loss'] for r in read_metrics(split, 'eval')]

def test_resume_with_dropout_is_exact_for_adam(tmp_path, dataset):
    """Dropout draws from the torch RNG, whose state the checkpoint carries."""
    straight, split = str(tmp_path / 'straight'), str(tmp_path / 'split')
    common = dict(dropout=0.1, checkpoint_interval=100)
    check_ok(run_script('train_adam.py', tiny_args(dataset, straight, False, max_iters=8, **common)))
    check_ok(run_script('train_adam.py', tiny_args(dataset, split, False, max_iters=4, **common)))
    check_ok(run_script('train_adam.py', tiny_args(dataset, split, False, max_iters=8, init_from='resume', **common)))
    assert train_losses(straight) == train_losses(split)

def test_two_processes_match_one_with_the_same_global_batch(tmp_path, dataset):
    """torchrun with 2 processes (gloo) sees the same global batches as a single process: each
    process takes its half of the micro-batches, gradients are averaged, so the losses agree up
    to float summation order. The counts of micro-batches are per process: a Hessian pass of
    half the step is 2 micro-batches on one process and 1 on each of two."""
    single, double = str(tmp_path / 'single'), str(tmp_path / 'double')
    args = dict(max_iters=8, total_bs=16)
    check_ok(run_script('train_sophiag.py', tiny_args(dataset, single, hess_micro_steps=2, **args)))
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    result = check_ok(run_script('train_sophiag.py', tiny_args(dataset, double, hess_micro_steps=1, **args),
                                 launcher=launcher, env={'OMP_NUM_THREADS': '1'}))
    assert 'over 2 processes' in result.stdout
    one, two = train_losses(single), train_losses(double)
    assert sorted(one) == sorted(two) == list(range(1, 9))
    for it in one:
        assert two[it] == pytest.approx(one[it], rel=1e-4), it
    evals_one = [r['val/loss'] for r in read_metrics(single, 'eval')]
    evals_two = [r['val/loss'] for r in read_metrics(double, 'eval')]
    assert evals_two == pytest.approx(evals_one, rel=1e-4)

def test_float16_with_grad_scaler_on_cpu(tmp_path, dataset):
    out = str(tmp_path / 'out')
    check_ok(run_script('train_sophiag.py', tiny_args(dataset, out, dtype='float16', max_iters=6)))
    losses = train_losses(out)
    assert len(losses) == 6 and all(loss is not None for loss in losses.values())
    state = final_model(out)
    assert state['scaler']['scale'] > 0  # the GradScaler's state travels with the checkpoint
    hessians = [s['hessian'] for s in state['optimizer']['state'].values()]
    assert all(torch.isfinite(h).all() for h in hessians) and any(h.sum() > 0 for h in hessians)

def test_hutchinson_estimator_trains(tmp_path, dataset):
    out = str(tmp_path / 'out')
    check_ok(run_script('train_sophiag.py', tiny_args(dataset, out, hessian_estimator='hutchinson', rho=0.01,
                                                      max_iters=12)))
    evals = read_metrics(out, 'eval')
    assert evals[-1]['val/loss'] < evals[0]['val/loss']
    assert read_metrics(out, 'train')[-1]['hessian_norm'] > 0

def test_wandb_offline_writes_a_run_that_compare_reads(tmp_path, dataset):
    out = str(tmp_path / 'out')
    check_ok(run_script('train_adam.py', tiny_args(dataset, out, False, wandb_log=True, wandb_mode='offline', max_iters=6),
                        env={'WANDB_MODE': 'offline', 'WANDB_API_KEY': ''}))
    runs = glob.glob(os.path.join(out, 'wandb', 'offline-run-*'))
    assert len(runs) == 1 and glob.glob(os.path.join(runs[0], 'run-*.wandb'))
    import compare
    from_wandb, from_log = compare.load_run(runs[0]), compare.load_run(out)
    assert [r['val/loss'] for r in from_wandb.eval] == pytest.approx([r['val/loss'] for r in from_log.eval])
    assert from_log.train and [r['loss'] for r in from_wandb.train] == pytest.approx([r['loss'] for r in from_log.train])
    shutil.rmtree(out)

def test_model_vocabulary_pads_gpt2_bpe_only():
    # GPT-2 BPE (or no meta.pkl) -> 50304 as the official runs; character vocabularies stay exact
    assert model_vocab_size(None) == model_vocab_size(50257) == 50304
    assert [model_vocab_size(v) for v in (65, 100, 1023, 1024, 1025, 50304)] == [65, 100, 1023, 1024, 1088, 50304]

# -----------------------------------------------------------------------------
# pretrained weights, fp16 resume, per-process RNG, best.pt

def test_init_from_a_local_hugging_face_folder(tmp_path):
    """--init_from=<a save_pretrained folder> on GPT-2 BPE-like data (no meta.pkl, ids below 50257):
    the run's first evaluation is the Hugging Face model's own loss on the same windows, so the
    weights came from the folder; its 64 positions are cropped to block_size=32; it trains on."""
    import transformers
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=2)).eval()
    hf_dir = str(tmp_path / 'hf')
    hf.save_pretrained(hf_dir)
    data = tmp_path / 'bpe'
    data.mkdir()
    rng = np.random.default_rng(0)
    for split, size in (('train', 20000), ('val', 4000)):
        # random ids, every third one GPT-2's largest (50256): something to learn
        ids = rng.integers(0, 50257, size)
        ids[::3] = 50256
        ids.astype(np.uint16).tofile(data / f'{split}.bin')
    out = str(tmp_path / 'out')
    assert run_main(tiny_args(str(data), out, False, init_from=hf_dir, max_iters=4, eval_interval=4,
                              checkpoint_interval=100), 'adamw') == 0
    state = final_model(out)
    assert state['model_args']['block_size'] == 32 and state['model']['transformer.wpe.weight'].shape == (32, 32)
    assert state['model_args']['vocab_size'] == 50257 and state['model_args']['bias'] is True
    evals = read_metrics(out, 'eval')
    assert [row['iter'] for row in evals] == [0, 4]
    for split in ('train', 'val'):
        tokens = np.memmap(data / f'{split}.bin', dtype=np.uint16, mode='r')
        losses = []
        for k in range(2):  # eval_iters batches of 4
            starts = window_starts(0, EVAL_STREAMS[split], 4 * k, 4, len(tokens) - 32)
            windows = torch.from_numpy(np.stack([tokens[s:s + 33] for s in starts]).astype(np.int64))
            with torch.no_grad():
                logits = hf(windows[:, :-1]).logits
            losses.append(F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item())
        assert evals[0][f'{split}/loss'] == pytest.approx(sum(losses) / 2, rel=1e-5), split
    assert evals[1]['train/loss'] < evals[0]['train/loss']  # the ids that repeat are learnt

def overflow_at_iteration_1(monkeypatch):
    """forward_loss times 1e6 on iteration 1's first micro-batch (the third training call of a run
    that starts at 0): the float16 gradients overflow and the GradScaler halves its scale."""
    real, calls = trainer.forward_loss, []
    def forward_loss(model, X, Y, autocast):
        loss = real(model, X, Y, autocast)
        if model.training:
            calls.append(None)
            if len(calls) == 3:
                return loss * 1e6
        return loss
    monkeypatch.setattr(trainer, 'forward_loss', forward_loss)

def test_float16_resume_is_exact_with_the_grad_scaler(tmp_path, dataset, monkeypatch):
    """float16 with a GradScaler stopped at 4 and resumed ends bit-identical to a run straight to 8:
    parameters, Sophia's state, the logged losses and the scaler, whose scale an overflow at
    iteration 1 has halved and whose count of good steps since then goes on."""
    straight, split = str(tmp_path / 'straight'), str(tmp_path / 'split')
    def args(out, max_iters, **extra):
        return tiny_args(dataset, out, dtype='float16', max_iters=max_iters, checkpoint_interval=100, **extra)
    overflow_at_iteration_1(monkeypatch)
    assert run_main(args(straight, 8)) == 0
    overflow_at_iteration_1(monkeypatch)
    assert run_main(args(split, 4)) == 0
    monkeypatch.undo()  # the resumed run starts at iteration 4: no overflow planted there
    assert run_main(args(split, 8, init_from='resume')) == 0
    a = checkpoint.load_checkpoint(os.path.join(straight, 'ckpt-00000008.pt'))
    b = checkpoint.load_checkpoint(os.path.join(split, 'ckpt-00000008.pt'))
    assert a['scaler']['scale'] == 2.0 ** 15  # halved once from 2**16
    assert a['scaler'] == b['scaler']  # scale and the growth tracker
    assert train_losses(straight) == train_losses(split) and len(train_losses(split)) == 8
    for key, value in a['model'].items():
        assert torch.equal(value, b['model'][key]), key
    for index, state in a['optimizer']['state'].items():
        for name in ('exp_avg', 'hessian'):
            assert torch.equal(state[name], b['optimizer']['state'][index][name]), (index, name)

def test_resume_on_two_processes_with_dropout_restores_each_processs_rng(tmp_path, dataset):
    """Under torchrun each process draws its own dropout masks from its own RNG; a checkpoint holds
    both processes' states and a resume gives each its own back: 3 + 3 iterations end bit-identical
    to 6 straight, losses and parameters and optimizer state."""
    straight, split = str(tmp_path / 'straight'), str(tmp_path / 'split')
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    def train(out, max_iters, **extra):
        check_ok(run_script('train_adam.py', tiny_args(dataset, out, False, dropout=0.2, max_iters=max_iters,
                                                       checkpoint_interval=100, **extra),
                            launcher=launcher, env={'OMP_NUM_THREADS': '1'}))
    train(straight, 6)
    train(split, 3)
    rng = checkpoint.load_checkpoint(os.path.join(split, 'ckpt-00000003.pt'))['rng']
    assert len(rng) == 2 and not torch.equal(rng[0]['cpu'], rng[1]['cpu'])  # each process's own
    train(split, 6, init_from='resume')
    assert train_losses(straight) == train_losses(split) and len(train_losses(split)) == 6
    a = checkpoint.load_checkpoint(os.path.join(straight, 'ckpt-00000006.pt'))
    b = checkpoint.load_checkpoint(os.path.join(split, 'ckpt-00000006.pt'))
    for key, value in a['model'].items():
        assert torch.equal(value, b['model'][key]), key
    for index, state in a['optimizer']['state'].items():
        for name in ('exp_avg', 'exp_avg_sq'):
            assert torch.equal(state[name], b['optimizer']['state'][index][name]), (index, name)

def scripted_val_losses(monkeypatch, losses):
    """estimate_loss returning the given losses, one per evaluation, for both splits."""
    remaining = list(losses)
    def estimate_loss(*args, **kwargs):
        loss = remaining.pop(0)
        return {'train': loss, 'val': loss}
    monkeypatch.setattr(trainer, 'estimate_loss', estimate_loss)

def test_best_pt_holds_the_lowest_val_loss(tmp_path, dataset, monkeypatch):
    """Val loss at iterations 0, 2, 4, 6, 8: 5.0, 4.0, 3.0, 3.5, 3.2. best.pt is iteration 4's
    checkpoint, kept while rotation (keep_last=1) deletes the checkpoint it was linked from; a
    resumed run whose evaluation is worse (3.1) leaves it as it is."""
    out = str(tmp_path / 'out')
    def args(max_iters, **extra):
        return tiny_args(dataset, out, False, max_iters=max_iters, eval_interval=2, keep_last=1,
                         checkpoint_interval=100, **extra)
    scripted_val_losses(monkeypatch, [5.0, 4.0, 3.0, 3.5, 3.2])
    assert run_main(args(8), 'adamw') == 0
    assert sorted(os.listdir(out)) == ['best.json', 'best.pt', 'ckpt-00000008.json', 'ckpt-00000008.pt',
                                       'metrics.jsonl']
    best = checkpoint.load_checkpoint(os.path.join(out, 'best.pt'))  # verified against best.json
    last = checkpoint.load_checkpoint(os.path.join(out, 'ckpt-00000008.pt'))
    assert best['iter_num'] == 4 and best['best_val_loss'] == last['best_val_loss'] == 3.0
    model = GPT(GPTConfig(**best['model_args']))
    model.load_state_dict(best['model'])
    assert any(not torch.equal(value, last['model'][key]) for key, value in best['model'].items())
    with open(os.path.join(out, 'best.pt'), 'rb') as f:
        best_bytes = f.read()
    scripted_val_losses(monkeypatch, [3.1])
    assert run_main(args(10, init_from='resume'), 'adamw') == 0
    assert checkpoint.list_checkpoints(out) == [10]
    with open(os.path.join(out, 'best.pt'), 'rb') as f:
        assert f.read() == best_bytes
