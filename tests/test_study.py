"""study.py's gpu suite without a GPU: its plan, and its machinery run for real through the tiny
suite (the same procedure at toy size on the CPU) on a corpus made by data/python_code/prepare.py:
only missing runs are trained, each finished run's log is committed at once, and the report is
rebuilt byte for byte from those logs alone. Reports with known numbers come from planted logs."""

import dataclasses
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import study  # noqa: E402
from study import Spec  # noqa: E402

README = "# project\n\nbefore\n\n<!-- study-{0}:begin -->\nstale\n<!-- study-{0}:end -->\n\nafter\n"

def run_study(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'study.py'), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env=dict(os.environ, PYTHONUNBUFFERED='1'))

def check_ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result

def make_root(tmp_path, suite_name):
    """A scratch folder standing in for the repository: a README with the suite's markers."""
    root = tmp_path / 'repo'
    root.mkdir()
    (root / 'README.md').write_text(README.format(suite_name))
    return root

def snapshot(root):
    """Every file the study wrote or reads under root (not the training out_dirs), as bytes."""
    files = {}
    for folder in ('study', 'assets'):
        for dirpath, _, names in os.walk(root / folder):
            for name in names:
                path = os.path.join(dirpath, name)
                files[os.path.relpath(path, root)] = open(path, 'rb').read()
    files['README.md'] = (root / 'README.md').read_bytes()
    return files

def section(root, suite_name):
    readme = (root / 'README.md').read_text()
    return readme.split(f'<!-- study-{suite_name}:begin -->')[1].split(f'<!-- study-{suite_name}:end -->')[0]

def plant(root, suite, spec, losses, tokens_per_s, win_rate=0.2, fingerprint='f' * 64, status='finished'):
    """Write a finished run into study/<suite>/ as study.py commits one: its metrics log (a config
    line, eval rows with `losses` at every eval_interval, train rows) and its record."""
    c = suite.config
    name = study.run_name(suite, spec)
    step = c['batch_size'] * c['block_size'] * c['gradient_accumulation_steps']
    rows = [dict(kind='config', run_name=name, optimizer=spec.optimizer, iter=0,
                 config=study.run_config(suite, spec, out_dir=f'out-study-{suite.name}/{name}'))]
    for i, loss in enumerate(losses):
        it = i * c['eval_interval']
        rows.append(dict(kind='eval', iter=it, tokens=it * step, time=it / 10, **{'train/loss': loss, 'val/loss': loss}))
    for it in range(c['log_interval'], c['eval_interval'] * (len(losses) - 1) + 1, c['log_interval']):
        row = dict(kind='train', iter=it, tokens=it * step, time=it / 10, loss=losses[-1], tokens_per_s=tokens_per_s)
        if spec.optimizer == 'sophiag':
            row['train/win_rate'] = win_rate
        rows.append(row)
    folder = root / 'study' / suite.name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f'{name}.jsonl').write_text(''.join(json.dumps(row) + '\n' for row in rows))
    record = dict(run=name, status=status, device='CPU (planted)', torch='0.0', date='2026-01-02',
                  wall_seconds=1.0, command=f'python {name}', corpus=dict(
                      dataset=c['dataset'], fingerprint=fingerprint, interpreter='CPython (planted)',
                      files=3, train_tokens=1000, val_tokens=100))
    (folder / f'{name}.json').write_text(json.dumps(record))

@pytest.fixture(scope='module')
def corpus(tmp_path_factory, gpt2_ranks_file):
    """A corpus of 30 small text files made by data/python_code/prepare.py."""
    folder = tmp_path_factory.mktemp('texts')
    for i in range(30):
        (folder / f'doc{i}.txt').write_text(f"def function_{i}(x):\n    return x * {i} + {i * i}\n" * 8)
    out = tmp_path_factory.mktemp('corpus')
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'data', 'python_code', 'prepare.py'),
                             f'--input_dir={folder}', f'--out_dir={out}', '--num_proc=1'], capture_output=True,
                            text=True, env=dict(os.environ, GPT2_RANKS_FILE=gpt2_ranks_file))
    check_ok(result)
    return str(out)

# -----------------------------------------------------------------------------

