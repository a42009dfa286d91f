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


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["demo", "--seeds", "a,b"], "argument --seeds: 'a,b' is not a comma-separated list of integers"),
        (["eval", "ckpt", "--output", "o", "--limit", "0"], "argument --limit: must be >= 1, got 0"),
        (["eval", "ckpt", "--output", "o", "--batch-size", "-2"], "argument --batch-size: must be >= 1, got -2"),
        (["inspect", "ckpt", "--seq-len", "0"], "argument --seq-len: must be >= 2, got 0"),
        (["make-corpus", "--output", "c", "--num-tokens", "-5"], "argument --num-tokens: must be >= 1000, got -5"),
        (["bench", "layer", "--tokens", "x"], "argument --tokens: 'x' is not an integer"),
        (["finetune-sst2", "ckpt", "--output", "o", "--lr", "nan"], "argument --lr: must be a finite number > 0"),
        (["upcycle", "dense", "out", "--experts", "1"], "argument --experts: must be >= 2, got 1"),
    ],
)
def test_bad_numbers_are_refused_before_anything_runs(tmp_path, monkeypatch, capsys, arguments, message):
    from parameternet_llm_cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit:
        main(arguments)
    assert exit.value.code == 2 and message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_full_disk_is_one_line_and_other_errors_keep_their_traceback(tmp_path, monkeypatch, capsys):
    import errno

    from parameternet_llm.demo import corpus
    from parameternet_llm_cli import main

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(corpus, "generate_corpus", full)
    with pytest.raises(SystemExit, match=r"^error: disk full: \[Errno 28\] No space left on device"):
        main(["make-corpus", "--output", str(tmp_path / "c")])

    def missing(*args, **kwargs):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(corpus, "generate_corpus", missing)
    with pytest.raises(OSError, match="I/O error"):
        main(["make-corpus", "--output", str(tmp_path / "c")])
