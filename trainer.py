"""
The training loop of train_adam.py, train_sophiag.py and train_muon.py, written once. It names no
optimizer: what differs between them is each one's recipe (optimizers.py).

An iteration: each process runs its micro-batches (forward_backward), the gradient is unscaled and
clipped, every process agrees on skipping a non-finite step and on stopping (clip_and_step), the
optimizer steps, then the recipe's extra pass runs where due. Evaluations and checkpoints happen at
the top of an iteration. `train` reads top to bottom; bench.py times the same pieces. Around it:
configurator.py (config), batches.py (data), resume.py (where a run starts), distributed.py
(processes, FSDP, signals), metrics.py (logs), checkpoint.py (crash-safe files).
"""

import math
import os
import signal
import sys
import time
from contextlib import nullcontext, suppress
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
import distributed
import hellaswag
import resume
from batches import EVAL_STREAMS, TRAIN_STREAM, TokenFiles, check_token_ids, get_batch, open_dataset
from configurator import (UserError, batch_plan, check_config, default_config, describe_defaults,
                          fit_schedule, format_config, format_help, parse_args, wants_help)
from distributed import SignalFlag, is_communication_failure, set_gradient_sync, whole
from metrics import IntervalLog, MetricsLog, describe_batch, summary
from model import device_peak_flops

class TrainingStopped(Exception):
    """The run stopped on purpose (a signal, too many non-finite iterations); exit status given."""
    def __init__(self, message, status):
        super().__init__(message)
        self.status = status

@dataclass
class Run:
    """What the loop's pieces share; fixed for the run."""
    config: dict
    recipe: object  # the optimizer's (optimizers.Recipe)
    model: torch.nn.Module  # what runs forward and backward: compiled and DDP-wrapped as configured
    raw_model: torch.nn.Module  # the GPT itself: parameters, state dict, MFU
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: object
    plan: object  # configurator.BatchPlan
    data: TokenFiles
    rank: int
    world_size: int
    hellaswag: list = None  # the HellaSwag items scored at every evaluation (hellaswag=True)
    params: list = field(init=False)
    flags: torch.Tensor = field(init=False)  # (non-finite step, stop requested), agreed on every iteration

    def __post_init__(self):
        self.params = list(self.raw_model.parameters())
        self.flags = torch.zeros(2, device=self.device)  # allocated once, written in place

    @property
    def device(self):
        return self.data.device

    @property
    def sharded(self):
        """FSDP or HSDP: parameters, gradients and optimizer state are sharded DTensors."""
        return self.config['data_parallel'] != 'ddp'

    @property
    def tokens_per_iter(self):
        return self.plan.sequences * self.config['block_size']

    def batch(self, first):
        """The training batch of global sequences first .. first+batch_size-1."""
        return get_batch(self.data, 'train', self.config['seed'], TRAIN_STREAM, first)

@dataclass
class RunState:
    """What a checkpoint carries besides model, optimizer and RNG: where the run is."""
    iter_num: int = 0
    sequences_drawn: int = 0  # global count of training sequences drawn so far (steps and extra passes)
    best_val_loss: float = math.inf
    train_time: float = 0.0  # seconds spent in training iterations (not evaluating or saving)
    nonfinite_in_a_row: int = 0
    wandb_id: str = ''
    checkpoint: str = None  # the newest checkpoint written or continued from (not saved)
    eval_seconds: float = 0.0  # the last evaluation's duration, for the ETA (not saved)
    val_loss: float = None  # the last evaluation's (not saved)

    SAVED = ('iter_num', 'sequences_drawn', 'best_val_loss', 'train_time', 'nonfinite_in_a_row', 'wandb_id')

    @classmethod
    def continuing(cls, start_state, path):
        """The state a checkpoint continues from (the official scripts' and nanoGPT's hold only the
        iteration and the best val loss)."""
        saved = {key: start_state[key] for key in cls.SAVED if key in start_state}
        state = cls(checkpoint=path, **saved)
        if 'sequences_drawn' not in start_state and 'batches_drawn' in start_state:
            # written before data was drawn per sequence: micro-batches of batch_size sequences
            state.sequences_drawn = start_state['batches_drawn'] * start_state['config']['batch_size']
        return state

