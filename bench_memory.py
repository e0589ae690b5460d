"""
Peak memory per process of DDP and FSDP training, for both optimizers: what sharding saves, and
what Sophia-G's state costs next to AdamW's (the same: a momentum and one more tensor per
parameter, exp_avg and hessian against exp_avg and exp_avg_sq).

    $ python bench_memory.py                                  # 2 processes on the CPU, GPT-2 small
    $ python bench_memory.py --device=cuda --nproc=1 --models=gpt2,gpt2-medium,gpt2-large,gpt2-xl
    $ python bench_memory.py --models=tiny --optimizers=sophiag --parallel=fsdp --json=memory.json

Each configuration runs the real training script under torchrun for a few iterations (a Hessian
pass after every step for Sophia-G, so its pass is counted) on random tokens, with micro-batches of
one short sequence so that the model, its gradients and the optimizer state are what fills memory,
and reads the peak the script logs (`peak_memory_mb` in metrics.jsonl, the largest over the
processes): peak resident memory on the CPU (everything in the process, the interpreter, the
libraries and the whole model each process builds before FSDP shards it included; glibc is told
to return large freed blocks, MALLOC_MMAP_THRESHOLD_), the most memory tensors took at once on a
GPU. A run that does not fit (out of
memory) is reported as such, so the largest model that fits shows in the table.

Float32 parameters cost 4 bytes each, their gradients 4 more, and either optimizer 8 (two state
tensors): 16 bytes per parameter under DDP, 16 / processes under FSDP, plus a block's gathered
parameters and the activations.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.abspath(__file__))
MODELS = {'gpt2': (12, 12, 768), 'gpt2-medium': (24, 16, 1024), 'gpt2-large': (36, 20, 1280),
          'gpt2-xl': (48, 25, 1600),
          'tiny': (1, 2, 16)}  # a toy size, seconds a run: what gpu_check.py's CPU mode runs
SCRIPTS = {'sophiag': 'train_sophiag.py', 'adamw': 'train_adam.py'}

def random_tokens(folder, block_size):
    """train.bin and val.bin of random GPT-2 BPE ids (no meta.pkl: the model's vocabulary is 50,304)."""
    rng = np.random.default_rng(0)
    for split in ('train', 'val'):
        rng.integers(0, 50257, size=max(1 << 16, 4 * block_size), dtype=np.uint16).tofile(
            os.path.join(folder, f'{split}.bin'))

def measure(model, parallel, optimizer, args, data, out_dir):
    """(peak MiB over the processes, parameters in millions), or (None, reason) if it failed."""
    n_layer, n_head, n_embd = MODELS[model]
    config = dict(dataset=data, out_dir=out_dir, device=args.device, dtype=args.dtype, compile=False,
                  n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=args.block_size, batch_size=1,
                  total_bs=args.nproc, gradient_accumulation_steps=0, data_parallel=parallel,
                  max_iters=args.iters, warmup_iters=1, lr_decay_iters=args.iters, eval_interval=10 ** 6,
                  eval_iters=1, log_interval=1, checkpoint_interval=10 ** 6, wandb_log=False)
    if optimizer == 'sophiag':
        config.update(hess_interval=1)
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={args.nproc}',
               os.path.join(ROOT, SCRIPTS[optimizer])] + [f'--{k}={v}' for k, v in config.items()]
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // args.nproc)))
    # glibc raises its mmap threshold up to 32 MB after large frees, then serves such blocks from
    # the heap, which it keeps mapped after they are freed: resident memory would count every
    # buffer FSDP ever gathered. A fixed threshold returns large blocks to the system when freed
    env.setdefault('MALLOC_MMAP_THRESHOLD_', str(1 << 20))
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode != 0:
        text = result.stdout + result.stderr
        reason = 'out of memory' if 'out of memory' in text.lower() or 'OutOfMemory' in text else \
            (result.stderr.strip().splitlines() or ['failed'])[-1]
        return None, reason
    with open(os.path.join(out_dir, 'metrics.jsonl')) as f:
        rows = [json.loads(line) for line in f]
    train = [row for row in rows if row['kind'] == 'train']
    return max(row['peak_memory_mb'] for row in train), None

