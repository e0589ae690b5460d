"""train_muon.py end to end: torch.optim.Muon on the blocks' matrices and AdamW on the rest, as one
optimizer (optimizers.MuonWithAdamW) through the shared loop. A step recomputed by hand with
torch's own AdamW and Muon from the checkpoint before it; the loss falls; two processes hold what
one holds; a resume is bit-identical; its bad inputs are one line."""

import os
import sys

import pytest
import torch

from helpers import ROOT, check_ok, make_char_dataset, read_metrics, run_script, tiny_args, train_losses

sys.path.insert(0, ROOT)
import checkpoint  # noqa: E402
import resume  # noqa: E402
from batches import TRAIN_STREAM, TokenFiles, get_batch, open_dataset  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from optimizers import MuonRecipe  # noqa: E402

TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
BLOCK_MATRICES = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')

@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    return make_char_dataset(str(tmp_path_factory.mktemp('data') / 'tiny_char'))

def muon_args(dataset, out, **overrides):
    return tiny_args(dataset, out, sophia=False, **overrides)

def checkpoint_at(out, iter_num):
    return checkpoint.load_checkpoint(os.path.join(out, f'ckpt-{iter_num:08d}.pt'))

def by_name(state):
    """A checkpoint's optimizer state keyed by parameter name."""
    model = GPT(GPTConfig(**state['model_args']))
    return resume.named_optimizer_state(state['optimizer'], MuonRecipe.parameter_groups(model))['state']

def test_a_step_is_torchs_muon_on_the_matrices_and_adamw_on_the_rest(tmp_path, dataset):
    """Iteration 1 recomputed from the checkpoint of iteration 1: the gradient of its two
    micro-batches, then torch.optim.AdamW on the embeddings, norms and biases and torch.optim.Muon
    (its own learning rate, shape-adjusted the 'original' way) on the blocks' matrices, each with
    the state the checkpoint holds. The loop's checkpoint of iteration 2 holds exactly that."""
    out = str(tmp_path / 'out')
    check_ok(run_script('train_muon.py', muon_args(
        dataset, out, max_iters=2, checkpoint_interval=1, eval_interval=100, decay_lr=False, grad_clip=0.0,
        learning_rate=3e-3, muon_learning_rate=0.03, muon_adjust_lr_fn='original', weight_decay=0.1)))
    before, after = checkpoint_at(out, 1), checkpoint_at(out, 2)
    config = before['config']
    model = GPT(GPTConfig(**before['model_args']))
    model.load_state_dict(before['model'])
    vocab, paths = open_dataset(dataset, config['block_size'])
    data = TokenFiles(paths, dataset, vocab, config['batch_size'], config['block_size'], 'cpu')
    for micro_step in range(2):  # iteration 1: sequences 8..15, two micro-batches of 4
        X, Y = get_batch(data, 'train', config['seed'], TRAIN_STREAM, 8 + 4 * micro_step)
        (model(X, Y)[1] / 2).backward()

    params = dict(model.named_parameters())
    embeddings, gains, matrices = MuonRecipe.parameter_groups(model)
    assert sorted(matrices) == sorted(f'transformer.h.{i}.{m}' for i in range(2) for m in BLOCK_MATRICES)
    adamw = torch.optim.AdamW([{'params': [params[n] for n in embeddings], 'weight_decay': 0.1},
                               {'params': [params[n] for n in gains], 'weight_decay': 0.0}],
                              lr=3e-3, betas=(0.9, 0.95), fused=True)
    muon = torch.optim.Muon([params[n] for n in matrices], lr=0.03, weight_decay=0.1, momentum=0.95,
                            nesterov=True, ns_steps=5, adjust_lr_fn='original')
    saved = by_name(before)
    assert set(saved) == set(params)
    for name, param in params.items():
        state = {key: value.clone() for key, value in saved[name].items()}
        (muon if name in matrices else adamw).state[param] = state
        assert set(state) == ({'momentum_buffer'} if name in matrices else {'step', 'exp_avg', 'exp_avg_sq'})
    adamw.step()
    muon.step()

    moved = 0
    for name, param in params.items():
        torch.testing.assert_close(after['model'][name], param.detach(), rtol=1e-6, atol=1e-7,
                                   msg=lambda m: f"{name}: {m}")
        moved += not torch.equal(after['model'][name], before['model'][name])
    assert moved == len(params)
    for name, state in by_name(after).items():
        reference = (muon if name in matrices else adamw).state[params[name]]
        for key, value in state.items():
            torch.testing.assert_close(value, reference[key], rtol=1e-6, atol=1e-8, msg=lambda m: f"{name} {key}: {m}")
    # the schedule kept Muon's group at its own learning rate
    assert [group['lr'] for group in after['optimizer']['param_groups']] == [3e-3, 3e-3, pytest.approx(0.03)]

def test_training_lowers_the_loss_and_logs_muon(tmp_path, dataset):
    out = str(tmp_path / 'out')
    result = check_ok(run_script('train_muon.py', muon_args(dataset, out, max_iters=30, eval_interval=15,
                                                            lr_decay_iters=30, log_interval=5)))
    assert 'num Muon parameter tensors: 8' in result.stdout
    assert read_metrics(out, 'config')[0]['optimizer'] == 'muon'
    evals = read_metrics(out, 'eval')
    assert [row['iter'] for row in evals] == [0, 15, 30]
    assert evals[-1]['val/loss'] < evals[0]['val/loss'] - 0.5  # ln(vocab) ~ 4.4 at the start
    state = checkpoint_at(out, 30)
    assert state['optimizer_name'] == 'muon'
    momentum = {name: s['momentum_buffer'] for name, s in by_name(state).items() if 'momentum_buffer' in s}
    assert len(momentum) == 8 and all(m.abs().sum() > 0 for m in momentum.values())

