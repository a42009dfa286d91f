"""Recipes: the shipped files load and say what the paper says; bases, overrides and errors."""

import copy
import glob
from pathlib import Path

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from parameternet_llm.accounting import count_parameters
from parameternet_llm.presets import ROUTING_FIELDS
from parameternet_llm.training.recipe import (
    RecipeError,
    load_recipe,
    model_config,
    read_recipe_file,
    resume_changes,
    validate_recipe,
)

REPO = Path(__file__).resolve().parents[1]


RECIPES = sorted(
    p for p in glob.glob(str(REPO / "recipes" / "**" / "*.yaml"), recursive=True) if "/accelerate/" not in p
)


@pytest.mark.parametrize("path", RECIPES)
def test_every_shipped_recipe_is_valid(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths resolve here, where nothing has run yet
    model = read_recipe_file(path).get("model") or {}
    if model.get("init_from") is not None:  # a recipe that continues another run: give it that run's checkpoint
        shape = {key: value for key, value in model.items() if key not in ROUTING_FIELDS | {"init_from", "upcycling"}}
        shape.pop("dense", None)
        LlamaForCausalLM(LlamaConfig(**shape, vocab_size=512)).save_pretrained(model["init_from"])
    recipe = load_recipe(path)
    assert recipe["train"]["max_steps"] >= 1 and recipe["data"]["sources"]


@pytest.mark.parametrize("path", sorted((REPO / "recipes" / "accelerate").glob("*.yaml")))
def test_accelerate_configs_load(path):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(path)
    assert config.num_processes >= 1
    assert config.mixed_precision == ("no" if config.use_cpu else "bf16")  # bf16 on GPUs, fp32 on the CPU


def test_paper_recipes_match_table7():
    expected = {"dense": 0.94, "x4": 1.54, "x8": 2.35}
    for path in sorted((REPO / "recipes" / "paper").glob("llama-1b-*.yaml")):
        recipe = load_recipe(path)
        config = model_config(recipe["model"], recipe["data"]["seq_len"])
        assert round(count_parameters(config)["total"] / 1e9, 2) == expected[path.stem.split("-")[-1]], path.name
        assert recipe["data"]["seq_len"] == 2048
        assert recipe["train"]["max_steps"] * 512 * 2048 >= 90e9  # the paper's token budget at 512 x 2048 per step
        assert [s["name"] for s in recipe["data"]["sources"]] == ["c4", "wikipedia", "arxiv"]
        if not recipe["model"]["dense"]:
            assert recipe["model"]["router_aux_loss_coef"] == 0.01
            assert recipe["model"]["moe_projections"] == [path.stem.split("-")[2] + "_proj"]


def test_tiny_and_its_dense_twin_differ_only_in_the_experts():
    tiny, dense = load_recipe(REPO / "recipes" / "tiny.yaml"), load_recipe(REPO / "recipes" / "tiny-dense.yaml")
    assert {k: v for k, v in tiny.items() if k not in ("model", "output_dir")} == {
        k: v for k, v in dense.items() if k not in ("model", "output_dir")
    }
    shared = {k: v for k, v in tiny["model"].items() if k in dense["model"] and k != "dense"}
    assert shared == {k: v for k, v in dense["model"].items() if k != "dense"}
    assert tiny["model"]["num_experts"] == 4 and dense["model"]["dense"] is True


def test_base_merges_mappings_and_replaces_the_rest(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "tokenizer: {path: tok}\ndata: {seq_len: 64, sources: [{name: a, weight: 1, files: a.jsonl}]}\n"
        "train: {max_steps: 5, lr: 0.1}\n"
    )
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntrain: {max_steps: 9}\n")
    recipe = load_recipe(tmp_path / "child.yaml", ["train.warmup_steps=1"])
    assert recipe["train"]["max_steps"] == 9 and recipe["train"]["lr"] == 0.1 and recipe["train"]["warmup_steps"] == 1
    assert recipe["data"]["seq_len"] == 64


def test_a_recipe_cannot_be_its_own_base(tmp_path):
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(RecipeError, match="its own base"):
        load_recipe(tmp_path / "loop.yaml")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trian.max_steps=3"], "unknown recipe key 'trian' (did you mean 'train'?)"),
        (["data.sources=[]"], "lists no data source"),
        (["data.sources=[{name: a, weight: 1}]"], "exactly one of 'files' or 'hub'"),
        (["data.sources=[{name: a, weight: -1, files: x}]"], "weight ('a') must be a number > 0"),
        (
            ["data.sources=[{name: a, weight: 1, hub: {path: x, nmae: y}}]"],
            "unknown recipe key 'data.sources[0].hub.nmae'",
        ),
        (["train.mixed_precision=fp8"], "must be one of"),
        (["train.mixed_precision=no"], "'train.mixed_precision' must be str, got False (YAML reads unquoted no"),
        (["train.lr=high"], "'train.lr' must be float"),
        (["tokenizer.path=null"], "'tokenizer.path' is not set"),
        (["=3"], "not of the form"),
    ],
)
def test_bad_recipes_name_the_key(overrides, message):
    with pytest.raises(RecipeError) as error:
        load_recipe(REPO / "recipes" / "tiny.yaml", overrides)
    assert message in str(error.value)


def test_missing_recipe_file_is_named(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_a_recipe_that_is_not_utf8_is_named(tmp_path):
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes("output_dir: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(RecipeError, match="latin1.yaml' is not UTF-8 text"):
        load_recipe(recipe)


def test_resume_changes_refuse_the_run_identity_and_list_the_rest():
    sources = [{"name": "web", "weight": 1.0, "files": "x.jsonl"}]
    saved = validate_recipe({"data": {"sources": sources}, "tokenizer": {"path": "tok"}})
    recipe = copy.deepcopy(saved)
    recipe["data"]["seq_len"] = 128
    recipe["data"]["skip_blocks"] = 10
    recipe["train"]["lr"] = 1.0e-5
    recipe["train"]["trackers"] = ["tensorboard"]
    config = {"hidden_size": 64, "transformers_version": "5.0"}
    refused, applied = resume_changes(saved, recipe, config, {**config, "hidden_size": 32, "transformers_version": "6"})
    assert refused == ["data.seq_len: 256 -> 128", "model config.hidden_size: 64 -> 32"]
    assert applied == [
        "data.skip_blocks: 0 -> 10 (no effect on a resumed run)",
        "train.lr: 0.0003 -> 1e-05",
        "train.trackers: [] -> ['tensorboard']",
    ]
    assert resume_changes(saved, copy.deepcopy(saved), config, dict(config)) == ([], [])
