"""The demo pipeline end to end on a micro preset: seeds, the upcycled row, report, JSON, plots, and a rerun that
continues."""

import json

import pytest

from parameternet_llm.demo import run as demo
from parameternet_llm.errors import InputError
from parameternet_llm.training.recipe import validate_recipe
from parameternet_llm_cli import main

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def micro_preset(monkeypatch):
    preset = demo.Preset(
        description="micro test preset",
        model=dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_hidden_layers=2),
        corpus_tokens=120_000,
        vocab_size=512,
        seq_len=64,
        train=dict(
            max_steps=6, micro_batch_size=4, lr=3e-3, warmup_steps=1, log_every=2, save_every=2, progress_bar=False
        ),
        variants={"dense": {"dense": True}, "up_proj x4": {"num_experts": 4, "moe_projections": ["up_proj"]}},
        seeds=(0, 1),
        upcycled="up_proj x4",
    )
    monkeypatch.setitem(demo.PRESETS, "micro", preset)
    monkeypatch.setattr(demo, "TASK_NAMES", ("pnet_boolq",))
    return preset


def test_demo_writes_the_comparison_over_seeds_and_continues_after_an_interruption(micro_preset, tmp_path, capsys):
    main(["demo", "--output", str(tmp_path), "--preset", "micro"])
    results = json.loads((tmp_path / "results.json").read_text())
    variants = {summary["variant"]: summary for summary in results["variants"]}
    assert list(variants) == ["dense", "up_proj x4", "up_proj x4, upcycled at half"]
    dense, routed, upcycled = variants.values()
    assert routed["params"] > dense["params"] and routed["flops_per_token"] == pytest.approx(
        dense["flops_per_token"], rel=0.01
    )
    for summary in variants.values():
        assert summary["seeds"] == [0, 1] and summary["val_loss"]["n"] == 2
        losses = summary["val_loss"]["values"]
        assert summary["val_loss"]["mean"] == pytest.approx(sum(losses) / 2)
        assert summary["val_loss"]["sd"] == pytest.approx(abs(losses[0] - losses[1]) / 2**0.5)
        assert 0 <= summary["average"]["mean"] <= 1
    assert dense["val_loss"]["values"][0] != dense["val_loss"]["values"][1]  # the seeds differ

    runs = tmp_path / "runs"
    for seed in (0, 1):  # the upcycled run continues the dense run's schedule from its export at step 3
        assert (runs / "dense" / f"seed-{seed}" / "export" / "step-00000003" / "config.json").is_file()
        steps = [
            json.loads(line)["step"]
            for line in (runs / "up_proj-x4-upcycled-at-half" / f"seed-{seed}" / "metrics.jsonl")
            .read_text()
            .splitlines()
        ]
        assert steps == [4, 6]
    for diagnostics in results["upcycling"]["diagnostics"]:
        assert diagnostics["start_val_loss"] == pytest.approx(diagnostics["dense_val_loss"], rel=1e-4)
        assert diagnostics["start"]["expert_divergence"] < 1e-9 < diagnostics["end"]["expert_divergence"]

    report = (tmp_path / "report.md").read_text()
    assert "| dense |" in report and "| up_proj x4, upcycled at half |" in report and "± " in report
    assert "two standard errors" in report and "paper's Table 7" in report and "Training took" in report
    for plot in ("loss_vs_flops.png", "expert_load.png"):
        assert (tmp_path / plot).read_bytes()[:8] == PNG
    loads = json.loads((tmp_path / "expert_load.json").read_text())
    assert list(loads) == ["up_proj x4", "up_proj x4, upcycled at half"]
    assert all(abs(sum(v) - 1) < 1e-4 for v in loads["up_proj x4"].values())
    capsys.readouterr()

    # An interrupted rerun: one training run lost its end and its scores; everything else is reused.
    (runs / "up_proj-x4" / "seed-1" / "summary.json").unlink()
    (tmp_path / "scores" / "up_proj-x4" / "seed-1.json").unlink()
    main(["demo", "--output", str(tmp_path), "--preset", "micro"])
    log = capsys.readouterr().out
    assert "dense/seed-0: already trained, skipping" in log
    assert "resumed from" in log and "step 6" in log
    again = {summary["variant"]: summary for summary in json.loads((tmp_path / "results.json").read_text())["variants"]}
    assert again["up_proj x4"]["val_loss"] == routed["val_loss"]


def test_unknown_preset_is_refused(tmp_path):
    with pytest.raises(InputError, match="unknown preset 'huge'"):
        demo.run_demo(tmp_path, "huge")


def test_presets_train_every_variant_with_three_seeds():
    assert demo.default_preset() in demo.PRESETS
    cpu, gpu = demo.PRESETS["cpu"], demo.PRESETS["gpu"]
    assert set(cpu.variants) == {"dense", "up_proj x8"} and cpu.upcycled == "up_proj x8"
    assert len(gpu.variants) == 7 and gpu.upcycled == "up_proj x8"
    assert all(len(preset.seeds) >= 3 for preset in demo.PRESETS.values())


def test_the_gpu_preset_recipes_are_valid_and_seeds_can_be_chosen(micro_preset, tmp_path):
    gpu = demo.PRESETS["gpu"]
    for seed in gpu.seeds:
        recipes = demo.variant_recipes(gpu, tmp_path, seed)
        assert len(recipes) == 8
        for variant, recipe in recipes.items():
            if not variant.endswith(demo.UPCYCLED_SUFFIX):  # that one reads the dense run's export
                checked = validate_recipe(recipe)
                assert checked["train"]["seed"] == checked["data"]["seed"] == seed
    with pytest.raises(SystemExit, match="must be distinct"):
        main(["demo", "--output", str(tmp_path), "--preset", "micro", "--seeds", "1,1"])
