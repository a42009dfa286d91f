"""RoutedLinear against the routing rules (docs/DESIGN.md): a per-token reading of them, transformers' Switch
loss functions, and one dispatch against the other."""

import math

import pytest
import torch
from conftest import routed_linear
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.models.switch_transformers.modeling_switch_transformers import (
    load_balancing_loss_func,
    router_z_loss_func,
)

from parameternet_llm import RoutedLinear
from parameternet_llm.configuration_parameternet_llama import EXPERT_SCALES
from parameternet_llm.kernels import reference_only
from parameternet_llm.modeling_parameternet_llama import grouped_mm_runs, routing_summary


def reference_forward(layer: RoutedLinear, x: torch.Tensor, mask: torch.Tensor, capacity_factor):
    """Token-by-token reading of the rules: float32 router, top-1, slots claimed in token order."""
    num_experts = layer.num_experts
    logits = x.float() @ layer.router.weight.float().T
    probs = logits.softmax(-1)
    num_valid = int(mask.sum())
    if capacity_factor is None:
        capacity = math.inf
    else:
        capacity = max(layer.router.min_capacity, math.ceil(capacity_factor * num_valid / num_experts))
    claimed = [0] * num_experts
    rows = []
    for t in range(x.shape[0]):
        expert = int(probs[t].argmax())
        if not mask[t] or claimed[expert] >= capacity:
            rows.append(torch.zeros(layer.out_features, dtype=x.dtype))
            continue
        claimed[expert] += 1
        bias = layer.bias[expert] if layer.bias is not None else 0
        rows.append(probs[t, expert].to(x.dtype) * (layer.weight[expert] @ x[t] + bias))
    return torch.stack(rows)


def make_layer(backend, num_experts=4, bias=False, capacity_factor=1.0, in_features=16, out_features=24, **kw):
    layer = routed_linear(
        in_features,
        out_features,
        num_experts=num_experts,
        mlp_bias=bias,
        capacity_factor=capacity_factor,
        eval_capacity_factor=capacity_factor,
        min_capacity=kw.pop("min_capacity", 1),
        moe_backend=backend,
        **kw,
    )
    with torch.no_grad():
        layer.router.weight.normal_(std=1.0)
        layer.weight.normal_(std=0.2)
        if bias:
            layer.bias.normal_(std=0.2)
    return layer


def summary(routing):
    """(aux_loss, z_loss, load [E], dropped) of one routed linear's routing."""
    return tuple(part[0] for part in routing_summary([routing]))


