# GPT-2 small (124M) on FineWeb-Edu with Muon on the transformer blocks' weight matrices and AdamW on
# the embeddings (tied with the output layer), norms and biases, beside
# config/train_gpt2_small_fineweb_adam.py: the same model, data, tokens and schedule as llm.c's GPT-2
# 124M reproduction (github.com/karpathy/llm.c discussion #481; scripts/run_gpt2_124M.sh: 524,288
# tokens per step, 18,865 steps = 9.89B tokens, 700 warmup steps, cosine to zero, gradient clip
# 1.0), with that run's AdamW learning rate and weight decay (6e-4, 0.1) for both parts:
# muon_adjust_lr_fn='match_rms_adamw' gives each matrix's update AdamW's RMS (PyTorch's Muon
# documentation, after Moonshot's "Muon is Scalable for LLM Training"); momentum 0.95, Nesterov and 5
# Newton-Schulz steps as modded-nanogpt's records. Muon's own tuned runs use a larger, separate
# learning rate: try --muon_adjust_lr_fn=original --muon_learning_rate=0.02 beside this one.
# Tokens per iteration: 512 sequences (total_bs) x 1024 block = 524,288; 32 micro-batches of 16 on
# 1 GPU, 4 on each of 8. DDP only (Newton-Schulz needs whole matrices).
# Target: AdamW's llm.c run reached val loss about 3.28 (FineWeb) and HellaSwag 29.9%; on
# FineWeb-Edu's val split OpenAI's GPT-2 124M scores 3.2924 and HellaSwag 29.45% (build-nanogpt).
# modded-nanogpt's optimizer track reports ~1.35-1.5x fewer tokens than AdamW for a tuned Muon.
# No run of this size has been made with this repository yet.
# $ python data/fineweb/prepare.py
# $ torchrun --standalone --nproc_per_node=8 train_muon.py config/train_gpt2_small_fineweb_muon.py
# $ python hellaswag.py --out_dir=out-gpt2-small-fineweb-muon --device=cuda --dtype=bfloat16

out_dir = 'out-gpt2-small-fineweb-muon'
wandb_log = True
wandb_project = 'sophia'
wandb_run_name = 'gpt2-small-fineweb-muon'

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
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
min_lr = 0.0  # llm.c's -q 0.0: the cosine ends at zero
muon_momentum = 0.95
muon_nesterov = True
muon_ns_steps = 5
muon_adjust_lr_fn = 'match_rms_adamw'  # AdamW's lr and weight decay serve the Muon matrices too

max_iters = 18865
lr_decay_iters = 18865
warmup_iters = 700
eval_interval = 250  # llm.c's -v 250
eval_iters = 80  # 80 x 16 x 1024 = 1.3M val tokens per process, llm.c's 20 batches of 64 x 1024
hellaswag = True  # llm.c's -h 1: HellaSwag's 10,042 items at every evaluation, split over the processes
log_interval = 10
checkpoint_interval = 1000
