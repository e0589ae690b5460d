"""
Does Sophia-G reach AdamW's loss with less compute, and where does it stand against Muon? One
procedure for the three optimizers, run at one of three sizes:

  cpu   (default) a 0.8M-parameter character model on data/stdlib_char, 2,048 tokens per step,
        800 steps: under an hour on a 2-core CPU; results in the README's study section;
  gpu   a 17.7M-parameter GPT-2 BPE model on data/python_code, 131,072 tokens per step, 2,000
        steps, one CUDA GPU (about 4 minutes a run): the regime Sophia was made for, large token
        batches; results in the README's study-gpu section;
  tiny  the gpu suite's procedure at toy size on a CPU, seconds a run: what the tests run.

The procedure, each phase chosen from the results of the phases before it:
1. learning-rate sweeps of AdamW, of Sophia-G at the recommended rho = 0.05, and of Muon
   (train_muon.py: its learning rate on AdamW's scale, muon_adjust_lr_fn='match_rms_adamw');
2. a rho sweep for Sophia-G at its best learning rate;
3. the best AdamW, the best Sophia-G and the best Muon over more seeds (a seed changes init and
   data order; every run is evaluated on the same val batches);
4. (gpu, tiny) the best Sophia-G with a Hessian batch a quarter of the training step
   (hess_micro_steps), over all the seeds: does the cheaper Hessian pass cost quality?
Per seed: how far Sophia-G and Muon have to train to reach the final val loss of AdamW (same
seed), and which of the three ends lowest.

    $ python study.py                              # the CPU study: what is missing, then the report
    $ python study.py --suite=gpu                  # on a CUDA machine: what is missing, then the report
    $ python study.py --suite=gpu --time_budget=540  # start no run that may not end within 9 minutes
    $ python study.py --suite=gpu --dry_run        # each phase's runs: done, to run, not yet known
    $ python study.py --suite=gpu --report_only    # plots, tables, README from the committed logs

cpu: the runs go to out-study/<name>/ (the normal training scripts through the normal
configurator, --jobs side by side (two by default), the cores shared among them); a finished
run is reused, an interrupted one resumed. The report reads those folders.

gpu and tiny: one run at a time, in out-study-<suite>/<name>/. As soon as a run ends, its metrics
log is copied to study/<suite>/<name>.jsonl, beside study/<suite>/<name>.json: the device, torch
version, date, wall-clock seconds, corpus fingerprint and the training command. Those small files
are committed: a run is done when they exist, so the study can be completed a few runs at a time
on different days and machines, and the report (assets/study_<suite>.png and .md, the README
section) is made from them alone, the same bytes on any machine, with or without a GPU. On a
machine whose files do not come back by themselves, copy study/gpu/ back after each call.
Every run of a study must have the same corpus (fingerprint) and the same settings as the suite
now defines; the script refuses to mix them. The corpus is prepared when missing
(data/python_code/prepare.py reads the interpreter's own packages; offline it needs
GPT2_RANKS_FILE, see tokenizer.py).
"""

import argparse
import datetime
import json
import math
import os
import pickle
import platform
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from matplotlib.figure import Figure

import compare
from optimizers import RECIPES

ROOT = os.path.dirname(os.path.abspath(__file__))

@dataclass(frozen=True)
class Spec:
    """One training run of a study."""
    optimizer: str  # 'adamw', 'sophiag' or 'muon' (a key of optimizers.RECIPES)
    lr: float  # peak learning rate; the schedule decays to lr / 10
    rho: float = None  # Sophia-G's clipping scale; None for AdamW and Muon
    seed: int = 0
    hess_micro_steps: int = 0  # Sophia-G's Hessian batch in micro-batches; 0 = a full step's (official)

@dataclass(frozen=True)
class Suite:
    """The model, data and schedule of every run of a study, and its grids."""
    name: str
    config: dict  # training config keys shared by every run
    adam_lrs: tuple
    sophia_lrs: tuple  # at rho below
    muon_lrs: tuple  # on AdamW's scale: muon_adjust_lr_fn='match_rms_adamw' gives AdamW's RMS
    rho: float
    rho_sweep: tuple  # besides rho, at Sophia-G's best learning rate
    seeds: tuple  # the sweeps use the first; the best of each optimizer repeats over all
    ablation: bool  # phase 4: the best Sophia-G with a Hessian batch of a quarter of the step
    committed: bool  # each finished run's log is kept in study/<name>/ and the report reads only those

CPU = Suite(
    'cpu',
    # the quick-start shape with shorter sequences
    config=dict(dataset='stdlib_char', device='cpu', dtype='float32', compile=False,
                n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=32,
                gradient_accumulation_steps=1, dropout=0.0, max_iters=800, lr_decay_iters=800,
                warmup_iters=50, eval_interval=100, eval_iters=20, log_interval=50,
                checkpoint_interval=200),
    adam_lrs=(1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2),
    sophia_lrs=(1.25e-4, 2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3),
    muon_lrs=(1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2),  # AdamW's grid, and one step past its top
    rho=0.05,  # the recommended value (official GPT-2 small)
    rho_sweep=(0.02, 0.2, 1.0),
    seeds=(1337, 1338, 1339), ablation=False, committed=False)

# Tokens per step: 64 batch * 512 block * 4 accumulation = 131,072 (a quarter of the paper's
# 491,520), for 2,000 steps = 262M tokens; the corpus of a typical ML environment holds some tens
# to hundreds of millions, so a run sees it once to a few times. The model: 6 layers, 4 heads, 256
# wide, 17.7M parameters with the tied 50,304 x 256 embedding (12.9M of them): 262M tokens is 15
# per parameter, about Chinchilla's compute-optimal 20, so the comparison is made where a run of
# this budget would be made. The Hessian batch of the ablation is 1 micro-batch, a quarter of 4.
# Time per run on one H100, estimated from the GPT-2 small measurement in docs/throughput.md
# (442k tokens/s, 2.3 us per token, at 855 MFLOP per token) scaled to this model (6N + 12*L*H*Q*T = 115 MFLOP per
# token, 7.4x less), with a smaller model's lower efficiency allowed for: ~0.5 us per token, ~2M
# tokens/s, so 262M tokens take ~130 s for AdamW and ~145 s for Sophia-G (its
# Hessian pass adds 10%), plus ~1 minute to compile (Sophia-G has three graphs: training,
# evaluation, Hessian pass), ~5 s of evaluation (21 x 2 x 20 batches, forward only) and ~20 s for
# checkpoints (0.2 GB at every evaluation that improves val loss): 3.5-4.5 minutes. The report
# gives the measured tokens/s and wall-clock seconds of every run; if a run takes much longer,
# make the model smaller here and start the study again.
GPU = Suite(
    'gpu',
    config=dict(dataset='python_code', device='cuda', dtype='bfloat16', compile=True,
                n_layer=6, n_head=4, n_embd=256, block_size=512, batch_size=64,
                gradient_accumulation_steps=4, dropout=0.0, max_iters=2000, lr_decay_iters=2000,
                warmup_iters=200, eval_interval=100, eval_iters=20, log_interval=20,
                checkpoint_interval=1000, keep_last=1),
    adam_lrs=(5e-4, 1e-3, 2e-3, 4e-3, 8e-3),
    # a mostly clipped Sophia-G steps by lr * sign(m), as Lion, whose best lr is several times
    # below AdamW's: the grid reaches lower
    sophia_lrs=(2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3),
    muon_lrs=(5e-4, 1e-3, 2e-3, 4e-3, 8e-3),  # AdamW's grid
    rho=0.05,
    # at a quarter of the paper's batch the momentum is noisier, more coordinates clip, and a
    # larger rho may suit better: two values above 0.05, one below
    rho_sweep=(0.02, 0.1, 0.2),
    seeds=(1337, 1338, 1339), ablation=True, committed=True)

