"""
Pretrain GPT-2 with Sophia-G (sophia.py). The loop is trainer.py's, shared with train_adam.py;
this script holds only what differs: the optimizer and its defaults.

    $ python train_sophiag.py config/train_stdlib_char_sophiag.py           # CPU, minutes
    $ torchrun --standalone --nproc_per_node=8 train_sophiag.py config/train_gpt2_small_sophiag.py

Defaults: GPT-2 small (124M) on OpenWebText with the official Sophia-G hyperparameters.
Any key can be changed by a config file or --key=value (configurator.py).
"""

import sys

from trainer import default_config, main

def sophiag_defaults():
    config = default_config()
    config.update(
        out_dir='out-sophiag',
        wandb_run_name='gpt2-small-sophiag',
        # the official GPT-2 small values: Sophia-G takes the same peak lr as AdamW, more weight decay
        learning_rate=6e-4,
        weight_decay=0.2,
        beta1=0.965,  # momentum
        beta2=0.99,  # Hessian EMA, per Hessian update (so 0.99 per 10 steps at hess_interval=10)
        min_lr=1.5e-5,
        # Sophia's own keys (train_adam.py rejects them)
        rho=0.05,  # clipping threshold scale: the update is lr * clip(m / (rho * bs * h), 1); larger rho, more coordinates unclipped
        hess_interval=10,  # a Hessian pass after every hess_interval-th step
        hess_micro_steps=0,  # micro-batches of a Hessian pass in each process; 0 = gradient_accumulation_steps (the official: as many tokens as a step)
        hessian_estimator='gnb',  # 'gnb' (Sophia-G, labels sampled from the model) or 'hutchinson' (Sophia-H)
        hess_grad_clip=1.0,  # clip the sampled gradient's norm before its square enters the EMA, as the official loop; 0 = off
    )
    return config

if __name__ == '__main__':
    main('sophiag', sophiag_defaults(), sys.argv[1:], described=[sophiag_defaults], usage=__doc__)
