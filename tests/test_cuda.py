"""GPU paths: bf16 grouped_mm against the loop, no host synchronisation, a bf16 training step with gradient
checkpointing, and decoding.

These need a CUDA device; without one they are reported as skipped with that reason.
"""

import pytest
import torch
from conftest import routed_linear, tiny_config

from parameternet_llm import ParameterNetLlamaForCausalLM
from parameternet_llm.modeling_parameternet_llama import grouped_mm_runs, routing_summary

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def cuda_layer(backend, capacity_factor=1.25, in_features=256, out_features=512, num_experts=8, jitter=0.0):
    layer = routed_linear(
        in_features,
        out_features,
        num_experts=num_experts,
        capacity_factor=capacity_factor,
        router_jitter_noise=jitter,
        moe_backend=backend,
    )
    with torch.no_grad():
        layer.router.weight.normal_(std=0.5)
        layer.weight.normal_(std=0.05)
    return layer.cuda().to(torch.bfloat16)


def test_grouped_mm_runs_bf16_on_this_gpu():
    layer = cuda_layer("auto")
    assert grouped_mm_runs(torch.randn(4, 256, device="cuda", dtype=torch.bfloat16), layer.weight)


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_bf16_grouped_mm_agrees_with_loop(capacity_factor):
    loop = cuda_layer("loop", capacity_factor)
    grouped = cuda_layer("grouped_mm", capacity_factor)
    grouped.load_state_dict(loop.state_dict())
    x = torch.randn(4, 300, 256, device="cuda", dtype=torch.bfloat16)
    mask = torch.rand(4, 300, device="cuda") > 0.1
    upstream = torch.randn(4, 300, 512, device="cuda", dtype=torch.bfloat16)
    results = []
    for layer in (loop, grouped):
        x_leaf = x.clone().requires_grad_()
        out, routing = layer(x_leaf, mask)
        aux_loss = routing_summary([routing])[0][0]
        ((out.float() * upstream.float()).sum() + aux_loss).backward()
        results.append((out.float(), x_leaf.grad.float(), layer.weight.grad.float(), layer.router.weight.grad.float()))
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    assert torch.isfinite(results[1][1]).all()


def test_grouped_mm_training_step_does_not_synchronise():
    layer = cuda_layer("grouped_mm", capacity_factor=1.25, jitter=0.01).train()
    x = torch.randn(2, 512, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    mask = torch.rand(2, 512, device="cuda") > 0.1
    layer(x, mask)  # warm-up outside the check: first calls may load kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, routing = layer(x, mask)
        aux_loss, z_loss, _, _ = routing_summary([routing])
        (out.float().square().mean() + aux_loss.sum() + z_loss.sum()).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(x.grad).all()


def test_bf16_training_step_and_generation():
    config = tiny_config(
        num_experts=8, moe_projections=["gate_proj", "up_proj", "down_proj"], hidden_size=128, intermediate_size=256
    )
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
    assert torch.equal(
        model.generate(prompt, use_cache=True, **kwargs), model.generate(prompt, use_cache=False, **kwargs)
    )
