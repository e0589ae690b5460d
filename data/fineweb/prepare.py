"""
FineWeb-Edu or FineWeb, the 10B-token samples (config sample-10BT) that llm.c and build-nanogpt
train GPT-2 124M on, tokenized with GPT-2 BPE into this repository's token files: train.bin and
val.bin (np.uint16 token ids, <|endoftext|> = 50256 *before* each document, as llm.c and
build-nanogpt write them) and meta.pkl (vocab_size, tokenizer, dtype, the token count of each
split and what was tokenized).

    $ python data/fineweb/prepare.py                     # FineWeb-Edu -> data/fineweb_edu
    $ python data/fineweb/prepare.py --corpus=fineweb    # FineWeb     -> data/fineweb
    $ python train_sophiag.py config/train_gpt2_small_fineweb_sophiag.py

The validation split is llm.c's and build-nanogpt's: they write the token stream (the documents in
the dataset's own order) in shards of 100,000,000 tokens and hold out the first shard, so val.bin
is the first 100,000,000 tokens of the stream and train.bin the rest; the document that straddles
the boundary is cut there, as in their shards.

A 10B-token run is about 2 CPU-hours of tokenizing (~45 GB of text at ~4.5 bytes per token;
tiktoken encodes ~6 MB/s per core) after the download, and it survives an interruption: the
documents are tokenized in chunks of --chunk_documents by --num_proc worker processes, and each
chunk is written to <out_dir>/parts.tmp/ under a temporary name, synced, and renamed: a chunk under
its final name is done. Run the same command again and it tokenizes only the chunks not yet done
(parts.tmp/plan.json records the input, its document count and the chunk size; another input is
refused). When every chunk is done they are joined into val.bin and train.bin, meta.pkl is written
last, and parts.tmp/ is deleted. The token files take 2 bytes per token twice over while they are
joined (~40 GB for 10B tokens): the free space of out_dir's disk is checked before anything
starts, from FineWeb's token_count column (GPT-2 tokens per document).
The Hugging Face cache (--cache_dir, or HF_HOME) holds the downloaded sample besides.

Offline: set GPT2_RANKS_FILE (see tokenizer.py) and pass --files with local .parquet or .jsonl
files in the dataset's schema (a "text" column; FineWeb's others are kept out of the tokens).
"""

import argparse
import json
import os
import pickle
import shutil
import sys
from multiprocessing import Pool

# the tokenizer lives at the repository root, two folders up; this script runs standalone
DATA_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(DATA_DIR))

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from tokenizer import GPT2_EOT_TOKEN, GPT2_VOCAB_SIZE, gpt2_encoding  # noqa: E402

# --corpus: the hub dataset, and the folder under data/ its token files go to by default
CORPORA = {'fineweb-edu': ('HuggingFaceFW/fineweb-edu', 'fineweb_edu'),
           'fineweb': ('HuggingFaceFW/fineweb', 'fineweb')}
SAMPLE = 'sample-10BT'  # ~10B GPT-2 tokens: llm.c's and build-nanogpt's GPT-2 124M runs
VAL_TOKENS = 100_000_000  # llm.c's and build-nanogpt's shard size; their first shard is val
PARTS = 'parts.tmp'  # the chunks of an unfinished run (and any a kill cut short); git ignores *.tmp


class PrepareError(Exception):
    """A mistake the user can fix; the message is one line that says how."""


