"""
Pretrain GPT-2 with AdamW, the baseline Sophia-G and Muon are compared against. The loop is
trainer.py's, shared with train_sophiag.py and train_muon.py; AdamW adds nothing to it but the
optimizer (optimizers.AdamWRecipe): torch's fused AdamW where the device has it, decoupled weight
decay on the matrices and embeddings.

    $ python train_adam.py config/train_stdlib_char_adam.py                 # CPU, minutes
    $ torchrun --standalone --nproc_per_node=8 train_adam.py config/train_gpt2_small_adam.py

Defaults: GPT-2 small (124M) on OpenWebText with the official AdamW hyperparameters (lr 6e-4,
weight decay 0.1, betas 0.9/0.95, min_lr 3e-5). Any key can be changed by a config file or
--key=value (configurator.py).
"""

from optimizers import AdamWRecipe
from trainer import main

if __name__ == '__main__':
    main(AdamWRecipe, usage=__doc__)
