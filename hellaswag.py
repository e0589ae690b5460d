"""
HellaSwag accuracy of a model: a checkpoint of this repository, an exported Hugging Face folder,
or OpenAI's GPT-2.

    $ python hellaswag.py --out_dir=out-gpt2-small-fineweb-sophiag   # its best checkpoint
    $ python hellaswag.py --init_from=gpt2 --device=cuda               # OpenAI's GPT-2 124M
    $ python hellaswag.py --init_from=hf-gpt2-small                    # a folder of export_hf.py

The items: the 10,042 of rowanz/hellaswag's validation set (hellaswag_val.jsonl: a context `ctx`,
four `endings`, the right one's index `label`), downloaded from GitHub on first use and kept in
~/.cache/sophia-gpt2/ (or --data_file=PATH). Each is scored as llm.c and build-nanogpt score it,
as a completion: context + " " + ending in GPT-2 BPE, and the cross-entropy of the ending's tokens
only; acc_norm takes the ending with the lowest mean (length-normalised), acc the lowest sum.
Chance is 25%. Published with this scoring: OpenAI's GPT-2 124M acc 28.59%, acc_norm 29.55%
(build-nanogpt's hellaswag.py), llm.c's GPT-2 124M on 10B FineWeb tokens about 29.9% acc_norm.
A context longer than the model's block_size loses its first tokens (GPT-2's 1024 holds them all).

The four endings of an item are one batch of four rows, padded at the end: the model is causal, so
the padding changes nothing before it, and it is masked out of the loss. The training loop calls
the same functions: load_items once, then score_items on each process's share of the items, and
sums the counts over the processes.
"""

import json
import os
import shutil
import sys
import urllib.request

import torch
import torch.nn.functional as F

import checkpoint
from configurator import (PRETRAINED, ConfigError, UserError, describe_defaults, format_help, parse_args,
                          wants_help)
from tokenizer import GPT2_VOCAB_SIZE, gpt2_encoding

HELLASWAG_URL = 'https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl'
HELLASWAG_ITEMS = 10042  # the validation set; a download with fewer lines was cut short


class HellaSwagError(UserError):
    """A mistake the user can fix (the items, the model); the message is one line."""


def hellaswag_defaults():
    """The keys of hellaswag.py; the comment beside each is what --help says of it."""
    # the model
    init_from = 'resume'  # 'resume' (out_dir's checkpoint), 'gpt2'..., a Hugging Face folder, a .pt
    out_dir = 'out-gpt2-small-fineweb-sophiag'  # where the checkpoint is, with init_from='resume'
    which = 'best'  # 'best' (lowest val loss) or 'latest' checkpoint in out_dir
    # the items
    data_file = ''  # hellaswag_val.jsonl; '' = the copy downloaded once into ~/.cache/sophia-gpt2/
    max_items = 0  # score the first max_items items only, for a quick look; 0 = all 10,042
    # system
    device = 'cpu'  # 'cpu', 'cuda', 'cuda:N' or 'mps'
    dtype = 'float32'  # 'float32', 'bfloat16' or 'float16' (autocast; the loss is taken in float32)
    return dict(locals())

# -----------------------------------------------------------------------------
# the items

def default_data_file():
    cache = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(cache, 'sophia-gpt2', 'hellaswag_val.jsonl')


def parse_items(path):
    """The items of a file in hellaswag_val.jsonl's format: dicts with ctx, endings, label."""
    items = []
    with open(path, encoding='utf-8') as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                ok = (isinstance(item['ctx'], str) and item['ctx'] != ''
                      and isinstance(item['endings'], list) and len(item['endings']) == 4
                      and all(isinstance(e, str) for e in item['endings'])
                      and item['label'] in (0, 1, 2, 3))
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                raise HellaSwagError(f"{path}:{number} is not a HellaSwag item (a JSON object with "
                                     f"ctx, 4 endings and label 0-3); get hellaswag_val.jsonl "
                                     f"from {HELLASWAG_URL}")
            items.append({key: item[key] for key in ('ctx', 'endings', 'label')})
    if not items:
        raise HellaSwagError(f"{path} holds no HellaSwag items; get it from {HELLASWAG_URL}")
    return items


