"""
One prepared check for a lent GPU: everything this repository has to measure on a CUDA machine,
in one call, written under one output folder; and a second command that turns that output into
the GPU tables of docs/throughput.md and the GPU study's committed records, on any machine.

A lent GPU comes with little device time (15 minutes per task, the machine's start included, at
most 10 minutes a command) and no network. So the check is one script with a budget: its stages
run in this order, each a subprocess with its own time cap and no longer than what is left of
--budget; a stage that fails or runs out of time is recorded, and the next one runs.

  env        the device, the versions, and the two ceilings measured: a bf16 matrix product's
             FLOP/s and a device-to-device copy's bytes/s, beside the datasheet peak MFU uses
  data       data/stdlib/prepare.py: the Python standard library in GPT-2 BPE (seconds)
  tests      the CUDA tests: pytest -k cuda over the test files that skip without CUDA
  optimizer  bench_optimizer.py: the optimizer step alone, every SophiaG path against fused AdamW
  e2e        bench.py --end_to_end on GPT-2 small, bf16, compiled: nanoGPT's train.py,
             train_adam.py, train_sophiag.py and train_muon.py on the same GPU, data and batch
             (tokens/s, MFU, Sophia-G / AdamW against its arithmetic ceiling)
  memory     bench_memory.py on one GPU: peak allocated, GPT-2 small and XL (the largest of
             bench_memory.py's, 1.5B), both optimizers, DDP and FSDP on one process
  split      bench.py in one process with --profile=True: forward+backward, each optimizer's step
             and the Hessian pass timed apart, and the top ops of each under torch.profiler
  study      python study.py --suite=gpu --time_budget=<what is left>: the missing runs

Each benchmark writes its JSON as it goes, so a stage cut at its cap keeps what it measured.

The layout, built in --work and packed after every stage into OUT/gpu-check.tar.gz, with the
tables so far in OUT/summary.md (two files: the device tool brings back at most eight):

  gpu-check/manifest.json   mode, date, commit, and per stage: status, seconds, cap, commands
  gpu-check/env.json        device, versions, measured ceilings, datasheet peak
  gpu-check/<stage>.log     each stage's output
  gpu-check/e2e.json, split.json, optimizer.json, memory.json   what bench*.py wrote (--json)
  gpu-check/study/<suite>/  the study runs committed during the call (study.py's records)

Before a GPU is lent, once, here (with network): copy what the machine cannot fetch into the
ignored folder .gpu_check/ (the GPT-2 ranks, nanoGPT's train.py, model.py and configurator.py
from a checkout or a bare git repository; never commit nanoGPT's code):

    $ python gpu_check.py --prepare --nanogpt=/path/to/nanoGPT

The call, through the device tool (budget 330 s, so that a rerun still fits in the 15 minutes):

    run(command="python3 gpu_check.py --out=$OUT", carry=[".gpu_check"], timeout_s=390)

Then, on any machine, no GPU needed: the tables (printed, for "On a GPU" in docs/throughput.md)
and the study's new records copied into study/gpu/ (then `python study.py --suite=gpu --report_only`):

    $ python gpu_check.py --report=PATH/gpu-check.tar.gz

The GPU study needs about 4 minutes a run, more than this budget leaves after the benchmarks:
a call with nothing else to do gives it a whole budget
(`python3 gpu_check.py --out=$OUT --stages=study --budget=540`, timeout_s=600).

Without CUDA (--tiny=True), the same stages run through the same code at toy size on the CPU
(one to two minutes on 2 cores), into the same layout: what the tests run
(tests/test_gpu_check.py), and what the committed example tests/gpu_check_example/ was made with.
"""

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.abspath(__file__))
CARRY = os.path.join(ROOT, '.gpu_check')  # what travels to the machine (carry), ignored by git
NANOGPT_FILES = ('train.py', 'model.py', 'configurator.py')
WHISPER_SDIST = 'openai-whisper==20250625'  # ships whisper/assets/gpt2.tiktoken (tokenizer.py)
LAYOUT = 'gpu-check'  # the folder inside --work and inside the tarball
TARBALL = 'gpu-check.tar.gz'

@dataclass
class Stage:
    name: str
    cap: float  # seconds at most
    min_left: float  # not started with less than this left of the budget: it could not finish
    commands: list  # run in order; the stage fails at the first that fails
    what: str = ''  # one line for the summary

# -----------------------------------------------------------------------------
# the stages

