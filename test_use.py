"""Tests for sample.py, eval.py and export_hf.py on real train.py checkpoints (tiny runs on the byte_data fixture):
the HF export's logits and greedy generate against ours, seeded sampling, the tokenizer conversion against tiktoken
(offline, on a small BPE trained here), eval against the logged val_loss and 2 processes against 1, bad input.
CPU, offline; the transformers tests are skipped without it."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tiktoken
import torch
import torch.nn.functional as F
from tiktoken._educational import bpe_train  # tiktoken's reference BPE trainer
from tiktoken_ext.openai_public import r50k_pat_str  # gpt2's and r50k_base's split pattern

import eval as eval_py  # eval.py
import export_hf
import sample
import train
from data import Windows, load_meta
from test_train import HERE, read_log, tiny_args

DTYPES = ("float32", "bfloat16", "mixed")
PROMPT = "The "


@pytest.fixture(scope="module")
def runs(byte_data, tmp_path_factory):
    """dtype -> the out_dir of a finished 20-step tiny run in that dtype."""
    out = {}
    for dtype in DTYPES:
        out[dtype] = str(tmp_path_factory.mktemp(f"run_{dtype}"))
        train.main(tiny_args(byte_data, out[dtype], dtype=dtype, max_steps=20))
    return out


def ckpt_of(run):
    return os.path.join(run, "ckpt.pt")


def exit_message(main, argv):
    """The message main(argv) exits with: one line, and at most one more, indented, of detail."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    lines = e.value.code.split("\n") if isinstance(e.value.code, str) else None
    assert lines and (len(lines) == 1 or len(lines) == 2 and lines[1].startswith("  ")), e.value.code
    return e.value.code


def sample_text(capsys, run, *args):
    sample.main(["--ckpt", ckpt_of(run), "--max_new_tokens", "20", *args])
    return capsys.readouterr().out


def eval_output(capsys, argv):
    """eval.py's loss and ppl, as printed (repr floats), and its first line."""
    eval_py.main(argv)
    head, last = capsys.readouterr().out.strip().splitlines()[-2:]
    loss, ppl = (float(part.split()[1]) for part in last.split(" | "))
    return loss, ppl, head


def prompt_ids(run):
    model, info = sample.load_model(ckpt_of(run), torch.device("cpu"))
    enc, eot_id = sample.checkpoint_tokenizer(info)
    return model, sample.encode_prompt(enc, eot_id, PROMPT, model.config.max_seq_len), enc


def hf_export(run, tmp_path, name="hf"):
    pytest.importorskip("transformers", reason="transformers not installed: export tests skipped")
    out = str(tmp_path / name)
    export_hf.main(["--ckpt", ckpt_of(run), "--out_dir", out])
    return out


# -----------------------------------------------------------------------------
# the loader

@pytest.mark.parametrize("dtype,param_dtype", [("float32", torch.float32), ("bfloat16", torch.bfloat16),
                                               ("mixed", torch.float32)])
def test_load_model_is_the_trained_model(runs, dtype, param_dtype):
    model, info = sample.load_model(runs[dtype], torch.device("cpu"))  # an out_dir: its ckpt.pt
    saved = torch.load(ckpt_of(runs[dtype]), weights_only=True)
    assert info["path"] == ckpt_of(runs[dtype]) and info["step"] == 20 and info["vocab_size"] == 257
    assert (info["tokenizer"], info["eot_id"], info["config"]["dtype"]) == ("byte", 256, dtype)
    assert not model.training and model.config.max_seq_len == 32
    for k, p in model.state_dict().items():  # bfloat16 (bf16="stochastic", the default): fp32 norm gains
        assert p.dtype == (torch.float32 if "norm" in k else param_dtype) and torch.equal(p, saved["model"][k]), k
    assert model.rope_cos.dtype == param_dtype  # as train.py's model: .to(bf16) casts the rotary tables too


def test_checkpoint_of_pure_bf16_loads_in_its_dtypes(runs, tmp_path):
    # a bf16="paper" checkpoint, or one older than the bf16 key (which ran the paper's pure bf16): all bf16
    ckpt = torch.load(ckpt_of(runs["bfloat16"]), weights_only=True)
    for config in ({**ckpt["config"], "bf16": "paper"}, {k: v for k, v in ckpt["config"].items() if k != "bf16"}):
        torch.save({**ckpt, "config": config, "model": {k: v.bfloat16() for k, v in ckpt["model"].items()}},
                   tmp_path / "ckpt.pt")
        model, _ = sample.load_model(str(tmp_path / "ckpt.pt"), torch.device("cpu"))
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())


