"""gpu_check.py without a GPU: its toy CPU mode through every stage into the layout a GPU call
writes, the stages' caps and failures, the report's tables from the committed example output
(tests/gpu_check_example/, made by the toy mode) and its copy of the study runs, and the plan a
GPU runs."""

import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from argparse import Namespace

import pytest

from helpers import ROOT

sys.path.insert(0, ROOT)
import gpu_check  # noqa: E402

EXAMPLE = os.path.join(ROOT, 'tests', 'gpu_check_example')

def run_check(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'gpu_check.py')] + list(args),
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env=dict(os.environ, **(env or {})))

def files_under(folder):
    return sorted(os.path.relpath(os.path.join(d, n), folder)
                  for d, _, names in os.walk(folder) for n in names)

def alive(pid):
    """Whether the process runs (a zombie, ended but not yet reaped by init, does not)."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except FileNotFoundError:
        return False

def test_tiny_mode_runs_every_stage_into_the_example_layout(tmp_path, gpt2_ranks_file):
    out, work = tmp_path / 'out', tmp_path / 'work'
    started = time.time()
    result = run_check('--tiny=True', f'--out={out}', f'--work={work}', '--nanogpt=',
                       env=dict(GPT2_RANKS_FILE=gpt2_ranks_file))
    seconds = time.time() - started
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # the device tool brings back at most 8 files
    assert sorted(os.listdir(out)) == ['gpu-check.tar.gz', 'summary.md']
    unpacked = tmp_path / 'unpacked'
    with tarfile.open(out / 'gpu-check.tar.gz') as tar:
        tar.extractall(unpacked, filter='data')
    layout = unpacked / 'gpu-check'
    manifest = json.loads((layout / 'manifest.json').read_text())
    stages = ('env', 'data', 'tests', 'optimizer', 'e2e', 'memory', 'split', 'study')
    assert [(s['name'], s['status']) for s in manifest['stages']] == [(n, 'ok') for n in stages]
    assert files_under(layout) == files_under(EXAMPLE)  # the committed example has this very layout
    assert manifest['stages'][-1]['study_runs'] == ['adamw-lr0.001']  # the tiny suite's first run
    assert manifest['code'] == gpu_check.code_fingerprint()  # which code ran, with or without git
    e2e = json.loads((layout / 'e2e.json').read_text())
    assert all(len(v) == 1 and v[0] > 0 for v in e2e['tokens_per_s'].values())
    assert (out / 'summary.md').read_text() == gpu_check.tables(str(layout))
    # the report reads the tarball as the device tool brings it back
    report = run_check(f"--report={out / 'gpu-check.tar.gz'}", f"--study_root={tmp_path / 'repo'}")
    assert report.returncode == 0, report.stderr
    assert report.stdout.startswith((out / 'summary.md').read_text())
    assert sorted(os.listdir(tmp_path / 'repo' / 'study' / 'tiny')) == \
        ['adamw-lr0.001.json', 'adamw-lr0.001.jsonl']
    print(f"tiny mode: {seconds:.0f} s")

def test_report_rebuilds_the_tables_from_the_committed_example(tmp_path):
    root = tmp_path / 'repo'
    result = run_check(f'--report={EXAMPLE}', f'--study_root={root}')
    assert result.returncode == 0, result.stderr
    text = result.stdout
    e2e = json.load(open(os.path.join(EXAMPLE, 'e2e.json')))
    mean = {label: statistics.harmonic_mean(v) for label, v in e2e['tokens_per_s'].items()}
    for label, value in mean.items():
        assert f"| `{label}` | {value:,.0f} |" in text
    ratio = mean['train_sophiag.py'] / mean['train_adam.py']
    assert (f"Sophia-G / AdamW: {ratio:.3f}, against the arithmetic's ceiling of "
            f"{e2e['expected_ratio']:.3f}") in text
    optimizer = json.load(open(os.path.join(EXAMPLE, 'optimizer.json')))
    adam = statistics.median(optimizer['ms']['AdamW fused'])
    for name, ms in optimizer['ms'].items():
        assert f"| {name} | {statistics.median(ms):.2f} " in text
        assert f"| {statistics.median(ms) / adam:.2f} |" in text
    for row in json.load(open(os.path.join(EXAMPLE, 'memory.json')))['rows']:
        assert f"| {row['model']} | {row['parallel']} | {row['peak_mib']:,.0f} |" in text
    for row in json.load(open(os.path.join(EXAMPLE, 'split.json')))['rows']:
        cells = f"| {row['optimizer']} | {row['forward_backward_ms']:.1f} | {row['step_ms']:.2f} |"
        assert cells in text
    for stage in json.load(open(os.path.join(EXAMPLE, 'manifest.json')))['stages']:
        assert f"| {stage['name']} | {stage['what']} | {stage['status']} |" in text
    assert 'CUDA tests (`python -m pytest' in text and 'skipped' in text
    # the study's runs land where study.py reads them, byte for byte
    for name in os.listdir(os.path.join(EXAMPLE, 'study', 'tiny')):
        assert (root / 'study' / 'tiny' / name).read_bytes() == \
            open(os.path.join(EXAMPLE, 'study', 'tiny', name), 'rb').read()
    assert 'next: python study.py --suite=tiny --report_only' in text
    again = run_check(f'--report={EXAMPLE}', f'--study_root={root}')  # equal files: nothing to do
    assert again.returncode == 0 and 'copied' not in again.stdout

def test_report_keeps_a_committed_run_that_differs(tmp_path):
    root = tmp_path / 'repo'
    (root / 'study' / 'tiny').mkdir(parents=True)
    mine = root / 'study' / 'tiny' / 'adamw-lr0.001.jsonl'
    mine.write_text('{"kind": "config"}\n')
    result = run_check(f'--report={EXAMPLE}', f'--study_root={root}')
    assert result.returncode == 2 and result.stderr.count('\n') == 1
    assert 'adamw-lr0.001.jsonl exists with other contents' in result.stderr
    assert mine.read_text() == '{"kind": "config"}\n'
    assert os.listdir(root / 'study' / 'tiny') == [mine.name]

@pytest.mark.parametrize('args, message', [
    (['--report=/nonexistent/gpu-check.tar.gz'], 'does not exist'),
    ([f'--report={ROOT}'], 'no manifest.json'),
    (['--tiny=True', '--stages=env,bogus'], "'bogus' is not a stage"),
])
def test_mistakes_are_one_line(tmp_path, args, message):
    result = run_check(*args, f'--out={tmp_path / "out"}', f'--work={tmp_path / "work"}')
    assert result.returncode == 2 and result.stderr.count('\n') == 1, result.stderr
    assert message in result.stderr
    assert not (tmp_path / 'out').exists() and not (tmp_path / 'work').exists()

def test_a_failed_or_slow_stage_is_recorded_and_the_next_runs(tmp_path, monkeypatch):
    """A stage past its cap is stopped with every process it started; one that fails is recorded;
    one that cannot finish in what is left of the budget is skipped; the output is packed after
    each."""
    child, never = tmp_path / 'child.pid', tmp_path / 'never'
    sleeper = ('import subprocess, sys, time; '
               'p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]); '
               f'open({str(child)!r}, "w").write(str(p.pid)); time.sleep(60)')
    broken = [[sys.executable, '-c', 'import sys; sys.exit(3)'],
              [sys.executable, '-c', f'open({str(never)!r}, "w")']]
    stages = [gpu_check.Stage('slow', 3, 1, [[sys.executable, '-c', sleeper]], 'sleeps'),
              gpu_check.Stage('broken', 30, 1, broken, 'fails'),
              gpu_check.Stage('fine', 30, 1, [[sys.executable, '-c', 'print("measured")']],
                              'prints'),
              gpu_check.Stage('long', 30, 10 ** 4, [[sys.executable, '-c', 'pass']], 'too long')]
    monkeypatch.setattr(gpu_check, 'plan_stages', lambda *args: stages)
    out, work = tmp_path / 'out', tmp_path / 'work'
    args = Namespace(tiny=True, work=str(work), out=str(out), nanogpt='', budget=60.0, stages='')
    started = time.time()
    gpu_check.check(args)
    assert time.time() - started < 30
    manifest = json.loads((work / 'gpu-check' / 'manifest.json').read_text())
    statuses = [s['status'] for s in manifest['stages']]
    assert statuses[:3] == ['timed out', 'failed (exit 3)', 'ok']
    assert statuses[3].startswith('skipped (') and statuses[3].endswith('s left, it needs 10000)')
    assert not alive(int(child.read_text()))  # the grandchild ended with its stage
    assert not never.exists()  # a stage stops at its first failing command
    assert 'measured' in (work / 'gpu-check' / 'fine.log').read_text()
    with tarfile.open(out / 'gpu-check.tar.gz') as tar:
        assert 'gpu-check/fine.log' in tar.getnames()

def test_the_gpu_plan_measures_what_the_readme_reports():
    stages = {s.name: [' '.join(c) for c in s.commands]
              for s in gpu_check.plan_stages(False, '/w', '/w/gpu-check', '/n', 330)}
    assert list(stages) == ['env', 'data', 'tests', 'optimizer', 'e2e', 'memory', 'split', 'study']
    e2e = stages['e2e'][0]
    for part in ('config/train_gpt2_small_sophiag.py', '--device=cuda', '--dtype=bfloat16',
                 '--compile=True', '--total_bs=48', '--end_to_end=True',
                 '--optimizers=adamw,sophiag,muon', '--nanogpt=/n',
                 '--gelu=exact', '--scale_attn_by_inverse_layer_idx=False'):
        assert part in e2e
    assert '--device=cuda' in stages['optimizer'][0] and '--device=cuda' in stages['memory'][0]
    assert '--models=gpt2,gpt2-xl' in stages['memory'][0]
    assert stages['study'][-1].endswith('study.py --suite=gpu --root=/w/study-root')
    assert 'tests/test_sophia.py' in stages['tests'][0] and '-k cuda' in stages['tests'][0]
    # the call in the docstring leaves the budget a minute to stop its last stage and pack
    call = 'run(command="python3 gpu_check.py --out=$OUT", carry=[".gpu_check"], timeout_s=390)'
    assert call in gpu_check.__doc__

def test_gpu_tables_give_mfu_against_both_peaks_and_nanogpt_by_its_tokens():
    """On a GPU the scripts log MFU against the datasheet peak; the table adds it against the
    product measured in the same call, and nanoGPT's from its tokens/s (same model and batch)."""
    e2e = dict(tokens_per_iter=49152, dtype='bfloat16', compile=True, expected_ratio=0.909,
               tokens_per_s={'train_adam.py': [400e3], 'train_sophiag.py': [360e3],
                             'train_muon.py': [], 'nanoGPT train.py': [420e3]},
               mfu={'train_adam.py': [0.40], 'train_sophiag.py': [0.39]})
    text = gpu_check.e2e_table(e2e, datasheet=989e12, measured_peak=791e12)
    assert '| `train_adam.py` | 400,000 | 40.0% | 50.0% | 1.000 |' in text
    assert '| `train_sophiag.py` | 360,000 | 39.0% | 48.8% | 0.900 |' in text
    assert '| nanoGPT `train.py` | 420,000 | 42.0% | 52.5% | 1.050 |' in text
    assert 'train_muon.py' not in text  # a script the check did not reach has no row
    assert "Sophia-G / AdamW: 0.900, against the arithmetic's ceiling of 0.909 (99.0% of it)." \
        in text

