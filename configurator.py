"""
Config for the training scripts, nanoGPT style: defaults, then each argument in order, a config
file (Python exec'd over the config so far) or --key=value (a Python literal; strings need no
quotes). Every mistake is one line naming the key, where its value came from and what was
expected (docs/training.md). The official Sophia scripts' and nanoGPT's keys are translated or
checked (optimizers.Recipe.foreign_keys); --help shows each default and the comment beside it.
"""

import ast
import difflib
import inspect
import io
import os
import tokenize
from collections import namedtuple

class UserError(Exception):
    """A problem the user can fix: reported as one line, exit status 2, nothing overwritten."""

class ConfigError(UserError):
    """A mistake in the config that the user can fix; the message is one line."""

PRETRAINED = ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl')

# -----------------------------------------------------------------------------
# the keys

def default_config():
    """Every training script's keys: GPT-2 small (124M) on OpenWebText with AdamW, as the official
    runs; each recipe (optimizers.py) adds its own. The comment beside a key is its --help text."""
    # I/O
    out_dir = 'out'  # checkpoints, metrics.jsonl (the local log compare.py reads) and config go here
    eval_interval = 1000  # estimate train and val loss every this many iterations
    eval_iters = 200  # batches per split for each estimate (the same batches every time)
    log_interval = 10  # print and log a training line every this many iterations
    eval_only = False  # evaluate once and exit
    hellaswag = False  # also score HellaSwag at every evaluation (hellaswag/acc_norm in the logs); needs GPT-2 BPE data
    hellaswag_file = ''  # hellaswag_val.jsonl; '' = downloaded once into ~/.cache/sophia-gpt2/ (hellaswag.py)
    hellaswag_items = 0  # score only the first hellaswag_items of its 10,042 items (quicker evaluations); 0 = all
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
    lr_decay_iters = 100000  # the iteration where the cosine reaches min_lr (~ max_iters per Chinchilla); left at its default it follows max_iters
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

# -----------------------------------------------------------------------------
# reading config files and arguments

def unknown_key(key, config):
    close = difflib.get_close_matches(key, list(config), n=1)
    return f"'{key}' is not a config key" + (f" (did you mean '{close[0]}'?)" if close else "")

def type_name(value):
    return {bool: 'a boolean (true/false)', int: 'an integer', float: 'a number',
            str: 'a string'}.get(type(value), type(value).__name__)

def coerce(key, value, default, source):
    """Check `value` against the type of the key's default; an int is accepted for a float key."""
    accepted = (int, float) if type(default) is float else type(default)
    # a bool is an int to isinstance, but no integer or number here, nor they a bool
    if not isinstance(value, accepted) or isinstance(value, bool) != isinstance(default, bool):
        raise ConfigError(f"{key}={value!r} ({source}): expected {type_name(default)}, "
                          f"got {type_name(value)}")
    return float(value) if type(default) is float else value

def read_literal(text):
    """A --key=value text as a Python literal, or as the plain string when it is none."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text

def parse_value(key, text, default, source):
    """Turn the text after --key= into a value of the key's type."""
    if isinstance(default, str):  # strings need no quotes on the command line; quoted are unquoted
        value = read_literal(text)
        return value if isinstance(value, str) else text
    if isinstance(default, bool) and text.lower() in ('true', 'false'):
        return text.lower() == 'true'
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ConfigError(f"{source}: cannot read {text!r} as {type_name(default)} for {key}")
    return coerce(key, value, default, source)