# -----------------------------------------------------------------------------
# sample.py

def test_greedy_is_deterministic(runs, capsys):
    model, ids, enc = prompt_ids(runs["float32"])
    a, b = (sample.generate(model, torch.tensor([ids]), 20, temperature=0) for _ in range(2))
    assert torch.equal(a, b) and a.shape == (1, len(ids) + 20) and a[0, :len(ids)].tolist() == ids
    # each greedy token is the argmax of the model's logits on what came before
    logits = model(a[:, :-1])[0]
    assert a[0, len(ids):].tolist() == logits[0, len(ids) - 1:].argmax(-1).tolist()
    text = sample_text(capsys, runs["float32"], "--prompt", PROMPT, "--temperature=0")
    assert text == enc.decode(a[0, 1:].tolist(), errors="replace") + "\n"


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(runs, capsys):
    run = runs["float32"]
    one = sample_text(capsys, run, "--seed", "1", "--num_samples", "3")
    assert one == sample_text(capsys, run, "--seed", "1", "--num_samples", "3")
    assert one != sample_text(capsys, run, "--seed", "2", "--num_samples", "3")
    heads = [line for line in one.splitlines() if line.startswith("----------")]
    assert heads == [f"---------- sample {i} of 3 ----------" for i in (1, 2, 3)]
    assert sample_text(capsys, run, "--seed", "1").strip() in one  # sample 1 does not depend on --num_samples
    greedy = sample_text(capsys, run, "--prompt", PROMPT, "--temperature=0")
    for seed in ("1", "2"):
        assert sample_text(capsys, run, "--prompt", PROMPT, "--top_k=1", "--seed", seed) == greedy


def test_generation_beyond_the_context_slides_the_window(runs):
    model, ids, _ = prompt_ids(runs["float32"])
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    out = sample.generate(model, torch.tensor([ids]), 40, temperature=0)  # 5 + 40 tokens > seq_len 32
    assert out.shape[1] == len(ids) + 40 and [x.shape[1] for x in seen] == list(range(5, 32)) + [32] * 13
    assert all(torch.equal(x, out[:, i + 1:i + 33]) for i, x in enumerate(seen[-12:]))  # the last 32 tokens


@pytest.mark.parametrize("dtype", ["bfloat16", "mixed"])
def test_other_dtypes_sample(runs, capsys, dtype):
    text = sample_text(capsys, runs[dtype], "--prompt", PROMPT, "--seed", "3")
    assert text.startswith(PROMPT) and len(text) > len(PROMPT) + 1
    assert text == sample_text(capsys, runs[dtype], "--prompt", PROMPT, "--seed", "3")


def test_old_checkpoint_without_tokenizer_needs_the_flag(runs, tmp_path, capsys):
    ckpt = torch.load(ckpt_of(runs["float32"]), weights_only=True)
    del ckpt["tokenizer"], ckpt["eot_id"]
    old = str(tmp_path / "old.pt")
    torch.save(ckpt, old)
    assert exit_message(sample.main, ["--ckpt", old]) == (
        f"error: {old} does not record its tokenizer (it predates checkpoints that do); pass --tokenizer=NAME, the "
        "\"tokenizer\" in the meta.json of the data it was trained on (e.g. byte)")
    args = ["--prompt", PROMPT, "--temperature=0", "--max_new_tokens", "20"]
    sample.main(["--ckpt", old, "--tokenizer", "byte", *args])
    assert capsys.readouterr().out == sample_text(capsys, runs["float32"], *args)