def test_gpu_suite_meets_the_brief():
    gpu = study.GPU
    c = gpu.config
    assert c['batch_size'] * c['block_size'] * c['gradient_accumulation_steps'] >= 131_072
    assert c['max_iters'] >= 2000 and (c['device'], c['dtype'], c['compile']) == ('cuda', 'bfloat16', True)
    assert len(gpu.adam_lrs) >= 4 and len(gpu.sophia_lrs) >= 4 and gpu.rho == 0.05 and len(gpu.rho_sweep) >= 2
    assert gpu.muon_lrs == gpu.adam_lrs  # with match_rms_adamw Muon's learning rate is on AdamW's scale
    assert len(gpu.seeds) >= 3 and gpu.committed and gpu.ablation
    # the plan, with every run of a phase finished in turn: the lowest loss wins each sweep
    losses = {}
    def final_loss(spec):
        return losses.get(spec)
    phases, best_adam, best_sophia, best_muon = study.plan(gpu, final_loss)
    assert [phase.count for phase in phases] == [15, 3, 6, 3]
    assert [phase.specs is None for phase in phases] == [False, True, True, True]
    assert phases[0].specs[10:] == [Spec('muon', lr, None, 1337) for lr in gpu.muon_lrs]
    for spec in phases[0].specs:
        losses[spec] = 3.0 if spec.lr == (2e-3 if spec.optimizer == 'muon' else 1e-3) else 4.0
    phases, best_adam, best_sophia, best_muon = study.plan(gpu, final_loss)
    assert best_adam == Spec('adamw', 1e-3, None, 1337) and best_sophia is None
    assert best_muon == Spec('muon', 2e-3, None, 1337) and phases[2].specs is None
    assert phases[1].specs == [Spec('sophiag', 1e-3, rho, 1337) for rho in gpu.rho_sweep]
    for spec in phases[1].specs:
        losses[spec] = 2.5 if spec.rho == 0.1 else 3.5
    phases, best_adam, best_sophia, best_muon = study.plan(gpu, final_loss)
    assert best_sophia == Spec('sophiag', 1e-3, 0.1, 1337)
    assert phases[2].specs == [Spec('adamw', 1e-3, None, 1338), Spec('adamw', 1e-3, None, 1339),
                               Spec('sophiag', 1e-3, 0.1, 1338), Spec('sophiag', 1e-3, 0.1, 1339),
                               Spec('muon', 2e-3, None, 1338), Spec('muon', 2e-3, None, 1339)]
    # the ablation: the same Sophia-G over the same seeds, its Hessian pass on a quarter of the step
    assert phases[3].specs == [Spec('sophiag', 1e-3, 0.1, seed, hess_micro_steps=1) for seed in gpu.seeds]
    assert c['gradient_accumulation_steps'] == 4 * phases[3].specs[0].hess_micro_steps
    # only the ablation sets a Hessian key: the others keep the official schedule (every 10 steps, a full step)
    configs = [study.run_config(gpu, spec, 'out') for phase in phases for spec in phase.specs]
    assert [config.get('hess_micro_steps', 0) for config in configs].count(1) == 3
    assert not any('hess_interval' in config for config in configs)
    # Muon: AdamW's weight decay and schedule, the lr scaling that puts it on AdamW's scale, no rho
    muon = study.run_config(gpu, Spec('muon', 2e-3, None, 1338), 'out')
    assert (muon['weight_decay'], muon['min_lr'], muon['seed'], muon['muon_adjust_lr_fn']) == (
        0.1, 2e-4, 1338, 'match_rms_adamw') and 'rho' not in muon
    assert study.run_command(gpu, Spec('muon', 2e-3, None, 1338), 'out')[1] == os.path.join(ROOT, 'train_muon.py')

