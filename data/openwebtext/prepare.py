"""
OpenWebText (or any text corpus) tokenized with GPT-2 BPE into flat uint16 token files.
Writes train.bin, val.bin (np.uint16 token ids, each document followed by <|endoftext|> = 50256)
and meta.pkl ({'vocab_size': 50257, 'tokenizer': 'gpt2'}) into --out_dir.

Full OpenWebText: 8,013,769 documents, about 40 GB of text; the Hugging Face cache (HF_HOME or
HF_DATASETS_CACHE, or --cache_dir) needs ~55 GB. tiktoken encodes about 6 MB/s on one core
(measured on Python source on a 2-core CPU), so tokenizing is ~2 CPU-hours: count 15-30 minutes
with --num_proc 8. Expected: train 9,035,582,198 tokens (~17 GB), val 4,434,897 (~8.5 MB).

Offline: set GPT2_RANKS_FILE (see tokenizer.py) and pass --files with local .txt (one document
per file), .json/.jsonl (one document per record, field "text") or .parquet (column "text").
"""

import argparse
import os
import pickle
import sys

# the tokenizer lives at the repository root, two folders up; this script runs standalone
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np
from tqdm import tqdm

from tokenizer import GPT2_VOCAB_SIZE, gpt2_encoding

OPENWEBTEXT_DOCUMENTS = 8_013_769  # the full corpus; fewer means a partial copy
SPLIT_SEED = 2357  # nanoGPT's seed for the train/val split; keeps val.bin comparable across projects
WRITE_SHARDS = 1024  # the tokenized split is copied into the memmap in this many contiguous pieces


def load_documents(args):
    """A datasets.Dataset with a 'text' column: local --files, or --dataset from the hub."""
    import datasets  # imported here: `--help` stays instant

    if args.files:
        missing = [f for f in args.files if not os.path.isfile(f)]
        if missing:
            sys.exit(f"error: --files: no such file {missing[0]}")
        extensions = {os.path.splitext(f)[1].lower() for f in args.files}
        builders = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
        if len(extensions) != 1 or not extensions <= builders.keys():
            sys.exit(f"error: --files must be all .txt, all .json/.jsonl or all .parquet, "
                     f"got {sorted(extensions)}")
        builder = builders[extensions.pop()]
        # a .txt file is one document (as in the original OpenWebText archive), not one per line
        options = {"sample_by": "document"} if builder == "text" else {}
        dataset = datasets.load_dataset(builder, data_files=args.files, cache_dir=args.cache_dir, **options)
    else:
        try:
            try:
                dataset = datasets.load_dataset(args.dataset, cache_dir=args.cache_dir, num_proc=args.num_proc)
            except RuntimeError as e:
                if "Dataset scripts are no longer supported" not in str(e):
                    raise
                # datasets >= 4 no longer runs loading scripts (openwebtext.py was one); the hub
                # keeps an automatic Parquet export of such datasets on this branch
                print(f"{args.dataset} has a loading script, which datasets >= 4 does not run; "
                      "using the hub's Parquet export (revision refs/convert/parquet)")
                dataset = datasets.load_dataset(args.dataset, revision="refs/convert/parquet",
                                                cache_dir=args.cache_dir, num_proc=args.num_proc)
        except (ConnectionError, datasets.exceptions.DatasetNotFoundError) as e:
            sys.exit(f"error: could not load {args.dataset} from the Hugging Face hub ({e}); "
                     "pass --files with local copies instead")
    if list(dataset) != ["train"]:
        sys.exit(f"error: expected one 'train' split, got {list(dataset)}")
    dataset = dataset["train"]
    if "text" not in dataset.column_names:
        sys.exit(f"error: the documents need a 'text' field, found {dataset.column_names}")
    return dataset


