"""Users arriving from the official Sophia repository or nanoGPT: the official launch lines and
batch arithmetic, the official config files, checkpoints written by those scripts, and --help.

The official config files are written here from their keys and values (REFERENCE.md §3): what they
set, not a copy of them."""

import os
import subprocess
import sys
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

from helpers import (ROOT, adam_defaults, check_ok, make_char_dataset, muon_defaults, read_metrics, run_script,
                     sophiag_defaults, tiny_args, train_losses)

sys.path.insert(0, ROOT)
import resume  # noqa: E402
import trainer  # noqa: E402
from batches import TokenFiles, open_dataset  # noqa: E402
from configurator import ConfigError, batch_plan, check_config, parse_args  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from optimizers import RECIPES, AdamWRecipe, SophiaGRecipe  # noqa: E402
from sophia import SophiaG  # noqa: E402

TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']

@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    return make_char_dataset(str(tmp_path_factory.mktemp('data') / 'tiny_char'))

# -----------------------------------------------------------------------------
# the official configs and launch lines

MODELS = {'small': dict(n_layer=12, n_head=12, n_embd=768), 'medium': dict(n_layer=24, n_head=16, n_embd=1024),
          'large': dict(n_layer=36, n_head=20, n_embd=1280)}
# (batch_size, gradient_accumulation_steps) of each official config file, for 10 GPUs (medium
# Sophia-G's for 8), and its optimizer hyperparameters
OFFICIAL = {
    ('small', 'sophiag'): ((8, 6), dict(learning_rate=6e-4, weight_decay=2e-1, beta1=0.965, beta2=0.99, min_lr=1.5e-5,
                                        rho=0.05, interval=10, total_bs=480)),
    ('small', 'adamw'): ((8, 6), dict(learning_rate=6e-4, weight_decay=1e-1, beta1=0.9, beta2=0.95, min_lr=3e-5)),
    ('medium', 'sophiag'): ((10, 6), dict(learning_rate=7e-4, weight_decay=2e-1, beta1=0.965, beta2=0.99, min_lr=1e-5,
                                          rho=0.08, interval=10, scale_attn_by_inverse_layer_idx=True)),
    ('medium', 'adamw'): ((6, 8), dict(learning_rate=3e-4, weight_decay=1e-1, beta1=0.9, beta2=0.95, min_lr=6e-5,
                                       scale_attn_by_inverse_layer_idx=True)),
    ('large', 'sophiag'): ((4, 12), dict(learning_rate=3e-4, weight_decay=2e-1, beta1=0.965, beta2=0.99, min_lr=1e-5,
                                         rho=0.05, interval=10, scale_attn_by_inverse_layer_idx=True)),
    ('large', 'adamw'): ((4, 12), dict(learning_rate=2e-4, weight_decay=1e-1, beta1=0.9, beta2=0.95, min_lr=1e-5,
                                       scale_attn_by_inverse_layer_idx=True)),
}
# the official README's launch lines: (model, optimizer, nproc_per_node, batch_size, accumulation);
# large has none, its config's own values on 10 GPUs make the 480
LAUNCHES = [('small', 'sophiag', 10, 8, 6), ('small', 'sophiag', 8, 12, 5), ('small', 'adamw', 10, 8, 6),
            ('medium', 'sophiag', 8, 6, 10), ('medium', 'adamw', 8, 6, 10), ('large', 'sophiag', 10, 4, 12),
            ('large', 'adamw', 10, 4, 12)]

def official_config(folder, size, optimizer):
    """A config file as the official repository has it for this model and optimizer."""
    (batch, accumulation), hyper = OFFICIAL[(size, optimizer)]
    values = dict(wandb_log=True, wandb_project='sophia', wandb_run_name=f'gpt2-{size}-{optimizer}-100k',
                  batch_size=batch, block_size=1024, gradient_accumulation_steps=accumulation, **MODELS[size],
                  dropout=0.0, bias=False, max_iters=100000, lr_decay_iters=100000, eval_interval=1000,
                  eval_iters=200, log_interval=10, optimizer_name=optimizer, grad_clip=1.0, decay_lr=True,
                  warmup_iters=2000, compile=True, out_dir=f'out_{size}_{optimizer}_100k', variant=4)
    values.update(hyper)
    path = os.path.join(folder, f'official_{size}_{optimizer}.py')
    with open(path, 'w') as f:
        f.write(''.join(f"{key} = {value!r}\n" for key, value in values.items()))
    return path

