"""GPU paths: bf16 grouped_mm against the loop reference, no host synchronisation, a bf16 training step, the
compiled Triton few-token kernel against tensor ops.

These need a CUDA device; without one they are reported as skipped with that reason.
"""

import pytest
import torch
from conftest import few_token_operands, tiny_config

from parameternet_llm import ParameterNetLlamaForCausalLM, RoutedLinear, modeling_parameternet_llama, triton_kernels
from parameternet_llm.modeling_parameternet_llama import grouped_mm_supported

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def cuda_layer(backend, capacity_factor=1.25, in_features=256, out_features=512, num_experts=8):
    layer = RoutedLinear(in_features, out_features, num_experts, capacity_factor=capacity_factor,
                         router_jitter_noise=0.0, backend=backend)
    with torch.no_grad():
        layer.router.weight.normal_(std=0.5)
        layer.weight.normal_(std=0.05)
    return layer.cuda().to(torch.bfloat16)


def test_auto_picks_grouped_mm_for_bf16():
    layer = cuda_layer("auto")
    x = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16)
    assert grouped_mm_supported(x, layer.weight)
    assert layer.expert_backend(x) == "grouped_mm"


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_bf16_grouped_mm_agrees_with_loop(capacity_factor):
    torch.manual_seed(0)
    loop = cuda_layer("loop", capacity_factor)
    grouped = cuda_layer("grouped_mm", capacity_factor)
    grouped.load_state_dict(loop.state_dict())
    x = torch.randn(4, 300, 256, device="cuda", dtype=torch.bfloat16)
    mask = torch.rand(4, 300, device="cuda") > 0.1
    upstream = torch.randn(4, 300, 512, device="cuda", dtype=torch.bfloat16)
    results = []
    for layer in (loop, grouped):
        x_leaf = x.clone().requires_grad_()
        out = layer(x_leaf, mask)
        ((out.float() * upstream.float()).sum() + layer.routing.aux_loss).backward()
        results.append((out.float(), x_leaf.grad.float(), layer.weight.grad.float(), layer.router.weight.grad.float()))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    assert torch.isfinite(results[1][1]).all()


def test_grouped_mm_training_step_does_not_synchronise():
    layer = cuda_layer("grouped_mm", capacity_factor=1.25).train()
    layer.router_jitter_noise = 0.01
    x = torch.randn(2, 512, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    mask = torch.rand(2, 512, device="cuda") > 0.1
    layer(x, mask)  # warm-up outside the check: first calls may load kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = layer(x, mask)
        (out.float().square().mean() + layer.routing.aux_loss + layer.routing.z_loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(x.grad).all()


def test_bf16_training_step_and_generation():
    torch.manual_seed(0)
    config = tiny_config(num_experts=8, moe_projections=["gate_proj", "up_proj", "down_proj"],
                         hidden_size=128, intermediate_size=256)
    model = ParameterNetLlamaForCausalLM(config).cuda().to(torch.bfloat16)
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    model.train()
    ids = torch.randint(3, 90, (4, 32), device="cuda")
    out = model(ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.aux_loss.item() >= 1.0 - 1e-3
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    prompt = ids[:2, :5]
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(prompt, use_cache=True, **kwargs), model.generate(prompt, use_cache=False, **kwargs))


@pytest.mark.parametrize("tokens", [1, 4])
def test_triton_few_token_kernel_matches_tensor_ops(tokens):
    """The compiled Triton kernel on LLaMA-1B's up projection shape, bf16, against the model's router,
    batched gather + bmm and losses."""
    assert triton_kernels.load(), "the Triton kernel does not run on this GPU"
    operands = [None if t is None else t.cuda() for t in few_token_operands(
        torch.bfloat16, bias=True, tokens=tokens, experts=8, in_features=2048, out_features=5632)]
    x, router_input, router_weight, weight, bias, valid = operands
    out, logits, probs, expert, *summary = triton_kernels.routed_few_tokens(*operands)
    want_logits, want_probs, scale, want_expert, keep, _, _ = modeling_parameternet_llama.route(
        router_weight, router_input, valid, None, 1, torch.bfloat16, sort=False)
    assert torch.equal(expert, want_expert)
    torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(probs, want_probs, rtol=1e-4, atol=1e-4)
    want = modeling_parameternet_llama.gathered_experts(x, weight, bias, expert, scale, on_views=False)
    torch.testing.assert_close(out.float(), want.float(), rtol=2e-2, atol=2e-2)
    for got, want_part in zip(summary, modeling_parameternet_llama.routing_summary(
            want_logits, want_probs, want_expert, valid, keep), strict=True):
        torch.testing.assert_close(got, want_part, rtol=1e-4, atol=1e-4)


def test_decoding_runs_the_triton_kernel_and_matches_tensor_ops(monkeypatch):
    torch.manual_seed(0)
    config = tiny_config(num_experts=8, moe_projections=["gate_proj", "up_proj", "down_proj"], hidden_size=128,
                         intermediate_size=256)
    model = ParameterNetLlamaForCausalLM(config).cuda().to(torch.bfloat16).eval()
    prompt = torch.randint(3, 90, (1, 6), device="cuda")
    calls = []
    run = triton_kernels.routed_few_tokens
    monkeypatch.setattr(triton_kernels, "routed_few_tokens", lambda *operands: calls.append(1) or run(*operands))

    def decode():
        return model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0,
                              output_logits=True, return_dict_in_generate=True)

    kernel = decode()
    assert len(calls) == 3 * len(model.routed_linears())  # each step after the prompt's, each routed linear
    monkeypatch.setattr(modeling_parameternet_llama, "few_token_kernels", lambda device: None)
    tensor_ops = decode()
    assert torch.equal(kernel.sequences, tensor_ops.sequences)
    for got, want in zip(kernel.logits, tensor_ops.logits, strict=True):
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_half_precision_router_logits_are_the_float32_products():
    """bf16 router weights and inputs multiply into float32 as they are (no float32 copy of the input) where no
    gradient is taken through the product, and give the float32 product's logits; with gradients they are
    copied to float32, as autograd needs."""
    router_weight = torch.randn(8, 2048, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(4096, 2048, device="cuda", dtype=torch.bfloat16)
    want = router_weight.float() @ x.float().t()
    got = modeling_parameternet_llama.router_logits(router_weight, x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-3)
    router_weight.requires_grad_()
    with_grad = modeling_parameternet_llama.router_logits(router_weight, x)
    torch.testing.assert_close(with_grad, want, rtol=1e-5, atol=1e-3)
    with_grad.sum().backward()
    assert router_weight.grad is not None


def test_autocast_runs_float32_experts_through_bf16_grouped_mm():
    """Mixed-precision training (float32 parameters under autocast bf16): the experts take grouped_mm in bf16,
    the router stays float32."""
    layer = RoutedLinear(256, 512, 8, capacity_factor=1.25).cuda().train()
    x = torch.randn(2, 300, 256, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert layer.expert_backend(x.reshape(-1, 256)) == "grouped_mm"
        out = layer(x)
    assert out.dtype == torch.bfloat16 and layer.routing.logits.dtype == torch.float32
    (out.float().square().mean() + layer.routing.aux_loss).backward()
    assert layer.weight.grad.dtype == torch.float32 and torch.isfinite(layer.weight.grad).all()