def write_split(dset, path):
    """Concatenate the 'ids' of every row of dset into a uint16 file at path; returns the token count."""
    # [:] reads the whole column at once; np.sum over the lazy Column object of datasets >= 4
    # would visit the rows one by one (minutes for 8M documents)
    total = int(np.sum(dset.with_format("numpy")["len"][:], dtype=np.uint64))
    # write under a temporary name, renamed only once every token is in place: an interrupted
    # run leaves no train.bin that looks complete
    tmp_path = path + ".tmp"
    arr = np.memmap(tmp_path, dtype=np.uint16, mode="w+", shape=(total,))
    try:
        # contiguous shards keep document order and bound memory: one shard is in RAM at a time
        num_shards = min(WRITE_SHARDS, len(dset))
        idx = 0
        for shard_idx in tqdm(range(num_shards), desc=f"writing {os.path.basename(path)}"):
            shard = dset.shard(num_shards=num_shards, index=shard_idx, contiguous=True).with_format("numpy")
            ids = np.concatenate(shard[:]["ids"])
            arr[idx : idx + len(ids)] = ids
            idx += len(ids)
        assert idx == total, f"wrote {idx} tokens, expected {total}"
        arr.flush()
    except BaseException:
        del arr
        os.remove(tmp_path)
        raise
    del arr  # close the memmap before the rename
    os.replace(tmp_path, path)
    return total


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="openwebtext",
                        help="Hugging Face hub dataset name (default: openwebtext, i.e. Skylion007/openwebtext)")
    parser.add_argument("--files", nargs="+", help="local .txt/.json/.jsonl/.parquet files instead of --dataset")
    parser.add_argument("--out_dir", default=os.path.dirname(os.path.abspath(__file__)),
                        help="where train.bin, val.bin and meta.pkl go (default: this script's folder)")
    parser.add_argument("--cache_dir", default=None,
                        help="datasets cache (default: the Hugging Face default, HF_HOME or HF_DATASETS_CACHE)")
    parser.add_argument("--num_proc", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                        help="tokenizer processes (default: half the CPU cores)")
    parser.add_argument("--test_size", type=float, default=0.0005,
                        help="fraction of documents for val (default 0.0005: ~4,000 OpenWebText documents)")
    args = parser.parse_args(argv)
    if args.num_proc < 1:
        sys.exit(f"error: --num_proc must be >= 1, got {args.num_proc}")
    if not 0 < args.test_size < 1:
        sys.exit(f"error: --test_size must be between 0 and 1, got {args.test_size}")
    try:
        enc = gpt2_encoding()
    except (ValueError, OSError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    assert enc.max_token_value < 2**16, "token ids must fit in uint16"

    dataset = load_documents(args)
    print(f"{len(dataset):,} documents")
    if not args.files and args.dataset.endswith("openwebtext") and len(dataset) != OPENWEBTEXT_DOCUMENTS:
        print(f"warning: OpenWebText has {OPENWEBTEXT_DOCUMENTS:,} documents, this copy {len(dataset):,}: "
              "token counts will differ from the published ones")
    if len(dataset) < 2:
        sys.exit("error: need at least 2 documents to split into train and val")

    # OpenWebText has only a train split: hold out a small random val split, as nanoGPT does
    split_dataset = dataset.train_test_split(test_size=args.test_size, seed=SPLIT_SEED, shuffle=True)
    split_dataset["val"] = split_dataset.pop("test")

    def process(batch):
        # encode_ordinary ignores special tokens in the text; then one EOT closes each document.
        # uint16 arrays: the tokenized cache datasets writes is 4x smaller than with int64 lists
        ids = [np.array(enc.encode_ordinary(text) + [enc.eot_token], dtype=np.uint16) for text in batch["text"]]
        return {"ids": ids, "len": [len(x) for x in ids]}

    tokenized = split_dataset.map(process, batched=True, remove_columns=split_dataset["train"].column_names,
                                  desc="tokenizing", num_proc=args.num_proc)

    os.makedirs(args.out_dir, exist_ok=True)
    counts = {split: write_split(dset, os.path.join(args.out_dir, f"{split}.bin"))
              for split, dset in tokenized.items()}
    meta_path = os.path.join(args.out_dir, "meta.pkl")
    with open(meta_path + ".tmp", "wb") as f:
        # the dtype and each split's token count: the trainer checks the token files against them
        pickle.dump({"vocab_size": GPT2_VOCAB_SIZE, "tokenizer": "gpt2", "dtype": "uint16",
                     **{f"{split}_tokens": count for split, count in counts.items()}}, f)
    os.replace(meta_path + ".tmp", meta_path)
    for split, count in counts.items():
        print(f"{split} has {count:,} tokens ({len(tokenized[split]):,} documents)")
    # to read the bins later: m = np.memmap('train.bin', dtype=np.uint16, mode='r')


if __name__ == "__main__":
    main()
