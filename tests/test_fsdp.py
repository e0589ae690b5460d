"""FSDP2 and HSDP in the same loop (gloo on the CPU): the same training as DDP in parameters,
optimizer state and losses, sharded checkpoints that resume exactly and convert between sharded
and unsharded runs and numbers of processes, and SIGTERM.

The runs share one config in which Sophia's Hessian matters: its EMA warms fast (beta2 0.5, a
pass every 2 steps) and rho is large, so most coordinates take the curvature-scaled step instead
of the clipped lr * sign(m); a Hessian that was wrong on one shard would move those coordinates."""

import os
import shutil
import signal
import sys
import warnings

import pytest
import torch

from helpers import ROOT, check_ok, make_char_dataset, read_metrics, run_script, tiny_args, train_losses

sys.path.insert(0, ROOT)
import checkpoint  # noqa: E402

TWO = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
FOUR = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=4']
ONE_THREAD = {'OMP_NUM_THREADS': '1'}
# 8 sequences of 2 per iteration: 2 micro-batches in each of 2 processes, 1 in each of 4
RUN = dict(max_iters=8, batch_size=2, total_bs=8, eval_interval=4, eval_iters=4, checkpoint_interval=4,
           keep_last=10, lr_decay_iters=8)
SOPHIA = dict(hess_interval=2, beta2=0.5, rho=50.0, learning_rate=1e-2, min_lr=1e-3)

@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    return make_char_dataset(str(tmp_path_factory.mktemp('data') / 'tiny_char'))

def train(dataset, out, script='train_sophiag.py', launcher=TWO, **overrides):
    sophia = script == 'train_sophiag.py'
    config = dict(RUN, **(SOPHIA if sophia else {}), **overrides)
    return check_ok(run_script(script, tiny_args(dataset, out, sophia, **config), launcher=launcher, env=ONE_THREAD))

def tensors_of(path):
    """Parameters and optimizer state of a checkpoint, whole, by parameter name (a sharded one is
    consolidated), and its meta."""
    state = checkpoint.load_checkpoint(path)
    found = {f'model.{key}': value for key, value in state['model'].items() if key != 'lm_head.weight'}
    if 'sharded' in state:
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys
        optimizer = checkpoint.in_one_process(_load_state_dict_from_keys, {'optimizer'},
                                              checkpoint_id=path)['optimizer']['state']
    else:
        import resume
        from model import GPT, GPTConfig
        from optimizers import RECIPES
        model = GPT(GPTConfig(**state['model_args']))
        groups = RECIPES[state['optimizer_name']].parameter_groups(model)
        optimizer = resume.named_optimizer_state(state['optimizer'], groups)['state']
    for name, per_param in optimizer.items():
        for key, value in per_param.items():
            if key != 'step':
                found[f'optimizer.{name}.{key}'] = value
    return found, state

def assert_close_runs(a, b, rtol):
    """Every parameter, momentum and Hessian (or Adam's second moment) tensor of two checkpoints
    agrees within rtol, relative in norm (|a - b| / |a|): float sums in another order move entries
    by a few ulps, which steps divided by a small curvature can grow to a relative 1e-4 in a few
    entries; a wrong shard or an unreduced gradient moves whole tensors by the lr."""
    a, _ = tensors_of(a)
    b, _ = tensors_of(b)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape, key
        error = torch.linalg.vector_norm(a[key].double() - b[key].double()).item()
        assert error <= rtol * torch.linalg.vector_norm(a[key].double()).item(), (key, error)

def ckpt(out, iter_num, sharded):
    return os.path.join(out, f'ckpt-{iter_num:08d}.{"dcp" if sharded else "pt"}')

@pytest.fixture(scope='module')
def ddp_run(dataset, tmp_path_factory):
    out = str(tmp_path_factory.mktemp('ddp') / 'out')
    train(dataset, out)
    return out

@pytest.fixture(scope='module')
def fsdp_run(dataset, tmp_path_factory):
    out = str(tmp_path_factory.mktemp('fsdp') / 'out')
    result = train(dataset, out, data_parallel='fsdp')
    return out, result

