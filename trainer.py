"""
The training loop of train_sophiag.py and train_adam.py, written once so the two cannot drift
apart. Plain functions with explicit arguments; importing this module does nothing.

One process:       $ python train_sophiag.py config/train_stdlib_char_sophiag.py
DDP on one node:   $ torchrun --standalone --nproc_per_node=8 train_sophiag.py config/train_gpt2_small_sophiag.py
DDP on two nodes:  $ torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST --master_port=1234 train_sophiag.py ...

The batch arithmetic is the official Sophia scripts': each process runs gradient_accumulation_steps
micro-batches of batch_size sequences per iteration, so an iteration is processes x batch_size x
gradient_accumulation_steps sequences, which must equal total_bs where both are given, and from
which gradient_accumulation_steps = 0 is derived (configurator.batch_plan). Then the gradient is
clipped and the optimizer steps. Sophia-G adds a Hessian pass every `hess_interval` iterations,
after the step as in the official loop: fresh batches, full-sequence logits, labels sampled from
the model's own softmax, backward, `optimizer.update_hessian()`.

Data order is a function of the seed and a global sequence counter alone: sequence j of the run is
a window of the token file at an offset hashed from (seed, j), an iteration takes the next total_bs
sequences and each process its contiguous share of them. So every process sees different data, a
resumed run sees exactly the sequences it would have seen, and a run sees the same global batches
whatever the number of processes and however total_bs is split into micro-batches.

`train` reads top to bottom; its pieces have names: forward_backward, clip_and_step (which has
every process agree on skipping a non-finite step and on stopping), hessian_pass, evaluate, save,
and IntervalLog for the log lines. bench.py times these same functions.
"""

import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
from configurator import (ConfigError, batch_plan, check_config, describe_defaults, format_config,
                          format_help, parse_args, wants_help)

REPO = os.path.dirname(os.path.abspath(__file__))
# independent random streams: training data, the evaluation batches of each split, the Hessian
# pass's sampled labels
TRAIN_STREAM, EVAL_STREAMS, HESSIAN_STREAM = 0, {'train': 1, 'val': 3}, 2
MODEL_KEYS = ('n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'vocab_size', 'dropout',
              'scale_attn_by_inverse_layer_idx', 'gelu')
SHAPE_KEYS = ('n_layer', 'n_head', 'n_embd', 'block_size', 'bias',
              'scale_attn_by_inverse_layer_idx', 'gelu')  # the config keys that say what a model is

class UserError(Exception):
    """A problem the user can fix: reported as one line, exit status 2, nothing overwritten."""

class TrainingStopped(Exception):
    """The run stopped on purpose (a signal, too many non-finite iterations); exit status given."""
    def __init__(self, message, status):
        super().__init__(message)
        self.status = status

def default_config():
    """The config keys of both training scripts with their defaults: GPT-2 small (124M) on
    OpenWebText with AdamW, as the official runs. Each script changes what differs. The comment
    beside each key is what `--help` says of it (configurator.describe_defaults)."""
    # I/O
    out_dir = 'out'  # checkpoints, metrics.jsonl (the local log compare.py reads) and config go here
    eval_interval = 1000  # estimate train and val loss every this many iterations
    eval_iters = 200  # batches per split for each estimate (the same batches every time)
    log_interval = 10  # print and log a training line every this many iterations
    eval_only = False  # evaluate once and exit
    init_from = 'scratch'  # 'scratch'; 'resume' (the newest good checkpoint in out_dir); 'gpt2*' or a Hugging Face model dir (pretrained weights); or a checkpoint to continue in out_dir (a .pt file: ours, the official Sophia scripts' or nanoGPT's; a sharded run's .dcp folder)
    checkpoint_interval = 1000  # save a checkpoint every this many iterations, at the end, and when val improves
    always_save_checkpoint = False  # also save after every evaluation (nanoGPT's and the official scripts' key)
    keep_last = 3  # keep this many newest checkpoints (best.pt is kept besides)
    # wandb logging
    wandb_log = False  # log to wandb too (metrics.jsonl is always written)
    wandb_mode = 'online'  # 'online', or 'offline' to log with no network (`wandb sync` later)
    wandb_project = 'sophia'  # the wandb project to log to
    wandb_run_name = 'gpt2-small-adamw'  # also the run's label in metrics.jsonl and compare.py
    # data and batch (processes x batch_size x gradient_accumulation_steps = total_bs sequences per iteration)
    dataset = 'openwebtext'  # a folder under data/ (or a path) holding train.bin, val.bin, meta.pkl
    total_bs = 480  # sequences per iteration over all processes (480 x 1024 = 491,520 tokens, the official runs)
    batch_size = 12  # sequences per micro-batch, in each process
    gradient_accumulation_steps = 0  # micro-batches per iteration in each process; 0 = total_bs / (batch_size x processes)
    block_size = 1024  # tokens per sequence
    # model
    n_layer = 12  # transformer blocks
    n_head = 12  # attention heads per block
    n_embd = 768  # width of the residual stream
    dropout = 0.0  # 0 for pretraining, 0.1+ for finetuning
    bias = False  # biases in Linear and LayerNorm layers
    scale_attn_by_inverse_layer_idx = True  # also scale layer i's attention logits by 1/(i+1), as every official GPT-2 run
    gelu = 'tanh'  # 'tanh' (GPT-2, the official runs) or 'exact' (nanoGPT; faster on some CPUs)
    # optimizer
    learning_rate = 6e-4  # peak learning rate
    max_iters = 100000  # total iterations
    weight_decay = 1e-1  # decoupled weight decay of the matmul weights and embeddings
    beta1 = 0.9  # AdamW's first-moment EMA
    beta2 = 0.95  # AdamW's second-moment EMA
    grad_clip = 1.0  # clip the gradient norm at this value, 0 disables
    # learning rate schedule: linear warmup, cosine decay to min_lr, then constant
    decay_lr = True  # False: learning_rate throughout
    warmup_iters = 2000  # iterations of linear warmup
    lr_decay_iters = 100000  # the iteration where the cosine reaches min_lr (~ max_iters per Chinchilla)
    min_lr = 3e-5  # ~ learning_rate / 10 per Chinchilla
    # system
    device = 'cuda'  # 'cpu', 'cuda', 'cuda:N' or 'mps'; under torchrun each process takes cuda:LOCAL_RANK
    dtype = 'bfloat16'  # 'float32', 'bfloat16', or 'float16' (with a GradScaler)
    compile = True  # torch.compile the model
    seed = 1337  # initialisation, data order and the Hessian pass's labels
    peak_flops = 0.0  # the device's dense peak FLOP/s for MFU; 0 = look it up by GPU name (unknown: no MFU)
    backend = 'auto'  # process-group backend under torchrun: 'auto' (nccl on CUDA, gloo otherwise), 'nccl' or 'gloo'
    # parallelism over the processes of a torchrun launch
    data_parallel = 'ddp'  # 'ddp': every process holds the whole model and optimizer; 'fsdp': all of it sharded over the processes; 'hsdp': sharded within a node, replicated across nodes
    shard_group_size = 0  # hsdp: processes per shard group; 0 = the processes of a node (torchrun's LOCAL_WORLD_SIZE)
    reshard_after_forward = 'auto'  # fsdp/hsdp: 'true' frees a block's gathered parameters after its forward, 'false' keeps them for its backward; 'auto': 'false' where the model in compute precision takes under a tenth of a GPU's memory
    activation_checkpointing = False  # recompute each block's activations in backward: less memory for about a third more compute
    # faults
    max_nonfinite = 5  # stop after this many iterations in a row with a non-finite loss or gradient
    ddp_timeout = 600  # seconds a process waits for the others before it stops with an error
    return dict(locals())

