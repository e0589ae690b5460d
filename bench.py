"""
Throughput of Sophia-G against AdamW: one model, one batch, one device, one process.

    $ python bench.py config/train_stdlib_char_sophiag.py                      # CPU, seconds
    $ python bench.py config/train_gpt2_small_sophiag.py --total_bs=48       # 4 micro-batches of 12
    $ python bench.py config/train_stdlib_char_sophiag.py --profile=True       # + torch.profiler traces
    $ python bench.py --device=cpu --dtype=float32 --compile=False --real_data=False --n_layer=2

The config is a training config, read by the real configurator (configurator.py) over the
defaults of train_sophiag.py and the other optimizers' own keys, plus the bench_* keys below. Each optimizer gets its own copy of the
same freshly initialised model and trains on the same batches; after `bench_warmup` untimed
iterations (compilation, allocator, the first Hessian pass), `bench_iters` iterations are timed per
round, and the optimizers take turns over `bench_rounds` rounds so that a busy machine slows both
alike. Each iteration calls the training loop's own pieces (trainer.py): forward_backward over the
gradient-accumulation micro-batches, then clip_and_step (unscale, clip, the flags every process
agrees on, optimizer step, zero_grad); Sophia adds hessian_pass after every hess_interval-th step.
The sections are timed apart, with a device synchronisation at each boundary on CUDA, and

    ms/iter  = forward+backward + optimizer step + Hessian pass / hess_interval
    tokens/s = tokens per iteration / ms/iter
    MFU      = model FLOPs of every forward+backward (the Hessian pass's too) / time / peak FLOP/s

MFU needs the device's peak: looked up for known GPUs (model.device_peak_flops), none on a CPU
unless --peak_flops is given. The Hessian pass is a full forward+backward over hess_micro_steps
micro-batches (0: as many as the accumulation), so from the arithmetic alone Sophia's tokens/s is
1 / (1 + hess_micro_steps / (accumulation * hess_interval)) of AdamW's: 0.909 with
the default schedule. The table prints that expectation beside the measured ratio.

End to end (--end_to_end=True): the real train_adam.py and train_sophiag.py run as subprocesses
with the same shape, batch and data for bench_warmup + bench_iters iterations each, alternating over
bench_rounds rounds; tokens/s is read from their metrics.jsonl, skipping the log rows that hold the
warmup (compilation, the evaluation at iteration 0). With --nanogpt=PATH, nanoGPT's train.py from a
local checkout at PATH runs too, on the same data and the same model (nanoGPT's has the exact GELU:
--gelu=exact is required), and its tokens/s comes from its printed per-iteration times. Both
scripts get the same value for every key they share; log_interval is hess_interval, so that every
log row holds exactly one Hessian pass.

    $ python bench.py config/train_stdlib_char_sophiag.py --end_to_end=True --bench_iters=200 \\
        --bench_warmup=20 --gelu=exact --nanogpt=/path/to/nanoGPT
"""

import copy
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile, record_function

import trainer
from batches import REPO, TokenFiles, data_dir_of, model_vocab_size, open_dataset
from configurator import Checks, ConfigError, UserError, batch_plan, check_config, parse_args
from distributed import setup_distributed
from optimizers import RECIPES, SophiaGRecipe
from resume import build_model

OPTIMIZERS = {name: recipe.script for name, recipe in RECIPES.items()}
# the Hessian passes read the data stream from this sequence on, so the training iterations of
# both optimizers read identical batches (iteration n reads sequences n * total_bs onwards)
HESSIAN_SEQUENCES = 1 << 40

def bench_defaults():
    """Sophia-G's defaults (every shared key at its value), the other optimizers' own keys, and
    the bench keys."""
    config = SophiaGRecipe.defaults()
    for recipe in RECIPES.values():
        config.update({key: value for key, value in recipe.defaults().items() if key not in config})
    config.update(out_dir='out-bench', wandb_run_name='bench')
    config.update(
        bench_iters=20,  # timed iterations per optimizer and round (end to end: per script and round)
        bench_warmup=5,  # untimed iterations first: compilation, first-use costs (end to end: skipped rows)
        bench_rounds=2,  # the optimizers take turns this many times: noise on a shared machine hits all
        optimizers='sophiag,adamw',  # comma-separated, from sophiag, adamw and muon
        real_data=True,  # True: the config's dataset via batches.get_batch; False: random tokens, no data needed
        synthetic_vocab_size=50304,  # vocabulary of the random tokens (real_data=False)
        profile=False,  # also profile a few iterations per optimizer: chrome trace in out_dir, top ops printed
        end_to_end=False,  # run the real training scripts instead (see the module docstring)
        nanogpt='',  # end to end: also run train.py of a nanoGPT checkout at this path
        json_out='',  # also write the results to this JSON file (end to end: after every run)
    )
    return config

