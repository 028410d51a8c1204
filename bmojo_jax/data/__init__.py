"""Data: synthetic recall tasks (`synthetic`), offline real-text corpora and batches (`text`), the
training loop's data sources built from a training config (`pipeline`), and long-context
evaluation prompts and windows (`long_context`)."""

from bmojo_jax.data.long_context import (ANSWER_TOKENS, COPY_MAX_DISTANCE, RETRIEVAL_LABELS,
                                         RETRIEVAL_TASKS, RetrievalBatch, answer_correct,
                                         answered_rows, copy_test_rows,
                                         copy_training_rows, multikey_needle, passkey,
                                         repeated_span,
                                         retrieval_training_rows, scored_windows, scoring_ends)
from bmojo_jax.data.pipeline import (RETRIEVAL_EVAL_EXAMPLES, SEQ_LEN_ARGUMENTS, SyntheticData,
                                     TextData, load_data)
from bmojo_jax.data.synthetic import (IGNORE_INDEX, SYNTHETIC_TASKS, accuracy,
                                      fuzzy_in_context_recall, in_context_recall, mqar,
                                      noisy_in_context_recall, selective_copying)
from bmojo_jax.data.text import (CORPORA, SPLITS, TOKENIZER_FILES, BPETokenizer, Corpus,
                                 MissingDataError, WordTokenizer, austen_documents,
                                 cached_bpe_tokenizer, check_token_ids, default_cache_dir,
                                 document_segments, end_of_text_id, lm_batch, lm_eval_batches, load_corpus, load_tokenizer, ptb_text,
                                 read_text_files, save_tokenizer, shakespeare_documents,
                                 split_documents, text_fingerprint, tokenizer_path)

__all__ = [
    "IGNORE_INDEX", "SYNTHETIC_TASKS", "accuracy", "mqar", "in_context_recall",
    "noisy_in_context_recall", "fuzzy_in_context_recall", "selective_copying",
    "CORPORA", "SPLITS", "Corpus", "load_corpus", "MissingDataError", "default_cache_dir",
    "ptb_text", "shakespeare_documents", "austen_documents", "read_text_files", "split_documents",
    "WordTokenizer", "BPETokenizer", "cached_bpe_tokenizer", "check_token_ids", "lm_batch",
    "lm_eval_batches", "TextData", "SyntheticData", "SEQ_LEN_ARGUMENTS", "load_data",
    "TOKENIZER_FILES", "save_tokenizer", "load_tokenizer", "tokenizer_path", "text_fingerprint",
    "end_of_text_id", "document_segments", "RetrievalBatch", "passkey", "multikey_needle",
    "answer_correct", "ANSWER_TOKENS", "answered_rows", "scoring_ends", "scored_windows",
    "RETRIEVAL_LABELS", "RETRIEVAL_TASKS", "retrieval_training_rows", "RETRIEVAL_EVAL_EXAMPLES",
    "COPY_MAX_DISTANCE", "copy_training_rows", "repeated_span", "copy_test_rows",
]
