"""
The token files (train.bin and val.bin, uint16 token ids, and meta.pkl, written by
data/*/prepare.py) and the batches drawn from them: windows of block_size + 1 tokens.

Sequence j of a random stream is the window at an offset hashed from (seed, stream, j)
(window_starts). An iteration takes the next total_bs sequences of the training stream, each
process its share, so a resumed run, or one on any number of processes, sees the same batches.
"""

import os
from dataclasses import dataclass

import numpy as np
import torch

from configurator import UserError

REPO = os.path.dirname(os.path.abspath(__file__))
# independent random streams: training data, each split's evaluation batches, and the optimizer's
# extra passes (Sophia's Hessian pass: its batches' sampled labels)
TRAIN_STREAM, EVAL_STREAMS, HESSIAN_STREAM = 0, {'train': 1, 'val': 3}, 2

def data_dir_of(dataset):
    return dataset if os.sep in dataset else os.path.join(REPO, 'data', dataset)

# datasets whose prepare script lies in another folder of data/, with its arguments
PREPARED_BY = {'fineweb_edu': 'data/fineweb/prepare.py', 'fineweb': 'data/fineweb/prepare.py --corpus=fineweb'}

def available_datasets():
    """The datasets under data/: the folders with a prepare script, and those PREPARED_BY another's."""
    root = os.path.join(REPO, 'data')
    return sorted({name for name in os.listdir(root) if os.path.isfile(os.path.join(root, name, 'prepare.py'))}
                  | set(PREPARED_BY))

def prepare_command(dataset):
    if dataset in PREPARED_BY:
        return f"run: python {PREPARED_BY[dataset]}"
    script = os.path.join(data_dir_of(dataset), 'prepare.py')
    if os.sep in dataset or not os.path.isfile(script):
        return f"prepare the token files in {data_dir_of(dataset)}"
    return f"run: python {os.path.relpath(script)}"

def open_dataset(dataset, block_size, warn=print):
    """Check a dataset's files; return its vocabulary (None without meta.pkl) and token files."""
    data_dir = data_dir_of(dataset)
    if os.sep not in dataset and not os.path.isdir(data_dir) and dataset not in PREPARED_BY:
        raise UserError(f"dataset {dataset!r} does not exist: data/ has {', '.join(available_datasets())} "
                        f"(each made by its prepare.py), or give the path of a folder holding train.bin and val.bin")
    paths = {split: os.path.join(data_dir, f'{split}.bin') for split in ('train', 'val')}
    for path in paths.values():
        if not os.path.exists(path) or os.path.getsize(path) == 0:
            raise UserError(f"{path} is missing or empty; {prepare_command(dataset)}")
        tokens = os.path.getsize(path) // 2
        if os.path.getsize(path) % 2 or tokens <= block_size:
            raise UserError(f"{path} holds {tokens} tokens, too few for block_size={block_size} "
                            f"(or is not a uint16 token file); {prepare_command(dataset)}")
    vocab_size = None
    meta_path = os.path.join(data_dir, 'meta.pkl')
    if os.path.exists(meta_path):
        import pickle
        try:
            with open(meta_path, 'rb') as f:
                meta = pickle.load(f)
            vocab_size = meta['vocab_size']
        except Exception as e:  # truncated, not a pickle, or another file under that name
            raise UserError(f"{meta_path} cannot be read ({type(e).__name__}: {e}); "
                            f"{prepare_command(dataset)}")
        if type(vocab_size) is not int or vocab_size <= 0:
            raise UserError(f"{meta_path} gives vocab_size={vocab_size!r}, not a positive integer; "
                            f"{prepare_command(dataset)}")
        check_token_files(meta, meta_path, paths, dataset, warn)
    return vocab_size, paths