def check_bench_config(config, sources):
    """The bench keys' own checks, on top of the training config's (configurator.check_config)."""
    def show(key):
        return f"{key}={config[key]!r} ({sources.get(key, 'default')})"
    for key in ('bench_iters', 'bench_rounds'):
        if config[key] <= 0:
            raise ConfigError(f"{show(key)}: must be > 0")
    if config['bench_warmup'] < 0:
        raise ConfigError(f"{show('bench_warmup')}: must be >= 0")
    names = [name.strip() for name in config['optimizers'].split(',') if name.strip()]
    if not names or any(name not in OPTIMIZERS for name in names) or len(set(names)) != len(names):
        raise ConfigError(f"{show('optimizers')}: expected a comma-separated list of distinct names "
                          f"from {', '.join(OPTIMIZERS)}")
    if not 1 <= config['synthetic_vocab_size'] <= 65536:
        raise ConfigError(f"{show('synthetic_vocab_size')}: must be in 1..65536 (tokens are stored as uint16)")
    if config['init_from'] == 'resume':
        raise ConfigError(f"{show('init_from')}: the benchmark builds fresh models; use scratch or a GPT-2 name")
    if config['end_to_end'] and config['profile']:
        raise ConfigError(f"{show('profile')}: profiling is for the in-process benchmark; drop --end_to_end "
                          f"or --profile")
    if config['nanogpt']:
        if not config['end_to_end']:
            raise ConfigError(f"{show('nanogpt')}: nanoGPT is run end to end only; add --end_to_end=True")
        # the same model: nanoGPT's GPT has the exact GELU and no per-layer attention scaling
        if config['gelu'] != 'exact':
            raise ConfigError(f"{show('gelu')}: nanoGPT's model uses the exact GELU; for the same model "
                              f"add --gelu=exact")
        if config['scale_attn_by_inverse_layer_idx']:
            raise ConfigError(f"{show('scale_attn_by_inverse_layer_idx')}: nanoGPT has no such scaling; "
                              f"compare with --scale_attn_by_inverse_layer_idx=False")
        missing = [name for name in ('train.py', 'model.py', 'configurator.py')
                   if not os.path.isfile(os.path.join(config['nanogpt'], name))]
        if missing:
            raise ConfigError(f"{show('nanogpt')}: {missing[0]} not found there; point it at a nanoGPT checkout")
    return names

def expected_ratio(config, plan):
    """Sophia's tokens/s over AdamW's from the forward/backward work alone: the Hessian pass adds
    hess_micro_steps micro-batches every hess_interval iterations of plan.micro_steps."""
    return 1 / (1 + SophiaGRecipe(config, plan).hess_micro_steps / (plan.micro_steps * config['hess_interval']))

def describe_schedule(config, plan):
    return (f"a Hessian pass of {SophiaGRecipe(config, plan).hess_micro_steps} micro-batches every {config['hess_interval']} "
            f"iterations of {plan.micro_steps}")

def write_json(config, results):
    """results to config['json_out'] when set, written whole under a temporary name and renamed, so
    a reader (or a run killed mid-write) never sees half a file."""
    if not config['json_out']:
        return
    with open(config['json_out'] + '.tmp', 'w') as f:
        json.dump(results, f, indent=1)
    os.replace(config['json_out'] + '.tmp', config['json_out'])

# -----------------------------------------------------------------------------
# in one process

def sync_time(device):
    """time.perf_counter() once the device has finished all work queued so far."""
    if device.startswith('cuda'):
        torch.cuda.synchronize(device)
    return time.perf_counter()