def foreign_keys(optimizer_name):
    """Keys of the official Sophia scripts' configs that are no key here, with what they mean here:
    handlers for configurator.parse_args (each returns the settings it makes and a note saying so).
    The official configs' other keys (total_bs, always_save_checkpoint, backend, ...) are keys here."""
    script = 'train_sophiag.py' if optimizer_name == 'sophiag' else 'train_adam.py'
    def optimizer(value, source):
        if value == optimizer_name:
            return [], f"optimizer_name={value!r}: {script} trains {optimizer_name}"
        other = {'sophiag': 'train_sophiag.py', 'adamw': 'train_adam.py'}.get(value)
        raise ConfigError(f"optimizer_name={value!r} ({source}) but {script} trains {optimizer_name}; "
                          + (f"run {other} with this config" if other else
                             "this repository trains sophiag (train_sophiag.py) and adamw (train_adam.py)"))
    keys = {'optimizer_name': optimizer,
            'variant': lambda value, source: ([], f"variant={value!r} is ignored: the official scripts "
                                                  f"never read it either")}
    if optimizer_name == 'sophiag':
        # the official scripts copy interval into hess_interval before the config file runs, so
        # there a config's interval never took effect; here it does
        keys['interval'] = lambda value, source: ([('hess_interval', value)],
                                                  f"interval={value!r} is the official name of hess_interval: "
                                                  f"a Hessian pass every {value!r} iterations")
    return keys

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
        backend = config['backend']
        if backend == 'auto':
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

def available_datasets():
    """The datasets under data/: the folders with a prepare script."""
    root = os.path.join(REPO, 'data')
    return sorted(name for name in os.listdir(root) if os.path.isfile(os.path.join(root, name, 'prepare.py')))

def prepare_command(dataset):
    script = os.path.join(data_dir_of(dataset), 'prepare.py')
    if os.sep in dataset or not os.path.isfile(script):
        return f"prepare the token files in {data_dir_of(dataset)}"
    return f"run: python {os.path.relpath(script)}"

def open_dataset(dataset, block_size):
    """Check train.bin / val.bin / meta.pkl of a dataset; return its vocabulary size (None if the
    dataset has no meta.pkl) and the paths of the token files."""
    data_dir = data_dir_of(dataset)
    if os.sep not in dataset and not os.path.isdir(data_dir):
        raise UserError(f"dataset {dataset!r} does not exist: data/ has {', '.join(available_datasets())} "
                        f"(each made by its prepare.py), or give the path of a folder holding train.bin and val.bin")
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

GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64's counter step: 2**64 / the golden ratio

def window_starts(seed, stream, first, count, windows):
    """Offsets of sequences first .. first+count-1 of a random stream, each uniform in
    range(windows) and a function of (seed, stream, its index) alone: SplitMix64's output function
    (Steele, Lea, Flood 2014) over a counter, keyed by the seed and stream. Vectorised, so a
    batch costs microseconds; the modulo's bias is below windows / 2**64."""
    key = np.random.SeedSequence((seed, stream)).generate_state(1, np.uint64)[0]
    x = key + (np.arange(first, first + count, dtype=np.uint64) + np.uint64(1)) * GOLDEN_GAMMA
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return (x % np.uint64(windows)).astype(np.int64)

def get_batch(path, seed, stream, first, batch_size, block_size, vocab_size, device, dataset):
    """Sequences first .. first+batch_size-1 of a random stream: windows of block_size + 1 tokens
    of the token file, as inputs and as the targets one token later."""
    # recreate the memmap every batch: a long-lived np.memmap holds on to the pages it touched
    data = np.memmap(path, dtype=np.uint16, mode='r')
    ix = window_starts(seed, stream, first, batch_size, len(data) - block_size)
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

def load_start(config, optimizer_name, master, device):
    """The checkpoint a run continues: with init_from='resume' the newest good one in out_dir, with
    init_from a .pt file or a sharded run's .dcp folder that one (read_checkpoint_file). Returns
    (state, path), (None, None) for a new model. The state is in this repository's checkpoint
    format (see save); a sharded one's tensors are loaded later, into the built model (setup)."""
    init_from = config['init_from']
    if init_from == 'resume':
        try:
            state, path = checkpoint.load_latest(config['out_dir'], map_location=device,
                                                 warn=print if master else (lambda m: None), quarantine=master,
                                                 model_tensors=False)
        except checkpoint.CheckpointError as e:
            raise UserError(str(e))
        if state is None:
            raise UserError(f"--init_from=resume but {config['out_dir']} holds no checkpoint; "
                            f"start with --init_from=scratch")
    elif init_from.endswith(('.pt', '.dcp')):
        state, path = read_checkpoint_file(init_from.rstrip(os.sep), device), init_from.rstrip(os.sep)
    else:
        return None, None
    if state['optimizer_name'] != optimizer_name:
        script = f"train_{'sophiag' if state['optimizer_name'] == 'sophiag' else 'adam'}.py"
        raise UserError(f"the checkpoint {path} was trained with {state['optimizer_name']}, not "
                        f"{optimizer_name}; continue it with {script} or use another --out_dir")
    return state, path