def check_token_files(meta, meta_path, paths, dataset, warn):
    """The token files must have the dtype and token counts meta.pkl records (an int32 train.bin
    would train on ids with zeros between them); an older meta.pkl without them gets a warning."""
    if 'dtype' not in meta:
        warn(f"warning: {meta_path} records no dtype or token counts (prepared before they were): "
             f"the token files are read as uint16 unchecked; {prepare_command(dataset)} to record "
             f"them")
        return
    if meta['dtype'] != 'uint16':
        raise UserError(f"{meta_path} records dtype {meta['dtype']!r} but the loader reads uint16 "
                        f"token files; {prepare_command(dataset)}")
    for split, path in paths.items():
        recorded = meta.get(f'{split}_tokens')
        if recorded is not None and os.path.getsize(path) != 2 * recorded:
            raise UserError(f"{path} holds {os.path.getsize(path):,} bytes but {meta_path} records "
                            f"{recorded:,} uint16 tokens ({2 * recorded:,} bytes): a token file of "
                            f"another dtype or dataset, or cut short; {prepare_command(dataset)}")

def model_vocab_size(dataset_vocab):
    """The model's vocabulary for a dataset's (None: no meta.pkl, GPT-2 BPE's 50257). A large one is
    padded to a multiple of 64 (50257 to 50304, as the official runs and nanoGPT) for faster GPU
    matmuls; a small (character) one is kept, where padding would buy nothing."""
    vocab = 50257 if dataset_vocab is None else dataset_vocab
    return -(-vocab // 64) * 64 if vocab >= 1024 else vocab

def check_token_ids(paths, vocab_size, dataset):
    """Token ids beyond the model's vocabulary mean data prepared for another one: checked on the
    first 16M tokens of each file (a full scan takes minutes); get_batch checks every batch."""
    for path in paths.values():
        largest = int(np.memmap(path, dtype=np.uint16, mode='r')[:1 << 24].max())
        if largest >= vocab_size:
            raise token_id_error(path, largest, vocab_size, dataset)

def token_id_error(path, largest, vocab_size, dataset):
    return UserError(f"{path} holds token id {largest} >= the model's vocab_size {vocab_size}; "
                     f"the data was prepared for another vocabulary: {prepare_command(dataset)}")

GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64's counter step: 2**64 / the golden ratio

def window_starts(seed, stream, first, count, windows):
    """Offsets of sequences first .. first+count-1 of a random stream, uniform in range(windows):
    SplitMix64's output function (Steele, Lea, Flood 2014) over a counter keyed by the seed and
    stream, vectorised. The modulo's bias is below windows / 2**64."""
    key = np.random.SeedSequence((seed, stream)).generate_state(1, np.uint64)[0]
    x = key + (np.arange(first, first + count, dtype=np.uint64) + np.uint64(1)) * GOLDEN_GAMMA
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return (x % np.uint64(windows)).astype(np.int64)

@dataclass
class TokenFiles:
    """A dataset's token files as micro-batches of the model: what get_batch draws from."""
    paths: dict  # train.bin and val.bin by split
    dataset: str  # the config's name for the dataset, for messages
    vocab_size: int  # the model's: a larger id means the data was prepared for another vocabulary
    batch_size: int  # sequences per micro-batch
    block_size: int  # tokens per sequence
    device: str

def get_batch(data, split, seed, stream, first):
    """Sequences first .. first+batch_size-1 of a random stream of one split: inputs and targets."""
    # recreate the memmap every batch: a long-lived np.memmap holds on to the pages it touched
    tokens = np.memmap(data.paths[split], dtype=np.uint16, mode='r')
    ix = window_starts(seed, stream, first, data.batch_size, len(tokens) - data.block_size)
    xy = np.stack([tokens[i:i + 1 + data.block_size] for i in ix]).astype(np.int64)  # (B, T+1)
    if xy.max() >= data.vocab_size:  # on the host, before the copy: costs no device sync
        raise token_id_error(data.paths[split], xy.max(), data.vocab_size, data.dataset)
    xy, cuda = torch.from_numpy(xy), data.device.startswith('cuda')  # async copy from pinned memory
    xy = (xy.pin_memory() if cuda else xy).to(data.device, non_blocking=cuda)
    return xy[:, :-1], xy[:, 1:]

def seed_of(*key):
    """A 63-bit seed from a tuple of integers, for torch generators."""
    return int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0] >> 1)
