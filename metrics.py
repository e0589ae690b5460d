"""
What a run reports: the printed lines and out_dir/metrics.jsonl, rows of kind 'config' (at each
start), 'eval', 'train' (every log_interval iterations) and 'summary'.
"""

import json
import math
import os
import sys

import torch
import torch.distributed as dist

from distributed import whole

class MetricsLog:
    """out_dir/metrics.jsonl, one JSON object per line (read by compare.py), mirrored to wandb."""
    def __init__(self, path, wandb_run):
        self.path, self.wandb_run = path, wandb_run
        self.set_cut_line_aside()

    def set_cut_line_aside(self):
        """A kill in the middle of a write leaves a last line without its newline: move it to
        <path>.damaged, so the next row starts a line of its own and every line stays JSON."""
        if not os.path.exists(self.path):
            return
        with open(self.path, 'rb') as f:
            data = f.read()
        if not data or data.endswith(b'\n'):
            return
        end = data.rfind(b'\n') + 1  # 0: the first line was cut
        with open(self.path + '.damaged', 'ab') as f:
            f.write(data[end:] + b'\n')
        with open(self.path, 'r+b') as f:
            f.truncate(end)
        print(f"warning: the last line of {self.path} was cut short ({len(data) - end} bytes, a "
              f"kill while writing); moved to {self.path}.damaged")
    def write(self, row):
        row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        with open(self.path, 'a') as f:
            f.write(json.dumps(row) + '\n')
        values = {k: v for k, v in row.items() if k != 'kind' and v is not None}
        if self.wandb_run is not None and row['kind'] == 'summary':
            self.wandb_run.summary.update(values)  # the run's outcome, not a point of a curve
        elif self.wandb_run is not None and row['kind'] != 'config':
            self.wandb_run.log(values)

class IntervalLog:
    """The training rows of metrics.jsonl and the printed lines, every log_interval iterations.
    Losses and counts add up on the device in between and are read with one transfer per row.
    Time is training time alone: evaluations and checkpoints are timed on their own lines."""

    def __init__(self, run, state):
        self.loss_sum = torch.zeros((), device=run.device)
        self.clip_count = torch.zeros((), device=run.device)
        self.steps, self.skipped, self.iters = 0, 0, 0
        self.train_time = state.train_time  # at the last row

    def stepped(self, run, loss, grad_norm):
        self.loss_sum += loss
        if run.config['grad_clip'] > 0:
            self.clip_count += (grad_norm > run.config['grad_clip']).float()
        self.steps += 1

    def write(self, run, state, lr, log, peak_flops):
        """Called after every iteration; writes a row every log_interval of them."""
        self.iters += 1
        config = run.config
        if state.iter_num % config['log_interval']:
            return
        values = {'loss_sum': self.loss_sum, 'clip_count': self.clip_count,
                  **run.recipe.diagnostics(run)}
        values['param_norm'] = whole(torch.nn.utils.get_total_norm(run.params))
        peak = torch.tensor(float(peak_memory(run.device)), device=run.device)
        if run.world_size > 1:
            dist.all_reduce(values['loss_sum'])  # the loss over all processes' micro-batches
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)  # the process that needed the most
        values['peak_memory'] = peak
        read = dict(zip(values, torch.stack([v.float() for v in values.values()]).tolist()))
        self.loss_sum.zero_(), self.clip_count.zero_()
        dt = (state.train_time - self.train_time) / self.iters
        if log is not None:
            passes = run.tokens_per_iter + run.recipe.extra_tokens_per_iter(run)
            mfu = run.raw_model.estimate_mfu(passes / config['block_size'], dt, peak_flops)
            loss = read['loss_sum'] / run.world_size / self.steps if self.steps else math.nan
            row = {'kind': 'train', 'iter': state.iter_num, 'tokens': state.iter_num * run.tokens_per_iter,
                   'time': state.train_time, 'loss': loss, 'lr': lr, 'ms_per_iter': dt * 1000,
                   'tokens_per_s': run.tokens_per_iter / dt, 'mfu': mfu, 'param_norm': read['param_norm'],
                   'skipped': self.skipped, 'peak_memory_mb': read['peak_memory'] / 2 ** 20}
            if config['grad_clip'] > 0 and self.steps:
                row['train/clip_rate'] = read['clip_count'] / self.steps
            line = (f"iter {state.iter_num}/{config['max_iters']}: loss {loss:.4f}, lr {lr:.2e}, "
                    f"{dt * 1000:.1f} ms/iter, {run.tokens_per_iter / dt:,.0f} tok/s")
            if mfu is not None:
                line += f", mfu {mfu * 100:.1f}%"
            line += run.recipe.report(run, state.iter_num, read, row)
            log.write(row)
            remaining, every = config['max_iters'] - state.iter_num, config['eval_interval']
            evals = config['max_iters'] // every - state.iter_num // every  # and one at the end:
            evals += 1 if remaining and config['max_iters'] % every else 0
            print(line + f", eta {duration(remaining * dt + evals * state.eval_seconds)}", flush=True)
        self.steps, self.skipped, self.iters, self.train_time = 0, 0, 0, state.train_time

def describe_batch(run):
    """The batch arithmetic, as printed at the start."""
    config, plan = run.config, run.plan
    per_process = plan.micro_steps * config['batch_size'] * config['block_size']
    line = (f"tokens per iteration: {plan.micro_steps} accumulation x {config['batch_size']} batch x "
            f"{config['block_size']} block = {per_process:,}")
    if run.world_size > 1:
        line += f" per process, {run.tokens_per_iter:,} over {run.world_size} processes"
    if config['gradient_accumulation_steps'] == 0:
        line += (f" (accumulation derived: total_bs {config['total_bs']} / ({config['batch_size']} batch x "
                 f"{run.world_size} process{'es' if run.world_size > 1 else ''}))")
    return line + run.recipe.describe(run)

def summary(run, state, wall_seconds, log):
    """The lines that close a finished training run, and its row in metrics.jsonl."""
    out_dir = run.config['out_dir']
    best = os.path.join(out_dir, 'best.pt')
    row = {'kind': 'summary', 'iter': state.iter_num, 'tokens': state.iter_num * run.tokens_per_iter,
           'time': state.train_time, 'wall_seconds': wall_seconds, 'final_val_loss': state.val_loss,
           'best_val_loss': state.best_val_loss, 'checkpoint': state.checkpoint,
           'best_checkpoint': best if os.path.exists(best) else None}
    log.write(row)
    print(f"done: {state.iter_num:,} iterations, {row['tokens']:,} tokens, {duration(state.train_time)} of "
          f"training ({duration(wall_seconds)} in all, evaluations and checkpoints included)\n"
          f"val loss: final {state.val_loss:.4f}, best {state.best_val_loss:.4f}\n"
          f"checkpoints: {state.checkpoint}" + (f", best {best}" if row['best_checkpoint'] else '') + "\n"
          f"next: python sample.py --out_dir={out_dir}\n"
          f"      python compare.py {out_dir} OTHER_OUT_DIR...   # loss against iterations, tokens, seconds\n"
          f"      python export_hf.py {out_dir} hf-{os.path.basename(os.path.normpath(out_dir))}   "
          f"# a Hugging Face folder", flush=True)

def peak_memory(device):
    """Bytes this process has needed at most: on a GPU the most its tensors took at once, on the CPU
    its peak resident memory (everything: interpreter, libraries, tensors)."""
    if device.startswith('cuda'):
        return torch.cuda.max_memory_allocated(device)
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == 'darwin' else 1024)

def duration(seconds):
    """'1h02m', '3m05s' or '12s'."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
