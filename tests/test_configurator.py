"""The configurator: config files and --key=value overrides, and the one-line errors."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import ConfigError, batch_plan, check_config, format_config, parse_args  # noqa: E402
from optimizers import RECIPES, SophiaGRecipe  # noqa: E402

DEFAULTS = dict(learning_rate=6e-4, max_iters=100, compile=True, dataset='owt', eps=1e-8)

def write(tmp_path, text, name='cfg.py'):
    path = tmp_path / name
    path.write_text(text)
    return str(path)

def test_defaults_are_returned_untouched():
    config, sources = parse_args(DEFAULTS, [])
    assert config == DEFAULTS and set(sources.values()) == {'default'}
    assert config is not DEFAULTS

def test_overrides_are_typed_like_the_defaults():
    config, sources = parse_args(DEFAULTS, ['--learning_rate=1', '--max_iters=5', '--compile=false',
                                            '--dataset=shakespeare_char', '--eps=1e-6'])
    assert config['learning_rate'] == 1.0 and isinstance(config['learning_rate'], float)
    assert config['max_iters'] == 5 and config['compile'] is False
    assert config['dataset'] == 'shakespeare_char' and config['eps'] == 1e-6
    assert sources['max_iters'] == 'argument --max_iters=5'
    for text, value in (('True', True), ('true', True), ('FALSE', False), ('False', False)):
        assert parse_args(DEFAULTS, [f'--compile={text}'])[0]['compile'] is value

def test_values_are_split_at_the_first_equals_sign_only():
    config, _ = parse_args(DEFAULTS, ['--dataset=a=b=c'])
    assert config['dataset'] == 'a=b=c'
    config, _ = parse_args(DEFAULTS, ["--dataset='quoted'"])
    assert config['dataset'] == 'quoted'

def test_config_files_apply_in_order_and_can_read_earlier_values(tmp_path):
    first = write(tmp_path, "max_iters = 50\nlearning_rate = 3e-4\n", 'first.py')
    second = write(tmp_path, "import math\n_scratch = 2\nmax_iters = max_iters * _scratch\n", 'second.py')
    config, sources = parse_args(DEFAULTS, [first, second, '--learning_rate=1e-3'])
    assert config['max_iters'] == 100 and config['learning_rate'] == 1e-3
    assert sources['max_iters'] == f'{second}:3'
    assert 'math' not in config and '_scratch' not in config

@pytest.mark.parametrize('argv, message', [
    (['--learning_rat=1e-3'], "'learning_rat' is not a config key (did you mean 'learning_rate'?)"),
    (['--max_iters=1.5'], "max_iters=1.5 (argument --max_iters=1.5): expected an integer, got a number"),
    (['--max_iters=ten'], "cannot read 'ten' as an integer for max_iters"),
    (['--compile=maybe'], "cannot read 'maybe' as a boolean (true/false) for compile"),
    (['--learning_rate=True'], "expected a number, got a boolean"),
    (['--compile'], "argument '--compile': expected --key=value"),
    (['missing_config.py'], "config file missing_config.py not found"),
])
def test_command_line_mistakes_are_one_line(argv, message):
    with pytest.raises(ConfigError) as e:
        parse_args(DEFAULTS, argv)
    assert message in str(e.value) and '\n' not in str(e.value)

@pytest.mark.parametrize('text, message', [
    ("max_iters = 10\nlearning_rat = 1e-3\n", "cfg.py:2: 'learning_rat' is not a config key (did you mean 'learning_rate'?)"),
    ("for _i in range(2):\n    unknown_thing = _i\n", "cfg.py:2: 'unknown_thing' is not a config key"),
    ("max_iters = 'many'\n", "max_iters='many' ("),
    ("max_iters = (\n", "syntax error"),
    ("max_iters = 1 / 0\n", "running the config file failed: ZeroDivisionError"),
])
def test_config_file_mistakes_name_file_and_line(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        parse_args(DEFAULTS, [path])
    assert message in str(e.value) and '\n' not in str(e.value)

def test_names_local_to_functions_and_comprehensions_are_allowed(tmp_path):
    path = write(tmp_path, "def f(x):\n    y = x\n    return y\nmax_iters = f(3) + sum(z for z in [1])\n")
    assert parse_args(DEFAULTS, [path])[0]['max_iters'] == 4

@pytest.mark.parametrize('recipe', RECIPES.values())
def test_the_training_defaults_pass_the_checks(recipe):
    config, sources = parse_args(recipe.defaults(), [])
    check_config(config, sources, world_size=8, recipe=recipe)

def test_the_shipped_config_files_load_and_pass_the_checks():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in sorted(os.listdir(os.path.join(root, 'config'))):
        recipe = next(r for r in RECIPES.values() if name.endswith(r.script.removeprefix('train')))
        config, sources = parse_args(recipe.defaults(), [os.path.join(root, 'config', name)])
        check_config(config, sources, world_size=1, recipe=recipe)
        if 'gpt2' in name and 'fineweb' not in name:  # the official batch: 480 sequences of 1024 tokens
            for world_size in (1, 8, 10):
                check_config(config, sources, world_size=world_size, recipe=recipe)
                plan = batch_plan(config, sources, world_size)
                assert plan.sequences * config['block_size'] == 491520
                assert world_size * plan.micro_steps * config['batch_size'] == 480
        if 'fineweb' in name:  # llm.c's batch: 512 sequences of 1024 tokens
            for world_size in (1, 8):
                check_config(config, sources, world_size=world_size, recipe=recipe)
                assert batch_plan(config, sources, world_size).sequences * config['block_size'] == 524288

def test_sophia_keys_are_unknown_to_the_adam_script():
    with pytest.raises(ConfigError, match="'rho' is not a config key"):
        parse_args(RECIPES['adamw'].defaults(), ['--rho=0.05'])

@pytest.mark.parametrize('script, key, owner', [('adamw', 'rho', 'sophiag'), ('muon', 'hess_interval', 'sophiag'),
                                                ('sophiag', 'muon_momentum', 'muon'), ('adamw', 'muon_ns_steps', 'muon')])
def test_another_optimizers_key_names_the_script_that_takes_it(tmp_path, script, key, owner):
    recipe, other = RECIPES[script], RECIPES[owner]
    value = other.defaults()[key]
    expected = (f"'{key}' is a key of {other.title}, which {other.script} trains; {recipe.script} trains "
                f"{recipe.title} and has no such key")
    with pytest.raises(ConfigError) as e:
        parse_args(recipe.defaults(), [f'--{key}={value}'], recipe.foreign_keys())
    assert str(e.value) == f"argument --{key}={value}: {expected}"
    path = write(tmp_path, f"max_iters = 10\n{key} = {value!r}\n")
    with pytest.raises(ConfigError) as e:
        parse_args(recipe.defaults(), [path], recipe.foreign_keys())
    assert str(e.value) == f"{path}:2: {expected}"

@pytest.mark.parametrize('argv, world_size, message', [
    (['--min_lr=1e-2'], 1, "min_lr=0.01 (argument --min_lr=1e-2) is larger than learning_rate=0.0006 (default)"),
    (['--warmup_iters=200000'], 1, "warmup_iters=200000 (argument --warmup_iters=200000) is longer than lr_decay_iters"),
    (['--total_bs=480', '--gradient_accumulation_steps=6'], 4, "4 processes x batch_size=12 (default) x gradient_accumulation_steps=6 (argument --gradient_accumulation_steps=6) = 288 sequences per iteration, but total_bs=480 (argument --total_bs=480); use --gradient_accumulation_steps=10 (or 0 to derive it), or --total_bs=288 to train with that batch"),
    (['--batch_size=7'], 1, "total_bs=480 (default) cannot be split into micro-batches of batch_size=7 (argument --batch_size=7) on 1 process: 480 is not a multiple of 7 x 1; use a batch_size that divides 480 (e.g. 5, 6, 8, 10)"),
    (['--total_bs=0'], 1, "gradient_accumulation_steps=0 (default) and total_bs=0 (argument --total_bs=0): set total_bs"),
    (['--gradient_accumulation_steps=-1'], 1, "gradient_accumulation_steps=-1 (argument --gradient_accumulation_steps=-1): must be >= 0"),
    (['--dtype=float8'], 1, "dtype='float8' (argument --dtype=float8): expected one of float32, bfloat16, float16"),
    (['--hess_interval=0'], 1, "hess_interval=0 (argument --hess_interval=0): must be > 0"),
    (['--hess_micro_steps=-3'], 2, "hess_micro_steps=-3 (argument --hess_micro_steps=-3): must be >= 0"),
    (['--hessian_estimator=exact'], 1, "expected one of gnb, hutchinson"),
    (['--batch_size=0'], 1, "batch_size=0 (argument --batch_size=0): must be > 0"),
    (['--n_head=5'], 1, "n_embd=768 (default) is not divisible by n_head=5"),
    (['--device=gpu'], 1, "device='gpu' (argument --device=gpu): expected cpu, cuda, cuda:N or mps"),
    (['--init_from=gpt3'], 1, "init_from='gpt3' (argument --init_from=gpt3): expected scratch, resume"),
    (['--beta2=1.0'], 1, "beta2=1.0 (argument --beta2=1.0): must be in [0, 1)"),
    (['--rho=-1'], 1, "rho=-1.0 (argument --rho=-1): must be > 0"),
    (['--gelu=relu'], 1, "gelu='relu' (argument --gelu=relu): expected one of tanh, exact"),
    (['--init_from=gpt2', '--gelu=exact'], 1, "pretrained GPT-2 weights need the tanh GELU"),
])
def test_impossible_values_and_combinations(argv, world_size, message):
    config, sources = parse_args(SophiaGRecipe.defaults(), argv)
    with pytest.raises(ConfigError) as e:
        check_config(config, sources, world_size=world_size, recipe=SophiaGRecipe)
    assert message in str(e.value) and '\n' not in str(e.value)

def test_format_config_names_where_values_came_from():
    config, sources = parse_args(DEFAULTS, ['--max_iters=7'])
    text = format_config(config, sources)
    assert 'max_iters     = 7  # argument --max_iters=7' in text
    assert 'learning_rate = 0.0006\n' in text