def download(path):
    """hellaswag_val.jsonl from GitHub to path; checked whole before it takes the name, so
    processes downloading at once, or a cut connection, never leave half a file there."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f'{path}.tmp{os.getpid()}'
    print(f"downloading {HELLASWAG_URL} to {path}")
    try:
        with urllib.request.urlopen(HELLASWAG_URL, timeout=60) as response, open(tmp, 'wb') as f:
            shutil.copyfileobj(response, f)
        try:
            count = len(parse_items(tmp))
        except HellaSwagError:  # a line cut in two
            count = 0
        if count != HELLASWAG_ITEMS:
            raise HellaSwagError(f"the download of {HELLASWAG_URL} is incomplete ({count} "
                                 f"whole items of {HELLASWAG_ITEMS}); run again, or put the file "
                                 f"at {path}")
        os.replace(tmp, path)
    except OSError as e:  # no network (urllib's URLError is an OSError), a full disk
        raise HellaSwagError(f"cannot download {HELLASWAG_URL} ({getattr(e, 'reason', e)}); "
                             f"without network, put hellaswag_val.jsonl at {path} "
                             f"(or pass --data_file=PATH)") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_items(data_file=''):
    """The HellaSwag items of data_file, or of the cached download ('': downloaded if missing)."""
    if data_file:
        if not os.path.isfile(data_file):
            raise HellaSwagError(f"data_file={data_file!r} does not exist; get hellaswag_val.jsonl "
                                 f"from {HELLASWAG_URL}, or pass --data_file='' to download it")
        return parse_items(data_file)
    path = default_data_file()
    if not os.path.exists(path):
        download(path)
    return parse_items(path)

def items_for_training(data_file, max_items, vocab_size):
    """The items the training loop scores at every evaluation (hellaswag=True), checked before the
    run starts: a GPT-2 BPE model, the items (downloaded where missing: every process reads the same
    file) and the GPT-2 BPE ranks to render them with."""
    if vocab_size < GPT2_VOCAB_SIZE:
        raise HellaSwagError(f"hellaswag=True needs a model of GPT-2 BPE (this one's vocabulary has "
                             f"{vocab_size} tokens); train on a GPT-2 BPE dataset or drop --hellaswag")
    items = load_items(data_file)
    try:
        gpt2_encoding()
    except (RuntimeError, OSError) as e:  # no ranks: offline, or GPT2_RANKS_FILE unreadable
        raise HellaSwagError(' '.join(str(e).split())) from None
    return items[:max_items] if max_items > 0 else items

# -----------------------------------------------------------------------------
# scoring

def render_item(item, encode, block_size):
    """tokens (4, T): the context and each ending, a row per ending, padded with 0 at the end;
    mask (4, T): True at the ending's tokens, the ones scored."""
    context = encode(item['ctx'])
    rows, masks = [], []
    for ending in item['endings']:
        ending_tokens = encode(' ' + ending)  # GPT-2 BPE keeps a word's leading space in its token
        if len(ending_tokens) >= block_size:
            raise HellaSwagError(f"an ending of {len(ending_tokens)} tokens does not fit the "
                                 f"model's block_size {block_size} after a context token")
        row = (context + ending_tokens)[-block_size:]  # a too long context loses its first tokens
        rows.append(row)
        masks.append([False] * (len(row) - len(ending_tokens)) + [True] * len(ending_tokens))
    width = max(len(row) for row in rows)
    tokens = torch.zeros((4, width), dtype=torch.long)
    mask = torch.zeros((4, width), dtype=torch.bool)
    for i, (row, row_mask) in enumerate(zip(rows, masks)):
        tokens[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = torch.tensor(row_mask)
    return tokens, mask


@torch.no_grad()
def ending_losses(model, tokens, mask):
    """(sum, mean) of the cross-entropy of each row's ending tokens, each of shape (4,)."""
    logits, _ = model(tokens, all_logits=True)  # (4, T, vocab_size)
    # the logits at position t predict token t+1; float32 whatever autocast computed them in
    logits = logits[:, :-1].reshape(-1, logits.size(-1)).float()  # (4 * (T-1), vocab_size)
    losses = F.cross_entropy(logits, tokens[:, 1:].reshape(-1), reduction='none')
    losses = losses.view(tokens.size(0), -1)  # (4, T-1)
    scored = mask[:, 1:]
    total = (losses * scored).sum(dim=1)
    return total, total / scored.sum(dim=1)


def choose(model, item, encode, device):
    """The endings the model picks for one item: (by the lowest sum, by the lowest mean)."""
    tokens, mask = render_item(item, encode, model.config.block_size)
    total, mean = ending_losses(model, tokens.to(device), mask.to(device))
    return int(total.argmin()), int(mean.argmin())


def score_items(model, items, device, rank=0, world_size=1, progress=False):
    """Score this process's share of the items (rank, rank + world_size, ...) with `model` (a
    GPT of model.py, not a DDP wrapper); returns counts to sum over the processes:
    {'items': scored, 'acc': right by the sum, 'acc_norm': right by the mean}. Run it under the
    caller's autocast; the model is in eval mode while it runs."""
    encode = gpt2_encoding().encode_ordinary
    was_training = model.training
    model.eval()
    counts = {'items': 0, 'acc': 0, 'acc_norm': 0}
    share = items[rank::world_size]
    if progress:
        from tqdm import tqdm
        share = tqdm(share, desc='hellaswag', unit='item')
    for item in share:
        by_sum, by_mean = choose(model, item, encode, device)
        counts['items'] += 1
        counts['acc'] += by_sum == item['label']
        counts['acc_norm'] += by_mean == item['label']
        if progress:
            share.set_postfix(acc_norm=f"{counts['acc_norm'] / counts['items']:.4f}")
    model.train(was_training)
    return counts

# -----------------------------------------------------------------------------
# the script

def load_model(config):
    """The GPT of model.py to score, and a line saying what it is."""
    from model import GPT, GPTConfig
    init_from = config['init_from']
    if init_from in PRETRAINED or os.path.isfile(os.path.join(init_from, 'config.json')):
        try:
            return GPT.from_pretrained(init_from, dict(dropout=0.0)), init_from
        except (OSError, ValueError) as e:  # no network for the hub, not a GPT-2 folder
            raise HellaSwagError(f"init_from={init_from!r}: {' '.join(str(e).split())}") from None
    if init_from == 'resume':
        best = checkpoint.checkpoint_path(config['out_dir'], 'best')
        if config['which'] == 'best' and os.path.exists(best):
            state, path = checkpoint.load_checkpoint(best), best
        else:
            state, path = checkpoint.load_latest(config['out_dir'])
        if state is None:
            raise HellaSwagError(f"no checkpoint in out_dir={config['out_dir']!r}; train first, or "
                                 f"pass --out_dir=... or --init_from=...")
    elif init_from.endswith(('.pt', '.dcp')):
        state, path = checkpoint.load_checkpoint(init_from), init_from
    else:
        raise HellaSwagError(f"init_from={init_from!r}: expected resume, one of "
                             f"{', '.join(PRETRAINED)}, a Hugging Face folder (with config.json) "
                             f"or a checkpoint (.pt, or a sharded run's .dcp)")
    try:
        model = GPT(GPTConfig(**dict(state['model_args'], dropout=0.0)))
        model.load_state_dict(state['model'])
    except (KeyError, TypeError, RuntimeError) as e:
        reason = ' '.join(str(e).split())[:200]
        raise HellaSwagError(f"{path} is not a model checkpoint of this repository "
                             f"({type(e).__name__}: {reason})") from None
    if model.config.vocab_size < GPT2_VOCAB_SIZE:
        raise HellaSwagError(f"{path} has a vocabulary of {model.config.vocab_size} tokens: "
                             f"HellaSwag needs a model trained on GPT-2 BPE")
    return model, f"{path} (iteration {state.get('iter_num')})"


def main(argv):
    if wants_help(argv):
        print(format_help(__doc__, hellaswag_defaults(), describe_defaults(hellaswag_defaults)),
              end='')
        sys.exit(0)
    try:
        config, _ = parse_args(hellaswag_defaults(), argv)
        device, dtype = config['device'], config['dtype']
        if device.startswith('cuda') and not torch.cuda.is_available():
            raise HellaSwagError(f"device={device!r} but CUDA is not available; use --device=cpu")
        if dtype not in ('float32', 'bfloat16', 'float16'):
            raise HellaSwagError(f"dtype={dtype!r}: expected float32, bfloat16 or float16")
        items = load_items(config['data_file'])
        if config['max_items'] > 0:
            items = items[:config['max_items']]
        model, name = load_model(config)
    except (ConfigError, HellaSwagError, checkpoint.CheckpointError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"scoring {name} on {len(items):,} HellaSwag items")
    model.to(device)
    ptdtype = getattr(torch, dtype)
    device_type = 'cuda' if device.startswith('cuda') else device
    with torch.autocast(device_type, dtype=ptdtype, enabled=ptdtype != torch.float32):
        counts = score_items(model, items, device, progress=True)
    n = counts['items']
    print(f"hellaswag: {n} items, acc_norm {counts['acc_norm'] / n:.4f} ({counts['acc_norm']}/{n})"
          f", acc {counts['acc'] / n:.4f} ({counts['acc']}/{n})")


if __name__ == '__main__':
    main(sys.argv[1:])