def test_fsdp_trains_as_ddp_does(ddp_run, fsdp_run):
    out, result = fsdp_run
    assert "data_parallel                   = 'fsdp'" in result.stdout
    rows = read_metrics(out, 'train')
    assert min(row['train/win_rate'] for row in rows if row['iter'] >= 4) > 0.3  # the Hessian acts
    one, two = train_losses(ddp_run), train_losses(out)
    assert sorted(one) == sorted(two) == list(range(1, 9))
    for it in one:
        assert two[it] == pytest.approx(one[it], rel=1e-5), it
    assert_close_runs(ckpt(ddp_run, 8, False), ckpt(out, 8, True), rtol=1e-5)
    # the diagnostics are reduced over the shards: the whole model's, as DDP's
    ddp_rows = {row['iter']: row for row in read_metrics(ddp_run, 'train')}
    for row in rows:
        for key in ('train/win_rate', 'hessian_norm', 'hessian_norm2', 'momentum_norm', 'param_norm'):
            assert row[key] == pytest.approx(ddp_rows[row['iter']][key], rel=1e-4), (row['iter'], key)

def test_fsdp_adamw_trains_as_ddp_does(dataset, tmp_path):
    ddp, fsdp = str(tmp_path / 'ddp'), str(tmp_path / 'fsdp')
    train(dataset, ddp, 'train_adam.py', max_iters=4)
    train(dataset, fsdp, 'train_adam.py', max_iters=4, data_parallel='fsdp')
    one, two = train_losses(ddp), train_losses(fsdp)
    for it in one:
        assert two[it] == pytest.approx(one[it], rel=1e-5), it
    assert_close_runs(ckpt(ddp, 4, False), ckpt(fsdp, 4, True), rtol=1e-5)

def test_sharded_checkpoint_layout_and_manifest(fsdp_run):
    out, _ = fsdp_run
    names = sorted(os.listdir(out))
    assert {'ckpt-00000004.dcp', 'ckpt-00000004.json', 'ckpt-00000008.dcp', 'ckpt-00000008.json',
            'best.dcp', 'best.json', 'metrics.jsonl'} <= set(names)
    folder = ckpt(out, 8, True)
    files = sorted(os.listdir(folder))
    assert files == ['.metadata', '__0_0.distcp', '__1_0.distcp', 'meta.pt']  # each process its shards
    manifest = checkpoint.verify(folder)
    assert sorted(manifest['files']) == files
    with open(os.path.join(folder, '__1_0.distcp'), 'r+b') as f:  # a flipped byte is found
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(checkpoint.CheckpointError, match='__1_0.distcp is damaged'):
        checkpoint.verify(folder)
    with open(os.path.join(folder, '__1_0.distcp'), 'r+b') as f:
        f.seek(100)
        f.write(byte)