# -----------------------------------------------------------------------------
# the loop's pieces

def get_lr(it, config):
    """Linear warmup for warmup_iters, cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if not config['decay_lr']:
        return config['learning_rate']
    if it < config['warmup_iters']:
        return config['learning_rate'] * (it + 1) / (config['warmup_iters'] + 1)
    if it >= config['lr_decay_iters']:
        return config['min_lr']
    decay_ratio = (it - config['warmup_iters']) / (config['lr_decay_iters'] - config['warmup_iters'])
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # from 1 to 0
    return config['min_lr'] + coeff * (config['learning_rate'] - config['min_lr'])

def set_lr(run, iter_num):
    """The schedule's lr for every param group, times the group's lr_scale where it has one."""
    lr = get_lr(iter_num, run.config)
    for group in run.optimizer.param_groups:
        group['lr'] = lr * group.get('lr_scale', 1.0)
    return lr

def forward_loss(model, X, Y, autocast):
    """Mean cross-entropy of one micro-batch."""
    with autocast:
        _, loss = model(X, Y)
    return loss

def forward_backward(run, first):
    """Forward and backward over this process's micro-batches of the iteration whose global
    sequences start at `first`: the gradients (scaled by the GradScaler) averaged over the
    processes, and their mean loss returned as a 0-dim device tensor (no host sync)."""
    steps, batch_size = run.plan.micro_steps, run.config['batch_size']
    start = first + run.rank * steps * batch_size
    total = torch.zeros((), device=run.device)
    for micro_step in range(steps):
        set_gradient_sync(run, micro_step == steps - 1)
        X, Y = run.batch(start + micro_step * batch_size)
        loss = forward_loss(run.model, X, Y, run.autocast) / steps
        total += loss.detach().float()
        run.scaler.scale(loss).backward()
    return total

def clip_and_step(run, loss, stop_requested):
    """Unscale and clip the gradient, agree with the other processes, then step, or skip the step
    (parameters and optimizer state untouched) where any saw a non-finite loss or gradient.
    Returns (stepped, stop, grad_norm), the same on every process, `stop` the highest signal
    number any process got (`stop_requested`, 0 for none)."""
    scaler, optimizer = run.scaler, run.optimizer
    scaler.unscale_(optimizer)
    grad_norm = whole(torch.nn.utils.clip_grad_norm_(run.params, run.config['grad_clip'] or math.inf))
    nonfinite = ~torch.isfinite(loss)
    if not scaler.is_enabled():  # under fp16 an inf gradient is the GradScaler's to handle
        nonfinite |= ~torch.isfinite(grad_norm)
    # one small all-reduce and one host sync per iteration, in run.flags (no new tensor, no copy)
    run.flags[0] = nonfinite
    run.flags[1] = float(stop_requested)
    if run.world_size > 1:
        dist.all_reduce(run.flags, op=dist.ReduceOp.MAX)
    nonfinite, stop = run.flags.tolist()
    if not nonfinite:
        run.recipe.step(run)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return not nonfinite, int(stop), grad_norm

@torch.no_grad()
def estimate_loss(run):
    """Mean loss over the same `eval_iters` batches of each split every time, whatever the run's
    seed, split across the processes. Sharded (FSDP's forward gathers from every process), every
    process runs as many forwards, the last ones uncounted where eval_iters does not split."""
    out, config, world_size = {}, run.config, run.world_size
    run.model.eval()
    batches = -(-config['eval_iters'] // world_size) * world_size if run.sharded else config['eval_iters']
    for split in ('train', 'val'):
        total = torch.zeros((), device=run.device)
        for k in range(run.rank, batches, world_size):
            # seed 0, not config['seed']: runs with different seeds are evaluated on the same text
            X, Y = get_batch(run.data, split, 0, EVAL_STREAMS[split], k * config['batch_size'])
            loss = forward_loss(run.model, X, Y, run.autocast).float()
            if k < config['eval_iters']:
                total += loss
        if world_size > 1:
            dist.all_reduce(total)
        out[split] = total.item() / config['eval_iters']
    run.model.train()
    return out

def score_hellaswag(run):
    """HellaSwag accuracy (hellaswag.py), each process scoring its share of the items."""
    items = run.hellaswag
    if run.sharded:  # FSDP's forward gathers from every process: each runs as many
        items = items[:len(items) // run.world_size * run.world_size]
    with run.autocast:
        counts = hellaswag.score_items(run.raw_model, items, run.device, run.rank, run.world_size)
    total = torch.tensor([counts['items'], counts['acc'], counts['acc_norm']], dtype=torch.float32,
                         device=run.device)  # counts up to 2**24 are exact
    if run.world_size > 1:
        dist.all_reduce(total)
    scored, right, right_norm = total.tolist()
    return {'hellaswag/acc_norm': right_norm / scored, 'hellaswag/acc': right / scored,
            'hellaswag/items': int(scored)}

def evaluate(run, state, log):
    """Estimate the losses (and HellaSwag where asked), log them; return whether val improved."""
    started = time.time()
    losses = estimate_loss(run)
    scores = score_hellaswag(run) if run.hellaswag else {}
    state.eval_seconds = time.time() - started
    is_best = losses['val'] < state.best_val_loss
    state.best_val_loss, state.val_loss = min(state.best_val_loss, losses['val']), losses['val']
    if log is not None:
        print(f"step {state.iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
              + (f", hellaswag acc_norm {scores['hellaswag/acc_norm']:.4f} ({scores['hellaswag/items']:,} "
                 f"items)" if scores else '') + f" (evaluation {state.eval_seconds:.1f} s)")
        log.write({'kind': 'eval', 'iter': state.iter_num, 'tokens': state.iter_num * run.tokens_per_iter,
                   'time': state.train_time, 'train/loss': losses['train'], 'val/loss': losses['val'],
                   **scores, 'lr': get_lr(state.iter_num, run.config), 'eval_seconds': state.eval_seconds})
    return is_best

def save(run, state, model_args, is_best):
    """Write a checkpoint of the run as it is now; every process takes part."""
    started = time.time()
    meta = dict(format_version=checkpoint.FORMAT_VERSION, scaler=run.scaler.state_dict(),
                model_args=model_args, config=run.config, optimizer_name=run.recipe.name,
                rng=distributed.gather_rng_states(run.world_size, run.device),  # every process's
                **{key: getattr(state, key) for key in RunState.SAVED})
    full = None  # a full disk stops every process with process 0's line
    try:
        if run.sharded:  # every process writes its shards (and gets DiskFull)
            from torch.distributed.checkpoint.state_dict import get_state_dict
            model_state, optimizer_state = get_state_dict(run.raw_model, run.optimizer)
            state.checkpoint = checkpoint.save_sharded(
                run.config['out_dir'], {'model': model_state, 'optimizer': optimizer_state}, meta,
                state.iter_num, run.config['keep_last'], is_best, run.rank, run.world_size)
        elif run.rank == 0:
            state.checkpoint = checkpoint.save_checkpoint(
                run.config['out_dir'], dict(meta, model=run.raw_model.state_dict(),
                                            optimizer=run.optimizer.state_dict()),
                state.iter_num, run.config['keep_last'], is_best)
    except checkpoint.DiskFull as e:
        full = str(e)
    if not run.sharded:
        full = distributed.from_process_0(full, run.world_size)
    if full:
        raise UserError(full)
    if run.rank == 0:
        print(f"saved checkpoint {state.checkpoint} ({time.time() - started:.1f} s)")

def nonfinite_step(run, state):
    """Say that the step was skipped; stop after max_nonfinite such iterations in a row."""
    if run.rank == 0:
        print(f"iter {state.iter_num}: non-finite loss or gradient, update skipped "
              f"({state.nonfinite_in_a_row} in a row)")
    if state.nonfinite_in_a_row >= run.config['max_nonfinite']:
        raise TrainingStopped(
            f"{state.nonfinite_in_a_row} iterations in a row with a non-finite loss or gradient, the last at "
            f"iteration {state.iter_num}; "
            + (f"the last good checkpoint is {state.checkpoint}. {run.recipe.divergence_advice} and resume "
               f"from it" if state.checkpoint else
               f"no checkpoint was saved yet. {run.recipe.divergence_advice} and start again with "
               f"--init_from=resume (from scratch, this attempt's log kept)"), 1)

def stop_run(run, state, signum):
    """The stop agreed on for signal `signum`, once the checkpoint is written: exit 128 + signum."""
    if run.world_size > 1:
        # wait for process 0 to finish writing the checkpoint: once one process exits with an
        # error status torchrun gives the others only its shutdown timeout (30 s)
        dist.barrier()
    raise TrainingStopped(f"stopped by {signal.Signals(signum).name} at iteration {state.iter_num}; "
                          f"checkpoint {state.checkpoint}; resume with --init_from=resume", 128 + signum)

# -----------------------------------------------------------------------------
# the run

def setup(recipe_class, config, sources, plan, rank, world_size, local_world_size, device, lock):
    """The run's fixed parts and where it starts: out_dir checked and locked (`lock`, a
    resume.OutDirLock), the data opened, the model and optimizer built or continued, the model
    compiled and wrapped. Returns (run, state, model_args, exact), `exact` as resume.restore's."""
    master = rank == 0
    resume.prepare_out_dir(config['out_dir'], config['init_from'] == 'resume', master)
    if world_size > 1:
        dist.barrier()  # out_dir exists before any process looks into it
    lock.acquire(config['out_dir'], rank, world_size)  # before anything in out_dir moves
    dataset_vocab, paths = open_dataset(config['dataset'], config['block_size'],
                                        warn=print if master else (lambda message: None))
    start, start_path = resume.load_start(config, recipe_class, master, device)
    if start is None and config['init_from'] == 'resume':  # nothing to resume but a log: start over
        if world_size > 1:
            dist.barrier()  # every process has looked for a log before process 0 moves it
        if master:
            kept = resume.set_log_aside(config['out_dir'])
            print(f"{config['out_dir']} holds no checkpoint yet: starting from scratch"
                  + (f" (the earlier attempt's log kept as {kept})" if kept else ''))
    if start is not None:
        resume.adopt_model_args(config, sources, start['model_args'], start_path)
        if master:
            verb = 'resuming from' if config['init_from'] == 'resume' else 'continuing'
            print(f"{verb} {start_path} (iteration {start['iter_num']})")

    torch.manual_seed(config['seed'])  # the same initial model in every process (FSDP shards each's own)
    if device.startswith('cuda'):  # TF32 tensor cores for any float32 matmul left outside autocast
        torch.backends.cuda.matmul.fp32_precision = 'tf32'
        torch.backends.cudnn.conv.fp32_precision = 'tf32'
    device_type = 'cuda' if device.startswith('cuda') else device
    ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[config['dtype']]
    autocast = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type, dtype=ptdtype)

    model, model_args = resume.build_model(config, dataset_vocab, start)
    check_token_ids(paths, model_args['vocab_size'], config['dataset'])
    items = hellaswag.items_for_training(config['hellaswag_file'], config['hellaswag_items'],
                                         model_args['vocab_size']) if config['hellaswag'] else None
    sharded = config['data_parallel'] != 'ddp'
    if not sharded:  # fully_shard moves one block at a time and keeps its shard: no whole model on a GPU
        model.to(device)
    for block in model.transformer.h:
        block.checkpointing = config['activation_checkpointing']
    torch.manual_seed(config['seed'] + rank)  # dropout differs per process; data order does not
    if sharded:
        distributed.shard_model(model, config, world_size, local_world_size, device_type, ptdtype)
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
        # it agrees with the other processes on an overflow seen in any process's shards
        scaler = ShardedGradScaler(device_type, enabled=config['dtype'] == 'float16')
    else:
        scaler = torch.amp.GradScaler(device_type, enabled=config['dtype'] == 'float16')
    recipe = recipe_class(config, plan)
    optimizer = recipe.build(model, device_type)
    exact = start is not None and resume.restore(start, start_path, model, optimizer, scaler,
                                                 recipe.parameter_groups(model), rank, world_size, device, sharded)
    raw_model = model
    if config['compile']:
        if master:
            print("compiling the model... (takes a minute)")
        model = torch.compile(model)
    if world_size > 1 and not sharded:
        model = DDP(model, device_ids=[int(device[5:])] if device_type == 'cuda' else None)
    data = TokenFiles(paths, config['dataset'], model_args['vocab_size'], config['batch_size'],
                      config['block_size'], device)
    run = Run(config, recipe, model, raw_model, optimizer, scaler, autocast, plan, data, rank, world_size, items)
    state = RunState.continuing(start, start_path) if start is not None else RunState()
    return run, state, model_args, exact

