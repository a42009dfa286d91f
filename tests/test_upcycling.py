"""Upcycling dense LLaMA checkpoints: the dense function kept at step 0, loading without the package, symmetry
breaking, streaming shards, and bad input refused with nothing written."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig, LlamaForCausalLM, MixtralConfig

from parameternet_llm.errors import InputError
from parameternet_llm.saved_models import CheckpointError
from parameternet_llm.training.recipe import load_recipe, model_config
from parameternet_llm.training.tokenizer import train_tokenizer
from parameternet_llm.training.train import Trainer, run
from parameternet_llm.upcycling import (
    UpcycleError,
    UpcycleOptions,
    expert_divergence,
    upcycle,
    upcycled_config,
    upcycled_model,
)
from parameternet_llm_cli import main

ALL_PROJECTIONS = ["gate_proj", "up_proj", "down_proj"]
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
# Sharded, tied, bf16, grouped-query attention and Llama 3 rope scaling; and the plain opposite.
DENSE_KINDS = {
    "sharded-tied-bf16-gqa-llama3": dict(
        tie_word_embeddings=True, dtype=torch.bfloat16, num_key_value_heads=2, rope_parameters=LLAMA3_ROPE
    ),
    "single-untied-fp32-mha-biases": dict(
        tie_word_embeddings=False, dtype=torch.float32, num_key_value_heads=4, mlp_bias=True, attention_bias=True
    ),
}


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    texts = [f"The river {i} flows past the old mill and the {i % 7} bridges of the town." for i in range(400)]
    return train_tokenizer(texts, tmp_path_factory.mktemp("tokenizer"), vocab_size=320).name_or_path


def save_dense(path: Path, tokenizer_dir: str, dtype: torch.dtype, **fields) -> Path:
    """A random LlamaForCausalLM with the tokenizer, as save_pretrained writes it (sharded below 40 KB in bf16)."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **fields,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(path, max_shard_size="40KB" if dtype == torch.bfloat16 else "50MB")
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=list(DENSE_KINDS))
def dense_dir(request, tmp_path_factory, tokenizer_dir):
    fields = dict(DENSE_KINDS[request.param])
    return save_dense(tmp_path_factory.mktemp(request.param), tokenizer_dir, **fields)


def sample_ids(tokenizer_dir: str) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    texts = [f"The river {i} flows past the old mill and the bridges of the town near it." for i in (3, 11, 42, 77)]
    return torch.tensor([tokenizer(text).input_ids[:20] for text in texts])


def lm_loss_and_greedy(model, ids: torch.Tensor) -> tuple[float, list[list[int]]]:
    model.eval()
    with torch.no_grad():
        out = model(ids, labels=ids)
        loss = getattr(out, "lm_loss", None) or out.loss
        greedy = model.generate(
            ids[:, :6], attention_mask=torch.ones_like(ids[:, :6]), max_new_tokens=8, do_sample=False
        )
    return loss.item(), greedy[:, 6:].tolist()


@pytest.mark.parametrize("projections", [["up_proj"], ALL_PROJECTIONS], ids=["up_proj", "all"])
def test_upcycled_checkpoint_computes_the_dense_function(dense_dir, tmp_path, tokenizer_dir, projections):
    out = tmp_path / "upcycled"
    config = upcycle(dense_dir, out, num_experts=8, moe_projections=projections)
    dense = AutoModelForCausalLM.from_pretrained(dense_dir)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = sample_ids(tokenizer_dir)

    dense_loss, dense_greedy = lm_loss_and_greedy(dense, ids)
    loss, greedy = lm_loss_and_greedy(model, ids)
    assert loss == pytest.approx(dense_loss, rel=0.01)
    assert greedy == dense_greedy
    model.train()  # training mode: upcycled models are dropless, so no token loses its FFN output
    with torch.no_grad():
        stats = model.routing_stats(model(ids))
    assert len(stats) == 2 * len(projections) and all(s["dropped"] == 0 for s in stats.values())

    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "parameternet_llama" and saved["num_experts"] == 8
    assert saved["expert_scale"] == "straight_through" and saved["capacity_factor"] is None
    assert saved["auto_map"]["AutoModelForCausalLM"].startswith("modeling_parameternet_llama.")
    for key in ("num_key_value_heads", "rope_parameters", "tie_word_embeddings", "dtype", "vocab_size"):
        assert saved[key] == json.loads((dense_dir / "config.json").read_text())[key], key
    assert {"modeling_parameternet_llama.py", "configuration_parameternet_llama.py"} <= {p.name for p in out.iterdir()}
    assert model.dtype == dense.dtype
    assert (
        AutoTokenizer.from_pretrained(out)("a river").input_ids
        == AutoTokenizer.from_pretrained(dense_dir)("a river").input_ids
    )

    dense_state, state = dense.state_dict(), model.state_dict()
    routed = model.routed_linears()
    for name, tensor in state.items():
        if ".router." in name:
            assert tensor.shape == (8, tensor.shape[1]) and tensor.float().std() > 0
        elif name.rsplit(".", 1)[0] in routed:  # an expert bank (or its biases): eight exact copies
            assert torch.equal(tensor, dense_state[name].expand_as(tensor)), name
        else:
            assert torch.equal(tensor, dense_state[name]), name
    assert set(state) - set(dense_state) == {n for n in state if ".router." in n}
    assert config.num_experts == 8 and list(config.moe_projections) == projections


