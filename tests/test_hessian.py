"""Sophia's Hessian path through the real loop, recomputed by hand: the EMA after a Hessian pass is
(1 - beta2) times the square of the gradient of the mean sampled-label loss over exactly the pass's
micro-batches (GNB), clipped at hess_grad_clip, or the Hutchinson estimate (Sophia-H); the steps
take bs = the Hessian batch's token count; and two processes hold the state one process holds.

With hess_interval=1, iteration 0 steps (Hessian zero: a signed step) and then runs the first pass
on the parameters that step left, which the checkpoint of iteration 1 holds with the EMA."""

import math
import os

import pytest
import torch

from helpers import ROOT, call_main, make_char_dataset, run_main, run_script, check_ok, tiny_args, train_losses

import checkpoint
import resume
import sophia
from batches import HESSIAN_STREAM, TRAIN_STREAM, TokenFiles, get_batch, open_dataset, seed_of
from model import GPT, GPTConfig
from optimizers import SophiaGRecipe

@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    return make_char_dataset(str(tmp_path_factory.mktemp('data') / 'tiny_char'))

FIRST_PASS = dict(max_iters=1, hess_interval=1, beta2=0.5, checkpoint_interval=1, eval_interval=100)

def first_pass(dataset, out, **overrides):
    """Run iteration 0 and its Hessian pass; return the checkpoint of iteration 1 and the config."""
    args = tiny_args(dataset, out, **dict(FIRST_PASS, **overrides))
    assert run_main(args) == 0
    state = checkpoint.load_checkpoint(os.path.join(out, 'ckpt-00000001.pt'))
    return state, state['config']

def model_of(state):
    model = GPT(GPTConfig(**state['model_args']))
    model.load_state_dict(state['model'])
    return model

def hessians(state, model):
    """The checkpoint's Hessian EMA by parameter name."""
    named = resume.named_optimizer_state(state['optimizer'], SophiaGRecipe.parameter_groups(model))['state']
    return {name: value['hessian'] for name, value in named.items()}

def pass_batches(config, dataset, micro_steps, first):
    """The first sequences of the Hessian pass's micro-batches and their inputs."""
    starts = [first + i * config['batch_size'] for i in range(micro_steps)]
    return [(start, get_batch(token_files(config, dataset), 'train', config['seed'], TRAIN_STREAM, start)[0])
            for start in starts]

def token_files(config, dataset):
    vocab, paths = open_dataset(dataset, config['block_size'])
    return TokenFiles(paths, dataset, vocab, config['batch_size'], config['block_size'], 'cpu')

def sampled_gradient(model, config, batches):
    """The gradient of the mean sampled-label loss over the micro-batches, the labels drawn as the
    loop draws them (the global RNG seeded per micro-batch)."""
    model.zero_grad()
    for start, X in batches:
        torch.manual_seed(seed_of(config['seed'], HESSIAN_STREAM, start))
        _, loss = model(X, sample_targets=True)
        (loss / len(batches)).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}

@pytest.mark.parametrize('hess_micro_steps', [0, 1])  # the whole step's batch (2 micro-batches), a half
def test_gnb_ema_is_the_square_of_the_mean_sampled_gradient(dataset, tmp_path, hess_micro_steps):
    state, config = first_pass(dataset, str(tmp_path / 'out'), hess_micro_steps=hess_micro_steps, hess_grad_clip=0.0)
    model = model_of(state)
    micro_steps = hess_micro_steps or 2
    grads = sampled_gradient(model, config, pass_batches(config, dataset, micro_steps, first=8))  # after 8 sequences
    for name, h in hessians(state, model).items():
        torch.testing.assert_close(h, 0.5 * grads[name] ** 2, rtol=1e-5, atol=1e-12, msg=lambda m: f"{name}: {m}")
    assert state['sequences_drawn'] == 8 + micro_steps * 4

def test_float16_hessian_pass_unscales_what_the_grad_scaler_scaled(dataset, tmp_path):
    """Under float16 the loss is multiplied by the GradScaler's scale (2^16) before backward; the pass
    must divide its gradients by it before they are squared. Recomputed in float32: float16's
    rounding moves the EMA by a few percent, a missing or doubled unscaling by a factor 2^32 or 4."""
    state, config = first_pass(dataset, str(tmp_path / 'out'), dtype='float16', hess_grad_clip=0.0)
    assert state['scaler']['scale'] == 2.0 ** 16  # nothing overflowed: the scale the pass used
    model = model_of(state)
    grads = sampled_gradient(model, config, pass_batches(config, dataset, 2, first=8))
    stored = hessians(state, model)
    total = sum(h.sum() for h in stored.values())
    expected = sum((0.5 * g ** 2).sum() for g in grads.values())
    assert total == pytest.approx(expected.item(), rel=0.1)
    for name, h in stored.items():
        torch.testing.assert_close(h, 0.5 * grads[name] ** 2, rtol=0.25, atol=1e-3 * h.abs().max().item(),
                                   msg=lambda m: f"{name}: {m}")