def test_files():
    """The test files with tests that skip without CUDA."""
    tests = os.path.join(ROOT, 'tests')
    found = []
    for name in sorted(os.listdir(tests)):
        if name.startswith('test_') and name.endswith('.py'):
            with open(os.path.join(tests, name)) as f:
                if re.search(r'skipif\(\s*not torch\.cuda\.is_available\(\)', f.read()):
                    found.append(os.path.join('tests', name))
    return found

def plan_stages(tiny, work, layout, nanogpt, budget):
    """The stages of a GPU check, or of its toy CPU mode: the same commands at toy sizes."""
    py = sys.executable
    stdlib = os.path.join(work, 'data', 'stdlib')
    if tiny:
        # the quick start's size, on the CPU; a short block keeps nanoGPT's position table small
        model = ['--device=cpu', '--dtype=float32', '--compile=False', '--n_layer=1', '--n_head=2',
                 '--n_embd=16', '--block_size=16', '--batch_size=2', '--total_bs=4',
                 '--hess_interval=2']
        e2e_iters = ['--bench_iters=2', '--bench_warmup=2']
        split_iters = ['--bench_iters=2', '--bench_warmup=1']
        optimizer = ['--device=cpu', '--n_layer=1', '--n_embd=16', '--repeats=2', '--runs=1']
        # torchrun and its process take 10 s here: one run, the sharded one
        memory = ['--device=cpu', '--models=tiny', '--optimizers=sophiag', '--parallel=fsdp']
        optimizers = 'adamw,sophiag'
        study_suite = 'tiny'
    else:
        # GPT-2 small with the official micro-batch of 12 x 1024 tokens, 4 micro-batches an
        # iteration (49,152 tokens), bf16 autocast, compiled
        model = ['config/train_gpt2_small_sophiag.py', '--device=cuda', '--dtype=bfloat16',
                 '--compile=True', '--total_bs=48']
        e2e_iters = ['--bench_iters=50', '--bench_warmup=20']
        split_iters = ['--bench_iters=20', '--bench_warmup=10']
        optimizer = ['--device=cuda', '--repeats=50']
        memory = ['--device=cuda', '--models=gpt2,gpt2-xl', '--dtype=bfloat16']
        optimizers = 'adamw,sophiag,muon'
        study_suite = 'gpu'
    # nanoGPT's model: the exact GELU and no attention scaling by layer; every script gets the same
    same_model = ['--gelu=exact', '--scale_attn_by_inverse_layer_idx=False', f'--dataset={stdlib}']
    study = [py, 'study.py', f'--suite={study_suite}', f'--root={os.path.join(work, "study-root")}']
    study_commands = [study]
    if tiny:  # a corpus of one stdlib package; the gpu suite's study.py prepares data/python_code
        corpus = os.path.join(work, 'data', 'python_code')
        package = os.path.join(stdlib_folder(), 'email')
        study_commands.insert(0, [py, 'data/python_code/prepare.py', f'--out_dir={corpus}',
                                  '--num_proc=1', '--roots', package])
        study += [f'--dataset={corpus}', '--max_runs=1']
    env = [py, os.path.abspath(__file__), f'--probe={os.path.join(layout, "env.json")}']
    tests = [py, '-m', 'pytest', '-q', '-rs', '-p', 'no:cacheprovider', '-k', 'cuda'] + test_files()
    e2e = [py, 'bench.py'] + model + same_model + e2e_iters + [
        '--end_to_end=True', f'--optimizers={optimizers}', '--bench_rounds=1',
        f'--json_out={os.path.join(layout, "e2e.json")}']
    e2e += [f'--nanogpt={nanogpt}'] if nanogpt else []
    split = [py, 'bench.py'] + model + same_model + split_iters + [
        f'--optimizers={optimizers}', '--bench_rounds=2', '--profile=True',
        f'--out_dir={os.path.join(work, "split")}',
        f'--json_out={os.path.join(layout, "split.json")}']
    stages = [
        Stage('env', 60, 5, [env + (['--tiny=True'] if tiny else [])],
              'device, versions, the measured ceilings'),
        Stage('data', 90, 10, [[py, 'data/stdlib/prepare.py', f'--out_dir={stdlib}']],
              'the stdlib in GPT-2 BPE'),
        Stage('tests', 120, 20, [tests], 'the CUDA tests'),
        Stage('optimizer', 60, 10, [[py, 'bench_optimizer.py'] + optimizer
                                    + [f'--json={os.path.join(layout, "optimizer.json")}']],
              'the optimizer step alone'),
        # compilation takes most of it, once per program; the scripts of this repository share
        # the model, so inductor's cache spares the later ones part of theirs
        Stage('e2e', 240, 60, [e2e], 'the training scripts end to end'),
        Stage('memory', 150, 20, [[py, 'bench_memory.py', '--nproc=1'] + memory
                                  + [f'--json={os.path.join(layout, "memory.json")}']],
              'peak memory, DDP and FSDP'),
        Stage('split', 150, 40, [split], 'the in-process split and profile'),
        # about 4 minutes a GPU run (study.py): with less left, a run would be cut off
        Stage('study', budget, 270, study_commands, 'the missing study runs'),
    ]
    if tiny:  # the minimums are a GPU's; at toy size every stage runs, however busy the CPU
        for stage in stages:
            stage.min_left = 1
    return stages

