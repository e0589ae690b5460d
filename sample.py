"""
Sample from a trained model: a checkpoint in out_dir (the best one by default), or GPT-2 itself.

    $ python sample.py --out_dir=out-stdlib-char-sophiag --start="def " --num_samples=3
    $ python sample.py --init_from=gpt2 --start="The meaning of life is"

The text is encoded and decoded with the vocabulary of the dataset the checkpoint was trained on
(its meta.pkl: characters, or GPT-2 BPE); pretrained GPT-2 uses GPT-2 BPE. `--start=FILE:path`
reads the prompt from a file.
"""

import os
import sys

import torch

import checkpoint
from batches import data_dir_of
from configurator import ConfigError, UserError, describe_defaults, format_help, parse_args, wants_help
from tokenizer import encoder_decoder, gpt2_encoding, load_meta

def sample_defaults():
    """The keys of sample.py; the comment beside each is what --help says of it."""
    # the model
    init_from = 'resume'  # 'resume' (a checkpoint in out_dir) or a GPT-2 name ('gpt2', 'gpt2-xl', ...)
    out_dir = 'out-stdlib-char-sophiag'  # where the checkpoint is, with init_from='resume'
    which = 'best'  # 'best' (lowest val loss) or 'latest' checkpoint
    # sampling
    start = '\n'  # the prompt; "FILE:prompt.txt" reads it from a file
    num_samples = 3  # samples to draw, one after another
    max_new_tokens = 500  # tokens generated per sample
    temperature = 0.8  # 1.0 samples the model's distribution; lower is more conservative
    top_k = 200  # sample among the top_k most likely tokens only; 0 = all
    seed = 1337  # the generator's seed: the same seed, the same samples
    # system
    device = 'cpu'  # 'cpu', 'cuda', 'cuda:N' or 'mps'
    dtype = 'float32'  # 'float32', 'bfloat16' or 'float16'
    return dict(locals())

def load_model(config):
    """The model and its (encode, decode)."""
    from model import GPT, GPTConfig
    if config['init_from'] != 'resume':
        model = GPT.from_pretrained(config['init_from'], dict(dropout=0.0))
        encoding = gpt2_encoding()
        return model, (lambda s: encoding.encode(s, allowed_special={'<|endoftext|>'}), encoding.decode)
    out_dir = config['out_dir']
    best = checkpoint.checkpoint_path(out_dir, 'best')  # best.pt, or a sharded run's best.dcp
    if config['which'] == 'best' and os.path.exists(best):
        path = best
        state = checkpoint.load_checkpoint(path, map_location='cpu')
    else:
        state, path = checkpoint.load_latest(out_dir, map_location='cpu')
    if state is None:
        raise UserError(f"no checkpoint in {out_dir}; train first, or pass --out_dir=...")
    print(f"sampling from {path} (iteration {state['iter_num']})")
    model = GPT(GPTConfig(**dict(state['model_args'], dropout=0.0)))
    model.load_state_dict(state['model'])
    data_dir = data_dir_of(state['config']['dataset'])
    if os.path.exists(os.path.join(data_dir, 'meta.pkl')):
        return model, encoder_decoder(load_meta(data_dir))
    encoding = gpt2_encoding()  # a dataset without meta.pkl is GPT-2 BPE
    return model, (encoding.encode_ordinary, encoding.decode)

def main(argv):
    if wants_help(argv):
        print(format_help(__doc__, sample_defaults(), describe_defaults(sample_defaults)), end='')
        sys.exit(0)
    try:
        config, _ = parse_args(sample_defaults(), argv)
        if config['device'].startswith('cuda') and not torch.cuda.is_available():
            raise UserError(f"device={config['device']!r} but CUDA is not available; use --device=cpu")
        model, (encode, decode) = load_model(config)
        start = config['start']
        if start.startswith('FILE:'):
            with open(start[5:], encoding='utf-8') as f:
                start = f.read()
        ids = encode(start)  # a character the vocabulary lacks is a ValueError naming it
    except (ConfigError, UserError, checkpoint.CheckpointError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    device = config['device']
    model.eval().to(device)
    ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[config['dtype']]
    device_type = 'cuda' if device.startswith('cuda') else device
    autocast = torch.autocast(device_type, dtype=ptdtype, enabled=ptdtype != torch.float32)
    generator = torch.Generator(device=device).manual_seed(config['seed'])
    x = torch.tensor(ids, dtype=torch.long, device=device)[None, ...]
    with torch.no_grad(), autocast:
        for _ in range(config['num_samples']):
            y = model.generate(x, config['max_new_tokens'], temperature=config['temperature'],
                               top_k=config['top_k'] or None, generator=generator)
            print(decode(y[0].tolist()))
            print('---------------')

if __name__ == '__main__':
    main(sys.argv[1:])