def assert_fp32_close(got, want, msg=None):
    """Equal up to float32 reassociation: dispatches sum the same products in different orders."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * max(1.0, want.abs().max().item()), msg=msg)


@pytest.mark.usefixtures("strict_grouped_mm", "dispatch")
@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
@pytest.mark.parametrize("capacity_factor", [None, 1.0, 0.5])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_per_token_reference(backend, capacity_factor, bias):
    layer = make_layer(backend, bias=bias, capacity_factor=capacity_factor)
    x = torch.randn(40, 16)
    mask = torch.rand(40) > 0.2
    got, routing = layer(x, mask)
    want = reference_forward(layer, x, mask, capacity_factor)
    assert_fp32_close(got, want)
    assert torch.all(got[~mask] == 0)
    if capacity_factor == 0.5:
        assert not routing.keep[mask].all()  # capacity dropped some valid tokens


@pytest.mark.usefixtures("strict_grouped_mm", "dispatch")
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
@pytest.mark.parametrize("in_features,out_features", [(32, 48), (48, 32)])
@pytest.mark.parametrize("jitter", [0.0, 0.3])
def test_grouped_mm_agrees_with_loop_outputs_and_gradients(bias, capacity_factor, in_features, out_features, jitter):
    shape = dict(
        num_experts=8,
        bias=bias,
        capacity_factor=capacity_factor,
        in_features=in_features,
        out_features=out_features,
        router_jitter_noise=jitter,
    )
    loop = make_layer("loop", **shape)
    grouped = make_layer("grouped_mm", **shape)
    grouped.load_state_dict(loop.state_dict())
    x = torch.randn(3, 50, in_features)
    mask = torch.rand(3, 50) > 0.1
    upstream = torch.randn(3, 50, out_features)
    results = []
    for layer in (loop, grouped):
        x_leaf = x.clone().requires_grad_()
        torch.manual_seed(1)  # the same jitter for both
        out, routing = layer(x_leaf, mask)
        aux_loss, z_loss, _, _ = summary(routing)
        ((out * upstream).sum() + aux_loss + z_loss).backward()
        results.append((out, x_leaf.grad, {name: p.grad for name, p in layer.named_parameters()}))
    (out_a, dx_a, grads_a), (out_b, dx_b, grads_b) = results
    assert_fp32_close(out_b, out_a)
    assert_fp32_close(dx_b, dx_a)
    assert set(grads_a) == set(grads_b)
    for name in grads_a:
        assert_fp32_close(grads_b[name], grads_a[name], msg=name)
    assert torch.all(torch.isfinite(dx_b)) and torch.all(dx_b[~mask] == 0)


@pytest.mark.usefixtures("strict_grouped_mm", "dispatch")
@pytest.mark.parametrize("router_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("in_features,out_features", [(16, 24), (24, 16)])
def test_bf16_grouped_mm_tracks_the_loop(router_dtype, in_features, out_features):
    """bf16 experts with a bf16 or a float32 router: the dispatches sum bf16 products in other orders, so they
    agree up to bf16 rounding."""
    shape = dict(num_experts=8, capacity_factor=1.0, in_features=in_features, out_features=out_features)
    layers = [make_layer(backend, **shape).to(torch.bfloat16) for backend in ("loop", "grouped_mm")]
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(3, 40, in_features, dtype=torch.bfloat16)
    mask = torch.rand(3, 40) > 0.1
    results = []
    for layer in layers:
        layer.router.to(router_dtype)
        x_leaf = x.clone().requires_grad_()
        out, routing = layer(x_leaf, mask)
        aux_loss, z_loss, _, _ = summary(routing)
        (out.float().square().sum() + aux_loss + z_loss).backward()
        assert out.dtype == x_leaf.grad.dtype == torch.bfloat16 and layer.router.weight.grad.dtype == router_dtype
        results.append([out, x_leaf.grad, layer.router.weight.grad, layer.weight.grad])
    for got, want, name in zip(results[1], results[0], ["out", "x", "router", "experts"], strict=True):
        scale = want.float().abs().max().item()
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2 * scale, msg=name)


def test_router_gets_gradient_through_top1_probability():
    layer = make_layer("grouped_mm", capacity_factor=None)
    layer(torch.randn(20, 16))[0].square().sum().backward()
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0


@pytest.mark.usefixtures("dispatch")
@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
def test_straight_through_scale_is_one_forward_and_the_probability_backward(backend):
    """expert_scale="straight_through": the output is W_e x exactly, the router's gradient is the one the
    probability scale gives for the same upstream gradient, and the experts' gradient loses the factor p."""
    x, upstream = torch.randn(20, 16), torch.randn(20, 24)
    layers = {scale: make_layer(backend, capacity_factor=1.0, expert_scale=scale) for scale in EXPERT_SCALES}
    straight, probability = layers["straight_through"], layers["probability"]
    probability.load_state_dict(straight.state_dict())
    outputs = {}
    for scale, layer in layers.items():
        out, routing = layer(x)
        (out * upstream).sum().backward()
        outputs[scale] = (out, routing)
    (out, routing), (p_out, p_routing) = outputs["straight_through"], outputs["probability"]
    kept = routing.keep
    assert torch.equal(routing.scale, kept.float()) and 0 < kept.sum() < 20
    assert_fp32_close(out[kept], torch.einsum("toi,ti->to", straight.weight[routing.expert], x)[kept])
    assert torch.equal(out[~kept], torch.zeros_like(out[~kept]))
    assert_fp32_close(out * p_routing.scale.unsqueeze(1), p_out)
    assert_fp32_close(straight.router.weight.grad, probability.router.weight.grad)
    assert not torch.allclose(straight.weight.grad, probability.weight.grad)


def one_hot_router_layer(backend, capacity_factor, min_capacity):
    """Two experts; a token goes to expert 0 when x[0] > x[1], else to expert 1."""
    layer = make_layer(
        backend,
        num_experts=2,
        capacity_factor=capacity_factor,
        min_capacity=min_capacity,
        in_features=4,
        out_features=4,
    )
    with torch.no_grad():
        layer.router.weight.copy_(torch.tensor([[4.0, 0, 0, 0], [0, 4.0, 0, 0]]))
    return layer


def tokens_for(experts):
    x = torch.zeros(len(experts), 4)
    for t, e in enumerate(experts):
        x[t, e] = 1.0
        x[t, 2] = 0.5 + t
    return x