def test_gpu_report_without_runs_lists_what_is_missing(tmp_path):
    root = make_root(tmp_path, 'gpu')
    result = check_ok(run_study('--suite=gpu', '--report_only', f'--root={root}'))
    text = section(root, 'gpu')
    assert 'No run has been made yet' in text and '**Missing runs: 27 of 27.**' in text
    for spec in study.plan(study.GPU, lambda spec: None)[0][0].specs:
        assert f'`{study.run_name(study.GPU, spec)}`' in text
    assert '2. rho sweep (0.02, 0.1, 0.2)' in text and 'chosen when phase 1 is complete' in text
    assert '4. ablation: the best Sophia-G with hess_micro_steps=1' in text
    assert ('3. the best AdamW, the best Sophia-G and the best Muon with the other seeds (1338, 1339): 6 runs, '
            'chosen when phases 1 and 2 are complete') in text
    # no numbers are made up, no plot is drawn, and the rest of the README stays as it was
    assert 'final val loss |' not in text and 'Result' not in text and '.png' not in text
    assert not (root / 'assets' / 'study_gpu.png').exists()
    readme = (root / 'README.md').read_text()
    assert readme.startswith('# project\n\nbefore\n\n<!-- study-gpu:begin -->\n') and readme.endswith('<!-- study-gpu:end -->\n\nafter\n')
    assert (root / 'assets' / 'study_gpu.md').read_text() == text[1:-1]
    assert 'wrote assets/study_gpu.md, README.md' in result.stdout
    before = snapshot(root)
    study.report_committed(study.GPU, study.Results(study.GPU, str(root)), str(root))
    assert snapshot(root) == before

@pytest.mark.skipif(torch.cuda.is_available(), reason='with CUDA this would start the GPU study')
def test_gpu_training_needs_cuda(tmp_path):
    root = make_root(tmp_path, 'gpu')
    result = run_study('--suite=gpu', f'--root={root}')
    assert result.returncode != 0 and result.stderr.strip().splitlines() == [
        "error: the gpu suite trains on a CUDA GPU and this machine has none; --report_only makes "
        "the report from the committed logs"]
    assert sorted(os.listdir(root)) == ['README.md']

