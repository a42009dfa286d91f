"""RoutedLinear against DESIGN.md's routing rules, a per-token reference and transformers' Switch losses."""

import math

import pytest
import torch
from conftest import tiny_config
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.models.switch_transformers.modeling_switch_transformers import (
    load_balancing_loss_func,
    router_z_loss_func,
)

from parameternet_llm import RoutedLinear, modeling_parameternet_llama
from parameternet_llm.modeling_parameternet_llama import ParameterNetLlamaMLP, gathered_experts, loop_experts


def reference_forward(layer: RoutedLinear, x: torch.Tensor, mask: torch.Tensor, capacity_factor):
    """Token-by-token reading of the rules: float32 router, top-1, slots claimed in token order."""
    num_experts = layer.num_experts
    logits = x.float() @ layer.router.weight.float().T
    probs = logits.softmax(-1)
    num_valid = int(mask.sum())
    if capacity_factor is None:
        capacity = math.inf
    else:
        capacity = max(layer.min_capacity, math.ceil(capacity_factor * num_valid / num_experts))
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
    layer = RoutedLinear(
        in_features,
        out_features,
        num_experts,
        bias=bias,
        capacity_factor=capacity_factor,
        eval_capacity_factor=capacity_factor,
        min_capacity=kw.pop("min_capacity", 1),
        backend=backend,
        **kw,
    )
    with torch.no_grad():
        layer.router.weight.normal_(std=1.0)
        layer.weight.normal_(std=0.2)
        if bias:
            layer.bias.normal_(std=0.2)
    return layer


@pytest.mark.usefixtures("strict_grouped_mm")
@pytest.mark.parametrize("backend", ["loop", "grouped_mm", "gathered"])
@pytest.mark.parametrize("capacity_factor", [None, 1.0, 0.5])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_per_token_reference(backend, capacity_factor, bias):
    layer = make_layer(backend, bias=bias, capacity_factor=capacity_factor)
    x = torch.randn(40, 16)
    mask = torch.rand(40) > 0.2
    got = layer(x, mask)
    want = reference_forward(layer, x, mask, capacity_factor)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.all(got[~mask] == 0)