def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--nproc', type=int, default=2, help='processes (GPUs) per run')
    parser.add_argument('--models', default='gpt2', help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16', 'float16'])
    parser.add_argument('--block_size', type=int, default=64, help='tokens per sequence (one per micro-batch)')
    parser.add_argument('--iters', type=int, default=3, help='iterations per run')
    parser.add_argument('--optimizers', default='sophiag,adamw',
                        help=f"comma-separated, from {', '.join(SCRIPTS)}")
    parser.add_argument('--parallel', default='ddp,fsdp', help='comma-separated, from ddp, fsdp')
    parser.add_argument('--json', default='',
                        help='also write the rows to this file (rewritten after each row)')
    args = parser.parse_args()
    models = [name.strip() for name in args.models.split(',')]
    unknown = [name for name in models if name not in MODELS]
    if unknown:
        parser.exit(2, f"error: --models: {unknown[0]!r} is not one of {', '.join(MODELS)}\n")
    optimizers = [name.strip() for name in args.optimizers.split(',')]
    unknown = [name for name in optimizers if name not in SCRIPTS]
    if unknown or not optimizers:
        parser.exit(2, f"error: --optimizers: {(unknown or [''])[0]!r} is not one of "
                       f"{', '.join(SCRIPTS)}\n")
    parallels = [name.strip() for name in args.parallel.split(',')]
    if not parallels or any(name not in ('ddp', 'fsdp') for name in parallels):
        parser.exit(2, f"error: --parallel: {args.parallel!r} is not a list from ddp, fsdp\n")
    where = f"{args.nproc} process{'es' if args.nproc > 1 else ''} on {args.device}, {args.dtype}"
    print(f"peak memory per process, MiB ({'resident' if args.device == 'cpu' else 'allocated by tensors'}; "
          f"{where}; micro-batches of 1 x {args.block_size} tokens, {args.iters} iterations)")
    both = optimizers == ['sophiag', 'adamw']  # the ratio needs both, in this order
    print(f"{'model':12s} {'parallel':8s} " + ' '.join(f"{name:>10s}" for name in optimizers)
          + (f" {'sophiag / adamw':>16s}" if both else ''))
    rows = []  # for --json: one per model, parallelism and optimizer
    with tempfile.TemporaryDirectory(prefix='bench-memory-') as scratch:
        random_tokens(scratch, args.block_size)
        for model in models:
            for parallel in parallels:
                peaks = {}
                for optimizer in optimizers:
                    out_dir = os.path.join(scratch, f'{model}-{parallel}-{optimizer}')
                    peaks[optimizer] = measure(model, parallel, optimizer, args, scratch, out_dir)
                cells = [f"{peak:10,.0f}" if peak is not None else f"{reason[:10]:>10s}"
                         for peak, reason in peaks.values()]
                if both:
                    ratio = None if None in (peaks['sophiag'][0], peaks['adamw'][0]) else \
                        peaks['sophiag'][0] / peaks['adamw'][0]
                    cells.append(f"{ratio:16.3f}" if ratio else f"{'-':>16s}")
                print(f"{model:12s} {parallel:8s} " + ' '.join(cells), flush=True)
                for optimizer, (peak, reason) in peaks.items():
                    if peak is None and reason != 'out of memory':
                        print(f"  {optimizer}: {reason}", flush=True)
                    rows.append(dict(model=model, parallel=parallel, optimizer=optimizer,
                                     peak_mib=peak, reason=reason))
                if args.json:  # whole, then renamed: a run killed meanwhile leaves the rows so far
                    with open(args.json + '.tmp', 'w') as f:
                        json.dump(dict(device=args.device, nproc=args.nproc, dtype=args.dtype,
                                       block_size=args.block_size, iters=args.iters, rows=rows),
                                  f, indent=1)
                    os.replace(args.json + '.tmp', args.json)

if __name__ == '__main__':
    main()
