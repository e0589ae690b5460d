"""sample.py on a tiny trained character run: the same seed gives the same text (in this process
and in another), another seed other text, every sample begins with the prompt (given inline or as
FILE:path) and has max_new_tokens more, best.pt by default and the newest checkpoint on request;
mistakes are one line and exit status 2."""

import os
import pickle
import sys

import pytest
import torch

from helpers import ROOT, make_char_dataset, run_main, run_script, tiny_args

sys.path.insert(0, ROOT)
import sample  # noqa: E402

SEPARATOR = '---------------\n'

@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """(out_dir, dataset) of 6 AdamW iterations on the tiny character dataset."""
    dataset = make_char_dataset(str(tmp_path_factory.mktemp('data') / 'tiny_char'))
    out = str(tmp_path_factory.mktemp('run') / 'out')
    assert run_main(tiny_args(dataset, out, False, max_iters=6, eval_interval=3, checkpoint_interval=100),
                    'adamw') == 0
    return out, dataset

def call_sample(capsys, args):
    """sample.main in this process on one thread: (exit status, stdout, stderr)."""
    capsys.readouterr()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sample.main(args)
        status = 0
    except SystemExit as e:
        status = e.code
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    return status, out, err

def samples(stdout):
    """The samples printed after the 'sampling from' line."""
    header, text = stdout.split('\n', 1)
    assert header.startswith('sampling from ')
    assert text.endswith('\n' + SEPARATOR)  # print ends each sample with a newline of its own
    return text[:-len('\n' + SEPARATOR)].split('\n' + SEPARATOR)

def test_a_seed_gives_the_same_samples_here_and_in_another_process(trained, capsys):
    out, _ = trained
    args = [f'--out_dir={out}', '--start=def ', '--num_samples=2', '--max_new_tokens=24', '--seed=5']
    status, first, _ = call_sample(capsys, args)
    assert status == 0
    torch.manual_seed(12345)  # whatever the global RNG holds: the samples come from the seed
    assert call_sample(capsys, args)[1] == first
    result = run_script('sample.py', args, env={'OMP_NUM_THREADS': '1'})
    assert result.returncode == 0 and result.stdout == first
    texts = samples(first)
    assert len(texts) == 2 and texts[0] != texts[1]  # one generator runs on through the samples
    for text in texts:  # characters: one token is one character
        assert text.startswith('def ') and len(text) == len('def ') + 24
    other = samples(call_sample(capsys, args[:-1] + ['--seed=6'])[1])
    assert other != texts and all(text.startswith('def ') for text in other)

def test_a_prompt_from_a_file_and_the_checkpoint_chosen(trained, capsys, tmp_path):
    out, _ = trained
    prompt = tmp_path / 'prompt.txt'
    prompt.write_text('class Run:\n    def ')
    status, stdout, _ = call_sample(capsys, [f'--out_dir={out}', f'--start=FILE:{prompt}', '--num_samples=1',
                                             '--max_new_tokens=10'])
    assert status == 0
    assert stdout.startswith(f"sampling from {os.path.join(out, 'best.pt')} (iteration 6)\n")
    [text] = samples(stdout)
    assert text.startswith('class Run:\n    def ') and len(text) == len('class Run:\n    def ') + 10
    status, stdout, _ = call_sample(capsys, [f'--out_dir={out}', '--which=latest', '--num_samples=1',
                                             '--max_new_tokens=10'])
    assert status == 0
    assert stdout.startswith(f"sampling from {os.path.join(out, 'ckpt-00000006.pt')} (iteration 6)\n")

def test_mistakes_are_one_line_and_exit_2(trained, capsys, tmp_path):
    out, dataset = trained
    with open(os.path.join(dataset, 'meta.pkl'), 'rb') as f:
        vocabulary = pickle.load(f)['stoi']
    missing = next(ch for ch in '\u2603\u00a4\x07' if ch not in vocabulary)  # a snowman, a currency sign, a bell
    empty = tmp_path / 'empty'
    empty.mkdir()
    cases = [([f'--out_dir={empty}'], f"error: no checkpoint in {empty}; train first"),
             ([f'--out_dir={out}', f'--start=def {missing}'], f"error: characters {missing!r} are not in this "
                                                                f"dataset's vocabulary"),
             ([f'--out_dir={out}', f"--start=FILE:{tmp_path / 'nope.txt'}"],
              f"error: [Errno 2] No such file or directory: '{tmp_path / 'nope.txt'}'"),
             ([f'--out_dir={out}', '--num_samples=two'], "error: argument --num_samples=two: cannot read 'two'")]
    for args, line in cases:
        status, stdout, stderr = call_sample(capsys, args + ['--max_new_tokens=5'])
        assert status == 2, (args, stderr)
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(line), (args, stderr)
        assert SEPARATOR not in stdout  # nothing was sampled
