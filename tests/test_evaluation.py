"""Zero-shot scoring with lm-eval on tiny checkpoints: offline tasks, both command lines, batch sizes, SST-2."""

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from parameternet_llm import ParameterNetLlamaForCausalLM, ParameterNetLlamaForSequenceClassification
from parameternet_llm.demo.corpus import SOURCES, World, generate_corpus
from parameternet_llm.errors import InputError
from parameternet_llm.evaluation.harness import OFFLINE_TASKS_DIR, EvalError, evaluate
from parameternet_llm.evaluation.offline_tasks import CHANCE, TASK_NAMES, generate_task_data, write_task_data
from parameternet_llm.evaluation.sst2 import finetune_sst2
from parameternet_llm.training.tokenizer import train_tokenizer
from parameternet_llm_cli import main

REPO = Path(__file__).resolve().parents[1]
TASKS_DIR = OFFLINE_TASKS_DIR
OFFLINE = list(TASK_NAMES)


def test_committed_task_data_is_the_generated_data():
    for name, documents in generate_task_data(0).items():
        lines = (TASKS_DIR / name / "test.jsonl").read_text().splitlines()
        assert [json.loads(line) for line in lines] == documents, name


def test_questions_ask_facts_of_the_world_in_words_the_corpus_never_uses(tmp_path):
    world = World.generate(0)
    tasks = generate_task_data(0)
    corpus = generate_corpus(tmp_path / "corpus", num_tokens=300_000, seed=0)
    text = "\n".join(
        json.loads(line)["text"]
        for source in SOURCES
        for path in (corpus / source).glob("*.jsonl")
        for line in path.read_text().splitlines()
    )
    for doc in tasks["pnet_arc"]:
        assert doc["question"] not in text and len(set(doc["choices"])) == 4
    for doc in tasks["pnet_boolq"]:
        assert doc["passage"] not in text and doc["question"] not in text
    for doc in tasks["pnet_hellaswag"]:
        assert doc["ctx"] not in text and len(set(doc["endings"])) == 4
    capitals = {c.name: c.capital for c in world.countries}
    for doc in tasks["pnet_arc"]:
        if "seat of government of" in doc["question"]:
            country = doc["question"].rsplit(" ", 1)[-1].rstrip("?")
            assert doc["choices"][doc["label"]] == capitals[country]
    for ritual in world.rituals:  # the true ending is the step the corpus tells next
        for doc in (d for d in tasks["pnet_hellaswag"] if ritual.name in d["ctx"]):
            known = doc["ctx"].count(", and then ") + 1
            assert doc["endings"][doc["label"]] == ritual.steps[known] + "."