def test_upcycled_checkpoint_loads_and_decodes_without_the_package(tmp_path, tokenizer_dir):
    dense_dir = save_dense(tmp_path / "dense", tokenizer_dir, **DENSE_KINDS["sharded-tied-bf16-gqa-llama3"])
    upcycle(dense_dir, tmp_path / "upcycled", num_experts=8, moe_projections=ALL_PROJECTIONS)
    ids = sample_ids(tokenizer_dir)
    torch.save(ids, tmp_path / "ids.pt")
    probe = textwrap.dedent(
        f"""
        import json, sys, torch
        sys.modules["parameternet_llm"] = None  # the package cannot be imported
        from transformers import AutoModel, AutoModelForCausalLM
        ids = torch.load({str(tmp_path / "ids.pt")!r})
        def run(model):
            model.eval()
            with torch.no_grad():
                out = model(ids, labels=ids)
                greedy = model.generate(ids[:, :6], attention_mask=torch.ones_like(ids[:, :6]), max_new_tokens=8,
                                        do_sample=False)
            return [(getattr(out, "lm_loss", None) or out.loss).item(), greedy[:, 6:].tolist(), type(model).__name__]
        dense = run(AutoModelForCausalLM.from_pretrained({str(dense_dir)!r}))
        upcycled = run(AutoModelForCausalLM.from_pretrained({str(tmp_path / "upcycled")!r}, trust_remote_code=True))
        base = AutoModel.from_pretrained({str(tmp_path / "upcycled")!r}, trust_remote_code=True)
        print(json.dumps([dense, upcycled, type(base).__name__]))
        """
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "TRANSFORMERS_VERBOSITY": "error"}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    dense, upcycled, base = json.loads(result.stdout.splitlines()[-1])
    assert upcycled[2] == "ParameterNetLlamaForCausalLM" and base == "ParameterNetLlamaModel"
    assert upcycled[0] == pytest.approx(dense[0], rel=0.01) and upcycled[1] == dense[1]