def test_resume_continues_exactly(tmp_path, dataset):
    straight, split = str(tmp_path / 'straight'), str(tmp_path / 'split')
    common = dict(checkpoint_interval=100, dropout=0.1)
    check_ok(run_script('train_muon.py', muon_args(dataset, straight, max_iters=12, **common)))
    check_ok(run_script('train_muon.py', muon_args(dataset, split, max_iters=6, **common)))
    check_ok(run_script('train_muon.py', muon_args(dataset, split, max_iters=12, init_from='resume', **common)))
    assert train_losses(straight) == train_losses(split) and len(train_losses(split)) == 12
    a, b = checkpoint_at(straight, 12), checkpoint_at(split, 12)
    for key in a['model']:
        assert torch.equal(a['model'][key], b['model'][key]), key
    state_a, state_b = by_name(a), by_name(b)
    for name in state_a:
        for key in state_a[name]:
            assert torch.equal(state_a[name][key], state_b[name][key]), (name, key)
    assert a['optimizer']['param_groups'] == b['optimizer']['param_groups']

def test_two_processes_hold_what_one_holds(tmp_path, dataset):
    """DDP averages the gradients, and every process orthogonalises the same whole matrices: two
    processes end where one does, up to float summation order, which Newton-Schulz's bfloat16
    iterations turn into a rounding of the update (bfloat16 holds 8 bits: 0.4%). A process that
    kept its own half of the gradient fails the losses' check already."""
    single, double = str(tmp_path / 'single'), str(tmp_path / 'double')
    args = dict(max_iters=8, total_bs=16, checkpoint_interval=100)
    check_ok(run_script('train_muon.py', muon_args(dataset, single, **args)))
    result = check_ok(run_script('train_muon.py', muon_args(dataset, double, **args), launcher=TORCHRUN,
                                 env={'OMP_NUM_THREADS': '1'}))
    assert 'over 2 processes' in result.stdout
    one, two = train_losses(single), train_losses(double)
    assert sorted(one) == sorted(two) == list(range(1, 9))
    for it in one:
        assert two[it] == pytest.approx(one[it], rel=1e-3), it
    a, b = checkpoint_at(single, 8), checkpoint_at(double, 8)
    for key in a['model']:
        difference = (a['model'][key] - b['model'][key]).norm() / a['model'][key].norm()
        assert difference < 2e-2, (key, difference.item())  # measured: at most 0.0075
    state_a, state_b = by_name(a), by_name(b)
    for name in state_a:
        for key, value in state_a[name].items():
            if key != 'step':
                difference = (value - state_b[name][key]).norm() / value.norm()
                assert difference < 5e-3, (name, key, difference.item())

@pytest.mark.parametrize('argv, message', [
    (['--data_parallel=fsdp'], "data_parallel='fsdp' (argument --data_parallel=fsdp): Muon's Newton-Schulz "
                               "iteration needs each whole weight matrix, which FSDP's shards split; use "
                               "--data_parallel=ddp"),
    (['--muon_momentum=1.0'], "muon_momentum=1.0 (argument --muon_momentum=1.0): must be in [0, 1)"),
    (['--muon_adjust_lr_fn=sqrt'], "muon_adjust_lr_fn='sqrt' (argument --muon_adjust_lr_fn=sqrt): expected one "
                                   "of match_rms_adamw, original"),
    (['--muon_ns_steps=0'], "muon_ns_steps=0 (argument --muon_ns_steps=0): must be > 0"),
    (['--muon_learning_rate=-1'], "muon_learning_rate=-1.0 (argument --muon_learning_rate=-1): must be >= 0"),
    (['--rho=0.1'], "argument --rho=0.1: 'rho' is a key of Sophia-G, which train_sophiag.py trains; "
                    "train_muon.py trains Muon and has no such key"),
    (['--learning_rat=1e-3'], "'learning_rat' is not a config key (did you mean 'learning_rate'?)"),
])
def test_bad_inputs_are_one_line(tmp_path, dataset, argv, message):
    out = tmp_path / 'out'
    result = run_script('train_muon.py', muon_args(dataset, str(out)) + argv)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith('error: ') and result.stderr.count('\n') == 1, result.stderr[-2000:]
    assert message in result.stderr
    assert not out.exists()

def test_a_checkpoint_of_another_optimizer_is_refused(tmp_path, dataset):
    out = str(tmp_path / 'out')
    check_ok(run_script('train_adam.py', tiny_args(dataset, out, sophia=False, max_iters=2, checkpoint_interval=2)))
    result = run_script('train_muon.py', muon_args(dataset, out, max_iters=4, init_from='resume'))
    assert result.returncode == 2
    assert "was trained with adamw, not muon; continue it with train_adam.py" in result.stderr

def test_help_lists_muons_keys():
    result = check_ok(run_script('train_muon.py', ['--help']))
    for key in ('muon_learning_rate', 'muon_momentum', 'muon_nesterov', 'muon_ns_steps', 'muon_adjust_lr_fn'):
        assert f'--{key}=' in result.stdout, key
    assert '--rho=' not in result.stdout and '--hess_interval=' not in result.stdout