def read_checkpoint_file(path, device):
    """A checkpoint file to continue: one of ours (verified against its manifest where it has one),
    or one written by the official Sophia scripts or nanoGPT, translated: the model state without
    torch.compile's '_orig_mod.' prefixes and causal-mask buffers, model_args completed with the
    keys those scripts lack, the optimizer state (its layout is mapped in setup, see
    foreign_optimizer_state), the iteration and the best val loss. `foreign` names the writer."""
    if os.path.exists(checkpoint.manifest_of(path)) or os.path.isdir(path):
        try:
            return checkpoint.load_checkpoint(path, map_location=device, model_tensors=False)
        except checkpoint.CheckpointError as e:
            raise UserError(str(e))
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise UserError(f"{path} cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                        f"--init_from takes a .pt file written by this repository, the official Sophia "
                        f"scripts or nanoGPT")
    if not isinstance(state, dict) or not {'model', 'model_args', 'optimizer', 'iter_num'} <= state.keys():
        raise UserError(f"{path} is not a training checkpoint (it needs model, model_args, optimizer and "
                        f"iter_num); --init_from takes one written by this repository, the official Sophia "
                        f"scripts or nanoGPT")
    if 'format_version' in state:  # ours, copied without its manifest
        return state
    saved_args, saved_config = state['model_args'], state.get('config', {})
    # only the official scripts write optimizer_name and scale_attn_by_inverse_layer_idx
    official = 'optimizer_name' in saved_config or 'scale_attn_by_inverse_layer_idx' in saved_args
    missing = [key for key in ('n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'vocab_size')
               if key not in saved_args]
    if missing:
        raise UserError(f"{path}: its model_args lack {', '.join(missing)}; it was not written by the "
                        f"official Sophia scripts or nanoGPT")
    model_args = {key: saved_args[key] for key in MODEL_KEYS if key in saved_args}
    model_args.setdefault('dropout', 0.0)
    model_args.setdefault('scale_attn_by_inverse_layer_idx', False)  # nanoGPT's model has no such scaling
    # the official model computes GPT-2's tanh GELU, nanoGPT's model the exact erf form
    model_args['gelu'] = 'tanh' if official else 'exact'
    model = {}
    for key, value in state['model'].items():
        key = key.removeprefix('_orig_mod.')  # torch.compile's wrapper, saved by some versions
        if not key.endswith('.attn.bias'):  # the causal mask both keep as a buffer without flash attention
            model[key] = value
    return dict(model=model, model_args=model_args, optimizer=state['optimizer'],
                optimizer_name=saved_config.get('optimizer_name', 'adamw'), iter_num=state['iter_num'],
                best_val_loss=float(state.get('best_val_loss', math.inf)), config=saved_config,
                foreign='the official Sophia scripts' if official else 'nanoGPT')

def adopt_model_args(config, sources, model_args, path):
    """A continued model is the checkpoint's: model keys left at their defaults take its values,
    and those set explicitly (config file or argument) must agree with it."""
    saved = {'gelu': 'tanh', **model_args}  # checkpoints from before the gelu key: the tanh GELU
    changed = [f"{key}={config[key]!r} (checkpoint: {saved[key]!r})" for key in SHAPE_KEYS
               if sources.get(key, 'default') != 'default' and config[key] != saved[key]]
    if changed:
        raise UserError(f"the checkpoint {path} is of another model: {', '.join(changed)}; drop those "
                        f"overrides (the model is the checkpoint's) or use another --out_dir")
    for key in SHAPE_KEYS:
        if config[key] != saved[key]:
            config[key], sources[key] = saved[key], f"the checkpoint {path}"

def build_model(config, dataset_vocab, start_state):
    """A GPT from scratch, from a checkpoint's model args and weights, or from pretrained GPT-2
    weights, for a dataset of vocabulary dataset_vocab (None: no meta.pkl). Returns (model,
    model_args)."""
    from model import GPT, GPTConfig
    model_args = {key: config[key] for key in MODEL_KEYS if key != 'vocab_size'}
    model_args['vocab_size'] = model_vocab_size(dataset_vocab)
    if start_state is not None:
        model_args = dict(start_state['model_args'], dropout=config['dropout'])
        model = GPT(GPTConfig(**model_args))
        if 'sharded' not in start_state:  # a sharded checkpoint loads once the model is (setup)
            model.load_state_dict(start_state['model'])
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

def foreign_optimizer_state(saved, model, path):
    """An optimizer state dict of the official Sophia scripts or nanoGPT, keyed by parameter name
    (named_optimizer_state's form), and which layout it had ('ours' or 'official'). Its
    per-parameter state follows the order of its param groups: either ours (nanoGPT since 2023:
    named_parameters order, matrices and embeddings in the first group), or the official scripts'
    (names sorted, Linear weights in the first group; biases, LayerNorm and embedding weights in
    the second), told apart by the groups' sizes and shapes. Its param groups' hyperparameters
    are not kept: this run's config sets them."""
    params = dict(model.named_parameters())  # the tied lm_head weight appears once, as wte's
    names = list(params)
    linear = sorted(n for n in names if n.endswith(('.c_attn.weight', '.c_proj.weight', '.c_fc.weight')))
    official = [linear, sorted(n for n in names if n not in linear)]
    saved_groups = [group['params'] for group in saved['param_groups']]
    def fits(layout):
        if [len(g) for g in layout] != [len(g) for g in saved_groups]:
            return False
        return all(saved['state'][i]['exp_avg'].shape == params[n].shape
                   for group, ids in zip(layout, saved_groups) for n, i in zip(group, ids) if i in saved['state'])
    name, layout = next(((name, layout) for name, layout in (('ours', parameter_groups(model)), ('official', official))
                         if fits(layout)), (None, None))
    if layout is None:
        raise UserError(f"the optimizer state in {path} does not match this model's parameters in "
                        f"nanoGPT's or the official scripts' layout; it cannot be continued here")
    by_name = {n: saved['state'][i] for group, ids in zip(layout, saved_groups)
               for n, i in zip(group, ids) if i in saved['state']}
    return {'state': by_name, 'param_groups': None}, name

def parameter_groups(model):
    """Parameter names in model.configure_optimizers' groups and order: matrices and embeddings
    (decayed), then biases and LayerNorm gains."""
    params = dict(model.named_parameters())
    return [[n for n in params if params[n].dim() >= 2], [n for n in params if params[n].dim() < 2]]

def named_optimizer_state(saved, model):
    """This repository's optimizer state dict (keyed by position, as optimizer.state_dict()) keyed
    by parameter name instead, the form torch.distributed.checkpoint's state dict functions take."""
    groups = parameter_groups(model)
    names = [n for group in groups for n in group]
    return {'state': {names[i]: value for i, value in saved['state'].items()},
            'param_groups': [dict(group, params=list(names_)) for group, names_ in zip(saved['param_groups'], groups)]}

def load_named_optimizer_state(model, optimizer, named, sharded):
    """Load a state dict keyed by parameter name (param_groups None: keep the optimizer's own
    hyperparameters), into a sharded optimizer (each process takes its shards) or a plain one."""
    groups = parameter_groups(model)
    if named['param_groups'] is None:
        named = dict(named, param_groups=[dict(group, params=list(names)) for group, names
                                          in zip(optimizer.state_dict()['param_groups'], groups)])
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True))
    else:
        index = {n: i for i, n in enumerate(n for group in groups for n in group)}
        optimizer.load_state_dict({'state': {index[n]: value for n, value in named['state'].items()},
                                   'param_groups': [dict(group, params=[index[n] for n in group['params']])
                                                    for group in named['param_groups']]})

