"""Model shapes used by the paper and by this project's runs, the paper's Table 7 family, and which models
and configs are ParameterNet's."""

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


# The rows of the paper's Table 7 by name: the dense model (None), then 4 and 8 experts on each projection.
TABLE7_ROUTING = {
    "dense": None,
    **{
        f"{projection} x{num_experts}": {"num_experts": num_experts, "moe_projections": [projection]}
        for projection in MOE_PROJECTIONS
        for num_experts in (4, 8)
    },
}


# The config fields ParameterNet adds to LLaMA's.
ROUTING_FIELDS = frozenset(ParameterNetLlamaConfig().to_dict()) - frozenset(LlamaConfig().to_dict()) - {"auto_map"}


def table7_configs(shape: dict = LLAMA_1B) -> dict[str, LlamaConfig]:
    """Table 7's rows as configs of `shape`."""
    return {
        name: LlamaConfig(**shape) if routing is None else ParameterNetLlamaConfig(**routing, **shape)
        for name, routing in TABLE7_ROUTING.items()
    }


def is_parameternet(model_or_config) -> bool:
    """Whether a model (the package's class or a checkpoint's own copy) or its config is ParameterNet-LLaMA."""
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "model_type", None) == ParameterNetLlamaConfig.model_type
