"""
The training loop of train_sophiag.py and train_adam.py, written once so the two cannot drift
apart. Plain functions with explicit arguments; importing this module does nothing.

One process:       $ python train_sophiag.py config/train_stdlib_char_sophiag.py
DDP on one node:   $ torchrun --standalone --nproc_per_node=8 train_sophiag.py config/train_gpt2_small_sophiag.py
DDP on two nodes:  $ torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST --master_port=1234 train_sophiag.py ...

Every iteration runs `gradient_accumulation_steps` micro-batches (divided across the processes),
clips the gradient, and steps the optimizer. Sophia-G adds a Hessian pass every `hess_interval`
iterations, after the step as in the official loop: fresh batches, full-sequence logits, labels
sampled from the model's own softmax, backward, `optimizer.update_hessian()`.

Data order is a function of the seed and a global micro-batch counter alone: micro-batch i of the
run is drawn by a generator seeded with (seed, i), and process r of W takes the i's of its share.
So every process sees different data, a resumed run sees exactly the batches it would have seen,
and a run on W processes sees the same global batches as a run on one.
"""

import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
from configurator import ConfigError, check_config, format_config, parse_args

REPO = os.path.dirname(os.path.abspath(__file__))
TRAIN_STREAM, EVAL_STREAM, HESSIAN_STREAM = 0, 1, 2  # independent random streams per purpose
MODEL_KEYS = ('n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'vocab_size', 'dropout',
              'scale_attn_by_inverse_layer_idx', 'gelu')
SHAPE_KEYS = ('n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'vocab_size',
              'scale_attn_by_inverse_layer_idx', 'gelu')  # what a checkpoint's model is

class UserError(Exception):
    """A problem the user can fix: reported as one line, exit status 2, nothing overwritten."""

class TrainingStopped(Exception):
    """The run stopped on purpose (a signal, too many non-finite iterations); exit status given."""
    def __init__(self, message, status):
        super().__init__(message)
        self.status = status

def default_config():
    """The config keys of both training scripts with their defaults: GPT-2 small (124M) on
    OpenWebText with AdamW, as the official runs. Each script changes what differs."""
    # I/O
    out_dir = 'out'  # checkpoints, metrics.jsonl (the local log compare.py reads) and config go here
    eval_interval = 1000  # estimate train and val loss every this many iterations
    eval_iters = 200  # batches per split for each estimate (the same batches every time)
    log_interval = 10  # print and log a training line every this many iterations
    eval_only = False  # evaluate once and exit
    init_from = 'scratch'  # 'scratch', 'resume' (newest good checkpoint in out_dir), 'gpt2*', or a HF model dir
    checkpoint_interval = 1000  # save a checkpoint every this many iterations, at the end, and when val improves
    keep_last = 3  # keep this many newest checkpoints (best.pt is kept besides)
    # wandb logging
    wandb_log = False  # log to wandb too (metrics.jsonl is always written)
    wandb_mode = 'online'  # 'online', or 'offline' to log with no network (`wandb sync` later)
    wandb_project = 'sophia'
    wandb_run_name = 'gpt2-small-adamw'  # also the run's label in metrics.jsonl and compare.py
    # data
    dataset = 'openwebtext'  # a folder under data/ (or a path) holding train.bin, val.bin, meta.pkl
    gradient_accumulation_steps = 40  # micro-batches per iteration, over all processes together
    batch_size = 12  # sequences per micro-batch
    block_size = 1024  # tokens per sequence
    # model
    n_layer = 12
    n_head = 12
    n_embd = 768
    dropout = 0.0  # 0 for pretraining, 0.1+ for finetuning
    bias = False  # biases in Linear and LayerNorm layers
    scale_attn_by_inverse_layer_idx = False  # scale attention logits of layer i by 1/(i+1), as medium/large
    gelu = 'tanh'  # 'tanh' (GPT-2, the official runs) or 'exact' (nanoGPT; faster on some CPUs)
    # optimizer
    learning_rate = 6e-4  # peak learning rate
    max_iters = 100000  # total iterations
    weight_decay = 1e-1
    beta1 = 0.9
    beta2 = 0.95
    grad_clip = 1.0  # clip the gradient norm at this value, 0 disables
    # learning rate schedule: linear warmup, cosine decay to min_lr, then constant
    decay_lr = True
    warmup_iters = 2000
    lr_decay_iters = 100000  # ~ max_iters per Chinchilla
    min_lr = 3e-5  # ~ learning_rate / 10 per Chinchilla
    # system
    device = 'cuda'  # 'cpu', 'cuda', 'cuda:N' or 'mps'; under torchrun each process takes cuda:LOCAL_RANK
    dtype = 'bfloat16'  # 'float32', 'bfloat16', or 'float16' (with a GradScaler)
    compile = True  # torch.compile the model
    seed = 1337
    peak_flops = 0.0  # the device's dense peak FLOP/s for MFU; 0 = look it up by GPU name (unknown: no MFU)
    # faults
    max_nonfinite = 5  # stop after this many iterations in a row with a non-finite loss or gradient
    ddp_timeout = 600  # seconds a process waits for the others before it stops with an error
    return dict(locals())

