"""The benchmarks run, compare against the dense twin in the same process and end with one JSON line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from parameternet_llm import bench
from parameternet_llm.kernels import reference_only
from parameternet_llm_cli import main


def last_json_line(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def test_layer_bench_times_each_backend_against_nn_linear(capsys):
    result = bench.bench_layer(
        tokens=64, in_features=32, out_features=48, num_experts=4, backends=("loop", "grouped_mm"), warmup=1, repeats=2
    )
    printed = last_json_line(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(result))
    assert set(result["ms"]) == {"dense", "loop", "grouped_mm", bench.REFERENCE}
    assert all(v > 0 for v in result["ms"].values())
    assert result["ratio"] == pytest.approx(result["ms"]["dense"] / result["ms"]["loop"])  # a speed


def test_cpu_results_say_which_plug_in_ran():
    assert bench.describe_device(torch.device("cpu")).endswith(
        "expert-products plug-in: parameternet_llm.expert_products_v1_cpu"
    )
    with reference_only():
        assert bench.describe_device(torch.device("cpu")).endswith("expert-products plug-in: none")


def test_train_and_decode_benches_report_ratios(monkeypatch, capsys):
    monkeypatch.setitem(
        bench.MODEL_SHAPES,
        "test",
        dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1, vocab_size=64),
    )
    train = bench.bench_train("test", batch_size=2, seq_len=16, num_experts=4, warmup=1, repeats=2)
    assert train["ratio"] == pytest.approx(train["tokens_per_s"]["parameternet"] / train["tokens_per_s"]["dense"])
    assert set(train["tokens_per_s"]) == {"dense", "parameternet", bench.REFERENCE}
    assert train["paired_ratio"] > 0
    decode = bench.bench_decode("test", prompt_len=4, new_tokens=4, num_experts=4, warmup=0, repeats=1)
    assert decode["ratio"] == pytest.approx(decode["ms_per_token"]["dense"] / decode["ms_per_token"]["parameternet"])
    assert decode["paired_ratio"] == pytest.approx(decode["ratio"])  # one round
    printed = capsys.readouterr().out
    assert printed.count("| what | time | speed vs dense (dense time / time; higher is faster) |") == 2
    assert "| dense | " in printed and "ms/token | 1.000 |" in printed


def test_bench_command_saves_the_record(tmp_path, capsys):
    main(
        [
            "bench",
            "layer",
            "--tokens",
            "32",
            "--in-features",
            "16",
            "--out-features",
            "16",
            "--experts",
            "2",
            "--repeats",
            "1",
            "--save",
            str(tmp_path / "results.jsonl"),
        ]
    )
    record = json.loads((tmp_path / "results.jsonl").read_text())
    assert record["bench"] == "layer" and record["command"].startswith("parameternet-llm bench layer")
    assert record == {**last_json_line(capsys.readouterr().out), "date": record["date"], "command": record["command"]}


def test_paired_ratio_holds_when_the_machine_speed_drifts():
    times = {"routed": [1.0, 10.0, 3.0], "dense": [2.0, 20.0, 30.0]}  # the third round ran 10x slower for dense
    assert bench.paired_ratio(times, "routed", "dense") == pytest.approx(0.5)
    medians = bench.medians(times)
    assert medians["routed"] / medians["dense"] == pytest.approx(0.15)


@pytest.mark.parametrize("timer,mm", [([], "mm"), (["--profiler"], "aten::mm")])
def test_op_breakdown_times_each_models_ops_in_one_process(timer, mm):
    """benchmarks/op_breakdown.py attributes each model's step time to ops, timed under a dispatch mode or by
    torch.profiler (as on a GPU): only ParameterNet's routed linears run the CPU plug-in, and both models'
    other GEMMs run mm."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "op_breakdown.py"
    run = subprocess.run(
        [sys.executable, str(script), "--batch-size", "1", "--seq-len", "8", "--rounds", "1", "--top", "1000", *timer],
        capture_output=True,
        text=True,
        cwd=script.parent,
    )
    assert run.returncode == 0, run.stderr
    record = last_json_line(run.stdout)
    dense_plug_in, routed_plug_in = record["ops"]["parameternet_llm::expert_products_v1_cpu"]
    assert dense_plug_in == 0 < routed_plug_in
    assert all(ms > 0 for ms in record["ops"][mm]) and all(ms > 0 for ms in record["ms_per_step"].values())
    assert "| parameternet_llm::expert_products_v1_cpu | 0.00 (0) |" in run.stdout
