"""
Export a run's checkpoint as a Hugging Face transformers GPT-2 folder, to take the model elsewhere.

    $ python export_hf.py out-stdlib-char-sophiag hf-stdlib-char-sophiag
    $ python export_hf.py out-gpt2-small-sophiag hf-gpt2-small --which=best
    $ python export_hf.py out-gpt2-small-sophiag hf-gpt2-small --checkpoint=ckpt-00050000.pt --overwrite=True

usage: python export_hf.py OUT_DIR HF_DIR [--checkpoint=PATH] [--which=latest|best]
                           [--tokenizer=auto|gpt2|none] [--overwrite=True]

HF_DIR receives config.json, generation_config.json and model.safetensors (float32) of a
GPT2LMHeadModel: GPT2LMHeadModel.from_pretrained(HF_DIR), transformers pipelines and
lm-evaluation-harness (`--model hf --model_args pretrained=HF_DIR`) load it offline, with the
logits of this repository's model (checked before HF_DIR is written: at most 1e-5 relative error
in float32, on one random block). A GPT-2 BPE run also gets its tokenizer (tokenizer.json,
tokenizer_config.json and GPT-2's own vocab.json and merges.txt, rebuilt from the BPE ranks), which
AutoTokenizer.from_pretrained(HF_DIR) loads offline and which encodes like tokenizer.py; the
ranks come from tiktoken, or from $GPT2_RANKS_FILE offline (see tokenizer.py). A character-level
run gets no tokenizer (transformers has no character-level GPT-2 tokenizer); the script says
where its vocabulary is.

How this repository's model maps onto transformers' GPT2Config:
- the projections are stored transposed: transformers keeps GPT-2's Conv1D layout (in, out),
  nn.Linear is (out, in);
- GPT-2 always has biases: a model trained with bias=False gets exact zeros for every Linear and
  LayerNorm bias, which computes the same thing;
- the tanh GELU is GPT-2's 'gelu_new', the exact one 'gelu';
- scale_attn_by_inverse_layer_idx is GPT2Config's flag of that name (transformers divides layer
  i's attention logits by i+1 on top of 1/sqrt(head size), as model.py does);
- n_positions is the block size (a cropped one where the run cropped it), layer_norm_epsilon 1e-5,
  input and output embeddings tied;
- the vocabulary keeps the model's size, so GPT-2 BPE runs export 50,304 logits, GPT-2's 50,257
  padded to a multiple of 64 (batches.model_vocab_size): ids 50257..50303 never occur in the data
  and the tokenizer never produces them; their logits are learned to be low, not -inf.

Anything else is refused with one line and exit status 2, nothing written: no checkpoint, a
damaged one, an existing HF_DIR (unless --overwrite=True, and only over an earlier export), a
dataset folder that is gone (which tokenizer then? say it with --tokenizer=), a model setting
transformers' GPT-2 cannot hold (a model key this script does not know, untied embeddings).
"""

import json
import os
import shutil
import sys

import torch

import checkpoint
from batches import data_dir_of
from configurator import ConfigError, UserError, parse_args
from tokenizer import GPT2_EOT_TOKEN, GPT2_VOCAB_SIZE, gpt2_encoding, load_meta

def export_defaults():
    checkpoint = ''  # a checkpoint file: a path, or a file name in OUT_DIR; '' picks one by --which
    which = 'latest'  # 'latest' (the newest checkpoint that verifies) or 'best' (best.pt, lowest val loss)
    tokenizer = 'auto'  # 'auto' (from the run's dataset), 'gpt2' (write GPT-2 BPE files) or 'none'
    overwrite = False  # replace an HF_DIR that holds an earlier export
    return dict(locals())

USAGE = ("usage: python export_hf.py OUT_DIR HF_DIR [--checkpoint=PATH] [--which=latest|best] "
         "[--tokenizer=auto|gpt2|none] [--overwrite=True]")

# the model_args keys this export knows how to map; a key added to the model later is refused
# until it is mapped here, rather than dropped silently (model.MODEL_KEYS is tested against it)
EXPORTED_KEYS = ('n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'vocab_size', 'dropout',
                 'scale_attn_by_inverse_layer_idx', 'gelu')