def random_token_files(folder, vocab_size, block_size, seed):
    """train.bin / val.bin of uniformly random tokens, so the same get_batch (and the Hessian pass,
    which draws its own batches through it) runs on them unchanged."""
    rng = np.random.default_rng(seed)
    tokens = max(1 << 20, 4 * (block_size + 1))
    for split in ('train', 'val'):
        rng.integers(0, vocab_size, size=tokens, dtype=np.uint16).tofile(os.path.join(folder, f'{split}.bin'))

class OptimizerBench:
    """One optimizer on its own copy of the model; runs iterations with the training loop's own
    pieces (trainer.forward_backward, clip_and_step, the recipe's hessian_pass) and adds up the time
    of each."""

    def __init__(self, name, model, config, plan, device, paths, vocab_size):
        self.name, self.config = name, config
        device_type = 'cuda' if device.startswith('cuda') else device
        ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[config['dtype']]
        autocast = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type, dtype=ptdtype)
        raw_model = copy.deepcopy(model).to(device)  # deepcopy keeps the tied wte/lm_head tied
        recipe = RECIPES[name](config, plan)
        optimizer = recipe.build(raw_model, device_type)
        scaler = torch.amp.GradScaler(device_type, enabled=config['dtype'] == 'float16')
        compiled = torch.compile(raw_model) if config['compile'] else raw_model
        data = TokenFiles(paths, config['dataset'], vocab_size, config['batch_size'], config['block_size'], device)
        self.run = trainer.Run(config, recipe, compiled, raw_model, optimizer, scaler, autocast, plan, data,
                               rank=0, world_size=1)
        self.hessian = isinstance(recipe, SophiaGRecipe)  # its pass is timed on its own
        self.iter_num, self.hessian_passes = 0, 0
        self.iters_timed, self.passes_timed = 0, 0
        self.seconds = {'forward_backward': 0.0, 'step': 0.0, 'hessian': 0.0}

    def iteration(self, timed):
        """One training iteration without the Hessian pass."""
        run = self.run
        trainer.set_lr(run, self.iter_num)
        start = sync_time(run.device)
        with record_function('forward_backward'):
            loss = trainer.forward_backward(run, self.iter_num * run.plan.sequences)
        middle = sync_time(run.device)
        with record_function('optimizer_step'):
            trainer.clip_and_step(run, loss, stop_requested=False)
        end = sync_time(run.device)
        self.iter_num += 1
        if timed:
            self.seconds['forward_backward'] += middle - start
            self.seconds['step'] += end - middle
            self.iters_timed += 1

    def hessian_pass(self, timed):
        run = self.run
        start = sync_time(run.device)
        with record_function('hessian_pass'):
            run.recipe.hessian_pass(run, HESSIAN_SEQUENCES + self.hessian_passes * run.recipe.hess_sequences)
        end = sync_time(run.device)
        self.hessian_passes += 1
        if timed:
            self.seconds['hessian'] += end - start
            self.passes_timed += 1

    def run_iterations(self, iters, timed):
        """`iters` iterations with the training loop's Hessian schedule: a pass after every
        hess_interval-th step."""
        for _ in range(iters):
            self.iteration(timed)
            if self.hessian and self.run.recipe.hessian_due(self.iter_num - 1):
                self.hessian_pass(timed)

    def warmup(self):
        """Untimed: compilation (the Hessian pass's full-logits forward is a graph of its own),
        the optimizer state, the fused kernels, the allocator."""
        if self.config['bench_warmup'] == 0:
            return
        self.run_iterations(self.config['bench_warmup'], timed=False)
        if self.hessian:
            self.hessian_pass(timed=False)

    def results(self, tokens_per_iter, peak_flops):
        ms = {key: 1000 * seconds / self.iters_timed for key, seconds in self.seconds.items()}
        row = {'optimizer': self.name, 'forward_backward_ms': ms['forward_backward'], 'step_ms': ms['step'],
               'hessian_ms_per_pass': None, 'hessian_ms_per_iter': None, 'hessian_share': None}
        ms_per_iter = ms['forward_backward'] + ms['step']
        tokens_computed = tokens_per_iter  # tokens through a forward+backward per iteration, for MFU
        if self.hessian:
            per_pass = 1000 * self.seconds['hessian'] / self.passes_timed
            row['hessian_ms_per_pass'] = per_pass
            row['hessian_ms_per_iter'] = per_pass / self.config['hess_interval']
            ms_per_iter += row['hessian_ms_per_iter']
            row['hessian_share'] = row['hessian_ms_per_iter'] / ms_per_iter
        tokens_computed += self.run.recipe.extra_tokens_per_iter(self.run)
        row['ms_per_iter'] = ms_per_iter
        row['tokens_per_s'] = tokens_per_iter / (ms_per_iter / 1000)
        raw_model = self.run.raw_model
        row['mfu'] = raw_model.estimate_mfu(tokens_computed / raw_model.config.block_size, ms_per_iter / 1000,
                                            peak_flops)
        return row

    def profile(self, out_dir, device):
        """Two iterations (and a Hessian pass for Sophia) under torch.profiler: a chrome trace in
        out_dir (open it in chrome://tracing or ui.perfetto.dev) and the top ops printed."""
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith('cuda') else [])
        with profile(activities=activities) as prof:
            for _ in range(2):
                self.iteration(timed=False)
            if self.hessian:
                self.hessian_pass(timed=False)
        path = os.path.join(out_dir, f'bench-trace-{self.name}.json')
        prof.export_chrome_trace(path)
        sort_by = 'self_device_time_total' if device.startswith('cuda') else 'self_cpu_time_total'
        print(f"\n{self.name}: top ops of 2 iterations{' and a Hessian pass' if self.hessian else ''} "
              f"(trace: {path})")
        print(prof.key_averages().table(sort_by=sort_by, row_limit=15))