def assert_fp32_close(got, want, msg=None):
    """Equal up to float32 reassociation: backends sum the same products in different orders."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * max(1.0, want.abs().max().item()), msg=msg)


@pytest.mark.usefixtures("cpu_kernels_on_and_off", "strict_grouped_mm")
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
@pytest.mark.parametrize("in_features,out_features", [(32, 48), (48, 32)])  # probability on input / output side
@pytest.mark.parametrize("jitter", [0.0, 0.3])
def test_grouped_mm_agrees_with_loop_outputs_and_gradients(bias, capacity_factor, in_features, out_features, jitter):
    shape = dict(num_experts=8, bias=bias, capacity_factor=capacity_factor, in_features=in_features,
                 out_features=out_features, router_jitter_noise=jitter)
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
        out = layer(x_leaf, mask)
        loss = (out * upstream).sum() + layer.routing.aux_loss + layer.routing.z_loss
        loss.backward()
        grads = {name: p.grad for name, p in layer.named_parameters()}
        results.append((out, x_leaf.grad, grads))
    (out_a, dx_a, grads_a), (out_b, dx_b, grads_b) = results
    assert_fp32_close(out_b, out_a)
    assert_fp32_close(dx_b, dx_a)
    assert set(grads_a) == set(grads_b)
    for name in grads_a:
        assert_fp32_close(grads_b[name], grads_a[name], msg=name)
    assert torch.all(torch.isfinite(dx_b)) and torch.all(dx_b[~mask] == 0)


@pytest.mark.usefixtures("strict_grouped_mm")
@pytest.mark.parametrize("router_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("jitter", [0.0, 0.3])
@pytest.mark.parametrize("in_features,out_features", [(16, 24), (24, 16)])  # probability on input / output side
def test_bf16_grouped_mm_gradients_track_the_loop(router_dtype, jitter, in_features, out_features):
    """bf16 experts with a bf16 router (bf16 training: the router's gradients are bf16 products) or a float32
    one (float32 copies), against the loop, whose router runs in float32 copies under autograd."""
    shape = dict(num_experts=8, capacity_factor=1.0, in_features=in_features, out_features=out_features,
                 router_jitter_noise=jitter)
    layers = [make_layer(backend, **shape).to(torch.bfloat16) for backend in ("loop", "grouped_mm")]
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(3, 40, in_features, dtype=torch.bfloat16)
    mask = torch.rand(3, 40) > 0.1
    results = []
    for layer in layers:
        layer.router.to(router_dtype)
        x_leaf = x.clone().requires_grad_()
        torch.manual_seed(1)  # the same jitter for both
        out = layer(x_leaf, mask)
        (out.float().square().sum() + layer.routing.aux_loss + layer.routing.z_loss).backward()
        assert x_leaf.grad.dtype == torch.bfloat16 and layer.router.weight.grad.dtype == router_dtype
        results.append([out, x_leaf.grad, layer.router.weight.grad, layer.weight.grad])
    for got, want, name in zip(results[1], results[0], ["out", "x", "router", "experts"], strict=True):
        scale = want.float().abs().max().item()
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2 * scale, msg=name)


@pytest.fixture
def rows_multiplied(monkeypatch):
    """The rows that each `grouped_mm` call multiplies (its last offset), in call order."""
    rows = []
    grouped_mm = modeling_parameternet_llama.grouped_mm

    def recording(mat_a, mat_b, offs):
        rows.append(int(offs[-1]))
        return grouped_mm(mat_a, mat_b, offs)

    monkeypatch.setattr(modeling_parameternet_llama, "grouped_mm", recording)
    return rows


def routed_experts_node(out: torch.Tensor):
    """The `RoutedExperts` autograd node behind a routed linear's output."""
    nodes = [out.grad_fn]
    while nodes:
        node = nodes.pop()
        if type(node).__name__ == "RoutedExpertsBackward":
            return node
        nodes.extend(next_node for next_node, _ in node.next_functions if next_node is not None)
    raise AssertionError("no RoutedExperts node")


@pytest.mark.parametrize("jitter", [0.0, 0.3])
@pytest.mark.parametrize("in_features,out_features", [(48, 32), (32, 48)])
def test_backward_keeps_the_input_once(in_features, out_features, jitter):
    """With the probability on the output side (a down projection) backward reads x only through its
    sorted rows and the router's input: x itself, the MLP's widest activation there, is not kept as
    well. On the input side it reads x for the probability's gradient."""
    layer = make_layer("grouped_mm", in_features=in_features, out_features=out_features, capacity_factor=None,
                       router_jitter_noise=jitter)
    x = torch.randn(50, in_features, requires_grad=True)
    saved = [t for t in routed_experts_node(layer(x)).saved_tensors if t is not None]
    keeps_x = any(t.data_ptr() == x.data_ptr() for t in saved)
    assert keeps_x == (in_features < out_features)
    kept_inputs = {t.data_ptr() for t in saved if t.shape == x.shape}  # sorted rows, x, the jittered x
    assert len(kept_inputs) == 1 + keeps_x + (jitter > 0)


def test_grouped_dispatch_multiplies_only_kept_tokens_and_one_spare_row(rows_multiplied):
    """Dropped tokens and padding stay out of every grouped_mm (forward, input and weight gradients)."""
    layer = make_layer("grouped_mm", capacity_factor=0.5)
    x = torch.randn(60, 16, requires_grad=True)
    mask = torch.rand(60) > 0.2
    layer(x, mask).square().sum().backward()
    kept = int(layer.routing.keep.sum())
    assert kept < int(mask.sum())  # capacity dropped some valid tokens
    assert rows_multiplied == [kept + 1] * 3


def test_sorted_lead_multiplies_every_row_only_where_host_reads_cost(host_reads, rows_multiplied):
    """The MLP's lead hands on its output whole in sorted order: where reading where its dropped rows start
    is free, they are zeroed instead of multiplied; elsewhere every row is multiplied with scale 0."""
    config = tiny_config(num_experts=4, moe_projections=["up_proj"], capacity_factor=0.5, min_capacity=1)
    mlp = ParameterNetLlamaMLP(config, layer_idx=0).train()
    x = torch.randn(60, config.hidden_size, requires_grad=True)
    mask = torch.rand(60) > 0.2
    out = mlp(x, mask)
    out.square().sum().backward()
    routing = mlp.up_proj.routing
    kept = int(routing.keep.sum())
    assert mlp.sorted_lead(x) == "up_proj" and kept < int(mask.sum())
    assert rows_multiplied == [kept + 1 if host_reads == "free" else x.shape[0]] * 3
    assert torch.all(out[~routing.keep] == 0) and torch.all(torch.isfinite(x.grad))


def test_router_gets_gradient_through_top1_probability():
    layer = make_layer("grouped_mm", capacity_factor=None)
    layer(torch.randn(20, 16)).square().sum().backward()
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0


def one_hot_router_layer(backend, capacity_factor, min_capacity):
    """Two experts; a token goes to expert 0 when x[0] > x[1], else to expert 1."""
    layer = make_layer(backend, num_experts=2, capacity_factor=capacity_factor, min_capacity=min_capacity,
                       in_features=4, out_features=4)
    with torch.no_grad():
        layer.router.weight.copy_(torch.tensor([[4.0, 0, 0, 0], [0, 4.0, 0, 0]]))
    return layer


def tokens_for(experts):
    x = torch.zeros(len(experts), 4)
    for t, e in enumerate(experts):
        x[t, e] = 1.0
        x[t, 2] = 0.5 + t
    return x


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
def test_hand_computed_capacity(backend):
    # 7 tokens, experts 0 0 1 0 0 1 0, token 1 is padding: T_valid = 6, C = ceil(1.0 * 6 / 2) = 3.
    # Expert 0's valid tokens in order are 0, 3, 4, 6: the first three fit, token 6 is dropped.
    layer = one_hot_router_layer(backend, capacity_factor=1.0, min_capacity=1)
    x = tokens_for([0, 0, 1, 0, 0, 1, 0])
    mask = torch.tensor([1, 0, 1, 1, 1, 1, 1])
    out = layer(x, mask)
    zero_rows = (out == 0).all(dim=1)
    assert zero_rows.tolist() == [False, True, False, False, False, False, True]
    assert layer.routing.dropped_fraction.item() == pytest.approx(1 / 6)
    torch.testing.assert_close(layer.routing.expert_load, torch.tensor([4 / 6, 2 / 6]))

    # min_capacity wins over a small factor: C = max(2, ceil(0.1 * 6 / 2)) = 2, tokens 4 and 6 drop.
    layer = one_hot_router_layer(backend, capacity_factor=0.1, min_capacity=2)
    zero_rows = (layer(x, mask) == 0).all(dim=1)
    assert zero_rows.tolist() == [False, True, False, False, True, False, True]


def test_capacity_uses_eval_factor_in_eval_mode():
    layer = one_hot_router_layer("grouped_mm", capacity_factor=0.5, min_capacity=1)
    layer.eval_capacity_factor = None
    x = tokens_for([0, 0, 0, 0, 1, 1])
    layer.train()
    assert (layer(x) == 0).all(dim=1).sum() > 0
    layer.eval()
    assert not (layer(x) == 0).all(dim=1).any()
    assert layer.routing.dropped_fraction.item() == 0


def test_jitter_only_in_training_and_only_on_router_input():
    layer = make_layer("grouped_mm", capacity_factor=None, router_jitter_noise=0.3)
    x = torch.randn(64, 16)
    clean_logits = x @ layer.router.weight.T

    layer.eval()
    out_eval = layer(x)
    torch.testing.assert_close(layer.routing.router_logits, clean_logits)
    torch.testing.assert_close(layer(x), out_eval)

    layer.train()
    out_train = layer(x)
    jittered_logits = layer.routing.router_logits
    assert not torch.allclose(jittered_logits, clean_logits)
    # Experts saw the clean input: output = p * W_e x with p, e from the jittered router.
    probs = jittered_logits.softmax(-1)
    top_prob, expert = probs.max(-1)
    expected = top_prob.unsqueeze(1) * torch.einsum("toi,ti->to", layer.weight[expert], x)
    torch.testing.assert_close(out_train, expected, rtol=1e-5, atol=1e-6)


def test_losses_equal_switch_transformers_functions():
    layer = make_layer("grouped_mm", num_experts=8, capacity_factor=1.0)
    x = torch.randn(2, 30, 16)
    layer(x)
    logits = layer.routing.router_logits.unsqueeze(0)
    probs = logits.softmax(-1)
    expected_aux = load_balancing_loss_func(probs, probs.argmax(-1))
    expected_z = router_z_loss_func(logits)
    torch.testing.assert_close(layer.routing.aux_loss, expected_aux)
    torch.testing.assert_close(layer.routing.z_loss, expected_z)


def test_perfect_balance_gives_aux_loss_one():
    layer = one_hot_router_layer("loop", capacity_factor=None, min_capacity=0)
    with torch.no_grad():
        layer.router.weight.zero_()  # uniform probabilities
    layer(tokens_for([0, 1]))
    assert layer.routing.aux_loss.item() == pytest.approx(1.0)


def test_padding_stays_out_of_losses_and_statistics():
    layer = make_layer("grouped_mm", capacity_factor=None)
    x = torch.randn(30, 16)
    mask = torch.rand(30) > 0.3
    padded_out = layer(x, mask)
    padded = layer.routing
    valid_out = layer(x[mask])
    valid = layer.routing
    torch.testing.assert_close(padded_out[mask], valid_out)
    torch.testing.assert_close(padded.aux_loss, valid.aux_loss)
    torch.testing.assert_close(padded.z_loss, valid.z_loss)
    torch.testing.assert_close(padded.expert_load, valid.expert_load)
    assert padded.router_logits.shape[0] == 30


def test_all_padding_gives_zero_output_and_finite_losses():
    layer = make_layer("grouped_mm", capacity_factor=1.0)
    out = layer(torch.randn(5, 16), torch.zeros(5, dtype=torch.bool))
    assert torch.all(out == 0)
    assert torch.isfinite(layer.routing.aux_loss) and torch.isfinite(layer.routing.z_loss)


def test_bf16_output_dtype_and_float32_router():
    layer = make_layer("grouped_mm").to(torch.bfloat16)
    out = layer(torch.randn(12, 16, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert layer.routing.router_logits.dtype == torch.float32


def test_auto_backend_choice():
    aligned = make_layer("auto", in_features=16, out_features=24)
    unaligned = make_layer("auto", in_features=6, out_features=10)
    assert aligned.expert_backend(torch.randn(9, 16)) == "grouped_mm"
    assert unaligned.expert_backend(torch.randn(9, 6)) == "loop"
    assert aligned.expert_backend(torch.randn(4, 16)) == "grouped_mm"  # gradients on
    with torch.no_grad():
        assert aligned.expert_backend(torch.randn(4, 16)) == "gathered"  # decoding
        assert aligned.expert_backend(torch.randn(5, 16)) == "grouped_mm"
    assert unaligned(torch.randn(9, 6)).shape == (9, 10)


@pytest.mark.parametrize("few_token_kernel", ["cpu_kernels", "triton_kernels", None], indirect=True)
@pytest.mark.parametrize("tokens", [1, 3])
def test_decoding_path_matches_the_reference(few_token_kernel, tokens):
    layer = make_layer("auto", capacity_factor=None, bias=True)
    x = torch.randn(tokens, 16)
    mask = torch.arange(tokens) != 1  # the second token (where there is one) is padding
    with torch.no_grad():
        torch.testing.assert_close(layer(x, mask), reference_forward(layer, x, mask, None))
    for got, want in zip(layer.routing.summary, modeling_parameternet_llama.routing_summary(
            layer.routing.logits, layer.routing.probs, layer.routing.expert, mask, mask), strict=True):
        torch.testing.assert_close(got, want)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the compiled few-token kernel's calls (which must have been built)."""
    kernels = modeling_parameternet_llama.compiled_cpu_kernels()
    assert kernels is not None, "the CPU kernels did not build"
    calls = []
    run = kernels.routed_few_tokens
    monkeypatch.setattr(kernels, "routed_few_tokens", lambda *operands: calls.append(1) or run(*operands))
    return calls


@pytest.mark.parametrize("capacity_factor,min_capacity,grad,compiled", [
    (None, 1, False, True),  # dropless
    (0.5, 3, False, True),   # capacity never below min_capacity = 3 tokens: none can drop
    (0.5, 2, False, False),  # three tokens, capacity 2: one may drop
    (None, 1, True, False),  # gradients: the kernel has no backward
])
def test_few_tokens_run_the_compiled_kernel_where_no_token_can_drop(kernel_calls, capacity_factor, min_capacity,
                                                                     grad, compiled):
    layer = make_layer("gathered", capacity_factor=capacity_factor, min_capacity=min_capacity).eval()
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(4, 16))
    x = torch.zeros(3, 16)
    x[:, 0] = 1.0  # all three tokens choose expert 0
    x.requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        got = layer(x)
    assert len(kernel_calls) == int(compiled)
    want = reference_forward(layer, x.detach(), torch.ones(3, dtype=torch.bool), capacity_factor)
    torch.testing.assert_close(got, want)
    if grad:
        got.sum().backward()
        assert x.grad is not None and layer.weight.grad is not None


@pytest.mark.parametrize("on_views", [True, False])  # the CPU default, and the batched gather used elsewhere
@pytest.mark.parametrize("experts", [[2, 0, 2], [1, 1, 1]])
def test_both_gathered_variants_match_the_loop(on_views, experts):
    layer = make_layer("loop", bias=True)
    x = torch.randn(3, 16)
    expert = torch.tensor(experts)
    scale = torch.tensor([0.5, 1.0, 0.0])
    want = loop_experts(x, layer.weight, layer.bias, expert, scale)
    got = gathered_experts(x, layer.weight, layer.bias, expert, scale, on_views=on_views)
    torch.testing.assert_close(got, want)


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="fused"):
        RoutedLinear(8, 8, 2, backend="fused")


SYNCHRONISING_OPS = {"nonzero", "_local_scalar_dense", "masked_select", "unique", "_unique2", "bincount", "item"}


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func._schema.name.split("::")[-1])
        return func(*args, **(kwargs or {}))