HF_ACTIVATION = {'tanh': 'gelu_new', 'exact': 'gelu'}
# transformers keeps these as Conv1D weights, (in, out); the checkpoint has nn.Linear's (out, in)
CONV1D_WEIGHTS = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')
MAX_RELATIVE_ERROR = 1e-5  # float32 logits of the export against the checkpoint's model

# -----------------------------------------------------------------------------
# the model

def check_model_args(model_args):
    """The checkpoint's model_args, completed (checkpoints older than the gelu key used tanh),
    or UserError if transformers' GPT-2 cannot represent them."""
    unknown = sorted(set(model_args) - set(EXPORTED_KEYS))
    if unknown:
        raise UserError(f"the checkpoint's model has {', '.join(f'{k}={model_args[k]!r}' for k in unknown)}, "
                        f"which export_hf.py does not know how to map onto transformers' GPT2Config")
    args = {'gelu': 'tanh', **model_args}
    missing = sorted(set(EXPORTED_KEYS) - set(args))
    if missing:
        raise UserError(f"the checkpoint's model_args lack {', '.join(missing)}: not a checkpoint of this repository's GPT")
    for key in ('n_layer', 'n_head', 'n_embd', 'block_size', 'vocab_size'):
        if not (isinstance(args[key], int) and not isinstance(args[key], bool) and args[key] > 0):
            raise UserError(f"the checkpoint's {key}={args[key]!r} is not a positive integer")
    if args['n_embd'] % args['n_head']:
        raise UserError(f"the checkpoint's n_embd={args['n_embd']} is not divisible by n_head={args['n_head']}")
    if args['gelu'] not in HF_ACTIVATION:
        raise UserError(f"the checkpoint's gelu={args['gelu']!r} has no transformers activation "
                        f"(known: {', '.join(HF_ACTIVATION)})")
    for key in ('bias', 'scale_attn_by_inverse_layer_idx'):
        if not isinstance(args[key], bool):
            raise UserError(f"the checkpoint's {key}={args[key]!r} is not a boolean")
    return args

def load_gpt(state):
    """This repository's GPT from a checkpoint state, in float32 eval mode, and its model_args."""
    from model import GPT, GPTConfig
    if 'model' not in state or 'model_args' not in state:
        raise UserError("the checkpoint holds no model or model_args: not a training checkpoint of this repository")
    args = check_model_args(state['model_args'])
    weights = state['model']
    # the model ties lm_head to wte; a checkpoint where they differ could not be loaded faithfully
    # (one would overwrite the other) and transformers' GPT-2 ties them too
    if 'lm_head.weight' in weights and 'transformer.wte.weight' in weights and \
            not torch.equal(weights['lm_head.weight'], weights['transformer.wte.weight']):
        raise UserError("the checkpoint's lm_head.weight differs from transformer.wte.weight: untied "
                        "embeddings, which this model and transformers' GPT-2 cannot hold")
    model = GPT(GPTConfig(**dict(args, dropout=0.0)))
    expected = model.state_dict()
    missing, unexpected = sorted(expected.keys() - weights.keys()), sorted(weights.keys() - expected.keys())
    wrong_shape = [k for k in expected.keys() & weights.keys() if expected[k].shape != weights[k].shape]
    if missing or unexpected or wrong_shape:
        problems = ([f"missing {missing[:3]}"] if missing else []) + \
                   ([f"unexpected {unexpected[:3]}"] if unexpected else []) + \
                   ([f"shapes differ for {sorted(wrong_shape)[:3]}"] if wrong_shape else [])
        raise UserError(f"the checkpoint's weights do not fit its model_args ({'; '.join(problems)})")
    model.load_state_dict({k: v.float() for k, v in weights.items()})
    return model.float().eval(), args