def load_documents(args):
    """The documents as a datasets.Dataset: --files, or the corpus's sample from the hub."""
    import datasets  # imported here: `--help` stays instant

    if args.files:
        missing = [f for f in args.files if not os.path.isfile(f)]
        if missing:
            raise PrepareError(f"--files: no such file {missing[0]}")
        builders = {'.parquet': 'parquet', '.json': 'json', '.jsonl': 'json'}
        kinds = {builders.get(os.path.splitext(f)[1].lower()) for f in args.files}
        if len(kinds) != 1 or None in kinds:
            raise PrepareError("--files must be all .parquet or all .json/.jsonl")
        # the same loader as the hub's: both give a memory-mapped Arrow table
        dataset = datasets.load_dataset(kinds.pop(), data_files=args.files, split='train',
                                        cache_dir=args.cache_dir)
    else:
        hub = CORPORA[args.corpus][0]
        try:
            dataset = datasets.load_dataset(hub, name=SAMPLE, split='train',
                                            cache_dir=args.cache_dir, num_proc=args.num_proc)
        except Exception as e:  # no network, no such dataset, hub errors: whatever datasets raises
            reason = ' '.join(str(e).split())[:300]
            raise PrepareError(f"could not load {hub} ({SAMPLE}) from the Hugging Face hub "
                               f"({type(e).__name__}: {reason}); pass --files with local copies")
    if 'text' not in dataset.column_names:
        raise PrepareError(f"the documents need a 'text' column, found {dataset.column_names}")
    if len(dataset) == 0:
        raise PrepareError("the input holds no documents")
    return dataset


def plan_of(args, dataset):
    """What the chunks of a run are made of; a resumed run must have the same."""
    if args.files:
        source = {'files': [[os.path.basename(f), os.path.getsize(f)] for f in args.files]}
    else:
        source = {'hub': CORPORA[args.corpus][0], 'name': SAMPLE}
    return {'source': source, 'documents': len(dataset), 'chunk_documents': args.chunk_documents}


def estimated_tokens(dataset):
    """Tokens of the whole stream: FineWeb's token_count (GPT-2 tokens per document) plus one
    <|endoftext|> per document; without that column, one token per UTF-8 byte (an upper bound:
    every GPT-2 token covers at least one byte)."""
    import pyarrow.compute as pc

    table = dataset.data  # the Arrow table; a freshly loaded dataset has no index mapping
    if 'token_count' in dataset.column_names:
        return int(pc.sum(table.column('token_count')).as_py()) + len(dataset)
    return int(pc.sum(pc.binary_length(table.column('text'))).as_py()) + len(dataset)


def check_disk(out_dir, needed_bytes):
    """Refuse to start a run that cannot finish for lack of space on out_dir's disk."""
    existing = out_dir
    while not os.path.exists(existing):  # out_dir may not exist yet: ask its nearest ancestor
        existing = os.path.dirname(existing) or '.'
    free = shutil.disk_usage(existing).free
    if free < needed_bytes:
        raise PrepareError(f"{out_dir} needs {needed_bytes / 1e9:.1f} GB free for the token files "
                           f"but its disk has {free / 1e9:.1f} GB; free some space or pass "
                           f"--out_dir on a larger disk")


def chunk_path(parts_dir, index):
    return os.path.join(parts_dir, f'{index:06d}.bin')


def write_synced(path, write):
    """write(f) into a temporary file, fsync it, then rename it to path: a crash at any moment
    leaves either no file at path or the whole one."""
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'wb') as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def encode_documents(texts):
    """GPT-2 token ids of texts: <|endoftext|> before each document, as llm.c and build-nanogpt
    (encode_ordinary: a literal '<|endoftext|>' in a document is text, not the special token)."""
    enc = gpt2_encoding()  # built once per process, then cached by tokenizer.py
    pieces = []
    for text in texts:
        pieces.append(np.array([GPT2_EOT_TOKEN] + enc.encode_ordinary(text), dtype=np.uint16))
    return np.concatenate(pieces)


_worker = {}  # set in each worker process by start_worker: the documents and where chunks go


def start_worker(texts, parts_dir, chunk_documents):
    _worker.update(texts=texts, parts_dir=parts_dir, chunk_documents=chunk_documents)


def tokenize_chunk(index):
    """Tokenize chunk `index` of the documents and commit it; returns (documents, tokens)."""
    size = _worker['chunk_documents']
    texts = _worker['texts'][index * size:(index + 1) * size]['text']
    tokens = encode_documents(texts)
    write_synced(chunk_path(_worker['parts_dir'], index), tokens.tofile)
    return len(texts), len(tokens)


