"""Compiled CPU kernels: the expert-parallel grouped product (`csrc/grouped_mm.cpp`), the routing for it
(`csrc/route_sorted.cpp`) and the few-token routed linear of decoding (`csrc/routed_few_tokens.cpp`).

Built on first use with torch's C++ extension loader (a C++ compiler and ninja; 15-20 s on two cores) and
cached by it (`TORCH_EXTENSIONS_DIR`, default `~/.cache/torch_extensions`). Where they cannot be built,
or with `PARAMETERNET_LLM_CPU_KERNELS=0`, the models run torch's own `grouped_mm` and tensor ops instead.
"""

import logging
import os
import warnings
from functools import cache
from pathlib import Path

import torch

SWITCH = "PARAMETERNET_LLM_CPU_KERNELS"
SOURCES = [Path(__file__).parent / "csrc" / name
           for name in ("grouped_mm.cpp", "route_sorted.cpp", "routed_few_tokens.cpp")]

logger = logging.getLogger(__name__)


@cache
def load() -> bool:
    """Builds (once per machine and source) and registers the `torch.ops.parameternet_llm` kernels; False,
    with a warning, where that fails."""
    if os.environ.get(SWITCH, "1") == "0":
        return False
    from torch.utils.cpp_extension import load as load_extension

    sources = [str(source) for source in SOURCES]
    logger.info("Loading the CPU kernels (built on first use, 15-20 s on two cores): %s", ", ".join(sources))
    try:
        load_extension("parameternet_llm_cpu", sources=sources, extra_cflags=["-O3", "-fopenmp"],
                       extra_ldflags=["-fopenmp"], is_python_module=False)
    except Exception as error:  # no compiler, no ninja, a read-only cache: all mean the fallback
        warnings.warn(f"Could not build the CPU kernels ({type(error).__name__}: {error}); routed linears use "
                      f"torch's grouped_mm and tensor ops instead. Set {SWITCH}=0 to skip the attempt.", stacklevel=2)
        return False
    return True


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """`torch.nn.functional.grouped_mm(a, b, offs=offs)` for CPU tensors, its groups spread over the threads."""
    return torch.ops.parameternet_llm.grouped_mm(a, b, offs)


def route_sorted(logits, valid, capacity_factor, min_capacity):
    """The model's `route` from CPU router logits [E, T] (float32) with the grouped dispatch's order: the
    probabilities [E, T], the scale [T] (float32), the top-1 expert [T], the kept tokens [T], the dispatch
    order [T] and its inverse [T], and the group ends [E] (int32)."""
    return torch.ops.parameternet_llm.route_sorted(logits, valid, capacity_factor, min_capacity)


def routed_few_tokens(x, router_input, router_weight, weight, bias, valid):
    """A dropless routed linear on a few CPU token rows `x` [T, in] (`valid` [T] bool), as the model's `route`,
    `gathered_experts` and `routing_summary` give it (probabilities, outputs and losses up to rounding):
    the output [T, out], router logits and probabilities [E, T] (float32), each token's top-1 expert [T],
    and the routing's aux loss, z-loss, expert load [E] and dropped share (0)."""
    return torch.ops.parameternet_llm.routed_few_tokens(x, router_input, router_weight, weight, bias, valid)