def hf_config(args, eos_token_id):
    """transformers' GPT2Config for model_args (as check_model_args returns them)."""
    from transformers import GPT2Config
    return GPT2Config(
        vocab_size=args['vocab_size'], n_positions=args['block_size'], n_embd=args['n_embd'],
        n_layer=args['n_layer'], n_head=args['n_head'], n_inner=None,  # None: 4 * n_embd, as model.py
        activation_function=HF_ACTIVATION[args['gelu']],
        # model.py drops out the embeddings, the attention weights and each residual branch
        resid_pdrop=args['dropout'], embd_pdrop=args['dropout'], attn_pdrop=args['dropout'],
        layer_norm_epsilon=1e-5,  # nn.LayerNorm's default, which model.py uses
        scale_attn_weights=True, scale_attn_by_inverse_layer_idx=args['scale_attn_by_inverse_layer_idx'],
        reorder_and_upcast_attn=False, tie_word_embeddings=True,
        bos_token_id=eos_token_id, eos_token_id=eos_token_id)  # GPT-2 uses <|endoftext|> for both

def hf_model(model, args, eos_token_id=None):
    """A transformers GPT2LMHeadModel (float32) holding model's weights, in eval mode."""
    from transformers import GPT2LMHeadModel
    hf = GPT2LMHeadModel(hf_config(args, eos_token_id)).float().eval()
    ours = model.state_dict()
    weights = {}
    for name, target in hf.state_dict().items():
        if name in ours:
            tensor = ours[name].detach().to('cpu', torch.float32)
            weights[name] = tensor.t().contiguous() if name.endswith(CONV1D_WEIGHTS) else tensor
        elif name.endswith('.bias') and not args['bias']:
            weights[name] = torch.zeros_like(target)  # a missing bias adds nothing: a zero bias
        else:
            raise UserError(f"transformers' GPT-2 has {name}, which the checkpoint's model lacks")
    unused = sorted(ours.keys() - weights.keys())
    if unused:
        raise UserError(f"the checkpoint's {unused[:3]} have no place in transformers' GPT-2")
    hf.load_state_dict(weights, strict=True)
    return hf

def logits_relative_error(model, hf, tokens):
    """max |logits_hf - logits_ours| / max |logits_ours| over all positions of tokens (b, t)."""
    with torch.no_grad():
        ours, _ = model(tokens, all_logits=True)
        theirs = hf(tokens).logits
    return ((theirs - ours).abs().max() / ours.abs().max()).item()

# -----------------------------------------------------------------------------
# the tokenizer

def byte_characters():
    """GPT-2's vocab.json spells every byte as a printable character: the 188 bytes that are
    printable Latin-1 characters ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves, the other
    68 (controls, space, ...) take the characters from U+0100 on, in byte order (so ' ' is 'Ġ')."""
    printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1), *range(ord('®'), ord('ÿ') + 1)]
    characters = {b: chr(b) for b in printable}
    for b in range(256):
        if b not in characters:
            characters[b] = chr(256 + len(characters) - len(printable))
    return characters

def gpt2_vocab_and_merges(encoding):
    """(vocab, merges) in GPT-2's vocab.json / merges.txt form, from a tiktoken encoding.

    tiktoken keeps only each token's rank. BPE builds token r by merging two adjacent parts, and
    which two is what merges.txt lists: running BPE over token r's own bytes with the tokens of
    lower rank only (tiktoken's rule: always merge the adjacent pair whose concatenation has the
    lowest rank, the leftmost among equals) ends in exactly those two parts."""
    tokens = [encoding.decode_single_token_bytes(i) for i in range(GPT2_EOT_TOKEN)]
    rank = {token: i for i, token in enumerate(tokens)}
    if sorted(t for t in tokens if len(t) == 1) != [bytes([b]) for b in range(256)]:
        raise ValueError("the GPT-2 ranks do not hold every single byte: not a byte-level BPE")
    spell = byte_characters()
    def text(token):
        return ''.join(spell[b] for b in token)
    merges = []
    for r, token in enumerate(tokens):
        if len(token) == 1:
            continue  # the 256 bytes are the alphabet, made by no merge
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            pair_ranks = [rank.get(parts[i] + parts[i + 1], len(tokens)) for i in range(len(parts) - 1)]
            i = min(range(len(pair_ranks)), key=pair_ranks.__getitem__)
            if pair_ranks[i] >= r:
                raise ValueError(f"GPT-2 rank {r} ({token!r}) cannot be built from lower ranks")
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        merges.append((text(parts[0]), text(parts[1])))
    vocab = {text(token): i for i, token in enumerate(tokens)}
    vocab['<|endoftext|>'] = GPT2_EOT_TOKEN
    return vocab, merges

