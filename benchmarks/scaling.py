"""Memory per GPU and communication per step for the paper's Table 7 models under each way of spreading them.

    python benchmarks/scaling.py                         # LLaMA-1B family, 8 x 2048 tokens per GPU per micro-step
    python benchmarks/scaling.py --micro-batch 4 --gpus 8 16 64

Arithmetic, not a measurement: parameter counts come from `parameternet_llm.accounting`; the byte counts
per parameter and per activation are stated below and in docs/SCALING.md. Prints markdown tables.
"""

import argparse

from parameternet_llm.accounting import PROJECTION_SHAPES, count_parameters
from parameternet_llm.configuration_parameternet_llama import ParameterNetLlamaConfig
from parameternet_llm.presets import LLAMA_1B, table7_configs

GIB = 2**30
# Bytes per parameter of the model states with bf16 compute and AdamW.
# DDP and FSDP2 (accelerate, mixed_precision bf16): fp32 parameters, fp32 gradients, two fp32 Adam moments.
# DeepSpeed ZeRO (bf16): bf16 parameters and gradients, and fp32 master weights plus two fp32 moments.
STRATEGIES = {
    "DDP": lambda n: 16,
    "ZeRO-1": lambda n: 2 + 2 + 12 / n,
    "ZeRO-2": lambda n: 2 + (2 + 12) / n,
    "FSDP2 full shard / ZeRO-3": lambda n: 16 / n,
}


def activation_bytes_per_token(config, checkpointing: bool) -> float:
    """bf16 activations autograd keeps per token for the backward, all layers (SDPA: no seq x seq scores).
    Per layer: the two norms' inputs and outputs, q, k, v, the attention output and o_proj's input (8 x hidden
    with the residuals), gate, up, silu(gate) and their product (4 x intermediate); a routed projection also keeps
    its input gathered in expert order and its output before scaling (in + out) and float32 router
    probabilities (4 bytes x E). With checkpointing per layer: the layer inputs, plus one layer recomputed."""
    hidden, inter = config.hidden_size, config.intermediate_size
    per_layer = 2 * (8 * hidden + 4 * inter)
    routed_extra = 0
    for projection, (in_name, out_name) in PROJECTION_SHAPES.items():
        if getattr(config, "num_experts", 1) > 1 and projection in config.moe_projections:
            routed_extra += 2 * (getattr(config, in_name) + getattr(config, out_name)) + 4 * config.num_experts
    per_layer += routed_extra
    layers = config.num_hidden_layers
    return 2 * hidden * layers + per_layer if checkpointing else per_layer * layers


def expert_parameters(config) -> int:
    """Parameters of the routed projections' expert banks (0 for a dense config)."""
    return count_parameters(config)["total"] - count_parameters(config)["active"] + active_expert_parameters(config)


def active_expert_parameters(config) -> int:
    if getattr(config, "num_experts", 1) == 1 or not hasattr(config, "moe_projections"):
        return 0
    return config.num_hidden_layers * sum(
        getattr(config, PROJECTION_SHAPES[p][0]) * getattr(config, PROJECTION_SHAPES[p][1])
        for p in config.moe_projections
    )


def communication_bytes_per_step(config, gpus: int, tokens_per_gpu: int) -> dict[str, float]:
    """Bytes each GPU sends per optimizer step without accumulation (ring collectives move (n-1)/n of the data),
    by strategy."""
    params = count_parameters(config)["total"]
    share = (gpus - 1) / gpus
    fsdp_per_param = 2 * 2 + 4  # all-gather bf16 for the forward and again for the backward, reduce-scatter fp32
    all_to_all = 0.0
    if active_expert_parameters(config):
        experts = config.num_experts
        for projection in config.moe_projections:
            in_name, out_name = PROJECTION_SHAPES[projection]
            width = getattr(config, in_name) + getattr(config, out_name)
            # Each routed projection dispatches on its own router: a token's input goes to its expert's rank and
            # the output comes back, in the forward and again in the backward, bf16; with E ranks in the
            # expert-parallel group a token stays local with probability 1/E.
            all_to_all += config.num_hidden_layers * tokens_per_gpu * 2 * 2 * width * (experts - 1) / experts
    return {
        "DDP all-reduce (fp32 gradients)": 2 * 4 * params * share,
        "FSDP2 all-gather x2 (bf16) + reduce-scatter (fp32)": fsdp_per_param * params * share,
        "experts by expert parallelism (all-to-all), the rest by FSDP2": all_to_all
        + fsdp_per_param * (params - expert_parameters(config)) * share,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 8, 16, 64])
    parser.add_argument("--micro-batch", type=int, default=8, help="sequences per GPU per micro-step")
    parser.add_argument("--seq-len", type=int, default=2048)
    args = parser.parse_args()
    tokens = args.micro_batch * args.seq_len
    configs = table7_configs(LLAMA_1B)

    print(f"Model states, GiB per GPU (activations for {args.micro_batch} x {args.seq_len} tokens per GPU apart)\n")
    print("| model | params | strategy | " + " | ".join(f"{n} GPUs" for n in args.gpus) + " |")
    print("|---|---|---|" + "---|" * len(args.gpus))
    for name, config in configs.items():
        params = count_parameters(config)["total"]
        for strategy, bytes_per in STRATEGIES.items():
            states = " | ".join(f"{params * bytes_per(n) / GIB:.1f}" for n in args.gpus)
            print(f"| {name} | {params / 1e9:.2f}B | {strategy} | {states} |")
    print(f"\nActivations, GiB per GPU for {args.micro_batch} x {args.seq_len} tokens (bf16, SDPA)\n")
    print("| model | no checkpointing | checkpointing every layer |")
    print("|---|---|---|")
    for name, config in configs.items():
        activations = [tokens * activation_bytes_per_token(config, ckpt) / GIB for ckpt in (False, True)]
        print(f"| {name} | {activations[0]:.1f} | {activations[1]:.1f} |")

    print(f"\nCommunication per GPU per optimizer step (GiB), {tokens} tokens per GPU, 8 GPUs\n")
    every_projection = ParameterNetLlamaConfig(**LLAMA_1B, num_experts=8, moe_projections=list(PROJECTION_SHAPES))
    compared = {**configs, "gate+up+down x8": every_projection}
    volumes = {name: communication_bytes_per_step(config, 8, tokens) for name, config in compared.items()}
    kinds = list(next(iter(volumes.values())))
    print("| model | " + " | ".join(kinds) + " |")
    print("|---|" + "---|" * len(kinds))
    for name, volume in volumes.items():
        print(f"| {name} | " + " | ".join(f"{volume[kind] / GIB:.1f}" for kind in kinds) + " |")


if __name__ == "__main__":
    main()