def test_tiny_study_trains_only_missing_runs_and_rebuilds_its_report(tmp_path, corpus, capsys):
    suite = dataclasses.replace(study.TINY, config=dict(study.TINY.config, dataset=corpus))
    with open(os.path.join(corpus, 'meta.pkl'), 'rb') as f:
        fingerprint = pickle.load(f)['fingerprint']
    root = make_root(tmp_path, 'tiny')
    # phases 1 to 3 as if made earlier: the best are AdamW lr 0.01, Sophia-G lr 0.01, rho 0.05 and
    # Muon lr 0.001
    best_sophia = Spec('sophiag', 1e-2, 0.05, 1)
    for spec, losses in [(Spec('adamw', 1e-3, None, 1), [11, 10.5, 10.4]), (Spec('adamw', 1e-2, None, 1), [11, 9, 8.5]),
                         (Spec('sophiag', 1e-3, 0.05, 1), [11, 10.6, 10.5]), (best_sophia, [11, 9, 8.4]),
                         (Spec('muon', 1e-3, None, 1), [11, 9, 8.3]), (Spec('muon', 1e-2, None, 1), [11, 9, 8.7]),
                         (Spec('sophiag', 1e-2, 0.2, 1), [11, 9, 8.6]), (Spec('adamw', 1e-2, None, 2), [11, 9, 8.6]),
                         (dataclasses.replace(best_sophia, seed=2), [11, 9, 8.5]), (Spec('muon', 1e-3, None, 2), [11, 9, 8.4])]:
        plant(root, suite, spec, losses, tokens_per_s=1000.0, fingerprint=fingerprint)
    planted = snapshot(root)
    args = ['--suite=tiny', f'--root={root}', f'--dataset={corpus}']

    # no run starts that may not end within the time budget: the longest so far took 1 s
    study.train_committed(suite, study.Results(suite, str(root)), max_runs=None, time_budget=0.5)
    assert 'stopping after 0 runs: the next may take 1 s' in capsys.readouterr().out
    assert snapshot(root) == planted

    # phase 4, the ablation, one run at a time: each run's log is committed as soon as it ends
    study.train_committed(suite, study.Results(suite, str(root)), max_runs=1, time_budget=None)
    out = capsys.readouterr().out
    assert out.count('  training ') == 1 and '  training sophiag-lr0.01-rho0.05-hess1 ...' in out
    after_one = snapshot(root)
    assert sorted(set(after_one) - set(planted)) == ['study/tiny/sophiag-lr0.01-rho0.05-hess1.json',
                                                     'study/tiny/sophiag-lr0.01-rho0.05-hess1.jsonl']
    assert all(after_one[name] == planted[name] for name in planted)
    record = json.loads(after_one['study/tiny/sophiag-lr0.01-rho0.05-hess1.json'])
    assert record['status'] == 'finished' and record['device'].startswith('CPU') and record['torch']
    assert record['corpus']['fingerprint'] == fingerprint and record['wall_seconds'] > 0 and record['date']
    assert record['command'].startswith('python train_sophiag.py ') and '--hess_micro_steps=1' in record['command']

    study.train_committed(suite, study.Results(suite, str(root)), max_runs=None, time_budget=None)
    out = capsys.readouterr().out
    assert out.count('  training ') == 1 and '  training sophiag-lr0.01-rho0.05-seed2-hess1 ...' in out
    assert 'every run of the study is done' in out
    for name, seed in (('sophiag-lr0.01-rho0.05-hess1', 1), ('sophiag-lr0.01-rho0.05-seed2-hess1', 2)):
        with open(root / 'study' / 'tiny' / f'{name}.jsonl') as f:
            config = next(json.loads(line) for line in f if '"kind": "config"' in line)['config']
        # the Hessian pass on a quarter of the step's micro-batches, all else as the best Sophia-G
        assert config['hess_micro_steps'] == config['gradient_accumulation_steps'] // 4 == 1
        assert (config['seed'], config['rho'], config['learning_rate'], config['hess_interval']) == (seed, 0.05, 1e-2, 10)

    # the script on a complete study trains nothing more; its report comes out the same, byte for byte
    logs = snapshot(root)
    result = check_ok(run_study(*args))
    assert '  training ' not in result.stdout and 'every run of the study is done' in result.stdout
    done = snapshot(root)
    assert all(done[name] == logs[name] for name in logs if name.startswith('study'))
    text = section(root, 'tiny')
    assert 'Missing runs' not in text and '**Result.**' in text and 'Ablation' in text
    assert f'fingerprint {fingerprint[:16]}' in text and '| 2 | 8.6000 | 8.5000 |' in text
    assert '| 2 | 8.6000 | 8.4000 |' in text and 'the best Muon (lr 0.001)' in text
    assert done['assets/study_tiny.png'].startswith(b'\x89PNG')
    check_ok(run_study('--suite=tiny', '--report_only', f'--root={root}'))  # no --dataset: the logs suffice
    assert snapshot(root) == done

