import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from parameternet_llm import ParameterNetLlamaConfig  # noqa: E402

TINY_SHAPE = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_config(**overrides) -> ParameterNetLlamaConfig:
    """A two-layer ParameterNet-LLaMA small enough for exact fp32 checks on a CPU."""
    return ParameterNetLlamaConfig(**{**TINY_SHAPE, **overrides})


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
