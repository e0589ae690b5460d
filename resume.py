"""
Where a run starts: a fresh out_dir, or the checkpoint it continues. One of ours continues exactly
(model, optimizer, GradScaler, RNG states, data position), on any number of processes, sharded or
not; one of the official Sophia scripts or nanoGPT is translated (model, optimizer state, iteration
and best val loss).
"""

import math
import os
import re
import tempfile

import torch

import checkpoint
from batches import model_vocab_size
from configurator import UserError
from distributed import from_process_0
from model import GPT, GPTConfig, MODEL_KEYS
from optimizers import RECIPES

# the config keys that say what a model is
SHAPE_KEYS = tuple(key for key in MODEL_KEYS if key not in ('vocab_size', 'dropout'))

class OutDirLock:
    """One run per out_dir: process 0 takes an exclusive flock on out_dir/run.lock and writes its
    host and pid into it, then holds it shared with the job's other processes. The system releases
    it when they all die, so a crash never leaves a stale lock; a run that ends removes the file."""
    file = None  # the lock file, while held

    def acquire(self, out_dir, rank, world_size):
        """Every process calls it; all raise UserError naming the holder if another run holds it."""
        import fcntl
        import socket
        path = os.path.join(out_dir, 'run.lock')
        holder = None
        if rank == 0:
            def held_by_another(f):
                f.seek(0)
                holder = f.read().split() or ['?', '?']  # ? where the holder has not written yet
                f.close()
                return holder
            while True:
                f = open(path, 'a+')
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = held_by_another(f)
                    break
                if os.path.exists(path) and os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                    break  # not a file that an ending run removed between our open and flock
                f.close()
            if holder is None:
                f.seek(0)
                f.truncate()
                f.write(f"{socket.gethostname()} {os.getpid()}\n")
                f.flush()
                try:
                    fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    self.file = f
                except BlockingIOError:  # the switch is not atomic: another launch took it between
                    holder = held_by_another(f)
        holder = from_process_0(holder, world_size)
        if holder is not None:
            raise UserError(f"out_dir={out_dir!r} is in use by another run (process {holder[1]} on "
                            f"{holder[0]} holds {path}); wait for it to end or stop it, or choose "
                            f"another --out_dir")
        if rank != 0:
            try:
                self.file = open(path)
            except FileNotFoundError:  # an out_dir of process 0's node alone: nothing to hold here
                return
            fcntl.flock(self.file, fcntl.LOCK_SH | fcntl.LOCK_NB)  # process 0 holds it shared

    def release(self, rank):
        if self.file is not None:
            if rank == 0 and os.path.exists(self.file.name):
                os.remove(self.file.name)
            self.file.close()
            self.file = None

def prepare_out_dir(out_dir, resuming, master):
    """out_dir must be writable, and must not hold another run unless we resume it."""
    if master:
        try:
            os.makedirs(out_dir, exist_ok=True)
            tempfile.TemporaryFile(dir=out_dir).close()  # a file can be made in it
        except OSError as e:
            raise UserError(f"out_dir={out_dir!r} is not writable ({e.strerror}); choose another --out_dir")
    if not resuming:
        held = [name for name in ('metrics.jsonl', 'best.pt') if os.path.exists(os.path.join(out_dir, name))]
        held += [f'ckpt-{i:08d}.pt' for i in checkpoint.list_checkpoints(out_dir)[:1]]
        if held:
            raise UserError(f"out_dir={out_dir!r} already holds a run ({held[0]}); continue it with "
                            f"--init_from=resume, or choose another --out_dir")

def set_log_aside(out_dir):
    """An attempt that stopped before its first checkpoint left only its log: keep it under the
    next free name metrics-<n>.jsonl, so the run that starts over has metrics.jsonl (what compare.py
    reads) to itself. Returns the new name, None when there was no log."""
    log = os.path.join(out_dir, 'metrics.jsonl')
    if not os.path.exists(log):
        return None
    n = 1
    while os.path.exists(os.path.join(out_dir, f'metrics-{n}.jsonl')):
        n += 1
    os.replace(log, os.path.join(out_dir, f'metrics-{n}.jsonl'))
    return f'metrics-{n}.jsonl'

def load_start(config, recipe, master, device):
    """The checkpoint a run continues, in our format: with init_from='resume' the newest good one
    in out_dir, else the .pt file or .dcp folder init_from names. Returns (state, path), or (None,
    None) for a new model, also for an out_dir whose earlier attempt left only a log."""
    init_from = config['init_from'].rstrip(os.sep)  # a folder's name as the shell completes it
    if init_from == 'resume':
        try:
            state, path = checkpoint.load_latest(config['out_dir'], map_location=device,
                                                 warn=print if master else (lambda m: None), quarantine=master,
                                                 model_tensors=False)
        except checkpoint.CheckpointError as e:
            raise UserError(str(e))
        if state is None:
            names = os.listdir(config['out_dir']) if os.path.isdir(config['out_dir']) else []
            # no log either: metrics.jsonl, or an earlier one set aside as metrics-<n>.jsonl
            if not any(re.fullmatch(r'metrics(-\d+)?\.jsonl', name) for name in names):
                raise UserError(f"--init_from=resume but {config['out_dir']} holds no checkpoint; "
                                f"start with --init_from=scratch")
            damaged = sorted(name for name in names if re.fullmatch(r'ckpt-.*\.damaged', name))
            if damaged:  # set aside by an earlier resume: starting over would drop them unasked
                raise UserError(f"--init_from=resume but every checkpoint in {config['out_dir']} "
                                f"is damaged ({', '.join(damaged)}); put a good one in place, or "
                                f"start over in another --out_dir")
            return None, None  # an attempt that stopped before its first checkpoint: start over
    elif init_from.endswith(('.pt', '.dcp')):
        state, path = read_checkpoint_file(init_from, device), init_from
    else:
        return None, None
    if state['optimizer_name'] != recipe.name:
        other = RECIPES.get(state['optimizer_name'])
        raise UserError(f"the checkpoint {path} was trained with {state['optimizer_name']}, not "
                        f"{recipe.name}; continue it with {other.script if other else 'the script that wrote it'} "
                        f"or use another --out_dir")
    return state, path