def test_report_numbers_from_planted_logs(tmp_path):
    """A complete tiny study with known crossings: tokens per step 128, evals at 0, 1280, 2560 tokens."""
    suite = study.TINY
    root = make_root(tmp_path, 'tiny')
    best_sophia = Spec('sophiag', 1e-2, 0.05, 1)
    plant(root, suite, Spec('adamw', 1e-3, None, 1), [11, 10.8], 1000.0, status='diverged')
    plant(root, suite, Spec('adamw', 1e-2, None, 1), [10, 5.0, 3.0], 1000.0)
    plant(root, suite, Spec('adamw', 1e-2, None, 2), [10, 5.2, 3.2], 1000.0)
    plant(root, suite, Spec('sophiag', 1e-3, 0.05, 1), [10, 6.0, 4.0], 900.0)
    plant(root, suite, best_sophia, [10, 3.5, 2.5], 900.0)  # crosses 3.0 at 1920 tokens: 0.75 of AdamW's
    plant(root, suite, dataclasses.replace(best_sophia, seed=2), [10, 3.5, 2.5], 900.0)  # 3.2 at 1664: 0.65
    plant(root, suite, dataclasses.replace(best_sophia, rho=0.2), [10, 4.0, 2.9], 900.0)
    for seed in (1, 2):
        plant(root, suite, dataclasses.replace(best_sophia, seed=seed, hess_micro_steps=1), [10, 3.6, 2.6], 990.0,
              win_rate=0.1)
    best_muon = Spec('muon', 1e-2, None, 1)
    plant(root, suite, Spec('muon', 1e-3, None, 1), [10, 6.0, 4.5], 1100.0)
    plant(root, suite, best_muon, [10, 4.2, 2.2], 1100.0)  # crosses 3.0 at 2048 tokens: 0.80 of AdamW's
    plant(root, suite, dataclasses.replace(best_muon, seed=2), [10, 4.2, 2.4], 1100.0)  # 3.2 at 1991: 0.78
    study.report_committed(suite, study.Results(suite, str(root)), str(root))
    text = section(root, 'tiny')
    assert 'Missing runs' not in text
    assert '| 1 | 3.0000 | 2.5000 | 1,920 | 0.75 | 2 s | 0.83 |' in text  # 1920 / 900 s against 2560 / 1000 s
    assert '| 2 | 3.2000 | 2.5000 | 1,664 | 0.65 | 2 s | 0.72 |' in text
    assert ("In 2 of 2 seeds Sophia-G reached AdamW's final val loss, with 0.70 (range 0.65 to 0.75) × AdamW's "
            "tokens and 0.78 (range 0.72 to 0.83) × its seconds.") in text
    assert 'Sophia-G minus AdamW: -0.6000 (range -0.7000 to -0.5000)' in text
    # Muon against the same targets: 2048 / 1100 s and 1991 / 1100 s against AdamW's 2560 / 1000 s
    assert 'Best AdamW (lr 0.01) against the best Muon (lr 0.01), per seed' in text
    assert '| 1 | 3.0000 | 2.2000 | 2,048 | 0.80 | 2 s | 0.73 |' in text
    assert '| 2 | 3.2000 | 2.4000 | 1,991 | 0.78 | 2 s | 0.71 |' in text
    assert ("In 2 of 2 seeds Muon reached AdamW's final val loss, with 0.79 (range 0.78 to 0.80) × AdamW's "
            "tokens and 0.72 (range 0.71 to 0.73) × its seconds. Final val loss, Muon minus AdamW: -0.8000.") in text
    # mean final val loss: AdamW 3.1, Sophia-G 2.5, Muon 2.3
    assert ("Sophia-G against both: its mean final val loss over two seeds is 2.5000, AdamW's 3.1000 and Muon's "
            "2.3000: between them, ahead of AdamW and behind Muon (-0.6000 against AdamW, +0.2000 against Muon).") in text
    assert "Muon 1,100 (1.100 of AdamW's)" in text
    assert '| muon-lr0.01 | muon | 0.01 | — | 2.2000 **(best)** | 1,100 |' in text
    assert '| muon-lr0.001 | muon | 0.001 | — | 4.5000 | 1,100 |' in text and text.count('**(best)**') == 3
    assert "muon's best learning rate (0.01) is the largest of its sweep" in text
    assert '| 1 | 2.5000 | 2.6000 | +0.1000 | 900 | 990 |' in text
    assert "changed Sophia-G's final val loss by +0.1000, and its tokens/s by ×1.100" in text
    assert "AdamW 1,000, Sophia-G 900 (0.900 of AdamW's" in text and 'hess_micro_steps=1 990 (0.990' in text
    assert 'Sophia-G 0.200 / 0.200 / 0.200 / 0.200' in text and 'hess_micro_steps=1 0.100 / 0.100' in text
    assert '| adamw-lr0.001 | adamw | 0.001 | — | diverged | 1,000 |' in text  # diverged is never the best
    assert '| adamw-lr0.01 | adamw | 0.01 | — | 3.0000 **(best)** |' in text
    assert 'CPU (planted) with torch 0.0, 2026-01-02' in text
    # with the ablation's logs gone, its runs are listed by name: phases 1 and 2 have chosen them
    for seed in (1, 2):
        for extension in ('.json', '.jsonl'):
            os.remove(root / 'study' / 'tiny' / (study.run_name(suite, dataclasses.replace(
                best_sophia, seed=seed, hess_micro_steps=1)) + extension))
    study.report_committed(suite, study.Results(suite, str(root)), str(root))
    text = section(root, 'tiny')
    assert ('**Missing runs: 2 of 12.**' in text and '4. ablation: the best Sophia-G with hess_micro_steps=1 (a quarter '
            'of the 4 micro-batches of a step), seeds 1, 2: 2 of 2 missing: `sophiag-lr0.01-rho0.05-hess1`, '
            '`sophiag-lr0.01-rho0.05-seed2-hess1`') in text
    assert '3. the best AdamW, the best Sophia-G and the best Muon with the other seeds (2): all 3 done' in text
    # Muon's other seed gone: phase 3 lists it by name, its table and the standing wait for it
    for extension in ('.json', '.jsonl'):
        os.remove(root / 'study' / 'tiny' / (study.run_name(suite, dataclasses.replace(best_muon, seed=2)) + extension))
    study.report_committed(suite, study.Results(suite, str(root)), str(root))
    text = section(root, 'tiny')
    assert ('3. the best AdamW, the best Sophia-G and the best Muon with the other seeds (2): 1 of 3 missing: '
            '`muon-lr0.01-seed2`') in text
    assert '| 2 | 3.2000 | 2.4000 |' not in text and 'In 1 of 1 seeds so far Muon reached' in text
    assert 'its mean final val loss over one seed is 2.5000, AdamW\'s 3.0000' in text