@pytest.mark.usefixtures("dispatch")
@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
def test_hand_computed_capacity(backend):
    # 7 tokens, experts 0 0 1 0 0 1 0, token 1 is padding: T_valid = 6, C = ceil(1.0 * 6 / 2) = 3.
    # Expert 0's valid tokens in order are 0, 3, 4, 6: the first three fit, token 6 is dropped.
    layer = one_hot_router_layer(backend, capacity_factor=1.0, min_capacity=1)
    x = tokens_for([0, 0, 1, 0, 0, 1, 0])
    mask = torch.tensor([1, 0, 1, 1, 1, 1, 1])
    out, routing = layer(x, mask)
    assert (out == 0).all(dim=1).tolist() == [False, True, False, False, False, False, True]
    _, _, load, dropped = summary(routing)
    assert dropped.item() == pytest.approx(1 / 6)
    torch.testing.assert_close(load, torch.tensor([4 / 6, 2 / 6]))

    # min_capacity wins over a small factor: C = max(2, ceil(0.1 * 6 / 2)) = 2, tokens 4 and 6 drop.
    layer = one_hot_router_layer(backend, capacity_factor=0.1, min_capacity=2)
    out, _ = layer(x, mask)
    assert (out == 0).all(dim=1).tolist() == [False, True, False, False, True, False, True]


def test_capacity_uses_eval_factor_in_eval_mode():
    layer = one_hot_router_layer("grouped_mm", capacity_factor=0.5, min_capacity=1)
    layer.router.eval_capacity_factor = None
    x = tokens_for([0, 0, 0, 0, 1, 1])
    layer.train()
    assert (layer(x)[0] == 0).all(dim=1).sum() > 0
    layer.eval()
    out, routing = layer(x)
    assert not (out == 0).all(dim=1).any()
    assert summary(routing)[3].item() == 0


def test_jitter_only_in_training_and_only_on_router_input():
    layer = make_layer("grouped_mm", capacity_factor=None, router_jitter_noise=0.3)
    x = torch.randn(64, 16)
    clean_logits = x @ layer.router.weight.T

    layer.eval()
    out_eval, routing = layer(x)
    torch.testing.assert_close(routing.logits, clean_logits)
    torch.testing.assert_close(layer(x)[0], out_eval)

    layer.train()
    torch.manual_seed(5)
    noise = torch.empty_like(x).uniform_(0.7, 1.3)  # U(1 - eps, 1 + eps) times the router's input
    assert noise.min() < 0.75 and noise.max() > 1.25
    torch.manual_seed(5)
    out_train, routing = layer(x)
    assert_fp32_close(routing.logits, (x * noise) @ layer.router.weight.T)
    # Experts saw the clean input: output = p * W_e x with p, e from the jittered router.
    top_prob, expert = routing.logits.softmax(-1).max(-1)
    expected = top_prob.unsqueeze(1) * torch.einsum("toi,ti->to", layer.weight[expert], x)
    assert_fp32_close(out_train, expected)


def test_losses_equal_switch_transformers_functions():
    layer = make_layer("grouped_mm", num_experts=8, capacity_factor=1.0)
    _, routing = layer(torch.randn(2, 30, 16))
    logits = routing.logits.unsqueeze(0)
    probs = logits.softmax(-1)
    aux_loss, z_loss, _, _ = summary(routing)
    torch.testing.assert_close(aux_loss, load_balancing_loss_func(probs, probs.argmax(-1)))
    torch.testing.assert_close(z_loss, router_z_loss_func(logits))


def test_perfect_balance_gives_aux_loss_one():
    layer = one_hot_router_layer("loop", capacity_factor=None, min_capacity=0)
    with torch.no_grad():
        layer.router.weight.zero_()  # uniform probabilities
    _, routing = layer(tokens_for([0, 1]))
    assert summary(routing)[0].item() == pytest.approx(1.0)


def test_padding_stays_out_of_losses_and_statistics():
    layer = make_layer("grouped_mm", capacity_factor=None)
    x = torch.randn(30, 16)
    mask = torch.rand(30) > 0.3
    padded_out, padded = layer(x, mask)
    valid_out, valid = layer(x[mask])
    torch.testing.assert_close(padded_out[mask], valid_out)
    for got, want in zip(summary(padded), summary(valid), strict=True):
        torch.testing.assert_close(got, want)
    assert padded.logits.shape[0] == 30


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
def test_all_padding_gives_zero_output_and_finite_losses(backend):
    layer = make_layer(backend, capacity_factor=1.0)
    out, routing = layer(torch.randn(5, 16), torch.zeros(5, dtype=torch.bool))
    assert torch.all(out == 0)
    aux_loss, z_loss, _, _ = summary(routing)
    assert torch.isfinite(aux_loss) and torch.isfinite(z_loss)


