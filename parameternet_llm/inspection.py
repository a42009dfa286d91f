"""`parameternet-llm inspect`: what a checkpoint holds, and how its routers spread a text over the experts."""

from pathlib import Path

import torch

from .accounting import count_parameters, flops_per_token
from .errors import InputError
from .presets import is_parameternet
from .saved_models import check_weights, load_saved_config


def describe(config) -> list[str]:
    params = count_parameters(config)
    lines = [
        f"model type: {config.model_type}; {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"intermediate {config.intermediate_size}, vocabulary {config.vocab_size}",
        f"parameters: {params['total']:,} in all, {params['active']:,} active per token; "
        f"{flops_per_token(config, config.max_position_embeddings) / 1e9:.4g} forward GFLOPs per token at "
        f"{config.max_position_embeddings} tokens of context",
    ]
    if is_parameternet(config):
        layers = "every layer" if config.moe_layers is None else f"layers {config.moe_layers}"
        lines.append(
            f"routing: {config.num_experts} experts on {', '.join(config.moe_projections)} in {layers}; "
            f"expert_scale {config.expert_scale}; capacity factor {config.capacity_factor} in training, "
            f"{config.eval_capacity_factor} in eval; aux loss coefficient {config.router_aux_loss_coef}"
        )
    return lines


def routing_on_text(checkpoint: Path, text_file: Path, seq_len: int, max_tokens: int, batch_size: int = 8) -> list[str]:
    """Per routed linear: each expert's share of the text's tokens and the share the training capacity factor
    drops, over batches of `batch_size` blocks of `seq_len` tokens (routed as in training, without gradients);
    and the text's loss."""
    from transformers import AutoModelForCausalLM

    from .training.tokenizer import load_tokenizer
    from .training.train import mean_lm_loss

    if not text_file.is_file():
        raise InputError(f"--text {str(text_file)!r} is not a file")
    tokenizer = load_tokenizer(checkpoint)
    ids = tokenizer(text_file.read_text(errors="replace")).input_ids[:max_tokens]
    if len(ids) < seq_len:
        raise InputError(f"{text_file} has {len(ids)} tokens, fewer than --seq-len {seq_len}")
    blocks = torch.tensor(ids[: len(ids) // seq_len * seq_len]).view(-1, seq_len)
    check_weights(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    batches = blocks.split(batch_size)
    with torch.no_grad():
        loss = mean_lm_loss(model, blocks, batch_size)
        lines = [f"text: {blocks.numel():,} tokens of {text_file} in {len(blocks)} blocks; loss {loss:.4f}"]
        if not is_parameternet(model):
            return lines
        model.train()
        per_batch = [model.routing_stats(model(batch)) for batch in batches]
    lines += ["", "| routed linear | tokens per expert (%) | busiest | dropped in training |", "|---|---|---|---|"]
    for name in per_batch[0]:
        load = sum(stats[name]["load"] for stats in per_batch) / len(per_batch)
        dropped = sum(stats[name]["dropped"].item() for stats in per_batch) / len(per_batch)
        shares = " ".join(f"{100 * share:.1f}" for share in load.tolist())
        lines.append(f"| {name} | {shares} | {100 * load.max().item():.1f}% | {100 * dropped:.1f}% |")
    return lines


def inspect_checkpoint(checkpoint: str | Path, text_file: str | Path | None, seq_len: int, max_tokens: int) -> str:
    checkpoint = Path(checkpoint)
    lines = describe(load_saved_config(checkpoint))
    if text_file is not None:
        lines += [""] + routing_on_text(checkpoint, Path(text_file), seq_len, max_tokens)
    return "\n".join(lines)
