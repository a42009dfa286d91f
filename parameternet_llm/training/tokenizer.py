"""LLaMA-style SentencePiece BPE tokenizers, trained here and saved in transformers' format."""

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerBase

from ..errors import InputError


class TokenizerError(InputError):
    """A tokenizer that cannot be loaded; the message names it."""


VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model")
SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}


def train_tokenizer(texts: Iterable[str], output_dir: str | Path, vocab_size: int = 8000) -> PreTrainedTokenizerBase:
    """Train a SentencePiece BPE model with LLaMA's options (byte fallback, split digits, identity
    normalisation, ids 0/1/2 for <unk>/<s>/</s>) and save it as a transformers LlamaTokenizer."""
    output_dir = Path(output_dir)
    # Written beside its place and moved in when complete, so an interrupted run leaves no half tokenizer.
    staging = output_dir.with_name(f".{output_dir.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    lines = (line for text in texts for line in text.splitlines() if line.strip())
    with tempfile.TemporaryDirectory() as scratch:
        prefix = str(Path(scratch) / "tokenizer")
        try:
            train_sentencepiece(lines, prefix, vocab_size)
        except RuntimeError as error:  # sentencepiece's own checks, e.g. fewer pieces than the characters seen
            shutil.rmtree(staging, ignore_errors=True)
            reason = str(error).split("] ", 1)[-1].splitlines()[0]
            raise TokenizerError(
                f"training a {vocab_size}-piece tokenizer for {output_dir} failed: {reason}"
            ) from error
        tokenizer = LlamaTokenizer.from_pretrained(scratch, add_bos_token=True, **SPECIAL_TOKENS)
        tokenizer.save_pretrained(staging)
        (staging / "tokenizer.model").write_bytes(Path(prefix + ".model").read_bytes())
    output_dir.mkdir(parents=True, exist_ok=True)
    # The vocabulary files last: their presence is what marks a finished tokenizer (see has_tokenizer).
    for path in sorted(staging.iterdir(), key=lambda p: p.name in VOCABULARY_FILES):
        os.replace(path, output_dir / path.name)
    staging.rmdir()
    return load_tokenizer(output_dir)


def train_sentencepiece(lines: Iterator[str], prefix: str, vocab_size: int) -> None:
    """SentencePiece BPE with LLaMA's options, written to `prefix`.model."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=lines,
        model_prefix=prefix,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        character_coverage=0.99995,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        unk_piece=SPECIAL_TOKENS["unk_token"],
        bos_piece=SPECIAL_TOKENS["bos_token"],
        eos_piece=SPECIAL_TOKENS["eos_token"],
        hard_vocab_limit=False,  # a small corpus may support fewer pieces than asked for
        minloglevel=2,
    )


def has_tokenizer(path: str | Path) -> bool:
    return any((Path(path) / name).is_file() for name in VOCABULARY_FILES)


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerBase:
    """A tokenizer directory, or a hub id (which needs the hub or a populated HF cache)."""
    try:
        return AutoTokenizer.from_pretrained(str(name_or_path))
    except (OSError, ValueError) as error:
        cause = f"{error.__class__.__name__}: {str(error).splitlines()[0]}"
        if has_tokenizer(name_or_path):
            raise TokenizerError(f"tokenizer directory {str(name_or_path)!r} is damaged ({cause})") from error
        raise TokenizerError(
            f"could not load tokenizer {str(name_or_path)!r}: not a tokenizer directory, and the hub id could "
            f"not be resolved ({cause})"
        ) from error
