"""
Pretrain GPT-2 with Muon (torch.optim.Muon) on the transformer blocks' weight matrices and AdamW on
the rest: embeddings (and the tied output layer), LayerNorm gains, biases. The loop is trainer.py's,
shared with train_adam.py and train_sophiag.py; what Muon adds to it is optimizers.MuonRecipe:

- two optimizers as one (optimizers.MuonWithAdamW): one step, one state, one checkpoint;
- its own keys: muon_learning_rate, muon_momentum, muon_nesterov, muon_ns_steps and
  muon_adjust_lr_fn (the learning rate scaled by each matrix's shape);
- DDP only: its Newton-Schulz iteration needs whole matrices, which FSDP's shards split.

Hyperparameters: momentum 0.95, Nesterov, 5 Newton-Schulz steps, as modded-nanogpt's GPT-2
speedrun records and torch's defaults; muon_adjust_lr_fn='match_rms_adamw' (PyTorch's Muon
documentation, after Moonshot's "Muon is Scalable for LLM Training") gives each update AdamW's
RMS, so the AdamW learning rate and weight decay of the config carry over to both parts.

    $ python train_muon.py config/train_stdlib_char_muon.py                 # CPU, minutes
    $ torchrun --standalone --nproc_per_node=8 train_muon.py config/train_gpt2_small_muon.py

Defaults: GPT-2 small (124M) on OpenWebText with AdamW's official hyperparameters (lr 6e-4, weight
decay 0.1, betas 0.9/0.95, min_lr 3e-5) for both parts. Any key can be changed by a config file or
--key=value (configurator.py).
"""

from optimizers import MuonRecipe
from trainer import main

if __name__ == '__main__':
    main(MuonRecipe, usage=__doc__)