def test_chance_levels_hold():
    tasks = generate_task_data(0)
    yes = sum(doc["label"] for doc in tasks["pnet_boolq"]) / len(tasks["pnet_boolq"])
    assert abs(yes - CHANCE["pnet_boolq"]) < 0.1
    for name in ("pnet_arc", "pnet_hellaswag"):
        labels = [doc["label"] for doc in tasks[name]]
        assert all(labels.count(i) / len(labels) < 0.4 for i in range(4)), name


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained tiny ParameterNet with a tokenizer trained on the corpus: enough for the mechanics."""
    root = tmp_path_factory.mktemp("eval")
    corpus = generate_corpus(root / "corpus", num_tokens=60_000, seed=0)
    texts = [json.loads(line)["text"] for line in (corpus / "wiki" / "wiki-000.jsonl").read_text().splitlines()]
    tokenizer = train_tokenizer(texts, root / "tokenizer", vocab_size=512)
    config = tiny_config(
        vocab_size=len(tokenizer),
        num_experts=4,
        moe_projections=["up_proj", "down_proj"],
        max_position_embeddings=256,
        pad_token_id=None,
    )
    path = root / "run" / "final"
    ParameterNetLlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path.parent / "metrics.jsonl").write_text(json.dumps({"step": 1, "lm_loss": 3.5, "val_loss": 3.75}) + "\n")
    return path


def test_eval_command_writes_results_and_table7_layout(checkpoint, tmp_path, capsys):
    main(
        [
            "eval",
            str(checkpoint),
            str(checkpoint),
            "--tasks",
            ",".join(OFFLINE),
            "--limit",
            "12",
            "--output",
            str(tmp_path / "out"),
        ]
    )
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["tasks"] == OFFLINE and len(results["rows"]) == 2
    row = results["rows"][0]
    assert row["name"] == "run" and row["train_loss"] == 3.5 and row["val_loss"] == 3.75
    assert row["params"] > row["active_params"] > 0 and row["flops_per_token"] > 0
    assert set(row["scores"]) == set(OFFLINE) and row["scores"]["pnet_hellaswag"]["metric"] == "acc_norm"
    assert row["average"] == pytest.approx(sum(s["value"] for s in row["scores"].values()) / 3)
    table = (tmp_path / "out" / "table.md").read_text().splitlines()
    assert table[0].startswith("| model | params | active params | GFLOPs/token (seq 256) | train loss | val loss |")
    assert len(table) == 4 and table[2].startswith("| run |") and "| 3.500 | 3.750 |" in table[2]
    assert "table.md" in capsys.readouterr().out


def test_scores_do_not_depend_on_batch_size(checkpoint, tmp_path):
    scores = [
        evaluate([str(checkpoint)], OFFLINE, tmp_path / f"b{size}", batch_size=size, limit=16)[0]["lm_eval"]
        for size in (1, 8)
    ]
    for task in OFFLINE:
        assert scores[0][task]["acc,none"] == scores[1][task]["acc,none"], task
        if "acc_norm,none" in scores[0][task]:
            assert scores[0][task]["acc_norm,none"] == scores[1][task]["acc_norm,none"], task


def test_harness_cli_scores_the_checkpoint_unchanged(checkpoint, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lm_eval",
            "--model",
            "hf",
            "--model_args",
            f"pretrained={checkpoint},trust_remote_code=True",
            "--tasks",
            "pnet_arc,pnet_boolq",
            "--include_path",
            str(TASKS_DIR),
            "--limit",
            "8",
            "--device",
            "cpu",
            "--output_path",
            str(tmp_path / "h"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pnet_arc" in result.stdout and "pnet_boolq" in result.stdout and "acc" in result.stdout
    written = list((tmp_path / "h").rglob("results_*.json"))
    assert written and "pnet_arc" in json.loads(written[0].read_text())["results"]


def test_paper_tasks_offline_fail_fast_with_advice(checkpoint, tmp_path):
    with pytest.raises(EvalError, match="task 'arc_easy' could not load its data.*HF datasets cache.*pnet_arc"):
        evaluate([str(checkpoint)], ["arc_easy", "boolq", "hellaswag"], tmp_path)
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize(
    "checkpoints, tasks, message",
    [
        (["{ckpt}"], ["pnet_arcc"], "unknown task 'pnet_arcc'"),
        (["{ckpt}"], [], "no task given"),
        (["{ckpt}"], ["pnet_arc", "pnet_boolq", "pnet_arc"], "--tasks names pnet_arc more than once"),
        (["{tmp}/missing"], ["pnet_arc"], "missing does not exist"),
        (["{tmp}/empty"], ["pnet_arc"], "empty is not a checkpoint directory: it has no config.json"),
        (["{tmp}/broken"], ["pnet_arc"], "broken/config.json is not valid JSON"),
        (["{tmp}/alien"], ["pnet_arc"], "alien/config.json cannot be read as a config: .*no_such_model"),
        (["{tmp}/config-only"], ["pnet_arc"], "config-only' holds no tokenizer"),
        (["{tmp}/truncated"], ["pnet_arc"], "truncated/model.safetensors is unreadable .*the checkpoint is damaged"),
    ],
)
def test_bad_eval_input_is_named(checkpoint, tmp_path, checkpoints, tasks, message):
    for name, text in {"empty": None, "broken": "{bad", "alien": '{"model_type": "no_such_model"}'}.items():
        (tmp_path / name).mkdir()
        if text is not None:
            (tmp_path / name / "config.json").write_text(text)
    (tmp_path / "config-only").mkdir()
    shutil.copy(checkpoint / "config.json", tmp_path / "config-only")
    shutil.copytree(checkpoint, tmp_path / "truncated")
    with (tmp_path / "truncated" / "model.safetensors").open("r+b") as weights:
        weights.truncate(5000)
    paths = [c.format(ckpt=checkpoint, tmp=tmp_path) for c in checkpoints]
    with pytest.raises(InputError, match=message):
        evaluate(paths, tasks, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_eval_output_that_is_a_file_is_refused_before_scoring(checkpoint, tmp_path):
    (tmp_path / "scores").write_text("mine")
    with pytest.raises(InputError, match="--output .*scores' is a file, not a directory"):
        evaluate([str(checkpoint)], ["pnet_arc"], tmp_path / "scores")
    assert (tmp_path / "scores").read_text() == "mine"


def write_sentiment(path: Path, count: int, seed: int) -> Path:
    rng = random.Random(seed)
    words = {1: ["good", "great", "lovely", "superb"], 0: ["bad", "awful", "dull", "terrible"]}
    filler = ["the", "film", "was", "really", "a", "story", "plot", "quite"]
    rows = ["sentence\tlabel"]
    for _ in range(count):
        label = rng.randrange(2)
        sentence = rng.sample(filler, 4) + [rng.choice(words[label])]
        rng.shuffle(sentence)
        rows.append(f"{' '.join(sentence)}\t{label}")
    path.write_text("\n".join(rows) + "\n")
    return path


def test_finetune_sst2_learns_a_classifier(checkpoint, tmp_path):
    train = write_sentiment(tmp_path / "train.tsv", 320, 0)
    dev = write_sentiment(tmp_path / "dev.tsv", 80, 1)
    result = finetune_sst2(
        str(checkpoint), str(tmp_path / "sst2"), str(train), str(dev), epochs=3, lr=2e-3, batch_size=16
    )
    assert result["validation_accuracy"] >= 0.85 and result["validation_examples"] == 80
    classifier = ParameterNetLlamaForSequenceClassification.from_pretrained(tmp_path / "sst2")
    assert classifier.config.num_labels == 2
    assert json.loads((tmp_path / "sst2" / "sst2_results.json").read_text())["steps"] == result["steps"]


def test_sequence_classification_loss_adds_router_losses():
    model = ParameterNetLlamaForSequenceClassification(tiny_config(num_labels=3, router_z_loss_coef=0.1))
    ids = torch.randint(3, 90, (2, 6))
    labels = torch.tensor([0, 2])
    out = model(input_ids=ids, labels=labels)
    assert out.aux_loss.requires_grad and len(model.routing_stats(out)) == 2
    expected = torch.nn.functional.cross_entropy(out.logits, labels) + 0.01 * out.aux_loss + 0.1 * out.z_loss
    torch.testing.assert_close(out.loss, expected)


def test_sst2_needs_data_it_can_read(tmp_path):
    with pytest.raises(InputError, match="stanfordnlp/sst2.*--train-file"):
        finetune_sst2("unused", str(tmp_path))
    with pytest.raises(InputError, match="does not exist"):
        finetune_sst2("unused", str(tmp_path), str(tmp_path / "a.tsv"), str(tmp_path / "b.tsv"))


def test_pretraining_beats_an_untrained_model_on_an_offline_task(tmp_path):
    """A few minutes of CPU pretraining on the embedded corpus teach what the festivals' next steps are."""
    from parameternet_llm.training.train import run

    recipe = tmp_path / "quick.yaml"
    corpus = tmp_path / "corpus"
    tasks_dir = tmp_path / "tasks"  # the shipped task folder with the questions of the small world trained on
    shutil.copytree(OFFLINE_TASKS_DIR, tasks_dir)
    write_task_data(tasks_dir, seed=0, scale=1)
    recipe.write_text(f"""
base: {REPO / "recipes" / "tiny.yaml"}
output_dir: {tmp_path / "trained"}
model: {{hidden_size: 96, intermediate_size: 256, num_hidden_layers: 2, num_attention_heads: 4}}
data:
  seq_len: 128
  validation_documents: 20
  corpus: {{path: {corpus}, num_tokens: 300000, seed: 0, world_scale: 1}}
  sources:
    - {{name: web, weight: 0.682, files: {corpus}/web/*.jsonl}}
    - {{name: wiki, weight: 0.205, files: {corpus}/wiki/*.jsonl}}
    - {{name: arxiv, weight: 0.114, files: {corpus}/arxiv/*.jsonl}}
tokenizer: {{path: {tmp_path / "tokenizer"}, train: {{vocab_size: 1024, max_documents: 5000}}}}
train: {{max_steps: 120, micro_batch_size: 8, warmup_steps: 10, lr: 3.0e-3, log_every: 60, save_every: 120,
         progress_bar: false}}
eval: {{every: 120, batches: 2}}
""")
    run(str(recipe), [])
    trained = tmp_path / "trained" / "final"
    untrained = tmp_path / "untrained" / "final"
    config = ParameterNetLlamaForCausalLM.from_pretrained(trained).config
    torch.manual_seed(1)
    ParameterNetLlamaForCausalLM(config).save_pretrained(untrained)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (untrained / name).write_bytes((trained / name).read_bytes())
    rows = evaluate([str(trained), str(untrained)], OFFLINE, tmp_path / "scores", offline_tasks_dir=tasks_dir)
    gains = {task: rows[0]["scores"][task]["value"] - rows[1]["scores"][task]["value"] for task in OFFLINE}
    assert max(gains.values()) >= 0.1, gains