def write_gpt2_tokenizer(folder, encoding, model_max_length):
    """GPT-2's vocab.json and merges.txt, and from them transformers' tokenizer.json and
    tokenizer_config.json (GPT2Tokenizer: <|endoftext|> as bos, eos and unk, no prefix space)."""
    from transformers import GPT2Tokenizer
    vocab, merges = gpt2_vocab_and_merges(encoding)
    with open(os.path.join(folder, 'vocab.json'), 'w', encoding='utf-8') as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, 'merges.txt'), 'w', encoding='utf-8') as f:
        f.write('#version: 0.2\n' + ''.join(f'{a} {b}\n' for a, b in merges))
    # loading GPT-2's own two files and saving again gives the files of the installed transformers
    # version; the two stay for older versions and other tools that read them
    tokenizer = GPT2Tokenizer.from_pretrained(folder, model_max_length=model_max_length, local_files_only=True)
    tokenizer.save_pretrained(folder)

# text that exercises the pre-tokenizer's cases: contractions, letters, digits, symbols, runs of
# spaces, tabs and newlines, non-ASCII letters and an emoji (bytes split across tokens), the special token
TOKENIZER_CHECK_TEXT = ("Hello world! It's they'll we've I'd  two  spaces,\ttab\n\n\nnewlines   \n"
                        "def f(x):\n    return x ** 2 + 3.14159 - 1_000_000  # naïve café\n"
                        "日本語のテキスト, Ελληνικά, русский 🎉👍🏽 <|endoftext|>next document 12345678")

def choose_tokenizer(option, state, vocab_size):
    """('gpt2', None), ('char', (data_dir, meta)) or ('none', None): which tokenizer the model reads.
    'auto' decides as the trainer did: the dataset's meta.pkl says GPT-2 BPE or characters, and a
    dataset without meta.pkl is GPT-2 BPE."""
    if option not in ('auto', 'gpt2', 'none'):
        raise UserError(f"tokenizer={option!r}: expected 'auto', 'gpt2' or 'none'")
    if option == 'none':
        return 'none', None
    if option == 'auto':
        dataset = state.get('config', {}).get('dataset')
        if not dataset:
            raise UserError("the checkpoint does not say which dataset it was trained on; pass "
                            "--tokenizer=gpt2 (GPT-2 BPE) or --tokenizer=none")
        data_dir = data_dir_of(dataset)
        if not os.path.isdir(data_dir):
            raise UserError(f"the run's dataset folder {data_dir} is missing, so whether the model reads GPT-2 "
                            f"BPE or characters is unknown: restore it, or pass --tokenizer=gpt2 or --tokenizer=none")
        if os.path.exists(os.path.join(data_dir, 'meta.pkl')):
            meta = load_meta(data_dir)
            if 'stoi' in meta and 'itos' in meta:
                return 'char', (data_dir, meta)
            if meta.get('tokenizer') != 'gpt2':
                raise UserError(f"{data_dir}/meta.pkl names neither GPT-2 BPE nor characters (keys: {sorted(meta)}); "
                                f"pass --tokenizer=gpt2 or --tokenizer=none")
    if vocab_size < GPT2_VOCAB_SIZE:
        raise UserError(f"the model's vocabulary has {vocab_size} tokens, fewer than GPT-2 BPE's {GPT2_VOCAB_SIZE}: "
                        f"it was not trained on GPT-2 BPE; pass --tokenizer=none")
    return 'gpt2', None

def char_tokenizer_note(data_dir, meta):
    path = os.path.join(data_dir, 'meta.pkl')
    return (f"no tokenizer written: the model reads characters, which transformers' tokenizers do not "
            f"cover. Its vocabulary is {path} ({meta['vocab_size']} characters; keep a copy with the model): "
            f"with meta = pickle.load(open('meta.pkl', 'rb')), ids = [meta['stoi'][c] for c in text] and "
            f"text = ''.join(meta['itos'][i] for i in ids) (in this repository tokenizer.encoder_decoder(meta)); "
            f"give the ids to the model itself (model(input_ids), model.generate), not to a pipeline, "
            f"which needs a tokenizer.")