def read_checkpoint_file(path, device):
    """A checkpoint file to continue: one of ours, or one of the official Sophia scripts or nanoGPT
    translated into our format, with `foreign` naming its writer (its optimizer state's layout is
    mapped later, foreign_optimizer_state)."""
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
    # without torch.compile's wrapper prefix (saved by some versions) and the causal mask both
    # keep as a buffer (attn.bias) where flash attention is missing
    model = {key.removeprefix('_orig_mod.'): value for key, value in state['model'].items()
             if not key.endswith('.attn.bias')}
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
    """A GPT from scratch, from a checkpoint or from pretrained GPT-2 weights, for a dataset of
    vocabulary dataset_vocab (None: no meta.pkl). Returns (model, model_args)."""
    model_args = {key: config[key] for key in MODEL_KEYS if key != 'vocab_size'}
    model_args['vocab_size'] = model_vocab_size(dataset_vocab)
    if start_state is not None:
        model_args = dict(start_state['model_args'], dropout=config['dropout'])
        model = GPT(GPTConfig(**model_args))
        if 'sharded' not in start_state:  # a sharded checkpoint loads once the model is (setup)
            model.load_state_dict(start_state['model'])
    elif config['init_from'] in ('scratch', 'resume'):  # resume: nothing to resume yet (load_start)
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

def foreign_optimizer_state(saved, model, path, groups):
    """An optimizer state dict of the official Sophia scripts or nanoGPT keyed by parameter name
    (named_optimizer_state's form, hyperparameters left to this run's config), and its layout,
    told apart by the groups' sizes and shapes: 'ours' (`groups`, the recipe's; nanoGPT's since
    2023) or 'official' (names sorted; Linear weights first, then the rest)."""
    params = dict(model.named_parameters())  # the tied lm_head weight appears once, as wte's
    names = list(params)
    linear = sorted(n for n in names if n.endswith(('.c_attn.weight', '.c_proj.weight', '.c_fc.weight')))
    official = [linear, sorted(n for n in names if n not in linear)]
    saved_groups = [group['params'] for group in saved['param_groups']]
    def fits(layout):
        return [len(g) for g in layout] == [len(g) for g in saved_groups] and all(
            saved['state'][i]['exp_avg'].shape == params[n].shape
            for g, ids in zip(layout, saved_groups) for n, i in zip(g, ids) if i in saved['state'])
    name, layout = next(((name, layout) for name, layout in (('ours', groups), ('official', official))
                         if fits(layout)), (None, None))
    if layout is None:
        raise UserError(f"the optimizer state in {path} does not match this model's parameters in "
                        f"nanoGPT's or the official scripts' layout; it cannot be continued here")
    by_name = {n: saved['state'][i] for group, ids in zip(layout, saved_groups)
               for n, i in zip(group, ids) if i in saved['state']}
    return {'state': by_name, 'param_groups': None}, name

def named_optimizer_state(saved, groups):
    """Our optimizer state dict keyed by parameter name instead of position, the form
    torch.distributed.checkpoint's state dict functions take (`groups`: parameter_groups)."""
    names = [n for group in groups for n in group]
    return {'state': {names[i]: value for i, value in saved['state'].items()},
            'param_groups': [dict(group, params=list(names_)) for group, names_ in zip(saved['param_groups'], groups)]}

def load_named_optimizer_state(model, optimizer, named, sharded, groups):
    """Load a state dict keyed by parameter name (param_groups None: keep the optimizer's own
    hyperparameters) into a sharded or plain optimizer whose groups hold `groups`' parameters."""
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

def restore(start, path, model, optimizer, scaler, groups, rank, world_size, device, sharded):
    """Load a start checkpoint's optimizer state, GradScaler and this process's RNG states (and a
    sharded one's model). Returns whether the start is exact: a checkpoint of ours, with the data
    position and RNG states, so the run continues as if never stopped."""
    master = rank == 0
    if 'foreign' in start:
        optimizer_state, layout = foreign_optimizer_state(start['optimizer'], model, path, groups)
        load_named_optimizer_state(model, optimizer, optimizer_state, sharded, groups)
        if master:
            print(f"warning: {path} was written by {start['foreign']}: its model, optimizer state, "
                  f"iteration and best val loss carry over, but it holds no data position or RNG states, "
                  f"so the data order and dropout are not those its own run would have continued with"
                  + ("; weight decay now also applies to the token and position embeddings, which the "
                     "official scripts exempted" if layout == 'official' else ''))
        return False
    if 'sharded' in start:  # on any number of processes, sharded or not: each reads what it needs
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        model_state, optimizer_state = get_state_dict(model, optimizer)
        checkpoint.in_one_process(dcp.load, {'model': model_state, 'optimizer': optimizer_state},
                                  checkpoint_id=start['sharded'])
        set_state_dict(model, optimizer, model_state_dict=model_state,
                       optim_state_dict=optimizer_state)
    elif sharded:
        load_named_optimizer_state(model, optimizer, named_optimizer_state(start['optimizer'], groups), True, groups)
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
    return True