def test_an_active_hess_grad_clip_scales_the_sampled_gradient(dataset, tmp_path):
    state, config = first_pass(dataset, str(tmp_path / 'out'), hess_grad_clip=1e-3)
    model = model_of(state)
    grads = sampled_gradient(model, config, pass_batches(config, dataset, 2, first=8))
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
    assert norm > 1e-2  # far above the clip: it acts
    scale = 1e-3 / (norm + 1e-6)  # clip_grad_norm_'s factor
    for name, h in hessians(state, model).items():
        torch.testing.assert_close(h, 0.5 * (grads[name] * scale) ** 2, rtol=1e-4, atol=1e-16,
                                   msg=lambda m: f"{name}: {m}")

def test_hutchinson_ema_is_the_estimate_of_the_pass(dataset, tmp_path):
    state, config = first_pass(dataset, str(tmp_path / 'out'), hessian_estimator='hutchinson', rho=0.01)
    model = model_of(state)
    batches = pass_batches(config, dataset, 2, first=8)
    groups = SophiaGRecipe.parameter_groups(model)
    params = [p for group in groups for p in [dict(model.named_parameters())[n] for n in group]]
    total = [torch.zeros_like(p) for p in params]
    generator = torch.Generator()
    for start, _ in batches:
        X, Y = get_batch(token_files(config, dataset), 'train', config['seed'], TRAIN_STREAM, start)
        generator.manual_seed(seed_of(config['seed'], HESSIAN_STREAM, start))
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(SDPBackend.MATH):
            _, loss = model(X, Y)
            estimates = sophia.hutchinson_hessian(loss / 2, params, generator=generator)
        total = [t + e for t, e in zip(total, estimates)]
    names = [n for group in groups for n in group]
    stored = hessians(state, model)
    assert any(e.lt(0).any() for e in total)  # Hutchinson estimates can be negative: kept as they are
    for name, estimate in zip(names, total):
        # float sums in another order (the run's threads) move entries by up to ~1.5e-8 in
        # tensors whose largest entry is 0.05-5: entries near zero fail any relative tolerance
        torch.testing.assert_close(stored[name], 0.5 * estimate, rtol=1e-4, atol=1e-6 * estimate.abs().max().item(),
                                   msg=lambda m: f"{name}: {m}")

@pytest.mark.parametrize('hess_micro_steps, bs', [(0, 2 * 4 * 32), (1, 1 * 4 * 32)])
def test_steps_take_bs_the_hessian_batch_tokens(dataset, tmp_path, monkeypatch, capsys, hess_micro_steps, bs):
    """bs passed to every step and to the diagnostics is micro-batches x batch_size x block_size x
    processes of the Hessian pass, which hess_micro_steps below the accumulation makes smaller."""
    seen = []
    step = sophia.SophiaG.step
    monkeypatch.setattr(sophia.SophiaG, 'step', lambda self, closure=None, bs=5120: (seen.append(bs), step(self, closure, bs))[1])
    diagnostics = sophia.SophiaG.diagnostics
    monkeypatch.setattr(sophia.SophiaG, 'diagnostics', lambda self, bs=None: (seen.append(bs), diagnostics(self, bs))[1])
    status, stdout, _ = call_main(capsys, tiny_args(dataset, str(tmp_path / 'out'), max_iters=4,
                                                    hess_micro_steps=hess_micro_steps))
    assert status == 0
    assert seen and set(seen) == {bs}
    assert f"tokens (bs = {bs:,})" in stdout

@pytest.mark.parametrize('estimator', ['gnb', 'hutchinson'])
def test_two_processes_hold_the_state_one_process_holds(dataset, tmp_path, estimator):
    """A config where the Hessian acts (EMA warm after one pass, rho large: most coordinates take the
    curvature-scaled step): after 6 iterations with 3 Hessian passes, the Hessian EMA, momentum and
    parameters of a 2-process run are those of 1 process with the same global batches. A Hessian pass
    whose gradients were not summed over the processes makes the EMA of each its own."""
    config = dict(max_iters=6, batch_size=2, total_bs=8, hess_interval=2, beta2=0.5, rho=50.0,
                  learning_rate=1e-2, min_lr=1e-3, checkpoint_interval=6, eval_interval=100,
                  hessian_estimator=estimator)
    single, double = str(tmp_path / 'single'), str(tmp_path / 'double')
    check_ok(run_script('train_sophiag.py', tiny_args(dataset, single, **config)))
    launcher = [__import__('sys').executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    check_ok(run_script('train_sophiag.py', tiny_args(dataset, double, **config), launcher=launcher,
                        env={'OMP_NUM_THREADS': '1'}))
    a = checkpoint.load_checkpoint(os.path.join(single, 'ckpt-00000006.pt'))
    b = checkpoint.load_checkpoint(os.path.join(double, 'ckpt-00000006.pt'))
    for key, value in a['model'].items():
        relative = torch.linalg.vector_norm(b['model'][key] - value) / torch.linalg.vector_norm(value)
        assert relative < 1e-4, (key, relative)
    for index, state in a['optimizer']['state'].items():
        for name in ('exp_avg', 'hessian'):
            other = b['optimizer']['state'][index][name]
            relative = torch.linalg.vector_norm(other - state[name]) / torch.linalg.vector_norm(state[name])
            assert relative < 1e-4, (index, name, relative)
    for it, loss in train_losses(single).items():
        assert train_losses(double)[it] == pytest.approx(loss, rel=1e-5), it