def format_table(rows):
    columns = [('optimizer', 'optimizer', '{}'), ('ms/iter', 'ms_per_iter', '{:.2f}'),
               ('tokens/s', 'tokens_per_s', '{:,.0f}'), ('MFU', 'mfu', '{:.1%}'),
               ('fwd+bwd ms', 'forward_backward_ms', '{:.2f}'), ('step ms', 'step_ms', '{:.2f}'),
               ('hessian ms/pass', 'hessian_ms_per_pass', '{:.2f}'),
               ('hessian ms/iter', 'hessian_ms_per_iter', '{:.2f}'), ('hessian share', 'hessian_share', '{:.1%}')]
    cells = [[title for title, _, _ in columns]]
    for row in rows:
        cells.append(['-' if row[key] is None else fmt.format(row[key]) for _, key, fmt in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return '\n'.join('  '.join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
                     for line in cells)

def bench(config, plan, names):
    """The in-process benchmark; prints the table and returns its rows."""
    if int(os.environ.get('WORLD_SIZE', 1)) > 1:
        raise UserError("bench.py runs in one process; start it with python, not torchrun")
    _, _, device = setup_distributed(config)
    if device.startswith('cuda'):  # TF32 for float32 matmuls, as the training loop sets it
        torch.backends.cuda.matmul.fp32_precision = 'tf32'
        torch.backends.cudnn.conv.fp32_precision = 'tf32'
    with tempfile.TemporaryDirectory(prefix='bench-tokens-') as scratch:
        if config['real_data']:
            try:
                dataset_vocab, paths = open_dataset(config['dataset'], config['block_size'])
            except UserError as e:
                raise UserError(f"{e}; or benchmark on random tokens with --real_data=False")
            run_config = config
        else:
            random_token_files(scratch, config['synthetic_vocab_size'], config['block_size'], config['seed'])
            _, paths = open_dataset(scratch, config['block_size'])
            dataset_vocab = config['synthetic_vocab_size']
            run_config = dict(config, dataset=scratch)  # named in the errors get_batch may raise

        torch.manual_seed(config['seed'])
        model, model_args = build_model(config, dataset_vocab, None)
        vocab_size = model_args['vocab_size']
        benches = [OptimizerBench(name, model, run_config, plan, device, paths, vocab_size) for name in names]
        del model
        tokens_per_iter = plan.sequences * config['block_size']
        print(f"device {device}, dtype {config['dtype']}, compile {config['compile']}, "
              f"{benches[0].run.raw_model.get_num_params() / 1e6:.2f}M parameters, "
              f"{'data ' + config['dataset'] if config['real_data'] else 'random tokens'}, tokens per iteration: "
              f"{plan.micro_steps} accumulation x {config['batch_size']} batch x "
              f"{config['block_size']} block = {tokens_per_iter:,}" +
              (f"; sophiag: {describe_schedule(config, plan)}" if 'sophiag' in names else ''), flush=True)
        for b in benches:
            b.warmup()
        for round_index in range(config['bench_rounds']):
            for b in (benches if round_index % 2 == 0 else benches[::-1]):
                b.run_iterations(config['bench_iters'], timed=True)
        for b in benches:
            while b.hessian and b.passes_timed < 2:  # too few iterations for the schedule to time a pass
                b.hessian_pass(timed=True)

        peak = config['peak_flops'] or None
        if peak is None and device.startswith('cuda'):
            from model import device_peak_flops
            peak = device_peak_flops(device, config['dtype'])
        rows = [b.results(tokens_per_iter, peak) for b in benches]
        print(f"\n{config['bench_iters']} timed iterations x {config['bench_rounds']} rounds per optimizer, "
              f"after {config['bench_warmup']} untimed"
              + ("" if peak else "; MFU needs --peak_flops on this device"))
        print(format_table(rows))
        by_name = {row['optimizer']: row for row in rows}
        if 'sophiag' in by_name and 'adamw' in by_name:
            ratio = by_name['sophiag']['tokens_per_s'] / by_name['adamw']['tokens_per_s']
            print(f"sophiag / adamw tokens/s: {ratio:.3f} (the forward/backward arithmetic alone predicts "
                  f"{expected_ratio(config, plan):.3f}: {describe_schedule(config, plan)})")
        write_json(config, dict(mode='in_process', device=device, dtype=config['dtype'],
                                compile=config['compile'], tokens_per_iter=tokens_per_iter,
                                parameters=benches[0].run.raw_model.get_num_params(),
                                peak_flops=peak, expected_ratio=expected_ratio(config, plan),
                                rows=rows))
        if config['profile']:
            os.makedirs(config['out_dir'], exist_ok=True)
            for b in benches:
                b.profile(config['out_dir'], device)
    return rows

# -----------------------------------------------------------------------------
# end to end: the real scripts as subprocesses

def script_overrides(config, script_defaults, run):
    """--key=value for every key the script has, from the resolved config, with `run`'s values
    (out_dir, iteration counts, logging) on top."""
    values = {key: config[key] for key in script_defaults}
    values.update(run)
    return [f'--{key}={value}' for key, value in values.items()]

def nanogpt_data(config, dataset_vocab, scratch):
    """The data folder nanoGPT reads. nanoGPT takes its vocabulary from meta.pkl as it is, and
    50304 without one; this repository pads GPT-2's 50257 to 50304 (batches.model_vocab_size). For
    GPT-2 BPE nanoGPT gets the token files without meta.pkl, so both models have 50304 rows (the
    lm_head of 50257 rows is the slower shape on a GPU)."""
    data_dir = os.path.abspath(data_dir_of(config['dataset']))
    ours = model_vocab_size(dataset_vocab)
    if dataset_vocab is None or ours == dataset_vocab:
        return data_dir
    if ours != 50304:
        raise UserError(f"dataset {config['dataset']}: nanoGPT would model its {dataset_vocab} "
                        f"tokens, this repository {ours}; compare on GPT-2 BPE or characters")
    folder = os.path.join(scratch, 'nanogpt-data')
    os.makedirs(folder)
    for name in ('train.bin', 'val.bin'):
        os.symlink(os.path.join(data_dir, name), os.path.join(folder, name))
    return folder

def nanogpt_overrides(config, plan, run, data_dir):
    """The same model, batch, data and schedule in nanoGPT's train.py's config keys."""
    keys = ('batch_size', 'block_size', 'n_layer', 'n_head', 'n_embd',
            'dropout', 'bias', 'device', 'dtype', 'compile', 'learning_rate', 'weight_decay', 'beta1',
            'beta2', 'grad_clip', 'decay_lr', 'warmup_iters', 'lr_decay_iters', 'min_lr')
    values = {key: config[key] for key in keys}
    values.update(
        # nanoGPT reads data/<dataset>; an absolute path wins over the 'data' prefix in os.path.join
        dataset=data_dir,
        gradient_accumulation_steps=plan.micro_steps,  # one process: nanoGPT's count is the same
        out_dir=run['out_dir'],
        max_iters=run['max_iters'] - 1,  # nanoGPT runs iterations 0..max_iters
        eval_interval=10 ** 9,  # evaluate at iteration 0 only
        eval_iters=1, log_interval=1, wandb_log=False, always_save_checkpoint=False)
    return [f'--{key}={value}' for key, value in values.items()]

def run_program(command, cwd):
    env = dict(os.environ, PYTHONUNBUFFERED='1', WANDB_MODE='disabled')
    env.pop('WORLD_SIZE', None)
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        tail = (result.stderr.strip() or result.stdout.strip()).splitlines()[-1:] or ['no output']
        raise UserError(f"{' '.join(command[1:3])} (in {cwd}) failed with exit status "
                                f"{result.returncode}: {tail[0]}")
    return result.stdout

def metrics_throughput(out_dir, skip_rows, tokens_per_iter):
    """(tokens/s, MFU) over the train rows of metrics.jsonl after the first skip_rows: the mean
    ms/iter of the rows (each covers log_interval iterations, so this is total time over total
    iterations), and their MFU weighted by time (total model FLOPs over total time; None where the
    script knew no peak)."""
    with open(os.path.join(out_dir, 'metrics.jsonl')) as f:
        rows = [json.loads(line) for line in f]
    kept = [row for row in rows if row['kind'] == 'train'][skip_rows:]
    ms = sum(row['ms_per_iter'] for row in kept)
    mfu = None if kept[0]['mfu'] is None else sum(row['mfu'] * row['ms_per_iter'] for row in kept) / ms
    return tokens_per_iter / (ms / len(kept) / 1000), mfu

def nanogpt_throughput(stdout, skip_iters, tokens_per_iter):
    """tokens/s from nanoGPT's "iter N: loss L, time T ms, ..." lines, from iteration skip_iters on."""
    times = [float(ms) for it, ms in re.findall(r'^iter (\d+): loss \S+, time ([\d.]+)ms', stdout, re.M)
             if int(it) >= skip_iters]
    if not times:
        raise UserError("nanoGPT's train.py printed no 'iter N: ... time X ms' lines after the warmup; "
                                "is PATH a nanoGPT checkout?")
    return tokens_per_iter / (sum(times) / len(times) / 1000)

def end_to_end(config, plan, names):
    """Run the training scripts (and nanoGPT) side by side, bench_rounds times; print tokens/s."""
    dataset_vocab, _ = open_dataset(config['dataset'], config['block_size'])  # real data needed
    if config['nanogpt'] and config['init_from'] != 'scratch':
        raise UserError(f"the nanoGPT comparison starts from scratch; drop --init_from={config['init_from']}")
    log_interval = config['hess_interval']  # every log row holds exactly one Hessian pass
    skip_rows = max(1, math.ceil(config['bench_warmup'] / log_interval))  # row 1 holds the eval at iteration 0
    max_iters = (skip_rows + math.ceil(config['bench_iters'] / log_interval)) * log_interval
    tokens_per_iter = plan.sequences * config['block_size']
    defaults = {name: RECIPES[name].defaults() for name in names}
    # nanoGPT first, the baseline: a run cut short (gpu_check.py caps it) loses the last script
    programs = ([('nanoGPT train.py', 'nanogpt')] if config['nanogpt'] else []) + \
        [(OPTIMIZERS[name], name) for name in names]
    print(f"end to end: iterations {skip_rows * log_interval}..{max_iters - 1} of {max_iters} timed per run "
          f"(the first {skip_rows * log_interval} hold compilation and the evaluation at iteration 0), "
          f"{tokens_per_iter:,} tokens per iteration, {config['bench_rounds']} rounds"
          + (f"; sophiag: {describe_schedule(config, plan)}" if 'sophiag' in names else ''), flush=True)
    if config['nanogpt'] and config['device'] == 'cpu' and config['dtype'] != 'float32':
        print(f"note: nanoGPT does not autocast on a CPU: it runs float32, the scripts {config['dtype']}")
    measured = {label: [] for label, _ in programs}
    mfus = {}  # MFU per round as the scripts logged it (the Hessian pass's forward+backward counted)
    commands = {}
    with tempfile.TemporaryDirectory(prefix='bench-e2e-') as scratch:
        nanogpt_dir = nanogpt_data(config, dataset_vocab, scratch) if config['nanogpt'] else None
        for round_index in range(config['bench_rounds']):
            for label, kind in (programs if round_index % 2 == 0 else programs[::-1]):
                out_dir = os.path.join(scratch, f'{kind}-{round_index}')
                run = dict(out_dir=out_dir, max_iters=max_iters, log_interval=log_interval, total_bs=plan.sequences,
                           eval_interval=max_iters, eval_iters=1, checkpoint_interval=max_iters,
                           wandb_log=False)
                if kind == 'nanogpt':
                    command = [sys.executable, 'train.py'] + \
                        nanogpt_overrides(config, plan, run, nanogpt_dir)
                    stdout = run_program(command, config['nanogpt'])
                    tokens_per_s = nanogpt_throughput(stdout, skip_rows * log_interval, tokens_per_iter)
                    mfu = None  # nanoGPT's own MFU counts differently; its tokens/s is what compares
                else:
                    command = [sys.executable, OPTIMIZERS[kind]] + script_overrides(config, defaults[kind], run)
                    run_program(command, REPO)
                    tokens_per_s, mfu = metrics_throughput(out_dir, skip_rows, tokens_per_iter)
                    if mfu is not None:
                        mfus.setdefault(label, []).append(mfu)
                measured[label].append(tokens_per_s)
                commands[label] = ' '.join(command[1:]).replace(out_dir, 'OUT_DIR')
                write_json(config, dict(mode='end_to_end', device=config['device'],
                                        dtype=config['dtype'], compile=config['compile'],
                                        tokens_per_iter=tokens_per_iter,
                                        expected_ratio=expected_ratio(config, plan),
                                        tokens_per_s=measured, mfu=mfus, commands=commands))
                print(f"round {round_index + 1}: {label}: {tokens_per_s:,.0f} tokens/s"
                      + (f", MFU {mfu:.1%}" if mfu is not None else ''), flush=True)

    # the mean over rounds of time per token, as tokens/s
    mean = {label: len(values) / sum(1 / v for v in values) for label, values in measured.items()}
    width = max(len(label) for label in measured)
    print('\n' + f"{'program':<{width}}  " + '  '.join(f"{f'round {i + 1}':>10}" for i in range(config['bench_rounds']))
          + f"  {'mean':>10}")
    for label, values in measured.items():
        print(f"{label:<{width}}  " + '  '.join(f"{v:>10,.0f}" for v in values) + f"  {mean[label]:>10,.0f}"
              + (f"  MFU {statistics.mean(mfus[label]):.1%}" if label in mfus else ''))
    sophia, adam = OPTIMIZERS['sophiag'], OPTIMIZERS['adamw']
    if sophia in measured and adam in measured:
        ratios = [s / a for s, a in zip(measured[sophia], measured[adam])]
        print(f"{sophia} / {adam} tokens/s: {mean[sophia] / mean[adam]:.3f} (rounds: "
              f"{', '.join(f'{r:.3f}' for r in ratios)}; median {statistics.median(ratios):.3f}); "
              f"the forward/backward arithmetic alone predicts {expected_ratio(config, plan):.3f}: {describe_schedule(config, plan)}")
    if 'nanoGPT train.py' in measured:
        for label in (adam, sophia):
            if label in measured:
                ratios = [s / n for s, n in zip(measured[label], measured['nanoGPT train.py'])]
                print(f"{label} / nanoGPT train.py tokens/s: {mean[label] / mean['nanoGPT train.py']:.3f} "
                      f"(rounds: {', '.join(f'{r:.3f}' for r in ratios)}; median {statistics.median(ratios):.3f})")
    print("commands (OUT_DIR: a temporary directory per run):")
    for label, command in commands.items():
        where = f"cd {config['nanogpt']} && " if label == 'nanoGPT train.py' else ''
        print(f"  {where}python {command}")
    return mean

def main(argv):
    try:
        config, sources = parse_args(bench_defaults(), argv)
        check_config(config, sources)
        plan = batch_plan(config, sources, world_size=1)
        names = check_bench_config(config, sources)
        for name in names:  # each optimizer's own keys, and what it cannot do
            RECIPES[name].check(config, Checks(config, sources), 1)
        if config['end_to_end']:
            end_to_end(config, plan, names)
        else:
            bench(config, plan, names)
    except UserError as e:  # ConfigError too
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)

if __name__ == '__main__':
    main(sys.argv[1:])
