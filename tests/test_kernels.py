"""The package's plug-ins: registered on import, found by the reference through its one seam, and computing
what the reference computes, outputs and gradients, for the routing the reference decided."""

import logging

import pytest
import torch
from conftest import routed_linear

from parameternet_llm import kernels, modeling_parameternet_llama
from parameternet_llm.kernels import cpu, reference_only
from parameternet_llm.modeling_parameternet_llama import plugin


def test_importing_the_package_registers_the_cpu_plug_in_under_the_name_the_reference_looks_up():
    assert kernels.REGISTERED == [cpu.OP], "the CPU plug-in did not build here (a C++ compiler and ninja are needed)"
    assert plugin("expert_products", torch.device("cpu")) is torch.ops.parameternet_llm.expert_products_v1_cpu
    assert plugin("expert_products", torch.device("meta")) is None  # no plug-in for that device
    with reference_only():
        assert modeling_parameternet_llama.plugin("expert_products", torch.device("cpu")) is None


def test_a_reference_of_another_plug_in_version_runs_its_own_path(monkeypatch):
    """A checkpoint whose model file expects another version of the contract does not find this package's
    plug-ins, and runs the reference path with the same results."""
    layer = routed_linear(32, 48, num_experts=8, capacity_factor=1.0)
    x = torch.randn(64, 32)
    calls = []
    op = torch.ops.parameternet_llm.expert_products_v1_cpu
    monkeypatch.setattr(
        torch.ops.parameternet_llm, "expert_products_v1_cpu", lambda *operands: calls.append(1) or op(*operands)
    )
    with_plug_in = layer(x)[0]
    assert len(calls) == 1
    monkeypatch.setattr(modeling_parameternet_llama, "PLUGIN_VERSION", 2)
    assert plugin("expert_products", x.device) is None
    torch.testing.assert_close(layer(x)[0], with_plug_in, rtol=1e-5, atol=1e-6)
    assert len(calls) == 1


def routed_case(tokens, in_features, out_features, num_experts, dtype, skew: bool):
    """A routed linear and its input: capacity drops tokens, or (`skew`) routing is dropless and sends most tokens
    to expert 0 and none to some (a group longer than two 256-row chunks, empty groups)."""
    capacity_factor = None if skew else 1.0
    layer = routed_linear(
        in_features, out_features, num_experts=num_experts, capacity_factor=capacity_factor, min_capacity=1
    ).to(dtype)
    with torch.no_grad():
        layer.router.weight.normal_(std=1.0)
        if skew:
            layer.router.weight[0] = 2.0
    x = torch.randn(tokens, in_features, dtype=dtype)
    if skew:
        x = x.abs()
    mask = torch.rand(tokens) > 0.1
    return layer, x, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "tokens,in_features,out_features,num_experts,skew",
    [
        (40, 16, 24, 4, False),
        (300, 48, 32, 8, False),
        (700, 32, 48, 8, True),
        (1, 16, 24, 4, False),  # decoding
    ],
)
def test_plug_in_matches_the_reference_outputs_and_gradients(
    dtype, tokens, in_features, out_features, num_experts, skew
):
    layer, x, mask = routed_case(tokens, in_features, out_features, num_experts, dtype, skew)
    upstream = torch.randn(tokens, out_features, dtype=dtype)
    results = []
    for use_plug_in in (True, False):
        layer.zero_grad()
        x_leaf = x.clone().requires_grad_()
        with reference_only() if not use_plug_in else torch.enable_grad():
            out, routing = layer(x_leaf, mask)
        (out.float() * upstream.float()).sum().backward()
        results.append((out, x_leaf.grad, layer.weight.grad, layer.router.weight.grad))
    if skew:
        loads = torch.bincount(routing.expert[routing.keep], minlength=num_experts)
        assert loads.max() > 512 and (loads == 0).any()
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for got, want, name in zip(*results, ["out", "x", "experts", "router"], strict=True):
        scale = max(1.0, want.float().abs().max().item())
        torch.testing.assert_close(got.float() / scale, want.float() / scale, **tolerance, msg=name)


def test_plug_in_refuses_operands_that_break_its_contract():
    op = torch.ops.parameternet_llm.expert_products_v1_cpu
    x, weight, scale = torch.randn(6, 4), torch.randn(2, 8, 4), torch.rand(6)
    order = torch.arange(6)
    with pytest.raises(RuntimeError, match="cover all 6 rows"):
        op(x, weight, order, torch.tensor([2, 5], dtype=torch.int32), scale)
    with pytest.raises(RuntimeError, match="int32"):
        op(x, weight, order, torch.tensor([2, 6]), scale)
    with pytest.raises(RuntimeError, match="do not match"):
        op(x, torch.randn(2, 8, 5), order, torch.tensor([2, 6], dtype=torch.int32), scale)


def test_plug_in_traces_with_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        out = torch.ops.parameternet_llm.expert_products_v1_cpu(
            torch.randn(6, 4),
            torch.randn(2, 8, 4),
            torch.arange(6),
            torch.tensor([2, 6], dtype=torch.int32),
            torch.rand(6),
        )
    assert out.shape == (6, 8)


def test_build_directory_is_keyed_by_the_kernel_source(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    first = cpu.build_directory()
    source = tmp_path / "expert_products.cpp"
    source.write_text(cpu.SOURCE.read_text() + "\n// another version\n")
    monkeypatch.setattr(cpu, "SOURCE", source)
    assert cpu.build_directory() != first and cpu.build_directory().parent == first.parent == tmp_path


def test_a_failed_build_is_said_in_one_line_and_not_tried_again(monkeypatch, tmp_path, caplog):
    """No compiler: the first process says so in one line and records it; later ones skip the attempt."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    attempts = []

    def no_compiler(**kwargs):
        attempts.append(kwargs["name"])
        raise RuntimeError("Error building extension 'x':\n" + "c++: command not found\n" * 50)

    monkeypatch.setattr("torch.utils.cpp_extension.load", no_compiler)
    with caplog.at_level(logging.WARNING, logger=cpu.__name__):
        assert cpu.build() is None
        assert cpu.build() is None
    assert len(attempts) == 1
    messages = [record.getMessage() for record in caplog.records]
    assert any("compiling" in message for message in messages)
    failures = [message for message in messages if "could not build" in message]
    assert len(failures) == 1 and "\n" not in failures[0] and "Error building extension" in failures[0]
    assert (cpu.build_directory() / cpu.FAILED).read_text().count("command not found") == 50