@pytest.mark.parametrize('mix', ['settings', 'corpus'])
def test_report_refuses_runs_that_do_not_belong_together(tmp_path, mix):
    suite = study.TINY
    root = make_root(tmp_path, 'tiny')
    plant(root, suite, Spec('adamw', 1e-3, None, 1), [10, 5, 4], 1000.0)
    other = dataclasses.replace(suite, config=dict(suite.config, n_embd=32)) if mix == 'settings' else suite
    plant(root, other, Spec('adamw', 1e-2, None, 1), [10, 5, 4], 1000.0,
          fingerprint='e' * 64 if mix == 'corpus' else 'f' * 64)
    with pytest.raises(SystemExit) as info:
        study.report_committed(suite, study.Results(suite, str(root)), str(root))
    message = str(info.value)
    assert message.startswith('error: ') and '\n' not in message
    assert ('adamw-lr0.01.jsonl was made with n_embd=32 (the suite now sets 16)' in message if mix == 'settings'
            else 'different corpora' in message and 'eeeeeeee' in message)

# -----------------------------------------------------------------------------
# the cpu suite's report, from planted out_dirs (its real runs take an hour)

def plant_cpu_run(root, spec, final, seconds_per_iter, win_rate=None):
    """An out_dir of the cpu suite under root/out-study, as a finished run leaves its metrics.jsonl:
    val loss falling in a straight line from 4.0 at iteration 0 to `final` at 800 (so the crossing
    of any loss in between is exact under linear interpolation), training time proportional to
    iterations, Sophia-G's win rate climbing to `win_rate` at the last train row."""
    c = study.CPU.config
    name = study.run_name(study.CPU, spec)
    rows = [dict(kind='config', run_name=name, optimizer=spec.optimizer, iter=0,
                 config=study.run_config(study.CPU, spec, out_dir=f'out-study/{name}'))]
    for it in range(0, c['max_iters'] + 1, c['eval_interval']):
        loss = 4.0 - (4.0 - final) * it / c['max_iters']
        rows.append({'kind': 'eval', 'iter': it, 'time': it * seconds_per_iter, 'train/loss': loss, 'val/loss': loss})
    for it in range(c['log_interval'], c['max_iters'] + 1, c['log_interval']):
        row = dict(kind='train', iter=it, time=it * seconds_per_iter, loss=4.0 - (4.0 - final) * it / c['max_iters'])
        if spec.optimizer == 'sophiag':
            row['train/win_rate'] = win_rate * it / c['max_iters']
        rows.append(row)
    folder = root / 'out-study' / name
    folder.mkdir(parents=True)
    (folder / 'metrics.jsonl').write_text(''.join(json.dumps(row) + '\n' for row in rows))

