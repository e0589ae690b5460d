"""bench.py through the real configurator in a subprocess: the in-process table for both optimizers,
the profiler traces, the end-to-end mode over the real training scripts, and its one-line errors."""

import json
import os
import re
import subprocess
import sys

import pytest

from helpers import ROOT, make_char_dataset

sys.path.insert(0, ROOT)

TINY = ['--device=cpu', '--dtype=float32', '--compile=False', '--n_layer=1', '--n_head=2', '--n_embd=32',
        '--block_size=16', '--batch_size=2', '--gradient_accumulation_steps=2', '--hess_interval=2']

def run_bench(args, timeout=120):
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    return subprocess.run([sys.executable, os.path.join(ROOT, 'bench.py')] + list(args), capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)

def table_rows(stdout):
    """{optimizer: [cells]} of the printed table."""
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith('optimizer  '))
    rows = {}
    for line in lines[header + 1:]:
        cells = line.split()
        if len(cells) != 9:  # the table ends at the ratio line
            break
        rows[cells[0]] = cells
    return rows

def number(cell):
    return None if cell == '-' else float(cell.rstrip('%').replace(',', ''))

@pytest.fixture(scope='module')
def profiled_run(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp('bench'))
    result = run_bench(TINY + ['--real_data=False', '--synthetic_vocab_size=50', '--bench_iters=3',
                               '--bench_warmup=1', '--bench_rounds=2', '--profile=True', f'--out_dir={out_dir}'])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout, out_dir

def test_table_has_both_optimizers_and_consistent_sections(profiled_run):
    stdout, _ = profiled_run
    rows = table_rows(stdout)
    assert set(rows) == {'sophiag', 'adamw'}
    for name, cells in rows.items():
        ms_per_iter, tokens_per_s, mfu, forward_backward, step, per_pass, per_iter, share = map(number, cells[1:])
        assert mfu is None  # no peak FLOP/s for a CPU unless --peak_flops is given
        assert forward_backward > 0 and step > 0
        # 2 accumulation x 2 batch x 16 block = 64 tokens per iteration
        assert tokens_per_s == pytest.approx(64 / (ms_per_iter / 1000), rel=0.01, abs=1)
        if name == 'sophiag':
            assert per_pass > 0 and per_iter == pytest.approx(per_pass / 2, abs=0.01)  # hess_interval=2
            assert ms_per_iter == pytest.approx(forward_backward + step + per_iter, abs=0.02)
            assert share == pytest.approx(100 * per_iter / ms_per_iter, rel=0.05)
        else:
            assert per_pass is None and per_iter is None and share is None
            assert ms_per_iter == pytest.approx(forward_backward + step, abs=0.02)
    ratio = re.search(r'sophiag / adamw tokens/s: ([\d.]+) \(the forward/backward arithmetic alone predicts '
                      r'([\d.]+)', stdout)
    assert ratio, stdout
    sophia, adam = number(rows['sophiag'][2]), number(rows['adamw'][2])
    # the table rounds tokens/s to integers and the line prints 3 decimals: a slow (busy) machine
    # makes tokens/s small and the table's rounding matter
    rounding = sophia / adam * (0.5 / sophia + 0.5 / adam) + 0.0005
    assert float(ratio.group(1)) == pytest.approx(sophia / adam, abs=rounding)
    assert float(ratio.group(2)) == pytest.approx(1 / (1 + 2 / (2 * 2)), abs=0.001)  # one full pass every 2

def test_profile_writes_a_chrome_trace_per_optimizer(profiled_run):
    stdout, out_dir = profiled_run
    for name in ('sophiag', 'adamw'):
        path = os.path.join(out_dir, f'bench-trace-{name}.json')
        with open(path) as f:
            events = {event.get('name') for event in json.load(f)['traceEvents']}
        assert {'forward_backward', 'optimizer_step'} <= events
        assert ('hessian_pass' in events) == (name == 'sophiag')
        assert f'{name}: top ops' in stdout and f'(trace: {path})' in stdout
    assert 'aten::mm' in stdout  # the top-ops table lists the matmuls

