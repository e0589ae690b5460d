"""What a new user meets first: a shortened run's schedule, the batch the logs record, a start that
fails leaving no folder behind, and the summary that closes a run."""

import math
import os

import pytest

from helpers import ROOT, call_main, check_ok, make_char_dataset, read_metrics, run_script, tiny_args

import checkpoint

@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    return make_char_dataset(str(tmp_path_factory.mktemp('data') / 'tiny_char'))

def without(args, *keys):
    """tiny_args with some keys left at the script's defaults."""
    return [arg for arg in args if arg.split('=', 1)[0][2:] not in keys]

def test_a_default_decay_follows_max_iters(tmp_path, dataset, capsys):
    out = str(tmp_path / 'out')
    args = without(tiny_args(dataset, out, sophia=False, max_iters=8, log_interval=1), 'lr_decay_iters')
    status, stdout, _ = call_main(capsys, args, 'adamw')
    assert status == 0
    assert ("config: lr_decay_iters follows max_iters=8 (argument --max_iters=8): the cosine reaches min_lr "
            "at the last iteration") in stdout
    config = read_metrics(out, 'config')[0]['config']
    assert config['lr_decay_iters'] == 8
    # the last iteration (7) is one before the cosine's end at 8, not at 7 of a 100k-iteration decay
    progress = (7 - config['warmup_iters']) / (8 - config['warmup_iters'])
    expected = config['min_lr'] + 0.5 * (1 + math.cos(math.pi * progress)) * (config['learning_rate'] - config['min_lr'])
    assert read_metrics(out, 'train')[-1]['lr'] == pytest.approx(expected)
    assert expected < 0.1 * config['learning_rate']

def test_an_explicit_decay_beyond_the_run_is_kept_and_said(tmp_path, dataset, capsys):
    out = str(tmp_path / 'out')
    status, stdout, _ = call_main(capsys, tiny_args(dataset, out, sophia=False, max_iters=6, lr_decay_iters=12,
                                                    log_interval=1), 'adamw')
    assert status == 0
    assert ("config: warning: lr_decay_iters=12 (argument --lr_decay_iters=12) is beyond max_iters=6 "
            "(argument --max_iters=6): the run ends before the cosine reaches min_lr; add --lr_decay_iters=6 "
            "to decay fully") in stdout
    assert read_metrics(out, 'config')[0]['config']['lr_decay_iters'] == 12
    assert read_metrics(out, 'train')[-1]['lr'] > 2 * read_metrics(out, 'config')[0]['config']['min_lr']

def test_the_logs_record_the_batch_the_run_trains_with(tmp_path, dataset, capsys):
    """gradient_accumulation_steps given and total_bs left at its default (480): the run trains
    with 1 process x 4 x 2 = 8 sequences, and that is what the printed config, metrics.jsonl and
    the checkpoints say."""
    out = str(tmp_path / 'out')
    args = without(tiny_args(dataset, out, max_iters=2, gradient_accumulation_steps=2, checkpoint_interval=2),
                   'total_bs')
    status, stdout, _ = call_main(capsys, args)
    assert status == 0
    assert 'total_bs                        = 8  # 1 process x batch_size x gradient_accumulation_steps' in stdout
    assert read_metrics(out, 'config')[0]['config']['total_bs'] == 8
    assert checkpoint.load_checkpoint(os.path.join(out, 'ckpt-00000002.pt'))['config']['total_bs'] == 8

@pytest.mark.parametrize('problem', ['dataset', 'init_from'])
def test_a_start_that_fails_leaves_no_folder(tmp_path, dataset, capsys, problem):
    """Found inside train(), after out_dir was made: a missing dataset, a file that is no checkpoint."""
    out = tmp_path / 'out'
    (tmp_path / 'garbage.pt').write_bytes(b'not a checkpoint')
    args = {'dataset': tiny_args(str(tmp_path / 'no-such-data'), str(out)),
            'init_from': tiny_args(dataset, str(out), init_from=str(tmp_path / 'garbage.pt'))}[problem]
    status, _, err = call_main(capsys, args)
    assert status == 2 and err.startswith('error: ')
    assert not out.exists()
    out.mkdir()  # the user's own empty folder stays
    status, _, _ = call_main(capsys, args)
    assert status == 2 and out.is_dir() and os.listdir(out) == []

def test_a_run_ends_with_a_summary(tmp_path, dataset):
    out = str(tmp_path / 'out')
    result = check_ok(run_script('train_sophiag.py', tiny_args(dataset, out, max_iters=6, eval_interval=3,
                                                               checkpoint_interval=3)))
    evals = read_metrics(out, 'eval')
    summary = read_metrics(out)[-1]
    assert summary['kind'] == 'summary' and summary['iter'] == 6 and summary['tokens'] == 6 * 8 * 32
    assert summary['final_val_loss'] == evals[-1]['val/loss']
    assert summary['best_val_loss'] == min(row['val/loss'] for row in evals)
    assert summary['checkpoint'] == os.path.join(out, 'ckpt-00000006.pt')
    lines = result.stdout.strip().splitlines()[-6:]
    assert lines[0].startswith(f"done: 6 iterations, {6 * 8 * 32:,} tokens, ")
    assert lines[1] == f"val loss: final {evals[-1]['val/loss']:.4f}, best {summary['best_val_loss']:.4f}"
    assert lines[2].startswith(f"checkpoints: {out}/ckpt-00000006.pt")
    assert lines[3] == f"next: python sample.py --out_dir={out}"
    assert f"python compare.py {out} " in lines[4] and f"python export_hf.py {out} hf-out" in lines[5]
    # the next commands run as printed
    check_ok(run_script('sample.py', [f'--out_dir={out}', '--max_new_tokens=5', '--num_samples=1']))