def load_sharded_checkpoint(model, optimizer, path):
    """The model and optimizer state of a sharded checkpoint (checkpoint.save_sharded) into this
    run's model and optimizer, sharded or not, on any number of processes: every process reads
    what its own parameters need."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.load({'model': model_state, 'optimizer': optimizer_state}, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)

def shard_model(model, config, world_size, local_world_size, device_type, ptdtype):
    """FSDP2: every transformer block, then the rest of the model (embeddings, final norm, the tied
    output layer), sharded in place over all processes ('fsdp'), or within shard groups and
    replicated across them ('hsdp', a 2-D mesh). Parameters stay float32 (the optimizer's master
    copy); forward and backward compute in `ptdtype`, gradients are reduced in float32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    if config['data_parallel'] == 'hsdp':
        shard = config['shard_group_size'] or local_world_size
        mesh = init_device_mesh(device_type, (world_size // shard, shard), mesh_dim_names=('replicate', 'shard'))
    else:
        mesh = init_device_mesh(device_type, (world_size,), mesh_dim_names=('shard',))
    reshard = config['reshard_after_forward']
    if reshard == 'auto':
        # keeping every block's gathered parameters from forward to backward saves an all-gather
        # per block, at the memory of an unsharded model: worth it while that is small
        gathered = sum(p.numel() for p in model.parameters()) * ptdtype.itemsize
        memory = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory \
            if device_type == 'cuda' else 0
        reshard = 'false' if gathered < memory / 10 else 'true'
    policy = MixedPrecisionPolicy(param_dtype=None if ptdtype == torch.float32 else ptdtype,
                                  reduce_dtype=torch.float32)
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard == 'true')
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)  # needed first in backward
    return mesh

def optimizer_hyperparameters(optimizer_name, config):
    kwargs = dict(learning_rate=config['learning_rate'], weight_decay=config['weight_decay'],
                  betas=(config['beta1'], config['beta2']))
    if optimizer_name == 'sophiag':
        kwargs['rho'] = config['rho']
    return kwargs

# -----------------------------------------------------------------------------
# the loop's pieces

@dataclass
class Run:
    """What the loop's pieces share; fixed for the run."""
    config: dict
    optimizer_name: str
    model: torch.nn.Module  # what runs forward and backward: compiled and DDP-wrapped as configured
    raw_model: torch.nn.Module  # the GPT itself: parameters, state dict, MFU
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: object
    plan: object  # configurator.BatchPlan
    paths: dict  # token files by split
    vocab_size: int
    device: str
    rank: int
    world_size: int
    params: list = field(init=False)
    flags: torch.Tensor = field(init=False)  # (non-finite step, stop requested), agreed on every iteration

    def __post_init__(self):
        self.params = list(self.raw_model.parameters())
        self.flags = torch.zeros(2, device=self.device)  # allocated once, written in place

    @property
    def sharded(self):
        """FSDP or HSDP: parameters, gradients and optimizer state are DTensors, each process
        holding shards."""
        return self.config['data_parallel'] != 'ddp'

    @property
    def is_sophia(self):
        return self.optimizer_name == 'sophiag'

    @property
    def tokens_per_iter(self):
        return self.plan.sequences * self.config['block_size']

    @property
    def hessian_tokens(self):
        return self.plan.hess_sequences * self.config['block_size']

    @property
    def bs(self):
        """The step's bs: it turns the stored EMA of squared sampled gradients into the Gauss-Newton
        estimate of the mean loss, so it is the token count of the batch those gradients came from
        (sophia.py). Hutchinson estimates are of the mean loss already."""
        return self.hessian_tokens if self.config['hessian_estimator'] == 'gnb' else 1

    def batch(self, first):
        """The training batch of global sequences first .. first+batch_size-1."""
        config = self.config
        return get_batch(self.paths['train'], config['seed'], TRAIN_STREAM, first, config['batch_size'],
                         config['block_size'], self.vocab_size, self.device, config['dataset'])

@dataclass
class RunState:
    """What a checkpoint carries besides model, optimizer and RNG: where the run is."""
    iter_num: int = 0
    sequences_drawn: int = 0  # global count of training sequences drawn so far (steps and Hessian passes)
    best_val_loss: float = math.inf
    train_time: float = 0.0  # seconds spent in training iterations (not evaluating or saving)
    nonfinite_in_a_row: int = 0
    wandb_id: str = ''
    checkpoint: str = None  # the newest checkpoint written or continued from (not saved)
    eval_seconds: float = 0.0  # the last evaluation's duration, for the ETA (not saved)

    SAVED = ('iter_num', 'sequences_drawn', 'best_val_loss', 'train_time', 'nonfinite_in_a_row', 'wandb_id')

    @classmethod
    def continuing(cls, start_state, path):
        """The state a checkpoint continues from; one of the official scripts or nanoGPT holds only
        the iteration and the best val loss."""
        state = cls(checkpoint=path)
        for key in cls.SAVED:
            if key in start_state:
                setattr(state, key, start_state[key])
        if 'sequences_drawn' not in start_state and 'batches_drawn' in start_state:
            # written before data was drawn per sequence: micro-batches of batch_size sequences
            state.sequences_drawn = start_state['batches_drawn'] * start_state['config']['batch_size']
        return state

