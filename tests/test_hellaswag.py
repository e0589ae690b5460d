"""
hellaswag.py on a small file in hellaswag_val.jsonl's format and tiny random GPTs, offline: the
choices and counts against a direct computation written by hand (one ending at a time, no padding,
float64), on a checkpoint of this repository and on a Hugging Face folder (scored there by
transformers' own model); the download cached once; bad inputs as one line and exit status 2.
"""

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import checkpoint  # noqa: E402
import hellaswag  # noqa: E402
import tokenizer  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

BLOCK_SIZE = 64
MODEL_ARGS = dict(n_layer=2, n_head=2, n_embd=32, block_size=BLOCK_SIZE, bias=False,
                  vocab_size=50304, dropout=0.0, scale_attn_by_inverse_layer_idx=True, gelu='tanh')
WORDS = ('A man is sitting on a roof . he starts pulling up roofing tiles , then the woman '
         'walks to the kitchen and puts a pan on the stove while the dog runs away').split()


def make_items(count=16, seed=0):
    """Items with every field of hellaswag_val.jsonl; endings of different lengths, so that
    the sum and the mean disagree, and one context longer than BLOCK_SIZE tokens."""
    g = torch.Generator().manual_seed(seed)

    def words(n):
        return ' '.join(WORDS[i] for i in torch.randint(len(WORDS), (n,), generator=g).tolist())

    items = []
    for i in range(count):
        ctx_a, ctx_b = words(int(torch.randint(4, 20, (1,), generator=g))), words(2)
        if i == 5:
            ctx_a = words(90)  # the model's block holds only its last tokens
        items.append({'ind': i, 'activity_label': 'Roof shingle removal', 'ctx_a': ctx_a,
                      'ctx_b': ctx_b, 'ctx': f'{ctx_a} {ctx_b}', 'split': 'val',
                      'split_type': 'indomain', 'label': int(torch.randint(4, (1,), generator=g)),
                      'endings': [words(int(torch.randint(1, 14, (1,), generator=g)))
                                  for _ in range(4)],
                      'source_id': f'activitynet~v_{i:04d}'})
    return items


def write_items(path, items):
    path.write_text(''.join(json.dumps(item) + '\n' for item in items))
    return path


def spread(model, seed):
    """Random weights far from GPT-2's small init: confident logits whose endings' losses differ
    by much more than float32 rounding, so that choices are well defined."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def reference_scores(logits_of, items, block_size):
    """For each item, the endings picked by the lowest sum and the lowest mean of the ending
    tokens' cross-entropy, computed directly: each ending alone, log-softmax in float64."""
    enc = tokenizer.gpt2_encoding()
    choices, margins = [], []
    for item in items:
        sums, means = [], []
        for ending in item['endings']:
            ending_tokens = enc.encode_ordinary(' ' + ending)
            tokens = (enc.encode_ordinary(item['ctx']) + ending_tokens)[-block_size:]
            first = len(tokens) - len(ending_tokens)
            # log p(token t | tokens before t) comes from the logits at t - 1
            logp = torch.log_softmax(logits_of(tokens)[first - 1:-1].double(), dim=-1)
            nll = -sum(logp[t - first, tokens[t]].item() for t in range(first, len(tokens)))
            sums.append(nll)
            means.append(nll / len(ending_tokens))
        choices.append((sums.index(min(sums)), means.index(min(means))))
        margins += [sorted(sums)[1] - min(sums), sorted(means)[1] - min(means)]
    assert min(margins) > 1e-3  # no near-ties: a pick does not hang on rounding
    return choices


def counts_of(choices, items):
    return {'items': len(items),
            'acc': sum(s == item['label'] for (s, _), item in zip(choices, items)),
            'acc_norm': sum(m == item['label'] for (_, m), item in zip(choices, items))}


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: on a shared 2-core machine two threads make these small matmuls slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def ranks(gpt2_ranks_file, monkeypatch):
    monkeypatch.setenv('GPT2_RANKS_FILE', gpt2_ranks_file)
    return gpt2_ranks_file


