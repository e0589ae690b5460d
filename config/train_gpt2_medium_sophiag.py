# GPT-2 medium (355M, 24 layers, 16 heads, 1024 wide) on OpenWebText with Sophia-G, the official hyperparameters.
# Tokens per iteration: 6 batch * 1024 block * 80 accumulation (over all GPUs) = 491,520,
# e.g. 8 GPUs with 80 GB each run 10 micro-batches each per iteration. With less GPU memory lower
# batch_size and raise gradient_accumulation_steps so that the product stays 480 sequences.
# 100k iterations = 49.2B tokens. Prepare the data first: python data/openwebtext/prepare.py
# Expected: the Sophia paper reports a val loss of about 2.66 (AdamW 2.70) after 100k iterations.
# $ torchrun --standalone --nproc_per_node=8 train_sophiag.py config/train_gpt2_medium_sophiag.py

out_dir = 'out-gpt2-medium-sophiag'
wandb_log = True
wandb_project = 'sophia'
wandb_run_name = 'gpt2-medium-sophiag'

dataset = 'openwebtext'
batch_size = 6
block_size = 1024
gradient_accumulation_steps = 80

n_layer = 24
n_head = 16
n_embd = 1024
dropout = 0.0
bias = False
scale_attn_by_inverse_layer_idx = True

learning_rate = 7e-4
weight_decay = 0.2
beta1 = 0.965
beta2 = 0.99
rho = 0.08
hess_interval = 10
grad_clip = 1.0
min_lr = 1e-5

max_iters = 100000
lr_decay_iters = 100000
warmup_iters = 2000
eval_interval = 1000
eval_iters = 200
log_interval = 10
checkpoint_interval = 1000
