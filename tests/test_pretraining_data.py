"""The data pipeline: mixture proportions, packing, per-process shards, resumable stream, clear errors."""

import itertools
import json
from collections import Counter

import pytest
import torch

from parameternet_llm.training.data import (
    DataError,
    PackedBlocks,
    Source,
    build_pretraining_data,
    mixture,
    open_source,
    open_sources,
    tokenize_documents,
    training_documents,
)


def write_jsonl(path, texts, field="text"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({field: text}) + "\n" for text in texts))
    return path


@pytest.fixture
def three_sources(tmp_path):
    specs = []
    for name, weight in [("web", 0.682), ("wiki", 0.205), ("arxiv", 0.114)]:
        for shard in range(2):
            write_jsonl(tmp_path / name / f"{shard}.jsonl", [f"{name} document {shard}-{i}" for i in range(400)])
        specs.append({"name": name, "weight": weight, "files": str(tmp_path / name / "*.jsonl")})
    return specs


def test_mixture_follows_the_weights(three_sources):
    opened = open_sources(three_sources)
    drawn = Counter(
        doc["text"].split()[0]
        for doc in itertools.islice(
            mixture([stream for _, stream in opened], [s.weight for s, _ in opened], seed=0), 3000
        )
    )
    total = sum(drawn.values())
    for source in three_sources:
        share = source["weight"] / sum(s["weight"] for s in three_sources)
        sigma = (share * (1 - share) / total) ** 0.5
        assert abs(drawn[source["name"]] / total - share) < 4 * sigma, (drawn, source)


def test_mixture_is_seeded(three_sources):
    def first(seed):
        stream = training_documents(open_sources(three_sources), seed, validation_documents=0)
        return [doc["text"] for doc in stream.take(50)]

    assert first(1) == first(1) and first(1) != first(2)


def test_two_processes_get_disjoint_documents(three_sources):
    opened = open_sources(three_sources)
    seen = [{doc["text"] for doc in training_documents(opened, 0, 10, rank, 2).take(300)} for rank in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 300 and not seen[0] & seen[1]


def test_validation_documents_are_held_out_of_training(three_sources):
    opened = open_sources(three_sources)
    train = {doc["text"] for doc in training_documents(opened, 0, validation_documents=5).take(2000)}
    for _, stream in opened:
        held_out = [doc["text"] for doc in stream.take(5)]
        assert not train & set(held_out)


class CharTokenizer:
    """One id per character, EOS = 0: packing checks can read the tokens back."""

    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[ord(c) for c in text] for text in texts]}


def test_packing_concatenates_documents_with_eos(tmp_path):
    texts = ["alpha", "be", "gamma delta", "x" * 30]
    source = Source("docs", 1.0, files=[str(write_jsonl(tmp_path / "d.jsonl", texts))])
    tokens = lambda: tokenize_documents(open_source(source), CharTokenizer())  # noqa: E731
    blocks = list(PackedBlocks(tokens, seq_len=8, repeat=False))
    stream = [t for text in texts for t in [ord(c) for c in text] + [0]]
    assert all(len(block) == 8 for block in blocks)
    assert [t for block in blocks for t in block.tolist()] == stream[: 8 * len(blocks)]
    assert len(blocks) == len(stream) // 8


def test_resumed_stream_continues_where_it_stopped_across_epochs(tmp_path):
    source = Source("docs", 1.0, files=[str(write_jsonl(tmp_path / "d.jsonl", [f"doc {i} " * 3 for i in range(10)]))])
    tokens = lambda: tokenize_documents(open_source(source), CharTokenizer())  # noqa: E731
    reference = PackedBlocks(tokens, seq_len=16)
    stream = iter(reference)
    [next(stream) for _ in range(7)]
    state = json.loads(json.dumps(reference.state_dict()))  # checkpoints store it as JSON
    expected = [next(stream).tolist() for _ in range(40)]  # runs past the end of the data: a new epoch
    assert reference.state_dict()["epoch"] >= 1
    resumed = PackedBlocks(tokens, seq_len=16)
    resumed.load_state_dict(state)
    got = [block.tolist() for block in itertools.islice(resumed, 40)]
    assert got == expected


def test_skipped_blocks_are_passed_over_once_and_not_again_on_resume(tmp_path):
    source = Source("docs", 1.0, files=[str(write_jsonl(tmp_path / "d.jsonl", [f"doc {i} " * 3 for i in range(10)]))])
    tokens = lambda: tokenize_documents(open_source(source), CharTokenizer())  # noqa: E731
    everything = [block.tolist() for block in itertools.islice(PackedBlocks(tokens, seq_len=16), 12)]
    skipping = PackedBlocks(tokens, seq_len=16, skip=5)
    stream = iter(skipping)
    assert [next(stream).tolist() for _ in range(3)] == everything[5:8]
    resumed = PackedBlocks(tokens, seq_len=16, skip=5)
    resumed.load_state_dict(json.loads(json.dumps(skipping.state_dict())))
    assert [block.tolist() for block in itertools.islice(resumed, 4)] == everything[8:12]


def test_validation_blocks_are_the_same_on_every_process(three_sources, tmp_path):
    tokenizer = CharTokenizer()
    opened = open_sources(three_sources)
    data = [build_pretraining_data(opened, tokenizer, 32, 0, 20, 6, rank, 2) for rank in (0, 1)]
    assert len(data[0].validation) == 6
    assert all((a == b).all() for a, b in zip(data[0].validation, data[1].validation, strict=True))
    with pytest.raises(DataError, match="validation"):
        build_pretraining_data(opened, tokenizer, 10_000, 0, 1, 2)


