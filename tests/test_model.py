"""ParameterNet-LLaMA against transformers' LlamaForCausalLM and the model-level rules (docs/DESIGN.md)."""

import pytest
import torch
from conftest import TINY_SHAPE, tiny_config
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel
from transformers.models.switch_transformers.modeling_switch_transformers import (
    load_balancing_loss_func,
    router_z_loss_func,
)

from parameternet_llm import (
    ParameterNetLlamaForCausalLM,
    ParameterNetLlamaForSequenceClassification,
    ParameterNetLlamaModel,
    RoutedLinear,
)

ALL_PROJECTIONS = ["gate_proj", "up_proj", "down_proj"]


def single_expert_twin(backend: str, **overrides):
    """A dense Llama and a one-expert dropless ParameterNet model holding the same weights."""
    llama = LlamaForCausalLM(LlamaConfig(**TINY_SHAPE)).eval()
    config = tiny_config(
        num_experts=1, moe_projections=ALL_PROJECTIONS, capacity_factor=None, moe_backend=backend, **overrides
    )
    model = ParameterNetLlamaForCausalLM(config).eval()
    state = {
        key: value.unsqueeze(0) if any(f"mlp.{p}.weight" in key for p in ALL_PROJECTIONS) else value
        for key, value in llama.state_dict().items()
    }
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(key.endswith("router.weight") for key in missing)
    return llama, model


def padded_batch():
    ids = torch.randint(3, TINY_SHAPE["vocab_size"], (3, 10))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, 7:] = 0  # right padding
    return ids, mask


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
def test_single_expert_dropless_equals_llama(backend):
    llama, model = single_expert_twin(backend)
    ids, mask = padded_batch()
    # Padding is not routed, so only real tokens' logits are comparable to Llama's.
    valid = mask.bool()
    torch.testing.assert_close(
        model(ids, attention_mask=mask).logits[valid], llama(ids, attention_mask=mask).logits[valid]
    )
    want = llama(ids, labels=ids)
    got = model(ids, labels=ids)
    torch.testing.assert_close(got.logits, want.logits)
    torch.testing.assert_close(got.lm_loss, want.loss)
    # One expert: f = P = 1 per linear, so aux = 1 and the loss adds exactly the coefficient.
    torch.testing.assert_close(got.aux_loss, torch.tensor(1.0))
    torch.testing.assert_close(got.loss, want.loss + model.config.router_aux_loss_coef)


def test_single_expert_generate_equals_llama_greedy():
    llama, model = single_expert_twin("auto")
    prompt = torch.randint(3, TINY_SHAPE["vocab_size"], (1, 6))
    kwargs = dict(max_new_tokens=12, do_sample=False, min_new_tokens=12, pad_token_id=0)
    assert torch.equal(model.generate(prompt, **kwargs), llama.generate(prompt, **kwargs))


def test_generate_with_kv_cache_matches_full_recompute():
    model = ParameterNetLlamaForCausalLM(tiny_config(num_experts=4, moe_projections=ALL_PROJECTIONS)).eval()
    prompt = torch.randint(3, TINY_SHAPE["vocab_size"], (2, 5))
    mask = torch.ones_like(prompt)
    mask[0, :2] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    cached = model.generate(prompt, use_cache=True, **kwargs)
    uncached = model.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("projections", [["up_proj"], ALL_PROJECTIONS])
