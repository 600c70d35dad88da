# LLaMA-7B on C4 with SCALE, the paper's recipe (arXiv 2506.16659); the rest is train.py's defaults.
# python train.py configs/llama_7b.py   (vocab size comes from data_dir/meta.json)
dim = 4096
n_layers = 32
n_heads = 32
ffn_dim = 11008

lr = 1e-4
adam_lr = 1e-3
max_steps = 150000
warmup_steps = 15000  # 10%
batch_size = 16  # per 80GB GPU; 512 sequences a step on 1 to 32 GPUs, accumulating the rest

out_dir = "out/llama_7b"
