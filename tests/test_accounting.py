"""Parameter and FLOPs accounting against the paper's Table 7 and against instantiated models."""

from pathlib import Path

import pytest
from conftest import TINY_SHAPE, tiny_config
from transformers import LlamaConfig, LlamaForCausalLM

from parameternet_llm import ParameterNetLlamaForCausalLM
from parameternet_llm.accounting import count_parameters, flops_per_token, short_count
from parameternet_llm.presets import LLAMA_1B, table7_configs
from parameternet_llm_cli import main

REPO = Path(__file__).resolve().parents[1]
TABLE7_PARAMS_B = {"dense": 0.94, "x4": 1.54, "x8": 2.35}


def test_table7_parameter_counts():
    rows = table7_configs()
    assert len(rows) == 7
    dense = count_parameters(rows["dense"])
    for name, config in rows.items():
        params = count_parameters(config)
        assert round(params["total"] / 1e9, 2) == TABLE7_PARAMS_B[name.split()[-1]], name
        # One token uses one expert: active parameters are the dense model's plus the routers.
        routers = (
            0
            if name == "dense"
            else config.num_experts
            * (config.intermediate_size if config.moe_projections == ["down_proj"] else config.hidden_size)
            * config.num_hidden_layers
        )
        assert params["active"] == dense["total"] + routers, name
        assert flops_per_token(config, 2048) - flops_per_token(rows["dense"], 2048) == 2 * routers, name


@pytest.mark.parametrize(
    "overrides",
    [
        dict(num_experts=4),
        dict(num_experts=8, moe_projections=["gate_proj", "up_proj", "down_proj"], tie_word_embeddings=True),
        dict(num_experts=3, moe_projections=["down_proj"], moe_layers=[1], mlp_bias=True, attention_bias=True),
    ],
)
def test_counts_match_instantiated_models(overrides):
    config = tiny_config(**overrides)
    model = ParameterNetLlamaForCausalLM(config)
    params = count_parameters(config)
    assert params["total"] == sum(p.numel() for p in model.parameters())
    idle_experts = sum(
        (m.num_experts - 1) * m.weight[0].numel() + (0 if m.bias is None else (m.num_experts - 1) * m.out_features)
        for m in model.routed_linears().values()
    )
    assert params["active"] == params["total"] - idle_experts


def test_dense_llama_counts_match():
    config = LlamaConfig(**TINY_SHAPE)
    params = count_parameters(config)
    assert params["total"] == params["active"] == sum(p.numel() for p in LlamaForCausalLM(config).parameters())


def test_flops_grow_with_context_by_the_attention_term():
    config = LlamaConfig(**LLAMA_1B)
    per_extra_token = flops_per_token(config, 2049) - flops_per_token(config, 2048)
    assert per_extra_token == 4 * config.num_hidden_layers * config.hidden_size
    with pytest.raises(ValueError, match="seq_len"):
        flops_per_token(config, 0)


def test_info_prints_table7_and_single_configs(capsys, tmp_path):
    main(["info"])
    out = capsys.readouterr().out
    assert "| dense | 0.94B |" in out and "| up_proj x8 | 2.35B |" in out and "| down_proj x4 | 1.54B |" in out
    tiny_config(num_experts=8).save_pretrained(tmp_path)
    main(["info", str(tmp_path), "--seq-len", "64"])
    params = count_parameters(tiny_config(num_experts=8))
    assert f"| {short_count(params['total'])} | {short_count(params['active'])} |" in capsys.readouterr().out
    main(["info", str(REPO / "recipes" / "paper" / "llama-1b-down-x8.yaml")])
    assert "| 2.35B | 0.94B |" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["info", "llama-1b", "num_experts=0"], "num_experts=0 is invalid"),
        (["info", "llama-1b", "num_experts"], "dotted.key=value"),
        (["info", "no/such/dir"], "neither a model shape"),
    ],
)
def test_info_rejects_bad_input_with_a_clear_message(argv, message):
    with pytest.raises(SystemExit) as error:
        main(argv)
    assert message in str(error.value)


def test_info_on_a_recipe_counts_the_trained_tokenizers_real_size(tmp_path, capsys):
    from parameternet_llm.training.tokenizer import train_tokenizer

    tokenizer = train_tokenizer([f"a small corpus {i}" for i in range(50)], tmp_path / "tok", vocab_size=4096)
    assert len(tokenizer) < 4096  # the corpus supports fewer pieces than asked for
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base: {REPO / 'recipes' / 'tiny-dense.yaml'}\ntokenizer: {{path: {tmp_path / 'tok'}}}\n")
    main(["info", str(recipe), "--seq-len", "256"])
    row = capsys.readouterr().out.strip().splitlines()[-1]
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=344,
        num_attention_heads=4,
        num_hidden_layers=4,
        tie_word_embeddings=False,
    )
    assert row.split("|")[2].strip() == f"{count_parameters(config)['total'] / 1e6:.2f}M"