def test_a_checkpoint_with_non_finite_weights_is_not_scored(checkpoint, tmp_path):
    diverged = tmp_path / "diverged"
    shutil.copytree(checkpoint, diverged)
    model = ParameterNetLlamaForCausalLM.from_pretrained(diverged)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0, 0] = float("nan")
    model.save_pretrained(diverged)
    with pytest.raises(InputError, match="has non-finite weights .*up_proj.weight"):
        evaluate([str(diverged)], ["pnet_boolq"], tmp_path / "scores")
    assert not (tmp_path / "scores").exists()


def test_inspect_reports_parameters_and_expert_loads_on_a_text(checkpoint, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"The river {i} flows past the town of Kora." for i in range(300)))
    main(["inspect", str(checkpoint), "--text", str(text), "--seq-len", "32"])
    out = capsys.readouterr().out
    assert "routing: 4 experts on up_proj, down_proj in every layer" in out and "active per token" in out
    rows = [line for line in out.splitlines() if line.startswith("| model.layers.")]
    assert len(rows) == 4  # 2 layers x 2 routed projections
    for row in rows:
        shares = [float(x) for x in row.split("|")[2].split()]
        assert len(shares) == 4 and sum(shares) == pytest.approx(100, abs=0.5)
    with pytest.raises(SystemExit, match="is not a file"):
        main(["inspect", str(checkpoint), "--text", str(tmp_path / "missing.txt")])


def test_scoring_offline_tasks_does_not_repeat_lm_evals_custom_kwargs_notice(checkpoint, tmp_path, caplog):
    with caplog.at_level("WARNING"):
        evaluate([str(checkpoint)], ["pnet_boolq"], tmp_path, limit=4)
    assert "Custom kwargs can be passed" not in caplog.text


def test_an_unreachable_hub_switches_hub_tasks_to_the_cache_at_once(checkpoint, tmp_path, monkeypatch):
    from parameternet_llm.evaluation import harness

    switched = []
    monkeypatch.setattr(harness, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(harness, "use_cache_only", lambda: switched.append(True))
    evaluate([str(checkpoint)], ["pnet_boolq"], tmp_path / "offline", limit=2)
    assert switched == []  # the offline tasks need no hub
    with pytest.raises(EvalError, match="task 'arc_easy' could not load its data"):
        evaluate([str(checkpoint)], ["arc_easy"], tmp_path / "hub")
    assert switched == [True]
