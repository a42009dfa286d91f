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


@pytest.mark.parametrize("command", [["info"], ["inspect"], ["eval", "--output", "scores"], ["upcycle", "out"]])
@pytest.mark.parametrize(
    "config, message",
    [
        (None, "is not a checkpoint directory: it has no config.json"),
        ("{bad", "config.json is not valid JSON"),
        ("[1, 2]", "config.json holds no mapping of config fields"),
    ],
)
def test_a_broken_checkpoint_is_named_in_one_line(tmp_path, monkeypatch, command, config, message):
    from parameternet_llm_cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt").mkdir()
    if config is not None:
        (tmp_path / "ckpt" / "config.json").write_text(config)
    with pytest.raises(SystemExit) as exit:
        main([command[0], "ckpt", *command[1:]])
    assert str(exit.value).startswith("error: ckpt") and message in str(exit.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # nothing written