def train(recipe_class, config, sources, notes, plan, rank, world_size, local_world_size, device,
          stop_flag, lock):
    started = time.time()
    run, state, model_args, exact = setup(recipe_class, config, sources, plan, rank, world_size,
                                          local_world_size, device, lock)
    peak = config['peak_flops'] or device_peak_flops(device, config['dtype'])  # None: no MFU
    wandb_run, log = None, None
    if rank == 0:
        if config['wandb_log']:
            import wandb
            wandb_run = wandb.init(project=config['wandb_project'], name=config['wandb_run_name'],
                                   config=dict(config, optimizer=recipe_class.name), mode=config['wandb_mode'],
                                   dir=config['out_dir'], id=state.wandb_id or None,
                                   resume='allow' if state.wandb_id else None)
            state.wandb_id = wandb_run.id
        log = MetricsLog(os.path.join(config['out_dir'], 'metrics.jsonl'), wandb_run)
        print(format_config(config, sources))
        for note in notes:
            print(f"config: {note}")
        print(describe_batch(run))
        log.write(dict(kind='config', run_name=config['wandb_run_name'], optimizer=recipe_class.name,
                       iter=state.iter_num, config=config, model_args=model_args))

    interval = IntervalLog(run, state)
    start_iter, stop = state.iter_num, False
    while True:
        # evaluate and save at the top of the iteration: the state is that after iter_num steps.
        # The first iteration is evaluated unless it continues a checkpoint of ours, which was
        # evaluated when it was saved (eval_only evaluates it all the same: that is all it does)
        evaluated = is_best = False
        due = state.iter_num % config['eval_interval'] == 0 or state.iter_num == config['max_iters']
        first = config['eval_only'] or not exact
        if (first if state.iter_num == start_iter else due) and not stop:
            is_best, evaluated = evaluate(run, state, log), True
        if config['eval_only']:
            break
        if state.iter_num != start_iter and (state.iter_num % config['checkpoint_interval'] == 0 or is_best
                                             or state.iter_num == config['max_iters'] or stop
                                             or (evaluated and config['always_save_checkpoint'])):
            if state.nonfinite_in_a_row and not stop:
                # inside a run of non-finite iterations a checkpoint would be called good, carry the
                # run into a resume and rotate the healthy ones away (a stop saves all the same)
                if rank == 0:
                    print(f"iter {state.iter_num}: no checkpoint after a non-finite iteration; the "
                          f"newest is {state.checkpoint}")
            else:
                save(run, state, model_args, is_best)
        if state.iter_num >= config['max_iters']:
            break
        if stop:
            stop_run(run, state, stop)

        iteration_start = time.time()
        lr = set_lr(run, state.iter_num)
        loss = forward_backward(run, state.sequences_drawn)
        state.sequences_drawn += run.plan.sequences
        stepped, stop, grad_norm = clip_and_step(run, loss, stop_flag.signum)
        if stepped:
            state.nonfinite_in_a_row = 0
            interval.stepped(run, loss, grad_norm)
        else:
            state.nonfinite_in_a_row += 1
            interval.skipped += 1
            nonfinite_step(run, state)
        # the optimizer's extra pass where due, on sequences of its own
        state.sequences_drawn += run.recipe.after_step(run, state.iter_num, state.sequences_drawn)
        state.iter_num += 1
        state.train_time += time.time() - iteration_start
        interval.write(run, state, lr, log, peak)
    if log is not None and not config['eval_only']:
        summary(run, state, time.time() - started, log)
    if wandb_run is not None:
        wandb_run.finish()