def defaults_of(optimizer):
    return sophiag_defaults() if optimizer == 'sophiag' else adam_defaults()

@pytest.mark.parametrize('size, optimizer, nproc, batch, accumulation', LAUNCHES)
def test_official_config_and_launch_line_train_the_official_batch_with_our_config(tmp_path, size, optimizer,
                                                                                  nproc, batch, accumulation):
    """The official config file with the official README's overrides, on its number of processes,
    resolves to the same run as this repository's config for that model: every model key and
    hyperparameter, 480 sequences per iteration, and bs = 480 x 1024 for the Hessian."""
    notes = []
    official, sources = parse_args(defaults_of(optimizer), [official_config(str(tmp_path), size, optimizer),
                                                           f'--batch_size={batch}',
                                                           f'--gradient_accumulation_steps={accumulation}'],
                                   RECIPES[optimizer].foreign_keys(), notes)
    check_config(official, sources, world_size=nproc, recipe=RECIPES[optimizer])
    plan = batch_plan(official, sources, nproc)
    hess_sequences = SophiaGRecipe(official, plan).hess_sequences if optimizer == 'sophiag' else 480
    assert (plan.micro_steps, plan.sequences, hess_sequences) == (accumulation, 480, 480)
    name = 'adam' if optimizer == 'adamw' else optimizer
    ours, our_sources = parse_args(defaults_of(optimizer), [os.path.join(ROOT, 'config', f'train_gpt2_{size}_{name}.py')])
    check_config(ours, our_sources, world_size=nproc)
    assert batch_plan(ours, our_sources, nproc).sequences == 480
    differ = {key for key in ours if ours[key] != official[key]}
    assert differ <= {'out_dir', 'wandb_run_name', 'batch_size', 'gradient_accumulation_steps', 'total_bs'}, differ
    assert any(f"optimizer_name={optimizer!r}" in note for note in notes)
    assert any('variant=4 is ignored' in note for note in notes)
    if optimizer == 'sophiag':
        assert any('interval=10 is the official name of hess_interval' in note for note in notes)
        assert sources['hess_interval'].endswith('(as interval)')

def test_a_launch_whose_product_is_not_the_total_is_refused(tmp_path):
    path = official_config(str(tmp_path), 'small', 'sophiag')  # total_bs = 480
    config, sources = parse_args(sophiag_defaults(), [path, '--batch_size=8', '--gradient_accumulation_steps=6'],
                                 SophiaGRecipe.foreign_keys())
    with pytest.raises(ConfigError) as e:
        check_config(config, sources, world_size=8)
    assert str(e.value).startswith(f"8 processes x batch_size=8 (argument --batch_size=8) x gradient_accumulation_steps=6 "
                                   f"(argument --gradient_accumulation_steps=6) = 384 sequences per iteration, but "
                                   f"total_bs=480 ({path}:")
    assert 'use a batch_size that divides 60 (e.g. ' in str(e.value) and '--total_bs=384' in str(e.value)

@pytest.mark.parametrize('optimizer, key, value, message', [
    ('sophiag', 'optimizer_name', 'adamw', "optimizer_name='adamw' (argument --optimizer_name=adamw) but "
                                           "train_sophiag.py trains sophiag; run train_adam.py with this config"),
    ('adamw', 'optimizer_name', 'lion', "this repository trains adamw (train_adam.py), sophiag (train_sophiag.py), muon (train_muon.py)"),
    ('adamw', 'interval', 10, "'interval' is not a config key"),  # AdamW has no Hessian pass
    ('sophiag', 'interval', 2.5, "hess_interval=2.5 (argument --interval=2.5): expected an integer"),
])
def test_official_keys_that_cannot_apply_are_one_line(optimizer, key, value, message):
    with pytest.raises(ConfigError) as e:
        parse_args(defaults_of(optimizer), [f'--{key}={value}'], RECIPES[optimizer].foreign_keys())
    assert message in str(e.value) and '\n' not in str(e.value)