def tokenize(dataset, parts_dir, todo, num_proc, chunk_documents, documents_done):
    """Tokenize the chunks in todo, num_proc at a time, in any order (each is its own file)."""
    texts = dataset.select_columns(['text'])
    bar = tqdm(total=len(dataset), initial=documents_done, unit='doc', desc='tokenizing')
    tokens = 0
    if num_proc == 1:  # no pool: simpler to debug, and a test can plant a fault in this process
        start_worker(texts, parts_dir, chunk_documents)
        results = map(tokenize_chunk, todo)
        pool = None
    else:
        pool = Pool(num_proc, initializer=start_worker,
                    initargs=(texts, parts_dir, chunk_documents))
        results = pool.imap_unordered(tokenize_chunk, todo)
    try:
        for documents, count in results:
            tokens += count
            bar.update(documents)
            bar.set_postfix(tokens=f'{tokens:,}')
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()  # on an exception too: no worker outlives the run
            pool.join()


def join_chunks(parts_dir, num_chunks, out_dir, val_tokens):
    """val.bin: the first val_tokens tokens of the chunks in order; train.bin: the rest.
    Returns (train tokens, val tokens)."""
    paths = [chunk_path(parts_dir, i) for i in range(num_chunks)]
    total = sum(os.path.getsize(p) for p in paths) // 2
    if total <= val_tokens:
        raise PrepareError(f"the documents hold {total:,} tokens, no more than "
                           f"--val_tokens={val_tokens:,}: nothing is left to train on; lower "
                           f"--val_tokens (this run's chunks are kept in {parts_dir})")
    val_path, train_path = (os.path.join(out_dir, f'{s}.bin') for s in ('val', 'train'))
    bar = tqdm(total=total, unit='tok', unit_scale=True, desc='joining')
    # each file under a temporary name until every token is in it (git ignores data/*/*.tmp)
    with open(val_path + '.tmp', 'wb') as val, open(train_path + '.tmp', 'wb') as train:
        written = 0
        for path in paths:
            tokens = np.fromfile(path, dtype=np.uint16)
            head = max(0, min(len(tokens), val_tokens - written))  # what still belongs to val
            val.write(tokens[:head].tobytes())
            train.write(tokens[head:].tobytes())
            written += len(tokens)
            bar.update(len(tokens))
        for f in (val, train):
            f.flush()
            os.fsync(f.fileno())
    bar.close()
    os.replace(val_path + '.tmp', val_path)
    os.replace(train_path + '.tmp', train_path)
    return total - val_tokens, val_tokens