def test_grouped_mm_training_step_has_no_host_synchronising_op():
    layer = make_layer("grouped_mm", capacity_factor=1.25, router_jitter_noise=0.1).train()
    x = torch.randn(2, 40, 16, requires_grad=True)
    mask = torch.rand(2, 40) > 0.2
    with RecordOps() as ops:
        out = layer(x, mask)
        (out.square().sum() + layer.routing.aux_loss + layer.routing.z_loss).backward()
    assert "_grouped_mm" in ops.names or "grouped_mm" in ops.names
    assert not ops.names & SYNCHRONISING_OPS, ops.names & SYNCHRONISING_OPS

    with RecordOps() as ops:
        make_layer("loop")(torch.randn(8, 16))
    assert "nonzero" in ops.names  # the recorder does see synchronising ops


@pytest.mark.usefixtures("accelerator_reads")
def test_mlp_in_sorted_row_order_has_no_host_synchronising_op():
    config = tiny_config(num_experts=4, moe_projections=["gate_proj", "up_proj", "down_proj"], router_jitter_noise=0.1)
    mlp = ParameterNetLlamaMLP(config, layer_idx=0).train()
    x = torch.randn(2, 40, config.hidden_size, requires_grad=True)
    mask = torch.rand(2, 40) > 0.2
    assert mlp.sorted_lead(x.reshape(-1, config.hidden_size)) == "up_proj"
    with RecordOps() as ops:
        mlp(x, mask).square().sum().backward()
    assert "_grouped_mm" in ops.names or "grouped_mm" in ops.names
    assert not ops.names & SYNCHRONISING_OPS, ops.names & SYNCHRONISING_OPS