def truncated_copy(out, at, target):
    """out_dir as it was at iteration `at`: its checkpoints up to then, its log rows up to then."""
    shutil.copytree(out, target)
    for name in os.listdir(target):
        if name.startswith('ckpt-') and int(name[5:13]) > at:
            checkpoint.remove(os.path.join(target, name))
    for name in ('best.dcp', 'best.pt', 'best.json'):
        path = os.path.join(target, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.path.exists(path) and os.remove(path)
    return target

def test_fsdp_resumes_exactly(dataset, fsdp_run, tmp_path):
    out, _ = fsdp_run
    resumed = truncated_copy(out, 4, str(tmp_path / 'resumed'))
    result = train(dataset, resumed, data_parallel='fsdp', init_from='resume')
    assert f"resuming from {ckpt(resumed, 4, True)}" in result.stdout
    a, meta_a = tensors_of(ckpt(out, 8, True))
    b, meta_b = tensors_of(ckpt(resumed, 8, True))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert train_losses(out) == train_losses(resumed)
    assert meta_a['sequences_drawn'] == meta_b['sequences_drawn'] == 8 * 8 + 4 * 8  # steps, Hessian passes

def test_ddp_checkpoint_resumes_under_fsdp(dataset, ddp_run, tmp_path):
    resumed = truncated_copy(ddp_run, 4, str(tmp_path / 'resumed'))
    train(dataset, resumed, data_parallel='fsdp', init_from='resume')
    assert os.path.isdir(ckpt(resumed, 8, True))  # it goes on sharded
    assert_close_runs(ckpt(ddp_run, 8, False), ckpt(resumed, 8, True), rtol=1e-5)

def test_fsdp_checkpoint_resumes_on_one_process_unsharded(dataset, fsdp_run, tmp_path):
    """2 sharded processes -> 1 plain process: resharding. The data position carries over; the
    per-process RNG states cannot, and the float sums over processes go in another order."""
    out, _ = fsdp_run
    resumed = truncated_copy(out, 4, str(tmp_path / 'resumed'))
    result = train(dataset, resumed, launcher=None, init_from='resume')
    assert 'the checkpoint was written by 2 processes, this run has 1' in result.stdout
    assert 'Warning' not in result.stderr  # torch's about reading without a process group, for one
    assert_close_runs(ckpt(out, 8, True), ckpt(resumed, 8, False), rtol=1e-4)
    for it, loss in train_losses(out).items():
        assert train_losses(resumed)[it] == pytest.approx(loss, rel=1e-4), it

def test_a_sharded_checkpoint_reads_whole_in_one_process_without_a_warning(fsdp_run):
    """As sample.py, export_hf.py and hellaswag.py read one: no process group, no warning of it."""
    out, _ = fsdp_run
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        state = checkpoint.load_checkpoint(ckpt(out, 8, True))
    assert state['model']['transformer.wte.weight'].shape[1] == 32  # whole, not a shard's rows

def test_hsdp_on_four_processes_trains_as_ddp_does(dataset, ddp_run, tmp_path):
    """A 2 x 2 mesh: parameters sharded over pairs of processes and replicated across the pairs."""
    out = str(tmp_path / 'hsdp')
    result = train(dataset, out, launcher=FOUR, data_parallel='hsdp', shard_group_size=2)
    assert 'tokens per iteration: 1 accumulation x 2 batch x 32 block = 64 per process, 256 over 4 processes' \
        in result.stdout
    folder = ckpt(out, 8, True)
    assert len([name for name in os.listdir(folder) if name.endswith('.distcp')]) >= 2
    assert_close_runs(ckpt(ddp_run, 8, False), folder, rtol=1e-4)

def test_sigterm_under_fsdp_saves_a_sharded_checkpoint(dataset, tmp_path):
    import subprocess
    import time
    out = str(tmp_path / 'out')
    args = tiny_args(dataset, out, **dict(RUN, **SOPHIA, data_parallel='fsdp', max_iters=10000,
                                          lr_decay_iters=10000, checkpoint_interval=10000, log_interval=1))
    process = subprocess.Popen(TWO + [os.path.join(ROOT, 'train_sophiag.py')] + args, cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, PYTHONUNBUFFERED='1', **ONE_THREAD))
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(os.path.join(out, 'metrics.jsonl'))
                                          and read_metrics(out, 'train')):
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode != 0
    stopped = [line for line in err.splitlines() if line.startswith('stopped by SIGTERM at iteration')]
    assert len(stopped) == 1, err[-3000:]
    folder = stopped[0].split('; checkpoint ')[1].split(';')[0]
    assert folder.endswith('.dcp')
    checkpoint.verify(folder)
    state = checkpoint.load_checkpoint(folder, model_tensors=False)
    assert len(state['rng']) == 2 and state['iter_num'] == int(stopped[0].split()[5].rstrip(';'))