def set_gradient_sync(run, sync):
    """Whether the next backward reduces the gradients over the processes: on an iteration's last
    micro-batch only (DDP all-reduces them, FSDP reduce-scatters them to their shards)."""
    if isinstance(run.model, DDP):
        run.model.require_backward_grad_sync = sync
    elif run.sharded:
        run.raw_model.set_requires_gradient_sync(sync)

def whole(tensor):
    """A DTensor made whole on every process (a norm over sharded tensors comes as one), or the
    tensor itself."""
    from torch.distributed.tensor import DTensor
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor

def forward_loss(model, X, Y, autocast):
    """Mean cross-entropy of one micro-batch."""
    with autocast:
        _, loss = model(X, Y)
    return loss

def forward_backward(run, first):
    """Forward and backward over this process's micro-batches of an iteration whose global sequences
    start at `first`. Returns the mean loss of those micro-batches, a 0-dim device tensor (no host
    sync); the gradients, scaled by the GradScaler, are averaged over the processes."""
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

def agree_on_flags(run, nonfinite, stop_requested):
    """One small all-reduce and one host sync per iteration: every process learns whether any of
    them saw a non-finite loss or gradient (then all skip the step) or got a stop signal (then all
    stop after this iteration). Returns (nonfinite, stop), the same on every process."""
    run.flags[0] = nonfinite  # written in place: no new tensor or host-to-device copy per iteration
    run.flags[1] = float(stop_requested)
    if run.world_size > 1:
        dist.all_reduce(run.flags, op=dist.ReduceOp.MAX)
    nonfinite, stop = run.flags.tolist()
    return bool(nonfinite), bool(stop)

def clip_and_step(run, loss, stop_requested):
    """Unscale and clip the gradient, agree with the other processes (agree_on_flags), then step
    the optimizer, or skip the step where any process saw a non-finite loss or gradient: parameters,
    momentum and Hessian EMA stay untouched. Returns (stepped, stop, grad_norm)."""
    scaler, optimizer = run.scaler, run.optimizer
    scaler.unscale_(optimizer)
    grad_norm = whole(torch.nn.utils.clip_grad_norm_(run.params, run.config['grad_clip'] or math.inf))
    nonfinite = ~torch.isfinite(loss)
    if not scaler.is_enabled():  # under fp16 an inf gradient is the GradScaler's to handle
        nonfinite |= ~torch.isfinite(grad_norm)
    nonfinite, stop = agree_on_flags(run, nonfinite, stop_requested)
    if not nonfinite:
        if run.is_sophia:
            scaler.step(optimizer, bs=run.bs)
        else:
            scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return not nonfinite, stop, grad_norm

def sampled_loss(model, X, autocast):
    """Mean cross-entropy against labels drawn from the model's own softmax at every position:
    inside the model's forward, so torch.compile fuses the draw with the loss (model.py)."""
    with autocast:
        _, loss = model(X, sample_targets=True)
    return loss

def hessian_pass(run, first):
    """Sophia's Hessian pass over the global sequences from `first` (plan.hess_sequences of them),
    each process over its share: Gauss-Newton-Bartlett (Sophia-G) or Hutchinson (Sophia-H).
    Returns a 0-dim device tensor: 1 if the Hessian EMA was updated, 0 if the estimate was not
    finite and the pass skipped."""
    steps, batch_size = run.plan.hess_micro_steps, run.config['batch_size']
    start = first + run.rank * steps * batch_size
    micro_batches = [start + i * batch_size for i in range(steps)]  # their first sequences
    if run.config['hessian_estimator'] == 'gnb':
        return gnb_hessian_pass(run, micro_batches)
    return hutchinson_hessian_pass(run, micro_batches)

def gnb_hessian_pass(run, micro_batches):
    """Sophia-G: labels sampled from the model's softmax, backward (summed over processes like a
    training step), the sampled gradient clipped at hess_grad_clip as in the official loop, then
    the EMA of its square."""
    rng_devices = [run.device] if run.device.startswith('cuda') else []
    for micro_step, first in enumerate(micro_batches):
        set_gradient_sync(run, micro_step == len(micro_batches) - 1)
        X, _ = run.batch(first)
        # the labels' draw is a function of (seed, sequence) alone, as the data: the global RNG
        # is seeded for it and restored after, so dropout and the rest never see the difference
        with torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(seed_of(run.config['seed'], HESSIAN_STREAM, first))
            loss = sampled_loss(run.model, X, run.autocast) / len(micro_batches)
        run.scaler.scale(loss).backward()
    grads = [p.grad for p in run.params if p.grad is not None]
    if run.scaler.is_enabled():
        torch._foreach_mul_(grads, 1.0 / run.scaler.get_scale())  # unscale by hand: not a training step
    norm = whole(torch.nn.utils.clip_grad_norm_(run.params, run.config['hess_grad_clip'] or math.inf))
    finite = torch.isfinite(norm)
    if finite.item():  # a non-finite sampled gradient must not reach the Hessian EMA
        run.optimizer.update_hessian()
    run.optimizer.zero_grad(set_to_none=True)
    return finite.float()

