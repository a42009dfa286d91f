import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import importlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton's interpreter runs the Triton kernels on CPU tensors

from parameternet_llm import ParameterNetLlamaConfig, modeling_parameternet_llama  # noqa: E402

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


def few_token_operands(dtype, bias: bool, tokens: int, experts: int = 4, in_features: int = 16,
                       out_features: int = 24):
    """x (also the router input), router weight, expert weights, bias (or None) and valid for
    `routed_few_tokens`: token t leans to expert t % experts, the second token is padding."""
    router_weight = torch.randn(experts, in_features)
    x = torch.randn(tokens, in_features) + 3 * router_weight[torch.arange(tokens) % experts]
    valid = torch.ones(tokens, dtype=torch.bool)
    valid[1:2] = False
    weight = torch.randn(experts, out_features, in_features).to(dtype)
    return (x.to(dtype), x.to(dtype), router_weight, weight,
            torch.randn(experts, out_features).to(dtype) if bias else None, valid)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def strict_grouped_mm(monkeypatch):
    """The routed linears' `grouped_mm` (compiled or torch's) held to its contract past the last offset:
    rows there are in no group, so they are made NaN in its inputs (they must not count) and in its
    output (it leaves them uninitialised). A dispatch that reads such rows then fails its comparison
    instead of passing on zeroed memory."""
    grouped_mm = modeling_parameternet_llama.grouped_mm

    def strict(mat_a, mat_b, offs):
        end = int(offs[-1])
        mat_a = mat_a.clone()
        if mat_b.dim() == 3:  # [T, in] x [E, in, out]: groups of rows
            mat_a[end:] = float("nan")
            out = grouped_mm(mat_a, mat_b, offs)
            out[end:] = float("nan")
            return out
        mat_b = mat_b.clone()  # [out, T] x [T, in]: groups along the reduced dimension
        mat_a[:, end:] = float("nan")
        mat_b[end:] = float("nan")
        return grouped_mm(mat_a, mat_b, offs)

    monkeypatch.setattr(modeling_parameternet_llama, "grouped_mm", strict)


@pytest.fixture(params=["compiled", "torch"])
def cpu_kernels_on_and_off(request, monkeypatch):
    """Each CPU dispatch in turn: with the package's compiled kernels (which must have been built), then with
    torch's `grouped_mm` and tensor ops, as where the kernels are switched off or cannot be built."""
    if request.param == "compiled":
        assert modeling_parameternet_llama.compiled_cpu_kernels() is not None, "the CPU kernels did not build"
    else:
        monkeypatch.setattr(modeling_parameternet_llama, "compiled_cpu_kernels", lambda: None)
    return request.param


@pytest.fixture(params=["cpu_kernels", "triton_kernels"])
def few_token_kernel(request, monkeypatch):
    """Each package kernel module whose `routed_few_tokens` runs a routed linear on a few tokens in one call,
    made the one the model uses on the CPU: the compiled CPU kernel, then CUDA's Triton kernel under Triton's
    interpreter (where there is a GPU, Triton compiles its kernels for it instead, and tests/test_cuda.py
    checks them there). A test may ask for None: the model's tensor ops."""
    if request.param == "triton_kernels" and torch.cuda.is_available():
        pytest.skip("with a GPU, Triton kernels run compiled on CUDA tensors only (tests/test_cuda.py)")
    kernels = None if request.param is None else importlib.import_module(f"parameternet_llm.{request.param}")
    if kernels is not None:
        assert kernels.load(), f"parameternet_llm.{request.param} does not run here"
    monkeypatch.setattr(modeling_parameternet_llama, "few_token_kernels", lambda device: kernels)
    return kernels


@pytest.fixture
def accelerator_reads(monkeypatch):
    """Dispatch as on an accelerator, where the host must not read tensor values: the CPU then takes the
    paths that a GPU takes."""
    monkeypatch.setattr(modeling_parameternet_llama, "host_reads_are_free", lambda device: False)


@pytest.fixture(params=["free", "as on an accelerator"])
def host_reads(request):
    """Each dispatch policy in turn: the CPU's own (host reads free), then the accelerator's."""
    if request.param != "free":
        request.getfixturevalue("accelerator_reads")
    return request.param