def test_bf16_output_dtype_and_float32_router():
    layer = make_layer("grouped_mm").to(torch.bfloat16)
    out, routing = layer(torch.randn(12, 16, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert routing.logits.dtype == routing.probs.dtype == torch.float32


def test_auto_takes_grouped_mm_where_the_operands_allow_it(monkeypatch):
    aligned, unaligned = torch.randn(9, 16), torch.randn(9, 6)
    assert grouped_mm_runs(aligned, torch.randn(4, 24, 16))
    assert not grouped_mm_runs(unaligned, torch.randn(4, 10, 6))  # rows not 16-byte aligned
    calls = []
    grouped_mm = torch.nn.functional.grouped_mm
    monkeypatch.setattr(torch.nn.functional, "grouped_mm", lambda *a, **k: calls.append(1) or grouped_mm(*a, **k))
    with reference_only():
        make_layer("auto", in_features=6, out_features=10)(unaligned)
        assert not calls
        make_layer("auto")(aligned)
        assert calls


SYNCHRONISING_OPS = {"nonzero", "_local_scalar_dense", "masked_select", "unique", "_unique2", "bincount", "item"}


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func._schema.name.split("::")[-1])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["grouped_mm", "loop"])
def test_training_step_reads_nothing_back_to_the_host(backend):
    """On an accelerator a read of routing results would stall the queue of launched kernels."""
    layer = make_layer(backend, capacity_factor=1.25, router_jitter_noise=0.1).train()
    x = torch.randn(2, 40, 16, requires_grad=True)
    mask = torch.rand(2, 40) > 0.2
    with reference_only(), RecordOps() as ops:
        out, routing = layer(x, mask)
        aux_loss, z_loss, _, _ = summary(routing)
        (out.square().sum() + aux_loss + z_loss).backward()
    assert ("_grouped_mm" in ops.names) == (backend == "grouped_mm")
    assert not ops.names & SYNCHRONISING_OPS, ops.names & SYNCHRONISING_OPS

    with RecordOps() as ops:
        torch.nonzero(torch.ones(3))
    assert "nonzero" in ops.names  # the recorder does see synchronising ops


@pytest.mark.usefixtures("strict_grouped_mm", "dispatch")
@pytest.mark.parametrize("backend", ["grouped_mm", "loop"])
@pytest.mark.parametrize("in_features,out_features", [(32, 48), (48, 32)])
def test_autocast_runs_the_experts_in_half_precision_and_the_router_in_float32(backend, in_features, out_features):
    """Under autocast (mixed-precision training) the experts multiply in bf16, as nn.Linear does there, and
    the router stays float32; the parameters keep float32 gradients. The same as handing the layer bf16
    operands explicitly, with a float32 router (the input is exact in bf16, so both routers read the same)."""
    layer = make_layer(backend, num_experts=8, bias=True, in_features=in_features, out_features=out_features)
    explicit = make_layer(backend, num_experts=8, bias=True, in_features=in_features, out_features=out_features)
    explicit.load_state_dict(layer.state_dict())
    explicit.weight.data, explicit.bias.data = explicit.weight.data.bfloat16(), explicit.bias.data.bfloat16()
    x = torch.randn(3, 40, in_features).bfloat16().float()
    mask = torch.rand(3, 40) > 0.1
    upstream = torch.randn(3, 40, out_features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, routing = layer(x, mask)
        assert out.dtype == torch.nn.Linear(in_features, out_features)(x).dtype == torch.bfloat16
    assert routing.logits.dtype == torch.float32
    want, explicit_routing = explicit(x.bfloat16(), mask)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(routing.logits, explicit_routing.logits)
    (out.float() * upstream).sum().backward()
    (want.float() * upstream).sum().backward()
    assert layer.weight.grad.dtype == layer.router.weight.grad.dtype == torch.float32
    torch.testing.assert_close(layer.weight.grad, explicit.weight.grad.float())
    torch.testing.assert_close(layer.router.weight.grad, explicit.router.weight.grad)
