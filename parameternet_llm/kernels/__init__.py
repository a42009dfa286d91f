"""Plug-ins: faster arithmetic for the reference model, registered as the torch custom ops it looks up.

The reference (`modeling_parameternet_llama`, also the copy in every checkpoint) decides every routing rule
and consults `torch.ops.parameternet_llm.<name>_v<version>_<device>` for the arithmetic it hands on (see its
`plugin`); importing this package registers the plug-ins below under those names. `PARAMETERNET_LLM_KERNELS=0`
keeps them out.

Registered here: `expert_products_v1_cpu` (`cpu.py`), the gather, grouped product, scale and scatter of a
routed linear on the CPU, forward and backward; kept while `parameternet-llm bench train` shows its gain over
the reference path in the same run (benchmarks/RESULTS.md).
"""

import os
from contextlib import contextmanager
from unittest import mock

SWITCH = "PARAMETERNET_LLM_KERNELS"


def register_all() -> list[str]:
    """Registers every plug-in that runs here (once per process); returns their op names."""
    from . import cpu

    kernel = cpu.build()
    if kernel is None:
        return []
    cpu.register(kernel)
    return [cpu.OP]


REGISTERED = register_all() if os.environ.get(SWITCH, "1") != "0" else []


@contextmanager
def reference_only():
    """Within the block, the package's model classes run the reference path, as without plug-ins (for same-run
    comparisons; a checkpoint's own copy of the model file is not affected)."""
    from .. import modeling_parameternet_llama

    with mock.patch.object(modeling_parameternet_llama, "plugin", lambda name, device: None):
        yield
