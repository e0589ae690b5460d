"""--hellaswag=True: the training loop scores HellaSwag at every evaluation, each process its share
of the items, and logs the sums; compare.py plots and tabulates it. The logged score is held to
hellaswag.score_items on the checkpoint of the same iteration (which tests/test_hellaswag.py holds
to a direct computation), on one process and on two."""

import os
import sys

import numpy as np
import pytest
import torch

from helpers import ROOT, check_ok, make_char_dataset, read_metrics, run_script, tiny_args
from test_hellaswag import make_items, write_items

sys.path.insert(0, ROOT)
import checkpoint  # noqa: E402
import compare  # noqa: E402
import hellaswag  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
ITEMS = 15  # odd: two processes score 8 and 7

@pytest.fixture(scope='module')
def bpe_dataset(tmp_path_factory):
    """GPT-2 BPE token files (random ids below 50,257, no meta.pkl: the model's vocabulary is
    GPT-2's padded 50,304)."""
    folder = tmp_path_factory.mktemp('bpe')
    rng = np.random.default_rng(0)
    for split, size in (('train', 20000), ('val', 4000)):
        rng.integers(0, 50257, size=size, dtype=np.uint16).tofile(folder / f'{split}.bin')
    return str(folder)

@pytest.fixture(autouse=True)
def ranks(gpt2_ranks_file, monkeypatch):
    """The GPT-2 BPE ranks offline, for the scripts and for the scoring done here."""
    monkeypatch.setenv('GPT2_RANKS_FILE', gpt2_ranks_file)

@pytest.fixture(scope='module')
def items_file(tmp_path_factory):
    return str(write_items(tmp_path_factory.mktemp('items') / 'hellaswag_val.jsonl', make_items(ITEMS)))

def run_args(dataset, out, items_file, **overrides):
    return tiny_args(dataset, out, sophia=False, **dict(dict(
        max_iters=4, eval_interval=2, checkpoint_interval=2, lr_decay_iters=4, hellaswag=True,
        hellaswag_file=items_file, learning_rate=3e-2), **overrides))

def scored_by_hand(out, iter_num, items_file):
    """hellaswag.score_items over every item with the model of the checkpoint at iter_num."""
    state = checkpoint.load_checkpoint(os.path.join(out, f'ckpt-{iter_num:08d}.pt'))
    model = GPT(GPTConfig(**state['model_args']))
    model.load_state_dict(state['model'])
    counts = hellaswag.score_items(model, hellaswag.load_items(items_file), 'cpu')
    return {'hellaswag/items': counts['items'], 'hellaswag/acc': counts['acc'] / counts['items'],
            'hellaswag/acc_norm': counts['acc_norm'] / counts['items']}

@pytest.mark.parametrize('processes', [1, 2])
def test_every_evaluation_scores_hellaswag_as_the_checkpoint_scores(tmp_path, bpe_dataset, items_file,
                                                                    gpt2_ranks_file, processes):
    out = str(tmp_path / 'out')
    env = {'GPT2_RANKS_FILE': gpt2_ranks_file, 'OMP_NUM_THREADS': '1'}
    result = check_ok(run_script('train_adam.py', run_args(bpe_dataset, out, items_file), env=env,
                                 launcher=TORCHRUN if processes == 2 else None))
    evals = read_metrics(out, 'eval')
    assert [row['iter'] for row in evals] == [0, 2, 4]
    for row in evals:
        assert row['hellaswag/items'] == ITEMS  # every item once, whatever the processes
        assert 0 <= row['hellaswag/acc'] <= 1 and 0 <= row['hellaswag/acc_norm'] <= 1
    for iter_num in (2, 4):
        row = next(row for row in evals if row['iter'] == iter_num)
        expected = scored_by_hand(out, iter_num, items_file)
        assert {key: row[key] for key in expected} == pytest.approx(expected), iter_num
    assert f"hellaswag acc_norm {evals[-1]['hellaswag/acc_norm']:.4f} ({ITEMS} items)" in result.stdout

def test_compare_plots_and_tabulates_hellaswag(tmp_path, bpe_dataset, items_file, gpt2_ranks_file):
    out = str(tmp_path / 'out')
    check_ok(run_script('train_adam.py', run_args(bpe_dataset, out, items_file),
                        env={'GPT2_RANKS_FILE': gpt2_ranks_file}))
    run = compare.load_run(out)
    rows = compare.comparison_table([run])
    assert rows[0]['final_hellaswag'] == read_metrics(out, 'eval')[-1]['hellaswag/acc_norm']
    assert 'HellaSwag acc_norm' in compare.format_table(rows)
    paths = compare.plot_runs([run], str(tmp_path / 'plots') + os.sep)
    assert sorted(os.path.basename(p) for p in paths) == ['hellaswag.png', 'train_loss.png', 'val_loss.png']

def test_without_hellaswag_no_column_and_no_plot(tmp_path):
    dataset = make_char_dataset(str(tmp_path / 'chars'))
    out = str(tmp_path / 'out')
    check_ok(run_script('train_adam.py', tiny_args(dataset, out, sophia=False, max_iters=2, eval_interval=2)))
    run = compare.load_run(out)
    assert 'HellaSwag' not in compare.format_table(compare.comparison_table([run]))
    assert 'hellaswag/acc_norm' not in read_metrics(out, 'eval')[-1]
    assert [os.path.basename(p) for p in compare.plot_runs([run], str(tmp_path / 'plots') + os.sep)] == \
        ['val_loss.png', 'train_loss.png']

def test_bad_inputs_are_one_line(tmp_path, bpe_dataset, items_file, gpt2_ranks_file):
    chars = make_char_dataset(str(tmp_path / 'chars'))
    cases = [(run_args(chars, str(tmp_path / 'a'), items_file), "hellaswag=True needs a model of GPT-2 BPE"),
             (run_args(bpe_dataset, str(tmp_path / 'b'), str(tmp_path / 'missing.jsonl')),
              "does not exist; get hellaswag_val.jsonl from")]
    for args, message in cases:
        result = run_script('train_adam.py', args, env={'GPT2_RANKS_FILE': gpt2_ranks_file})
        assert result.returncode == 2, result.stderr[-2000:]
        assert result.stderr.startswith('error: ') and result.stderr.count('\n') == 1, result.stderr[-2000:]
        assert message in result.stderr
