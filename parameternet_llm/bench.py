"""Speed of ParameterNet against its dense twin, measured in the same process.

`parameternet-llm bench layer|train|decode` prints a table and, last, one JSON line with the ratio.
bf16 on a GPU, fp32 on a CPU; warm-up first, then the median of several repeats. Every ratio is a speed
against dense, dense time / ParameterNet time (1.0 = dense's speed, higher is faster): `ratio` of the
medians, `paired_ratio` the median of each round's.
"""

import json
import platform
import statistics
import time
from collections.abc import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from . import modeling_parameternet_llama
from .configuration_parameternet_llama import MOE_PROJECTIONS, ParameterNetLlamaConfig
from .kernels import reference_only
from .modeling_parameternet_llama import ParameterNetLlamaForCausalLM, RoutedLinear
from .presets import MODEL_SHAPES

REFERENCE = "parameternet, reference path"


def device_and_dtype() -> tuple[torch.device, torch.dtype]:
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def describe_device(device: torch.device) -> str:
    """The device, torch, and which plug-in the expert products run there."""
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else (f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads")
    )
    kernel = modeling_parameternet_llama.plugin("expert_products", device)
    return f"{name}, torch {torch.__version__}, expert-products plug-in: {'none' if kernel is None else kernel}"


def with_reference_path(functions: dict[str, Callable[[], None]], name: str, device: torch.device) -> None:
    """Adds `functions[name]` run on the reference path as `REFERENCE`, where a plug-in serves `device`: the
    plug-in's gain, measured in the same run."""
    if modeling_parameternet_llama.plugin("expert_products", device) is None:
        return
    function = functions[name]

    def reference():
        with reference_only():
            function()

    functions[REFERENCE] = reference


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_times(
    functions: dict[str, Callable[[], None]], device: torch.device, warmup: int, repeats: int
) -> dict[str, list[float]]:
    """Seconds of each function per round, the functions timed in alternation within each round."""
    for function in functions.values():
        for _ in range(warmup):
            function()
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            synchronize(device)
            start = time.perf_counter()
            function()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in times.items()}


def paired_ratio(times: dict[str, list[float]], numerator: str, denominator: str) -> float:
    """Median over rounds of the two functions' time ratio: unlike the ratio of medians, it holds when
    the machine's speed drifts between rounds (as shared CPUs' does)."""
    return statistics.median(a / b for a, b in zip(times[numerator], times[denominator], strict=True))


def speed_vs_dense(times: dict[str, list[float]], name: str) -> dict[str, float]:
    """`name`'s speed against dense: dense time / its time, of the medians and paired by round."""
    return {
        "ratio": statistics.median(times["dense"]) / statistics.median(times[name]),
        "paired_ratio": paired_ratio(times, "dense", name),
    }


def report(title: str, rows: dict[str, str], seconds: dict[str, float], result: dict) -> dict:
    """Print the table (each row's time as shown, and its speed against dense) and the JSON line; return `result`."""
    print(title)
    print("| what | time | speed vs dense (dense time / time; higher is faster) |")
    print("|---|---|---|")
    for name, shown in rows.items():
        print(f"| {name} | {shown} | {seconds['dense'] / seconds[name]:.3f} |")
    print(
        f"speed vs dense {result['ratio']:.3f} (ratio of medians), {result['paired_ratio']:.3f} "
        "(median of each round's)"
    )
    print(json.dumps(result))
    return result


