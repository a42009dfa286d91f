"""ParameterNet for language models: LLaMA with top-1 routed expert projections (arXiv 2306.14525).

Importing the package registers the model with transformers' Auto classes and its plug-ins (`kernels`).
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from . import kernels  # noqa: F401  (registers the plug-ins)
from .configuration_parameternet_llama import ParameterNetLlamaConfig
from .modeling_parameternet_llama import (
    ParameterNetLlamaForCausalLM,
    ParameterNetLlamaForSequenceClassification,
    ParameterNetLlamaModel,
    ParameterNetLlamaPreTrainedModel,
    RoutedLinear,
)

AutoConfig.register(ParameterNetLlamaConfig.model_type, ParameterNetLlamaConfig, exist_ok=True)
AutoModel.register(ParameterNetLlamaConfig, ParameterNetLlamaModel, exist_ok=True)
AutoModelForCausalLM.register(ParameterNetLlamaConfig, ParameterNetLlamaForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(
    ParameterNetLlamaConfig, ParameterNetLlamaForSequenceClassification, exist_ok=True
)

__version__ = "0.2.0"

__all__ = [
    "ParameterNetLlamaConfig",
    "ParameterNetLlamaForCausalLM",
    "ParameterNetLlamaForSequenceClassification",
    "ParameterNetLlamaModel",
    "ParameterNetLlamaPreTrainedModel",
    "RoutedLinear",
]