def prepare(args):
    for key in ('num_proc', 'chunk_documents', 'val_tokens'):
        if getattr(args, key) < 1:
            raise PrepareError(f"--{key} must be >= 1, got {getattr(args, key)}")
    out_dir = os.path.abspath(args.out_dir or os.path.join(DATA_DIR, CORPORA[args.corpus][1]))
    try:
        assert gpt2_encoding().max_token_value < 2**16, "GPT-2 token ids must fit in uint16"
    except (ValueError, OSError, RuntimeError) as e:  # no ranks offline, a bad ranks file
        raise PrepareError(str(e))
    dataset = load_documents(args)
    plan = plan_of(args, dataset)
    parts_dir = os.path.join(out_dir, PARTS)
    num_chunks = -(-len(dataset) // args.chunk_documents)

    meta_path = os.path.join(out_dir, 'meta.pkl')
    if os.path.exists(meta_path):  # a finished run: the same one is done, another is refused
        with open(meta_path, 'rb') as f:
            meta = pickle.load(f)
        same = {k: meta.get(k) for k in ('source', 'documents')} == \
            {k: plan[k] for k in ('source', 'documents')}
        if not same or meta.get('val_tokens') != args.val_tokens:
            raise PrepareError(f"{out_dir} already holds token files of another input or split "
                               f"(meta.pkl); pass another --out_dir, or delete them first")
        shutil.rmtree(parts_dir, ignore_errors=True)  # a run killed while it cleaned up
        print(f"{out_dir} is already prepared: train {meta['train_tokens']:,} tokens, "
              f"val {meta['val_tokens']:,}")
        return

    plan_path = os.path.join(parts_dir, 'plan.json')
    if os.path.exists(plan_path):
        with open(plan_path) as f:
            saved = json.load(f)
        if saved != plan:
            changed = ', '.join(k for k in plan if saved.get(k) != plan[k])
            raise PrepareError(f"{parts_dir} holds an unfinished run of another input (its "
                               f"{changed} differ); rerun it with its own arguments, or delete "
                               f"{parts_dir} to start over")
    done = [i for i in range(num_chunks) if os.path.exists(chunk_path(parts_dir, i))]
    done_bytes = sum(os.path.getsize(chunk_path(parts_dir, i)) for i in done)
    # the chunks, then the joined copy of them; a 1% margin over FineWeb's own token counts
    check_disk(out_dir, int(1.01 * 2 * 2 * estimated_tokens(dataset)) - done_bytes)

    os.makedirs(parts_dir, exist_ok=True)
    if not os.path.exists(plan_path):
        write_synced(plan_path, lambda f: f.write(json.dumps(plan, indent=1).encode()))
    todo = sorted(set(range(num_chunks)) - set(done))
    if done:
        print(f"resuming: {len(done)} of {num_chunks} chunks are done in {parts_dir}")
    documents_done = sum(min(args.chunk_documents, len(dataset) - i * args.chunk_documents)
                         for i in done)  # the last chunk may be short
    tokenize(dataset, parts_dir, todo, args.num_proc, args.chunk_documents, documents_done)

    train_tokens, val_tokens = join_chunks(parts_dir, num_chunks, out_dir, args.val_tokens)
    meta = {'vocab_size': GPT2_VOCAB_SIZE, 'tokenizer': 'gpt2', 'dtype': 'uint16',
            'train_tokens': train_tokens, 'val_tokens': val_tokens,
            'source': plan['source'], 'documents': plan['documents'],
            'val_split': f'the first {val_tokens:,} tokens of the stream (llm.c, build-nanogpt)'}
    write_synced(meta_path, lambda f: pickle.dump(meta, f))  # last: the run is complete
    shutil.rmtree(parts_dir)
    print(f"{len(dataset):,} documents: train {train_tokens:,} tokens, val {val_tokens:,} "
          f"tokens, in {out_dir}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--corpus', choices=sorted(CORPORA), default='fineweb-edu',
                        help=f"which {SAMPLE} to download from the hub (default: fineweb-edu)")
    parser.add_argument('--files', nargs='+',
                        help="local .parquet or .jsonl files in the dataset's schema instead")
    parser.add_argument('--out_dir', default=None,
                        help="where train.bin, val.bin and meta.pkl go "
                             "(default: data/fineweb_edu or data/fineweb)")
    parser.add_argument('--cache_dir', default=None,
                        help="datasets cache (default: HF_HOME's or HF_DATASETS_CACHE's)")
    parser.add_argument('--num_proc', type=int, default=max(1, (os.cpu_count() or 2) // 2),
                        help="tokenizer processes (default: half the CPU cores)")
    parser.add_argument('--chunk_documents', type=int, default=10_000,
                        help="documents per chunk, the unit of work a resumed run keeps "
                             "(default 10,000: about 10M tokens, 20 MB)")
    parser.add_argument('--val_tokens', type=int, default=VAL_TOKENS,
                        help="tokens at the start of the stream that form val.bin "
                             "(default 100,000,000: llm.c's and build-nanogpt's first shard)")
    args = parser.parse_args(argv)
    try:
        prepare(args)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    main()