@pytest.mark.usefixtures("strict_grouped_mm")
@pytest.mark.parametrize("backend", ["grouped_mm", "loop"])
@pytest.mark.parametrize("in_features,out_features", [(32, 48), (48, 32)])
def test_autocast_runs_the_experts_in_half_precision_and_the_router_in_float32(backend, in_features, out_features):
    """Under autocast (mixed-precision training) the experts multiply in bf16, as nn.Linear does there, and
    the router stays float32; the parameters keep float32 gradients. The same as handing the layer bf16
    operands explicitly, with a float32 router."""
    layer = make_layer(backend, num_experts=8, bias=True, in_features=in_features, out_features=out_features)
    explicit = make_layer(backend, num_experts=8, bias=True, in_features=in_features, out_features=out_features)
    explicit.load_state_dict(layer.state_dict())
    explicit.weight.data, explicit.bias.data = explicit.weight.data.bfloat16(), explicit.bias.data.bfloat16()
    x = torch.randn(3, 40, in_features)
    mask = torch.rand(3, 40) > 0.1
    upstream = torch.randn(3, 40, out_features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x, mask)
        assert out.dtype == torch.nn.Linear(in_features, out_features)(x).dtype == torch.bfloat16
    assert layer.routing.logits.dtype == torch.float32
    want = explicit(x.bfloat16(), mask)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(layer.routing.logits, explicit.routing.logits)
    (out.float() * upstream).sum().backward()
    (want.float() * upstream).sum().backward()
    assert layer.weight.grad.dtype == layer.router.weight.grad.dtype == torch.float32
    torch.testing.assert_close(layer.weight.grad, explicit.weight.grad.float())
    torch.testing.assert_close(layer.router.weight.grad, explicit.router.weight.grad)