# -----------------------------------------------------------------------------
# setup

def setup_distributed(config):
    """Process group from torchrun's environment, or a single process. Returns (rank, world_size,
    device)."""
    world_size = int(os.environ.get('WORLD_SIZE', 1))
    rank = int(os.environ.get('RANK', 0))
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    device = config['device']
    if device.startswith('cuda') and not torch.cuda.is_available():
        raise UserError(f"device={device!r} but CUDA is not available to this torch "
                        f"({torch.__version__}); use --device=cpu")
    if device == 'mps' and not torch.backends.mps.is_available():
        raise UserError("device='mps' but MPS is not available; use --device=cpu")
    if device.startswith('cuda'):
        index = local_rank if world_size > 1 else (int(device[5:]) if ':' in device else 0)
        if index >= torch.cuda.device_count():
            raise UserError(f"device={device!r} needs GPU {index} but only "
                            f"{torch.cuda.device_count()} are visible")
        device = f'cuda:{index}'
        torch.cuda.set_device(device)
    if config['dtype'] == 'bfloat16' and device.startswith('cuda') and not torch.cuda.is_bf16_supported():
        raise UserError(f"dtype='bfloat16' is not supported on {torch.cuda.get_device_name(device)}; "
                        f"use --dtype=float16")
    if world_size > 1:
        backend = 'nccl' if device.startswith('cuda') else 'gloo'
        dist.init_process_group(backend, timeout=timedelta(seconds=config['ddp_timeout']),
                                device_id=torch.device(device) if backend == 'nccl' else None)
    return rank, world_size, device

def prepare_out_dir(out_dir, resuming, master):
    """out_dir must be writable, and must not hold another run unless we resume it."""
    if master:
        try:
            os.makedirs(out_dir, exist_ok=True)
            probe = os.path.join(out_dir, f'.write-test-{os.getpid()}')
            with open(probe, 'w') as f:
                f.write('ok')
            os.remove(probe)
        except OSError as e:
            raise UserError(f"out_dir={out_dir!r} is not writable ({e.strerror}); choose another --out_dir")
    if not resuming:
        held = [name for name in ('metrics.jsonl', 'best.pt') if os.path.exists(os.path.join(out_dir, name))]
        held += [f'ckpt-{i:08d}.pt' for i in checkpoint.list_checkpoints(out_dir)[:1]]
        if held:
            raise UserError(f"out_dir={out_dir!r} already holds a run ({held[0]}); continue it with "
                            f"--init_from=resume, or choose another --out_dir")

def data_dir_of(dataset):
    return dataset if os.sep in dataset else os.path.join(REPO, 'data', dataset)

def prepare_command(dataset):
    if os.sep in dataset:
        return f"prepare the token files in {dataset}"
    return f"run: python {os.path.relpath(os.path.join(REPO, 'data', dataset, 'prepare.py'))}"

def open_dataset(dataset, block_size):
    """Check train.bin / val.bin / meta.pkl of a dataset; return its vocabulary size (None if the
    dataset has no meta.pkl) and the paths of the token files."""
    data_dir = data_dir_of(dataset)
    paths = {}
    for split in ('train', 'val'):
        path = os.path.join(data_dir, f'{split}.bin')
        if not os.path.exists(path) or os.path.getsize(path) == 0:
            raise UserError(f"{path} is missing or empty; {prepare_command(dataset)}")
        tokens = os.path.getsize(path) // 2
        if os.path.getsize(path) % 2 or tokens <= block_size:
            raise UserError(f"{path} holds {tokens} tokens, too few for block_size={block_size} "
                            f"(or is not a uint16 token file); {prepare_command(dataset)}")
        paths[split] = path
    vocab_size = None
    meta_path = os.path.join(data_dir, 'meta.pkl')
    if os.path.exists(meta_path):
        import pickle
        with open(meta_path, 'rb') as f:
            vocab_size = pickle.load(f)['vocab_size']
    return vocab_size, paths