@pytest.fixture(scope='module')
def tiny_model():
    torch.manual_seed(0)
    return spread(GPT(GPTConfig(**MODEL_ARGS)), seed=1)


@pytest.fixture(scope='module')
def expected(gpt2_ranks_file, tiny_model):
    """The tiny model's picks on make_items(), by the direct computation."""
    os.environ['GPT2_RANKS_FILE'] = gpt2_ranks_file
    logits_of = lambda tokens: tiny_model(torch.tensor([tokens]), all_logits=True)[0][0]  # noqa
    with torch.no_grad():
        return reference_scores(logits_of, make_items(), BLOCK_SIZE)


def test_choices_and_counts_equal_a_direct_computation(ranks, tiny_model, expected):
    items = make_items()
    assert any(s != m for s, m in expected)  # the items tell acc from acc_norm
    encode = tokenizer.gpt2_encoding().encode_ordinary
    assert [hellaswag.choose(tiny_model, item, encode, 'cpu') for item in items] == expected
    assert hellaswag.score_items(tiny_model, items, 'cpu') == counts_of(expected, items)
    # split over two processes, each its share, the counts add up to the whole; a model in
    # training mode (dropout on) is scored in eval mode, and left in training mode
    tiny_model.transformer.drop.p = 0.5
    tiny_model.train()
    try:
        shares = [hellaswag.score_items(tiny_model, items, 'cpu', rank, 2) for rank in (0, 1)]
        assert tiny_model.training
    finally:
        tiny_model.transformer.drop.p = 0.0
        tiny_model.eval()
    assert {k: shares[0][k] + shares[1][k] for k in shares[0]} == counts_of(expected, items)
    assert shares[0]['items'] == shares[1]['items'] == len(items) // 2


def save_run(out_dir, model, iter_num=5):
    state = dict(model=model.state_dict(), model_args=dict(model.config.__dict__),
                 iter_num=iter_num, format_version=checkpoint.FORMAT_VERSION, config={})
    os.makedirs(out_dir, exist_ok=True)
    return checkpoint.save_checkpoint(str(out_dir), state, iter_num, keep_last=3, is_best=True)


def reported_counts(stdout):
    found = re.search(r'hellaswag: (\d+) items, acc_norm [\d.]+ \((\d+)/\d+\), '
                      r'acc [\d.]+ \((\d+)/\d+\)', stdout)
    assert found, stdout
    n, acc_norm, acc = map(int, found.groups())
    return {'items': n, 'acc': acc, 'acc_norm': acc_norm}


def test_script_scores_a_checkpoint(ranks, tiny_model, expected, tmp_path):
    items = make_items()
    save_run(tmp_path / 'run', tiny_model)
    data_file = write_items(tmp_path / 'hellaswag_val.jsonl', items)
    result = subprocess.run([sys.executable, str(REPO / 'hellaswag.py'),
                             f'--out_dir={tmp_path / "run"}', f'--data_file={data_file}'],
                            capture_output=True, text=True, cwd=REPO, timeout=120,
                            env={**os.environ, 'GPT2_RANKS_FILE': ranks, 'OMP_NUM_THREADS': '1'})
    assert result.returncode == 0, result.stderr
    assert reported_counts(result.stdout) == counts_of(expected, items)
    assert 'best.pt (iteration 5)' in result.stdout