def assigned_names(tree):
    """(name, line) for every name a config file binds at module level, in order."""
    found = []
    def visit(node):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda,
                             ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            return  # names bound in there are local to them
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            found.append((node.id, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child)
    visit(tree)  # an import binds an ast.alias, no ast.Name: config files may import freely
    return found

def apply_foreign(config, sources, notes, foreign, name, value, source):
    """Another repository's key: its handler returns the (key, value) pairs it means and a note."""
    settings, note = foreign[name](value, source)
    for key, setting in settings:
        config[key] = coerce(key, setting, config[key], source)
        sources[key] = f"{source} (as {name})"
    notes.append(f"{source}: {note}")

def apply_config_file(config, sources, path, foreign, notes):
    """Exec a config file over the config; reject names that are no config key."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} not found (arguments without '--' are config files)")
    with open(path) as f:
        text = f.read()
    try:
        tree = ast.parse(text, filename=path)
    except SyntaxError as e:
        raise ConfigError(f"{path}:{e.lineno}: syntax error: {e.msg}")
    last_line, foreign_line = {}, {}
    for name, line in assigned_names(tree):
        if name.startswith('_'):
            continue
        if name not in config and name not in foreign:
            raise ConfigError(f"{path}:{line}: {unknown_key(name, config)}")
        (last_line if name in config else foreign_line)[name] = line
    namespace = dict(config)
    try:
        # compiled with the file's name so a traceback points at the config file, not <string>
        exec(compile(tree, path, 'exec'), namespace)
    except Exception as e:
        raise ConfigError(f"{path}: running the config file failed: {type(e).__name__}: {e}")
    for name, line in last_line.items():
        config[name] = coerce(name, namespace[name], config[name], f"{path}:{line}")
        sources[name] = f"{path}:{line}"
    for name, line in foreign_line.items():
        apply_foreign(config, sources, notes, foreign, name, namespace[name], f"{path}:{line}")

def apply_override(config, sources, arg, foreign, notes):
    if '=' not in arg:
        raise ConfigError(f"argument {arg!r}: expected --key=value")
    key, text = arg[2:].split('=', 1)
    if key in config:
        config[key] = parse_value(key, text, config[key], f"argument {arg}")
        sources[key] = f"argument {arg}"
    elif key in foreign:
        apply_foreign(config, sources, notes, foreign, key, read_literal(text), f"argument {arg}")
    else:
        raise ConfigError(f"argument {arg!r}: {unknown_key(key, config)}")

def parse_args(defaults, argv, foreign=None, notes=None):
    """Defaults, then each argument in order. Returns (config, sources): the values and where each
    came from ('default', 'file:line' or 'argument --key=value'). `foreign`: handlers of other
    repositories' keys (apply_foreign), which append what they did to `notes`."""
    for key, value in defaults.items():
        assert value is not None and type(value) in (bool, int, float, str), \
            f"default of {key} must be a bool, int, float or str"
    foreign = foreign or {}
    notes = [] if notes is None else notes
    config = dict(defaults)
    sources = {key: 'default' for key in defaults}
    for arg in argv:
        if arg.startswith('--'):
            apply_override(config, sources, arg, foreign, notes)
        else:
            apply_config_file(config, sources, arg, foreign, notes)
    return config, sources

# -----------------------------------------------------------------------------
# batch arithmetic

# per iteration: micro_steps micro-batches per process, sequences over all processes
BatchPlan = namedtuple('BatchPlan', 'micro_steps sequences')

def batch_plan(config, sources, world_size):
    """The official Sophia scripts' arithmetic: processes x batch_size x gradient_accumulation_steps
    (one process's micro-batches) = total_bs sequences per iteration. gradient_accumulation_steps=0
    derives it from total_bs, so one config trains the same batch on any number of processes."""
    show = Checks(config, sources).show
    batch, accumulation, total = config['batch_size'], config['gradient_accumulation_steps'], config['total_bs']
    processes = f"{world_size} process{'es' if world_size > 1 else ''}"
    if accumulation == 0:
        if total == 0:
            raise ConfigError(f"{show('gradient_accumulation_steps')} and {show('total_bs')}: set total_bs, the "
                              f"sequences per iteration over all processes, or gradient_accumulation_steps")
        if total % (batch * world_size):
            raise ConfigError(f"{show('total_bs')} cannot be split into micro-batches of {show('batch_size')} on "
                              f"{processes}: {total} is not a multiple of {batch} x {world_size}; "
                              + split_advice(total, batch, world_size))
        accumulation = total // (batch * world_size)
    elif total and sources.get('total_bs', 'default') != 'default' and accumulation * batch * world_size != total:
        raise ConfigError(f"{processes} x {show('batch_size')} x {show('gradient_accumulation_steps')} = "
                          f"{world_size * batch * accumulation} sequences per iteration, but {show('total_bs')}; "
                          + (f"use --gradient_accumulation_steps={total // (batch * world_size)} (or 0 to derive "
                             f"it)" if total % (batch * world_size) == 0 else split_advice(total, batch, world_size))
                          + f", or --total_bs={world_size * batch * accumulation} to train with that batch")
    return BatchPlan(accumulation, accumulation * batch * world_size)

def split_advice(total, batch, world_size):
    """How to split total sequences over world_size processes when batch does not fit."""
    if total % world_size:
        return f"use a number of processes that divides {total}"
    per_process = total // world_size
    sizes = [size for size in range(1, per_process + 1) if per_process % size == 0]
    near = [size for size in sizes if size < batch][-2:] + [size for size in sizes if size > batch][:2]
    return f"use a batch_size that divides {per_process} (e.g. {', '.join(map(str, near))})"

class Checks:
    """A config's checks (check_config's, a recipe's), each failing with one line naming the key,
    its value and where the value came from."""

    def __init__(self, config, sources):
        self.config, self.sources = config, sources

    def show(self, key):
        return f"{key}={self.config[key]!r} ({self.sources.get(key, 'default')})"

    def fail(self, message):
        raise ConfigError(message)

    def positive(self, *keys):
        self.bounded(keys, lambda value: value > 0, '> 0')

    def non_negative(self, *keys):
        self.bounded(keys, lambda value: value >= 0, '>= 0')

    def bounded(self, keys, within, bound):
        for key in keys:
            if not within(self.config[key]):  # NaN too
                self.fail(f"{self.show(key)}: must be {bound}")
            if self.config[key] == float('inf'):
                self.fail(f"{self.show(key)}: must be finite")

    def one_of(self, key, allowed):
        if self.config[key] not in allowed:
            self.fail(f"{self.show(key)}: expected one of {', '.join(allowed)}")

def check_config(config, sources, world_size=1, local_world_size=None, recipe=None):
    """Reject values and combinations that cannot work. `world_size`, `local_world_size`: torchrun's
    (for the batch arithmetic and HSDP's default shard group); `recipe` checks its own keys."""
    checks = Checks(config, sources)
    show, fail, positive, non_negative, one_of = (checks.show, checks.fail, checks.positive,
                                                  checks.non_negative, checks.one_of)

    positive('batch_size', 'block_size', 'n_layer', 'n_head', 'n_embd', 'learning_rate',
             'eval_interval', 'eval_iters', 'log_interval', 'checkpoint_interval', 'keep_last',
             'max_nonfinite', 'ddp_timeout')
    non_negative('max_iters', 'warmup_iters', 'lr_decay_iters', 'min_lr', 'weight_decay',
                 'grad_clip', 'dropout', 'gradient_accumulation_steps', 'total_bs', 'hellaswag_items')
    if not 0 <= config['seed'] < 2 ** 63:  # seed + rank seeds torch, which takes at most 64 bits
        fail(f"{show('seed')}: must be in [0, 2**63)")
    if config['n_embd'] % config['n_head'] != 0:
        fail(f"{show('n_embd')} is not divisible by {show('n_head')}")
    if config['dropout'] >= 1:
        fail(f"{show('dropout')}: must be below 1")
    for key in ('beta1', 'beta2'):
        if not 0 <= config[key] < 1:
            fail(f"{show(key)}: must be in [0, 1)")
    if config['min_lr'] > config['learning_rate']:
        fail(f"{show('min_lr')} is larger than {show('learning_rate')}")
    if config['decay_lr'] and config['warmup_iters'] > config['lr_decay_iters']:
        fail(f"{show('warmup_iters')} is longer than {show('lr_decay_iters')}; "
             f"lower warmup_iters or raise lr_decay_iters")
    one_of('dtype', ('float32', 'bfloat16', 'float16'))
    one_of('gelu', ('tanh', 'exact'))
    if config['gelu'] != 'tanh' and config['init_from'] not in ('scratch', 'resume'):
        fail(f"{show('gelu')}: pretrained GPT-2 weights need the tanh GELU they were trained with; "
             f"drop the override")
    one_of('wandb_mode', ('online', 'offline'))
    device = config['device']
    if not (device in ('cpu', 'cuda', 'mps') or (device.startswith('cuda:') and device[5:].isdigit())):
        fail(f"{show('device')}: expected cpu, cuda, cuda:N or mps")
    init_from = config['init_from']
    if init_from not in ('scratch', 'resume') + PRETRAINED and not os.path.isdir(init_from) \
            and not (init_from.endswith('.pt') and os.path.isfile(init_from)):
        fail(f"{show('init_from')}: expected scratch, resume, one of {', '.join(PRETRAINED)}, "
             f"a local Hugging Face model directory, or a checkpoint (a .pt file or a sharded run's .dcp folder)")
    one_of('backend', ('auto', 'nccl', 'gloo'))
    if config['backend'] == 'nccl' and not device.startswith('cuda'):
        fail(f"{show('backend')} needs CUDA devices but {show('device')}; use --backend=gloo "
             f"or --backend=auto (nccl on CUDA, gloo otherwise)")
    one_of('data_parallel', ('ddp', 'fsdp', 'hsdp'))
    one_of('reshard_after_forward', ('auto', 'true', 'false'))
    non_negative('shard_group_size')
    if config['data_parallel'] != 'ddp' and device == 'mps':
        fail(f"{show('data_parallel')} cannot run on {show('device')}: FSDP needs the gloo (CPU) or nccl "
             f"(CUDA) backend; use --device=cpu or cuda, or --data_parallel=ddp")
    if config['data_parallel'] == 'hsdp':
        shard = config['shard_group_size'] or (local_world_size or world_size)
        if world_size % shard:
            fail(f"{show('data_parallel')}: shard groups of {shard} processes "
                 f"({show('shard_group_size') if config['shard_group_size'] else 'the processes of a node'}) "
                 f"do not divide the {world_size} processes; set --shard_group_size to a divisor of {world_size}")
    if recipe is not None:  # the optimizer's own keys, and what it cannot do
        recipe.check(config, checks, world_size)
    batch_plan(config, sources, world_size)  # raises on batch arithmetic that cannot work

def fit_schedule(config, sources):
    """Fit the schedule to the run: lr_decay_iters left at its default follows max_iters (a run
    shortened with --max_iters decays fully); one set beyond max_iters, or a warmup longer than the
    run, is kept and noted. Returns the notes."""
    show = Checks(config, sources).show
    if not config['decay_lr']:
        return []
    notes = []
    follow = max(config['max_iters'], config['warmup_iters'])  # the cosine starts after the warmup
    if sources.get('lr_decay_iters', 'default') == 'default' and config['lr_decay_iters'] != follow:
        config['lr_decay_iters'] = follow
        sources['lr_decay_iters'] = f"max_iters ({sources.get('max_iters', 'default')})"
        notes.append(f"lr_decay_iters follows {show('max_iters')}: the cosine reaches min_lr at the last "
                     f"iteration")
    elif config['lr_decay_iters'] > config['max_iters']:
        notes.append(f"warning: {show('lr_decay_iters')} is beyond {show('max_iters')}: the run ends "
                     f"before the cosine reaches min_lr; add --lr_decay_iters={config['max_iters']} to "
                     f"decay fully")
    if config['warmup_iters'] > config['max_iters']:
        notes.append(f"warning: {show('warmup_iters')} is longer than {show('max_iters')}: the run ends "
                     f"still warming up; lower --warmup_iters")
    return notes

def format_config(config, sources):
    """The resolved config, one key per line, with where each non-default value came from."""
    width = max(len(key) for key in config)
    origin = {key: '' if came == 'default' else f"  # {came}" for key, came in sources.items()}
    return '\n'.join(f"{key:<{width}} = {value!r}{origin[key]}" for key, value in config.items())

# -----------------------------------------------------------------------------
# --help

def describe_defaults(*functions):
    """The defaults functions' comments as ('group', title) and ('key', name, meaning) entries in
    source order: a comment line of its own starts a group, one beside `name = value` (or
    `name=value,`) gives its meaning. A key described twice keeps its first place, last meaning."""
    entries, seen = [], {}
    for function in functions:
        source = inspect.getsource(function)
        comments = {token.start[0]: token.string.lstrip('#').strip()
                    for token in tokenize.generate_tokens(io.StringIO(source).readline)
                    if token.type == tokenize.COMMENT}
        for number, line in enumerate(source.splitlines(), 1):
            stripped = line.strip()
            if stripped.startswith('#'):
                entries.append(('group', comments[number]))
                continue
            name = stripped.split('=', 1)[0].strip() if '=' in stripped else ''
            if not name.isidentifier() or stripped.startswith(('def ', 'return', 'config')):
                continue
            meaning = comments.get(number, '')
            if name not in seen:
                seen[name] = len(entries)
                entries.append(('key', name, meaning))
            elif meaning:
                entries[seen[name]] = ('key', name, meaning)
    return entries

def format_help(usage, defaults, described):
    """The --help text: usage, then every key with its default and meaning, under its group."""
    lines, group = [usage.strip(), ''], None  # group: the title waiting for its first key
    width = max(len(f"--{key}={value!r}") for key, value in defaults.items())
    for entry in described:
        if entry[0] == 'group':
            group = entry[1]
        elif entry[1] in defaults:
            _, key, meaning = entry
            if group is not None:
                lines += ['', group + ':']
                group = None
            lines.append(f"  {f'--{key}={defaults[key]!r}':<{width}}  {meaning}".rstrip())
    listed = {entry[1] for entry in described if entry[0] == 'key'}
    missing = [key for key in defaults if key not in listed]
    assert not missing, f"keys without a place in the help: {missing}"
    return '\n'.join(lines) + '\n'

def wants_help(argv):
    return any(arg in ('-h', '--help') for arg in argv)
