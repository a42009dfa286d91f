"""Parameter and FLOPs accounting for dense LLaMA and ParameterNet-LLaMA configs, without building models."""

from transformers import LlamaConfig

from .presets import is_parameternet

PROJECTION_SHAPES = {
    "gate_proj": ("hidden_size", "intermediate_size"),
    "up_proj": ("hidden_size", "intermediate_size"),
    "down_proj": ("intermediate_size", "hidden_size"),
}


def _projection_parameters(config: LlamaConfig, layer_idx: int, projection: str) -> tuple[int, int]:
    """(total, active) parameters of one FFN projection; the router counts as active."""
    in_name, out_name = PROJECTION_SHAPES[projection]
    in_features, out_features = getattr(config, in_name), getattr(config, out_name)
    expert = in_features * out_features + (out_features if config.mlp_bias else 0)
    if not is_parameternet(config) or not config.is_routed(layer_idx, projection):
        return expert, expert
    router = config.num_experts * in_features
    return config.num_experts * expert + router, expert + router


def _attention_parameters(config: LlamaConfig) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = config.num_key_value_heads or config.num_attention_heads
    q_out, kv_out = config.num_attention_heads * head_dim, kv_heads * head_dim
    weights = config.hidden_size * (q_out + 2 * kv_out) + q_out * config.hidden_size
    biases = q_out + 2 * kv_out + config.hidden_size if config.attention_bias else 0
    return weights + biases


def _matmul_parameters(config: LlamaConfig) -> tuple[int, int]:
    """(total, active) parameters that take part in matmuls: every layer plus lm_head, no embeddings or norms."""
    total = active = config.num_hidden_layers * _attention_parameters(config) + config.vocab_size * config.hidden_size
    for layer_idx in range(config.num_hidden_layers):
        for projection in PROJECTION_SHAPES:
            layer_total, layer_active = _projection_parameters(config, layer_idx, projection)
            total += layer_total
            active += layer_active
    return total, active


def count_parameters(config: LlamaConfig) -> dict[str, int]:
    """Parameters of the causal LM built from `config`: `total`, and `active` = those one token uses.

    Works for a dense `LlamaConfig` (total == active) and for `ParameterNetLlamaConfig`, where a routed
    projection holds E experts but a token uses one of them plus the router.
    """
    matmul_total, matmul_active = _matmul_parameters(config)
    norms = (2 * config.num_hidden_layers + 1) * config.hidden_size
    # lm_head is in the matmul count; tied input embeddings are the same tensor.
    embeddings = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    return {"total": matmul_total + norms + embeddings, "active": matmul_active + norms + embeddings}


def flops_per_token(config: LlamaConfig, seq_len: int) -> int:
    """Forward FLOPs per token at context `seq_len`: 2 per active matmul parameter (lm_head and
    routers included, embedding lookups excluded) plus 4 * layers * seq_len * attention width for the
    score and value products (the convention of PaLM's appendix B). A training step costs 3x this.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} is invalid: expected an int >= 1.")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention_width = config.num_attention_heads * head_dim
    _, active = _matmul_parameters(config)
    return 2 * active + 4 * config.num_hidden_layers * seq_len * attention_width


def short_count(count: int) -> str:
    """936429568 -> '0.94B', 2370000 -> '2.37M'."""
    return f"{count / 1e9:.2f}B" if count >= 1e8 else f"{count / 1e6:.2f}M"