def hutchinson_hessian_pass(run, micro_batches):
    """Sophia-H: u ⊙ (H u) with Rademacher u, by double backward on the training loss, summed over
    the micro-batches and averaged over processes. Runs in float32 on the uncompiled model with
    the math attention kernel: double backward needs both."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from sophia import hutchinson_hessian
    params = [p for group in run.optimizer.param_groups for p in group['params']]  # update_hessian's order
    total = [torch.zeros_like(p) for p in params]
    generator = torch.Generator(device=run.device)
    for first in micro_batches:
        X, Y = run.batch(first)
        generator.manual_seed(seed_of(run.config['seed'], HESSIAN_STREAM, first))
        with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no double backward
            _, loss = run.raw_model(X, Y)
            estimates = hutchinson_hessian(loss / len(micro_batches), params, generator=generator)
        torch._foreach_add_(total, estimates)
    if run.world_size > 1:
        for t in total:
            dist.all_reduce(t)
        torch._foreach_div_(total, run.world_size)
    finite = torch.stack([torch.isfinite(t).all() for t in total]).all()
    if finite.item():
        run.optimizer.update_hessian(hessian_estimates=total)
    return finite.float()

def hessian_due(run, iter_num):
    """The official schedule: a Hessian pass after every hess_interval-th step."""
    return run.is_sophia and iter_num % run.config['hess_interval'] == run.config['hess_interval'] - 1

@torch.no_grad()
def estimate_loss(model, config, paths, vocab_size, autocast, rank, world_size, device, lockstep=False):
    """Mean loss over the same `eval_iters` batches of each split every time (split across the
    processes), so successive estimates and different runs, whatever their seed, are measured on
    identical data. With `lockstep` (FSDP, whose forward gathers parameters from all processes)
    every process runs as many forwards, the last ones uncounted where eval_iters does not split."""
    out = {}
    model.eval()
    batches = -(-config['eval_iters'] // world_size) * world_size if lockstep else config['eval_iters']
    for split in ('train', 'val'):
        total = torch.zeros((), device=device)
        for k in range(rank, batches, world_size):
            # seed 0, not config['seed']: runs with different seeds are evaluated on the same text
            X, Y = get_batch(paths[split], 0, EVAL_STREAMS[split], k * config['batch_size'],
                             config['batch_size'], config['block_size'], vocab_size, device,
                             config['dataset'])
            loss = forward_loss(model, X, Y, autocast).float()
            if k < config['eval_iters']:
                total += loss
        if world_size > 1:
            dist.all_reduce(total)
        out[split] = total.item() / config['eval_iters']
    model.train()
    return out

def evaluate(run, state, log):
    """Estimate train and val loss, log them with how long it took; returns whether val improved."""
    started = time.time()
    losses = estimate_loss(run.model, run.config, run.paths, run.vocab_size, run.autocast, run.rank,
                           run.world_size, run.device, lockstep=run.sharded)
    state.eval_seconds = time.time() - started
    is_best = losses['val'] < state.best_val_loss
    state.best_val_loss = min(state.best_val_loss, losses['val'])
    if log is not None:
        print(f"step {state.iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f} "
              f"(evaluation {state.eval_seconds:.1f} s)")
        log.write({'kind': 'eval', 'iter': state.iter_num, 'tokens': state.iter_num * run.tokens_per_iter,
                   'time': state.train_time, 'train/loss': losses['train'], 'val/loss': losses['val'],
                   'lr': get_lr(state.iter_num, run.config), 'eval_seconds': state.eval_seconds})
    return is_best

def save(run, state, model_args, is_best):
    """Write a checkpoint of the run as it is now (process 0 writes; every process takes part in
    gathering the RNG states)."""
    started = time.time()
    rng = gather_rng_states(run.world_size, run.device)  # a collective: every process takes part
    meta = dict(format_version=checkpoint.FORMAT_VERSION, scaler=run.scaler.state_dict(), model_args=model_args,
                config=run.config, optimizer_name=run.optimizer_name, rng=rng,
                **{key: getattr(state, key) for key in RunState.SAVED})
    if run.sharded:  # every process writes its shards
        from torch.distributed.checkpoint.state_dict import get_state_dict
        model_state, optimizer_state = get_state_dict(run.raw_model, run.optimizer)
        state.checkpoint = checkpoint.save_sharded(
            run.config['out_dir'], {'model': model_state, 'optimizer': optimizer_state}, meta, state.iter_num,
            run.config['keep_last'], is_best, run.rank, run.world_size)
    elif run.rank == 0:
        state.checkpoint = checkpoint.save_checkpoint(
            run.config['out_dir'], dict(meta, model=run.raw_model.state_dict(), optimizer=run.optimizer.state_dict()),
            state.iter_num, run.config['keep_last'], is_best)
    if run.rank == 0:
        print(f"saved checkpoint {state.checkpoint} ({time.time() - started:.1f} s)")

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

class IntervalLog:
    """The training rows of metrics.jsonl and the printed lines, every log_interval iterations.
    Losses and counts add up on the device in between and are read with one transfer per row.
    Time is training time alone: evaluations and checkpoints are timed on their own lines."""

    def __init__(self, run, state):
        self.loss_sum = torch.zeros((), device=run.device)
        self.clip_count = torch.zeros((), device=run.device)
        self.hessian_skips = torch.zeros((), device=run.device)
        self.steps, self.skipped, self.iters = 0, 0, 0
        self.train_time = state.train_time  # at the last row

    def stepped(self, run, loss, grad_norm):
        self.loss_sum += loss
        if run.config['grad_clip'] > 0:
            self.clip_count += (grad_norm > run.config['grad_clip']).float()
        self.steps += 1

    def skipped_step(self):
        self.skipped += 1

    def hessian_pass(self, ok):
        self.hessian_skips += 1 - ok

    def write(self, run, state, lr, log, peak_flops):
        """Called after every iteration; writes a row every log_interval of them."""
        self.iters += 1
        if state.iter_num % run.config['log_interval']:
            return
        config = run.config
        values = {'loss_sum': self.loss_sum, 'clip_count': self.clip_count, 'hessian_skips': self.hessian_skips}
        if run.is_sophia and run.optimizer.state:  # no state before the first step or Hessian pass
            # bs given: after a resume, or when every step so far was skipped, no step() has set it
            values.update(run.optimizer.diagnostics(bs=run.bs))
        values['param_norm'] = whole(torch.nn.utils.get_total_norm(run.params))
        peak = torch.tensor(float(peak_memory(run.device)), device=run.device)
        if run.world_size > 1:
            dist.all_reduce(values['loss_sum'])  # the loss over all processes' micro-batches
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)  # the process that needed the most
        values['peak_memory'] = peak
        read = dict(zip(values, torch.stack([v.float() for v in values.values()]).tolist()))
        self.loss_sum.zero_(), self.clip_count.zero_(), self.hessian_skips.zero_()
        dt = (state.train_time - self.train_time) / self.iters
        if log is not None:
            passes = run.tokens_per_iter + (run.hessian_tokens / config['hess_interval'] if run.is_sophia else 0)
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
            if run.is_sophia:
                # the Hessian EMA has no bias correction: after n updates it holds 1 - beta2^n of
                # its scale, so early on more coordinates are clipped than the EMA will later allow
                updates = state.iter_num // config['hess_interval']
                scale = 1 - config['beta2'] ** updates
                row.update({'train/win_rate': read.get('win_rate'), 'hessian_norm': read.get('hessian_norm'),
                            'hessian_norm2': read.get('hessian_norm2'), 'momentum_norm': read.get('momentum_norm'),
                            'hessian_skipped': read['hessian_skips'], 'hessian_ema_scale': scale})
                if 'win_rate' in read:
                    line += f", win rate {read['win_rate']:.3f}"
                    if scale < 0.9:
                        line += f" (Hessian EMA warming up: {scale:.0%} of its scale after {updates} updates)"
            log.write(row)
            remaining, every = config['max_iters'] - state.iter_num, config['eval_interval']
            evals = config['max_iters'] // every - state.iter_num // every  # and one at the end:
            evals += 1 if remaining and config['max_iters'] % every else 0
            print(line + f", eta {duration(remaining * dt + evals * state.eval_seconds)}", flush=True)
        self.steps, self.skipped, self.iters, self.train_time = 0, 0, 0, state.train_time

class SignalFlag:
    """SIGTERM / SIGINT ask the loop to finish the current iteration, save and exit; a second
    signal exits at once, even while the main thread is inside a long kernel. A SIGINT and a
    SIGTERM within a second count as one: Ctrl-C under torchrun reaches a worker from the terminal
    and again from torchrun.

    Python runs signal handlers in the main thread between bytecodes, so during a long kernel (an
    attention backward, a collective waiting for a peer) a handler would wait for it to return.
    The handlers installed here do nothing; the interpreter's C-level handler also writes each
    signal's number to a pipe (signal.set_wakeup_fd), and a watcher thread acts on it at once:
    torch releases the GIL inside its kernels, so the thread runs while one is busy."""

    def __init__(self):
        self.signum, self.when = 0, 0.0
        self.restore = None

    def install(self):
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)  # the C-level handler must never block on a full pipe
        previous = {signum: signal.signal(signum, self.ignore) for signum in (signal.SIGTERM, signal.SIGINT)}
        previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        threading.Thread(target=self.watch, args=(read_fd,), name='signal-watcher', daemon=True).start()
        def restore():
            signal.set_wakeup_fd(previous_fd)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            os.close(write_fd)  # the watcher reads the end of the pipe and returns
        self.restore = restore

    def uninstall(self):
        if self.restore is not None:
            self.restore()
            self.restore = None

    @staticmethod
    def ignore(signum, frame):
        """The Python-level handler: the watcher thread has acted already."""

    def watch(self, read_fd):
        with open(read_fd, 'rb', buffering=0) as pipe:
            while data := pipe.read(64):
                for signum in data:
                    if signum in (signal.SIGTERM, signal.SIGINT):
                        self.handle(signum, None)

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

def setup(optimizer_name, config, sources, rank, world_size, local_world_size, device):
    """The run's fixed parts and where it starts: out_dir checked, the data opened, the model built
    or continued, the optimizer (with its state when continuing), the model compiled and wrapped.
    Returns (run, state, model_args, exact): `exact` when the start is a checkpoint of ours, which
    carries the data position and RNG states, so the run continues as if never stopped."""
    master = rank == 0
    prepare_out_dir(config['out_dir'], config['init_from'] == 'resume', master)
    if world_size > 1:
        dist.barrier()  # out_dir exists before any process looks into it
    dataset_vocab, paths = open_dataset(config['dataset'], config['block_size'])
    start, start_path = load_start(config, optimizer_name, master, device)
    if start is not None:
        adopt_model_args(config, sources, start['model_args'], start_path)
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

    model, model_args = build_model(config, dataset_vocab, start)
    check_token_ids(paths, model_args['vocab_size'], config['dataset'])
    sharded = config['data_parallel'] != 'ddp'
    if not sharded:  # fully_shard moves one block at a time and keeps its shard: no whole model on a GPU
        model.to(device)
    for block in model.transformer.h:
        block.checkpointing = config['activation_checkpointing']
    torch.manual_seed(config['seed'] + rank)  # dropout differs per process; data order does not
    if sharded:
        shard_model(model, config, world_size, local_world_size, device_type, ptdtype)
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
        # it agrees with the other processes on an overflow seen in any process's shards
        scaler = ShardedGradScaler(device_type, enabled=config['dtype'] == 'float16')
    else:
        scaler = torch.amp.GradScaler(device_type, enabled=config['dtype'] == 'float16')
    optimizer = model.configure_optimizers(optimizer_name, device_type=device_type,
                                           **optimizer_hyperparameters(optimizer_name, config))
    exact = start is not None and 'foreign' not in start
    if exact:
        if 'sharded' in start:
            load_sharded_checkpoint(model, optimizer, start['sharded'])
        elif sharded:
            load_named_optimizer_state(model, optimizer, named_optimizer_state(start['optimizer'], model), True)
        else:
            optimizer.load_state_dict(start['optimizer'])
        scaler.load_state_dict(start['scaler'])
        rng = start['rng'][rank] if len(start['rng']) == world_size else None
        if rng is not None:
            torch.set_rng_state(rng['cpu'].cpu())
            if 'cuda' in rng:
                torch.cuda.set_rng_state(rng['cuda'].cpu(), device)
        elif master:
            print(f"warning: the checkpoint was written by {len(start['rng'])} processes, this run has "
                  f"{world_size}: the data position carries over, but dropout randomness, the order of float "
                  f"sums over processes and, where the micro-batches split differently, the Hessian pass's "
                  f"sampled labels differ from an uninterrupted run")
        if master and 'sequences_drawn' not in start:
            print("warning: the checkpoint was written before data was drawn per sequence: the run "
                  "continues at the same position of the data stream, with other windows of the text")
    elif start is not None:
        optimizer_state, layout = foreign_optimizer_state(start['optimizer'], model, start_path)
        load_named_optimizer_state(model, optimizer, optimizer_state, sharded)
        if master:
            print(f"warning: {start_path} was written by {start['foreign']}: its model, optimizer state, "
                  f"iteration and best val loss carry over, but it holds no data position or RNG states, "
                  f"so the data order and dropout are not those its own run would have continued with"
                  + ("; weight decay now also applies to the token and position embeddings, which the "
                     "official scripts exempted" if layout == 'official' else ''))
    raw_model = model
    if config['compile']:
        if master:
            print("compiling the model... (takes a minute)")
        model = torch.compile(model)
    if world_size > 1 and not sharded:
        model = DDP(model, device_ids=[int(device[5:])] if device_type == 'cuda' else None)
    run = Run(config, optimizer_name, model, raw_model, optimizer, scaler, autocast,
              batch_plan(config, sources, world_size), paths, model_args['vocab_size'], device, rank, world_size)
    state = RunState.continuing(start, start_path) if start is not None else RunState()
    return run, state, model_args, exact

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
    if run.is_sophia:
        line += (f"\nHessian pass after every {config['hess_interval']}th step: {plan.hess_micro_steps} "
                 f"micro-batch{'es' if plan.hess_micro_steps > 1 else ''} per process, "
                 f"{run.hessian_tokens:,} tokens (bs = {run.bs:,})")
    return line

def set_lr(run, iter_num):
    lr = get_lr(iter_num, run.config)
    for group in run.optimizer.param_groups:
        group['lr'] = lr
    return lr

def nonfinite_step(run, state):
    """Say that the step was skipped; stop after max_nonfinite such iterations in a row."""
    if run.rank == 0:
        print(f"iter {state.iter_num}: non-finite loss or gradient, update skipped "
              f"({state.nonfinite_in_a_row} in a row)")
    if state.nonfinite_in_a_row >= run.config['max_nonfinite']:
        raise TrainingStopped(
            f"{state.nonfinite_in_a_row} iterations in a row with a non-finite loss or gradient, the last at "
            f"iteration {state.iter_num}; "
            + (f"the last good checkpoint is {state.checkpoint}. Lower the learning rate (or raise rho for "
               f"Sophia) and resume from it" if state.checkpoint else
               "no checkpoint was saved yet. Lower the learning rate (or raise rho for Sophia) and start again"), 1)

def stop_run(run, state, stop_flag):
    """The stop every process agreed on: the checkpoint is written; wait for it, then exit."""
    if run.world_size > 1:
        # wait for process 0 to finish writing the checkpoint: once one process exits with an
        # error status torchrun gives the others only its shutdown timeout (30 s)
        dist.barrier()
    signum = stop_flag.signum or signal.SIGTERM  # another process may have been signalled
    raise TrainingStopped(f"stopped by {signal.Signals(signum).name} at iteration {state.iter_num}; "
                          f"checkpoint {state.checkpoint}; resume with --init_from=resume", 128 + signum)

def train(optimizer_name, config, sources, notes, rank, world_size, local_world_size, device, stop_flag):
    run, state, model_args, exact = setup(optimizer_name, config, sources, rank, world_size, local_world_size, device)
    peak = config['peak_flops'] or None
    if peak is None and device.startswith('cuda'):
        from model import device_peak_flops
        peak = device_peak_flops(device, config['dtype'])
    wandb_run, log = None, None
    if rank == 0:
        if config['wandb_log']:
            import wandb
            wandb_run = wandb.init(project=config['wandb_project'], name=config['wandb_run_name'],
                                   config=dict(config, optimizer=optimizer_name), mode=config['wandb_mode'],
                                   dir=config['out_dir'], id=state.wandb_id or None,
                                   resume='allow' if state.wandb_id else None)
            state.wandb_id = wandb_run.id
        log = MetricsLog(os.path.join(config['out_dir'], 'metrics.jsonl'), wandb_run)
        print(format_config(config, sources))
        for note in notes:
            print(f"config: {note}")
        print(describe_batch(run))
        log.write(dict(kind='config', run_name=config['wandb_run_name'], optimizer=optimizer_name,
                       iter=state.iter_num, config=config, model_args=model_args))

    interval = IntervalLog(run, state)
    start_iter, stop = state.iter_num, False
    while True:
        # evaluate and save at the top of the iteration: the state is that after iter_num steps.
        # The first iteration is evaluated unless it continues a checkpoint of ours, which was
        # evaluated when it was saved
        evaluated = is_best = False
        due = state.iter_num % config['eval_interval'] == 0 or state.iter_num == config['max_iters']
        if (not exact if state.iter_num == start_iter else due) and not stop:
            is_best, evaluated = evaluate(run, state, log), True
        if config['eval_only']:
            break
        if state.iter_num != start_iter and (state.iter_num % config['checkpoint_interval'] == 0 or is_best
                                             or state.iter_num == config['max_iters'] or stop
                                             or (evaluated and config['always_save_checkpoint'])):
            save(run, state, model_args, is_best)
        if state.iter_num >= config['max_iters']:
            break
        if stop:
            stop_run(run, state, stop_flag)

        iteration_start = time.time()
        lr = set_lr(run, state.iter_num)
        loss = forward_backward(run, state.sequences_drawn)
        state.sequences_drawn += run.plan.sequences
        stepped, stop, grad_norm = clip_and_step(run, loss, stop_flag.signum > 0)
        if stepped:
            state.nonfinite_in_a_row = 0
            interval.stepped(run, loss, grad_norm)
        else:
            state.nonfinite_in_a_row += 1
            interval.skipped_step()
            nonfinite_step(run, state)
        if hessian_due(run, state.iter_num):
            interval.hessian_pass(hessian_pass(run, state.sequences_drawn))
            state.sequences_drawn += run.plan.hess_sequences
        state.iter_num += 1
        state.train_time += time.time() - iteration_start
        interval.write(run, state, lr, log, peak)
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

def main(optimizer_name, defaults, argv, described=(), usage=''):
    """Entry point of the training scripts: config, setup, train; errors a user can fix are one
    line and exit status 2. `described` are the functions whose source comments say what each key
    means, for --help (configurator.describe_defaults); `usage` heads the help."""
    if wants_help(argv):
        print(format_help(usage, defaults, describe_defaults(default_config, *described))
              + f"\nConfig files of the official Sophia scripts also set "
                f"{', '.join(sorted(foreign_keys(optimizer_name)))}: read as the lines printed at the start say.")
        sys.exit(0)
    stop_flag = SignalFlag()
    stop_flag.install()
    world_size = int(os.environ.get('WORLD_SIZE', 1))
    master = int(os.environ.get('RANK', 0)) == 0
    status, stopped = 0, False
    try:
        notes = []
        config, sources = parse_args(defaults, argv, foreign_keys(optimizer_name), notes)
        local_world_size = int(os.environ.get('LOCAL_WORLD_SIZE', world_size))
        check_config(config, sources, world_size, local_world_size)
        rank, world_size, device = setup_distributed(config)
        train(optimizer_name, config, sources, notes, rank, world_size, local_world_size, device, stop_flag)
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
        stop_flag.uninstall()
    sys.exit(status)