def stdlib_folder():
    import sysconfig
    return sysconfig.get_paths()['stdlib']

def run_stage(stage, seconds, log_path):
    """Run the stage's commands, output to log_path; the whole process group is ended at
    `seconds`. Returns the status: 'ok', 'failed (exit N)' or 'timed out'."""
    deadline = time.time() + seconds
    with open(log_path, 'w') as log:
        for command in stage.commands:
            log.write(f"$ {' '.join(shown(part) for part in command)}\n")
            log.flush()
            env = dict(os.environ, PYTHONUNBUFFERED='1', WANDB_MODE='disabled')
            if command[1:2] == ['study.py']:  # its own budget: start no run it cannot end in time
                command = command + [f'--time_budget={max(1, int(deadline - time.time()) - 10)}']
            # a session of its own, so that the stage and every process it started end together
            proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                    env=env, start_new_session=True)
            try:
                status = proc.wait(timeout=max(1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                end_group(proc)
                log.write(f"\n[gpu_check: stopped at the stage's cap of {seconds:.0f} s]\n")
                return 'timed out'
            if status != 0:
                return f'failed (exit {status})'
    return 'ok'

def end_group(proc):
    """SIGTERM to the process group (the training scripts stop cleanly on it), SIGKILL after
    15 s."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue

def probe(path, tiny):
    """env.json: the device and versions, and its two ceilings measured (METHOD.md): a bf16
    matrix product on random data and a device-to-device copy, each the median of timed runs."""
    import statistics
    import torch
    from model import device_peak_flops
    cuda = torch.cuda.is_available() and not tiny
    device = 'cuda' if cuda else 'cpu'
    info = dict(torch=torch.__version__, python=sys.version.split()[0], cuda=torch.version.cuda,
                device=torch.cuda.get_device_name(0) if cuda else f'CPU ({os.cpu_count()} cores)')
    try:
        import triton
        info['triton'] = triton.__version__
    except ImportError:
        info['triton'] = None
    if cuda:
        props = torch.cuda.get_device_properties(0)
        smi = subprocess.run(['nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader'],
                             capture_output=True, text=True)
        info.update(memory_gib=props.total_memory / 2 ** 30, driver=smi.stdout.strip() or None,
                    multiprocessors=props.multi_processor_count)
    info['peak_flops_datasheet'] = device_peak_flops(device, 'bfloat16')

    def median_seconds(fn, repeats):
        times = []
        for i in range(repeats + 2):  # two untimed first
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            if i >= 2:
                times.append(time.perf_counter() - start)
        return statistics.median(times)

    n = 256 if tiny else 8192
    dtype = torch.float32 if tiny else torch.bfloat16  # bf16 products are slow on most CPUs
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    info['matmul'] = dict(n=n, dtype=str(dtype),
                          flops_per_s=2 * n ** 3 / median_seconds(lambda: a @ b, 10))
    values = (1 << 20) if tiny else (1 << 30)  # 2 GiB of bf16 each way on a GPU: far past the L2
    src = torch.randn(values, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    moved = 2 * src.numel() * 2  # bytes read plus written
    info['copy'] = dict(bytes=moved, bytes_per_s=moved / median_seconds(lambda: dst.copy_(src), 10))
    with open(path, 'w') as f:
        json.dump(info, f, indent=1)
    print(json.dumps(info, indent=1))

def git_commit():
    """HEAD, and whether tracked files differ from it; None where there is no git or no .git (a
    copy of the working tree): then the code fingerprint says which code ran."""
    try:
        result = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=ROOT, capture_output=True,
                                text=True)
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
    except FileNotFoundError:
        return None
    commit = result.stdout.strip() if result.returncode == 0 else ''
    return (commit + (' (with uncommitted changes)' if dirty else '')) if commit else None

def code_fingerprint():
    """sha256 of the code that runs (the top-level modules and scripts, the configs, the data
    scripts), names and bytes: the same on any copy of the same tree, git or not."""
    import glob
    import hashlib
    digest = hashlib.sha256()
    for pattern in ('*.py', 'config/*.py', 'data/*/prepare.py'):
        for path in sorted(glob.glob(os.path.join(ROOT, pattern))):
            with open(path, 'rb') as f:
                digest.update(os.path.relpath(path, ROOT).encode() + b'\0' + f.read() + b'\0')
    return digest.hexdigest()[:16]

def pack(work, out):
    """OUT/gpu-check.tar.gz of the layout and OUT/summary.md of its tables, each written whole
    and renamed: a call cut off meanwhile still brings back the previous ones."""
    os.makedirs(out, exist_ok=True)
    tmp = os.path.join(out, TARBALL + '.tmp')
    with tarfile.open(tmp, 'w:gz') as tar:
        tar.add(os.path.join(work, LAYOUT), arcname=LAYOUT)
    os.replace(tmp, os.path.join(out, TARBALL))
    with open(os.path.join(out, 'summary.md.tmp'), 'w') as f:
        f.write(tables(os.path.join(work, LAYOUT)))
    os.replace(os.path.join(out, 'summary.md.tmp'), os.path.join(out, 'summary.md'))

def check(args):
    started = time.time()
    tiny = args.tiny
    import torch
    if not tiny and not torch.cuda.is_available():
        fail("this machine has no CUDA GPU: run the check on a lent GPU, or its CPU mode with "
             "--tiny=True")
    work = os.path.abspath(args.work)
    layout = os.path.join(work, LAYOUT)
    ranks = os.environ.get('GPT2_RANKS_FILE') or os.path.join(CARRY, 'gpt2.tiktoken')
    if os.path.isfile(ranks):
        os.environ['GPT2_RANKS_FILE'] = ranks
    nanogpt = args.nanogpt if args.nanogpt is not None else \
        (os.path.join(CARRY, 'nanogpt') if os.path.isdir(os.path.join(CARRY, 'nanogpt')) else '')
    stages = plan_stages(tiny, work, layout, os.path.abspath(nanogpt) if nanogpt else '',
                         args.budget)
    names = [stage.name for stage in stages]
    wanted = [name.strip() for name in args.stages.split(',')] if args.stages else names
    unknown = [name for name in wanted if name not in names]
    if unknown:
        fail(f"--stages: {unknown[0]!r} is not a stage; the stages: {', '.join(names)}")
    if os.path.exists(layout):
        shutil.rmtree(layout)  # a check is made whole: nothing of an earlier one mixes in
    os.makedirs(layout)
    study_root = os.path.join(work, 'study-root', 'study')
    suite = 'tiny' if tiny else 'gpu'
    if 'study' in wanted:  # the study continues from the runs committed so far
        shutil.rmtree(os.path.join(work, 'study-root'), ignore_errors=True)
        os.makedirs(study_root)
        with open(os.path.join(work, 'study-root', 'README.md'), 'w') as f:  # study.py reports here
            f.write("The study's report of a check; the repository's is rebuilt from the committed "
                    "runs (python study.py --suite=gpu --report_only).\n")
        if os.path.isdir(os.path.join(ROOT, 'study', suite)):
            shutil.copytree(os.path.join(ROOT, 'study', suite), os.path.join(study_root, suite))
    committed_before = set(os.listdir(os.path.join(study_root, suite))) \
        if os.path.isdir(os.path.join(study_root, suite)) else set()
    now = datetime.datetime.now(datetime.timezone.utc)
    manifest = dict(mode='tiny' if tiny else 'gpu', date=now.isoformat(timespec='seconds'),
                    commit=git_commit(), code=code_fingerprint(), budget_s=args.budget,
                    nanogpt=bool(nanogpt),
                    gpt2_ranks=os.path.isfile(ranks), stages=[])
    print(f"gpu_check ({manifest['mode']}): budget {args.budget:.0f} s, stages {', '.join(wanted)}",
          flush=True)
    for stage in stages:
        left = args.budget - (time.time() - started)
        entry = dict(name=stage.name, what=stage.what, cap_s=stage.cap,
                     commands=[' '.join(map(shown, command)) for command in stage.commands])
        if stage.name not in wanted:
            entry.update(status='not asked for', seconds=0)
        elif left < stage.min_left:
            entry.update(status=f'skipped ({left:.0f} s left, it needs {stage.min_left:.0f})',
                         seconds=0)
        else:
            begun = time.time()
            log = os.path.join(layout, f'{stage.name}.log')
            entry['status'] = run_stage(stage, min(stage.cap, left), log)
            entry['seconds'] = round(time.time() - begun, 1)
        runs = os.path.join(study_root, suite)
        if stage.name == 'study' and os.path.isdir(runs):
            new = sorted(set(os.listdir(runs)) - committed_before)
            new = [name for name in new if name.endswith(('.json', '.jsonl'))]
            if new:
                os.makedirs(os.path.join(layout, 'study', suite))
            for name in new:
                shutil.copy(os.path.join(runs, name), os.path.join(layout, 'study', suite, name))
            entry['study_runs'] = sorted(name[:-5] for name in new if name.endswith('.json'))
        manifest['stages'].append(entry)
        manifest['seconds'] = round(time.time() - started, 1)
        with open(os.path.join(layout, 'manifest.json'), 'w') as f:
            json.dump(manifest, f, indent=1)
        pack(work, args.out)
        print(f"{stage.name:10s} {entry['status']:40s} {entry['seconds']:7.1f} s", flush=True)
    print(f"\nwrote {os.path.join(args.out, TARBALL)} and summary.md in "
          f"{time.time() - started:.0f} s\n")
    print(tables(layout))

def shown(part):
    """A command's part as typed in the repository: python, relative paths."""
    return 'python' if part == sys.executable else part.replace(ROOT + os.sep, '')

# -----------------------------------------------------------------------------
# the report: tables from a check's output, on any machine

def read_json(layout, name):
    path = os.path.join(layout, name)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)

def markdown(header, rows):
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    return '\n'.join(lines + ['| ' + ' | '.join(row) + ' |' for row in rows])

def percent(x):
    return '-' if x is None else f'{x:.1%}'

def tables(layout):
    """The GPU tables of docs/throughput.md, in markdown, from a check's layout folder."""
    manifest, env = read_json(layout, 'manifest.json'), read_json(layout, 'env.json')
    if manifest is None:
        return 'no manifest.json: not the output of gpu_check.py\n'
    parts = []
    here = code_fingerprint()
    head = (f"gpu_check.py ({manifest['mode']} mode), {manifest['date']}, commit "
            f"{manifest['commit']}, code {manifest['code']} (this tree's: "
            f"{'the same' if manifest['code'] == here else here})")
    if env:
        peak, matmul, copy = env['peak_flops_datasheet'], env['matmul'], env['copy']
        head += (f"; {env['device']}, PyTorch {env['torch']}, CUDA {env['cuda']}, "
                 f"Triton {env['triton']}, Python {env['python']}; measured: a {matmul['n']}³ "
                 f"{matmul['dtype']} product {matmul['flops_per_s'] / 1e12:.3g} TFLOP/s, a copy "
                 f"{copy['bytes_per_s'] / 1e12:.3g} TB/s (read + written)"
                 + (f"; datasheet bf16 peak {peak / 1e12:.0f} TFLOP/s" if peak else ''))
    parts.append(head + '.')
    parts.append(markdown(['stage', 'what', 'status', 'seconds'],
                          [[s['name'], s['what'], s['status'], f"{s['seconds']:.0f}"]
                           for s in manifest['stages']]))
    measured_peak = env['matmul']['flops_per_s'] if env and manifest['mode'] == 'gpu' else None
    e2e = read_json(layout, 'e2e.json')
    if e2e:
        parts.append(e2e_table(e2e, env['peak_flops_datasheet'] if env else None, measured_peak))
    split = read_json(layout, 'split.json')
    if split:
        parts.append(split_table(split))
    optimizer = read_json(layout, 'optimizer.json')
    if optimizer:
        parts.append(optimizer_table(optimizer))
    memory = read_json(layout, 'memory.json')
    if memory:
        parts.append(memory_table(memory))
    targets = targets_text(e2e, optimizer) if manifest['mode'] == 'gpu' else None
    if targets:
        parts.append(targets)
    tests = os.path.join(layout, 'tests.log')
    if os.path.isfile(tests):
        with open(tests) as f:
            lines = [line.strip() for line in f if line.strip()]
        pattern = re.compile(r'\b(passed|failed|skipped|error)')
        summary = next((line for line in reversed(lines) if pattern.search(line)),
                       'no summary line')
        command = next(s['commands'][0] for s in manifest['stages'] if s['name'] == 'tests')
        parts.append(f"CUDA tests (`{command}`): {summary.strip('= ')}")
    study = [s for s in manifest['stages'] if s['name'] == 'study']
    if study and study[0].get('study_runs') is not None:
        runs = study[0]['study_runs']
        parts.append(f"Study runs committed in this call: {', '.join(runs) if runs else 'none'}.")
    return '\n\n'.join(parts) + '\n'

def mean_tokens_per_s(e2e):
    """Each program's tokens/s over its rounds: the mean of time per token, as bench.py prints."""
    return {label: len(values) / sum(1 / value for value in values)
            for label, values in e2e['tokens_per_s'].items() if values}

def e2e_table(e2e, datasheet, measured_peak):
    """Tokens/s (the mean over rounds of time per token), MFU as the scripts logged it against
    the datasheet peak and rescaled to the measured one, and each script over train_adam.py."""
    mean = mean_tokens_per_s(e2e)
    mfu = {label: sum(v) / len(v) for label, v in e2e['mfu'].items() if v}
    adam, sophia, nano = 'train_adam.py', 'train_sophiag.py', 'nanoGPT train.py'
    if nano in mean and adam in mfu:  # the same model and batch: the same FLOPs per token
        mfu[nano] = mfu[adam] * mean[nano] / mean[adam]
    rows = []
    for label, value in mean.items():
        name = f'`{label}`' if label != nano else 'nanoGPT `train.py`'
        row = [name, f'{value:,.0f}', percent(mfu.get(label))]
        if measured_peak:
            known = label in mfu and datasheet
            row.append(percent(mfu[label] * datasheet / measured_peak) if known else '-')
        row.append(f'{value / mean[adam]:.3f}' if adam in mean else '-')
        rows.append(row)
    header = ['script', 'tokens/s', 'MFU (datasheet peak)'] \
        + (['MFU (measured matmul)'] if measured_peak else []) + ['/ `train_adam.py`']
    text = (f"End to end, {e2e['tokens_per_iter']:,} tokens an iteration, {e2e['dtype']}, compile "
            f"{e2e['compile']}:\n\n" + markdown(header, rows))
    if adam in mean and sophia in mean:
        ratio, ceiling = mean[sophia] / mean[adam], e2e['expected_ratio']
        text += (f"\n\nSophia-G / AdamW: {ratio:.3f}, against the arithmetic's ceiling of "
                 f"{ceiling:.3f} ({ratio / ceiling:.1%} of it).")
    return text

def targets_text(e2e, optimizer):
    """The figures against the targets set for GPT-2 small on an H100/H200: train_adam.py at 45%
    MFU or more, Sophia-G's step at most fused AdamW's, Sophia-G / AdamW within 1% of the ceiling.
    Where one falls short, the split stage's profile (split.log) shows where the time goes."""
    import statistics
    lines = []
    def verdict(met):
        return 'met' if met else 'short: see the top ops in split.log'
    if e2e:
        mean = mean_tokens_per_s(e2e)
        adam_mfu = e2e['mfu'].get('train_adam.py')
        if adam_mfu:
            mfu = sum(adam_mfu) / len(adam_mfu)
            lines.append(f"- `train_adam.py` MFU {mfu:.1%}, target 45% or more: "
                         f"{verdict(mfu >= 0.45)}")
        if 'train_adam.py' in mean and 'train_sophiag.py' in mean:
            ratio = mean['train_sophiag.py'] / mean['train_adam.py'] / e2e['expected_ratio']
            lines.append(f"- Sophia-G / AdamW tokens/s at {ratio:.1%} of the ceiling, target 99% "
                         f"or more: {verdict(ratio >= 0.99)}")
    if optimizer and 'SophiaG default' in optimizer['ms'] and 'AdamW fused' in optimizer['ms']:
        ratio = statistics.median(optimizer['ms']['SophiaG default']) / \
            statistics.median(optimizer['ms']['AdamW fused'])
        lines.append(f"- Sophia-G's step / fused AdamW's {ratio:.2f}, target 1 or less: "
                     f"{verdict(ratio <= 1)}")
    return 'Targets:\n\n' + '\n'.join(lines) if lines else None

def split_table(split):
    rows = [[r['optimizer'], f"{r['forward_backward_ms']:.1f}", f"{r['step_ms']:.2f}",
             '-' if r['hessian_ms_per_iter'] is None else f"{r['hessian_ms_per_iter']:.1f}",
             f"{r['ms_per_iter']:.1f}", f"{r['tokens_per_s']:,.0f}", percent(r['mfu'])]
            for r in split['rows']]
    header = ['optimizer', 'forward+backward', 'step', 'Hessian pass / iteration', 'total',
              'tokens/s', 'MFU']
    return (f"In one process ({split['tokens_per_iter']:,} tokens an iteration, {split['dtype']}, "
            f"compile {split['compile']}), ms per iteration:\n\n" + markdown(header, rows))

def optimizer_table(optimizer):
    import statistics
    median = {name: statistics.median(values) for name, values in optimizer['ms'].items()}
    adam = median.get('AdamW fused')
    rows = [[name, f"{median[name]:.2f} ({min(values):.2f}–{max(values):.2f})",
             f"{median[name] / adam:.2f}" if adam else '-']
            for name, values in optimizer['ms'].items()]
    return (f"The optimizer step alone ({optimizer['device']}, {optimizer['tensors']} tensors, "
            f"{optimizer['values'] / 1e6:.2f}M values; the default SophiaG path: "
            f"{optimizer['default_path']}; median of {optimizer['runs']} runs of "
            f"{optimizer['repeats']} calls):\n\n"
            + markdown(['candidate', 'ms (range)', '/ AdamW fused'], rows))

def memory_table(memory):
    cells = {(row['model'], row['parallel'], row['optimizer']):
             f"{row['peak_mib']:,.0f}" if row['peak_mib'] is not None else row['reason']
             for row in memory['rows']}
    keys = list(dict.fromkeys((row['model'], row['parallel']) for row in memory['rows']))
    rows = [[model, parallel] + [cells.get((model, parallel, name), '-')
                                 for name in ('sophiag', 'adamw')] for model, parallel in keys]
    return (f"Peak memory, MiB ({memory['nproc']} process on {memory['device']}, "
            f"{memory['dtype']}, micro-batches of 1 × {memory['block_size']} tokens):\n\n"
            + markdown(['model', 'parallel', 'Sophia-G', 'AdamW'], rows))

def report(args):
    """Print the tables of a check's output (its tarball or layout folder) and copy the study runs
    it committed into <study_root>/study/<suite>/: new files only, an existing one must be equal."""
    path = args.report
    if not os.path.exists(path):
        fail(f"--report={path} does not exist; give the gpu-check.tar.gz a check wrote, or its "
             f"folder")
    with tempfile.TemporaryDirectory(prefix='gpu-check-report-') as scratch:
        if os.path.isfile(path):
            try:
                with tarfile.open(path) as tar:
                    tar.extractall(scratch, filter='data')
            except tarfile.TarError as e:
                fail(f"--report={path}: not a tarball gpu_check.py wrote ({e})")
            layout = os.path.join(scratch, LAYOUT)
        else:
            layout = path
        if not os.path.isfile(os.path.join(layout, 'manifest.json')):
            fail(f"--report={path}: no manifest.json in it; give the output of gpu_check.py")
        print(tables(layout))
        source = os.path.join(layout, 'study')
        copies = []
        for suite in sorted(os.listdir(source)) if os.path.isdir(source) else []:
            target = os.path.join(args.study_root, 'study', suite)
            for name in sorted(os.listdir(os.path.join(source, suite))):
                src, dst = os.path.join(source, suite, name), os.path.join(target, name)
                if os.path.exists(dst):
                    with open(src, 'rb') as a, open(dst, 'rb') as b:
                        if a.read() != b.read():
                            fail(f"{dst} exists with other contents: the check's run {name} is "
                                 f"not the committed one; remove one of them")
                    continue
                copies.append((suite, src, dst))
        # each log before its record, as study.py writes them: a record means a complete log
        for suite, src, dst in sorted(copies, key=lambda copy: copy[2].endswith('.json')):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy(src, dst)
        for suite in sorted({suite for suite, _, _ in copies}):
            count = sum(1 for copied, _, _ in copies if copied == suite)
            print(f"copied {count} files into study/{suite}/; next: "
                  f"python study.py --suite={suite} --report_only")

# -----------------------------------------------------------------------------
# preparing what travels

def prepare(args):
    """.gpu_check/: the GPT-2 ranks and nanoGPT's three files, for a machine without network."""
    os.makedirs(CARRY, exist_ok=True)
    ranks = os.path.join(CARRY, 'gpt2.tiktoken')
    cached = os.path.expanduser('~/.cache/sophia-gpt2-test/gpt2.tiktoken')  # the tests' copy
    source = os.environ.get('GPT2_RANKS_FILE') or cached
    if os.path.isfile(source):
        shutil.copy(source, ranks)
    else:  # the openai-whisper sdist from PyPI ships them
        with tempfile.TemporaryDirectory() as scratch:
            result = subprocess.run([sys.executable, '-m', 'pip', 'download', '--no-deps',
                                     '--no-binary', ':all:', WHISPER_SDIST, '-d', scratch],
                                    capture_output=True, text=True)
            if result.returncode != 0:
                fail(f"no GPT-2 ranks: set GPT2_RANKS_FILE to a gpt2.tiktoken, or let pip reach "
                     f"PyPI ({WHISPER_SDIST})")
            sdist = next(os.path.join(scratch, name) for name in os.listdir(scratch)
                         if name.endswith('.tar.gz'))
            with tarfile.open(sdist) as tar:
                member = next(m for m in tar.getmembers()
                              if m.name.endswith('whisper/assets/gpt2.tiktoken'))
                with open(ranks, 'wb') as f:
                    f.write(tar.extractfile(member).read())
    print(f"wrote {os.path.relpath(ranks, ROOT)}")
    if not args.nanogpt:
        print("no --nanogpt: the check runs without nanoGPT's train.py beside the scripts")
        return
    target = os.path.join(CARRY, 'nanogpt')
    os.makedirs(target, exist_ok=True)
    for name in NANOGPT_FILES:
        if os.path.isfile(os.path.join(args.nanogpt, name)):  # a checkout
            shutil.copy(os.path.join(args.nanogpt, name), os.path.join(target, name))
            continue
        result = subprocess.run(['git', f'--git-dir={args.nanogpt}', 'show', f'HEAD:{name}'],
                                capture_output=True)
        if result.returncode != 0:
            fail(f"--nanogpt={args.nanogpt}: no {name} there; give a nanoGPT checkout or its git "
                 f"repository")
        with open(os.path.join(target, name), 'wb') as f:
            f.write(result.stdout)
    print(f"wrote {os.path.relpath(target, ROOT)}/: {', '.join(NANOGPT_FILES)}")

def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)

