"""Shared fixtures: a tiny generated C4-format corpus (make_corpus.py), and it prepared as bytes."""
import pytest

from tools.make_corpus import make_c4_source


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
