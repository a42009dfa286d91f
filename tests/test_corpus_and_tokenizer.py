"""The embedded corpus (deterministic, three styles, states the world's facts) and the tokenizer."""

import json

import pytest
from transformers import AutoTokenizer

from parameternet_llm.demo import corpus as corpus_module
from parameternet_llm.demo.corpus import SOURCES, World, generate_corpus
from parameternet_llm.training.tokenizer import TokenizerError, load_tokenizer, train_tokenizer
from parameternet_llm_cli import main


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return generate_corpus(tmp_path_factory.mktemp("c") / "corpus", num_tokens=200_000, seed=3, world_scale=1)


def read_source(corpus, source):
    return [
        json.loads(line)["text"]
        for path in sorted((corpus / source).glob("*.jsonl"))
        for line in path.read_text().splitlines()
    ]


def test_corpus_is_deterministic_and_seeded(corpus, tmp_path):
    again = generate_corpus(tmp_path / "again", num_tokens=200_000, seed=3, world_scale=1)
    other = generate_corpus(tmp_path / "other", num_tokens=200_000, seed=4, world_scale=1)
    for source in SOURCES:
        assert read_source(corpus, source) == read_source(again, source)
        assert read_source(corpus, source) != read_source(other, source)


def test_a_corpus_is_reused_only_when_complete_and_made_with_the_same_arguments(tmp_path, monkeypatch):
    path = tmp_path / "corpus"
    generate_corpus(path, num_tokens=20_000, seed=3, world_scale=1, shards_per_source=6)
    made = (path / "manifest.json").stat().st_mtime_ns
    generate_corpus(path, num_tokens=20_000, seed=3, world_scale=1, shards_per_source=6)
    assert (path / "manifest.json").stat().st_mtime_ns == made  # reused, world_scale included
    generate_corpus(path, num_tokens=20_000, seed=3, world_scale=1, shards_per_source=2)
    assert sorted(p.name for p in (path / "web").iterdir()) == ["web-000.jsonl", "web-001.jsonl"]  # no stale shards

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setitem(corpus_module.WRITERS, "wiki", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generate_corpus(path, num_tokens=20_000, seed=3, world_scale=1, shards_per_source=6)
    assert not (path / "manifest.json").exists()  # the next call makes it again


def test_corpus_size_and_proportions(corpus):
    words = {source: sum(len(text.split()) for text in read_source(corpus, source)) for source in SOURCES}
    total_tokens = sum(words.values()) * 1.3
    assert 180_000 <= total_tokens <= 240_000
    assert words["web"] > words["wiki"] > words["arxiv"]
    manifest = json.loads((corpus / "manifest.json").read_text())
    assert manifest["seed"] == 3 and set(manifest["documents"]) == set(SOURCES)


def test_sources_look_like_web_encyclopedia_and_latex(corpus):
    assert all(
        text.startswith(r"\documentclass{article}") and r"\end{document}" in text
        for text in read_source(corpus, "arxiv")
    )
    wiki = read_source(corpus, "wiki")
    assert all("\n\n" in text and "See also" in text for text in wiki)
    web = read_source(corpus, "web")
    assert all(
        text.splitlines()[0] in ("Home | About | Contact", "Menu  Search  Log in", "Skip to content") for text in web
    )


def test_corpus_states_the_worlds_facts(corpus):
    world = World.generate(3, scale=1)  # small enough for 200k tokens to state every city's and country's facts
    assert json.loads((corpus / "world.json").read_text())["cities"][0]["name"] == world.cities[0].name
    text = "\n".join(t for source in SOURCES for t in read_source(corpus, source))
    for city in world.cities:
        assert (
            city.river in text
            and f"{city.name} is famous for its {city.product}" in text
            or f"The {city.product} of {city.name}" in text
            or f"{city.name} has traded in {city.product}" in text
        )
    for country in world.countries:
        assert (
            f"capital of {country.name} is {country.capital}" in text
            or f"{country.capital} is the capital of {country.name}" in text
        )


def test_tokenizer_is_llama_style_and_loads_with_autotokenizer(corpus, tmp_path):
    train_tokenizer(read_source(corpus, "wiki")[:500], tmp_path / "tok", vocab_size=600)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    text = "Founded in 1626, naïve Zürich ☃."
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == 1 and tokenizer.decode(ids, skip_special_tokens=True) == text
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert {"1", "6", "2"} <= set(pieces) and "1626" not in pieces  # digits split
    assert any(p.startswith("<0x") for p in pieces)  # byte fallback for unseen characters
    assert (tmp_path / "tok" / "tokenizer.model").is_file()


def test_cli_makes_corpus_and_trains_tokenizer(tmp_path, capsys):
    main(["make-corpus", "--output", str(tmp_path / "c"), "--num-tokens", "30000", "--seed", "1"])
    main(
        [
            "train-tokenizer",
            "--files",
            str(tmp_path / "c" / "wiki" / "*.jsonl"),
            "--output",
            str(tmp_path / "t"),
            "--vocab-size",
            "400",
            "--max-documents",
            "300",
        ]
    )
    assert "tokenizer to" in capsys.readouterr().out
    assert len(load_tokenizer(tmp_path / "t")) <= 400


def test_unknown_tokenizer_is_named(tmp_path):
    with pytest.raises(TokenizerError, match="no/such/tokenizer"):
        load_tokenizer(tmp_path / "no/such/tokenizer")


def test_a_vocabulary_too_small_for_the_characters_is_named_and_leaves_nothing(tmp_path):
    texts = ["".join(chr(code) for code in range(0x41, 0x41 + 60)) + " and more"] * 20
    with pytest.raises(TokenizerError, match="training a 10-piece tokenizer for .* failed: Vocabulary size is smaller"):
        train_tokenizer(texts, tmp_path / "tokenizer", vocab_size=10)
    assert not list(tmp_path.iterdir())


def test_a_damaged_tokenizer_directory_is_named_as_such(corpus, tmp_path):
    texts = read_source(corpus, "wiki")[:300]
    train_tokenizer(texts, tmp_path / "tokenizer", vocab_size=512)
    (tmp_path / "tokenizer" / "tokenizer.json").write_text('{"garbage": ')
    (tmp_path / "tokenizer" / "tokenizer.model").write_bytes(b"bad")
    with pytest.raises(TokenizerError, match="tokenizer directory .*tokenizer' is damaged"):
        load_tokenizer(tmp_path / "tokenizer")
