"""The command line answers --help without importing torch, transformers or the package."""

import subprocess
import sys

import pytest

COMMANDS = [
    "demo",
    "info",
    "pretrain",
    "eval",
    "finetune-sst2",
    "bench",
    "inspect",
    "upcycle",
    "make-corpus",
    "train-tokenizer",
]


@pytest.mark.parametrize("arguments", [["--help"], *([command, "--help"] for command in COMMANDS)])
def test_help_imports_nothing_heavy(arguments):
    probe = (
        "import sys, parameternet_llm_cli\n"
        "try:\n"
        f"    parameternet_llm_cli.main({arguments!r})\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 0, exit.code\n"
        "print(sorted(m for m in ('torch', 'transformers', 'parameternet_llm') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "usage: parameternet-llm" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "[]"
