"""A generated C4-like corpus: gzipped json-lines files of templated English sentences, laid out like a local
allenai/c4 clone (en/c4-train.*.json.gz, en/c4-validation.*.json.gz). Offline stand-in data for the tests,
bench.py data and trying the tools; not real text, so any optimizer learns it in a few hundred steps.

python -m tools.make_corpus --out_dir data/gen_c4 --train_docs 30000 --val_docs 3000
python prepare_c4.py --out_dir data/gen_byte --data_dir data/gen_c4 --tokenizer byte
"""
import argparse
import gzip
import json
import os
import pathlib
import random
import sys

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
    """docs (a list of str) -> a gzipped json-lines file with C4's fields (text, timestamp, url)."""
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i, text in enumerate(docs):
            f.write(json.dumps({"text": text, "timestamp": "2019-04-25T12:57:54Z",
                                "url": f"https://example.com/{i}"}) + "\n")


def make_c4_source(root, n_train=(150, 150), n_val=80, seed=0):
    """Write a dir laid out like a local allenai/c4 clone under root (a pathlib.Path that must not hold an en/
    dir yet): one train file per entry of n_train with that many documents, one val file of n_val.
    Returns {relative path: [documents]}; the same seed gives the same files."""
    rng = random.Random(seed)
    (root / "en").mkdir(parents=True)
    files = {f"en/c4-train.{i:05d}-of-01024.json.gz": n for i, n in enumerate(n_train)}
    files["en/c4-validation.00000-of-00008.json.gz"] = n_val
    docs = {}
    for name, n in files.items():
        docs[name] = [document(rng) for _ in range(n)]
        write_c4_file(root / name, docs[name])
    return docs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out_dir", required=True, help="the corpus goes to OUT_DIR/en/ (which must not exist)")
    p.add_argument("--train_docs", type=int, default=30000, help="documents in the one train file")
    p.add_argument("--val_docs", type=int, default=3000, help="documents in the one val file")
    p.add_argument("--seed", type=int, default=0)
    # 1, as other errors
    p.error = lambda message: sys.exit(f"error: {message}; see python -m tools.make_corpus --help")
    args = p.parse_args(argv)
    if args.train_docs < 1 or args.val_docs < 1:
        sys.exit("error: --train_docs and --val_docs must be positive")
    root = pathlib.Path(args.out_dir)
    if (root / "en").exists():
        sys.exit(f"error: {root / 'en'} exists already; give another --out_dir or remove it")
    make_c4_source(root, n_train=(args.train_docs,), n_val=args.val_docs, seed=args.seed)
    print(f"wrote {args.train_docs:,} train and {args.val_docs:,} val documents to {os.path.join(args.out_dir, 'en')}")


if __name__ == "__main__":
    main()