def main(recipe_class, argv=None, usage=''):
    """Entry point of the training scripts, for the optimizer of `recipe_class`: errors a user can
    fix are one line and exit status 2. `argv`: sys.argv[1:] by default; `usage` heads --help."""
    argv = sys.argv[1:] if argv is None else argv
    defaults, foreign = recipe_class.defaults(), recipe_class.foreign_keys()
    if wants_help(argv):
        print(format_help(usage, defaults, describe_defaults(default_config, recipe_class.own_defaults))
              + f"\nConfig files of the official Sophia scripts also set "
                f"{', '.join(sorted(recipe_class.official_keys()))}: read as the lines printed at the start say.")
        sys.exit(0)
    stop_flag = SignalFlag()
    stop_flag.install()
    if 'TORCHELASTIC_RUN_ID' in os.environ:  # started by torchrun
        distributed.watch_launcher(stop_flag)
    lock = resume.OutDirLock()
    world_size = int(os.environ.get('WORLD_SIZE', 1))
    master = int(os.environ.get('RANK', 0)) == 0
    status, stopped, fresh = 0, False, False
    try:
        notes = []
        config, sources = parse_args(defaults, argv, foreign, notes)
        local_world_size = int(os.environ.get('LOCAL_WORLD_SIZE', world_size))
        notes += fit_schedule(config, sources)
        check_config(config, sources, world_size, local_world_size, recipe_class)
        plan = batch_plan(config, sources, world_size)
        if config['total_bs'] != plan.sequences:  # record the batch the run trains with
            config['total_bs'] = plan.sequences
            sources['total_bs'] = (f"{world_size} process{'es' if world_size > 1 else ''} x batch_size x "
                                   f"gradient_accumulation_steps")
        fresh = not os.path.exists(config['out_dir'])  # a start that fails leaves no folder behind
        rank, world_size, device = distributed.setup_distributed(config)
        train(recipe_class, config, sources, notes, plan, rank, world_size, local_world_size,
              device, stop_flag, lock)
    except UserError as e:  # ConfigError too
        if master:  # every process finds the same mistake: say it once
            print(f"error: {e}", file=sys.stderr, flush=True)
        status = 2
    except TrainingStopped as e:  # every process stops at the same agreed iteration
        stopped, status = True, e.status
        if master:
            print(e, file=sys.stderr, flush=True)
    except Exception as e:
        status = 1  # and the process group is left alone: destroying it could wait on the dead peer
        if not is_communication_failure(e):
            raise
        print(f"error: process {os.environ.get('RANK', 0)}: communication with the other processes "
              f"failed or timed out: a peer process died or hung ({str(e).splitlines()[0]}); "
              f"resume with --init_from=resume", file=sys.stderr, flush=True)
    finally:
        lock.release(int(os.environ.get('RANK', 0)))
        if status == 2 and master and fresh:
            with suppress(OSError):
                os.rmdir(config['out_dir'])  # only if nothing was written into it
        distributed.end_process_group(status, stopped)
        stop_flag.uninstall()
    sys.exit(status)