def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default=os.environ.get('OUT') or 'out-gpu-check',
                        help='where gpu-check.tar.gz and summary.md go (default: $OUT, else '
                             'out-gpu-check)')
    parser.add_argument('--work', default=os.path.join(ROOT, 'out-gpu-check-work'),
                        help='where the layout, the data and the study runs are made')
    parser.add_argument('--tiny', type=lambda v: {'True': True, 'False': False}[v], default=False,
                        help='True: the toy CPU mode (the same stages and layout, 1-2 minutes)')
    parser.add_argument('--budget', type=float, default=None,
                        help='seconds for all stages (default: 330 on a GPU, 600 with --tiny=True)')
    parser.add_argument('--stages', default='',
                        help='comma-separated: only these stages (default: all)')
    parser.add_argument('--nanogpt', default=None,
                        help='--prepare: a nanoGPT checkout or git repository to copy from; the '
                             "check: the folder of nanoGPT's train.py (default: .gpu_check/nanogpt "
                             "when there, '' for none)")
    parser.add_argument('--prepare', action='store_true',
                        help='fill .gpu_check/ for a machine without network')
    parser.add_argument('--report', default=None,
                        help="a check's gpu-check.tar.gz or folder: print its tables and copy its "
                             "study runs")
    parser.add_argument('--study_root', default=ROOT,
                        help='--report: the folder whose study/ takes the runs')
    # the env stage, in a process of its own
    parser.add_argument('--probe', default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.budget is None:
        args.budget = 600 if args.tiny else 330
    if args.probe:
        probe(args.probe, args.tiny)
    elif args.prepare:
        prepare(args)
    elif args.report:
        report(args)
    else:
        check(args)

if __name__ == '__main__':
    main()
