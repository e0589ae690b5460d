"""
data/fineweb/prepare.py on a small local file in FineWeb-Edu's schema, loaded through the same
`datasets` call as the hub's sample, offline: the token stream and the split against a direct
tokenization, the token counts in meta.pkl, an interrupted run that continues to the same bytes,
and the mistakes a user can make (one line, exit status 2, nothing written).
"""

import importlib.util
import json
import os
import pickle
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / 'data' / 'fineweb' / 'prepare.py'
sys.path.insert(0, str(REPO))

import tokenizer  # noqa: E402

EOT = 50256
CHUNK = 16  # documents per chunk: 300 documents make 19 chunks, the last one short
VAL_TOKENS = 2000


def fineweb_edu_rows(count=300, seed=0):
    """Documents with FineWeb-Edu's columns; the texts hold what tokenizers trip over: accents,
    digits, newlines, a literal '<|endoftext|>' (text, not the special token), an empty one."""
    rng = np.random.default_rng(seed)
    words = ('the of and a to in is was photosynthesis café 3.14 naïve 1,024 learning\n'
             ' <|endoftext|> students\n\n history').split(' ')
    rows = []
    for i in range(count):
        text = '' if i == 7 else ' '.join(rng.choice(words, size=int(rng.integers(3, 150))))
        rows.append({'text': text, 'id': f'<urn:uuid:{i:08x}-0000-0000-0000-000000000000>',
                     'dump': 'CC-MAIN-2013-20', 'url': f'http://example.org/{i}',
                     'file_path': 's3://commoncrawl/crawl-data/CC-MAIN-2013-20/x.warc.gz',
                     'language': 'en', 'language_score': 0.97,
                     'token_count': len(text.split()) * 2, 'score': 3.2, 'int_score': 3})
    return rows


@pytest.fixture(scope='module')
def docs(tmp_path_factory):
    folder = tmp_path_factory.mktemp('docs')
    rows = fineweb_edu_rows()
    pq.write_table(pa.Table.from_pylist(rows), folder / 'docs.parquet')
    with open(folder / 'docs.jsonl', 'w') as f:
        f.writelines(json.dumps(row) + '\n' for row in rows)
    return folder, [row['text'] for row in rows]


def expected_stream(texts, ranks_file):
    """The token stream written by hand: <|endoftext|> then each document, in order."""
    os.environ['GPT2_RANKS_FILE'] = ranks_file
    enc = tokenizer.gpt2_encoding()
    return np.array([t for text in texts for t in [EOT] + enc.encode_ordinary(text)], np.uint16)


def offline_env(ranks_file, tmp_path):
    return {**os.environ, 'GPT2_RANKS_FILE': ranks_file, 'HF_HOME': str(tmp_path / 'hf'),
            'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1',
            'HF_DATASETS_DISABLE_PROGRESS_BARS': '1', 'TQDM_DISABLE': '1'}  # stderr: errors only


def run_prepare(args, ranks_file, tmp_path):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True,
                          text=True, env=offline_env(ranks_file, tmp_path), timeout=120)


def load_script():
    spec = importlib.util.spec_from_file_location('prepare_fineweb', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def call_main(module, args, capsys):
    """main() in this process: (exit status, the one error line or None)."""
    capsys.readouterr()
    try:
        module.main([str(a) for a in args])
        status = 0
    except SystemExit as e:
        status = e.code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith('error:')]
    assert len(errors) <= 1, err
    return status, (errors[0] if errors else None)


def read_outputs(out_dir):
    return {name: (out_dir / name).read_bytes() for name in ('train.bin', 'val.bin', 'meta.pkl')}


@pytest.fixture(scope='module')
def uninterrupted(docs, gpt2_ranks_file, tmp_path_factory):
    """One whole run, as a user starts it: a subprocess with two tokenizer processes."""
    folder, _ = docs
    tmp = tmp_path_factory.mktemp('whole')
    result = run_prepare(['--files', folder / 'docs.parquet', '--out_dir', tmp / 'out',
                          '--num_proc', 2, '--chunk_documents', CHUNK,
                          '--val_tokens', VAL_TOKENS, '--cache_dir', tmp / 'cache'],
                         gpt2_ranks_file, tmp)
    assert result.returncode == 0, result.stderr
    return tmp / 'out', result


def test_stream_split_and_counts(docs, uninterrupted, gpt2_ranks_file):
    _, texts = docs
    out_dir, result = uninterrupted
    stream = expected_stream(texts, gpt2_ranks_file)
    val = np.fromfile(out_dir / 'val.bin', dtype=np.uint16)
    train = np.fromfile(out_dir / 'train.bin', dtype=np.uint16)
    # llm.c's split: the first VAL_TOKENS tokens of the stream are val, the document that
    # straddles the boundary cut in two; the rest, in order, is train
    np.testing.assert_array_equal(val, stream[:VAL_TOKENS])
    np.testing.assert_array_equal(train, stream[VAL_TOKENS:])
    assert val[0] == EOT and stream[VAL_TOKENS - 1] != EOT != stream[VAL_TOKENS]  # a cut document
    assert int((stream == EOT).sum()) == len(texts)  # the literal '<|endoftext|>' stayed text
    with open(out_dir / 'meta.pkl', 'rb') as f:
        meta = pickle.load(f)
    assert meta['vocab_size'] == 50257 and meta['tokenizer'] == 'gpt2' and meta['dtype'] == 'uint16'
    assert (meta['train_tokens'], meta['val_tokens']) == (len(train), len(val))
    assert meta['documents'] == len(texts)
    assert tokenizer.encoder_decoder(meta)[1](train[:50].tolist())  # sample.py can read it
    assert f"train {len(train):,} tokens, val {VAL_TOKENS:,}" in result.stdout
    assert sorted(os.listdir(out_dir)) == ['meta.pkl', 'train.bin', 'val.bin']  # parts.tmp gone


