"""
Export a train.py checkpoint as a Hugging Face model directory, for transformers' generate and lm-evaluation-harness:

    python export_hf.py --ckpt out/tiny/ckpt.pt --out_dir hf/tiny
    lm_eval --model hf --model_args pretrained=hf/tiny,add_bos_token=False --system_instruction "<|endoftext|>" \\
        --tasks wikitext,hellaswag --batch_size 16

The directory holds config.json, generation_config.json and model.safetensors, written by
transformers.LlamaForCausalLM.save_pretrained (model.py is the same network: the logits are ours), in the
checkpoint's param dtype (bf16 for dtype=bfloat16, else fp32), and the checkpoint's tiktoken tokenizer converted by
transformers' TikTokenConverter (tokenizer.json, tokenizer_config.json; <|endoftext|> is its bos, eos and pad token,
and the tokenizer starts each text with it, as the training documents start), so
AutoModelForCausalLM.from_pretrained(DIR) and AutoTokenizer.from_pretrained(DIR) load it offline. Needs transformers
(pip install transformers); the rest of the repo does not.
"""
import json
import os
import re
import shutil
import sys
import tempfile

import torch

from sample import ArgumentParser, checkpoint_tokenizer, load_model

# strings the converted tokenizer must encode exactly as tiktoken does before anything is written
CHECK_TEXTS = ("Hello, world! It's 2024.", "  leading spaces\n\nand\ttabs \r\n", "naïve café, 日本語, emoji 🎉🚀",
               "12345 + 678 = 13023", "one doc<|endoftext|>the next", "")


def import_transformers():
    try:
        import transformers
    except ImportError:
        raise ValueError("export_hf.py needs transformers: pip install transformers") from None
    return transformers


def hf_name(name):
    """Our parameter name -> LlamaForCausalLM's."""
    if name == "lm_head.weight":
        return name
    name = name.replace("tok_embeddings", "embed_tokens").replace(".attn_norm", ".input_layernorm")
    name = name.replace(".mlp_norm", ".post_attention_layernorm").replace(".attn.", ".self_attn.")
    return "model." + name


def hf_config(cfg, eot_id=None, **kwargs):
    """The transformers.LlamaConfig of a model.LLaMAConfig (the same network; test_model.py checks the logits),
    with eot_id as its bos and eos token; kwargs go to LlamaConfig (e.g. attn_implementation)."""
    return import_transformers().LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        attention_bias=False, mlp_bias=False, tie_word_embeddings=False, hidden_act="silu", attention_dropout=0.0,
        bos_token_id=eot_id, eos_token_id=eot_id, **kwargs)


def hf_model(model, eot_id=None):
    """Our LLaMA -> a transformers.LlamaForCausalLM holding its weights (the same tensors, not copies) in the dtype
    of its embedding: the fp32 norm gains of a bf16 run are cast to bf16 (copies), as our RMSNorm casts them at use,
    so HF (which would multiply in fp32) computes our numbers, in one dtype."""
    transformers = import_transformers()
    with torch.device("meta"):  # no random init: the weights are assigned below
        hf = transformers.LlamaForCausalLM(hf_config(model.config, eot_id))
    dtype = model.tok_embeddings.weight.dtype
    hf.load_state_dict({hf_name(k): v.to(dtype) for k, v in model.state_dict().items()}, strict=True, assign=True)
    return hf.eval()


def hf_tokenizer(enc, eot_id, context):
    """A tiktoken Encoding -> a transformers fast tokenizer that encodes as it does (byte-level BPE with its ranks,
    pattern and special tokens), with the eot token as bos, eos and pad (left), added before each text
    (add_special_tokens=False: not), and model_max_length = context. Raises ValueError if the conversion does not
    encode CHECK_TEXTS exactly as tiktoken does."""
    transformers = import_transformers()
    from tokenizers import processors  # transformers' own dependency
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class FromRanks(TikTokenConverter):  # the ranks in memory, not a .tiktoken file (which tiktoken caches by path)
        def load_tiktoken_bpe(self, ranks):
            return ranks

    ranks = enc._mergeable_ranks  # tiktoken has no public accessor; transformers' own converter reads these too
    special = {i: token for token, i in enc._special_tokens.items()}
    # added tokens take the ids after the BPE vocab in turn: placeholders keep each special token at its id
    added = [special.get(i, f"<|unused_{i}|>") for i in range(len(ranks), enc.n_vocab)]
    converted = FromRanks(vocab_file=ranks, pattern=enc._pat_str, extra_special_tokens=added).converted()
    eot = enc.decode([eot_id])
    # every training document starts with eot: tok(text) starts with it too, as sample.py's prompt does;
    # tok(text, add_special_tokens=False) does not
    converted.post_processor = processors.Sequence([converted.post_processor, processors.TemplateProcessing(
        single=f"{eot} $A", pair=f"{eot} $A {eot} $B", special_tokens=[(eot, eot_id)])])
    tok = transformers.PreTrainedTokenizerFast(  # a pad token, on the left as generate wants, batches pipelines
        tokenizer_object=converted, bos_token=eot, eos_token=eot, pad_token=eot, padding_side="left",
        model_max_length=context, model_input_names=["input_ids", "attention_mask"])  # what generate takes
    for text in CHECK_TEXTS:
        ours = [eot_id, *enc.encode(text, allowed_special="all")]
        theirs = tok.encode(text)
        if ours != theirs or tok.encode(text, add_special_tokens=False) != ours[1:]:
            raise ValueError(f"the Hugging Face conversion of tokenizer {enc.name} encodes {text!r} as {theirs}, "
                             f"tiktoken (after {eot}) as {ours}; nothing was written (please report this)")
    return tok


