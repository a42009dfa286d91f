"""The demo pipeline end to end on a micro preset: report, JSON, plots, and a rerun that continues."""

import json

import pytest

from parameternet_llm.cli import main
from parameternet_llm.demo import run as demo
from parameternet_llm.errors import InputError


@pytest.fixture
def micro_preset(monkeypatch):
    preset = demo.Preset(
        description="micro test preset",
        model=dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_hidden_layers=2),
        corpus_tokens=120_000,
        vocab_size=512,
        seq_len=64,
        train=dict(
            max_steps=6, micro_batch_size=4, lr=3e-3, warmup_steps=1, log_every=2, save_every=3, progress_bar=False
        ),
        variants={"dense": {"dense": True}, "up_proj x4": {"num_experts": 4, "moe_projections": ["up_proj"]}},
        upcycling={"num_experts": 4, "moe_projections": ["up_proj"]},
    )
    monkeypatch.setitem(demo.PRESETS, "micro", preset)
    monkeypatch.setattr(demo, "TASK_NAMES", ("pnet_boolq",))
    return preset


def test_demo_writes_the_comparison_and_continues_after_an_interruption(micro_preset, tmp_path, capsys):
    main(["demo", "--output", str(tmp_path), "--preset", "micro"])
    results = json.loads((tmp_path / "results.json").read_text())
    assert [row["variant"] for row in results["rows"]] == ["dense", "up_proj x4"]
    dense, routed = results["rows"]
    assert routed["params"] > dense["params"] and routed["flops_per_token"] == pytest.approx(
        dense["flops_per_token"], rel=0.01
    )
    assert all(row["val_loss"] is not None and 0 <= row["average"] <= 1 for row in results["rows"])
    report = (tmp_path / "report.md").read_text()
    assert "| dense |" in report and "| up_proj-x4 |" in report and "What this run measured" in report
    assert "lower validation loss than the dense model" in report and "paper's Table 7" in report
    for plot in ("loss_curves.png", "expert_load.png"):
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    loads = json.loads((tmp_path / "expert_load.json").read_text())
    assert list(loads) == ["up_proj x4"] and all(abs(sum(v) - 1) < 1e-4 for v in loads["up_proj x4"].values())

    # The upcycling comparison: the dense model continued as it is and upcycled, beside from-scratch training.
    upcycling = results["upcycling"]
    assert [row["name"] for row in upcycling["rows"]] == [
        "dense",
        "dense-continued",
        "up_proj-x4-upcycled",
        "up_proj-x4-2x-steps",
    ]
    diagnostics = upcycling["diagnostics"]
    assert diagnostics["step_0_val_loss"] == pytest.approx(diagnostics["dense_val_loss"], rel=1e-4)
    assert diagnostics["step_0"]["expert_divergence"] < 1e-9 < diagnostics["end"]["expert_divergence"]
    runs = tmp_path / "runs"
    continued_metrics = (runs / "up_proj-x4-upcycled" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(continued_metrics[-1])["tokens"] == 6 * 4 * 64
    assert json.loads((runs / "up_proj-x4-2x-steps" / "summary.json").read_text())["step"] == 12
    assert "## Upcycling: does it pay?" in report and "Upcycled vs dense, both continued" in report
    assert (tmp_path / "upcycling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()

    # An interrupted rerun: one training run lost its end and its scores; everything else is reused.
    (tmp_path / "runs" / "up_proj-x4" / "summary.json").unlink()
    (tmp_path / "scores" / "up_proj-x4.json").unlink()
    main(["demo", "--output", str(tmp_path), "--preset", "micro"])
    log = capsys.readouterr().out
    assert "dense: already trained, skipping" in log
    assert "resumed from" in log and "step 6" in log
    assert json.loads((tmp_path / "results.json").read_text())["rows"][1]["val_loss"] == routed["val_loss"]


def test_unknown_preset_is_refused(tmp_path):
    with pytest.raises(InputError, match="unknown preset 'huge'"):
        demo.run_demo(tmp_path, "huge")


def test_default_preset_follows_the_hardware():
    assert demo.default_preset() in demo.PRESETS
    assert set(demo.PRESETS["cpu"].variants) >= {"dense", "up_proj x4", "up_proj x8"}
    assert len(demo.PRESETS["gpu"].variants) == 7