# -----------------------------------------------------------------------------
# writing HF_DIR

def check_destination(hf_dir, out_dir, overwrite):
    """Refuse an HF_DIR that holds something, unless overwrite and it holds an earlier export."""
    if os.path.exists(hf_dir) and not os.path.isdir(hf_dir):
        raise UserError(f"HF_DIR {hf_dir} is a file; choose a folder name")
    hf_real, out_real = os.path.realpath(hf_dir), os.path.realpath(out_dir)
    if out_real == hf_real or out_real.startswith(hf_real + os.sep):
        raise UserError(f"HF_DIR {hf_dir} holds OUT_DIR {out_dir}: exporting there would replace the run; "
                        f"choose another folder")
    if os.path.isdir(hf_dir) and os.listdir(hf_dir):
        if not overwrite:
            raise UserError(f"HF_DIR {hf_dir} already holds files; choose another folder, or pass "
                            f"--overwrite=True to replace an earlier export")
        if not os.path.exists(os.path.join(hf_dir, 'config.json')):
            raise UserError(f"HF_DIR {hf_dir} holds files but no config.json: not an earlier export, "
                            f"so --overwrite=True will not replace it; choose another folder")

def finish_files(folder):
    """Give every file in folder the permissions of a file the user creates (transformers writes
    the weights through a temporary file, mode 0600, which others sharing the folder could not
    read), and flush the files and the folder to disk."""
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            os.chmod(path, 0o666 & ~umask)
            with open(path, 'rb') as f:
                os.fsync(f.fileno())
    checkpoint.fsync_dir(folder)

def write_export(folder, model, args, kind, encoding=None):
    """Write the transformers folder (model, and for kind 'gpt2' the tokenizer) into folder and
    check it: load it back the way a user would and compare logits (and the tokenizer's ids).
    Returns the logits' relative error."""
    from transformers import AutoTokenizer, GPT2LMHeadModel
    hf = hf_model(model, args, GPT2_EOT_TOKEN if kind == 'gpt2' else None)
    hf.save_pretrained(folder)
    if kind == 'gpt2':
        write_gpt2_tokenizer(folder, encoding, args['block_size'])
    loaded = GPT2LMHeadModel.from_pretrained(folder, local_files_only=True).eval()
    tokens = torch.randint(0, args['vocab_size'], (1, args['block_size']), generator=torch.Generator().manual_seed(0))
    error = logits_relative_error(model, loaded, tokens)
    if not error <= MAX_RELATIVE_ERROR:  # also catches NaN
        raise RuntimeError(f"the exported model's logits differ from the checkpoint's by {error:.2e} "
                           f"(relative, more than {MAX_RELATIVE_ERROR:g}): a bug in export_hf.py; nothing written")
    if kind == 'gpt2':
        ids = AutoTokenizer.from_pretrained(folder, local_files_only=True)(TOKENIZER_CHECK_TEXT, verbose=False)['input_ids']
        if ids != encoding.encode(TOKENIZER_CHECK_TEXT, allowed_special={'<|endoftext|>'}):
            raise RuntimeError("the exported tokenizer encodes differently from tokenizer.py's GPT-2 BPE: "
                               "a bug in export_hf.py; nothing written")
    return error

def export(state, hf_dir, kind, encoding=None, overwrite=False):
    """Write the export into a temporary folder next to hf_dir and rename it to hf_dir at the end,
    so that hf_dir is never half-written. Returns (args, relative error)."""
    model, args = load_gpt(state)
    hf_dir = os.path.abspath(hf_dir)
    parent = os.path.dirname(hf_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(hf_dir)}.tmp{os.getpid()}")
    old = os.path.join(parent, f".{os.path.basename(hf_dir)}.old{os.getpid()}")
    try:
        os.makedirs(tmp)
        error = write_export(tmp, model, args, kind, encoding)
        finish_files(tmp)
        if os.path.isdir(hf_dir) and os.listdir(hf_dir):
            os.replace(hf_dir, old)  # only an earlier export gets here (check_destination)
        elif os.path.isdir(hf_dir):
            os.rmdir(hf_dir)
        os.replace(tmp, hf_dir)
        checkpoint.fsync_dir(parent)
    finally:
        for leftover in (tmp, old):
            if os.path.exists(leftover):
                shutil.rmtree(leftover)
    return args, error