def test_eval_logits_do_not_depend_on_batch_or_padding(projections):
    model = ParameterNetLlamaForCausalLM(tiny_config(num_experts=4, moe_projections=projections)).eval()
    sequences = [torch.randint(3, TINY_SHAPE["vocab_size"], (n,)) for n in (9, 4, 7, 2)]
    alone = [model(seq.unsqueeze(0)).logits[0] for seq in sequences]
    length = max(len(seq) for seq in sequences)
    for side in ("left", "right"):
        ids = torch.zeros(len(sequences), length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(sequences):
            span = slice(length - len(seq), length) if side == "left" else slice(0, len(seq))
            ids[row, span], mask[row, span] = seq, 1
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(ids, attention_mask=mask, position_ids=position_ids).logits
        for row in range(len(sequences)):
            torch.testing.assert_close(logits[row][mask[row].bool()], alone[row], rtol=1e-4, atol=1e-5)


def test_training_capacity_makes_batch_matter_so_the_eval_check_can_fail():
    config = tiny_config(num_experts=4, capacity_factor=0.25, min_capacity=0)
    model = ParameterNetLlamaForCausalLM(config).train()
    seq = torch.randint(3, TINY_SHAPE["vocab_size"], (1, 8))
    with torch.no_grad():
        alone = model(seq).logits[0]
        batched = model(torch.cat([seq, torch.randint(3, 90, (3, 8))])).logits[0]
    assert not torch.allclose(alone, batched)


def test_model_losses_are_means_of_switch_losses_over_routed_linears():
    model = ParameterNetLlamaForCausalLM(
        tiny_config(num_experts=4, moe_projections=ALL_PROJECTIONS, router_z_loss_coef=0.001)
    )
    ids = torch.randint(3, TINY_SHAPE["vocab_size"], (2, 12))
    out = model(ids, labels=ids, output_router_logits=True)
    assert len(out.router_logits) == 2 * 3
    aux, z = [], []
    for logits in out.router_logits:
        assert logits.shape == (2 * 12, 4) and logits.dtype == torch.float32
        probs = logits.unsqueeze(0).softmax(-1)
        aux.append(load_balancing_loss_func(probs, probs.argmax(-1)))
        z.append(router_z_loss_func(logits.unsqueeze(0)))
    torch.testing.assert_close(out.aux_loss, torch.stack(aux).mean())
    torch.testing.assert_close(out.z_loss, torch.stack(z).mean())
    expected = out.lm_loss + 0.01 * out.aux_loss + 0.001 * out.z_loss
    torch.testing.assert_close(out.loss, expected)
    assert model(ids).router_logits is None and model(ids).aux_loss is not None


def test_padding_is_not_routed_at_model_level():
    model = ParameterNetLlamaForCausalLM(tiny_config(num_experts=4)).eval()
    ids, mask = padded_batch()
    padded_stats = model.routing_stats(model(ids, attention_mask=mask))
    loads = []
    for row in range(ids.shape[0]):
        real = ids[row][mask[row].bool()].unsqueeze(0)
        stats = model.routing_stats(model(real))
        loads.append({name: s["load"] * real.shape[1] for name, s in stats.items()})
    for name, stats in padded_stats.items():
        counts = sum(load[name] for load in loads)
        torch.testing.assert_close(stats["load"] * mask.sum(), counts, rtol=0, atol=1e-4)
        assert stats["dropped"].item() == 0


def test_routing_stats_name_every_routed_linear():
    config = tiny_config(num_experts=8, moe_projections=["gate_proj", "down_proj"], moe_layers=[1])
    model = ParameterNetLlamaForCausalLM(config)
    stats = model.routing_stats(model(torch.randint(3, 90, (2, 6))))
    assert sorted(stats) == ["model.layers.1.mlp.down_proj", "model.layers.1.mlp.gate_proj"]
    assert isinstance(model.model.layers[0].mlp.gate_proj, torch.nn.Linear)
    for entry in stats.values():
        assert entry["load"].shape == (8,) and entry["load"].sum().item() == pytest.approx(1.0)


def test_base_model_carries_router_losses():
    model = ParameterNetLlamaModel(tiny_config())
    assert isinstance(model, LlamaModel)
    out = model(torch.randint(3, 90, (2, 5)), output_router_logits=True)
    assert out.last_hidden_state.shape == (2, 5, TINY_SHAPE["hidden_size"])
    assert out.aux_loss.requires_grad and len(out.router_logits) == 2
    assert len(out.routing) == 2 and out.routing[0].logits.shape == (2 * 5, 4)
    assert isinstance(model(torch.randint(3, 90, (1, 3)), return_dict=False), tuple)


def enable_checkpointing(model, **kwargs):
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable(kwargs or None)


@pytest.mark.parametrize("checkpoint_kwargs", [{}, {"use_reentrant": True}])
def test_gradient_checkpointing_gives_the_same_gradients(checkpoint_kwargs):
    config = tiny_config(num_experts=4, moe_projections=ALL_PROJECTIONS, router_z_loss_coef=0.01)
    ids = torch.randint(3, TINY_SHAPE["vocab_size"], (2, 12))
    grads, outputs = [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = ParameterNetLlamaForCausalLM(config).train()
        if checkpointing:
            enable_checkpointing(model, **checkpoint_kwargs)
            assert model.model.layers[0].gradient_checkpointing
        out = model(ids, labels=ids)
        out.loss.backward()  # replays the layers: the routing read from `out` must not change
        outputs.append(out)
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    for field in ("loss", "aux_loss", "z_loss"):
        torch.testing.assert_close(outputs[1][field], outputs[0][field], msg=field)
    for plain, checkpointed in zip(outputs[0].routing, outputs[1].routing, strict=True):
        torch.testing.assert_close(checkpointed.logits, plain.logits)
        assert torch.equal(checkpointed.keep, plain.keep)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)
    router_grads = [g for name, g in grads[1].items() if "router" in name]
    assert router_grads and all(g.abs().sum() > 0 for g in router_grads)


def test_bf16_model_tracks_fp32_model():
    model = ParameterNetLlamaForCausalLM(tiny_config(num_experts=4, moe_projections=ALL_PROJECTIONS)).eval()
    ids = torch.randint(3, TINY_SHAPE["vocab_size"], (2, 8))
    want = model(ids).logits
    model_bf16 = model.to(torch.bfloat16)
    out = model_bf16(ids, labels=ids, output_router_logits=True)
    assert out.logits.dtype == torch.bfloat16
    assert all(logits.dtype == torch.float32 for logits in out.router_logits)
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.logits.float(), want, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("projections", [ALL_PROJECTIONS, ["up_proj"]])
def test_autocast_training_step_tracks_float32(projections):
    """A mixed-precision training step (autocast bf16, as accelerate runs one): float32 router logits and
    losses, float32 gradients for every parameter, and the loss and gradients of the float32 step up to bf16
    rounding, where both make the same routing decisions (routers with clear margins)."""
    model = ParameterNetLlamaForCausalLM(tiny_config(num_experts=4, moe_projections=projections)).train()
    for linear in model.routed_linears().values():
        torch.nn.init.normal_(linear.router.weight, std=1.0)
    ids = torch.randint(3, TINY_SHAPE["vocab_size"], (2, 16))
    results = []
    for autocast in (False, True):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(ids, labels=ids, output_router_logits=True)
        out.loss.backward()
        assert all(logits.dtype == torch.float32 for logits in out.router_logits)
        assert out.aux_loss.dtype == out.z_loss.dtype == torch.float32
        results.append((out, {name: p.grad.clone() for name, p in model.named_parameters()}))
    (out, grads), (mixed_out, mixed_grads) = results
    for logits, mixed_logits in zip(out.router_logits, mixed_out.router_logits, strict=True):
        assert torch.equal(logits.argmax(-1), mixed_logits.argmax(-1))
    torch.testing.assert_close(mixed_out.loss, out.loss, rtol=0.02, atol=0.02)
    for name, grad in grads.items():
        assert mixed_grads[name].dtype == torch.float32, name
        torch.testing.assert_close(mixed_grads[name], grad, rtol=0.1, atol=0.1 * grad.abs().max().item(), msg=name)


def test_initialisation_covers_expert_banks_and_routers():
    config = tiny_config(num_experts=8, hidden_size=64, intermediate_size=128, initializer_range=0.05)
    model = ParameterNetLlamaForCausalLM(config)
    layers = [m for m in model.modules() if isinstance(m, RoutedLinear)]
    assert layers
    for layer in layers:
        for tensor in (layer.weight, layer.router.weight):
            assert torch.isfinite(tensor).all()
            assert tensor.std().item() == pytest.approx(0.05, rel=0.1)
            assert tensor.mean().abs().item() < 0.01
        # Experts start different from one another, or routing would have nothing to choose.
        assert not torch.allclose(layer.weight[0], layer.weight[1])


def test_parameters_are_named_as_documented():
    model = ParameterNetLlamaForCausalLM(tiny_config(num_experts=3, moe_projections=["down_proj"]))
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (3, 32, 64)
    assert shapes["model.layers.0.mlp.down_proj.router.weight"] == (3, 64)
    assert shapes["model.layers.0.mlp.up_proj.weight"] == (64, 32)


@pytest.mark.usefixtures("strict_grouped_mm", "dispatch")
@pytest.mark.parametrize("projections", [ALL_PROJECTIONS, ["up_proj"], ["gate_proj", "down_proj"]])
def test_grouped_model_matches_the_loop_model(projections):
    """A training step of the model with the grouped dispatch against the same model with the loop: outputs,
    losses, routing statistics and every gradient, capacity dropping tokens."""
    routing = dict(num_experts=4, moe_projections=projections, capacity_factor=1.0, min_capacity=1)
    reference = ParameterNetLlamaForCausalLM(tiny_config(**routing, moe_backend="loop")).train()
    grouped = ParameterNetLlamaForCausalLM(tiny_config(**routing, moe_backend="grouped_mm")).train()
    for linear in reference.routed_linears().values():
        torch.nn.init.normal_(linear.router.weight, std=1.0)  # uneven groups, some tokens dropped
    grouped.load_state_dict(reference.state_dict())
    ids, mask = padded_batch()
    results = []
    for model in (reference, grouped):
        out = model(ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        results.append((out, {name: p.grad for name, p in model.named_parameters()}))
    (out_a, grads_a), (out_b, grads_b) = results
    for field in ("logits", "loss", "aux_loss", "z_loss"):
        torch.testing.assert_close(out_b[field], out_a[field], rtol=1e-5, atol=1e-5, msg=field)
    stats_a, stats_b = reference.routing_stats(out_a), grouped.routing_stats(out_b)
    assert stats_a.keys() == stats_b.keys()
    for name in stats_a:
        torch.testing.assert_close(stats_b[name], stats_a[name], msg=name)
    assert max(stats["dropped"] for stats in stats_b.values()) > 0  # capacity dropped some tokens
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_compiles_into_one_graph_for_training_and_eval(dtype):
    """torch.compile(fullgraph=True) traces the reference path on a CPU (float32 takes the loop: the grouped
    product's shape function takes bf16 only), and the compiled model's logits, losses and gradients are the
    eager model's."""
    config = tiny_config(num_experts=4, moe_projections=ALL_PROJECTIONS, router_jitter_noise=0.1)
    model = ParameterNetLlamaForCausalLM(config).to(dtype)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    ids = torch.randint(3, TINY_SHAPE["vocab_size"], (2, 12))
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0  # padding: not routed
    tolerance = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            compiled(input_ids=ids, attention_mask=mask).logits,
            model(input_ids=ids, attention_mask=mask).logits,
            **tolerance,
        )
    model.train()
    results = []
    for run in (compiled, model):
        model.zero_grad()
        torch.manual_seed(3)  # the same jitter
        out = run(input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        results.append((out.loss, out.aux_loss, [p.grad.clone() for p in model.parameters()]))
    (loss, aux, grads), (eager_loss, eager_aux, eager_grads) = results
    torch.testing.assert_close(loss, eager_loss, **tolerance)
    torch.testing.assert_close(aux, eager_aux, **tolerance)
    for grad, eager_grad in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(grad.float(), eager_grad.float(), **tolerance)


def test_hf_trainer_fine_tunes_the_classifier_with_its_default_column_filter(tmp_path):
    """HF Trainer keeps only the dataset columns that the model's forward names (remove_unused_columns=True):
    input_ids, attention_mask and labels must be among them."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = ParameterNetLlamaForSequenceClassification(tiny_config(num_labels=2))
    ids = torch.randint(3, TINY_SHAPE["vocab_size"], (16, 8))
    data = Dataset.from_dict(
        {
            "input_ids": ids.tolist(),
            "attention_mask": torch.ones_like(ids).tolist(),
            "labels": (ids[:, 0] % 2).tolist(),
            "text": ["unused"] * 16,
        }
    )
    arguments = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
    )
    assert arguments.remove_unused_columns
    before = model.score.weight.clone()
    result = Trainer(model=model, args=arguments, train_dataset=data).train()
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(model.score.weight, before)
