# LLaMA-1B on C4, the SCALE paper's recipe (arXiv 2506.16659).
# python train.py configs/llama_1b.py   (vocab size comes from data_dir/meta.json)

# model shape
dim = 2048
n_layers = 24
n_heads = 32
ffn_dim = 5461

# optimizer: SCALE, lr 2e-4, 100k steps, 10% linear warmup, cosine decay to 0.1x
optimizer = "scale"
lr = 2e-4
adam_lr = 1e-3
momentum = 0.9
weight_decay = 0.0
max_steps = 100000
warmup_steps = 10000
min_lr_ratio = 0.1
grad_clip = 0.0  # 0 disables clipping

# batch: 512 sequences of 256 tokens per optimizer step; batch_size is per GPU (80GB), accumulation makes up the rest
seq_len = 256
total_batch_size = 512
batch_size = 64

# evaluation, logging, checkpoints
eval_every = 1000
eval_tokens = 10_000_000
log_every = 10
ckpt_every = 1000

data_dir = "data/c4"
out_dir = "out/llama_1b"
dtype = "bfloat16"
compile = True
seed = 0
resume = False