@pytest.mark.parametrize("args,message", [
    (["--device", "tpu"], "error: unknown device 'tpu'; use cpu, cuda, cuda:N or mps"),
    (["--device", "cuda:x"], "error: unknown device 'cuda:x'; use cpu, cuda, cuda:N or mps"),
    (["--device", "meta"], "error: unknown device 'meta'; use cpu, cuda, cuda:N or mps"),
    (["--device", "cuda:99"], "error: device cuda:99 is not here: this machine has {n} CUDA device(s)"),
    (["--prompt", "x" * 40], "error: the prompt is 41 tokens (with the <|endoftext|> that starts a document), "
                             "more than the model's context of 32 tokens (the run's seq_len); shorten it"),
    (["--temperature=-1"], "error: --temperature must be >= 0 and finite (0 = greedy), got -1.0"),
    (["--top_k=-1"], "error: --top_k must be >= 0, got -1"),
    (["--num_samples=0"], "error: --num_samples must be >= 1, got 0"),
    (["--max_new_tokens=ten"], "error: argument --max_new_tokens: invalid int value: 'ten'; "
                               "see python sample.py --help"),
    (["--tokenizer", "gpt2"], "error: {ckpt} was trained with tokenizer byte, not gpt2: drop --tokenizer"),
])
def test_sample_bad_input_is_one_line(runs, args, message):
    ckpt = ckpt_of(runs["float32"])
    text = exit_message(sample.main, ["--ckpt", ckpt, *args])
    assert text.startswith(message.format(ckpt=ckpt, n=torch.cuda.device_count())), text


def test_prompt_that_fills_the_context_is_accepted(runs, capsys):
    text = sample_text(capsys, runs["float32"], "--prompt", "x" * 31, "--temperature=0")  # 1 + 31 = seq_len tokens
    assert text.startswith("x" * 31)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with CUDA")
def test_cuda_without_a_gpu_is_one_line(runs):
    assert exit_message(sample.main, ["--ckpt", runs["float32"], "--device", "cuda"]) == (
        "error: device cuda is not here: this machine has 0 CUDA device(s) (none); use --device=cpu")


@pytest.mark.parametrize("damage", ["missing", "truncated", "empty", "a dir without one", "another file",
                                    "another torch file"])
def test_missing_damaged_or_other_checkpoint_is_one_line(runs, tmp_path, damage):
    path = str(tmp_path / "ckpt.pt")
    data = open(ckpt_of(runs["float32"]), "rb").read()
    if damage == "another torch file":
        torch.save({"model": {}, "step": 3}, path)
    elif damage != "missing":
        with open(path, "wb") as f:
            f.write({"truncated": data[:len(data) // 2], "empty": b"", "a dir without one": b"",
                     "another file": b"# README\n"}[damage])
    if damage == "a dir without one":
        os.remove(path)
        path = str(tmp_path)
    message = exit_message(sample.main, ["--ckpt", path])
    rest = "; no earlier checkpoint is kept next to it: pass another one"
    expected = {"missing": f"error: no checkpoint at {path}; pass a train.py checkpoint, e.g. --ckpt out/tiny/ckpt.pt",
                "a dir without one": f"error: {path} holds no ckpt.pt; pass a train.py checkpoint or the out_dir of a "
                                     "run that wrote one",
                "empty": f"error: {path} is damaged and cannot be read{rest}\n  it is empty",
                "another file": f"error: {path} is not a train.py checkpoint{rest}\n  not a file torch.save writes",
                "another torch file": f"error: {path} is not a train.py checkpoint{rest}\n  it has no 'config', "
                                      "'optimizers', 'rng'"}
    if damage in expected:
        assert message == expected[damage]
    else:
        assert message.startswith(f"error: {path} is damaged and cannot be read{rest}\n  cut short or corrupted; ")


def test_damaged_checkpoint_names_the_previous_one(runs, tmp_path):
    for name in ("ckpt.pt", "ckpt_prev.pt"):
        data = open(os.path.join(runs["float32"], name), "rb").read()
        (tmp_path / name).write_bytes(data[:-1000] if name == "ckpt.pt" else data)
    assert exit_message(sample.main, ["--ckpt", str(tmp_path)]).splitlines()[0].endswith(
        f"; use the previous checkpoint, {tmp_path}/ckpt_prev.pt, instead")
    sample.main(["--ckpt", str(tmp_path / "ckpt_prev.pt"), "--max_new_tokens", "2"])  # which loads
    (tmp_path / "log.jsonl").write_text("{}\n")  # another file of the run is not a damaged checkpoint
    assert exit_message(sample.main, ["--ckpt", str(tmp_path / "log.jsonl")]) == (
        f"error: {tmp_path}/log.jsonl is not a train.py checkpoint; pass a train.py checkpoint: a run's ckpt.pt, or "
        "its out_dir\n  not a file torch.save writes")


def test_sample_subprocess_error_is_one_line_on_stderr(tmp_path):
    p = subprocess.run([sys.executable, "sample.py", "--ckpt", str(tmp_path / "no.pt")], cwd=HERE,
                       capture_output=True, text=True)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr == (f"error: no checkpoint at {tmp_path}/no.pt; pass a train.py checkpoint, "
                        "e.g. --ckpt out/tiny/ckpt.pt\n")


# -----------------------------------------------------------------------------
# export_hf.py

@pytest.mark.optional
@pytest.mark.parametrize("dtype", DTYPES)
def test_export_round_trip_logits(runs, tmp_path, dtype):
    transformers = pytest.importorskip("transformers", reason="transformers not installed: export tests skipped")
    out = hf_export(runs[dtype], tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # no temporary dir left next to it
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out))
    hf = transformers.LlamaForCausalLM.from_pretrained(out, local_files_only=True).eval()
    model, _ = sample.load_model(runs[dtype], torch.device("cpu"))
    param_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    assert hf.dtype == param_dtype and hf.config.dtype == param_dtype
    assert (hf.config.bos_token_id, hf.config.eos_token_id, hf.config.max_position_embeddings) == (256, 256, 32)
    x, _ = Windows(data_dir_of(runs[dtype]), load_meta(data_dir_of(runs[dtype])), "val", 32).batch(np.arange(4))
    with torch.no_grad():
        ours, theirs = model(x)[0], hf(input_ids=x).logits
    if dtype == "bfloat16":  # the same bf16 numbers: HF's rotary tables are fp32-computed then cast, ours too
        torch.testing.assert_close(theirs, ours, rtol=0, atol=0)
    else:
        torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)