def model_vocab_size(dataset_vocab):
    """The model's vocabulary for a dataset's (None: no meta.pkl, taken as GPT-2 BPE). A large
    vocabulary is padded to a multiple of 64, GPT-2's 50257 to 50304 as in the official runs and
    nanoGPT on OpenWebText: the lm_head matmul and the loss run much faster on a GPU with aligned
    shapes. The padded ids never occur in the data and their logits learn to stay low. A small
    (character) vocabulary is kept as it is: there the padding would buy nothing."""
    if dataset_vocab is None:
        return 50304
    return -(-dataset_vocab // 64) * 64 if dataset_vocab >= 1024 else dataset_vocab

def check_token_ids(paths, vocab_size, dataset):
    """Token ids at or beyond the model's vocabulary mean the data was prepared for another one.
    Checked on the first 16M tokens of each file before anything is written to out_dir (a full
    scan of OpenWebText would take minutes); get_batch checks every batch it draws besides."""
    for path in paths.values():
        largest = int(np.memmap(path, dtype=np.uint16, mode='r')[:1 << 24].max())
        if largest >= vocab_size:
            raise token_id_error(path, largest, vocab_size, dataset)

def token_id_error(path, largest, vocab_size, dataset):
    return UserError(f"{path} holds token id {largest} >= the model's vocab_size {vocab_size}; "
                     f"the data was prepared for another vocabulary: {prepare_command(dataset)}")

def get_batch(path, seed, stream, index, batch_size, block_size, vocab_size, device, dataset):
    """Micro-batch `index` of a random stream: `batch_size` random windows of the token file."""
    # recreate the memmap every batch: a long-lived np.memmap holds on to the pages it touched
    data = np.memmap(path, dtype=np.uint16, mode='r')
    rng = np.random.default_rng((seed, stream, index))
    ix = rng.integers(0, len(data) - block_size, size=batch_size)
    xy = np.stack([data[i:i + 1 + block_size] for i in ix]).astype(np.int64)  # (B, T+1)
    if xy.max() >= vocab_size:  # on the host, before the copy: costs no device sync
        raise token_id_error(path, xy.max(), vocab_size, dataset)
    xy = torch.from_numpy(xy)
    if device.startswith('cuda'):
        xy = xy.pin_memory().to(device, non_blocking=True)  # async copy, overlaps the compute
    else:
        xy = xy.to(device)
    return xy[:, :-1], xy[:, 1:]

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

def seed_of(*key):
    """A 63-bit seed from a tuple of integers, for torch generators."""
    return int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0] >> 1)

# -----------------------------------------------------------------------------
# model and optimizer

def build_model(config, dataset_vocab, resume_state, master):
    """A GPT from scratch, from a checkpoint's model args, or from pretrained GPT-2 weights, for
    a dataset of vocabulary dataset_vocab (None: no meta.pkl). Returns (model, model_args)."""
    from model import GPT, GPTConfig
    model_args = {key: config[key] for key in MODEL_KEYS if key != 'vocab_size'}
    model_args['vocab_size'] = model_vocab_size(dataset_vocab)
    if resume_state is not None:
        # the config asks for the shape the checkpoint was trained with, or it is another model
        # checkpoints written before the gelu key existed were trained with the tanh GELU
        saved_config = {'gelu': 'tanh', **resume_state['config']}
        changed = [f"{key}={config[key]!r} (checkpoint: {saved_config[key]!r})" for key in SHAPE_KEYS
                   if key in config and config[key] != saved_config.get(key, config[key])]
        if changed:
            raise UserError(f"the checkpoint in {config['out_dir']} is of another model: "
                            f"{', '.join(changed)}; drop those overrides or use another --out_dir")
        model_args = dict(resume_state['model_args'], dropout=config['dropout'])
        model = GPT(GPTConfig(**model_args))
        model.load_state_dict(resume_state['model'])
    elif config['init_from'] == 'scratch':
        model = GPT(GPTConfig(**model_args))
    else:
        model = GPT.from_pretrained(config['init_from'], dict(dropout=config['dropout']))
        model_args = {key: getattr(model.config, key) for key in MODEL_KEYS}
        if (dataset_vocab or 0) > model_args['vocab_size']:
            raise UserError(f"dataset {config['dataset']} has vocab_size {dataset_vocab}, larger than "
                            f"{config['init_from']}'s {model_args['vocab_size']}; use a GPT-2 BPE dataset")
    if config['block_size'] < model_args['block_size']:
        model.crop_block_size(config['block_size'])  # e.g. GPT-2's 1024 cropped for a smaller run
        model_args['block_size'] = config['block_size']
    return model, model_args

def optimizer_hyperparameters(optimizer_name, config):
    kwargs = dict(learning_rate=config['learning_rate'], weight_decay=config['weight_decay'],
                  betas=(config['beta1'], config['beta2']))
    if optimizer_name == 'sophiag':
        kwargs['rho'] = config['rho']
    return kwargs