def test_nanogpt_keys_are_understood(tmp_path):
    path = tmp_path / 'nanogpt_config.py'
    path.write_text("always_save_checkpoint = False\nbackend = 'gloo'\ngradient_accumulation_steps = 1\n"
                    "batch_size = 64\n")
    config, sources = parse_args(adam_defaults(), [str(path)], AdamWRecipe.foreign_keys())
    check_config(config, sources, world_size=1)
    assert config['always_save_checkpoint'] is False and config['backend'] == 'gloo'
    assert batch_plan(config, sources, 1).sequences == 64  # total_bs not set: the product

def test_the_official_launch_arithmetic_on_two_processes_trains_like_one(tmp_path, dataset):
    """nproc 2 x batch_size 2 x accumulation 2 = total_bs 8, as the official README writes a launch,
    trains on the same sequences as one process with micro-batches of 4: the data is drawn per
    sequence, so the losses, parameters and optimizer state agree up to float summation order. AdamW: Sophia's
    signed steps while its Hessian is still zero turn float-order noise in near-zero momentum into
    full steps of opposite sign (same batch split, as in test_train, they agree)."""
    single, double = str(tmp_path / 'single'), str(tmp_path / 'double')
    config = tmp_path / 'official.py'
    config.write_text("total_bs = 8\noptimizer_name = 'adamw'\nvariant = 4\n")
    check_ok(run_script('train_adam.py', tiny_args(dataset, single, False, max_iters=6)))
    result = check_ok(run_script('train_adam.py', [str(config)] + tiny_args(
        dataset, double, False, max_iters=6, batch_size=2, gradient_accumulation_steps=2, total_bs=8),
        launcher=TORCHRUN, env={'OMP_NUM_THREADS': '1'}))
    assert "optimizer_name='adamw': train_adam.py trains adamw" in result.stdout
    assert 'tokens per iteration: 2 accumulation x 2 batch x 32 block = 128 per process, 256 over 2 processes' in result.stdout
    one, two = train_losses(single), train_losses(double)
    assert sorted(one) == sorted(two) == list(range(1, 7))
    for it in one:
        assert two[it] == pytest.approx(one[it], rel=1e-4), it
    a = torch.load(os.path.join(single, 'ckpt-00000006.pt'), weights_only=True)
    b = torch.load(os.path.join(double, 'ckpt-00000006.pt'), weights_only=True)
    assert a['sequences_drawn'] == b['sequences_drawn'] == 6 * 8
    for key, value in a['model'].items():
        # Adam's m / sqrt(v) of a coordinate with a near-zero gradient magnifies float-order noise:
        # a few ulps of the lr; other training data would move coordinates by the lr itself (~1e-3)
        torch.testing.assert_close(b['model'][key], value, rtol=1e-4, atol=1e-5)
    # and AdamW's state: both moments agree as whole tensors (norm-relative: one entry may carry
    # float-order noise; a gradient missing one process's share moves the whole tensor)
    for index, state in a['optimizer']['state'].items():
        assert int(b['optimizer']['state'][index]['step']) == int(state['step']) == 6
        for name in ('exp_avg', 'exp_avg_sq'):
            other = b['optimizer']['state'][index][name]
            relative = torch.linalg.vector_norm(other - state[name]) / torch.linalg.vector_norm(state[name])
            assert relative < 1e-4, (index, name, relative)

# -----------------------------------------------------------------------------
# checkpoints of the official scripts and of nanoGPT

