"""Pretraining data: a weighted mixture of text sources, tokenised and packed into fixed-length blocks.

Each source is a hub dataset streamed with `datasets` or local files (jsonl / json / parquet / txt,
globs). Sources are interleaved with seeded probabilities, split across processes with
`split_dataset_by_node` (so the DataLoader is not also sharded by accelerate), tokenised with EOS
after every document and packed. The stream position (the `datasets` state plus the tokens left
over from the last block) is saved with each checkpoint, so a resumed run reads exactly the blocks
an uninterrupted run would have read.
"""

import glob
import itertools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import IterableDataset, concatenate_datasets, interleave_datasets, load_dataset
from datasets.distributed import split_dataset_by_node

from ..errors import InputError

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}


class DataError(InputError):
    """A data source that cannot be used; the message names it."""


@dataclass
class Source:
    """One corpus of the mixture: local `files` (paths or globs) or a `hub` dataset spec."""

    name: str
    weight: float
    files: list[str] | None = None
    hub: dict | None = None
    text_field: str = "text"

    @classmethod
    def from_recipe(cls, spec: dict) -> "Source":
        files = spec.get("files")
        return cls(
            spec["name"],
            float(spec["weight"]),
            [files] if isinstance(files, str) else files,
            spec.get("hub"),
            spec.get("text_field", "text"),
        )


def _resolve_files(source: Source) -> tuple[str, list[str]]:
    paths = sorted(
        {path for pattern in source.files for path in glob.glob(str(Path(pattern).expanduser()), recursive=True)}
    )
    if not paths:
        raise DataError(f"data source {source.name!r}: no file matches {source.files}")
    suffixes = {Path(path).suffix for path in paths}
    unknown = suffixes - FILE_BUILDERS.keys()
    builders = {FILE_BUILDERS[suffix] for suffix in suffixes - unknown}
    if unknown or len(builders) != 1:
        raise DataError(
            f"data source {source.name!r}: files must all be one of {sorted(FILE_BUILDERS)}, "
            f"got suffixes {sorted(suffixes)}"
        )
    return builders.pop(), paths


def open_source(source: Source) -> IterableDataset:
    """The source as a stream of {"text": str}; fails with its name if missing, unreadable or empty."""
    if source.files is not None:
        builder, paths = _resolve_files(source)
        arguments = dict(path=builder, data_files=paths, split="train")
        where = f"files {paths[:3]}{' ...' if len(paths) > 3 else ''}"
    else:
        hub = source.hub
        arguments = dict(
            path=hub["path"],
            name=hub.get("name"),
            split=hub.get("split", "train"),
            revision=hub.get("revision"),
            data_files=hub.get("data_files"),
        )
        where = f"hub dataset {hub['path']!r}"
    try:
        dataset = load_dataset(**arguments, streaming=True)
        first = next(iter(dataset))
    except StopIteration:
        raise DataError(f"data source {source.name!r} is empty ({where})") from None
    except Exception as error:
        hint = (
            " Without network access, point the source at local files instead, or populate the HF datasets cache first."
            if source.hub is not None
            else ""
        )
        malformed = malformed_data(source)
        if malformed is not None:
            raise malformed from error
        message = str(error).splitlines()[0] if str(error) else ""
        raise DataError(
            f"data source {source.name!r}: cannot open {where} ({error.__class__.__name__}: {message}).{hint}"
        ) from error
    if source.text_field not in first:
        raise DataError(f"data source {source.name!r} has no field {source.text_field!r}; fields: {sorted(first)}")
    field = source.text_field

    def text_of(example: dict, index: int) -> dict:
        text = example.get(field)
        if not isinstance(text, str):
            raise DataError(
                f"data source {source.name!r} ({where}): document {index} (0-based, in file order) has no text in "
                f"field {field!r} (got {text!r}); fix or remove it"
            )
        return {"text": text}

    return dataset.map(text_of, with_indices=True).select_columns(["text"])


