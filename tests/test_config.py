"""ParameterNetLlamaConfig: defaults, and the errors for values that are not allowed (transformers' strict
config validation checks the field types, the routing validator the ranges)."""

import pytest
from conftest import tiny_config
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, LlamaConfig

from parameternet_llm import ParameterNetLlamaConfig


def test_defaults_follow_switch_and_the_paper():
    config = ParameterNetLlamaConfig()
    assert isinstance(config, LlamaConfig) and config.model_type == "parameternet_llama"
    assert config.num_experts == 4 and config.moe_projections == ["up_proj"] and config.moe_layers is None
    assert config.capacity_factor == 1.25 and config.eval_capacity_factor is None and config.min_capacity == 4
    assert config.router_aux_loss_coef == 0.01 and config.router_z_loss_coef == 0.0
    assert config.router_jitter_noise == 0.0 and config.moe_backend == "auto"


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("num_experts", 0, "int >= 1"),
        ("num_experts", 2.0, "expected int"),
        ("num_experts", True, "expected int, got bool"),
        ("moe_projections", [], "non-empty"),
        ("moe_projections", ["o_proj"], "moe_projections"),
        ("moe_projections", ["up_proj", "up_proj"], "distinct"),
        ("moe_layers", [], "non-empty"),
        ("moe_layers", [2], r"\[0, 2\)"),
        ("moe_layers", [0, 0], "distinct"),
        ("capacity_factor", 0, r"None \(dropless\) or > 0"),
        ("capacity_factor", "1.25", "capacity_factor"),
        ("eval_capacity_factor", -1.0, "> 0"),
        ("min_capacity", -1, "int >= 0"),
        ("router_aux_loss_coef", -0.01, ">= 0"),
        ("router_z_loss_coef", None, "router_z_loss_coef"),
        ("router_jitter_noise", 1.0, r"\[0, 1\)"),
        ("moe_backend", "triton", "'auto', 'grouped_mm', 'loop'"),
    ],
)
def test_invalid_values_name_the_field_and_what_is_allowed(field, value, message):
    with pytest.raises(StrictDataclassError, match=rf"(?s){field}.*{message}"):
        tiny_config(**{field: value})


def test_a_single_projection_name_is_accepted():
    assert tiny_config(moe_projections="down_proj").moe_projections == ["down_proj"]


def test_is_routed_follows_layers_and_projections():
    config = tiny_config(moe_projections=["gate_proj"], moe_layers=[1])
    assert config.is_routed(1, "gate_proj")
    assert not config.is_routed(0, "gate_proj") and not config.is_routed(1, "up_proj")


def test_config_round_trips_through_json(tmp_path):
    config = tiny_config(
        num_experts=8,
        moe_projections=["up_proj", "down_proj"],
        capacity_factor=None,
        eval_capacity_factor=2.0,
        router_z_loss_coef=0.001,
        moe_backend="loop",
        moe_layers=[1],
    )
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, ParameterNetLlamaConfig)
    for field in (
        "num_experts",
        "moe_projections",
        "moe_layers",
        "capacity_factor",
        "eval_capacity_factor",
        "min_capacity",
        "router_aux_loss_coef",
        "router_z_loss_coef",
        "router_jitter_noise",
        "moe_backend",
    ):
        assert getattr(loaded, field) == getattr(config, field), field
    assert loaded.auto_map["AutoModelForCausalLM"] == "modeling_parameternet_llama.ParameterNetLlamaForCausalLM"
