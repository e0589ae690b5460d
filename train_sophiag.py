"""
Pretrain GPT-2 with Sophia-G (sophia.py). The loop is trainer.py's, shared with train_adam.py and
train_muon.py; what Sophia-G adds to it is optimizers.SophiaGRecipe:

- its step takes bs, the token count of the batch its Hessian estimate came from;
- after every hess_interval-th step, a Hessian pass on fresh batches: the model's full-sequence
  logits, labels sampled from its own softmax, backward (averaged over processes like a training
  step), the sampled gradient clipped at hess_grad_clip, optimizer.update_hessian()
  (Gauss-Newton-Bartlett; --hessian_estimator=hutchinson for Sophia-H);
- its own keys: rho, hess_interval, hess_micro_steps, hessian_estimator, hess_grad_clip;
- the win rate and the norms of its momentum and Hessian EMA in every log row.

    $ python train_sophiag.py config/train_stdlib_char_sophiag.py           # CPU, minutes
    $ torchrun --standalone --nproc_per_node=8 train_sophiag.py config/train_gpt2_small_sophiag.py

Defaults: GPT-2 small (124M) on OpenWebText with the official Sophia-G hyperparameters.
Any key can be changed by a config file or --key=value (configurator.py).
"""

from optimizers import SophiaGRecipe
from trainer import main

if __name__ == '__main__':
    main(SophiaGRecipe, usage=__doc__)
