"""
Config for the training scripts, nanoGPT style: defaults, then config files, then overrides.

    $ python train_sophiag.py config/train_gpt2_small_sophiag.py --batch_size=8 --compile=false

Arguments are applied left to right. An argument without a leading "--" is a config file: plain
Python, exec'd with the current config as its globals, so it can read earlier values
(`lr_decay_iters = max_iters`). An argument "--key=value" overrides one key; the value is split at
the first "=" only and read as a Python literal (`--learning_rate=6e-4`, `--dataset=openwebtext`
without quotes also works for strings, `--compile=false` for booleans).

Unlike nanoGPT's configurator this one is a module of plain functions, and every mistake is one
line naming the key, where the value came from (file and line, or the argument) and what was
expected: a config file assigning a name that is no config key (`learning_rat = 1e-3`), an
unknown --key, a value of the wrong type, and combinations that cannot work (min_lr above
learning_rate, warmup longer than the decay, gradient accumulation that the world size does not
divide, ...). Config files may use names starting with an underscore as scratch variables.
"""

import ast
import difflib
import os

class ConfigError(Exception):
    """A mistake in the config that the user can fix; the message is one line."""

DTYPES = ('float32', 'bfloat16', 'float16')
PRETRAINED = ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl')
HESSIAN_ESTIMATORS = ('gnb', 'hutchinson')

def unknown_key(key, config):
    """The message for a name that is no config key, with the nearest key as a suggestion."""
    close = difflib.get_close_matches(key, list(config), n=1)
    return f"'{key}' is not a config key" + (f" (did you mean '{close[0]}'?)" if close else "")

def type_name(value):
    return {bool: 'a boolean (true/false)', int: 'an integer', float: 'a number',
            str: 'a string'}.get(type(value), type(value).__name__)

def coerce(key, value, default, source):
    """Check `value` against the type of the key's default; an int is accepted for a float key."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(f"{key}={value!r} ({source}): expected {type_name(default)}, "
                          f"got {type_name(value)}")
    return value

def parse_value(key, text, default, source):
    """Turn the text after --key= into a value of the key's type."""
    if isinstance(default, str):
        # strings need no quotes on the command line; quoted ones are unquoted
        try:
            value = ast.literal_eval(text)
            return value if isinstance(value, str) else text
        except (ValueError, SyntaxError):
            return text
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
    for statement in tree.body:
        if not isinstance(statement, (ast.Import, ast.ImportFrom)):
            visit(statement)
    return found

def apply_config_file(config, sources, path):
    """Exec a config file over the config; reject names that are no config key."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} not found (arguments without '--' are config files)")
    with open(path) as f:
        text = f.read()
    try:
        tree = ast.parse(text, filename=path)
    except SyntaxError as e:
        raise ConfigError(f"{path}:{e.lineno}: syntax error: {e.msg}")
    last_line = {}
    for name, line in assigned_names(tree):
        if name.startswith('_'):
            continue
        if name not in config:
            raise ConfigError(f"{path}:{line}: {unknown_key(name, config)}")
        last_line[name] = line
    namespace = dict(config)
    try:
        # compiled with the file's name so a traceback points at the config file, not <string>
        exec(compile(tree, path, 'exec'), namespace)
    except Exception as e:
        raise ConfigError(f"{path}: running the config file failed: {type(e).__name__}: {e}")
    for name, line in last_line.items():
        source = f"{path}:{line}"
        config[name] = coerce(name, namespace[name], config[name], source)
        sources[name] = source

def apply_override(config, sources, arg):
    """Apply one --key=value argument."""
    if '=' not in arg:
        raise ConfigError(f"argument {arg!r}: expected --key=value")
    key, text = arg[2:].split('=', 1)
    if key not in config:
        raise ConfigError(f"argument {arg!r}: {unknown_key(key, config)}")
    config[key] = parse_value(key, text, config[key], f"argument {arg}")
    sources[key] = f"argument {arg}"

def parse_args(defaults, argv):
    """Defaults, then each argument in order. Returns (config, sources): the resolved values and,
    for each key, where its value came from ('default', 'file:line' or 'argument --key=value')."""
    for key, value in defaults.items():
        assert value is not None and type(value) in (bool, int, float, str), \
            f"default of {key} must be a bool, int, float or str"
    config = dict(defaults)
    sources = {key: 'default' for key in defaults}
    for arg in argv:
        if arg.startswith('--'):
            apply_override(config, sources, arg)
        else:
            apply_config_file(config, sources, arg)
    return config, sources

def check_config(config, sources, world_size=1):
    """Reject values and combinations that cannot work. `world_size` is the number of processes
    (torchrun's WORLD_SIZE), which must divide the gradient accumulation."""
    def show(key):
        return f"{key}={config[key]!r} ({sources.get(key, 'default')})"
    def fail(message):
        raise ConfigError(message)
    def positive(*keys):
        for key in keys:
            if config[key] <= 0:
                fail(f"{show(key)}: must be > 0")
    def non_negative(*keys):
        for key in keys:
            if config[key] < 0:
                fail(f"{show(key)}: must be >= 0")
    def one_of(key, allowed):
        if config[key] not in allowed:
            fail(f"{show(key)}: expected one of {', '.join(allowed)}")

    positive('batch_size', 'block_size', 'gradient_accumulation_steps', 'n_layer', 'n_head',
             'n_embd', 'learning_rate', 'eval_interval', 'eval_iters', 'log_interval',
             'checkpoint_interval', 'keep_last', 'max_nonfinite', 'ddp_timeout')
    non_negative('max_iters', 'warmup_iters', 'lr_decay_iters', 'min_lr', 'weight_decay',
                 'grad_clip', 'dropout')
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
    one_of('dtype', DTYPES)
    one_of('gelu', ('tanh', 'exact'))
    if config['gelu'] != 'tanh' and config['init_from'] not in ('scratch', 'resume'):
        fail(f"{show('gelu')}: pretrained GPT-2 weights need the tanh GELU they were trained with; "
             f"drop the override")
    one_of('wandb_mode', ('online', 'offline'))
    device = config['device']
    if not (device in ('cpu', 'cuda', 'mps') or (device.startswith('cuda:') and device[5:].isdigit())):
        fail(f"{show('device')}: expected cpu, cuda, cuda:N or mps")
    if config['init_from'] not in ('scratch', 'resume') + PRETRAINED \
            and not os.path.isdir(config['init_from']):
        fail(f"{show('init_from')}: expected scratch, resume, one of {', '.join(PRETRAINED)}, "
             f"or a local Hugging Face model directory")
    accumulation = config['gradient_accumulation_steps']
    if accumulation % world_size != 0:
        fail(f"{show('gradient_accumulation_steps')} is not divisible by the world size "
             f"{world_size}; make it a multiple of the number of processes")
    if 'rho' in config:  # the Sophia keys exist in train_sophiag.py only
        positive('rho', 'hess_interval')
        non_negative('hess_micro_steps')
        one_of('hessian_estimator', HESSIAN_ESTIMATORS)
        non_negative('hess_grad_clip')
        if config['hess_micro_steps'] % world_size != 0:
            fail(f"{show('hess_micro_steps')} is not divisible by the world size {world_size}; "
                 f"make it a multiple of the number of processes (0 = as gradient_accumulation_steps)")

def format_config(config, sources):
    """The resolved config, one key per line, with where each non-default value came from."""
    width = max(len(key) for key in config)
    lines = []
    for key, value in config.items():
        origin = '' if sources[key] == 'default' else f"  # {sources[key]}"
        lines.append(f"{key:<{width}} = {value!r}{origin}")
    return '\n'.join(lines)