def data_dir_of(run):
    return read_log(run)[0]["config"]["data_dir"]


@pytest.mark.optional
def test_greedy_equals_hf_generate(runs, tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers not installed: export tests skipped")
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_export(runs["float32"], tmp_path), local_files_only=True)
    hf.generation_config.eos_token_id = None  # ours does not stop at <|endoftext|>
    model, ids, _ = prompt_ids(runs["float32"])
    data_dir = data_dir_of(runs["float32"])
    windows, _ = Windows(data_dir, load_meta(data_dir), "val", 32).batch(np.arange(8))
    for x in (torch.tensor([ids]), windows[:, :12]):  # our prompt; 8 prompts of 12 tokens from val text
        ours = sample.generate(model, x, 32 - x.shape[1], temperature=0)  # up to the context of 32
        theirs = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=32 - x.shape[1])
        assert theirs.tolist() == ours.tolist()


@pytest.mark.optional
def test_exported_byte_tokenizer_loads_offline_and_encodes_like_tiktoken(runs, tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers not installed: export tests skipped")
    out = hf_export(runs["float32"], tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    with open(os.path.join(out, "tokenizer_config.json")) as f:  # a class transformers 4.x loads too
        assert json.load(f)["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert list(tok("x")) == ["input_ids", "attention_mask"]  # what generate(**tok(...)) takes: no token_type_ids
    enc = tiktoken_byte()
    for text in TEXTS:  # a text starts with <|endoftext|>, as every training document, unless asked not to
        ids = enc.encode(text, allowed_special="all")
        assert tok.encode(text) == [256, *ids] and tok.encode(text, add_special_tokens=False) == ids, text
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == text.replace("<|endoftext|>", ""), text
    assert tok("a", "b").input_ids == [256, 97, 256, 98]  # a pair as two documents
    assert (tok.eos_token, tok.eos_token_id, tok.bos_token_id, tok.model_max_length) == ("<|endoftext|>", 256, 256, 32)
    assert (tok.pad_token_id, tok.padding_side) == (256, "left")  # batches for generate


def tiktoken_byte():
    from prepare_c4 import get_encoding
    return get_encoding("byte")


TEXTS = ("Hello, world!", "it's they're we'll I'd", "  two  spaces\n\nnewlines\r\n\ttab ", "digits 1234567890 3.14",
         "naïve café Ünïcödé, 日本語のテキスト, 🎉🚀 emoji", "\u00a0nbsp\u2003em space", "a<|endoftext|>b",
         "<|endoftext|>", "\n", "   ", "x" * 300, "")


def toy_bpe():
    """A byte-level BPE tiktoken Encoding like gpt2's (its split pattern, 150 merges trained here on mixed text), with
    <|endoftext|> after the ranks and a second special token after a gap in the ids (as cl100k_base has)."""
    text = " ".join(TEXTS[:6]) * 3 + open(os.path.join(HERE, "README.md")).read()[:4000]
    ranks = bpe_train(text, 256 + 150, r50k_pat_str, visualise=None)
    return tiktoken.Encoding("toy", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": len(ranks), "<|fim|>": len(ranks) + 2})


@pytest.mark.optional
def test_bpe_tokenizer_conversion_encodes_like_tiktoken(tmp_path):
    pytest.importorskip("transformers", reason="transformers not installed: export tests skipped")
    import transformers
    enc = toy_bpe()
    export_hf.hf_tokenizer(enc, enc.eot_token, 64).save_pretrained(str(tmp_path))
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert len(tok) == enc.n_vocab == 409 and tok.convert_tokens_to_ids("<|fim|>") == 408
    assert (tok.eos_token_id, tok.bos_token_id, tok.model_max_length) == (406, 406, 64)
    merged = 0
    readme = open(os.path.join(HERE, "README.md")).read()
    for text in TEXTS + ("the fim<|fim|>token", " the the  the\n the", readme[:3000], readme[-3000:]):
        ids = enc.encode(text, allowed_special="all")
        assert tok.encode(text, add_special_tokens=False) == ids and tok.encode(text) == [406, *ids], text
        assert tok.decode(ids) == enc.decode(ids)
        merged += sum(i >= 256 for i in ids)
    assert merged > 100  # the merges were used, not only bytes


@pytest.mark.optional
def test_conversion_that_does_not_encode_like_tiktoken_writes_nothing(runs, tmp_path, monkeypatch):
    pytest.importorskip("transformers", reason="transformers not installed: export tests skipped")
    enc = tiktoken.Encoding("odd", pat_str=r"[\s\S]+", mergeable_ranks={bytes([i]): i for i in range(256)},
                            special_tokens={"<|endoftext|>": 256})
    monkeypatch.setattr(enc, "encode", lambda text, **kw: [0])  # a tiktoken that disagrees: "x" is [120]
    monkeypatch.setattr(sample, "get_encoding", lambda name: enc)
    monkeypatch.setattr(export_hf, "CHECK_TEXTS", ("x",))
    out = tmp_path / "hf"
    message = exit_message(export_hf.main, ["--ckpt", ckpt_of(runs["float32"]), "--out_dir", str(out)])
    assert message == ("error: the Hugging Face conversion of tokenizer odd encodes 'x' as [256, 120], tiktoken (after "
                       "<|endoftext|>) as [256, 0]; nothing was written (please report this)")
    assert os.listdir(tmp_path) == []


@pytest.mark.optional
def test_export_refuses_an_existing_export_and_overwrite_replaces_it(runs, tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers not installed: export tests skipped")
    out = hf_export(runs["bfloat16"], tmp_path)
    assert exit_message(export_hf.main, ["--ckpt", ckpt_of(runs["float32"]), "--out_dir", out]) == (
        f"error: {out} exists; pass --overwrite to replace it, or another --out_dir")
    assert transformers.AutoConfig.from_pretrained(out).dtype == torch.bfloat16  # untouched
    export_hf.main(["--ckpt", ckpt_of(runs["float32"]), "--out_dir", out, "--overwrite"])
    assert transformers.AutoConfig.from_pretrained(out).dtype == torch.float32
    assert sorted(os.listdir(tmp_path)) == ["hf"]


@pytest.mark.optional
def test_a_swap_cut_short_puts_the_previous_export_back(runs, tmp_path, monkeypatch):
    pytest.importorskip("transformers", reason="transformers not installed: export tests skipped")
    out = hf_export(runs["bfloat16"], tmp_path)
    before, real, raised = tree(out), os.replace, []

    def replace(src, dst):  # Ctrl-C once the previous export is moved aside, before the new one takes its place
        if dst == os.path.abspath(out) and not raised:
            raised.append(src)
            raise KeyboardInterrupt
        real(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        export_hf.main(["--ckpt", ckpt_of(runs["float32"]), "--out_dir", out, "--overwrite"])
    monkeypatch.undo()
    assert raised and tree(out) == before and sorted(os.listdir(tmp_path)) == ["hf"]


def tree(root):
    """Every file and dir under root -> its bytes (None for a dir)."""
    out = {}
    for d, dirs, files in os.walk(root):
        out.update({os.path.join(d, n): None for n in dirs})
        out.update({os.path.join(d, n): open(os.path.join(d, n), "rb").read() for n in files})
    return out


EXPORT = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("case", ["the run", "a repository", "an export and more", "the working directory",
                                  "above the working directory", "a file", "a link to an export"])
def test_export_refuses_a_dir_that_is_not_a_previous_export_and_touches_nothing(runs, tmp_path, monkeypatch, case,
                                                                              overwrite):
    out, ckpt = tmp_path / "out", ckpt_of(runs["float32"])
    if case == "the run":  # --ckpt out/X --out_dir out/X
        out.mkdir()
        for name in ("ckpt.pt", "ckpt_prev.pt", "log.jsonl"):
            (out / name).write_bytes(open(os.path.join(runs["float32"], name), "rb").read())
        ckpt = str(out / "ckpt.pt")
    elif case == "a file":
        out.write_text("notes")
    elif case == "a repository":  # a clone: --out_dir . --overwrite deleted one
        for name in (".git", ".venv", "out"):
            (out / name).mkdir(parents=True)
        for name in ("README.md", "train.py"):
            (out / name).write_text(name)
    else:
        export = tmp_path / "export" if case == "a link to an export" else out
        export.mkdir()
        for name in EXPORT:
            (export / name).write_text(name)
        if case == "an export and more":
            (out / "sub").mkdir()
            (out / "notes.txt").write_text("keep me")
        if case == "a link to an export":
            out.symlink_to(export)
    if case == "the working directory":
        monkeypatch.chdir(out)
    if case == "above the working directory":
        (out / "run").mkdir()
        monkeypatch.chdir(out / "run")
    arg = "." if case == "the working directory" else str(out)
    before = tree(tmp_path)
    message = exit_message(export_hf.main, ["--ckpt", ckpt, "--out_dir", arg] + ["--overwrite"] * overwrite)
    rest = "which an export does not write; pass another --out_dir (--overwrite replaces only a previous export)"
    assert message == {
        "the run": f"error: {out} holds ckpt.pt, ckpt_prev.pt, log.jsonl, {rest}",
        "a repository": f"error: {out} holds .git, .venv, README.md, out and 1 more, {rest}",
        "an export and more": f"error: {out} holds notes.txt, sub, {rest}",
        "the working directory": "error: . is the working directory or holds it; pass another --out_dir",
        "above the working directory": f"error: {out} is the working directory or holds it; pass another --out_dir",
        "a file": f"error: {out} exists and is not a directory an export wrote; pass another --out_dir",
        "a link to an export": f"error: {out} exists and is not a directory an export wrote; pass another --out_dir",
    }[case]
    assert tree(tmp_path) == before  # every file still there, unchanged, and nothing left beside


def test_export_without_transformers_is_one_line(runs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers raises ImportError
    assert exit_message(export_hf.main, ["--ckpt", ckpt_of(runs["float32"]), "--out_dir", str(tmp_path / "hf")]) == (
        "error: export_hf.py needs transformers: pip install transformers")
    assert os.listdir(tmp_path) == []



@pytest.mark.optional
def test_batched_pipeline_generates_sample_py_text(runs, tmp_path, capsys):
    transformers = pytest.importorskip("transformers", reason="transformers not installed: export tests skipped")
    pipe = transformers.pipeline("text-generation", model=hf_export(runs["float32"], tmp_path), batch_size=2)
    capsys.readouterr()  # the export's line
    prompts = ["The ", "And the sea was"]  # of different lengths: the batch is padded
    texts = [out[0]["generated_text"] for out in pipe(prompts, do_sample=False, max_new_tokens=10)]
    assert texts == [sample_text(capsys, runs["float32"], "--prompt", prompt, "--temperature=0",
                                 "--max_new_tokens=10").removesuffix("\n") for prompt in prompts]


def our_logprobs(model, ids):
    """log p(ids[i] | ids[:i]) of our model for i >= 1 (ids within its context), in float64."""
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]]))[0][0].double()
    return logits.log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


def our_rolling(model, ids):
    """The log-likelihood of ids[1:] in windows of the context as lm-evaluation-harness scores a document: the first
    window predicts context tokens, each next one the next context tokens (the last one the rest) after the
    context tokens before them."""
    T, total = model.config.max_seq_len, 0.0
    for first in range(1, len(ids), T):
        last = min(first + T, len(ids))
        window = ids[max(0, last - 1 - T):last]
        total += sum(our_logprobs(model, window)[len(window) - 1 - (last - first):])
    return total


@pytest.mark.optional
def test_lm_eval_scores_the_export_as_our_model_after_one_eot(runs, tmp_path):
    """The README's command (model_args, --system_instruction, --gen_kwargs) on one task of each kind, built here:
    a document's rolling log-likelihood is ours after one <|endoftext|>, a choice's log-likelihood ours after one
    before the context (a description follows it after a blank line), a greedy generation sample.py's."""
    pytest.importorskip("transformers", reason="transformers not installed: export tests skipped")
    lm_eval = pytest.importorskip("lm_eval", reason="lm_eval not installed: lm-evaluation-harness tests skipped")
    pytest.importorskip("accelerate", reason="accelerate not installed (lm_eval's hf model needs it): skipped")
    import datasets  # lm_eval's dependency
    out = hf_export(runs["float32"], tmp_path)

    def task(name, rows, **config):
        data = datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
        return dict(task=name, custom_dataset=lambda **kw: data, test_split="test", **config)

    docs = ["And God said, Let there be light.", "x", "y" * 64,  # 1 to 4 windows of 32 tokens
            "In the beginning God created the heaven and the earth. And the earth was without form, and void."]
    mc = [{"ctx": "And God said", "choices": ["Let", "light", " there be"]}, {"ctx": "The cat sat on the",
                                                                              "choices": ["mat", "dog"]}]
    mc_config = dict(output_type="multiple_choice", doc_to_text="{{ctx}}", doc_to_choice="{{choices}}",
                     doc_to_target="0", metric_list=[{"metric": "acc"}])
    tasks = [task("ppl", [{"text": d} for d in docs], output_type="loglikelihood_rolling", doc_to_text="",
                  doc_to_target="{{text}}", metric_list=[{"metric": "word_perplexity"}]),
             task("mc", mc, **mc_config), task("described", mc, description="Q:", **mc_config),
             task("gen", [{"q": "And God said"}, {"q": "In the"}], output_type="generate_until",
                  doc_to_text="{{q}}", doc_to_target="", metric_list=[{"metric": "exact_match"}],
                  generation_kwargs={"until": ["\n"], "do_sample": False})]
    results = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={out},add_bos_token=False", tasks=tasks,
                                      system_instruction="<|endoftext|>", gen_kwargs="max_gen_toks=8",
                                      batch_size=2, device="cpu", log_samples=True)
    model, _ = sample.load_model(runs["float32"], torch.device("cpu"))
    enc, eot = tiktoken_byte(), 256
    scored = {name: sorted(samples, key=lambda s: s["doc_id"]) for name, samples in results["samples"].items()}
    assert [s["resps"][0][0] for s in scored["ppl"]] == pytest.approx(
        [our_rolling(model, [eot, *enc.encode(d)]) for d in docs], abs=1e-4)
    for name, before in (("mc", ""), ("described", "\n\nQ:")):
        for s, doc in zip(scored[name], mc, strict=True):
            context = [eot, *enc.encode(before + doc["ctx"])]
            assert [r[0][0] for r in s["resps"]] == pytest.approx(
                [sum(our_logprobs(model, context + enc.encode(" " + c))[len(context) - 1:])
                 for c in doc["choices"]], abs=1e-4)
    for s in scored["gen"]:
        ids = [eot, *enc.encode(s["doc"]["q"])]
        new = sample.generate(model, torch.tensor([ids]), 8, temperature=0)[0, len(ids):].tolist()
        assert s["resps"][0][0] == enc.decode(new[:new.index(eot)] if eot in new else new).split("\n")[0]

# -----------------------------------------------------------------------------
# eval.py

@pytest.mark.parametrize("dtype", DTYPES)
def test_eval_equals_the_logged_val_loss_to_the_last_digit(runs, capsys, dtype):
    logged = [r for r in read_log(runs[dtype]) if r["event"] == "eval"][-1]
    loss, ppl, head = eval_output(capsys, ["--ckpt", ckpt_of(runs[dtype])])
    assert logged["step"] == 20 and (loss, ppl) == (logged["val_loss"], logged["val_ppl"])
    assert head.startswith(f"{ckpt_of(runs[dtype])} (step 20) on {data_dir_of(runs[dtype])} val: 2,048 tokens "
                           "(64 windows of 32), batch_size 4, 1 process(es), ")


def test_eval_another_split_equals_cross_entropy(runs, capsys, byte_data):
    run = runs["float32"]
    loss, ppl, head = eval_output(capsys, ["--ckpt", ckpt_of(run), "--data_dir", str(byte_data), "--split", "train",
                                           "--eval_tokens", "1000", "--batch_size", "3"])
    assert " train: 1,024 tokens (32 windows of 32), batch_size 3," in head
    model, _ = sample.load_model(run, torch.device("cpu"))
    x, y = Windows(str(byte_data), load_meta(str(byte_data)), "train", 32).batch(np.arange(32))
    with torch.no_grad():
        ref = F.cross_entropy(model(x)[0].double().view(-1, 257), y.view(-1))
    assert loss == pytest.approx(ref.item(), rel=1e-6) and ppl == pytest.approx(ref.exp().item(), rel=1e-6)
    all_windows = Windows(str(byte_data), load_meta(str(byte_data)), "val", 32).count
    eval_py.main(["--ckpt", ckpt_of(run), "--eval_tokens", "all"])
    assert f" val: {all_windows * 32:,} tokens ({all_windows:,} windows of 32)" in capsys.readouterr().out


@pytest.mark.slow
def test_eval_two_processes_equal_one(runs):
    """2 gloo ranks = 1 process exactly at batch_size 1: each window's loss is the same fp32 number (the same
    forward), and their float64 sums are exact (fp32 values times 32 have few enough bits), in any order."""
    argv = ["eval.py", "--ckpt", ckpt_of(runs["float32"]), "--batch_size", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as torchrun sets it for each of 2 processes
    outputs = []
    for launcher in ([], ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]):
        p = subprocess.run([sys.executable, *launcher, *argv], cwd=HERE, capture_output=True, text=True, env=env)
        assert p.returncode == 0, p.stderr[-3000:]
        outputs.append(p.stdout.strip().splitlines())
    (one_head, one), (two_head, two) = outputs
    assert "1 process(es)" in one_head and "2 process(es)" in two_head
    assert one == two and one.startswith("loss ")


def test_eval_bad_input_is_one_line(runs, byte_data, tmp_path):
    ckpt = ckpt_of(runs["float32"])
    other = tmp_path / "gpt2_data"
    other.mkdir()
    meta = (byte_data / "meta.json").read_text().replace('"tokenizer": "byte"', '"tokenizer": "gpt2"')
    meta = meta.replace('"tokenizer_vocab_size": 257', '"tokenizer_vocab_size": 50257')
    (other / "meta.json").write_text(meta.replace('"vocab_size": 257', '"vocab_size": 50257'))
    cases = {
        ("--data_dir", str(other)): f"error: {other} is tokenized with gpt2 (vocab 50257) but {ckpt} was trained on "
                                    "byte tokens (vocab 257); prepare it with prepare_c4.py --tokenizer byte (that "
                                    "of its training data)",
        ("--eval_tokens", "0"): "error: --eval_tokens must be a positive integer or all, got '0'",
        ("--eval_tokens", "1e9"): "error: --eval_tokens must be a positive integer or all, got '1e9'",
        ("--eval_tokens", "999999"): "error: eval_tokens=999999 needs 31250 val windows of 33 tokens",
        ("--split", "test"): "error: argument --split: invalid choice: 'test' (choose from ",
        ("--batch_size", "0"): "error: --batch_size must be >= 1, got 0",
        ("--device", "tpu"): "error: unknown device 'tpu'; use cpu, cuda, cuda:N or mps",
    }
    for args, message in cases.items():
        text = exit_message(eval_py.main, ["--ckpt", ckpt, *args])
        assert text.startswith(message), text
    assert exit_message(eval_py.main, ["--ckpt", str(tmp_path / "none.pt")]).startswith("error: no checkpoint at")


@pytest.mark.optional
@pytest.mark.slow
def test_compiled_run_checkpoint_samples_evaluates_and_exports(byte_data, tmp_path, capsys):
    out = str(tmp_path / "compiled")
    train.main(tiny_args(byte_data, out, compile=True, max_steps=4, eval_every=4, ckpt_every=4))
    logged = [r for r in read_log(out) if r["event"] == "eval"][-1]
    loss, _, _ = eval_output(capsys, ["--ckpt", out])
    assert loss == logged["val_loss"]  # evaluate runs the eager model in training too
    assert sample_text(capsys, out, "--prompt", PROMPT).startswith(PROMPT)
    pytest.importorskip("transformers", reason="transformers not installed: export skipped")
    export_hf.main(["--ckpt", out, "--out_dir", str(tmp_path / "hf")])
    assert "model.safetensors" in os.listdir(tmp_path / "hf")
