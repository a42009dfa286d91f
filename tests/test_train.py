"""End-to-end pretraining on the embedded corpus: metrics, checkpoints, kill and resume, two processes, bad input."""

import errno
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from parameternet_llm.errors import InputError
from parameternet_llm.training.metrics import read_metrics as read_metrics_file
from parameternet_llm.training.recipe import load_recipe
from parameternet_llm.training.train import (
    DropWatch,
    StarvationWatch,
    Trainer,
    checkpoint_problem,
    checkpoints,
    run,
    tracker_values,
)

METRIC_KEYS = {
    "step",
    "loss",
    "lm_loss",
    "aux_loss",
    "z_loss",
    "lr",
    "grad_norm",
    "tokens",
    "tokens_per_s",
    "mfu",
    "expert_load_max",
    "dropped_frac",
    "expert_load",
    "dropped",
    "val_loss",
}
LOSS_KEYS = ("loss", "lm_loss", "aux_loss", "z_loss", "grad_norm", "val_loss", "expert_load_max", "dropped_frac")


def read_metrics(output_dir: Path) -> list[dict]:
    return read_metrics_file(output_dir / "metrics.jsonl")


def command(recipe, *overrides):
    return [sys.executable, "-m", "parameternet_llm.training", "--config", str(recipe), *overrides]


def test_tiny_recipe_logs_checkpoints_and_saves_a_loadable_model(small_world, tmp_path):
    root, recipes = small_world
    out = tmp_path / "run"
    summary = run(str(recipes["tiny"]), [f"output_dir={out}", "train.trackers=[tensorboard]"])
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [2, 4, 6, 8, 10, 12]
    for line in metrics:
        assert set(line) >= METRIC_KEYS
        assert line["mfu"] is None  # CPU
        assert 0.25 <= line["expert_load_max"] <= 1 and 0 <= line["dropped_frac"] < 1
        loads, dropped = line["expert_load"], line["dropped"]
        assert list(loads) == list(dropped) == [f"model.layers.{i}.mlp.up_proj" for i in range(2)]
        assert all(len(shares) == 4 and sum(shares) == pytest.approx(1, abs=1e-5) for shares in loads.values())
        assert line["expert_load_max"] == pytest.approx(sum(max(v) for v in loads.values()) / 2)
        assert line["dropped_frac"] == pytest.approx(sum(dropped.values()) / 2)
        assert line["aux_loss"] >= 1.0 - 1e-4 and line["tokens"] == line["step"] * 4 * 64
    assert metrics[-1]["lm_loss"] < metrics[0]["lm_loss"] - 0.3
    assert [m["val_loss"] is not None for m in metrics] == [False, False, True, False, False, True]
    assert summary["ranks_in_sync"] is True and summary["num_processes"] == 1
    assert [p.name for p in checkpoints(out / "checkpoints")] == ["step-00000008", "step-00000012"]
    saved = {name: json.loads((out / "final" / name).read_text()) for name in ("config.json", "generation_config.json")}
    assert saved["config.json"].get("use_cache", True) and saved["generation_config.json"].get("use_cache", True)
    assert list((out / "runs").rglob("events.out.tfevents*")) or list(out.rglob("events.out.tfevents*"))

    probe = textwrap.dedent(f"""
        import sys, torch
        sys.modules["parameternet_llm"] = None
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({str(out / "final")!r}, trust_remote_code=True).eval()
        tokenizer = AutoTokenizer.from_pretrained({str(out / "final")!r}, trust_remote_code=True)
        ids = tokenizer("The capital of", return_tensors="pt").input_ids
        generated = model.generate(ids, max_new_tokens=3, do_sample=False)
        print(type(model).__name__, model.config.num_experts, generated.shape[1] > ids.shape[1])
    """)
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-3:] == ["ParameterNetLlamaForCausalLM", "4", "True"]


def test_dense_twin_trains_without_routing_metrics(small_world, tmp_path):
    _, recipes = small_world
    out = tmp_path / "dense"
    run(str(recipes["tiny-dense"]), [f"output_dir={out}", "train.max_steps=4"])
    metrics = read_metrics(out)
    assert metrics[-1]["expert_load_max"] is None and metrics[-1]["expert_load"] is None
    assert metrics[-1]["aux_loss"] == 0.0
    assert json.loads((out / "final" / "config.json").read_text())["model_type"] == "llama"