def bench_layer(
    tokens: int = 16384,
    in_features: int = 2048,
    out_features: int = 8192,
    num_experts: int = 8,
    backends: tuple[str, ...] = ("auto",),
    capacity_factor: float | None = None,
    warmup: int = 3,
    repeats: int = 20,
) -> dict:
    """One routed linear, forward + backward, against nn.Linear of the same shape."""
    device, dtype = device_and_dtype()
    x = torch.randn(tokens, in_features, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(tokens, out_features, device=device, dtype=dtype)
    layers = {"dense": torch.nn.Linear(in_features, out_features, bias=False, device=device, dtype=dtype)}
    for backend in backends:
        config = ParameterNetLlamaConfig(num_experts=num_experts, capacity_factor=capacity_factor, moe_backend=backend)
        layers[backend] = RoutedLinear(config, in_features, out_features).to(device, dtype).train()

    def step(layer):
        def run():
            out = layer(x)
            (out[0] if isinstance(layer, RoutedLinear) else out).backward(grad)

        return run

    functions = {name: step(layer) for name, layer in layers.items()}
    plugged = next((backend for backend in backends if backend in ("auto", "grouped_mm")), None)
    if plugged is not None:
        with_reference_path(functions, plugged, device)
    times = interleaved_times(functions, device, warmup, repeats)
    seconds = medians(times)
    rows = {name: f"{1e3 * s:.3f} ms" for name, s in seconds.items()}
    return report(
        f"routed linear fwd+bwd: {tokens} tokens, {in_features}->{out_features}, {num_experts} experts, "
        f"capacity {capacity_factor}, {dtype}, {describe_device(device)}",
        rows,
        seconds,
        {
            "bench": "layer",
            "device": describe_device(device),
            "dtype": str(dtype),
            "tokens": tokens,
            "in": in_features,
            "out": out_features,
            "experts": num_experts,
            "ms": {name: 1e3 * s for name, s in seconds.items()},
            **speed_vs_dense(times, backends[0]),
        },
    )


def twin_configs(shape: str, num_experts: int, projections: list[str], backend: str, seq_len: int):
    fields = {**MODEL_SHAPES[shape], "max_position_embeddings": max(seq_len, 2048)}
    dense = LlamaConfig(**fields)
    routed = ParameterNetLlamaConfig(
        **fields, num_experts=num_experts, moe_projections=projections, moe_backend=backend
    )
    return dense, routed


def twin_models(dense_config, routed_config, device: torch.device, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    """The dense LLaMA and its ParameterNet twin, created on `device` (a CPU init of LLaMA-1B with 8 experts
    takes minutes) in `dtype`."""
    models = {}
    for name, model_class, config in (
        ("dense", LlamaForCausalLM, dense_config),
        ("parameternet", ParameterNetLlamaForCausalLM, routed_config),
    ):
        with device:
            models[name] = model_class(config).to(dtype)
    return models


def training_step(model: torch.nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    """One causal-LM training step on `ids` (forward, backward, fused AdamW), with its own optimizer."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def greedy_decode(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> Callable[[], None]:
    """Batch-1 greedy `generate` of exactly `new_tokens` tokens after `prompt` [1, length], in eval mode."""
    model.eval()

    def run():
        with torch.no_grad():
            model.generate(
                prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0
            )

    return run


def bench_train(
    shape: str = "cpu-small",
    batch_size: int = 8,
    seq_len: int = 256,
    num_experts: int = 8,
    projections: tuple[str, ...] = MOE_PROJECTIONS,
    backend: str = "auto",
    warmup: int = 2,
    repeats: int = 6,
) -> dict:
    """Training-step throughput (forward, backward, AdamW) of ParameterNet against its dense twin."""
    device, dtype = device_and_dtype()
    dense_config, routed_config = twin_configs(shape, num_experts, list(projections), backend, seq_len)
    ids = torch.randint(0, dense_config.vocab_size, (batch_size, seq_len), device=device)
    steps = {
        name: training_step(model, ids)
        for name, model in twin_models(dense_config, routed_config, device, dtype).items()
    }
    with_reference_path(steps, "parameternet", device)
    times = interleaved_times(steps, device, warmup, repeats)
    seconds = medians(times)
    tokens = batch_size * seq_len
    throughput = {name: tokens / s for name, s in seconds.items()}
    rows = {name: f"{1e3 * seconds[name]:.1f} ms/step, {throughput[name]:,.0f} tokens/s" for name in seconds}
    return report(
        f"training step: {shape}, batch {batch_size} x {seq_len}, {num_experts} experts on {'+'.join(projections)}, "
        f"backend {backend}, {dtype}, {describe_device(device)}",
        rows,
        seconds,
        {
            "bench": "train",
            "device": describe_device(device),
            "dtype": str(dtype),
            "shape": shape,
            "batch": [batch_size, seq_len],
            "experts": num_experts,
            "projections": list(projections),
            "tokens_per_s": throughput,
            **speed_vs_dense(times, "parameternet"),
        },
    )


def bench_decode(
    shape: str = "cpu-small",
    prompt_len: int = 32,
    new_tokens: int = 128,
    num_experts: int = 8,
    projections: tuple[str, ...] = MOE_PROJECTIONS,
    backend: str = "auto",
    warmup: int = 1,
    repeats: int = 3,
) -> dict:
    """Batch-1 greedy `generate` latency per new token, ParameterNet against its dense twin."""
    device, dtype = device_and_dtype()
    dense_config, routed_config = twin_configs(shape, num_experts, list(projections), backend, prompt_len + new_tokens)
    prompt = torch.randint(3, dense_config.vocab_size, (1, prompt_len), device=device)
    runs = {
        name: greedy_decode(model, prompt, new_tokens)
        for name, model in twin_models(dense_config, routed_config, device, dtype).items()
    }
    with_reference_path(runs, "parameternet", device)
    times = interleaved_times(runs, device, warmup, repeats)
    seconds = medians(times)
    per_token = {name: 1e3 * s / new_tokens for name, s in seconds.items()}
    rows = {name: f"{per_token[name]:.2f} ms/token" for name in per_token}
    return report(
        f"batch-1 greedy decode: {shape}, prompt {prompt_len}, {new_tokens} new tokens, {num_experts} experts on "
        f"{'+'.join(projections)}, backend {backend}, {dtype}, {describe_device(device)}",
        rows,
        seconds,
        {
            "bench": "decode",
            "device": describe_device(device),
            "dtype": str(dtype),
            "shape": shape,
            "new_tokens": new_tokens,
            "experts": num_experts,
            "projections": list(projections),
            "ms_per_token": per_token,
            **speed_vs_dense(times, "parameternet"),
        },
    )
