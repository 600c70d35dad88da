# LLaMA-60M on C4, the SCALE paper's recipe (arXiv 2506.16659).
# python train.py configs/llama_60m.py   (vocab size comes from data_dir/meta.json)

# model shape
dim = 512
n_layers = 8
n_heads = 8
ffn_dim = 1376

# optimizer: SCALE, lr 1e-3, 11k steps, 10% linear warmup, cosine decay to 0.1x
optimizer = "scale"
lr = 1e-3
adam_lr = 0.02  # the paper's scripts leave adam_lr at its default 0.02 for 60M-350M; kept as is
momentum = 0.9
weight_decay = 0.0
max_steps = 11000
warmup_steps = 1100
min_lr_ratio = 0.1
grad_clip = 0.0  # 0 disables clipping

# batch: 512 sequences of 256 tokens per optimizer step; batch_size is per GPU (80GB), accumulation makes up the rest
seq_len = 256
total_batch_size = 512
batch_size = 256

# evaluation, logging, checkpoints
eval_every = 1000
eval_tokens = 10_000_000
log_every = 10
ckpt_every = 1000

data_dir = "data/c4"
out_dir = "out/llama_60m"
dtype = "bfloat16"
compile = True
seed = 0
resume = False
