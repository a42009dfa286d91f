"""Model shapes used by the paper and by this project's runs."""

from transformers import LlamaConfig

from .configuration_parameternet_llama import MOE_PROJECTIONS, ParameterNetLlamaConfig

# ParameterNet's Table 7 backbone (LLaMA-1B); the paper trains it at sequence length 2048.
LLAMA_1B = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=8192,
    num_attention_heads=16,
    num_hidden_layers=12,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)

# The CPU shape of this project's speed measurements.
CPU_SMALL = dict(
    vocab_size=8000,
    hidden_size=256,
    intermediate_size=688,
    num_attention_heads=4,
    num_hidden_layers=4,
    tie_word_embeddings=False,
)

MODEL_SHAPES = {"llama-1b": LLAMA_1B, "cpu-small": CPU_SMALL}


def table7_configs(shape: dict = LLAMA_1B) -> dict[str, LlamaConfig]:
    """The rows of the paper's Table 7: the dense model, then 4 and 8 experts on each projection."""
    rows = {"dense": LlamaConfig(**shape)}
    for projection in MOE_PROJECTIONS:
        for num_experts in (4, 8):
            rows[f"{projection} x{num_experts}"] = ParameterNetLlamaConfig(
                num_experts=num_experts, moe_projections=[projection], **shape
            )
    return rows