def test_activation_checkpointing_computes_the_same(dataset, tmp_path):
    """Recomputing each block's activations in backward gives the same gradients, bit for bit."""
    plain, recomputed = str(tmp_path / 'plain'), str(tmp_path / 'recomputed')
    train(dataset, plain, launcher=None, max_iters=3)
    train(dataset, recomputed, launcher=None, max_iters=3, activation_checkpointing=True)
    assert train_losses(plain) == train_losses(recomputed)
    a, _ = tensors_of(os.path.join(plain, 'ckpt-00000003.pt'))
    b, _ = tensors_of(os.path.join(recomputed, 'ckpt-00000003.pt'))
    assert all(torch.equal(a[key], b[key]) for key in a)

def test_sample_export_and_init_from_read_a_sharded_run(dataset, fsdp_run, tmp_path):
    out, _ = fsdp_run
    result = check_ok(run_script('sample.py', [f'--out_dir={out}', '--num_samples=1', '--max_new_tokens=5']))
    assert f"sampling from {os.path.join(out, 'best.dcp')}" in result.stdout
    hf = str(tmp_path / 'hf')
    check_ok(run_script('export_hf.py', [out, hf]))  # it checks the exported logits itself
    continued = str(tmp_path / 'continued')
    result = train(dataset, continued, launcher=None, init_from=ckpt(out, 4, True), max_iters=5)
    assert f"continuing {ckpt(out, 4, True)} (iteration 4)" in result.stdout
    assert sorted(train_losses(continued)) == [5]

def test_init_from_names_a_sharded_checkpoint_with_a_trailing_slash(fsdp_run):
    """The shell completes a folder's name with a slash: --init_from=ckpt-<iter>.dcp/ continues it
    (not taken for a Hugging Face model folder)."""
    import resume
    from optimizers import SophiaGRecipe
    out, _ = fsdp_run
    config = dict(init_from=ckpt(out, 4, True) + os.sep, out_dir=out)
    state, path = resume.load_start(config, SophiaGRecipe, True, 'cpu')
    assert path == ckpt(out, 4, True) and state['sharded'] == path and state['iter_num'] == 4

# every SophiaG implementation on 2 processes' shards of the same parameters, against one process
# updating them whole: the same values to float rounding (the updates are elementwise)
SHARDED_STEPS = '''
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from sophia import SophiaG
dist.init_process_group('gloo')
def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3))
results = {{}}
for flags in (dict(foreach=False), dict(foreach=True), dict(fused=True)):
    for sharded in (False, True):
        net = model()
        if sharded:
            fully_shard(net)
        optimizer = SophiaG(net.parameters(), lr=0.1, rho=0.5, **flags)
        for step in range(4):
            torch.manual_seed(step)  # the same data on both processes: one process's gradient
            x, y = torch.randn(8, 6), torch.randn(8, 3)
            torch.nn.functional.mse_loss(net(x), y).backward()
            if step % 2:
                optimizer.update_hessian()
            else:
                optimizer.step(bs=8)
            optimizer.zero_grad()
        whole = lambda t: t.full_tensor() if isinstance(t, DTensor) else t
        results[(str(flags), sharded)] = [whole(t) for p in net.parameters()
                                          for t in (p, optimizer.state[p]['exp_avg'], optimizer.state[p]['hessian'])]
        results[(str(flags), sharded)] += list(optimizer.diagnostics().values())
for flags in {{flags for flags, _ in results}}:
    for a, b in zip(results[(flags, False)], results[(flags, True)]):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
if dist.get_rank() == 0:  # one line: the two processes' prints can interleave (both are checked:
    print('same', len(results))  # assert_close fails the other's exit status)
dist.destroy_process_group()
sys.stdout.flush()  # and leave as distributed.end_process_group does: the interpreter's
os._exit(0)  # teardown can abort a finished gloo process under load
'''

def test_every_sophia_implementation_updates_the_shards(tmp_path):
    script = tmp_path / 'sharded_steps.py'
    script.write_text(SHARDED_STEPS.format(root=ROOT))
    import subprocess
    result = subprocess.run(TWO + [str(script)], capture_output=True, text=True, cwd=ROOT,
                            env=dict(os.environ, **ONE_THREAD), timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert 'same 6' in result.stdout