# -----------------------------------------------------------------------------
# the loop's pieces

def forward_loss(model, X, Y, autocast):
    """Mean cross-entropy of one micro-batch."""
    with autocast:
        _, loss = model(X, Y)
    return loss

@torch.no_grad()
def estimate_loss(model, config, paths, vocab_size, autocast, rank, world_size, device):
    """Mean loss over the same `eval_iters` batches of each split every time (split across the
    processes), so successive estimates and different runs, whatever their seed, are measured on
    identical data."""
    out = {}
    model.eval()
    for split_id, split in enumerate(('train', 'val')):
        total = torch.zeros((), device=device)
        for k in range(rank, config['eval_iters'], world_size):
            # seed 0, not config['seed']: runs with different seeds are evaluated on the same text
            X, Y = get_batch(paths[split], 0, EVAL_STREAM, 2 * k + split_id,
                             config['batch_size'], config['block_size'], vocab_size, device,
                             config['dataset'])
            total += forward_loss(model, X, Y, autocast).float()
        if world_size > 1:
            dist.all_reduce(total)
        out[split] = total.item() / config['eval_iters']
    model.train()
    return out

def sampled_loss(model, X, autocast):
    """Mean cross-entropy against labels drawn from the model's own softmax at every position:
    inside the model's forward, so torch.compile fuses the draw with the loss (model.py)."""
    with autocast:
        _, loss = model(X, sample_targets=True)
    return loss

def gnb_hessian_pass(model, raw_model, optimizer, scaler, config, micro_batches, micro_steps,
                     paths, vocab_size, autocast, device, world_size):
    """Sophia-G's Hessian pass: labels sampled from the model's softmax, backward, EMA of the
    squared gradient. Returns a 0-dim device tensor: 1 if the sampled gradient was finite and the
    EMA was updated, 0 if the pass was skipped."""
    rng_devices = [device] if device.startswith('cuda') else []
    for micro_step, index in enumerate(micro_batches):
        if world_size > 1:
            model.require_backward_grad_sync = micro_step == micro_steps - 1
        X, _ = get_batch(paths['train'], config['seed'], TRAIN_STREAM, index, config['batch_size'],
                         config['block_size'], vocab_size, device, config['dataset'])
        # the labels' draw is a function of (seed, micro-batch) alone, as the data: the global RNG
        # is seeded for it and restored after, so dropout and the rest never see the difference
        with torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(seed_of(config['seed'], HESSIAN_STREAM, index))
            loss = sampled_loss(model, X, autocast) / micro_steps
        scaler.scale(loss).backward()
    grads = [p.grad for p in raw_model.parameters() if p.grad is not None]
    if scaler.is_enabled():
        torch._foreach_mul_(grads, 1.0 / scaler.get_scale())  # unscale by hand: not a training step
    norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), config['hess_grad_clip'] or math.inf)
    finite = torch.isfinite(norm)
    if finite.item():  # a non-finite sampled gradient must not reach the Hessian EMA
        optimizer.update_hessian()
    optimizer.zero_grad(set_to_none=True)
    return finite.float()

def hutchinson_hessian_pass(raw_model, optimizer, config, micro_batches, micro_steps, paths,
                            vocab_size, device, world_size):
    """Sophia-H's Hessian pass: u ⊙ (H u) with Rademacher u, by double backward on the training
    loss, summed over the micro-batches and averaged over processes. Runs in float32 on the
    uncompiled model with the math attention kernel: double backward needs both."""
    from sophia import hutchinson_hessian
    params = [p for group in optimizer.param_groups for p in group['params']]  # update_hessian's order
    total = [torch.zeros_like(p) for p in params]
    generator = torch.Generator(device=device)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for index in micro_batches:
        X, Y = get_batch(paths['train'], config['seed'], TRAIN_STREAM, index, config['batch_size'],
                         config['block_size'], vocab_size, device, config['dataset'])
        generator.manual_seed(seed_of(config['seed'], HESSIAN_STREAM, index))
        with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no double backward
            _, loss = raw_model(X, Y)
            estimates = hutchinson_hessian(loss / micro_steps, params, generator=generator)
        torch._foreach_add_(total, estimates)
    if world_size > 1:
        for t in total:
            dist.all_reduce(t)
        torch._foreach_div_(total, world_size)
    finite = torch.stack([torch.isfinite(t).all() for t in total]).all()
    if finite.item():
        optimizer.update_hessian(hessian_estimates=total)
    return finite.float()