# -----------------------------------------------------------------------------

def load_state(out_dir, config):
    """The checkpoint state chosen by --checkpoint or --which, and its path."""
    if config['which'] not in ('latest', 'best'):
        raise UserError(f"which={config['which']!r}: expected 'latest' or 'best'")
    if config['checkpoint']:
        path = config['checkpoint']
        if not os.path.dirname(path):
            path = os.path.join(out_dir, path)  # a bare file name is one in OUT_DIR
        if not os.path.exists(path):
            raise UserError(f"checkpoint {path} does not exist")
        return checkpoint.load_checkpoint(path.rstrip(os.sep), map_location='cpu'), path
    if config['which'] == 'best':
        path = checkpoint.checkpoint_path(out_dir, 'best')  # best.pt, or a sharded run's best.dcp
        if not os.path.exists(path):
            raise UserError(f"{out_dir} has no best.pt (written at the first evaluation); use --which=latest")
        return checkpoint.load_checkpoint(path, map_location='cpu'), path
    state, path = checkpoint.load_latest(out_dir, map_location='cpu')  # warns on stdout when it falls back
    if state is None:
        raise UserError(f"no checkpoint in {out_dir}; train first, or pass the run's out_dir")
    return state, path

def main(argv):
    if any(arg in ('-h', '--help') for arg in argv):
        print(__doc__.strip())
        return
    try:
        positional = [arg for arg in argv if not arg.startswith('-')]
        if len(positional) != 2:
            raise UserError(f"expected OUT_DIR and HF_DIR, got {len(positional)} folder argument(s); {USAGE}")
        out_dir, hf_dir = positional
        config, _ = parse_args(export_defaults(), [arg for arg in argv if arg.startswith('-')])
        check_destination(hf_dir, out_dir, config['overwrite'])
        state, path = load_state(out_dir, config)
        state.pop('optimizer', None)  # not exported: two more copies of the weights' size, freed now
        args = check_model_args(state.get('model_args', {}))
        kind, char_vocab = choose_tokenizer(config['tokenizer'], state, args['vocab_size'])
        try:
            encoding = gpt2_encoding() if kind == 'gpt2' else None
        except RuntimeError as e:  # tiktoken could not download the ranks: offline, say where they are
            raise UserError(str(e))
        import transformers
        transformers.utils.logging.disable_progress_bar()  # the one-file save needs no bar
        print(f"exporting {path} (iteration {state.get('iter_num', '?')}): {args['n_layer']} layers, "
              f"{args['n_head']} heads, {args['n_embd']} wide, block {args['block_size']}, vocabulary "
              f"{args['vocab_size']}, bias {args['bias']}, GELU {args['gelu']} ({HF_ACTIVATION[args['gelu']]}), "
              f"attention scaled by 1/(layer+1): {args['scale_attn_by_inverse_layer_idx']}")
        args, error = export(state, hf_dir, kind, encoding, config['overwrite'])
    except (ConfigError, UserError, checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (ImportError, OSError, ValueError) as e:  # transformers missing, GPT-2 ranks unreadable, ...
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    written = sorted(os.listdir(hf_dir))
    print(f"wrote {hf_dir}: {', '.join(written)}; its float32 logits match the checkpoint's model "
          f"within {error:.1e} (relative)")
    if kind == 'gpt2':
        print("tokenizer: GPT-2 BPE (AutoTokenizer.from_pretrained loads it); the text '<|endoftext|>' "
              "becomes id 50256, and no end-of-text id is added on its own (as in GPT-2)")
        if args['vocab_size'] > GPT2_VOCAB_SIZE:
            print(f"note: the model has {args['vocab_size']} logits, GPT-2's {GPT2_VOCAB_SIZE} padded to a "
                  f"multiple of 64; ids {GPT2_VOCAB_SIZE}..{args['vocab_size'] - 1} are unused padding")
    elif kind == 'char':
        print(char_tokenizer_note(*char_vocab))
    else:
        print("no tokenizer written (--tokenizer=none)")

if __name__ == '__main__':
    main(sys.argv[1:])