def save_tokenizer(tok, out_dir):
    """tok.save_pretrained(out_dir), its class recorded as PreTrainedTokenizerFast, the name transformers 4.x and
    5.x both load (5.x records its own TokenizersBackend, which 4.x does not have)."""
    tok.save_pretrained(out_dir)
    path = os.path.join(out_dir, "tokenizer_config.json")
    with open(path) as f:
        config = json.load(f)
    with open(path, "w") as f:
        json.dump({**config, "tokenizer_class": "PreTrainedTokenizerFast"}, f, indent=2)


# the files an export writes (transformers 4.x and 5.x, a sharded model's too): --overwrite replaces only a dir of these
EXPORT_FILES = re.compile(r"(config|generation_config|tokenizer|tokenizer_config|special_tokens_map)\.json|"
                          r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json|chat_template\.jinja")


def check_out_dir(out_dir, overwrite):
    """Refuse (ValueError, one line) an existing out_dir unless overwrite is set and it is a previous export: a
    directory of the files an export writes and nothing else (no checkpoint, run, repository, working directory)."""
    if not os.path.lexists(out_dir):
        return
    path = os.path.realpath(out_dir)
    if os.path.commonpath([path, os.path.realpath(os.getcwd())]) == path:
        raise ValueError(f"{out_dir} is the working directory or holds it; pass another --out_dir")
    if not os.path.isdir(out_dir) or os.path.islink(out_dir):
        raise ValueError(f"{out_dir} exists and is not a directory an export wrote; pass another --out_dir")
    others = sorted(name for name in os.listdir(out_dir) if not EXPORT_FILES.fullmatch(name)
                    or os.path.islink(os.path.join(out_dir, name)) or not os.path.isfile(os.path.join(out_dir, name)))
    if others:
        names = ", ".join(others[:4]) + (f" and {len(others) - 4} more" if len(others) > 4 else "")
        raise ValueError(f"{out_dir} holds {names}, which an export does not write; pass another --out_dir "
                         "(--overwrite replaces only a previous export)")
    if not overwrite:
        raise ValueError(f"{out_dir} exists; pass --overwrite to replace it, or another --out_dir")


def write_dir(out_dir, overwrite, write):
    """write(dir) into a new directory beside out_dir, then rename it to out_dir; a previous export there (checked
    again: check_out_dir) is moved aside first and deleted once the new one is in place."""
    out_dir = os.path.abspath(out_dir)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    stage = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", dir=os.path.dirname(out_dir))  # a new name
    try:
        new = os.path.join(stage, "new")
        os.mkdir(new)  # the umask's permissions, not mkdtemp's 0700
        write(new)
        check_out_dir(out_dir, overwrite)
        old = os.path.join(stage, "old")
        try:
            if os.path.exists(out_dir):
                os.replace(out_dir, old)
            os.replace(new, out_dir)
        except BaseException:  # an error, or Ctrl-C between the two renames: the previous export goes back
            if os.path.exists(old) and not os.path.exists(out_dir):
                os.replace(old, out_dir)
            raise
    finally:
        shutil.rmtree(stage)


def main(argv=None):
    p = ArgumentParser(prog="export_hf.py", description="Export a train.py checkpoint as a Hugging Face model dir.")
    p.add_argument("--ckpt", required=True, help="a train.py checkpoint, e.g. out/tiny/ckpt.pt, or a run's out_dir")
    p.add_argument("--out_dir", required=True,
                   help="the directory to write (it must not exist, or hold a previous export and --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace out_dir if it holds a previous export")
    p.add_argument("--tokenizer",
                   help="for a checkpoint that does not record it: the tokenizer of its data (byte, gpt2)")
    try:
        args = p.parse_args(argv)
        check_out_dir(args.out_dir, args.overwrite)
        import_transformers()
        model, info = load_model(args.ckpt, torch.device("cpu"))
        enc, eot_id = checkpoint_tokenizer(info, args.tokenizer)
        hf, tok = hf_model(model, eot_id), hf_tokenizer(enc, eot_id, model.config.max_seq_len)
        write_dir(args.out_dir, args.overwrite, lambda d: (hf.save_pretrained(d), save_tokenizer(tok, d)))
    except (ValueError, OSError) as e:  # bad input (DataError is a ValueError), an out_dir it cannot write
        sys.exit(f"error: {e}")
    print(f"wrote {args.out_dir}: LlamaForCausalLM with the weights of {info['path']} (step {info['step']}, "
          f"{model.num_params():,} parameters in {hf.dtype}) and tokenizer {enc.name}; load it with "
          f"transformers.AutoModelForCausalLM.from_pretrained({args.out_dir!r})")


if __name__ == "__main__":
    main(sys.argv[1:])
