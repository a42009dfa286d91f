"""transformers' own common model tests (`ModelTesterMixin` of the installed transformers version, read from its
source distribution on PyPI) on the three ParameterNet classes, through a Llama-shaped tester.

Two common tests are left out, each for a reason of its own: `test_model_weights_reload_no_missing_tied_weights`
loads a checkpoint with no weights at all, which the ParameterNet classes refuse by design (they never
initialise expert or router tensors at random), and `test_generation_tester_mixin_inheritance` checks for
`GenerationTesterMixin`, whose file the source distribution does not ship (generation is tested in
test_model.py instead). The same holds for the export tests' mixin.
"""

import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
import transformers

LEFT_OUT = ("test_model_weights_reload_no_missing_tied_weights", "test_generation_tester_mixin_inheritance")

TESTER = textwrap.dedent(
    """
    import unittest

    from transformers.models.auto import modeling_auto
    from transformers.testing_utils import require_torch

    from parameternet_llm import (
        ParameterNetLlamaConfig,
        ParameterNetLlamaForCausalLM,
        ParameterNetLlamaForSequenceClassification,
        ParameterNetLlamaModel,
    )

    from ...test_modeling_common import ModelTesterMixin, ids_tensor, random_attention_mask

    # The common tests read these mappings (a base model, for one, is not trained), which list transformers' models.
    modeling_auto.MODEL_MAPPING_NAMES["parameternet_llama"] = "ParameterNetLlamaModel"
    modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES["parameternet_llama"] = "ParameterNetLlamaForCausalLM"
    modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES["parameternet_llama"] = (
        "ParameterNetLlamaForSequenceClassification"
    )


    class ParameterNetModelTester:
        def __init__(self, parent, batch_size=13, seq_length=7, vocab_size=99, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, intermediate_size=40, num_labels=3):
            self.parent = parent
            self.batch_size, self.seq_length, self.is_training = batch_size, seq_length, True
            self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
            self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
            self.num_key_value_heads, self.num_labels = num_key_value_heads, num_labels

        def get_config(self):
            return ParameterNetLlamaConfig(
                vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                num_key_value_heads=self.num_key_value_heads, max_position_embeddings=64, pad_token_id=0,
                num_labels=self.num_labels, num_experts=4, moe_projections=["gate_proj", "up_proj", "down_proj"],
            )

        def prepare_config_and_inputs_for_common(self):
            input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
            attention_mask = random_attention_mask([self.batch_size, self.seq_length])
            return self.get_config(), {"input_ids": input_ids, "attention_mask": attention_mask}


    @require_torch
    class ParameterNetModelTest(ModelTesterMixin, unittest.TestCase):
        all_model_classes = (
            ParameterNetLlamaModel, ParameterNetLlamaForCausalLM, ParameterNetLlamaForSequenceClassification
        )
        test_all_params_have_gradient = False  # experts no token chose get no gradient

        def setUp(self):
            self.model_tester = ParameterNetModelTester(self)
    """
)


@pytest.fixture(scope="session")
def common_tests(tmp_path_factory) -> Path:
    """A `tests` package holding the installed transformers' test_modeling_common.py, from its sdist on PyPI
    (cached under ~/.cache/parameternet_llm), with stand-ins for the two mixin files the sdist lacks."""
    version = transformers.__version__
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "parameternet_llm"
    source = cache / f"transformers-{version}-test_modeling_common.py"
    if not source.exists():
        download = tmp_path_factory.mktemp("sdist")
        pip = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                "--quiet",
                "--dest",
                str(download),
                f"transformers=={version}",
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert pip.returncode == 0, f"could not download transformers {version}'s sdist from PyPI: {pip.stderr[-2000:]}"
        (archive,) = download.glob("transformers-*.tar.gz")
        with tarfile.open(archive) as sdist:
            member = sdist.extractfile(f"transformers-{version}/tests/test_modeling_common.py")
            cache.mkdir(parents=True, exist_ok=True)
            source.write_bytes(member.read())
    root = tmp_path_factory.mktemp("common") / "tests"
    for package, stand_in in {
        "": None,
        "exporters": "class ExportTesterMixin:\n    pass\n",
        "generation": "class GenerationTesterMixin:\n    pass\n",
        "models": None,
        "models/parameternet": None,
    }.items():
        (root / package).mkdir(parents=True, exist_ok=True)
        (root / package / "__init__.py").touch()
        if stand_in:
            name = "test_export.py" if package == "exporters" else "test_utils.py"
            (root / package / name).write_text(stand_in)
    (root / "test_modeling_common.py").write_bytes(source.read_bytes())
    (root / "models" / "parameternet" / "test_modeling_parameternet.py").write_text(TESTER)
    return root


def test_transformers_common_model_tests_pass(common_tests):
    deselect = " and ".join(f"not {name}" for name in LEFT_OUT)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-W",
            "ignore",
            "-k",
            deselect,
            "tests/models/parameternet",
        ],
        capture_output=True,
        text=True,
        cwd=common_tests.parent,
        timeout=900,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    summary = run.stdout.strip().splitlines()[-1]
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-2000:]
    passed = int(summary.split(" passed")[0].split()[-1])
    assert passed >= 100 and "failed" not in summary, summary