TINY = Suite(
    'tiny',
    config=dict(dataset='python_code', device='cpu', dtype='float32', compile=False,
                n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=2,
                gradient_accumulation_steps=4, dropout=0.0, max_iters=20, lr_decay_iters=20,
                warmup_iters=2, eval_interval=10, eval_iters=2, log_interval=5,
                checkpoint_interval=10, keep_last=1),
    adam_lrs=(1e-3, 1e-2), sophia_lrs=(1e-3, 1e-2), muon_lrs=(1e-3, 1e-2),
    rho=0.05, rho_sweep=(0.2,),
    seeds=(1, 2), ablation=True, committed=True)

SUITES = {suite.name: suite for suite in (CPU, GPU, TINY)}

# -----------------------------------------------------------------------------
# runs: names, commands, training

def run_name(suite, spec):
    name = f"{spec.optimizer}-lr{spec.lr:g}" + (f"-rho{spec.rho:g}" if spec.rho is not None else "")
    name += f"-seed{spec.seed}" if spec.seed != suite.seeds[0] else ""
    return name + (f"-hess{spec.hess_micro_steps}" if spec.hess_micro_steps else "")

def run_config(suite, spec, out_dir):
    """The training config keys a run sets (every other key keeps its script's default)."""
    config = dict(suite.config, out_dir=out_dir, wandb_run_name=run_name(suite, spec),
                  learning_rate=spec.lr, min_lr=spec.lr / 10, seed=spec.seed)
    if spec.optimizer == 'sophiag':
        config.update(rho=spec.rho, weight_decay=0.2)
        if spec.hess_micro_steps:
            config.update(hess_micro_steps=spec.hess_micro_steps)
    elif spec.optimizer == 'muon':
        # the shape scaling that puts Muon's learning rate and weight decay on AdamW's scale,
        # named so that a change of the script's default cannot change the study unseen
        config.update(weight_decay=0.1, muon_adjust_lr_fn='match_rms_adamw')
    else:
        config.update(weight_decay=0.1)
    return config

def run_command(suite, spec, out_dir):
    script = RECIPES[spec.optimizer].script
    # relative where it lies inside the repository: the command recorded reads as typed there
    out_dir = os.path.relpath(out_dir, ROOT) if out_dir.startswith(ROOT + os.sep) else out_dir
    return [sys.executable, os.path.join(ROOT, script)] + \
        [f'--{k}={v}' for k, v in run_config(suite, spec, out_dir).items()]

def shown_command(command):
    """A command as a person would type it in the repository: python, relative paths."""
    return ' '.join(['python'] + [os.path.relpath(part, ROOT) if part.startswith(ROOT + os.sep) else part
                                  for part in command[1:]])

def finished_out_dir(out_dir, max_iters):
    """A run's out_dir is finished when its log holds the evaluation at max_iters."""
    try:
        run = compare.load_run(out_dir)
    except compare.CompareError:
        return False
    return any(row['iter'] == max_iters and 'val/loss' in row for row in run.eval)

