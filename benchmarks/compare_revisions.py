"""This tree's ParameterNet against another git revision's, both against dense, timed in one process.

    python benchmarks/compare_revisions.py REV                 # training step, cpu-small, batch 8 x 256
    python benchmarks/compare_revisions.py REV --part mlp --shift 0.3
    python benchmarks/compare_revisions.py REV --part decode     # batch-1 greedy generate, 128 new tokens

The revision's model files are loaded from git into a temporary package, so the two dispatches run
interleaved on the same machine state with the same weights: paired ratios of a few percent hold
here where separate `bench` runs drift by more. `--part mlp` times one MLP forward + backward on
2048 tokens whose hidden states share a random offset of size `--shift` (0: balanced routing, no
dropped tokens; 0.3: about 10-15% dropped at capacity 1.25); `--part decode` times batch-1 greedy decoding as
`parameternet-llm bench decode` does. Ends with one JSON line.
"""

import argparse
import importlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers.models.llama.modeling_llama import LlamaMLP

from parameternet_llm import modeling_parameternet_llama
from parameternet_llm.bench import (
    device_and_dtype,
    greedy_decode,
    interleaved_times,
    medians,
    paired_ratio,
    training_step,
    twin_configs,
    twin_models,
)
from parameternet_llm.configuration_parameternet_llama import MOE_PROJECTIONS

MODEL_FILES = ("configuration_parameternet_llama.py", "modeling_parameternet_llama.py")


def load_revision(revision: str, directory: Path):
    """The modeling module of `revision`, imported from a package written under `directory`."""
    package = directory / "revision_model"
    package.mkdir()
    (package / "__init__.py").write_text("")
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True)
    for name in MODEL_FILES:
        source = subprocess.run(["git", "show", f"{revision}:parameternet_llm/{name}"], cwd=root.stdout.strip(),
                                capture_output=True, text=True)
        if source.returncode:
            raise SystemExit(f"Cannot read parameternet_llm/{name} at revision {revision!r}: {source.stderr.strip()}")
        (package / name).write_text(source.stdout)
    sys.path.insert(0, str(directory))
    return importlib.import_module("revision_model.modeling_parameternet_llama")


def twin_and_revision_models(old, device, dtype, seq_len):
    """Dense, this tree's ParameterNet and the revision's with the same weights (cpu-small, 8 experts on
    gate+up+down), and the dense config."""
    dense_config, routed_config = twin_configs("cpu-small", 8, list(MOE_PROJECTIONS), "auto", seq_len)
    models = twin_models(dense_config, routed_config, device, dtype)
    models["this tree"] = models.pop("parameternet")
    with device:
        models["revision"] = old.ParameterNetLlamaForCausalLM(routed_config).to(dtype)
    models["revision"].load_state_dict(models["this tree"].state_dict())
    return models, dense_config


def model_steps(old, device, dtype, batch_size=8, seq_len=256):
    models, dense_config = twin_and_revision_models(old, device, dtype, seq_len)
    ids = torch.randint(0, dense_config.vocab_size, (batch_size, seq_len), device=device)
    return {name: training_step(model, ids) for name, model in models.items()}


def decode_runs(old, device, dtype, prompt_len=32, new_tokens=128):
    models, dense_config = twin_and_revision_models(old, device, dtype, prompt_len + new_tokens)
    prompt = torch.randint(3, dense_config.vocab_size, (1, prompt_len), device=device)
    return {name: greedy_decode(model, prompt, new_tokens) for name, model in models.items()}


def mlp_steps(old, device, dtype, shift: float, tokens=2048):
    dense_config, routed_config = twin_configs("cpu-small", 8, list(MOE_PROJECTIONS), "auto", 256)
    with device:
        mlps = {"dense": LlamaMLP(dense_config),
                "this tree": modeling_parameternet_llama.ParameterNetLlamaMLP(routed_config, 0),
                "revision": old.ParameterNetLlamaMLP(routed_config, 0)}
        x = torch.randn(tokens, dense_config.hidden_size) + shift * torch.randn(dense_config.hidden_size)
        upstream = torch.randn(tokens, dense_config.hidden_size)
    mlps["revision"].load_state_dict(mlps["this tree"].state_dict())
    x = x.to(dtype).requires_grad_()
    steps = {}
    for name, mlp in mlps.items():
        mlp.to(dtype).train()

        def step(mlp=mlp):
            loss = (mlp(x) * upstream).sum()
            for projection in getattr(mlp, "routed_projections", []):
                loss = loss + getattr(mlp, projection).routing.aux_loss
            loss.backward()
            mlp.zero_grad(set_to_none=True)
            x.grad = None

        steps[name] = step
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("revision", help="git revision to compare with, e.g. HEAD~1 or a commit id")
    parser.add_argument("--part", choices=["model", "mlp", "decode"], default="model")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--shift", type=float, default=0.0, help="common offset of the MLP's input (--part mlp)")
    args = parser.parse_args()
    torch.manual_seed(0)
    device, dtype = device_and_dtype()
    with tempfile.TemporaryDirectory() as directory:
        old = load_revision(args.revision, Path(directory))
        if args.part == "model":
            steps = model_steps(old, device, dtype)
        elif args.part == "decode":
            steps = decode_runs(old, device, dtype)
        else:
            steps = mlp_steps(old, device, dtype, args.shift)
        times = interleaved_times(steps, device, warmup=2, repeats=args.rounds)
    seconds = medians(times)
    timed = {"model": "training step (forward, backward, AdamW)", "mlp": "mlp forward + backward",
             "decode": "batch-1 greedy decode, prompt 32, 128 new tokens"}[args.part]
    print(f"{timed}, {args.rounds} rounds, {dtype}")
    print("| what | median | paired vs dense |")
    print("|---|---|---|")
    for name, value in seconds.items():
        print(f"| {name} | {1e3 * value:.2f} ms | {paired_ratio(times, name, 'dense'):.3f}x |")
    speedup = paired_ratio(times, "revision", "this tree")
    print(f"this tree is {speedup:.3f}x as fast as {args.revision} (median of each round's ratio)")
    print(json.dumps({"compare": args.revision, "part": args.part, "shift": args.shift, "rounds": args.rounds,
                      "ms": {name: 1e3 * value for name, value in seconds.items()}, "speedup": speedup}))


if __name__ == "__main__":
    main()