def test_jsonl_gives_the_parquet_bytes_and_a_finished_run_is_kept(
        docs, uninterrupted, gpt2_ranks_file, tmp_path, monkeypatch, capsys):
    folder, _ = docs
    monkeypatch.setenv('GPT2_RANKS_FILE', gpt2_ranks_file)
    module = load_script()
    out_dir = tmp_path / 'out'
    args = ['--files', folder / 'docs.jsonl', '--out_dir', out_dir, '--num_proc', 1,
            '--chunk_documents', 50, '--val_tokens', VAL_TOKENS, '--cache_dir', tmp_path / 'c']
    assert call_main(module, args, capsys) == (0, None)
    whole = read_outputs(uninterrupted[0])
    assert {k: v for k, v in read_outputs(out_dir).items() if k != 'meta.pkl'} == \
        {k: v for k, v in whole.items() if k != 'meta.pkl'}
    # run again: the finished files are kept as they are, nothing tokenized
    monkeypatch.setattr(module, 'encode_documents', lambda texts: pytest.fail('tokenized again'))
    before = read_outputs(out_dir)
    assert call_main(module, args, capsys) == (0, None)
    assert read_outputs(out_dir) == before


def test_interrupted_run_continues_to_the_same_bytes(docs, uninterrupted, gpt2_ranks_file,
                                                      tmp_path, monkeypatch, capsys):
    folder, texts = docs
    monkeypatch.setenv('GPT2_RANKS_FILE', gpt2_ranks_file)
    module = load_script()
    out_dir = tmp_path / 'out'
    args = ['--files', folder / 'docs.parquet', '--out_dir', out_dir, '--num_proc', 1,
            '--chunk_documents', CHUNK, '--val_tokens', VAL_TOKENS, '--cache_dir', tmp_path / 'c']
    replace = os.replace

    def crash_committing_the_fourth_chunk(source, target):
        if str(target).endswith('000003.bin'):
            raise KeyboardInterrupt  # a Ctrl-C or a kill, with the chunk written but not renamed
        return replace(source, target)

    monkeypatch.setattr(module.os, 'replace', crash_committing_the_fourth_chunk)
    with pytest.raises(KeyboardInterrupt):
        call_main(module, args, capsys)
    monkeypatch.setattr(module.os, 'replace', replace)
    parts = out_dir / module.PARTS
    assert sorted(os.listdir(parts)) == ['000000.bin', '000001.bin', '000002.bin',
                                         f'000003.bin.tmp{os.getpid()}', 'plan.json']
    assert not (out_dir / 'train.bin').exists() and not (out_dir / 'meta.pkl').exists()

    # another input, or another chunk size, would not continue these chunks: refused
    status, error = call_main(module, args[:7] + [7] + args[8:], capsys)
    assert status == 2 and f"{parts} holds an unfinished run" in error
    assert 'chunk_documents' in error

    calls = []
    encode = module.encode_documents
    monkeypatch.setattr(module, 'encode_documents', lambda chunk: calls.append(1) or encode(chunk))
    assert call_main(module, args, capsys) == (0, None)
    num_chunks = -(-len(texts) // CHUNK)
    assert len(calls) == num_chunks - 3  # the three committed chunks were not tokenized again
    assert read_outputs(out_dir) == read_outputs(uninterrupted[0])
    assert not parts.exists()


def test_free_disk_space_is_checked_before_anything_starts(docs, gpt2_ranks_file, tmp_path,
                                                           monkeypatch, capsys):
    folder, texts = docs
    monkeypatch.setenv('GPT2_RANKS_FILE', gpt2_ranks_file)
    module = load_script()
    usage = namedtuple('usage', 'total used free')
    # the token_count column (2 per word here) + one EOT per document, 2 bytes per token, twice
    needed = int(1.01 * 4 * sum(len(t.split()) * 2 + 1 for t in texts))
    for free, ok in ((needed - 1, False), (needed + 1, True)):
        monkeypatch.setattr(module.shutil, 'disk_usage', lambda path: usage(10**12, 0, free))
        out_dir = tmp_path / f'out{free}'
        status, error = call_main(module, ['--files', folder / 'docs.parquet', '--out_dir',
                                           out_dir, '--num_proc', 1, '--val_tokens', VAL_TOKENS,
                                           '--cache_dir', tmp_path / 'c'], capsys)
        if ok:
            assert status == 0, error
        else:
            assert status == 2 and f"{needed / 1e9:.1f} GB free" in error and '--out_dir' in error
            assert not out_dir.exists()


def test_bad_inputs_are_one_line(docs, gpt2_ranks_file, tmp_path):
    folder, _ = docs
    pq.write_table(pa.table({'content': ['a document']}), tmp_path / 'wrong.parquet')
    cases = [  # the first: the default, FineWeb-Edu's sample from the hub, offline
        ([], 'could not load HuggingFaceFW/fineweb-edu (sample-10BT) from the Hugging Face hub'),
        (['--files', tmp_path / 'missing.parquet'], 'no such file'),
        (['--files', tmp_path / 'wrong.parquet'], "need a 'text' column"),
        (['--files', folder / 'docs.parquet', '--val_tokens', 10**6], 'nothing is left to train'),
    ]
    for args, fragment in cases:
        out_dir = tmp_path / 'out'
        result = run_prepare(args + ['--out_dir', out_dir, '--num_proc', 1,
                                     '--cache_dir', tmp_path / 'c'], gpt2_ranks_file, tmp_path)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert lines[0].startswith('error: ') and fragment in lines[0], lines[0]
        assert not (out_dir / 'train.bin').exists() and not (out_dir / 'meta.pkl').exists()