def test_killed_run_resumes_with_the_losses_of_an_uninterrupted_run(small_world, tmp_path):
    _, recipes = small_world
    overrides = ["train.max_steps=24", "train.save_every=2", "train.log_every=2", "eval.every=6"]
    run(str(recipes["tiny"]), [f"output_dir={tmp_path / 'straight'}", *overrides])
    expected = read_metrics(tmp_path / "straight")

    killed = tmp_path / "killed"
    process = subprocess.Popen(
        command(recipes["tiny"], f"output_dir={killed}", *overrides),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while not any(p.name >= "step-00000006" for p in checkpoints(killed / "checkpoints")):
        assert process.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "final").exists()
    stopped_at = json.loads((checkpoints(killed / "checkpoints")[-1] / "trainer_state.json").read_text())["step"]
    assert stopped_at < 24

    result = subprocess.run(
        command(recipes["tiny"], f"output_dir={killed}", *overrides), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {killed / 'checkpoints'}" in result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith("trained to step 24 (lm_loss ")
    assert f"the model is in {killed / 'final'}" in result.stdout
    resumed = read_metrics(killed)
    assert [m["step"] for m in resumed] == [m["step"] for m in expected]
    for got, want in zip(resumed, expected, strict=True):
        for key in LOSS_KEYS:
            if want[key] is None:
                assert got[key] is None, (got["step"], key)
            else:
                assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (got["step"], key)


def test_a_resume_between_logging_steps_logs_what_the_uninterrupted_run_logged(small_world, tmp_path):
    """The checkpoint at step 9 holds the statistics of step 9, so the resumed run's log at step 10 averages
    steps 9 and 10 as the uninterrupted run's did."""
    _, recipes = small_world
    overrides = ["train.max_steps=12", "train.save_every=3", "train.log_every=2", "train.keep_checkpoints=4"]
    run(str(recipes["tiny"]), [f"output_dir={tmp_path / 'straight'}", *overrides])
    expected = read_metrics(tmp_path / "straight")
    crashed = tmp_path / "crashed"  # what a crash after step 9's checkpoint leaves
    (crashed / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "step-00000009", crashed / "checkpoints" / "step-00000009")
    logged = (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    (crashed / "metrics.jsonl").write_text("".join(line + "\n" for line in logged if json.loads(line)["step"] <= 8))
    run(str(recipes["tiny"]), [f"output_dir={crashed}", *overrides, "train.resume=auto"])
    resumed = read_metrics(crashed)
    assert [m["step"] for m in resumed] == [m["step"] for m in expected] == [2, 4, 6, 8, 10, 12]
    for got, want in zip(resumed[4:], expected[4:], strict=True):
        for key in ("loss", "lm_loss", "aux_loss", "grad_norm", "expert_load_max", "dropped_frac"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (got["step"], key)


def test_two_processes_train_and_agree(small_world, tmp_path):
    _, recipes = small_world
    out = tmp_path / "ddp"
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "parameternet_llm.training",
        "--config",
        str(recipes["tiny"]),
        f"output_dir={out}",
        "train.max_steps=4",
    ]
    # A session of its own, so that a hang kills the ranks with the launcher and fails in minutes.
    process = subprocess.Popen(
        launch, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"two-process run did not end within 240 s:\n{output[-4000:]}")
    assert process.returncode == 0, output[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["ranks_in_sync"] is True
    newest = checkpoints(out / "checkpoints")[-1]
    states = [json.loads((newest / f"data_state_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert states[0] != states[1]
    assert read_metrics(out)[-1]["tokens"] == 4 * 2 * 4 * 64


@pytest.fixture(scope="module")
def finished_run(small_world):
    _, recipes = small_world
    out = small_world[0] / "runs" / "finished"
    run(str(recipes["tiny"]), [f"output_dir={out}", "train.max_steps=4"])
    return recipes["tiny"], out


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.max_stpes=3"], "unknown recipe key 'train.max_stpes' (did you mean 'max_steps'?)"),
        (["model.num_expert=3"], "unknown recipe key 'model.num_expert'"),
        (["data.seq_len=4096"], "data.seq_len=4096 exceeds model.max_position_embeddings=512"),
        (["train.max_steps"], "not of the form dotted.key=value"),
        (["train.max_steps=many"], "'train.max_steps' must be int"),
        (["model.num_experts=0"], "num_experts=0 is invalid"),
        (["data.sources=[{name: web, weight: 1.0, files: /nonexistent/*.jsonl}]"], "'web': no file matches"),
        (["train.lr=-0.001"], "'train.lr' must be > 0, got -0.001"),
        (["train.lr=1e-3"], "write it with a dot, like 1.0e-03"),
        (["train.grad_clip=-1.0"], "'train.grad_clip' must be > 0"),
        (["train.weight_decay=-0.5"], "'train.weight_decay' must be >= 0"),
        (["train.warmup_steps=-5"], "'train.warmup_steps' must be >= 0"),
        (["train.min_lr_ratio=-1"], "'train.min_lr_ratio' must be in [0, 1]"),
        (["train.adam_beta1=2.0"], "'train.adam_beta1' must be in [0, 1)"),
        (["train.trackers=[bogus]"], "unknown trackers ['bogus']"),
        (["eval.every=0"], "'eval.every' must be >= 1"),
        (["data.validation_documents=-1"], "'data.validation_documents' must be >= 0, got -1"),
        (["data.validation_documents=100000"], "'web' has no documents left for training past the 100000 held out"),
        (["model.capacity_factor=0"], "model section: ParameterNetLlamaConfig.capacity_factor=0 is invalid"),
        (["train.mixed_precision=fp16"], "fp16 needs a GPU"),
        (["model.num_attention_heads=3"], "not a multiple of the number of attention heads"),
        (["model.num_attention_heads=0"], "'model.num_attention_heads' must be an int >= 1, got 0"),
        (["model.num_hidden_layers=0"], "'model.num_hidden_layers' must be an int >= 1, got 0"),
        (["data.sources=[{name: web, weight: .inf, files: x.jsonl}]"], "weight ('web') must be a number > 0"),
        (["data.sources=[{name: web, weight: true, files: x.jsonl}]"], "weight ('web') must be a number > 0"),
        (
            ["data.sources=[{name: web, weight: 1, files: x.jsonl}, {name: web, weight: 1, files: y.jsonl}]"],
            "names a source twice",
        ),
    ],
)
def test_bad_input_fails_early_and_loses_nothing(finished_run, overrides, message):
    recipe, out = finished_run
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    with pytest.raises(InputError) as error:
        run(str(recipe), [f"output_dir={out}", *overrides])
    assert message in str(error.value)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before


def test_command_line_reports_bad_input_in_one_line(finished_run):
    recipe, out = finished_run
    result = subprocess.run(
        command(recipe, f"output_dir={out}", "train.max_stpes=3"), capture_output=True, text=True, timeout=300
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: unknown recipe key 'train.max_stpes' (did you mean 'max_steps'?)"
    )


def test_empty_source_fails_before_training(small_world, tmp_path):
    _, recipes = small_world
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(InputError, match="'arxiv' is empty"):
        run(
            str(recipes["tiny"]),
            [
                f"output_dir={tmp_path / 'x'}",
                f"data.sources=[{{name: arxiv, weight: 1.0, files: {tmp_path / 'empty.jsonl'}}}]",
            ],
        )
    assert not (tmp_path / "x").exists()


def test_existing_checkpoints_are_not_overwritten_without_resume(small_world, tmp_path):
    _, recipes = small_world
    out = tmp_path / "run"
    run(str(recipes["tiny"]), [f"output_dir={out}", "train.max_steps=4"])
    with pytest.raises(InputError, match="train.resume=auto"):
        run(str(recipes["tiny"]), [f"output_dir={out}", "train.resume=null"])


def test_crash_while_saving_keeps_the_last_good_checkpoint(small_world, tmp_path, monkeypatch):
    _, recipes = small_world
    out = tmp_path / "crash"
    trainer = Trainer(load_recipe(recipes["tiny"], [f"output_dir={out}", "train.max_steps=8"]))
    real_save_state = trainer.accelerator.save_state

    def save_state_then_crash(path):
        real_save_state(path)
        if trainer.step == 8:
            raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(trainer.accelerator, "save_state", save_state_then_crash)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    assert [p.name for p in checkpoints(out / "checkpoints")] == ["step-00000004"]
    monkeypatch.undo()
    summary = run(str(recipes["tiny"]), [f"output_dir={out}", "train.max_steps=8"])
    assert summary["step"] == 8 and [p.name for p in checkpoints(out / "checkpoints")][-1] == "step-00000008"
    assert not list((out / "checkpoints").glob(".saving-*"))


def test_a_run_exports_midway_and_another_continues_its_schedule_from_there(small_world, tmp_path):
    """export_steps writes an HF checkpoint midway; a run with init_from it and start_step follows the rest of the
    schedule (after its own warm-up) on the blocks the first run had not read yet."""
    _, recipes = small_world
    first = tmp_path / "first"
    run(str(recipes["tiny-dense"]), [f"output_dir={first}", "train.max_steps=8", "train.export_steps=[4]"])
    exported = first / "export" / "step-00000004"
    saved = load_file(first / "checkpoints" / "step-00000004" / "model.safetensors")
    assert all(torch.equal(saved[name], tensor) for name, tensor in load_file(exported / "model.safetensors").items())
    assert (exported / "tokenizer.json").is_file()

    second = tmp_path / "second"
    overrides = [f"output_dir={second}", "train.max_steps=8", "train.start_step=4", "data.skip_blocks=16"]
    summary = run(str(recipes["tiny-dense"]), [*overrides, f"model.init_from={exported}", "tokenizer.path=null"])
    assert summary["step"] == 8
    expected, got = read_metrics(first), read_metrics(second)
    assert [m["step"] for m in got] == [6, 8] and [m["tokens"] for m in got] == [m["tokens"] for m in expected[2:]]
    assert [m["lr"] for m in got] == pytest.approx([m["lr"] for m in expected[2:]])  # warmed up again in 2 steps
    with pytest.raises(InputError, match="'train.start_step' must be in"):
        load_recipe(recipes["tiny-dense"], ["train.max_steps=8", "train.start_step=8"])
    with pytest.raises(InputError, match="'train.export_steps' must list steps"):
        load_recipe(recipes["tiny-dense"], ["train.max_steps=8", "train.export_steps=[9]"])


def test_a_starved_expert_is_warned_about_once_and_loads_reach_trackers():
    watch = StarvationWatch(patience=20)
    balanced, collapsed = [0.25] * 4, [0.5, 0.45, 0.045, 0.005]  # expert 3 under a tenth of 1/4
    assert watch.update({"model.layers.0.mlp.up_proj": collapsed}, 10) == []
    assert watch.update({"model.layers.0.mlp.up_proj": balanced}, 10) == []  # recovered: the count starts again
    assert watch.update({"model.layers.0.mlp.up_proj": collapsed}, 10) == []
    warnings = watch.update({"model.layers.0.mlp.up_proj": collapsed}, 10)
    assert len(warnings) == 1 and warnings[0].startswith("expert 3 of model.layers.0.mlp.up_proj has had under 2.50%")
    assert watch.update({"model.layers.0.mlp.up_proj": collapsed}, 10) == []  # once

    record = {
        "loss": 1.0,
        "expert_load": {"model.layers.0.mlp.up_proj": balanced},
        "dropped": {"model.layers.0.mlp.up_proj": 0.1},
    }
    values = tracker_values(record)
    assert values["expert_load/layers.0.up_proj/3"] == 0.25 and values["dropped/layers.0.up_proj"] == 0.1
    assert values["loss"] == 1.0 and "expert_load" not in values


def test_fsdp_that_accelerate_cannot_run_here_is_refused(small_world, tmp_path, monkeypatch):
    """Without accelerators accelerate falls back to data parallelism when a config asks for FSDP."""
    _, recipes = small_world
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(InputError, match="asks for FSDP .* accelerate runs NO here"):
        Trainer(load_recipe(recipes["tiny"], [f"output_dir={tmp_path}"]))


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(small_world, tmp_path):
    _, recipes = small_world
    out = tmp_path / "nan"
    overrides = ["train.lr=1.0e+4", "train.warmup_steps=1", "train.max_steps=40", "train.save_every=2"]
    with pytest.raises(InputError, match="training diverged: a non-finite loss or gradient norm") as error:
        run(str(recipes["tiny"]), [f"output_dir={out}", *overrides, "train.log_every=1", "train.grad_clip=1.0e+30"])
    assert not (out / "final").exists()
    for checkpoint in checkpoints(out / "checkpoints"):  # whatever was saved is finite
        state = load_file(checkpoint / "model.safetensors")
        assert all(torch.isfinite(tensor).all() for tensor in state.values()), checkpoint.name
    if checkpoints(out / "checkpoints"):
        assert checkpoints(out / "checkpoints")[-1].name in str(error.value)
    if (out / "metrics.jsonl").exists():
        assert all(math.isfinite(m["loss"]) for m in read_metrics(out))


def test_a_torn_last_metrics_line_is_skipped_and_dropped_on_resume(small_world, tmp_path):
    _, recipes = small_world
    out = tmp_path / "torn"
    overrides = ["train.max_steps=4", "train.save_every=2", "train.log_every=2"]
    run(str(recipes["tiny"]), [f"output_dir={out}", *overrides])
    with (out / "metrics.jsonl").open("a") as stream:
        stream.write('{"step": 5, "loss": 4.9')  # a crash while logging
    assert [m["step"] for m in read_metrics_file(out / "metrics.jsonl")] == [2, 4]
    run(str(recipes["tiny"]), [f"output_dir={out}", *overrides[1:], "train.max_steps=6", "train.resume=auto"])
    assert [m["step"] for m in read_metrics(out)] == [2, 4, 6]
    (out / "metrics.jsonl").write_text('{"step": 2}\nnot json\n{"step": 4}\n')
    with pytest.raises(InputError, match="metrics.jsonl line 2 is not a JSON record"):
        read_metrics_file(out / "metrics.jsonl")


def flip_a_byte(path: Path, at: int) -> None:
    with path.open("r+b") as stream:
        stream.seek(at)
        byte = stream.read(1)
        stream.seek(at)
        stream.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.bin", "recipe.json", "data_state_rank0.json"])
def test_a_checkpoint_with_a_changed_byte_is_found_damaged_and_passed_over(small_world, tmp_path, caplog, name):
    _, recipes = small_world
    out = tmp_path / "flipped"
    overrides = [f"output_dir={out}", "train.max_steps=4", "train.save_every=2", "train.resume=auto"]
    run(str(recipes["tiny"]), overrides)
    newest = checkpoints(out / "checkpoints")[-1]
    flip_a_byte(newest / name, (newest / name).stat().st_size // 2)
    shutil.rmtree(out / "final")
    with caplog.at_level("WARNING"):
        summary = run(str(recipes["tiny"]), overrides)
    assert f"{newest.name} is damaged ({name} has other contents than when saved" in caplog.text
    assert summary["step"] == 4 and (out / "final" / "model.safetensors").is_file()


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(small_world, tmp_path, caplog):
    _, recipes = small_world
    out = tmp_path / "damaged"
    overrides = ["train.max_steps=6", "train.save_every=2", "train.log_every=2", "train.keep_checkpoints=3"]
    run(str(recipes["tiny"]), [f"output_dir={out}", *overrides])
    newest = checkpoints(out / "checkpoints")[-1]
    with (newest / "model.safetensors").open("r+b") as stream:
        stream.truncate(1000)
    shutil.rmtree(out / "final")
    with caplog.at_level("WARNING"):
        summary = run(str(recipes["tiny"]), [f"output_dir={out}", *overrides, "train.resume=auto"])
    assert "step-00000006 is damaged (model.safetensors has 1000 bytes" in caplog.text
    assert summary["step"] == 6 and (out / "final" / "config.json").is_file()
    newest = checkpoints(out / "checkpoints")[-1]
    with (newest / "model.safetensors").open("r+b") as stream:
        stream.truncate(1000)
    with pytest.raises(InputError, match="is damaged: model.safetensors has 1000 bytes"):
        Trainer(load_recipe(recipes["tiny"], [f"output_dir={out}", f"train.resume={newest}"]))


def test_a_second_trainer_on_the_same_output_dir_is_refused(small_world, tmp_path, caplog):
    _, recipes = small_world
    out = tmp_path / "locked"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = {"pid": other.pid, "host": socket.gethostname(), "started": "2026-12-05 00:00:00"}
        (out / ".lock").write_text(json.dumps(lock))
        with pytest.raises(InputError, match=f"is in use by process {other.pid}"):
            Trainer(load_recipe(recipes["tiny"], [f"output_dir={out}", "train.max_steps=2"]))
    finally:
        other.kill()
        other.wait()
    with caplog.at_level("WARNING"):  # its process is gone: the lock is stale and taken over
        run(str(recipes["tiny"]), [f"output_dir={out}", "train.max_steps=2"])
    assert "left by a process that is gone" in caplog.text
    assert not (out / ".lock").exists()  # released at the end


def test_a_finished_run_asked_again_or_for_fewer_steps_changes_nothing(small_world, tmp_path, capsys):
    _, recipes = small_world
    out = tmp_path / "finished"
    run(str(recipes["tiny"]), [f"output_dir={out}", "train.max_steps=4", "train.save_every=2"])
    before = {name: (out / name).read_text() for name in ("summary.json", "metrics.jsonl")}
    assert json.loads(before["summary.json"])["final"]["step"] == 4
    capsys.readouterr()
    again = run(str(recipes["tiny"]), [f"output_dir={out}", "train.max_steps=4", "train.resume=auto"])
    assert "already trained to train.max_steps=4: nothing to do" in capsys.readouterr().out
    assert again == json.loads(before["summary.json"])
    with pytest.raises(InputError, match="is at step 4, past train.max_steps=2: nothing to train"):
        run(str(recipes["tiny"]), [f"output_dir={out}", "train.max_steps=2", "train.resume=auto"])
    assert {name: (out / name).read_text() for name in before} == before


def test_pretrain_command_ends_saying_where_the_model_is(small_world, tmp_path, capsys):
    from parameternet_llm_cli import main

    _, recipes = small_world
    main(["pretrain", str(recipes["tiny"]), f"output_dir={tmp_path / 'cli'}", "train.max_steps=2"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("trained to step 2 (lm_loss ") and f"the model is in {tmp_path / 'cli' / 'final'}" in last


@pytest.mark.parametrize(
    "change, named",
    [
        ("model.hidden_size=32", "model config.hidden_size: 64 -> 32"),
        ("model.capacity_factor=2.0", "model config.capacity_factor: 1.25 -> 2.0"),
        ("data.seq_len=32", "data.seq_len: 64 -> 32"),
        ("train.micro_batch_size=2", "train.micro_batch_size: 4 -> 2"),
        ("data.sources=[{name: web, weight: 1.0, files: PLACEHOLDER}]", "data.sources: [{'name': 'web'"),
    ],
)
def test_a_resume_with_another_model_or_data_is_refused_naming_the_change(finished_run, change, named):
    recipe, out = finished_run
    change = change.replace("PLACEHOLDER", str(out.parent.parent / "corpus" / "web" / "*.jsonl"))
    before = {p.name: (p / "model.safetensors").read_bytes() for p in checkpoints(out / "checkpoints")}
    with pytest.raises(InputError) as error:
        run(str(recipe), [f"output_dir={out}", "train.max_steps=6", "train.resume=auto", change])
    assert "was saved by a run with another model or data" in str(error.value)
    assert named in str(error.value)
    assert {p.name: (p / "model.safetensors").read_bytes() for p in checkpoints(out / "checkpoints")} == before
    assert not (out / ".lock").exists()  # free for the next run


def test_a_resume_applies_changed_optimizer_settings_and_says_so(small_world, tmp_path, capsys):
    _, recipes = small_world
    overrides = ["train.max_steps=6", "train.save_every=2", "train.log_every=2"]
    run(str(recipes["tiny"]), [f"output_dir={tmp_path / 'straight'}", *overrides, "train.lr=1.0e-5"])
    first = tmp_path / "resumed"
    run(str(recipes["tiny"]), [f"output_dir={first}", *overrides[1:], "train.max_steps=2"])
    capsys.readouterr()
    changed = [*overrides, "train.resume=auto", "train.lr=1.0e-5", "train.weight_decay=0.05", "train.adam_eps=1.0e-6"]
    trainer = Trainer(load_recipe(recipes["tiny"], [f"output_dir={first}", *changed]))
    said = capsys.readouterr().out
    recipe_lr = load_recipe(recipes["tiny"])["train"]["lr"]
    for line in (f"train.lr: {recipe_lr!r} -> 1e-05", "train.weight_decay: 0.1 -> 0.05", "train.max_steps: 2 -> 6"):
        assert line in said
    matrices, vectors = trainer.optimizer.param_groups
    assert (matrices["weight_decay"], vectors["weight_decay"]) == (0.05, 0.0)
    assert matrices["eps"] == vectors["eps"] == 1.0e-6
    trainer.run()
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(first)
    assert [m["lr"] for m in resumed[1:]] == pytest.approx([m["lr"] for m in straight[1:]], rel=1e-12)
    assert resumed[-1]["lr"] < 1.0e-5


def test_a_checkpoint_saved_without_its_recipe_still_refuses_another_shape_clearly(finished_run, tmp_path, caplog):
    recipe, out = finished_run
    copy = tmp_path / "earlier"
    shutil.copytree(out, copy)
    for checkpoint in checkpoints(copy / "checkpoints"):  # as saved before checkpoints held their recipe
        (checkpoint / "recipe.json").unlink()
        manifest = json.loads((checkpoint / "manifest.json").read_text())
        del manifest["recipe.json"]
        (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level("WARNING"), pytest.raises(InputError, match="does not fit this recipe's model: "):
        run(str(recipe), [f"output_dir={copy}", "train.max_steps=6", "train.resume=auto", "model.hidden_size=32"])
    assert "was saved without its recipe" in caplog.text


def test_heavy_drops_are_warned_about_naming_the_capacity(small_world, tmp_path, caplog):
    _, recipes = small_world
    out = tmp_path / "crowded"
    with caplog.at_level("WARNING"):
        run(
            str(recipes["tiny"]),
            [f"output_dir={out}", "train.max_steps=6", "model.capacity_factor=0.1", "train.starved_expert_steps=4"],
        )
    logged = read_metrics(out)
    assert all(min(record["dropped"].values()) > 0.5 for record in logged)
    warned = [r.getMessage() for r in caplog.records if "has dropped over half its tokens" in r.getMessage()]
    assert len(warned) == len(logged[-1]["dropped"])  # once per routed linear, after two windows of 2 steps
    assert "for 4 steps" in warned[0]
    # 4 x 64 tokens a micro-batch: ceil(0.1 * 256 / 4) = 7 tokens per expert
    assert "capacity_factor=0.1 gives each of its 4 experts room for 7 of a micro-batch's 256 tokens" in warned[0]
    run(str(recipes["tiny"]), [f"output_dir={tmp_path / 'usual'}", "train.max_steps=2"])
    assert max(read_metrics(tmp_path / "usual")[-1]["dropped"].values()) < 0.5


def test_heavy_drops_are_warned_about_only_when_they_last():
    config = SimpleNamespace(capacity_factor=1.25, num_experts=4, min_capacity=4)
    watch = DropWatch(30, config, micro_batch_tokens=256)
    assert watch.update({"up": 0.6}, 10) == [] and watch.update({"up": 0.6}, 10) == []
    assert watch.update({"up": 0.2}, 10) == []  # recovered: the count starts again
    assert watch.update({"up": 0.6}, 10) == [] and watch.update({"up": 0.6}, 10) == []
    assert len(watch.update({"up": 0.7}, 10)) == 1
    assert watch.update({"up": 0.7}, 10) == []  # once


def test_a_full_disk_while_saving_is_named_with_the_last_good_checkpoint(small_world, tmp_path, monkeypatch):
    _, recipes = small_world
    out = tmp_path / "full"
    trainer = Trainer(load_recipe(recipes["tiny"], [f"output_dir={out}", "train.max_steps=8"]))
    real_save_state = trainer.accelerator.save_state

    def save_state_until_the_disk_fills(path):
        real_save_state(path)
        if trainer.step == 8:
            monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=0))
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 470")

    monkeypatch.setattr(trainer.accelerator, "save_state", save_state_until_the_disk_fills)
    with pytest.raises(InputError) as error:
        trainer.run()
    message = str(error.value)
    assert message.startswith("disk full while saving step 8 (RuntimeError: [enforce fail")
    assert f"the last good checkpoint is {out / 'checkpoints' / 'step-00000004'}" in message
    assert [p.name for p in checkpoints(out / "checkpoints")] == ["step-00000004"]
    assert not list((out / "checkpoints").glob(".saving-*"))
    assert not (out / ".lock").exists()


def test_a_full_disk_while_writing_the_final_model_is_named(small_world, tmp_path, monkeypatch):
    _, recipes = small_world
    out = tmp_path / "full-final"
    trainer = Trainer(load_recipe(recipes["tiny"], [f"output_dir={out}", "train.max_steps=4"]))

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(trainer.tokenizer), "save_pretrained", no_space)
    with pytest.raises(InputError, match=f"disk full while writing {out / 'final'} .*step-00000004"):
        trainer.run()
    assert not (out / "final").exists() and not (out / ".saving-final").exists()


def test_a_manifest_of_sizes_only_is_still_checked(tmp_path):
    (tmp_path / "trainer_state.json").write_text('{"step": 2}')
    (tmp_path / "model.safetensors").write_bytes(b"x" * 10)
    (tmp_path / "manifest.json").write_text(json.dumps({"trainer_state.json": 11, "model.safetensors": 10}))
    assert checkpoint_problem(tmp_path) is None
    (tmp_path / "model.safetensors").write_bytes(b"x" * 9)
    assert checkpoint_problem(tmp_path) == "model.safetensors has 9 bytes, 10 when saved"


def test_a_full_disk_while_logging_is_named(small_world, tmp_path, monkeypatch):
    _, recipes = small_world
    out = tmp_path / "full-log"
    trainer = Trainer(load_recipe(recipes["tiny"], [f"output_dir={out}", "train.max_steps=8"]))
    real_open = Path.open

    def open_until_step_6(path, mode="r", *args, **kwargs):
        if path.name == "metrics.jsonl" and mode == "a" and trainer.step == 6:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_until_step_6)
    with pytest.raises(InputError, match="disk full while logging step 6 .*last good checkpoint is .*step-00000004"):
        trainer.run()
    assert not (out / ".lock").exists() and (out / "metrics.jsonl").is_file()


def test_a_finished_run_with_a_damaged_final_model_or_summary_writes_them_again(small_world, tmp_path, caplog):
    _, recipes = small_world
    out = tmp_path / "finished"
    overrides = [f"output_dir={out}", "train.max_steps=4", "train.save_every=2", "train.resume=auto"]
    first = run(str(recipes["tiny"]), overrides)
    weights = (out / "final" / "model.safetensors").read_bytes()
    with (out / "final" / "model.safetensors").open("r+b") as stream:
        stream.truncate(1000)
    (out / "summary.json").write_text('{"step": 4, "fin')
    (out / ".lock").write_text("[1, 2]")  # a lock that is not one of ours is taken over
    with caplog.at_level("WARNING"):
        again = run(str(recipes["tiny"]), overrides)
    assert "the finished run's summary or final/ is damaged" in caplog.text
    assert (out / "final" / "model.safetensors").read_bytes() == weights
    assert again["step"] == first["step"] == 4 and again["final"] == first["final"]
    assert json.loads((out / "summary.json").read_text()) == again