def test_shards_respect_the_size_limit_and_the_index(tmp_path, tokenizer_dir):
    dense_dir = save_dense(tmp_path / "dense", tokenizer_dir, dtype=torch.float32)
    out = tmp_path / "upcycled"
    upcycle(dense_dir, out, num_experts=4, moe_projections=ALL_PROJECTIONS, max_shard_size="300KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards == sorted(p.name for p in out.glob("model-*.safetensors"))
    total = 0
    for shard in shards:
        tensors = load_file(out / shard)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= 300_000 or len(tensors) == 1, shard  # a larger tensor gets a shard of its own
        assert all(index["weight_map"][name] == shard for name in tensors)
        total += size
    assert index["metadata"]["total_size"] == total
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_options_perturb_the_copies_reproducibly(tmp_path, tokenizer_dir):
    dense_dir = save_dense(tmp_path / "dense", tokenizer_dir, dtype=torch.float32)
    config = upcycled_config(LlamaConfig.from_pretrained(dense_dir), num_experts=4, moe_projections=ALL_PROJECTIONS)
    dense = LlamaForCausalLM.from_pretrained(dense_dir).state_dict()

    dropped = upcycled_model(dense_dir, config, UpcycleOptions(drop_fraction=0.25, seed=1)).state_dict()
    for name, channel_dim in (("up_proj", 0), ("gate_proj", 0), ("down_proj", 1)):
        key = f"model.layers.1.mlp.{name}.weight"
        bank, weight = dropped[key], dense[key]
        changed_sets = []
        for expert in bank:
            differs = (expert != weight).any(dim=1 - channel_dim)  # per SwiGLU channel
            assert differs.sum() == 32, name  # a quarter of the 128 channels re-drawn, the rest exact copies
            changed_sets.append(tuple(differs.nonzero().flatten().tolist()))
        assert len(set(changed_sets)) == 4  # each expert re-draws its own channels
    again = upcycled_model(dense_dir, config, UpcycleOptions(drop_fraction=0.25, seed=1)).state_dict()
    other = upcycled_model(dense_dir, config, UpcycleOptions(drop_fraction=0.25, seed=2)).state_dict()
    key = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(again[key], dropped[key]) and not torch.equal(other[key], dropped[key])
    assert torch.equal(
        again["model.layers.0.mlp.up_proj.router.weight"], dropped["model.layers.0.mlp.up_proj.router.weight"]
    )

    noisy = upcycled_model(dense_dir, config, UpcycleOptions(expert_noise=0.1)).state_dict()[key]
    relative = (noisy - dense[key]).std() / dense[key].std()
    assert 0.08 < relative < 0.12 and not torch.equal(noisy[0], noisy[1])
    exact = upcycled_model(dense_dir, config)
    assert all(value < 1e-9 for value in expert_divergence(exact).values())


def test_continued_training_breaks_the_symmetry_of_the_copies(tmp_path, tokenizer_dir):
    dense_dir = save_dense(tmp_path / "dense", tokenizer_dir, dtype=torch.float32)
    config = upcycled_config(LlamaConfig.from_pretrained(dense_dir), num_experts=4, moe_projections=["up_proj"])
    model = upcycled_model(dense_dir, config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(3, config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    for _ in range(5):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    divergence = expert_divergence(model)
    assert set(divergence) == {f"model.layers.{i}.mlp.up_proj" for i in range(2)}
    assert all(0 < distance < 1 for distance in divergence.values()), divergence
    with torch.no_grad():
        loads = [s["load"] for s in model.routing_stats(model(ids)).values()]
    assert all((load > 0).sum() >= 2 for load in loads)  # tokens spread over several experts


def write_config(path: Path, config) -> Path:
    path.mkdir()
    config.save_pretrained(path)
    return path


def bad_inputs(tmp_path: Path, dense_dir: Path) -> dict:
    """name -> (dense directory, upcycle keyword arguments, expected message)."""
    missing_shard = tmp_path / "missing-shard"
    corrupt_shard = tmp_path / "corrupt-shard"
    for copy in (missing_shard, corrupt_shard):
        copy.mkdir()
        for path in dense_dir.iterdir():
            (copy / path.name).write_bytes(path.read_bytes())
    second = sorted(p.name for p in dense_dir.glob("model-*.safetensors"))[1]
    (missing_shard / second).unlink()
    shard = corrupt_shard / second
    shard.write_bytes(shard.read_bytes()[:1000])
    bin_only = tmp_path / "bin-only"
    bin_only.mkdir()
    (bin_only / "config.json").write_text((dense_dir / "config.json").read_text())
    (bin_only / "pytorch_model.bin").write_bytes(b"")
    routed = tmp_path / "routed"
    upcycle(dense_dir, routed, num_experts=2)
    gpt2 = write_config(tmp_path / "gpt2", GPT2Config(n_layer=2))
    mixtral = write_config(tmp_path / "mixtral", MixtralConfig(num_hidden_layers=2))
    return {
        "gpt2": (gpt2, {}, "not a LLaMA checkpoint: model_type 'gpt2'"),
        "mixtral": (mixtral, {}, "model_type 'mixtral'"),
        "already routed": (routed, {}, "already a ParameterNet checkpoint"),
        "one expert": (dense_dir, {"num_experts": 1}, "num_experts=1: upcycling needs at least 2"),
        "unknown projection": (dense_dir, {"moe_projections": ["o_proj"]}, "unknown projection(s) ['o_proj']"),
        "layer out of range": (dense_dir, {"moe_layers": [5]}, "moe_layers=[5] is invalid"),
        "unknown routing field": (dense_dir, {"num_expert": 4}, "unknown routing field(s) ['num_expert']"),
        "missing shard": (missing_shard, {}, f"shard {second} named by"),
        "corrupt shard": (corrupt_shard, {}, f"{second} is not a readable safetensors file"),
        "no safetensors": (bin_only, {}, "found pytorch_model.bin: re-save it with save_pretrained"),
        "no config": (tmp_path, {}, "has no config.json"),
    }


def test_bad_input_is_refused_by_name_and_writes_nothing(tmp_path, tokenizer_dir):
    dense_dir = save_dense(tmp_path / "dense", tokenizer_dir, **DENSE_KINDS["sharded-tied-bf16-gqa-llama3"])
    assert len(list(dense_dir.glob("model-*.safetensors"))) > 2
    (tmp_path / "inputs").mkdir()
    cases = bad_inputs(tmp_path / "inputs", dense_dir)
    for name, (source, kwargs, message) in cases.items():
        out = tmp_path / "outputs" / name.replace(" ", "-")
        with pytest.raises((UpcycleError, CheckpointError)) as error:
            upcycle(source, out, **{"num_experts": 8, **kwargs})
        assert message in str(error.value), name
        assert not out.parent.exists() or not list(out.parent.iterdir()), name  # nothing, not even staging

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(UpcycleError, match="exists and is not empty"):
        upcycle(dense_dir, taken, num_experts=8)
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]


def test_a_failure_while_writing_leaves_no_output(tmp_path, tokenizer_dir, monkeypatch):
    dense_dir = save_dense(tmp_path / "dense", tokenizer_dir, dtype=torch.float32)
    from parameternet_llm import upcycling

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(upcycling, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        upcycle(dense_dir, tmp_path / "out", num_experts=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense"]


def test_command_line_upcycles_and_reports_errors_in_one_line(tmp_path, tokenizer_dir, capsys):
    dense_dir = save_dense(tmp_path / "dense", tokenizer_dir, dtype=torch.float32)
    out = tmp_path / "out"
    main(
        [
            "upcycle",
            str(dense_dir),
            str(out),
            "--experts",
            "4",
            "--projections",
            "up_proj,down_proj",
            "--layers",
            "1",
            "--router-init",
            "normal:0.05",
            "--set",
            "capacity_factor=1.5",
        ]
    )
    assert "4 experts on up_proj, down_proj" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert (config["moe_layers"], config["capacity_factor"]) == ([1], 1.5)
    router = load_file(out / "model.safetensors")["model.layers.1.mlp.down_proj.router.weight"]
    assert 0.04 < router.std() < 0.06
    with pytest.raises(SystemExit) as exit_info:
        main(["upcycle", str(out), str(tmp_path / "again")])
    assert (
        str(exit_info.value) == f"error: {out} is already a ParameterNet checkpoint (model_type 'parameternet_llama')"
    )


@pytest.fixture(scope="module")
def trained_dense(small_world):
    """A dense run of the tiny recipe; its final checkpoint is what the recipes below start from."""
    root, recipes = small_world
    out = root / "runs" / "dense-for-upcycling"
    if not (out / "final").is_dir():
        run(str(recipes["tiny-dense"]), [f"output_dir={out}", "train.max_steps=6", "eval.every=6"])
    return recipes["tiny-dense"], out


def init_from(checkpoint: Path, *overrides: str) -> list[str]:
    return ["model.dense=false", f"model.init_from={checkpoint}", "tokenizer.path=null", *overrides]


def test_recipe_upcycles_a_dense_checkpoint_and_starts_at_its_loss(trained_dense, tmp_path):
    recipe, dense_run = trained_dense
    dense_val_loss = json.loads((dense_run / "metrics.jsonl").read_text().splitlines()[-1])["val_loss"]
    continued = Trainer(
        load_recipe(recipe, [f"output_dir={tmp_path / 'dense'}", f"model.init_from={dense_run / 'final'}"])
    )
    assert continued.validation_loss() == pytest.approx(dense_val_loss, rel=1e-5)
    overrides = init_from(dense_run / "final", "model.num_experts=4", "model.upcycling={drop_fraction: 0.5}")
    trainer = Trainer(load_recipe(recipe, [f"output_dir={tmp_path / 'dropped'}", *overrides]))
    assert trainer.validation_loss() != pytest.approx(dense_val_loss, rel=1e-4)  # half of every copy re-drawn

    trainer = Trainer(load_recipe(recipe, [f"output_dir={tmp_path / 'up'}", "train.max_steps=4", *overrides[:-1]]))
    assert trainer.validation_loss() == pytest.approx(dense_val_loss, rel=1e-4)
    summary = trainer.run()
    assert summary["step"] == 4
    config = json.loads((tmp_path / "up" / "final" / "config.json").read_text())
    assert (config["num_experts"], config["expert_scale"], config["capacity_factor"]) == (4, "straight_through", None)
    assert (tmp_path / "up" / "final" / "tokenizer.json").is_file()


def test_accelerate_launch_trains_and_resumes_from_an_upcycled_checkpoint(trained_dense, tmp_path):
    recipe, dense_run = trained_dense
    upcycled = tmp_path / "upcycled"
    upcycle(dense_run / "final", upcycled, num_experts=8, moe_projections=["up_proj", "down_proj"])
    out = tmp_path / "run"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no", "-m", "parameternet_llm.training"]
    launch += ["--config", str(recipe), f"output_dir={out}", *init_from(upcycled), "train.save_every=2"]
    first = subprocess.run([*launch, "train.max_steps=4"], capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    second = subprocess.run([*launch, "train.max_steps=6"], capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "at step 4" in second.stdout + second.stderr
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]
    assert json.loads((out / "final" / "config.json").read_text())["num_experts"] == 8


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.num_experts=1"], "num_experts=1: upcycling needs at least 2"),
        (["model.upcycling={drop_fraction: 1.5}"], "drop_fraction=1.5 must be in [0, 1)"),
        (["model.upcycling={dropout: 0.1}"], "unknown recipe key 'model.upcycling.dropout'"),
        (["model.init_from=/nonexistent"], "model.init_from='/nonexistent': /nonexistent does not exist"),
    ],
)
def test_bad_init_from_recipes_fail_before_training(trained_dense, tmp_path, overrides, message):
    recipe, dense_run = trained_dense
    with pytest.raises(InputError) as error:
        load_recipe(recipe, [f"output_dir={tmp_path}", *init_from(dense_run / "final"), *overrides])
    assert message in str(error.value)


def test_a_parameternet_checkpoint_keeps_its_expert_banks(trained_dense, tmp_path, caplog):
    recipe, dense_run = trained_dense
    upcycle(dense_run / "final", tmp_path / "upcycled", num_experts=4)
    base = init_from(tmp_path / "upcycled")
    with caplog.at_level("WARNING"):
        loaded = load_recipe(recipe, [*base, "model.num_experts=8", "model.upcycling={seed: 1}"])
    assert "ignoring model keys num_experts=8 (checkpoint: 4), upcycling (the checkpoint is upcycled" in caplog.text
    assert model_config(loaded["model"], 64).num_experts == 4
    with pytest.raises(InputError, match="remove model.dense"):
        load_recipe(recipe, [*base, "model.dense=true"])
    config = model_config(load_recipe(recipe, [*base, "model.capacity_factor=1.25"])["model"], 64)
    assert (config.num_experts, config.capacity_factor, config.expert_scale) == (4, 1.25, "straight_through")


def test_shape_keys_of_a_recipe_give_way_to_the_checkpoint_with_a_warning(trained_dense, caplog):
    recipe, dense_run = trained_dense
    with caplog.at_level("WARNING"):
        loaded = load_recipe(recipe, [*init_from(dense_run / "final"), "model.hidden_size=48"])
    config = model_config(loaded["model"], loaded["data"]["seq_len"])
    assert config.hidden_size == 64 and config.num_experts == 4
    assert "ignoring model keys hidden_size=48 (checkpoint: 64)" in caplog.text