def test_script_scores_a_hugging_face_folder(ranks, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    hf_config = GPT2Config(vocab_size=50257, n_positions=BLOCK_SIZE, n_embd=32, n_layer=2,
                           n_head=2, activation_function='gelu_new')
    hf_model = spread(GPT2LMHeadModel(hf_config), seed=2)
    hf_model.save_pretrained(tmp_path / 'hf')
    items = make_items(count=8, seed=1)
    # the reference from transformers' own forward, not this repository's model
    with torch.no_grad():
        expected = reference_scores(lambda t: hf_model(torch.tensor([t])).logits[0], items,
                                    BLOCK_SIZE)
    data_file = write_items(tmp_path / 'items.jsonl', items)
    capsys.readouterr()
    hellaswag.main([f'--init_from={tmp_path / "hf"}', f'--data_file={data_file}'])
    assert reported_counts(capsys.readouterr().out) == counts_of(expected, items)


def test_download_is_checked_and_cached(ranks, tmp_path, monkeypatch):
    items = make_items()
    body = write_items(tmp_path / 'served.jsonl', items).read_bytes()
    served = []

    def urlopen(url, timeout):
        served.append(url)
        return io.BytesIO(body[:len(body) // 2] if len(served) == 1 else body)

    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
    monkeypatch.setattr(hellaswag.urllib.request, 'urlopen', urlopen)
    monkeypatch.setattr(hellaswag, 'HELLASWAG_ITEMS', len(items))
    cached = tmp_path / 'cache' / 'sophia-gpt2' / 'hellaswag_val.jsonl'
    with pytest.raises(hellaswag.HellaSwagError, match='is incomplete'):
        hellaswag.load_items()  # a cut connection: nothing kept under the name
    assert not cached.exists() and os.listdir(cached.parent) == []
    assert hellaswag.load_items() == [{k: item[k] for k in ('ctx', 'endings', 'label')}
                                      for item in items]
    assert cached.read_bytes() == body and served == [hellaswag.HELLASWAG_URL] * 2
    hellaswag.load_items()
    assert len(served) == 2  # downloaded once


def test_offline_says_where_to_put_the_file(ranks, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
    for name in ('https_proxy', 'HTTPS_PROXY'):  # every HTTPS request to a closed local port
        monkeypatch.setenv(name, 'http://127.0.0.1:9')
    for name in ('no_proxy', 'NO_PROXY'):
        monkeypatch.setenv(name, '')
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        hellaswag.main(['--init_from=gpt2'])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1, lines
    where = tmp_path / 'cache' / 'sophia-gpt2' / 'hellaswag_val.jsonl'
    assert lines[0].startswith('error: cannot download') and \
        f'put hellaswag_val.jsonl at {where}' in lines[0], lines[0]
    assert os.listdir(where.parent) == []


def test_bad_inputs_are_one_line(ranks, tiny_model, tmp_path, capsys):
    data_file = write_items(tmp_path / 'items.jsonl', make_items(count=3))
    bad_items = tmp_path / 'bad.jsonl'
    bad_items.write_text(data_file.read_text() + '{"ctx": "no endings", "label": 1}\n')
    save_run(tmp_path / 'good', tiny_model)
    damaged = Path(save_run(tmp_path / 'damaged', tiny_model))
    for path in (damaged, tmp_path / 'damaged' / 'best.pt'):
        with open(path, 'r+b') as f:  # best.pt is a hard link to it: damaged too
            f.seek(-100, os.SEEK_END)
            f.write(b'\0' * 100)
    char_model = GPT(GPTConfig(**dict(MODEL_ARGS, vocab_size=65)))
    save_run(tmp_path / 'chars', char_model)
    (tmp_path / 'empty').mkdir()
    cases = [
        ([f'--data_file={tmp_path / "missing.jsonl"}'], 'does not exist'),
        ([f'--data_file={bad_items}'], f'{bad_items}:4 is not a HellaSwag item'),
        ([f'--out_dir={tmp_path / "empty"}'], 'no checkpoint in'),
        ([f'--out_dir={tmp_path / "damaged"}'], 'damaged'),
        ([f'--out_dir={tmp_path / "chars"}'], 'vocabulary of 65 tokens'),
        (['--init_from=somewhere'], "init_from='somewhere': expected resume"),
        (['--max_item=3'], "did you mean 'max_items'"),
    ] + ([] if torch.cuda.is_available() else [(['--device=cuda'], 'CUDA is not available')])
    for args, fragment in cases:
        argv = [f'--data_file={data_file}', f'--out_dir={tmp_path / "good"}'] + args
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            hellaswag.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1, (args, err)
        assert err[0].startswith('error: ') and fragment in err[0], err[0]
