"""The few-token routed linear of decoding in one call, compiled for the CPU (`cpu_kernels`) and in Triton
for CUDA (`triton_kernels`, here under Triton's interpreter), against the model's router, experts and
losses; bad operands; the Triton kernel's switch and fallback."""

import os
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import few_token_operands

from parameternet_llm import modeling_parameternet_llama, triton_kernels

# Experts, in and out features: the small case, and one with experts not a power of two and features
# not multiples of the Triton kernel's blocks (the input spans several).
SHAPES = [(4, 16, 24), (6, 300, 70)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("tokens", [1, 4])
@pytest.mark.parametrize("experts,in_features,out_features", SHAPES)
def test_matches_the_models_router_experts_and_losses(few_token_kernel, dtype, bias, tokens, experts, in_features,
                                                      out_features):
    x, router_input, router_weight, weight, bias_, valid = few_token_operands(dtype, bias, tokens, experts,
                                                                              in_features, out_features)
    strided_valid = torch.stack([valid, ~valid], dim=1)[:, 0]  # the mask as a view with stride 2
    out, logits, probs, expert, *summary = few_token_kernel.routed_few_tokens(
        x, router_input, router_weight, weight, bias_, strided_valid)
    want_logits, want_probs, scale, want_expert, keep, _, _ = modeling_parameternet_llama.route(
        router_weight, router_input, valid, None, 1, dtype, sort=False)
    assert torch.equal(expert, want_expert) and len(set(expert.tolist())) == min(tokens, experts)
    torch.testing.assert_close(logits, want_logits)
    torch.testing.assert_close(probs, want_probs)
    sums_in_another_order = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else {}
    torch.testing.assert_close(out, modeling_parameternet_llama.gathered_experts(x, weight, bias_, expert, scale),
                               **sums_in_another_order)
    assert out.dtype == dtype and torch.all(out[~valid] == 0)
    for got, want in zip(summary, modeling_parameternet_llama.routing_summary(
            want_logits, want_probs, want_expert, valid, keep), strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("change,message", [
    (lambda ops: {5: ops[5].float()}, "valid must be"),
    (lambda ops: {3: ops[3].double()}, "dtype"),
    (lambda ops: {2: ops[2][:3]}, "router_weight must be"),
    (lambda ops: {4: ops[3][:, 0, :]}, "bias must be"),
    (lambda ops: {1: ops[1][:2]}, "router_input"),
])
def test_bad_operands_are_refused_by_name(few_token_kernel, change, message):
    operands = list(few_token_operands(torch.float32, bias=True, tokens=3))
    for index, value in change(operands).items():
        operands[index] = value
    error = ValueError if few_token_kernel is triton_kernels else RuntimeError  # TORCH_CHECK's error in C++
    with pytest.raises(error, match=message):
        few_token_kernel.routed_few_tokens(*operands)


@pytest.fixture
def fresh_triton_load(monkeypatch):
    """The Triton kernel's `load` and the model's lookup decide afresh in the test and again after it."""
    def clear():
        triton_kernels.load.cache_clear()
        modeling_parameternet_llama.package_kernels.cache_clear()
    clear()
    yield
    monkeypatch.undo()
    clear()


@pytest.mark.usefixtures("fresh_triton_load")
def test_triton_kernel_loads_where_it_runs_and_is_switched_off_by_environment(monkeypatch):
    assert triton_kernels.load()
    assert modeling_parameternet_llama.package_kernels("triton_kernels") is triton_kernels
    triton_kernels.load.cache_clear()
    modeling_parameternet_llama.package_kernels.cache_clear()
    monkeypatch.setenv(triton_kernels.SWITCH, "0")
    assert not triton_kernels.load()
    assert modeling_parameternet_llama.package_kernels("triton_kernels") is None


@pytest.mark.usefixtures("fresh_triton_load")
def test_triton_kernel_that_does_not_run_warns_and_falls_back_to_tensor_ops(monkeypatch):
    def fails(*operands):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(triton_kernels, "routed_few_tokens", fails)
    with pytest.warns(UserWarning, match="no kernel image.*tensor ops instead"):
        assert modeling_parameternet_llama.package_kernels("triton_kernels") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not triton_kernels.load()  # decided once: no second attempt, no second warning


COMPILE_FOR_GPUS = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from parameternet_llm import triton_kernels

kernel = triton_kernels._routed_few_tokens_kernel
for arch, dtype, bias, tokens in ((90, "bf16", False, 1), (80, "fp32", True, 4)):
    pointers = dict(x=dtype, router_input=dtype, router_weight=dtype, weight=dtype, bias=dtype, valid="i1", out=dtype,
                    routing="fp32", expert="i64", summary="fp32")
    constants = dict(NUM_TOKENS=tokens, IN_FEATURES=300, NUM_EXPERTS=6, EXPERTS=8, HAS_BIAS=bias,
                     BLOCK_OUT=triton_kernels.BLOCK_OUT, BLOCK_IN=triton_kernels.BLOCK_IN)
    signature = {name: "*" + pointers[name] if name in pointers else "constexpr" if name in constants else "i32"
                 for name in kernel.arg_names}
    constexprs = {(kernel.arg_names.index(name),): value for name, value in constants.items()}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs), target=GPUTarget("cuda", arch, 32))
    print(f"sm_{arch}", dtype, "cubin" if compiled.asm.get("cubin") else "none")
"""


def test_triton_kernel_compiles_to_machine_code_for_hopper_and_ampere(tmp_path):
    """Triton's compiler, which needs no GPU, takes the kernel down to sm_90 and sm_80 machine code: it
    holds the kernel to rules that its interpreter does not check (types of values carried through loops,
    what may be called from a kernel). In a fresh process, as the interpreter replaces @triton.jit here."""
    environment = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", COMPILE_FOR_GPUS], env=environment, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == ["sm_90 bf16 cubin", "sm_80 fp32 cubin"]
