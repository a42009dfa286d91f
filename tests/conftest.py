import os
import textwrap
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from parameternet_llm import ParameterNetLlamaConfig, RoutedLinear  # noqa: E402
from parameternet_llm.demo.corpus import generate_corpus  # noqa: E402
from parameternet_llm.kernels import reference_only  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

TINY_SHAPE = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_config(**overrides) -> ParameterNetLlamaConfig:
    """A two-layer ParameterNet-LLaMA small enough for exact fp32 checks on a CPU."""
    return ParameterNetLlamaConfig(**{**TINY_SHAPE, **overrides})


def routed_linear(in_features: int, out_features: int, **routing) -> RoutedLinear:
    """A RoutedLinear with the routing fields of `ParameterNetLlamaConfig` given in `routing`."""
    return RoutedLinear(ParameterNetLlamaConfig(**routing), in_features, out_features)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def strict_grouped_mm(monkeypatch):
    """`F.grouped_mm` held to its contract past the last group end: rows there belong to no group, so they are
    made NaN in its input (they must not count) and in its output (it leaves them undefined). A dispatch that
    left rows outside the groups would then fail its comparison instead of passing on zeroed memory."""
    grouped_mm = torch.nn.functional.grouped_mm

    def strict(mat_a, mat_b, offs, **kwargs):
        end = int(offs[-1])
        mat_a = mat_a.clone()
        if mat_b.dim() == 3:  # [T, in] x [E, in, out]: groups of rows
            mat_a[end:] = float("nan")
            out = grouped_mm(mat_a, mat_b, offs=offs, **kwargs)
            out[end:] = float("nan")
            return out
        mat_b = mat_b.clone()  # [in, T] x [T, out]: groups along the reduced dimension
        mat_a[:, end:] = float("nan")
        mat_b[end:] = float("nan")
        return grouped_mm(mat_a, mat_b, offs=offs, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "grouped_mm", strict)


@pytest.fixture(params=["plug-ins", "reference"])
def dispatch(request):
    """Each way the package's model runs in turn: with the plug-ins importing the package registered, then the
    reference path alone, as a checkpoint loaded without the package runs."""
    if request.param == "reference":
        with reference_only():
            yield request.param
    else:
        yield request.param


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
    """A small corpus and recipes that train the repo's tiny recipes on it in seconds."""
    root = tmp_path_factory.mktemp("pretrain")
    corpus = generate_corpus(root / "corpus", num_tokens=150_000, seed=0)
    recipes = {}
    for name in ("tiny", "tiny-dense"):
        recipe = root / f"{name}.yaml"
        recipe.write_text(
            textwrap.dedent(f"""
            base: {REPO / "recipes" / (name + ".yaml")}
            output_dir: {root / "runs" / name}
            model: {{hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 2}}
            data:
              seq_len: 64
              validation_documents: 20
              corpus: {{path: {corpus}, num_tokens: 150000, seed: 0}}
              sources:
                - {{name: web, weight: 0.682, files: {corpus}/web/*.jsonl}}
                - {{name: wiki, weight: 0.205, files: {corpus}/wiki/*.jsonl}}
                - {{name: arxiv, weight: 0.114, files: {corpus}/arxiv/*.jsonl}}
            tokenizer: {{path: {root / "tokenizer"}, train: {{vocab_size: 512, max_documents: 2000}}}}
            train: {{max_steps: 12, micro_batch_size: 4, warmup_steps: 2, log_every: 2, save_every: 4,
                     keep_checkpoints: 2, progress_bar: false}}
            eval: {{every: 6, batches: 2}}
        """)
        )
        recipes[name] = recipe
    return root, recipes