def test_end_to_end_runs_both_training_scripts(tmp_path):
    dataset = make_char_dataset(str(tmp_path / 'tiny_char'))
    result = run_bench(TINY + [f'--dataset={dataset}', '--end_to_end=True', '--bench_iters=2', '--bench_warmup=0',
                               '--bench_rounds=1'])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # two log rows of hess_interval=2 iterations: the first (evaluation at iteration 0) is skipped
    assert 'iterations 2..3 of 4 timed per run' in result.stdout
    for script in ('train_sophiag.py', 'train_adam.py'):
        assert re.search(rf'^round 1: {script}: [\d,]+ tokens/s$', result.stdout, re.M), result.stdout
        assert re.search(rf'^  python {script} .*--n_embd=32 .*--max_iters=4', result.stdout, re.M)
    assert re.search(r'train_sophiag\.py / train_adam\.py tokens/s: [\d.]+ \(rounds: [\d.]+; median [\d.]+\); the forward/backward '
                     r'arithmetic alone predicts 0\.667', result.stdout)

@pytest.mark.parametrize('args, message', [
    (['--optimizers=sophiag,sgd'], "optimizers='sophiag,sgd' (argument --optimizers=sophiag,sgd): expected"),
    (['--dataset=/nonexistent/data'], 'or benchmark on random tokens with --real_data=False'),
    (['--nanogpt=/nonexistent'], 'nanoGPT is run end to end only; add --end_to_end=True'),
    (['--end_to_end=True', f'--nanogpt={ROOT}'], "nanoGPT's model uses the exact GELU; for the same model add --gelu=exact"),
])
def test_mistakes_are_one_line(args, message):
    result = run_bench(TINY + args)
    assert result.returncode == 2
    assert result.stderr.startswith('error: ') and result.stderr.count('\n') == 1, result.stderr
    assert message in result.stderr

def test_bench_optimizer_times_every_candidate_and_its_floor():
    """bench_optimizer.py on small shapes: a row per implementation, optimizer and floor with a
    median and a range over the runs, and the two ratio lines docs/optimizer.md quotes."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'bench_optimizer.py'), '--device=cpu', '--runs=2',
                             '--repeats=2', '--n_layer=1', '--n_embd=32'], capture_output=True, text=True,
                            timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith('9 tensors, 1.65M values, device cpu')  # 1 layer of 32 and the 50,304 x 32 embedding
    rows = {}
    for line in result.stdout.splitlines():
        match = re.match(r'^(\S.*?)\s+([\d.]+) \(([\d.]+)-([\d.]+)\)\s+([\d.]+)', line)
        if match:
            rows[match[1]] = [float(value) for value in match.groups()[1:]]
    assert set(rows) == {'SophiaG default', 'SophiaG reference', 'SophiaG foreach', 'SophiaG fused', 'AdamW foreach',
                         'AdamW fused', 'update_hessian (default)', 'floor of SophiaG, 24 B', 'floor of AdamW, 28 B',
                         'floor of update_hessian, 12 B'}
    adam_low, adam_high = rows['AdamW fused'][1:3]
    for name, (median, low, high, ratio) in rows.items():
        assert 0 < low <= median <= high, name
        # the ratio column is the median of per-run ratios, between the extreme ratios of the
        # printed ranges (each printed to 0.05 ms)
        assert (low - 0.05) / (adam_high + 0.05) - 0.01 <= ratio <= (high + 0.05) / (adam_low - 0.05) + 0.01, name
    assert rows['AdamW fused'][3] == 1.0
    step = re.search(r'^default SophiaG step / AdamW fused: ([\d.]+) \(([\d.]+)-([\d.]+)\) \(target <= 0.9\)$',
                     result.stdout, re.M)
    hessian = re.search(r'^update_hessian / floor of its bytes: ([\d.]+) \(', result.stdout, re.M)
    assert step and hessian, result.stdout
    assert float(step[2]) <= float(step[1]) <= float(step[3])
    assert float(step[1]) == rows['SophiaG default'][3]  # the summary line is the table's ratio
