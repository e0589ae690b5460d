# GPT-2 small (124M) on FineWeb-Edu with Sophia-G, beside config/train_gpt2_small_fineweb_adam.py:
# the same model, data and tokens as llm.c's GPT-2 124M reproduction (github.com/karpathy/llm.c
# discussion #481, "Reproducing GPT-2 (124M) in llm.c in 90 minutes for $20"; its command is
# scripts/run_gpt2_124M.sh), with the official Sophia-G hyperparameters for GPT-2 small (lr 6e-4,
# rho 0.05, weight decay 0.2, betas 0.965/0.99, a Hessian pass every 10 steps, 2000 warmup
# iterations, cosine to min_lr 1.5e-5, gradient clip 1.0). Changed for the token budget only:
# 18,865 iterations of 524,288 tokens (llm.c's -d 524288; 9.89B tokens) instead of 100k of
# 491,520, and the cosine ends there. The model is GPT-2's, as llm.c trains it (biases, tanh GELU,
# no attention scaling by layer, dropout 0), not the official runs' (no biases, scaled attention):
# both optimizers train the one model llm.c's numbers are for.
# Tokens per iteration: 512 sequences (total_bs) x 1024 block = 524,288. Each process runs
# gradient_accumulation_steps micro-batches of batch_size, derived here (0): 32 of 16 on 1 GPU,
# 4 on each of 8; with less GPU memory lower batch_size to 8 or 4. The Hessian pass takes as many
# tokens as a step; its EMA holds 1 - 0.99^n of its scale after n passes (63% at iteration 1,000,
# all but 6e-9 of it at the end of the run's 1,886 passes).
# Target (llm.c #481, AdamW on FineWeb with its first 100M tokens as val): val loss about 3.28
# (3.2847 as modded-nanogpt quotes that run) and HellaSwag 29.9% acc_norm, against OpenAI's GPT-2
# 124M at 29.4% (29.55% as build-nanogpt scores it, which hellaswag.py follows). On FineWeb-Edu's
# val split OpenAI's GPT-2 124M scores 3.2924 and HellaSwag 29.45% (build-nanogpt). No run of this
# size has been made with this repository yet.
# $ python data/fineweb/prepare.py
# $ torchrun --standalone --nproc_per_node=8 train_sophiag.py \
#       config/train_gpt2_small_fineweb_sophiag.py
# $ python hellaswag.py --out_dir=out-gpt2-small-fineweb-sophiag --device=cuda --dtype=bfloat16

out_dir = 'out-gpt2-small-fineweb-sophiag'
wandb_log = True
wandb_project = 'sophia'
wandb_run_name = 'gpt2-small-fineweb-sophiag'

dataset = 'fineweb_edu'
total_bs = 512
batch_size = 16
gradient_accumulation_steps = 0
block_size = 1024

n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0
bias = True
scale_attn_by_inverse_layer_idx = False

learning_rate = 6e-4
weight_decay = 0.2
beta1 = 0.965
beta2 = 0.99
rho = 0.05
hess_interval = 10
grad_clip = 1.0
min_lr = 1.5e-5

max_iters = 18865
lr_decay_iters = 18865
warmup_iters = 2000
eval_interval = 250  # llm.c's -v 250
eval_iters = 80  # 80 x 16 x 1024 = 1.3M val tokens per process, llm.c's 20 batches of 64 x 1024
hellaswag = True  # llm.c's -h 1: HellaSwag's 10,042 items at every evaluation, split over the processes
log_interval = 10
checkpoint_interval = 1000