class SignalFlag:
    """SIGTERM / SIGINT ask the loop to finish the current iteration, save and exit; a second
    signal exits at once. A SIGINT and a SIGTERM within a second count as one: Ctrl-C under
    torchrun reaches a worker from the terminal and again from torchrun."""
    def __init__(self):
        self.signum, self.when = 0, 0.0
    def install(self):
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.handle)
    def handle(self, signum, frame):
        if self.signum and (signum == self.signum or time.time() - self.when > 1.0):
            print(f"received {signal.Signals(signum).name} again: exiting now", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        if not self.signum:
            self.signum, self.when = signum, time.time()
            print(f"received {signal.Signals(signum).name}: finishing this iteration and saving a "
                  f"checkpoint (send it again to exit at once)", file=sys.stderr, flush=True)

class MetricsLog:
    """The run's local log, out_dir/metrics.jsonl, one JSON object per line (read by compare.py),
    mirrored to wandb when enabled."""
    def __init__(self, path, wandb_run):
        self.path, self.wandb_run = path, wandb_run
    def write(self, row):
        row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        with open(self.path, 'a') as f:
            f.write(json.dumps(row) + '\n')
        if self.wandb_run is not None and row['kind'] != 'config':
            self.wandb_run.log({k: v for k, v in row.items() if k != 'kind' and v is not None})

def gather_rng_states(world_size, device):
    """Every process's torch RNG states (dropout draws from them), gathered to all processes."""
    state = {'cpu': torch.get_rng_state()}
    if device.startswith('cuda'):
        state['cuda'] = torch.cuda.get_rng_state(device)
    if world_size == 1:
        return [state]
    states = [None] * world_size
    dist.all_gather_object(states, state)
    return states

# -----------------------------------------------------------------------------
# the run

def train(optimizer_name, config, sources, rank, world_size, device, stop_flag):
    master = rank == 0
    is_sophia = optimizer_name == 'sophiag'
    out_dir = config['out_dir']
    resuming = config['init_from'] == 'resume'
    prepare_out_dir(out_dir, resuming, master)
    if world_size > 1:
        dist.barrier()  # out_dir exists before any process looks into it
    dataset_vocab, paths = open_dataset(config['dataset'], config['block_size'])

    resume_state, resume_path = None, None
    if resuming:
        try:
            resume_state, resume_path = checkpoint.load_latest(
                out_dir, map_location=device, warn=print if master else (lambda m: None), quarantine=master)
        except checkpoint.CheckpointError as e:
            raise UserError(str(e))
        if resume_state is None:
            raise UserError(f"--init_from=resume but {out_dir} holds no checkpoint; "
                            f"start with --init_from=scratch")
        if resume_state['optimizer_name'] != optimizer_name:
            raise UserError(f"the checkpoint {resume_path} was trained with "
                            f"{resume_state['optimizer_name']}, not {optimizer_name}; resume it with "
                            f"train_{'sophiag' if resume_state['optimizer_name'] == 'sophiag' else 'adam'}.py "
                            f"or use another --out_dir")
        if master:
            print(f"resuming from {resume_path} (iteration {resume_state['iter_num']})")

    torch.manual_seed(config['seed'] + rank)  # dropout differs per process; data order does not
    if device.startswith('cuda'):  # TF32 tensor cores for any float32 matmul left outside autocast
        torch.backends.cuda.matmul.fp32_precision = 'tf32'
        torch.backends.cudnn.conv.fp32_precision = 'tf32'
    device_type = 'cuda' if device.startswith('cuda') else device
    ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[config['dtype']]
    autocast = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type, dtype=ptdtype)

    model, model_args = build_model(config, dataset_vocab, resume_state, master)
    model_vocab = model_args['vocab_size']
    check_token_ids(paths, model_vocab, config['dataset'])
    model.to(device)
    scaler = torch.amp.GradScaler(device_type, enabled=config['dtype'] == 'float16')
    optimizer = model.configure_optimizers(optimizer_name, device_type=device_type,
                                           **optimizer_hyperparameters(optimizer_name, config))
    if resume_state is not None:
        optimizer.load_state_dict(resume_state['optimizer'])
        scaler.load_state_dict(resume_state['scaler'])
        rng = resume_state['rng'][rank] if len(resume_state['rng']) == world_size else None
        if rng is not None:
            torch.set_rng_state(rng['cpu'].cpu())
            if 'cuda' in rng:
                torch.cuda.set_rng_state(rng['cuda'].cpu(), device)
        elif master:
            print(f"warning: the checkpoint was written by {len(resume_state['rng'])} processes, this "
                  f"run has {world_size}: dropout randomness will differ from an uninterrupted run")
    raw_model = model
    if config['compile']:
        if master:
            print("compiling the model... (takes a minute)")
        model = torch.compile(model)
    if world_size > 1:
        model = DDP(model, device_ids=[int(device[5:])] if device_type == 'cuda' else None)

    # batch arithmetic
    micro_steps = config['gradient_accumulation_steps'] // world_size  # per process
    tokens_per_iter = config['gradient_accumulation_steps'] * config['batch_size'] * config['block_size']
    if is_sophia:
        hess_total = config['hess_micro_steps'] or config['gradient_accumulation_steps']
        hess_micro_steps = hess_total // world_size
        hessian_tokens = hess_total * config['batch_size'] * config['block_size']
        # bs turns the stored EMA of squared sampled gradients into the Gauss-Newton estimate of the
        # mean loss: it is the token count of the batch those gradients came from (sophia.py)
        bs = hessian_tokens if config['hessian_estimator'] == 'gnb' else 1
    peak = config['peak_flops'] or None
    if peak is None and device_type == 'cuda':
        from model import device_peak_flops
        peak = device_peak_flops(device, ptdtype)

    # state that a checkpoint carries besides model and optimizer
    iter_num = resume_state['iter_num'] if resume_state else 0
    batches_drawn = resume_state['batches_drawn'] if resume_state else 0  # global micro-batch counter
    best_val_loss = resume_state['best_val_loss'] if resume_state else math.inf
    train_time = resume_state['train_time'] if resume_state else 0.0  # seconds in training iterations
    nonfinite_in_a_row = resume_state['nonfinite_in_a_row'] if resume_state else 0
    wandb_id = resume_state.get('wandb_id') if resume_state else None
    start_iter = iter_num
    last_checkpoint = resume_path

    wandb_run = None
    if master and config['wandb_log']:
        import wandb
        wandb_run = wandb.init(project=config['wandb_project'], name=config['wandb_run_name'],
                               config=dict(config, optimizer=optimizer_name), mode=config['wandb_mode'],
                               dir=out_dir, id=wandb_id, resume='allow' if wandb_id else None)
        wandb_id = wandb_run.id
    log = MetricsLog(os.path.join(out_dir, 'metrics.jsonl'), wandb_run) if master else None
    if master:
        print(format_config(config, sources))
        print(f"tokens per iteration: {config['gradient_accumulation_steps']} accumulation x "
              f"{config['batch_size']} batch x {config['block_size']} block = {tokens_per_iter:,}"
              + (f" over {world_size} processes" if world_size > 1 else ""))
        log.write(dict(kind='config', run_name=config['wandb_run_name'], optimizer=optimizer_name,
                       iter=iter_num, config=config, model_args=model_args))

    def save(is_best):
        nonlocal last_checkpoint
        rng = gather_rng_states(world_size, device)  # a collective: every process takes part
        if master:
            state = dict(format_version=checkpoint.FORMAT_VERSION, model=raw_model.state_dict(),
                         optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                         model_args=model_args, config=config, optimizer_name=optimizer_name,
                         iter_num=iter_num, batches_drawn=batches_drawn, best_val_loss=best_val_loss,
                         train_time=train_time, nonfinite_in_a_row=nonfinite_in_a_row, rng=rng,
                         wandb_id=wandb_id or '')
            last_checkpoint = checkpoint.save_checkpoint(out_dir, state, iter_num, config['keep_last'], is_best)
            print(f"saved checkpoint {last_checkpoint}")

    # accumulated on the device between log lines, read once per log interval
    loss_sum = torch.zeros((), device=device)
    clip_count = torch.zeros((), device=device)
    hessian_skips = torch.zeros((), device=device)
    steps_in_interval, skipped_in_interval = 0, 0
    last_log_time, iters_since_log = time.time(), 0
    params = [p for p in raw_model.parameters()]
    stop_agreed = False  # a signal reached some process, and all processes know it
    flags = torch.zeros(2, device=device)  # (non-finite step, stop requested), all-reduced each iteration
    while True:
        # evaluate and save at the top of the iteration: the state is that after iter_num steps
        is_best = False
        if (iter_num % config['eval_interval'] == 0 or iter_num == config['max_iters']) \
                and not (resume_state is not None and iter_num == start_iter) and not stop_agreed:
            losses = estimate_loss(model, config, paths, model_vocab, autocast, rank, world_size, device)
            is_best = losses['val'] < best_val_loss
            best_val_loss = min(best_val_loss, losses['val'])
            if master:
                print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                log.write({'kind': 'eval', 'iter': iter_num, 'tokens': iter_num * tokens_per_iter,
                           'time': train_time, 'train/loss': losses['train'], 'val/loss': losses['val'],
                           'lr': get_lr(iter_num, config)})
        if config['eval_only']:
            break
        if iter_num != start_iter and (iter_num % config['checkpoint_interval'] == 0
                                       or iter_num == config['max_iters'] or is_best or stop_agreed):
            save(is_best)
        if iter_num >= config['max_iters']:
            break
        if stop_agreed:
            if world_size > 1:
                # wait for process 0 to finish writing the checkpoint: once one process exits with
                # an error status torchrun gives the others only its shutdown timeout (30 s)
                dist.barrier()
            signum = stop_flag.signum or signal.SIGTERM  # another process may have been signalled
            raise TrainingStopped(f"stopped by {signal.Signals(signum).name} at iteration {iter_num}; "
                                  f"checkpoint {last_checkpoint}; resume with --init_from=resume",
                                  128 + signum)

        iteration_start = time.time()
        lr = get_lr(iter_num, config)
        for group in optimizer.param_groups:
            group['lr'] = lr
        # forward/backward over the micro-batches; DDP syncs gradients on the last one only
        first = batches_drawn + rank * micro_steps
        iteration_loss = torch.zeros((), device=device)
        for micro_step in range(micro_steps):
            if world_size > 1:
                model.require_backward_grad_sync = micro_step == micro_steps - 1
            X, Y = get_batch(paths['train'], config['seed'], TRAIN_STREAM, first + micro_step,
                             config['batch_size'], config['block_size'], model_vocab, device,
                             config['dataset'])
            loss = forward_loss(model, X, Y, autocast) / micro_steps
            iteration_loss += loss.detach().float()
            scaler.scale(loss).backward()
        batches_drawn += config['gradient_accumulation_steps']
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config['grad_clip'] or math.inf)
        # one small all-reduce and one host sync per iteration: skip non-finite steps, agree on stops
        bad = ~torch.isfinite(iteration_loss)
        if not scaler.is_enabled():  # under fp16 an inf gradient is the GradScaler's to handle
            bad |= ~torch.isfinite(grad_norm)
        flags[0] = bad  # written in place: no new tensor or host-to-device copy per iteration
        flags[1] = float(stop_flag.signum > 0)
        if world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        nonfinite, stop_agreed = flags.tolist()  # every process acts on the same agreed flags
        if nonfinite:
            # skip: parameters, momentum and Hessian EMA stay untouched
            optimizer.zero_grad(set_to_none=True)
            scaler.update()
            nonfinite_in_a_row += 1
            skipped_in_interval += 1
            if master:
                print(f"iter {iter_num}: non-finite loss or gradient, update skipped "
                      f"({nonfinite_in_a_row} in a row)")
            if nonfinite_in_a_row >= config['max_nonfinite']:
                raise TrainingStopped(
                    f"{nonfinite_in_a_row} iterations in a row with a non-finite loss or gradient, the "
                    f"last at iteration {iter_num}; "
                    + (f"the last good checkpoint is {last_checkpoint}. Lower the learning rate (or "
                       f"raise rho for Sophia) and resume from it" if last_checkpoint else
                       "no checkpoint was saved yet. Lower the learning rate (or raise rho for "
                       "Sophia) and start again"), 1)
        else:
            nonfinite_in_a_row = 0
            if config['grad_clip'] > 0:
                clip_count += (grad_norm > config['grad_clip']).float()
            loss_sum += iteration_loss
            steps_in_interval += 1
            if is_sophia:
                scaler.step(optimizer, bs=bs)
            else:
                scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        if is_sophia and iter_num % config['hess_interval'] == config['hess_interval'] - 1:
            micro_batches = range(batches_drawn + rank * hess_micro_steps,
                                  batches_drawn + (rank + 1) * hess_micro_steps)
            if config['hessian_estimator'] == 'gnb':
                ok = gnb_hessian_pass(model, raw_model, optimizer, scaler, config, micro_batches,
                                      hess_micro_steps, paths, model_vocab, autocast, device, world_size)
            else:
                ok = hutchinson_hessian_pass(raw_model, optimizer, config, micro_batches,
                                             hess_micro_steps, paths, model_vocab, device, world_size)
            hessian_skips += 1 - ok
            batches_drawn += hess_total
        iter_num += 1
        iters_since_log += 1
        train_time += time.time() - iteration_start

        if iter_num % config['log_interval'] == 0:
            # the only reads of device values between evaluations: one stack, one transfer
            values = [loss_sum, clip_count, hessian_skips]
            names = ['loss_sum', 'clip_count', 'hessian_skips']
            if is_sophia and optimizer.state:  # no state before the first step or Hessian pass
                # bs given: after a resume, or when every step so far was skipped, no step() has set it
                diagnostics = optimizer.diagnostics(bs=bs)
                names += list(diagnostics)
                values += list(diagnostics.values())
            names.append('param_norm')
            values.append(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(params))))
            if world_size > 1:
                dist.all_reduce(values[0])  # the loss over all processes' micro-batches
            read = dict(zip(names, torch.stack([v.float() for v in values]).tolist()))
            loss_sum.zero_(), clip_count.zero_(), hessian_skips.zero_()
            now = time.time()
            dt = (now - last_log_time) / iters_since_log
            last_log_time, iters_since_log = now, 0
            if master:
                passes = tokens_per_iter + (hessian_tokens / config['hess_interval'] if is_sophia else 0)
                mfu = raw_model.estimate_mfu(passes / model_args['block_size'], dt, peak)
                loss = read['loss_sum'] / world_size / steps_in_interval if steps_in_interval else math.nan
                row = {'kind': 'train', 'iter': iter_num, 'tokens': iter_num * tokens_per_iter,
                       'time': train_time, 'loss': loss, 'lr': lr, 'ms_per_iter': dt * 1000,
                       'tokens_per_s': tokens_per_iter / dt, 'mfu': mfu,
                       'param_norm': read['param_norm'], 'skipped': skipped_in_interval}
                if config['grad_clip'] > 0 and steps_in_interval:
                    row['train/clip_rate'] = read['clip_count'] / steps_in_interval
                if is_sophia:
                    row.update({'train/win_rate': read.get('win_rate'), 'hessian_norm': read.get('hessian_norm'),
                                'hessian_norm2': read.get('hessian_norm2'),
                                'momentum_norm': read.get('momentum_norm'),
                                'hessian_skipped': read['hessian_skips']})
                log.write(row)
                line = f"iter {iter_num}: loss {loss:.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms/iter, " \
                       f"{tokens_per_iter / dt:,.0f} tok/s"
                if mfu is not None:
                    line += f", mfu {mfu * 100:.1f}%"
                if 'win_rate' in read:
                    line += f", win rate {read['win_rate']:.3f}"
                print(line, flush=True)
            steps_in_interval, skipped_in_interval = 0, 0
    if wandb_run is not None:
        wandb_run.finish()

