"""The compiled CPU expert products, plugged into the reference model as `parameternet_llm::expert_products_v1_cpu`.

`expert_products.cpp` takes the routing the model decided (the tokens' order by expert, where each expert's
group ends, each token's scale) and computes out[t] = scale[t] * (W_e x[t]) and its gradients, each thread
taking whole experts. It is built by torch's C++ extension loader (a C++ compiler and ninja, about 15 s) once
per machine and kernel source: the build directory is named by a hash of the source and of the torch and
Python versions, so two checkouts or versions on one machine keep their own builds. A failed build is recorded
there, reported in one line, and not tried again; the reference model then runs without the plug-in.
"""

import hashlib
import logging
import os
import sys
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("expert_products.cpp")
FAILED = "build-failed.txt"
OP = "parameternet_llm::expert_products_v1_cpu"

logger = logging.getLogger(__name__)


def build_directory() -> Path:
    """Where the kernel of this source, torch and Python is built: under torch's extension cache."""
    digest = hashlib.sha256(SOURCE.read_bytes() + f"{torch.__version__} {sys.version}".encode()).hexdigest()[:16]
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    return Path(root) / f"parameternet_llm_expert_products_{digest}"


def build():
    """The kernel module, built on first use; None where it cannot be built (said once, then remembered)."""
    directory = build_directory()
    failed = directory / FAILED
    if failed.exists():
        logger.debug("the CPU expert-products kernel failed to build before (%s)", failed)
        return None
    directory.mkdir(parents=True, exist_ok=True)
    if not any(directory.glob(f"{directory.name}*.so")):
        logger.warning(
            "parameternet_llm: compiling the CPU expert-products kernel in %s (once per machine and "
            "kernel version, about 15 s)",
            directory,
        )
    from torch.utils.cpp_extension import load

    try:
        return load(
            name=directory.name,
            sources=[str(SOURCE)],
            build_directory=str(directory),
            extra_cflags=["-O3", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as error:  # no compiler, no ninja, a read-only cache: all mean the reference path
        failed.write_text(f"{type(error).__name__}: {error}\n")
        first_line = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
        logger.warning(
            "parameternet_llm: could not build the CPU expert-products kernel (%s; log in %s), so the "
            "model runs without it; delete that file to try again.",
            first_line,
            failed,
        )
        return None


def register(kernel) -> None:
    """Registers `OP`, forward and backward, computed by the built `kernel` module."""

    @torch.library.custom_op(OP, mutates_args=(), device_types="cpu")
    def expert_products(
        x: torch.Tensor, weight: torch.Tensor, order: torch.Tensor, group_ends: torch.Tensor, scale: torch.Tensor
    ) -> torch.Tensor:
        """scale[t] * (W_e x[t]) for every token t of group e (the runs of `order` ending at `group_ends`)."""
        return kernel.expert_products(x, weight, order, group_ends, scale)

    @expert_products.register_fake
    def _(x, weight, order, group_ends, scale):
        return x.new_empty(x.shape[0], weight.shape[1])

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward(ctx, grad):
        grad_x, grad_weight, grad_scale = kernel.expert_products_backward(grad.contiguous(), *ctx.saved_tensors)
        return grad_x, grad_weight, None, None, grad_scale

    expert_products.register_autograd(backward, setup_context=setup_context)
