# LLaMA-1B on C4 with SCALE, the paper's recipe (arXiv 2506.16659); the rest is train.py's defaults.
# python train.py configs/llama_1b.py   (vocab size comes from data_dir/meta.json)
dim = 2048
n_layers = 24
n_heads = 32
ffn_dim = 5461

lr = 2e-4
adam_lr = 1e-3
max_steps = 100000
warmup_steps = 10000  # 10%
batch_size = 64  # per 80GB GPU; 512 sequences a step on 1, 2, 4 or 8 GPUs, accumulating the rest

out_dir = "out/llama_1b"