def test_missing_files_name_the_source(tmp_path):
    with pytest.raises(DataError, match="'wiki': no file matches"):
        open_source(Source("wiki", 1.0, files=[str(tmp_path / "nothing" / "*.jsonl")]))


def test_empty_source_is_named(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="'arxiv' is empty"):
        open_source(Source("arxiv", 1.0, files=[str(tmp_path / "empty.jsonl")]))


def test_wrong_text_field_is_named(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ["hello"], field="content")
    with pytest.raises(DataError, match="no field 'text'.*content"):
        open_source(Source("web", 1.0, files=[str(path)]))
    assert next(iter(open_source(Source("web", 1.0, files=[str(path)], text_field="content"))))["text"] == "hello"


def test_text_and_parquet_files_are_read(tmp_path):
    (tmp_path / "a.txt").write_text("line one\nline two\n")
    assert [d["text"] for d in open_source(Source("txt", 1.0, files=[str(tmp_path / "a.txt")]))] == [
        "line one",
        "line two",
    ]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["p1", "p2"], "id": [1, 2]}), tmp_path / "b.parquet")
    assert [d["text"] for d in open_source(Source("pq", 1.0, files=[str(tmp_path / "b.parquet")]))] == ["p1", "p2"]


def test_unreachable_hub_dataset_fails_with_its_name():
    with pytest.raises(DataError, match="'c4': cannot open hub dataset 'allenai/c4'"):
        open_source(Source("c4", 1.0, hub={"path": "allenai/c4", "name": "en", "split": "train"}))


def test_eos_is_required():
    class NoEos(CharTokenizer):
        eos_token_id = None

    with pytest.raises(DataError, match="EOS"):
        tokenize_documents(None, NoEos())


@pytest.mark.parametrize("bad", ['{"text": null}', '{"title": "no text here"}', '{"text": 42}'])
def test_a_document_without_text_deep_in_a_source_is_named(tmp_path, bad):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps({"text": f"document {i}"}) for i in range(300)]
    lines.insert(250, bad)
    path.write_text("\n".join(lines) + "\n")
    stream = iter(open_source(Source("web", 1.0, files=[str(path)])))
    assert [next(stream)["text"] for _ in range(250)][-1] == "document 249"
    with pytest.raises(DataError, match=r"data source 'web' \(files .*d.jsonl.*\): document 250 .* has no text"):
        next(stream)


def test_a_malformed_jsonl_line_is_named_by_file_and_line(tmp_path):
    """Where reading fails, at the start or mid-run (here, a reader error from the stream), the line is named."""
    from parameternet_llm.training.train import next_batch

    lines = [json.dumps({"text": f"document number {i} of the web source"}) for i in range(400)]
    lines.insert(350, '{"text": "cut short')
    path = tmp_path / "web" / "0.jsonl"
    path.parent.mkdir()
    path.write_text("\n".join(lines) + "\n")
    specs = [{"name": "web", "weight": 1.0, "files": str(tmp_path / "web" / "*.jsonl")}]
    named = rf"data source 'web': {path} line 351 is not a JSON record"
    with pytest.raises(DataError, match=named):
        open_sources(specs)

    def reader_failing_mid_run():
        yield torch.zeros(4, dtype=torch.long)
        raise ValueError("JSON parse error: Missing a closing quotation mark in string. in row 350")

    batches = reader_failing_mid_run()
    assert next_batch(batches, specs).shape == (4,)
    with pytest.raises(DataError, match=named):
        next_batch(batches, specs)


def test_resume_inside_a_long_document_at_every_block_keeps_a_small_state(tmp_path):
    texts = ["short one", "y" * 1000, "tail", "z" * 37]
    source = Source("docs", 1.0, files=[str(write_jsonl(tmp_path / "d.jsonl", texts))])
    tokens = lambda: tokenize_documents(open_source(source), CharTokenizer())  # noqa: E731
    reference = PackedBlocks(tokens, seq_len=16, skip=3)
    stream = iter(reference)
    states, blocks = [], []
    for _ in range(150):  # past two epochs of ~66 blocks
        blocks.append(next(stream).tolist())
        states.append(json.loads(json.dumps(reference.state_dict())))
    assert max(len(json.dumps(state)) for state in states) < 2000  # not the long document's remaining tokens
    for index in (0, 1, 30, 62, 63, 64, 65, 100):
        resumed = PackedBlocks(tokens, seq_len=16, skip=3)
        resumed.load_state_dict(states[index])
        got = [block.tolist() for block in itertools.islice(resumed, 20)]
        assert got == blocks[index + 1 : index + 21], index


def test_a_stream_state_of_the_earlier_format_resumes(tmp_path):
    source = Source("docs", 1.0, files=[str(write_jsonl(tmp_path / "d.jsonl", [f"doc {i} " * 3 for i in range(10)]))])
    tokens = lambda: tokenize_documents(open_source(source), CharTokenizer())  # noqa: E731
    everything = [block.tolist() for block in itertools.islice(PackedBlocks(tokens, seq_len=16), 8)]
    stream = tokens()
    documents = iter(stream)
    read = [token for _ in range(3) for token in next(documents)["input_ids"]]
    handed_out = len(read) // 16
    assert len(read) % 16  # the earlier format kept the rest of the last document in "buffer"
    earlier = {"epoch": 0, "buffer": read[handed_out * 16 :], "tokens": stream.state_dict()}
    resumed = PackedBlocks(tokens, seq_len=16)
    resumed.load_state_dict(json.loads(json.dumps(earlier)))
    got = [block.tolist() for block in itertools.islice(resumed, 3)]
    assert got == everything[handed_out : handed_out + 3]