def test_cpu_report_from_finished_runs(tmp_path, monkeypatch, capsys):
    """The cpu study's 26 runs planted with known losses: AdamW's best learning rate is the
    largest of its sweep (a note says so), Sophia-G's best is rho 0.2 from the rho sweep, Muon's
    best 0.004; per seed Sophia-G reaches AdamW's final loss at 768 and 777 iterations and not at
    all with seed 1339, Muon at 784 and 787 and not with seed 1339."""
    root = tmp_path / 'repo'
    root.mkdir()
    (root / 'README.md').write_text("# project\n\n<!-- study:begin -->\nstale\n<!-- study:end -->\n\nafter\n")
    adam = dict(zip(study.CPU.adam_lrs, (2.0, 1.9, 1.8, 1.7, 1.6)))
    sophia = dict(zip(study.CPU.sophia_lrs, (2.1, 1.9, 1.7, 1.75, 1.8, 2.0)))
    for lr, final in adam.items():
        plant_cpu_run(root, Spec('adamw', lr, None, 1337), final, 0.5)
    for lr, final in sophia.items():
        plant_cpu_run(root, Spec('sophiag', lr, 0.05, 1337), final, 0.55, win_rate=0.2)
    for rho, final in zip(study.CPU.rho_sweep, (1.72, 1.5, 1.65)):
        plant_cpu_run(root, Spec('sophiag', 5e-4, rho, 1337), final, 0.55, win_rate=0.03)
    for lr, final in zip(study.CPU.muon_lrs, (1.9, 1.7, 1.55, 1.65, 1.8, 1.85), strict=True):
        plant_cpu_run(root, Spec('muon', lr, None, 1337), final, 0.6)
    for seed, adam_final, sophia_final, win_rate, muon_final in ((1338, 1.62, 1.55, 0.05, 1.58),
                                                                 (1339, 1.58, 1.65, 0.04, 1.6)):
        plant_cpu_run(root, Spec('adamw', 1.6e-2, None, seed), adam_final, 0.5)
        plant_cpu_run(root, Spec('sophiag', 5e-4, 0.2, seed), sophia_final, 0.55, win_rate=win_rate)
        plant_cpu_run(root, Spec('muon', 4e-3, None, seed), muon_final, 0.6)

    result = check_ok(run_study('--report_only', f'--root={root}'))
    readme = (root / 'README.md').read_text()
    assert readme.startswith('# project\n\n<!-- study:begin -->\n') and readme.endswith('<!-- study:end -->\n\nafter\n')
    text = readme.split('<!-- study:begin -->\n')[1].split('\n<!-- study:end -->')[0]
    assert (root / 'assets' / 'study.md').read_text() == text
    for plot in ('study_val_loss.png', 'study_train_loss.png'):
        assert (root / 'assets' / plot).read_bytes().startswith(b'\x89PNG') and f'assets/{plot}' in result.stdout
    # 7 x 400 s of AdamW, 11 x 440 s of Sophia-G and 8 x 480 s of Muon over the 26 runs: 191 minutes
    assert '191 minutes of training summed over the runs, two at\na time' in text
    assert '4 layers, 4 heads, 128 wide, 64-character\ncontext, 32 sequences per step (2,048 tokens)' in text
    assert 'Sophia-G did not reach AdamW\'s final val loss within 800 iterations in 1 of 3 seeds; where it did, ' \
           'the speed-up was 1.04×, 1.03×.' in text
    assert ('win rate (fraction of coordinates not clipped) of 0.030–0.050' in text
            and '1 − 0.99^80 = 55%' in text)
    # the sweeps: every run of phases 1 and 2 with its final loss, the two best marked
    assert '| adamw | 0.016 | — | 1.6000 **(best)** |' in text and '| adamw | 0.008 | — | 1.7000 |' in text
    assert '| sophiag | 0.0005 | 0.05 | 1.7000 |' in text and '| sophiag | 0.0005 | 0.2 | 1.5000 **(best)** |' in text
    assert '| muon | 0.004 | — | 1.5500 **(best)** |' in text and '| muon | 0.016 | — | 1.8000 |' in text
    assert text.count('**(best)**') == 3 and text.count('\n| sophiag | ') == 6 + 3 and text.count('\n| muon | ') == 6
    assert ("Note: adamw's best learning rate (0.016) is the largest of its sweep: the optimum may lie beyond "
            "it.") in text
    assert 'Best AdamW (lr 0.016) and best Sophia-G (lr 0.0005, rho 0.2) over three seeds' in text
    # per seed: AdamW's final loss the target; iterations to it by interpolation, their speed-up,
    # and seconds (0.55 s an iteration) against AdamW's 400
    assert '| 1337 | 1.6000 | 1.5000 | 768 | 1.04× | 1.06 |' in text
    assert '| 1338 | 1.6200 | 1.5500 | 777 | 1.03× | 1.07 |' in text
    assert '| 1339 | 1.5800 | 1.6500 | — | — | — |' in text
    # Muon the same way, 0.6 s an iteration: 783.7 iterations and 470 s to AdamW's 1.6000 in 400 s
    assert 'Best AdamW (lr 0.016) and best Muon (lr 0.004) over three seeds' in text
    assert '| 1337 | 1.6000 | 1.5500 | 784 | 1.02× | 1.18 | 470 s of AdamW\'s 400 s |' in text
    assert '| 1338 | 1.6200 | 1.5800 | 787 | 1.02× | 1.18 | 472 s of AdamW\'s 400 s |' in text
    assert '| 1339 | 1.5800 | 1.6000 | — | — | — | — |' in text
    assert ("Muon did not reach AdamW's final val loss within 800 iterations in 1 of 3 seeds; where it did, "
            "the speed-up was 1.02×, 1.02×.") in text
    # mean final val loss: AdamW 1.6000, Sophia-G 1.5667, Muon 1.5767
    assert ("Sophia-G against both: its mean final val loss over three seeds is 1.5667, AdamW's 1.6000 and "
            "Muon's 1.5767: ahead of both (-0.0333 against AdamW, -0.0100 against Muon).") in text
    # 800 x 2,048 tokens over 400, 440 and 480 s
    assert ("AdamW 4,096 tokens/s, Sophia-G 3,724 (0.909 of AdamW's), Muon 3,413 (0.833 of AdamW's)."
            in text)
    assert 'trained for 1.6M\ntokens' in text

    # every seed reaching the target: the verdict gives the mean speed-up and its range
    (root / 'out-study' / 'sophiag-lr0.0005-rho0.2-seed1339').joinpath('metrics.jsonl').unlink()
    (root / 'out-study' / 'sophiag-lr0.0005-rho0.2-seed1339').rmdir()
    plant_cpu_run(root, Spec('sophiag', 5e-4, 0.2, 1339), 1.45, 0.55, win_rate=0.04)
    monkeypatch.setattr(sys, 'argv', ['study.py', '--report_only', f'--root={root}', '--jobs=3'])
    study.main()
    text = (root / 'assets' / 'study.md').read_text()
    assert 'summed over the runs, three at\na time' in text
    assert '| 1339 | 1.5800 | 1.4500 | 759 | 1.05× | 1.04 |' in text  # 759.2 iterations, 417.6 s
    assert ("Sophia-G reached AdamW's final val loss in 768 of 800 iterations on average: a speed-up of "
            "1.04× in steps (range 1.03–1.05× over 3 seeds).") in text

    # a run missing: the report is refused, the README kept, and --dry_run says what is left to run
    (root / 'out-study' / 'adamw-lr0.016-seed1339' / 'metrics.jsonl').unlink()
    readme = (root / 'README.md').read_bytes()
    result = run_study('--report_only', f'--root={root}')
    assert result.returncode != 0 and result.stderr.strip().splitlines() == [
        f"error: phase 3 of the study is not finished (1 runs missing in {root / 'out-study'}); run python study.py"]
    assert (root / 'README.md').read_bytes() == readme
    capsys.readouterr()
    monkeypatch.setattr(sys, 'argv', ['study.py', '--dry_run', f'--root={root}'])
    study.main()
    plan = capsys.readouterr().out
    assert plan.count('   done    ') == 25 and plan.count('   to run  ') == 1
    to_run = next(line for line in plan.splitlines() if line.startswith('   to run  '))
    assert to_run.startswith('   to run  python train_adam.py ') and '--learning_rate=0.016' in to_run
    assert '--seed=1339' in to_run and f"--out_dir={root / 'out-study' / 'adamw-lr0.016-seed1339'}" in to_run