def foreign_checkpoint(path, kind, vocab_size, iter_num=7, n_layer=2):
    """A checkpoint as the official Sophia scripts ('official', Sophia-G) or nanoGPT ('nanogpt',
    AdamW) write one: torch.compile's key prefixes, the causal-mask buffers, their model_args, and
    the optimizer state in their layout after a few steps. Returns (model, optimizer) as saved."""
    official = kind == 'official'
    torch.manual_seed(5)
    model = GPT(GPTConfig(n_layer=n_layer, n_head=2, n_embd=32, block_size=32, bias=not official, vocab_size=vocab_size,
                          dropout=0.0, scale_attn_by_inverse_layer_idx=official,
                          gelu='tanh' if official else 'exact'))
    params = dict(model.named_parameters())
    if official:  # names sorted; Linear weights decayed, biases, LayerNorm and embedding weights not
        linear = sorted(n for n in params if n.endswith(('c_attn.weight', 'c_proj.weight', 'c_fc.weight')))
        rest = sorted(n for n in params if n not in linear)
        optimizer = SophiaG([{'params': [params[n] for n in linear], 'weight_decay': 0.2},
                             {'params': [params[n] for n in rest], 'weight_decay': 0.0}], lr=1e-3, rho=0.05)
    else:  # nanoGPT since 2023: named_parameters order, every matrix decayed
        optimizer = torch.optim.AdamW([{'params': [p for p in params.values() if p.dim() >= 2], 'weight_decay': 0.1},
                                       {'params': [p for p in params.values() if p.dim() < 2], 'weight_decay': 0.0}],
                                      lr=1e-3)
    for step in range(3):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        optimizer.step(**({'bs': 480} if official else {}))
        if official:
            optimizer.update_hessian()
    state = {f'_orig_mod.{key}': value for key, value in model.state_dict().items()}
    for i in range(n_layer):
        state[f'_orig_mod.transformer.h.{i}.attn.bias'] = torch.tril(torch.ones(1, 1, 32, 32))
    model_args = dict(n_layer=n_layer, n_head=2, n_embd=32, block_size=32, bias=not official, vocab_size=vocab_size,
                      dropout=0.0)
    config = dict(batch_size=4, learning_rate=1e-3)
    if official:
        model_args['scale_attn_by_inverse_layer_idx'] = True
        config.update(optimizer_name='sophiag', total_bs=480, interval=10)
    torch.save(dict(model=state, optimizer=optimizer.state_dict(), model_args=model_args, iter_num=iter_num,
                    best_val_loss=torch.tensor(2.5), config=config), path)
    return model, optimizer

@pytest.mark.parametrize('kind', ['official', 'nanogpt'])
def test_a_foreign_optimizer_state_lands_on_the_same_parameters(tmp_path, kind):
    # 11 layers: sorted names put layer 10 before layer 2, unlike the model's order
    saved_model, saved_optimizer = foreign_checkpoint(str(tmp_path / 'ckpt.pt'), kind, vocab_size=65, n_layer=11)
    state = resume.read_checkpoint_file(str(tmp_path / 'ckpt.pt'), 'cpu')
    model = GPT(GPTConfig(**state['model_args']))
    model.load_state_dict(state['model'])
    recipe = SophiaGRecipe if kind == 'official' else AdamWRecipe
    config = dict(recipe.defaults(), learning_rate=1e-3, weight_decay=0.1, beta1=0.9, beta2=0.95, rho=0.05)
    optimizer = recipe(config, batch_plan(config, {}, world_size=1)).build(model, 'cpu')
    groups = recipe.parameter_groups(model)
    named, layout = resume.foreign_optimizer_state(state['optimizer'], model, 'ckpt.pt', groups)
    assert layout == ('official' if kind == 'official' else 'ours')
    resume.load_named_optimizer_state(model, optimizer, named, sharded=False, groups=groups)
    saved_params = dict(saved_model.named_parameters())
    keys = ('exp_avg', 'hessian') if kind == 'official' else ('exp_avg', 'exp_avg_sq')
    for name, param in model.named_parameters():
        for key in keys:
            assert torch.equal(optimizer.state[param][key], saved_optimizer.state[saved_params[name]][key]), (name, key)
    # our own hyperparameters, not the saved ones
    assert [group['weight_decay'] for group in optimizer.param_groups] == [0.1, 0.0]