# how gloo (torch 2.13) words a peer that hung past ddp_timeout or died: a plain RuntimeError
GLOO_FAILURES = ('Timed out waiting', 'pair closure', 'Connection closed by peer', 'Connection reset by peer')

def is_communication_failure(e):
    """A collective failed because another process died or hung. NCCL and the rendezvous store
    raise torch.distributed.DistError (after ddp_timeout); gloo raises RuntimeError."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    return isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and any(
        text in str(e) for text in GLOO_FAILURES))

def main(optimizer_name, defaults, argv):
    """Entry point of the training scripts: config, setup, train; errors a user can fix are one
    line and exit status 2."""
    stop_flag = SignalFlag()
    stop_flag.install()
    world_size = int(os.environ.get('WORLD_SIZE', 1))
    master = int(os.environ.get('RANK', 0)) == 0
    status, stopped = 0, False
    try:
        config, sources = parse_args(defaults, argv)
        check_config(config, sources, world_size)
        rank, world_size, device = setup_distributed(config)
        train(optimizer_name, config, sources, rank, world_size, device, stop_flag)
    except (ConfigError, UserError) as e:
        if master:  # every process finds the same mistake: say it once
            print(f"error: {e}", file=sys.stderr, flush=True)
        status = 2
    except TrainingStopped as e:  # every process stops at the same agreed iteration
        stopped = True
        if master:
            print(e, file=sys.stderr, flush=True)
        status = e.status
    except Exception as e:
        status = 1  # and the process group is left alone: destroying it could wait on the dead peer
        if not is_communication_failure(e):
            raise
        print(f"error: process {os.environ.get('RANK', 0)}: communication with the other processes "
              f"failed or timed out: a peer process died or hung ({str(e).splitlines()[0]}); "
              f"resume with --init_from=resume", file=sys.stderr, flush=True)
    finally:
        if dist.is_available() and dist.is_initialized():
            if status == 0 or stopped:
                # tear down together: a process leaving while process 0 still writes the final
                # checkpoint can abort inside gloo ("terminate called without an active exception")
                dist.barrier()
                dist.destroy_process_group()
            else:
                # a process group with a dead or hung peer cannot be torn down: gloo's threads
                # would abort the interpreter's exit (SIGABRT instead of this status). Leave now.
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(status)
    sys.exit(status)