def train(suite, spec, out_root, threads):
    """Run (or resume, or reuse) one training run. Returns (out_dir, status, wall seconds,
    command): status 'finished', or 'diverged' when the run stopped on non-finite losses."""
    name = run_name(suite, spec)
    out_dir = os.path.join(out_root, name)
    command = run_command(suite, spec, out_dir)
    if finished_out_dir(out_dir, suite.config['max_iters']):
        return out_dir, 'finished', None, command  # finished earlier: its duration is not known
    args = list(command)
    if os.path.isdir(out_dir):
        if any(f.startswith('ckpt-') for f in os.listdir(out_dir)):
            args.append('--init_from=resume')
        else:
            shutil.rmtree(out_dir)  # interrupted before its first checkpoint: start over
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED='1')
    started = time.time()
    print(f"  training {name} ...", flush=True)
    log_path = os.path.join(out_root, f'{name}.log')
    with open(log_path, 'w') as log:
        status = subprocess.run(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    seconds = time.time() - started
    if status != 0:
        with open(log_path) as log:
            tail = log.read()[-2000:]
        # a learning rate too high for the model is a result, not a failure of the study
        if suite.committed and status == 1 and 'in a row with a non-finite loss' in tail:
            print(f"  {name} diverged after {seconds:.0f} s", flush=True)
            return out_dir, 'diverged', seconds, command
        raise SystemExit(f"error: run {name} failed with status {status}; see {log_path}")
    print(f"  {name} done in {seconds:.0f} s", flush=True)
    return out_dir, 'finished', seconds, command

# -----------------------------------------------------------------------------
# finished runs, and the plan they decide

class Results:
    """The finished runs of a study: for a committed suite the logs in study/<suite>/, for the
    cpu suite the runs' out_dirs."""

    def __init__(self, suite, root):
        self.suite, self.root = suite, root
        self.out_root = os.path.join(root, 'out-study' if suite.name == 'cpu' else f'out-study-{suite.name}')
        self.log_dir = os.path.join(root, 'study', suite.name)
        self.loaded = {}

    def path(self, spec, extension):
        return os.path.join(self.log_dir, run_name(self.suite, spec) + extension)

    def done(self, spec):
        if self.suite.committed:  # the record is written last: with it, the log is complete
            return os.path.exists(self.path(spec, '.json'))
        return finished_out_dir(os.path.join(self.out_root, run_name(self.suite, spec)),
                                self.suite.config['max_iters'])

    def load(self, spec):
        """The run's compare.Run; a finished run does not change, so it is read once."""
        name = run_name(self.suite, spec)
        if name not in self.loaded:
            source = self.path(spec, '.jsonl') if self.suite.committed else os.path.join(self.out_root, name)
            self.loaded[name] = compare.load_run(source)
        return self.loaded[name]

    def record(self, spec):
        with open(self.path(spec, '.json')) as f:
            return json.load(f)

    def final_loss(self, spec):
        """Final val loss of a finished run (inf if it diverged), None if it is not finished."""
        if not self.done(spec):
            return None
        if self.suite.committed and self.record(spec)['status'] == 'diverged':
            return math.inf
        loss = compare.final_val_loss(self.load(spec))
        return math.inf if loss is None else loss

    def commit(self, spec, out_dir, status, seconds, command, corpus):
        """Copy a run's log into study/<suite>/ with its provenance, each file written whole
        under a temporary name and renamed, the record last."""
        import torch
        os.makedirs(self.log_dir, exist_ok=True)
        device = self.suite.config['device']
        record = dict(
            run=run_name(self.suite, spec), status=status,
            device=torch.cuda.get_device_name(0) if device.startswith('cuda') else
            f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
            torch=torch.__version__, date=datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
            wall_seconds=None if seconds is None else round(seconds, 1), command=shown_command(command),
            corpus=corpus)
        with open(os.path.join(out_dir, 'metrics.jsonl')) as f:
            log = f.read()
        for path, text in ((self.path(spec, '.jsonl'), log),
                           (self.path(spec, '.json'), json.dumps(record, indent=1, sort_keys=True) + '\n')):
            with open(path + '.tmp', 'w') as f:
                f.write(text)
            os.replace(path + '.tmp', path)

    def check_consistent(self, specs):
        """Every committed run of the plan must have the settings the suite defines now and the
        corpus of the others: a study that mixed them would compare different experiments."""
        corpora = {}
        for spec in specs:
            if not self.done(spec):
                continue
            logged = self.load(spec).config
            expected = run_config(self.suite, spec, out_dir=None)
            changed = [f"{key}={logged.get(key)!r} (the suite now sets {value!r})"
                       for key, value in expected.items()
                       if key not in ('out_dir', 'dataset') and logged.get(key) != value]
            if changed:
                raise SystemExit(f"error: {self.path(spec, '.jsonl')} was made with {changed[0]}: the "
                                 f"suite has changed since; remove the logs in {self.log_dir} to start it again")
            corpora.setdefault(self.record(spec)['corpus']['fingerprint'], run_name(self.suite, spec))
        if len(corpora) > 1:
            (a, run_a), (b, run_b) = list(corpora.items())[:2]
            raise SystemExit(f"error: the runs in {self.log_dir} were trained on different corpora: {run_a} on "
                             f"{a}, {run_b} on {b}; keep the runs of one corpus")
        return next(iter(corpora), None)

@dataclass
class Phase:
    title: str
    count: int  # runs in the phase, known before the runs themselves
    specs: list  # the runs, or None while the phases it depends on are incomplete
    chosen_when: str  # which earlier phases must be complete for its runs to be known

def best(specs, final_loss):
    """The spec with the lowest final val loss, or None unless every spec is finished."""
    losses = [final_loss(spec) for spec in specs]
    if None in losses:
        return None
    return specs[losses.index(min(losses))]  # on a tie, the first

def plan(suite, final_loss):
    """The phases of the study and their runs, as far as the finished runs decide them, and the
    best AdamW, Sophia-G and Muon settings (None until decided)."""
    first = suite.seeds[0]
    adam = [Spec('adamw', lr, None, first) for lr in suite.adam_lrs]
    sophia = [Spec('sophiag', lr, suite.rho, first) for lr in suite.sophia_lrs]
    muon = [Spec('muon', lr, None, first) for lr in suite.muon_lrs]
    best_adam, best_lr = best(adam, final_loss), best(sophia, final_loss)
    best_muon = best(muon, final_loss)
    rhos = [replace(best_lr, rho=rho) for rho in suite.rho_sweep] if best_lr else None
    best_sophia = best([best_lr] + rhos, final_loss) if rhos else None
    others = suite.seeds[1:]
    bests = (best_adam, best_sophia, best_muon)
    seeds = [replace(spec, seed=seed) for spec in bests for seed in others] if all(bests) else None
    phases = [
        Phase(f"learning-rate sweeps (seed {first}): AdamW, Sophia-G at rho {suite.rho:g}, "
              f"and Muon", len(adam + sophia + muon), adam + sophia + muon, ''),
        Phase(f"rho sweep ({', '.join(f'{rho:g}' for rho in suite.rho_sweep)}) at Sophia-G's best learning rate",
              len(suite.rho_sweep), rhos, 'phase 1 is complete'),
        Phase(f"the best AdamW, the best Sophia-G and the best Muon with the other seeds "
              f"({', '.join(map(str, others))})", 3 * len(others), seeds,
              'phases 1 and 2 are complete'),
    ]
    if suite.ablation:
        phases.append(Phase(
            f"ablation: the best Sophia-G with hess_micro_steps={quarter_hessian(suite)} (a quarter of "
            f"the {suite.config['gradient_accumulation_steps']} micro-batches of a step), seeds "
            f"{', '.join(map(str, suite.seeds))}", len(suite.seeds),
            [replace(best_sophia, seed=seed, hess_micro_steps=quarter_hessian(suite)) for seed in suite.seeds]
            if best_sophia else None, 'phases 1 and 2 are complete'))
    return phases, best_adam, best_sophia, best_muon

def sweep_runs(phases):
    """The runs of the sweeps (phases 1 and 2, as far as known), one optimizer after the other:
    Sophia-G's rho sweep beside its learning-rate sweep."""
    order = ('adamw', 'sophiag', 'muon')
    return sorted(phases[0].specs + (phases[1].specs or []),
                  key=lambda spec: order.index(spec.optimizer))

def quarter_hessian(suite):
    return suite.config['gradient_accumulation_steps'] // 4

def known_runs(suite, results):
    """Every run of the plan that the finished runs decide so far."""
    return [spec for phase in plan(suite, results.final_loss)[0] if phase.specs for spec in phase.specs]

def missing_runs(suite, results):
    """(phase number, phase, its unfinished runs) for the first phase that has any; None when the
    study is complete. A phase's runs are decided once the phases before it are complete."""
    for number, phase in enumerate(plan(suite, results.final_loss)[0], start=1):
        missing = [spec for spec in phase.specs if not results.done(spec)]
        if missing:
            return number, phase, missing
    return None

# -----------------------------------------------------------------------------
# shared by the reports

def fmt(x, spec='.4f'):
    return '—' if x is None else format(x, spec)

def edge_note(suite, best_adam, best_sophia, best_muon):
    """A note for each best learning rate (None: not yet known) at the edge of its sweep."""
    grids = ((best_adam, suite.adam_lrs), (best_sophia, suite.sophia_lrs),
             (best_muon, suite.muon_lrs))
    edges = [f"{spec.optimizer}'s best learning rate ({spec.lr:g}) is the "
             f"{'smallest' if spec.lr == min(grid) else 'largest'} of its sweep: the optimum may "
             f"lie beyond it" for spec, grid in grids if spec and spec.lr in (min(grid), max(grid))]
    return '\n\nNote: ' + '; '.join(edges) + '.' if edges else ''

def count_text(n):
    """A small count as a word, for prose: 'over three seeds', 'two at a time'."""
    words = ('none', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine', 'ten')
    return words[n] if n < len(words) else str(n)

def standing(finals):
    """Where Sophia-G stands against AdamW and Muon: `finals` maps 'AdamW', 'Sophia-G' and 'Muon'
    to their final val losses over the seeds where all three have a finite one."""
    n = len(finals['AdamW'])
    mean = {label: statistics.fmean(losses) for label, losses in finals.items()}
    sophia, others = mean['Sophia-G'], [label for label in mean if label != 'Sophia-G']
    ahead = [label for label in others if sophia < mean[label]]
    if len(ahead) == 2:
        place = 'ahead of both'
    elif not ahead:
        place = 'behind both'
    else:
        behind = next(label for label in others if label not in ahead)
        place = f"between them, ahead of {ahead[0]} and behind {behind}"
    return (f"Sophia-G against both: its mean final val loss over {count_text(n)} "
            f"seed{'s' if n > 1 else ''} is {sophia:.4f}, AdamW's {mean['AdamW']:.4f} and Muon's "
            f"{mean['Muon']:.4f}: {place} ({sophia - mean['AdamW']:+.4f} against AdamW, "
            f"{sophia - mean['Muon']:+.4f} against Muon).")

def write_section(root, marker, section):
    """assets/<marker>.md, and the README's text between the <!-- marker:begin/end --> lines;
    returns whether the README has those lines."""
    os.makedirs(os.path.join(root, 'assets'), exist_ok=True)
    with open(os.path.join(root, 'assets', f"{marker.replace('-', '_')}.md"), 'w') as f:
        f.write(section)
    readme_path = os.path.join(root, 'README.md')
    readme = open(readme_path).read()
    begin, end = f'<!-- {marker}:begin -->', f'<!-- {marker}:end -->'
    if begin not in readme or end not in readme:
        return False
    head, rest = readme.split(begin, 1)
    with open(readme_path, 'w') as f:
        f.write(head + begin + '\n' + section + '\n' + end + rest.split(end, 1)[1])
    return True

# -----------------------------------------------------------------------------
# the cpu suite's report: made where the runs are, on the machine that made them

def cpu_seed_table(suite, results, best_adam, spec, label):
    """Per seed, how far `spec`'s optimizer trained to reach AdamW's final val loss: the table's
    lines, and a sentence that sums it up."""
    c = suite.config
    lines = [f"| seed | AdamW final val loss (target) | {label} final val loss | {label} "
             f"iterations to target | speed-up in iterations | {label} seconds to target / AdamW "
             f"seconds | {label} seconds to target |", "|---|---|---|---|---|---|---|"]
    speedups = []
    for seed in suite.seeds:
        adam = results.load(replace(best_adam, seed=seed))
        run = results.load(replace(spec, seed=seed))
        target = compare.final_val_loss(adam)
        iters = compare.to_target(run, target, 'iter')
        secs = compare.to_target(run, target, 'time')
        adam_secs = adam.eval[-1]['time']
        speedup = c['max_iters'] / iters if iters else None
        speedups.append(speedup)
        lines.append(f"| {seed} | {target:.4f} | {compare.final_val_loss(run):.4f} | "
                     f"{fmt(iters, '.0f')} | {fmt(speedup, '.2f')}{'×' if speedup else ''} | "
                     f"{fmt(secs / adam_secs if secs else None, '.2f')} | "
                     + (f"{secs:.0f} s of AdamW's {adam_secs:.0f} s |" if secs else "— |"))
    reached = [s for s in speedups if s is not None]
    if len(reached) == len(suite.seeds):
        mean = sum(reached) / len(reached)
        verdict = (f"{label} reached AdamW's final val loss in {c['max_iters'] / mean:.0f} of "
                   f"{c['max_iters']} iterations on average: a speed-up of {mean:.2f}× in steps "
                   f"(range {min(reached):.2f}–{max(reached):.2f}× over {len(suite.seeds)} seeds).")
    else:
        verdict = (f"{label} did not reach AdamW's final val loss within {c['max_iters']} "
                   f"iterations in {len(suite.seeds) - len(reached)} of {len(suite.seeds)} seeds"
                   + (f"; where it did, the speed-up was {', '.join(f'{s:.2f}×' for s in reached)}." if reached else "."))
    return '\n'.join(lines), verdict

def report_cpu(suite, results, root, sweeps, bests, seconds, jobs):
    """Plots, the markdown tables, and the README section; `sweeps` are the runs of phases 1 and 2,
    `bests` the best AdamW, Sophia-G and Muon, `jobs` how many ran side by side."""
    best_adam, best_sophia, best_muon = bests
    first = suite.seeds[0]
    lines = []
    lines.append("| optimizer | learning rate | rho | final val loss |")
    lines.append("|---|---|---|---|")
    for spec in sweeps:
        run = results.load(spec)
        mark = ' **(best)**' if spec in bests else ''
        lines.append(f"| {spec.optimizer} | {spec.lr:g} | {fmt(spec.rho, 'g')} | "
                     f"{fmt(compare.final_val_loss(run))}{mark} |")
    sweep_table = '\n'.join(lines) + edge_note(suite, *bests)

    c = suite.config
    sophia_table, sophia_verdict = cpu_seed_table(suite, results, best_adam, best_sophia,
                                                  'Sophia-G')
    muon_table, muon_verdict = cpu_seed_table(suite, results, best_adam, best_muon, 'Muon')
    settings = (('AdamW', best_adam), ('Sophia-G', best_sophia), ('Muon', best_muon))
    runs = {label: [results.load(replace(spec, seed=seed)) for seed in suite.seeds]
            for label, spec in settings}
    against = standing({label: [compare.final_val_loss(run) for run in runs[label]]
                        for label in runs})
    # whole runs over their wall-clock, evaluations included: side by side with other work, noisy
    tokens = c['max_iters'] * c['batch_size'] * c['block_size'] * c['gradient_accumulation_steps']
    rates = {label: statistics.fmean(tokens / run.eval[-1]['time'] for run in runs[label])
             for label in runs}
    throughput = ("Throughput, tokens over each run's wall-clock seconds (evaluations included; "
                  "measured beside the other runs and whatever else the machine ran, so noisy, as "
                  "are the seconds columns), mean over seeds: AdamW "
                  f"{rates['AdamW']:,.0f} tokens/s, " +
                  ', '.join(f"{label} {rates[label]:,.0f} ({rates[label] / rates['AdamW']:.3f} of "
                            f"AdamW's)" for label in ('Sophia-G', 'Muon')) + ".")

    # the health of Sophia-G's clipping, from its own logs
    win_rates = [run.train[-1].get('train/win_rate') for run in runs['Sophia-G']]
    win_rates = [w for w in win_rates if w is not None]
    updates = c['max_iters'] // 10
    warm = 1 - 0.99 ** updates
    health = (f"The best Sophia-G runs ended with a win rate (fraction of coordinates not clipped) of "
              f"{min(win_rates):.3f}–{max(win_rates):.3f}; the healthy range quoted for GPT-2 is 0.1–0.5. "
              f"The Hessian EMA has no bias correction (the official semantics): after the {updates} "
              f"Hessian updates of a run this short it holds 1 − 0.99^{updates} = {warm:.0%} of its "
              f"stationary scale, and much less early on, so more coordinates are clipped than at GPT-2's "
              f"100k steps, where the EMA is long warmed up.") if win_rates else ""

    os.makedirs(os.path.join(root, 'assets'), exist_ok=True)
    seeds = f"{len(suite.seeds)} seed{'s' if len(suite.seeds) > 1 else ''}"
    title = f'stdlib_char, 4-layer GPT: best AdamW, Sophia-G and Muon, {seeds}'
    plots = compare.plot_runs([run for label in runs for run in runs[label]],
                              os.path.join(root, 'assets', 'study'), title=title)
    over = f"over {count_text(len(suite.seeds))} seeds"
    now = datetime.date.today().isoformat()
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    section = f"""
Made by `python study.py` on {now} ({machine}; {seconds / 60:.0f} minutes of training summed over \
the runs, {count_text(jobs)} at
a time). Model: {c['n_layer']} layers, {c['n_head']} heads, {c['n_embd']} wide, {c['block_size']}-character
context, {c['batch_size']} sequences per step ({c['batch_size'] * c['block_size']:,} tokens),
{c['max_iters']} iterations, {c['warmup_iters']} warmup, cosine decay to lr/10, val loss on the same
{c['eval_iters']} batches every {c['eval_interval']} iterations. Sophia-G: betas 0.965/0.99, weight
decay 0.2, a Hessian pass every 10 iterations; AdamW: betas 0.9/0.95, weight decay 0.1; Muon
(train_muon.py): torch.optim.Muon on the blocks' matrices (momentum 0.95, Nesterov, 5 Newton–Schulz
steps, lr scaled by shape to AdamW's RMS, weight decay 0.1) and AdamW as above on the rest.

**Result.** {sophia_verdict} {muon_verdict} {against} {health}

Learning-rate and rho sweep (seed {first}):

{sweep_table}

Best AdamW (lr {best_adam.lr:g}) and best Sophia-G (lr {best_sophia.lr:g}, \
rho {best_sophia.rho:g}) {over}:

{sophia_table}

Best AdamW (lr {best_adam.lr:g}) and best Muon (lr {best_muon.lr:g}) {over}:

{muon_table}

![val loss](assets/study_val_loss.png)

{throughput} The seconds columns count Sophia-G's Hessian passes (about 10% more forward/backward
work) and Muon's Newton–Schulz iterations.
This is a 0.8M-parameter character model trained for {c['max_iters'] * c['batch_size'] * c['block_size'] / 1e6:.1f}M
tokens: it says how the three optimizers compare here, not at GPT-2 scale.
"""
    readme = write_section(root, 'study', section)
    print(section)
    print('wrote', ', '.join(plots + ['assets/study.md'] + (['README.md'] if readme else [])))

# -----------------------------------------------------------------------------
# the committed suites' report: made from study/<suite>/ alone, so any machine rebuilds its bytes

def tokens_per_second(run):
    """A run's training throughput: the median over its log intervals, so the few intervals that
    hold compilation or an evaluation do not count."""
    rates = [row['tokens_per_s'] for row in run.train if 'tokens_per_s' in row]
    return statistics.median(rates) if rates else None

def seconds_to(run, target):
    """Seconds of training at the run's measured throughput until its val loss reaches target."""
    tokens = compare.to_target(run, target, 'tokens')
    return None if tokens is None else tokens / tokens_per_second(run)

def spread(values, spec):
    """'mean (range low to high)' of a list of numbers, each formatted by `spec`."""
    low, high = format(min(values), spec), format(max(values), spec)
    return f"{format(statistics.fmean(values), spec)}" + (f" (range {low} to {high})" if low != high else "")

def model_size(config):
    """(parameters with the tied embedding, FLOPs per token as MFU counts them) of the suite's
    GPT-2 BPE model, built on the meta device: no memory, no time."""
    import torch
    from model import GPT, GPTConfig
    with torch.device('meta'):
        model = GPT(GPTConfig(n_layer=config['n_layer'], n_head=config['n_head'], n_embd=config['n_embd'],
                              block_size=config['block_size'], vocab_size=50304, bias=False))
    return model.get_num_params(non_embedding=False), model.flops_per_token()

def setup_text(suite):
    c = suite.config
    step = c['batch_size'] * c['block_size'] * c['gradient_accumulation_steps']
    params, flops = model_size(c)
    return (f"Model: {c['n_layer']} layers, {c['n_head']} heads, {c['n_embd']} wide, {params / 1e6:.1f}M "
            f"parameters (the tied 50,304-token embedding included; {flops / 1e6:.0f} MFLOP per token), "
            f"{c['block_size']}-token context. {c['batch_size']} sequences × {c['gradient_accumulation_steps']} "
            f"micro-batches = {step:,} tokens per step, {c['max_iters']:,} steps ({step * c['max_iters'] / 1e6:.0f}M "
            f"tokens), {c['warmup_iters']} warmup, cosine decay to lr/10, {c['dtype']}"
            f"{', torch.compile' if c['compile'] else ''}; val loss on the same {c['eval_iters']} batches "
            f"({c['eval_iters'] * c['batch_size'] * c['block_size']:,} tokens) every {c['eval_interval']} steps. "
            f"Sophia-G: betas 0.965/0.99, weight decay 0.2, a Hessian pass over a full step's tokens every "
            f"10 steps (the official schedule); AdamW: betas 0.9/0.95, weight decay 0.1; Muon "
            f"(train_muon.py): torch.optim.Muon on the blocks' matrices (momentum 0.95, Nesterov, "
            f"5 Newton–Schulz steps, lr scaled by shape to AdamW's RMS, weight decay 0.1), AdamW "
            f"as above on the rest.")

def provenance_text(suite, records):
    devices = sorted({r['device'] for r in records})
    versions = sorted({r['torch'] for r in records})
    dates = sorted(r['date'] for r in records)
    walls = [r['wall_seconds'] for r in records if r['wall_seconds'] is not None]
    corpus = records[0]['corpus']
    when = dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}"
    text = (f"Made by `python study.py --suite={suite.name}` on {', '.join(devices)} with torch "
            f"{', '.join(versions)}, {when}")
    if walls:
        text += f"; a run took {min(walls):.0f}–{max(walls):.0f} s of wall-clock (compilation, evaluation and checkpoints included)"
    return text + (f". Corpus `{corpus['dataset']}`: fingerprint {corpus['fingerprint'][:16]}, "
                   f"{corpus['train_tokens']:,} train and {corpus['val_tokens']:,} val tokens from "
                   f"{corpus['files']:,} files ({corpus['interpreter']}). Each run's command, device, torch "
                   f"version and date are in study/{suite.name}/<run>.json, its metrics in <run>.jsonl.")

def missing_text(suite, results, phases):
    total = sum(phase.count for phase in phases)
    done = sum(results.done(spec) for phase in phases if phase.specs for spec in phase.specs)
    if done == total:
        return None
    where = 'a machine with a CUDA GPU' if suite.config['device'].startswith('cuda') else 'any machine'
    lines = [f"**Missing runs: {total - done} of {total}.** Each phase's runs are chosen from the results "
             f"of the phases before it, so a later phase is listed by what it will run.", ""]
    for number, phase in enumerate(phases, start=1):
        if phase.specs is None:
            lines.append(f"{number}. {phase.title}: {phase.count} runs, chosen when {phase.chosen_when}")
            continue
        missing = [run_name(suite, spec) for spec in phase.specs if not results.done(spec)]
        state = f"{len(missing)} of {phase.count} missing: " + ', '.join(f'`{name}`' for name in missing) \
            if missing else f"all {phase.count} done"
        lines.append(f"{number}. {phase.title}: {state}")
    lines += ["", f"To make them: `python study.py --suite={suite.name}` on {where} (`--time_budget=SECONDS` "
                  f"starts no run that may not end in time); commit what it adds to study/{suite.name}/."]
    return '\n'.join(lines)

def loss_text(loss):
    return 'diverged' if loss == math.inf else fmt(loss)

def sweep_table(suite, results, sweeps, chosen):
    lines = ["| run | optimizer | learning rate | rho | final val loss | tokens/s |", "|---|---|---|---|---:|---:|"]
    for spec in sweeps:
        if not results.done(spec):
            continue
        run, loss = results.load(spec), results.final_loss(spec)
        mark = ' **(best)**' if spec in chosen else ''
        lines.append(f"| {run_name(suite, spec)} | {spec.optimizer} | {spec.lr:g} | {fmt(spec.rho, 'g')} | "
                     f"{loss_text(loss)}{mark} | "
                     f"{fmt(tokens_per_second(run), ',.0f')} |")
    return '\n'.join(lines) + edge_note(suite, *chosen)

def seeds_text(suite, results, best_adam, spec, label):
    """The per-seed table of `spec`'s optimizer (labelled `label`) against AdamW's final val loss,
    and what it says."""
    lines = [f"| seed | AdamW final val loss (target) | {label} final val loss | {label} tokens to "
             f"target | / AdamW's tokens | {label} seconds to target | / AdamW's seconds |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    reached, differences, seeds = [], [], 0
    for seed in suite.seeds:
        adam_spec, other_spec = replace(best_adam, seed=seed), replace(spec, seed=seed)
        if not (results.done(adam_spec) and results.done(other_spec)):
            continue
        seeds += 1
        target, final = results.final_loss(adam_spec), results.final_loss(other_spec)
        row = [str(seed), loss_text(target), loss_text(final)]
        if math.inf in (target, final):
            lines.append('| ' + ' | '.join(row + ['—'] * 4) + ' |')
            continue
        differences.append(final - target)
        adam, other = results.load(adam_spec), results.load(other_spec)
        adam_tokens = adam.val_points()[-1]['tokens']
        adam_seconds = adam_tokens / tokens_per_second(adam)
        tokens, seconds = compare.to_target(other, target, 'tokens'), seconds_to(other, target)
        if tokens is None:
            row += ['—'] * 4
        else:
            reached.append((tokens / adam_tokens, seconds / adam_seconds))
            row += [f"{tokens / 1e6:.1f}M" if tokens >= 1e6 else f"{tokens:,.0f}", f"{tokens / adam_tokens:.2f}",
                    f"{seconds:.0f} s", f"{seconds / adam_seconds:.2f}"]
        lines.append('| ' + ' | '.join(row) + ' |')
    if not seeds:
        return None
    so_far = '' if seeds == len(suite.seeds) else ' so far'
    if reached:
        verdict = (f"In {len(reached)} of {seeds} seeds{so_far} {label} reached AdamW's final val "
                   f"loss, with {spread([t for t, _ in reached], '.2f')} × AdamW's tokens and "
                   f"{spread([s for _, s in reached], '.2f')} × its seconds.")
    else:
        verdict = (f"In none of {seeds} seeds{so_far} did {label} reach AdamW's final val loss "
                   f"within {suite.config['max_iters']:,} steps.")
    if differences:
        verdict += f" Final val loss, {label} minus AdamW: {spread(differences, '+.4f')}."
    setting = f"lr {spec.lr:g}" + (f", rho {spec.rho:g}" if spec.rho is not None else "")
    return (f"Best AdamW (lr {best_adam.lr:g}) against the best {label} ({setting}), per seed "
            f"(tokens and seconds to reach AdamW's final val loss, interpolated between "
            f"evaluations; — where not reached):\n\n" + '\n'.join(lines) +
            f"\n\n**Result.** {verdict}")

def standing_text(suite, results, bests):
    """standing() over the seeds where the best AdamW, Sophia-G and Muon all have a finite final val
    loss; None before there is one."""
    labels = ('AdamW', 'Sophia-G', 'Muon')
    finals = {label: [] for label in labels}
    for seed in suite.seeds:
        specs = [replace(spec, seed=seed) for spec in bests]
        losses = [results.final_loss(spec) if results.done(spec) else None for spec in specs]
        if None in losses or math.inf in losses:
            continue
        for label, loss in zip(labels, losses):
            finals[label].append(loss)
    so_far = '' if len(finals['AdamW']) == len(suite.seeds) else ' (the seeds done so far)'
    return standing(finals)[:-1] + so_far + '.' if finals['AdamW'] else None

def ablation_text(suite, results, official, cheap):
    """The best Sophia-G against itself with the quarter-size Hessian batch, per seed."""
    lines = [f"| seed | Sophia-G final val loss | with hess_micro_steps={cheap.hess_micro_steps} | difference | "
             f"tokens/s | with hess_micro_steps={cheap.hess_micro_steps} |", "|---|---:|---:|---:|---:|---:|"]
    differences, speeds = [], []
    for seed in suite.seeds:
        a_spec, b_spec = replace(official, seed=seed), replace(cheap, seed=seed)
        if not (results.done(a_spec) and results.done(b_spec)):
            continue
        a, b = results.final_loss(a_spec), results.final_loss(b_spec)
        rate_a, rate_b = tokens_per_second(results.load(a_spec)), tokens_per_second(results.load(b_spec))
        if None not in (rate_a, rate_b):  # a run that diverged before its first log line has none
            speeds.append(rate_b / rate_a)
        difference = None if math.inf in (a, b) else b - a
        if difference is not None:
            differences.append(difference)
        lines.append(f"| {seed} | {loss_text(a)} | {loss_text(b)} | {fmt(difference, '+.4f')} | "
                     f"{fmt(rate_a, ',.0f')} | {fmt(rate_b, ',.0f')} |")
    if len(lines) == 2:
        return None
    summary = (f"Over {len(lines) - 2} seeds, the Hessian pass on a quarter of the step's tokens changed "
               f"Sophia-G's final val loss by {spread(differences, '+.4f')}" if differences else
               f"In each of {len(lines) - 2} seeds one of the two runs diverged")
    if speeds:
        summary += f", and its tokens/s by ×{spread(speeds, '.3f')} (the arithmetic's ceiling: 1.1 / 1.025 = ×1.073)"
    return (f"Ablation, the Hessian pass on {cheap.hess_micro_steps} of the "
            f"{suite.config['gradient_accumulation_steps']} micro-batches of a step:\n\n" + '\n'.join(lines) +
            f"\n\n{summary}.")

def finished_seeds(suite, results, spec):
    """The finished runs of a setting over the suite's seeds."""
    return [results.load(replace(spec, seed=seed)) for seed in suite.seeds if results.done(replace(spec, seed=seed))]

def throughput_text(suite, results, settings):
    """Mean tokens/s over the seeds of each chosen setting (AdamW's first), against AdamW's;
    Sophia-G's also against the ceiling that its Hessian pass's extra work allows."""
    parts, adam = [], None
    for label, _, spec in settings:
        rates = [tokens_per_second(run) for run in finished_seeds(suite, results, spec)]
        rates = [rate for rate in rates if rate is not None]  # a run that diverged early logged none
        if not rates:
            continue
        rate = statistics.fmean(rates)
        if spec.optimizer == 'adamw':
            adam = rate
            parts.append(f"{label} {rate:,.0f}")
            continue
        notes = [f"{rate / adam:.3f} of AdamW's"] if adam else []
        if spec.optimizer == 'sophiag':
            notes.append("ceiling 1/1.025 = 0.976" if spec.hess_micro_steps else
                         "the arithmetic's ceiling 1/1.1 = 0.909")
        parts.append(f"{label} {rate:,.0f}" + (f" ({'; '.join(notes)})" if notes else ""))
    return ("Tokens/s, the median over each run's log intervals (compilation and evaluation left out), mean "
            "over seeds: " + ', '.join(parts) + ". The seconds above are tokens ÷ that rate: training at "
            "steady speed, Hessian passes and Newton–Schulz iterations included.")

def win_rate_text(suite, results, settings):
    points = [max(1, round(suite.config['max_iters'] * fraction)) for fraction in (0.05, 0.25, 0.5, 1.0)]
    parts = []
    for label, _, spec in settings:
        if spec.optimizer != 'sophiag':  # only Sophia-G clips
            continue
        runs = finished_seeds(suite, results, spec)
        if not runs:
            continue
        values = []
        for point in points:
            rates = [next((row['train/win_rate'] for row in run.train
                           if row['iter'] >= point and 'train/win_rate' in row), None) for run in runs]
            rates = [rate for rate in rates if rate is not None]
            values.append(fmt(statistics.fmean(rates) if rates else None, '.3f'))
        parts.append(f"{label} {' / '.join(values)}")
    return (f"Win rate (the fraction of coordinates not clipped; 0.1–0.5 is healthy), mean over seeds, at "
            f"iterations {' / '.join(f'{p:,}' for p in points)}: " + '; '.join(parts) + ".")

def plot_study(path, title, groups, sweeps):
    """One figure: val loss against tokens and against seconds at the run's throughput, Sophia-G's
    win rate against iterations (one curve per run of `groups`: [(label, style, [runs])]), and
    the final val loss of the learning-rate sweeps (`sweeps`: [(label, [(lr, loss)])])."""
    figure = Figure(figsize=(13, 8), layout='constrained')
    (tokens_panel, seconds_panel), (win_panel, sweep_panel) = figure.subplots(2, 2)
    losses = []
    for color, (label, style, runs) in enumerate(groups):
        for i, run in enumerate(runs):
            name = label if i == 0 else None  # one legend entry per setting, not per seed
            points = [(row['tokens'], row['val/loss']) for row in run.val_points() if 'tokens' in row]
            xs, ys = [x for x, _ in points], [y for _, y in points]
            rate = tokens_per_second(run)
            if points and rate:  # a run that diverged early may have neither
                losses += [y for x, y in points if x >= 0.1 * xs[-1]]  # the first evals would flatten the rest
                tokens_panel.plot(xs, ys, style, color=f'C{color}', label=name)
                seconds_panel.plot([x / rate for x in xs], ys, style, color=f'C{color}', label=name)
            wins = [(row['iter'], row['train/win_rate']) for row in run.train if 'train/win_rate' in row]
            if wins:
                win_panel.plot([x for x, _ in wins], [y for _, y in wins], style, color=f'C{color}', label=name)
    for panel, x_label in ((tokens_panel, 'tokens'), (seconds_panel, "seconds at the run's measured tokens/s")):
        if losses:
            margin = 0.05 * (max(losses) - min(losses)) or 0.05
            panel.set_ylim(min(losses) - margin, max(losses) + margin)
        panel.set_xlabel(x_label)
        panel.set_ylabel('val loss')
    win_panel.set_xlabel('iteration')
    win_panel.set_ylabel('Sophia-G win rate (not clipped)')
    for label, points in sweeps:
        finite = sorted((lr, loss) for lr, loss in points if loss != math.inf)
        sweep_panel.plot([lr for lr, _ in finite], [loss for _, loss in finite], 'o-', label=label)
    sweep_panel.set_xscale('log')
    sweep_panel.set_xlabel('peak learning rate')
    sweep_panel.set_ylabel('final val loss')
    for panel in (tokens_panel, seconds_panel, win_panel, sweep_panel):
        panel.grid(alpha=0.3)
        if panel.get_legend_handles_labels()[0]:
            panel.legend(fontsize='small')
    figure.suptitle(title)
    # no Software entry: the bytes depend on the curves alone (and matplotlib's version)
    figure.savefig(path, dpi=100, metadata={'Software': None})

def report_committed(suite, results, root):
    """The plot, assets/study_<suite>.md and the README section between the study-<suite> markers,
    from the committed logs alone."""
    phases, best_adam, best_sophia, best_muon = plan(suite, results.final_loss)
    bests = (best_adam, best_sophia, best_muon)
    known = known_runs(suite, results)
    results.check_consistent(known)
    done = [spec for spec in known if results.done(spec)]
    parts = [setup_text(suite)]
    parts.append(provenance_text(suite, [results.record(spec) for spec in done]) if done else
                 "No run has been made yet: there are no results.")
    missing = missing_text(suite, results, phases)
    if missing:
        parts.append(missing)
    if best_adam:  # each optimizer against AdamW as soon as both sweeps are complete
        parts += [seeds_text(suite, results, best_adam, spec, label)
                  for spec, label in ((best_sophia, 'Sophia-G'), (best_muon, 'Muon')) if spec]
    settings = []  # (label, line style, spec at the first seed) of the chosen settings
    if all(bests):
        parts.append(standing_text(suite, results, bests))
        cheap = replace(best_sophia, hess_micro_steps=quarter_hessian(suite))
        settings = [('AdamW', '--', best_adam), ('Sophia-G', '-', best_sophia),
                    ('Muon', '-.', best_muon)]
        if suite.ablation:
            settings.append((f'Sophia-G, hess_micro_steps={quarter_hessian(suite)}', ':', cheap))
            parts.append(ablation_text(suite, results, best_sophia, cheap))
        parts.append(throughput_text(suite, results, settings))
        parts.append(win_rate_text(suite, results, settings))
    parts = [part for part in parts if part]  # a text with nothing to say yet is None
    if done:
        sweeps = sweep_runs(phases)
        parts.append(f"Learning-rate and rho sweeps (seed {suite.seeds[0]}):\n\n" +
                     sweep_table(suite, results, sweeps, bests))

    # the curves: the chosen settings over their seeds once chosen, else every finished run
    if settings:
        groups = [(label, style, finished_seeds(suite, results, spec)) for label, style, spec in settings]
    else:
        groups = [(run_name(suite, spec), compare.LINE_STYLES[spec.optimizer], [results.load(spec)])
                  for spec in done]
    groups = [group for group in groups if group[2]]
    sweep_points = [(label, [(spec.lr, results.final_loss(spec)) for spec in phases[0].specs
                             if spec.optimizer == optimizer and results.done(spec)])
                    for label, optimizer in (('AdamW', 'adamw'),
                                             (f'Sophia-G, rho {suite.rho:g}', 'sophiag'),
                                             ('Muon', 'muon'))]
    plot_path = os.path.join(root, 'assets', f'study_{suite.name}.png')
    os.makedirs(os.path.join(root, 'assets'), exist_ok=True)
    if groups:
        plot_study(plot_path, f"python study.py --suite={suite.name}: val loss, win rate, learning-rate sweeps "
                   f"(seed {suite.seeds[0]})", groups, sweep_points)
        parts.append(f"![val loss against tokens and seconds, win rate, sweeps](assets/study_{suite.name}.png)")
    elif os.path.exists(plot_path):
        os.remove(plot_path)  # no run to show: a plot left from logs since removed would mislead
    section = '\n' + '\n\n'.join(parts) + '\n'
    readme = write_section(root, f'study-{suite.name}', section)
    print(section)
    print(f"wrote assets/study_{suite.name}.md" + (f", assets/study_{suite.name}.png" if groups else '') +
          (", README.md" if readme else ""))

# -----------------------------------------------------------------------------
# running a study

def prepare_dataset(dataset):
    """data/<name>/ is prepared by its own script when its token files are missing."""
    if os.sep in dataset or os.path.exists(os.path.join(ROOT, 'data', dataset, 'train.bin')):
        return
    status = subprocess.run([sys.executable, os.path.join(ROOT, 'data', dataset, 'prepare.py')]).returncode
    if status != 0:
        raise SystemExit(status)  # the prepare script has said why

def corpus_of(dataset):
    """What data/python_code/prepare.py recorded of the corpus: the runs' records carry it."""
    data_dir = dataset if os.sep in dataset else os.path.join(ROOT, 'data', dataset)
    with open(os.path.join(data_dir, 'meta.pkl'), 'rb') as f:
        meta = pickle.load(f)
    if 'fingerprint' not in meta:
        raise SystemExit(f"error: {data_dir}/meta.pkl records no fingerprint of its text: make the corpus "
                         f"with data/python_code/prepare.py, which records one")
    return dict(dataset=dataset, fingerprint=meta['fingerprint'], interpreter=meta['interpreter'],
                files=meta['files'], train_tokens=meta['train_tokens'], val_tokens=meta['val_tokens'])

def train_cpu(suite, results, jobs):
    """Make the missing runs phase by phase, `jobs` side by side."""
    prepare_dataset(suite.config['dataset'])
    os.makedirs(results.out_root, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    while (found := missing_runs(suite, results)):
        number, phase, missing = found
        print(f"{number}. {phase.title}")
        with ThreadPoolExecutor(jobs) as pool:
            list(pool.map(lambda spec: train(suite, spec, results.out_root, threads), missing))

def train_committed(suite, results, max_runs, time_budget):
    """Make the missing runs one at a time, committing each as soon as it ends; stop after
    max_runs, or before a run that may not end within time_budget seconds of the start (judged
    by the longest run so far)."""
    started = time.time()
    if suite.config['device'].startswith('cuda'):
        import torch
        if not torch.cuda.is_available():
            raise SystemExit(f"error: the {suite.name} suite trains on a CUDA GPU and this machine has none; "
                             f"--report_only makes the report from the committed logs")
    prepare_dataset(suite.config['dataset'])
    corpus = corpus_of(suite.config['dataset'])
    fingerprint = results.check_consistent(known_runs(suite, results))
    if fingerprint not in (None, corpus['fingerprint']):
        raise SystemExit(f"error: the runs in {results.log_dir} were trained on corpus {fingerprint[:16]}, "
                         f"{suite.config['dataset']} here is {corpus['fingerprint'][:16]} ({corpus['interpreter']}): "
                         f"prepare it with the same interpreter and packages, or remove those logs to start again")
    os.makedirs(results.out_root, exist_ok=True)
    trained = 0
    while (found := missing_runs(suite, results)):
        number, phase, missing = found
        if max_runs is not None and trained >= max_runs:
            print(f"stopping: --max_runs={max_runs} runs made; run again for the next ones")
            return
        walls = [results.record(spec)['wall_seconds'] for spec in known_runs(suite, results) if results.done(spec)]
        longest = max((wall for wall in walls if wall is not None), default=None)
        if time_budget is not None and longest is not None and time.time() - started + longest > time_budget:
            print(f"stopping after {trained} runs: the next may take {longest:.0f} s, more than what is left "
                  f"of --time_budget; run again for the next ones")
            return
        print(f"{number}. {phase.title}: {len(missing)} of {phase.count} missing")
        # a toy model on a CPU gains nothing from more threads, and on a shared machine they contend
        threads = (os.cpu_count() or 1) if suite.config['device'].startswith('cuda') else 1
        out_dir, status, seconds, command = train(suite, missing[0], results.out_root, threads)
        results.commit(missing[0], out_dir, status, seconds, command, corpus)
        trained += 1
    print("every run of the study is done")

def print_plan(suite, results):
    for number, phase in enumerate(plan(suite, results.final_loss)[0], start=1):
        if phase.specs is None:
            print(f"{number}. {phase.title}: {phase.count} runs, chosen when {phase.chosen_when}")
            continue
        print(f"{number}. {phase.title}: {phase.count} runs")
        for spec in phase.specs:
            out_dir = os.path.join(results.out_root, run_name(suite, spec))
            print(f"   done    {run_name(suite, spec)}" if results.done(spec) else
                  f"   to run  {shown_command(run_command(suite, spec, out_dir))}")

def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--suite', choices=list(SUITES), default='cpu',
                        help='cpu (default), gpu, or tiny (the gpu procedure at toy size, for tests)')
    parser.add_argument('--root', default=ROOT,
                        help='the folder whose study/, assets/ and README.md take the results and whose '
                             'out-study*/ the runs (default: this repository)')
    parser.add_argument('--dataset', default=None, help="the corpus: a folder of data/ or a path (default: the suite's)")
    parser.add_argument('--jobs', type=int, default=2, help='cpu: runs side by side')
    parser.add_argument('--max_runs', type=int, default=None, help='gpu, tiny: train at most this many runs now')
    parser.add_argument('--time_budget', type=float, default=None,
                        help='gpu, tiny: seconds; start no run that may not end within them')
    parser.add_argument('--dry_run', action='store_true', help='list the runs, train nothing')
    parser.add_argument('--report_only', action='store_true', help='no training: the report from the finished runs')
    args = parser.parse_args()
    suite = SUITES[args.suite]
    if args.dataset:
        suite = replace(suite, config=dict(suite.config, dataset=args.dataset))
    results = Results(suite, os.path.abspath(args.root))
    if args.dry_run:
        print_plan(suite, results)
        return
    started = time.time()
    if suite.committed:
        if not args.report_only:
            train_committed(suite, results, args.max_runs, args.time_budget)
        report_committed(suite, results, results.root)
        return
    if not args.report_only:
        train_cpu(suite, results, args.jobs)
    found = missing_runs(suite, results)
    if found:
        raise SystemExit(f"error: phase {found[0]} of the study is not finished ({len(found[2])} runs "
                         f"missing in {results.out_root}); run python study.py")
    phases, *bests = plan(suite, results.final_loss)
    runs = [spec for phase in phases for spec in phase.specs]
    seconds = sum(results.load(spec).eval[-1]['time'] for spec in runs)
    report_cpu(suite, results, results.root, sweep_runs(phases), bests, seconds, args.jobs)
    print(f'study finished in {(time.time() - started) / 60:.1f} minutes of wall-clock')

if __name__ == '__main__':
    main()