def malformed_line(source: Source) -> str | None:
    """The first line of the source's local JSON Lines files that is not JSON, as 'FILE line N (...)'; read only
    once reading the source has failed."""
    if source.files is None:
        return None
    _, paths = _resolve_files(source)
    for path in (path for path in paths if path.endswith(".jsonl")):
        with open(path, encoding="utf-8", errors="replace") as stream:
            for number, line in enumerate(stream, 1):
                try:
                    if line.strip():
                        json.loads(line)
                except json.JSONDecodeError as bad:
                    return f"{path} line {number} is not a JSON record ({bad})"
    return None


def malformed_data(source: Source) -> DataError | None:
    """The error naming the source's first malformed line, or None."""
    culprit = malformed_line(source)
    if culprit is None:
        return None
    return DataError(f"data source {source.name!r}: {culprit}; fix or remove that line, then resume")


def unreadable_data(sources: list[Source], error: Exception) -> DataError:
    """The error a failure to read the training data becomes: the malformed line that caused it, named by source,
    file and line, where one is found; else the failure itself."""
    for source in sources:
        malformed = malformed_data(source)
        if malformed is not None:
            return malformed
    message = str(error).splitlines()[0] if str(error) else ""
    return DataError(f"reading the training data failed ({error.__class__.__name__}: {message})")


def split_validation(dataset: IterableDataset, documents: int) -> tuple[IterableDataset, IterableDataset]:
    """(train, validation): the first `documents` documents are held out."""
    return dataset.skip(documents), dataset.take(documents)


def mixture(streams: list[IterableDataset], weights: list[float], seed: int) -> IterableDataset:
    """Interleave the streams, drawing each document from stream i with probability weights[i] / sum."""
    total = sum(weights)
    return interleave_datasets(
        streams, probabilities=[w / total for w in weights], seed=seed, stopping_strategy="all_exhausted"
    )


