"""Checkpoints: save/load, the checkpoint's own model files in clean processes (without the package, with it,
beside other versions), refusal of incomplete files."""

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from parameternet_llm import (
    ParameterNetLlamaConfig,
    ParameterNetLlamaForCausalLM,
    ParameterNetLlamaModel,
    modeling_parameternet_llama,
)


@pytest.fixture
def checkpoint(tmp_path):
    config = tiny_config(num_experts=4, moe_projections=["gate_proj", "down_proj"], moe_layers=[0])
    model = ParameterNetLlamaForCausalLM(config).eval()
    path = tmp_path / "ckpt"
    model.save_pretrained(path)
    ids = torch.randint(3, 90, (2, 7))
    with torch.no_grad():
        torch.save(
            {"ids": ids, "logits": model(ids).logits, "hidden": model.model(ids).last_hidden_state},
            tmp_path / "expected.pt",
        )
    return path


def test_save_writes_weights_remote_code_and_auto_map(checkpoint):
    files = {p.name for p in checkpoint.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "configuration_parameternet_llama.py",
        "modeling_parameternet_llama.py",
    } <= files
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
    import torch

    path, expected_path, case = sys.argv[1:4]
    if case == "package absent":
        sys.modules["parameternet_llm"] = None  # the package must not be importable here
    elif case == "previous release":  # its own plug-in names, which must never be called
        import parameternet_llm
        assert parameternet_llm.__version__ == "0.1.0", parameternet_llm.__file__
    else:
        import parameternet_llm
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    calls = []
    namespace = torch.ops.parameternet_llm
    for name in ("expert_products_v1_cpu", "expert_products_v2_cpu", "grouped_mm"):
        op = getattr(namespace, name, None)
        if op is not None:
            setattr(namespace, name, lambda *args, op=op, name=name: calls.append(name) or op(*args))

    expected = torch.load(expected_path)
    # The checkpoint's own copy of the model (with the package imported, the Auto classes would take the package's).
    causal_lm, base_model = (get_class_from_dynamic_module(f"modeling_parameternet_llama.{name}", path)
                             for name in ("ParameterNetLlamaForCausalLM", "ParameterNetLlamaModel"))
    assert causal_lm.__module__.startswith("transformers_modules."), causal_lm.__module__
    model = causal_lm.from_pretrained(path)
    base = base_model.from_pretrained(path).eval()
    if case == "package absent":  # the Auto classes find the checkpoint's code through its auto_map
        from transformers import AutoModel, AutoModelForCausalLM

        for auto, loaded in ((AutoModelForCausalLM, causal_lm), (AutoModel, base_model)):
            found = type(auto.from_pretrained(path, trust_remote_code=True))
            assert (found.__module__, found.__name__) == (loaded.__module__, loaded.__name__), found
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(expected["ids"]).logits, expected["logits"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(base(expected["ids"]).last_hidden_state, expected["hidden"], rtol=1e-5, atol=1e-5)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        loss = model(expected["ids"], labels=expected["ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    print("plug-in calls:", sorted(set(calls)) or "none")
    """
)

PREVIOUS_RELEASE = textwrap.dedent(
    """
    \"\"\"Stands in for the previous release: its kernels registered other names in the same op namespace.\"\"\"
    import torch

    __version__ = "0.1.0"
    torch.library.define("parameternet_llm::grouped_mm", "(Tensor a, Tensor b, Tensor offs) -> Tensor")
    """
)


@pytest.mark.parametrize(
    "case, plug_in_calls",
    [
        ("package absent", "none"),
        ("package present", "['expert_products_v1_cpu']"),
        ("package present, checkpoint of the next plug-in version", "none"),
        ("previous release", "none"),
    ],
)
def test_checkpoint_loads_and_trains_in_a_clean_process(checkpoint, tmp_path, case, plug_in_calls):
    """The checkpoint's own model files run without the package, with it (and then use its plug-in), with a
    package whose plug-ins are of another version, and beside the previous release."""
    env = {
        **os.environ,
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    if case.endswith("next plug-in version"):
        modeling = checkpoint / "modeling_parameternet_llama.py"
        modeling.write_text(modeling.read_text().replace("PLUGIN_VERSION = 1", "PLUGIN_VERSION = 2"))
    if case == "previous release":
        package = tmp_path / "previous" / "parameternet_llm"
        package.mkdir(parents=True)
        (package / "__init__.py").write_text(PREVIOUS_RELEASE)
        env["PYTHONPATH"] = str(package.parent)
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_LOAD, str(checkpoint), str(checkpoint.parent / "expected.pt"), case],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-1] == f"plug-in calls: {plug_in_calls}"
    assert len(result.stderr.strip().splitlines()) <= 1, result.stderr  # at most one line (transformers quiet)


def test_model_files_import_only_torch_transformers_and_each_other():
    """The two files copied into every checkpoint: no import of the package, at load time or at run time."""
    allowed = {"dataclasses", "functools", "typing", "torch", "transformers", "huggingface_hub"}
    for path in (
        Path(modeling_parameternet_llama.__file__),
        Path(modeling_parameternet_llama.__file__).with_name("configuration_parameternet_llama.py"),
    ):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = {"." if node.level else node.module.split(".")[0]}
                if node.level:
                    assert node.module == "configuration_parameternet_llama", (path.name, node.module)
            elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in (
                "import_module",
                "__import__",
            ):
                raise AssertionError(f"{path.name} imports at run time")
            else:
                continue
            assert roots <= allowed | {"."}, (path.name, roots)


def test_missing_router_or_expert_tensor_fails_loading(checkpoint):
    tensors = load_file(checkpoint / "model.safetensors")
    for key in ("model.layers.0.mlp.down_proj.router.weight", "model.layers.0.mlp.gate_proj.weight"):
        damaged = {k: v for k, v in tensors.items() if k != key}
        save_file(damaged, checkpoint / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            ParameterNetLlamaForCausalLM.from_pretrained(checkpoint)
        with pytest.raises(ValueError, match="expert/router"):
            AutoModelForCausalLM.from_pretrained(checkpoint)


def test_expert_banks_of_another_shape_are_refused_even_when_mismatches_are_ignored(checkpoint):
    experts = json.loads((checkpoint / "config.json").read_text())["num_experts"]
    with pytest.raises(ValueError, match=rf"router\.weight \({experts}, \d+\) in the checkpoint"):
        ParameterNetLlamaForCausalLM.from_pretrained(checkpoint, num_experts=experts + 4, ignore_mismatched_sizes=True)


def test_output_loading_info_is_still_returned_on_request(checkpoint):
    model, info = ParameterNetLlamaForCausalLM.from_pretrained(checkpoint, output_loading_info=True)
    assert isinstance(model, ParameterNetLlamaForCausalLM) and not info["missing_keys"]


def test_the_base_model_loads_from_a_causal_lm_checkpoint_without_a_report(checkpoint):
    model, info = ParameterNetLlamaModel.from_pretrained(checkpoint, output_loading_info=True)
    assert info["unexpected_keys"] == set() and info["missing_keys"] == set()
    assert isinstance(model, ParameterNetLlamaModel)
