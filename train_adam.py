"""
Pretrain GPT-2 with AdamW, the baseline Sophia-G is compared against. The loop is trainer.py's,
shared with train_sophiag.py; this script holds only what differs: the optimizer and its defaults.

    $ python train_adam.py config/train_stdlib_char_adam.py                 # CPU, minutes
    $ torchrun --standalone --nproc_per_node=8 train_adam.py config/train_gpt2_small_adam.py

Defaults: GPT-2 small (124M) on OpenWebText with the official AdamW hyperparameters (lr 6e-4,
weight decay 0.1, betas 0.9/0.95, min_lr 3e-5: trainer.default_config). torch's fused AdamW where
the device has it. Any key can be changed by a config file or --key=value (configurator.py).
"""

import sys

from trainer import default_config, main

def adam_defaults():
    config = default_config()
    config.update(out_dir='out-adam', wandb_run_name='gpt2-small-adam')
    return config

if __name__ == '__main__':
    main('adamw', adam_defaults(), sys.argv[1:], described=[adam_defaults], usage=__doc__)