def tokenize_documents(documents: IterableDataset, tokenizer) -> IterableDataset:
    """{"text"} -> {"input_ids"}, each document followed by EOS."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token to put between documents")

    def encode(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [doc + [eos] for doc in ids]}

    return documents.map(encode, batched=True, batch_size=256, remove_columns=["text"])


class PackedBlocks(torch.utils.data.IterableDataset):
    """Stream of `seq_len`-token blocks from the tokenised documents; endless when `repeat`.

    `make_tokens()` builds the tokenised document stream; it is rebuilt at every epoch. The stream
    position is `state_dict()`: the document stream's state before the document the last block ended in,
    and how many of that document's tokens were handed out. It stays small for documents of any length,
    and `load_state_dict()` resumes right after the last block handed out. A fresh stream passes over
    its first `skip` blocks (data another run trained on).
    """

    def __init__(self, make_tokens: Callable[[], IterableDataset], seq_len: int, repeat: bool = True, skip: int = 0):
        self.make_tokens = make_tokens
        self.seq_len = seq_len
        self.repeat = repeat
        self.skip = skip
        self.state: dict = {"epoch": 0, "tokens": None, "offset": 0}

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        if "buffer" in state:  # saved by an earlier version: the stream after the document, and its tokens left
            state = {"epoch": state["epoch"], "tokens": state["tokens"], "offset": 0, "carry": state["buffer"]}
        self.state = state

    def __iter__(self) -> Iterator[torch.Tensor]:
        epoch, resume_from, offset = self.state["epoch"], self.state["tokens"], self.state["offset"]
        to_skip = self.skip if resume_from is None and epoch == 0 and offset == 0 else 0  # only a fresh stream
        carry: list[int] = list(self.state.get("carry", []))  # tokens of earlier documents not yet in a block
        while True:
            tokens = self.make_tokens()
            fresh_epoch = resume_from is None
            if not fresh_epoch:
                tokens.load_state_dict(resume_from)
            document_start = resume_from
            resume_from = None
            blocks_this_epoch = 0
            for document in tokens:
                ids = document["input_ids"]
                position = offset  # tokens of this document already in blocks (only after a resume)
                offset = 0
                while len(carry) + len(ids) - position >= self.seq_len:
                    end = position + self.seq_len - len(carry)
                    block, carry, position = carry + ids[position:end], [], end
                    self.state = {"epoch": epoch, "tokens": document_start, "offset": position}
                    blocks_this_epoch += 1
                    if to_skip:
                        to_skip -= 1
                        continue
                    yield torch.tensor(block, dtype=torch.long)
                carry = carry + ids[position:]
                document_start = tokens.state_dict()
            epoch += 1
            if not self.repeat:
                return
            if fresh_epoch and blocks_this_epoch == 0:
                raise DataError(f"the training data holds fewer than seq_len={self.seq_len} tokens for this process")


@dataclass
class PretrainingData:
    """Training blocks for one process and the validation blocks (the same on every process)."""

    train: PackedBlocks
    validation: list[torch.Tensor]


def open_sources(source_specs: list[dict]) -> list[tuple[Source, IterableDataset]]:
    sources = [Source.from_recipe(spec) for spec in source_specs]
    return [(source, open_source(source)) for source in sources]


def open_recipe_sources(data_section: dict) -> list[tuple[Source, IterableDataset]]:
    """A recipe's `data.sources`, opened; first the embedded corpus is generated where `data.corpus` asks for it
    (a no-op when it exists)."""
    corpus = data_section["corpus"]
    if corpus is not None:
        from ..demo.corpus import DEFAULT_NUM_TOKENS, WORLD_SCALE, generate_corpus

        generate_corpus(
            corpus["path"],
            corpus.get("num_tokens", DEFAULT_NUM_TOKENS),
            corpus.get("seed", 0),
            world_scale=corpus.get("world_scale", WORLD_SCALE),
        )
    return open_sources(data_section["sources"])


def training_documents(
    opened: list[tuple[Source, IterableDataset]],
    seed: int,
    validation_documents: int,
    rank: int = 0,
    world_size: int = 1,
) -> IterableDataset:
    """This process's share of the training documents: the seeded mixture of every source past its
    held-out documents, split across processes (whole shards where they divide evenly, else every
    world_size-th document)."""
    train_streams = [split_validation(stream, validation_documents)[0] for _, stream in opened]
    documents = mixture(train_streams, [source.weight for source, _ in opened], seed)
    return split_dataset_by_node(documents, rank=rank, world_size=world_size)


def build_pretraining_data(
    opened: list[tuple[Source, IterableDataset]],
    tokenizer,
    seq_len: int,
    seed: int,
    validation_documents: int,
    validation_blocks: int,
    rank: int = 0,
    world_size: int = 1,
    skip_blocks: int = 0,
) -> PretrainingData:
    """This process's training blocks (past its share of the first `skip_blocks`) and the validation blocks."""

    def make_tokens() -> IterableDataset:
        documents = training_documents(opened, seed, validation_documents, rank, world_size)
        return tokenize_documents(documents, tokenizer)

    for source, stream in opened:
        if next(iter(split_validation(stream, validation_documents)[0]), None) is None:
            raise DataError(
                f"data source {source.name!r} has no documents left for training past the {validation_documents} "
                "held out for validation: lower data.validation_documents"
            )
    validation = []
    if validation_blocks > 0:
        held_out = [split_validation(stream, validation_documents)[1] for _, stream in opened]
        packer = PackedBlocks(
            lambda: tokenize_documents(concatenate_datasets(held_out), tokenizer), seq_len, repeat=False
        )
        validation = list(itertools.islice(packer, validation_blocks))
        if not validation:
            raise DataError(
                f"the {validation_documents} held-out documents per source give no {seq_len}-token "
                "validation block; raise data.validation_documents"
            )
    return PretrainingData(PackedBlocks(make_tokens, seq_len, skip=skip_blocks // world_size), validation)