@pytest.mark.parametrize('kind', ['official', 'nanogpt'])
def test_a_checkpoint_of_the_official_scripts_or_nanogpt_continues_here(tmp_path, dataset, kind):
    sophia = kind == 'official'
    path = str(tmp_path / 'foreign.pt')
    saved_model, _ = foreign_checkpoint(path, kind, vocab_size=make_vocab(dataset))
    out = str(tmp_path / 'out')
    result = check_ok(run_script('train_sophiag.py' if sophia else 'train_adam.py',
                                 tiny_args(dataset, out, sophia, init_from=path, max_iters=10, eval_interval=5)))
    assert f'continuing {path} (iteration 7)' in result.stdout
    writer = 'the official Sophia scripts' if sophia else 'nanoGPT'
    warning = next(line for line in result.stdout.splitlines() if line.startswith('warning:'))
    assert f'{path} was written by {writer}' in warning and 'no data position or RNG states' in warning
    assert ('weight decay now also applies to the token and position embeddings' in warning) == sophia
    evals = read_metrics(out, 'eval')
    assert [row['iter'] for row in evals] == [7, 10]  # the continued model is evaluated first
    assert sorted(train_losses(out)) == [8, 9, 10]
    final = torch.load(os.path.join(out, 'ckpt-00000010.pt'), weights_only=True)
    assert final['iter_num'] == 10 and final['best_val_loss'] <= 2.5
    assert final['model_args']['gelu'] == ('tanh' if sophia else 'exact')
    assert final['model_args']['scale_attn_by_inverse_layer_idx'] is sophia
    assert final['model_args']['bias'] is not sophia
    # the first evaluation is of the saved weights: the same val loss as computed here
    model = GPT(GPTConfig(**final['model_args']))
    model.load_state_dict({k: v for k, v in saved_model.state_dict().items()})
    config, _ = parse_args(sophiag_defaults(), tiny_args(dataset, out))
    _, paths = open_dataset(dataset, 32)
    data = TokenFiles(paths, dataset, make_vocab(dataset), config['batch_size'], 32, 'cpu')
    run = SimpleNamespace(model=model, config=config, data=data, autocast=nullcontext(), rank=0, world_size=1,
                          device='cpu', sharded=False)
    losses = trainer.estimate_loss(run)
    assert evals[0]['val/loss'] == pytest.approx(losses['val'], rel=1e-5)

def make_vocab(dataset):
    return open_dataset(dataset, 32)[0]

def test_model_keys_set_explicitly_must_match_the_checkpoint(tmp_path, dataset):
    path = str(tmp_path / 'foreign.pt')
    foreign_checkpoint(path, 'nanogpt', vocab_size=make_vocab(dataset))
    result = run_script('train_adam.py', tiny_args(dataset, str(tmp_path / 'out'), False, init_from=path,
                                                   gelu='tanh'))
    assert result.returncode == 2
    assert result.stderr == (f"error: the checkpoint {path} is of another model: gelu='tanh' (checkpoint: 'exact'); "
                             f"drop those overrides (the model is the checkpoint's) or use another --out_dir\n")

@pytest.mark.parametrize('contents, message', [
    ({'weights': torch.zeros(3)}, 'is not a training checkpoint'),
    ({'model': {}, 'model_args': {'n_layer': 2}, 'optimizer': {}, 'iter_num': 3}, 'its model_args lack n_head'),
    (None, 'cannot be loaded'),
])
def test_a_file_that_is_no_checkpoint_is_one_line(tmp_path, dataset, contents, message):
    path = str(tmp_path / 'other.pt')
    if contents is None:
        open(path, 'w').write('not a checkpoint')
    else:
        torch.save(contents, path)
    result = run_script('train_adam.py', tiny_args(dataset, str(tmp_path / 'out'), False, init_from=path))
    assert result.returncode == 2 and result.stderr.count('\n') == 1
    assert result.stderr.startswith(f'error: {path}') and message in result.stderr

# -----------------------------------------------------------------------------
# --help

@pytest.mark.parametrize('script, defaults', [('train_sophiag.py', sophiag_defaults), ('train_adam.py', adam_defaults),
                                              ('train_muon.py', muon_defaults), ('sample.py', None)])
@pytest.mark.parametrize('flag', ['--help', '-h'])
def test_help_lists_every_key_with_its_default_and_meaning(script, defaults, flag):
    if defaults is None:
        from sample import sample_defaults as defaults
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), flag], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 0 and result.stderr == ''
    lines = result.stdout.splitlines()
    for key, value in defaults().items():
        line = next((line for line in lines if line.strip().startswith(f'--{key}=')), None)
        assert line is not None, key
        default, _, meaning = line.strip().partition('  ')
        assert default == f'--{key}={value!r}' and meaning.strip(), line
    groups = [line for line in lines if line.endswith(':') and not line.startswith(' ')]
    assert len(groups) >= 3  # grouped as the defaults are
    if script == 'train_sophiag.py':
        assert "Sophia's own keys (the other scripts refuse them):" in groups
        assert 'interval' in lines[-1] and 'optimizer_name' in lines[-1]
    if script == 'train_muon.py':
        assert "Muon's own keys (the other scripts refuse them):" in groups
