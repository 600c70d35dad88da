"""Shared fixtures: a tiny C4-format corpus of generated English-like text, and it prepared as bytes."""
import gzip
import json
import random

import pytest

SUBJECTS = ["the cat", "a small dog", "my old friend", "the teacher", "our neighbour", "the young girl",
            "a tired farmer", "the little bird", "his brother", "the baker"]
VERBS = ["sees", "likes", "finds", "carries", "paints", "wants", "cleans", "watches", "buys", "opens"]
OBJECTS = ["the red ball", "a green apple", "the wooden door", "a long letter", "the big house",
           "a cup of tea", "the blue car", "a warm coat", "the quiet garden", "some fresh bread"]
PLACES = ["in the morning", "at night", "near the river", "after school", "in the kitchen", "on sunday"]


def sentence(rng):
    s = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
    if rng.random() < 0.5:
        s += f" {rng.choice(PLACES)}"
    return s[0].upper() + s[1:] + "."


def document(rng):
    return " ".join(sentence(rng) for _ in range(rng.randint(2, 8)))


def write_c4_file(path, docs):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i, text in enumerate(docs):
            f.write(json.dumps({"text": text, "timestamp": "2019-04-25T12:57:54Z",
                                "url": f"https://example.com/{i}"}) + "\n")


def make_c4_source(root, n_train=(150, 150), n_val=80, seed=0):
    """A dir laid out like a local allenai/c4 clone; returns {relative path: [documents]}."""
    rng = random.Random(seed)
    (root / "en").mkdir(parents=True)
    files = {f"en/c4-train.{i:05d}-of-01024.json.gz": n for i, n in enumerate(n_train)}
    files["en/c4-validation.00000-of-00008.json.gz"] = n_val
    docs = {}
    for name, n in files.items():
        docs[name] = [document(rng) for _ in range(n)]
        write_c4_file(root / name, docs[name])
    return docs


@pytest.fixture(scope="session")
def c4_source(tmp_path_factory):
    root = tmp_path_factory.mktemp("c4")
    make_c4_source(root)
    return root


@pytest.fixture(scope="session")
def byte_data(c4_source, tmp_path_factory):
    import prepare_c4
    out = tmp_path_factory.mktemp("byte_data")
    prepare_c4.main(["--out_dir", str(out), "--data_dir", str(c4_source), "--tokenizer", "byte",
                     "--train_shards", "2", "--workers", "1", "--shard_tokens", "40000"])
    return out