def test_nanogpt_reads_gpt2_bpe_without_meta_so_its_vocabulary_is_padded_as_ours(tmp_path):
    """nanoGPT takes meta.pkl's vocab_size as it is (50257 rows) and 50304 without one; this
    repository pads to 50304: bench.py gives nanoGPT the token files alone for GPT-2 BPE."""
    import pickle
    import bench
    for name, vocab in (('bpe', 50257), ('chars', 65)):
        folder = tmp_path / name
        folder.mkdir()
        for split in ('train.bin', 'val.bin'):
            (folder / split).write_bytes(b'\0' * 64)
        (folder / 'meta.pkl').write_bytes(pickle.dumps({'vocab_size': vocab}))
    scratch = tmp_path / 'scratch'
    scratch.mkdir()
    given = bench.nanogpt_data({'dataset': str(tmp_path / 'bpe')}, 50257, str(scratch))
    assert sorted(os.listdir(given)) == ['train.bin', 'val.bin']
    assert os.path.samefile(os.path.join(given, 'train.bin'), tmp_path / 'bpe' / 'train.bin')
    assert bench.nanogpt_data({'dataset': str(tmp_path / 'chars')}, 65, str(scratch)) == \
        str(tmp_path / 'chars')  # a character vocabulary is not padded: nanoGPT reads meta.pkl

def test_gpu_figures_are_held_to_the_targets():
    e2e = dict(expected_ratio=0.909, mfu={'train_adam.py': [0.44, 0.46]},
               tokens_per_s={'train_adam.py': [400e3], 'train_sophiag.py': [355e3]})
    optimizer = dict(ms={'SophiaG default': [4.0, 4.2, 3.8], 'AdamW fused': [3.9, 3.9, 3.9]})
    text = gpu_check.targets_text(e2e, optimizer)
    assert '- `train_adam.py` MFU 45.0%, target 45% or more: met' in text
    assert '- Sophia-G / AdamW tokens/s at 97.6% of the ceiling, target 99% or more: short' in text
    assert "- Sophia-G's step / fused AdamW's 1.03, target 1 or less: short" in text
    assert gpu_check.targets_text(None, None) is None
