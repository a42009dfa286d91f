"""Checkpoints: save/load, the remote-code round trip in a process without the package, refusal of incomplete files."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from parameternet_llm import ParameterNetLlamaConfig, ParameterNetLlamaForCausalLM, ParameterNetLlamaModel


@pytest.fixture
def checkpoint(tmp_path):
    config = tiny_config(num_experts=4, moe_projections=["gate_proj", "down_proj"], moe_layers=[0])
    model = ParameterNetLlamaForCausalLM(config).eval()
    path = tmp_path / "ckpt"
    model.save_pretrained(path)
    ids = torch.randint(3, 90, (2, 7))
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(ids).logits, "hidden": model.model(ids).last_hidden_state},
                   tmp_path / "expected.pt")
    return path


def test_save_writes_weights_remote_code_and_auto_map(checkpoint):
    files = {p.name for p in checkpoint.iterdir()}
    assert {"config.json", "model.safetensors", "configuration_parameternet_llama.py",
            "modeling_parameternet_llama.py"} <= files
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["model_type"] == "parameternet_llama"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_parameternet_llama.ParameterNetLlamaConfig",
        "AutoModel": "modeling_parameternet_llama.ParameterNetLlamaModel",
        "AutoModelForCausalLM": "modeling_parameternet_llama.ParameterNetLlamaForCausalLM",
        "AutoModelForSequenceClassification": "modeling_parameternet_llama.ParameterNetLlamaForSequenceClassification",
    }
    assert config["num_experts"] == 4 and config["moe_projections"] == ["gate_proj", "down_proj"]
    assert config["moe_layers"] == [0]
    tensors = load_file(checkpoint / "model.safetensors")
    assert tensors["model.layers.0.mlp.gate_proj.weight"].shape == (4, 64, 32)
    assert tensors["model.layers.0.mlp.gate_proj.router.weight"].shape == (4, 32)
    assert tensors["model.layers.1.mlp.gate_proj.weight"].shape == (64, 32)


def test_load_with_the_package_gives_identical_logits(checkpoint):
    expected = torch.load(checkpoint.parent / "expected.pt")
    for loader in (ParameterNetLlamaForCausalLM.from_pretrained, AutoModelForCausalLM.from_pretrained):
        model = loader(checkpoint).eval()
        assert isinstance(model, ParameterNetLlamaForCausalLM)
        with torch.no_grad():
            assert torch.equal(model(expected["ids"]).logits, expected["logits"])
    base = AutoModel.from_pretrained(checkpoint)
    assert isinstance(base, ParameterNetLlamaModel)
    assert isinstance(AutoConfig.from_pretrained(checkpoint), ParameterNetLlamaConfig)


REMOTE_LOAD = textwrap.dedent(
    """
    import sys
    sys.modules["parameternet_llm"] = None  # the package must not be importable here
    try:
        import parameternet_llm
    except ImportError:
        pass
    else:
        raise SystemExit("parameternet_llm is importable")
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    path, expected_path = sys.argv[1], sys.argv[2]
    expected = torch.load(expected_path)
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    base = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
    with torch.no_grad():
        assert torch.equal(model(expected["ids"]).logits, expected["logits"])
        assert torch.equal(base(expected["ids"]).last_hidden_state, expected["hidden"])
    print(type(model).__module__, type(model).__name__, type(base).__name__)
    """
)


def test_remote_code_round_trip_in_a_clean_process(checkpoint, tmp_path):
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_LOAD, str(checkpoint), str(checkpoint.parent / "expected.pt")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    module, causal_lm, base = result.stdout.split()[-3:]
    assert module.startswith("transformers_modules.")
    assert (causal_lm, base) == ("ParameterNetLlamaForCausalLM", "ParameterNetLlamaModel")


def test_missing_router_or_expert_tensor_fails_loading(checkpoint):
    tensors = load_file(checkpoint / "model.safetensors")
    for key in ("model.layers.0.mlp.down_proj.router.weight", "model.layers.0.mlp.gate_proj.weight"):
        damaged = {k: v for k, v in tensors.items() if k != key}
        save_file(damaged, checkpoint / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            ParameterNetLlamaForCausalLM.from_pretrained(checkpoint)
        with pytest.raises(ValueError, match="expert/router"):
            AutoModelForCausalLM.from_pretrained(checkpoint)


def test_output_loading_info_is_still_returned_on_request(checkpoint):
    model, info = ParameterNetLlamaForCausalLM.from_pretrained(checkpoint, output_loading_info=True)
    assert isinstance(model, ParameterNetLlamaForCausalLM) and not info["missing_keys"]


def test_config_round_trips_through_json(tmp_path):
    config = tiny_config(num_experts=8, moe_projections=["up_proj", "down_proj"], capacity_factor=None,
                         eval_capacity_factor=2.0, router_z_loss_coef=0.001, moe_backend="loop")
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    for field in ("num_experts", "moe_projections", "moe_layers", "capacity_factor", "eval_capacity_factor",
                  "min_capacity", "router_aux_loss_coef", "router_z_loss_coef", "router_jitter_noise", "moe_backend"):
        assert getattr(loaded, field) == getattr(config, field), field
