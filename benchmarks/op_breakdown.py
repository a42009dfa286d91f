"""Where ParameterNet's training step spends the time its dense twin does not, op by op, on the CPU.

    python benchmarks/op_breakdown.py                  # cpu-small, batch 8 x 256, 8 experts on gate+up+down
    python benchmarks/op_breakdown.py --shapes --top 40 --warmup 40   # routers near balance first

Both models' training steps (forward, backward and fused AdamW, as in `parameternet-llm bench train`)
run interleaved in one process with every op (aten's and the package's compiled ones) timed under a
dispatch mode. Prints each op's ms per step for dense and ParameterNet and the difference, largest
either way first (`--shapes`: per op and output shape), then one JSON line. The timer's own Python runs
between the ops, so a timed step is slower than a plain one but each op's time is its own; the ops run
on the CPU, where an op's wall time is its cost. Python and autograd work outside the ops is not
counted.
"""

import argparse
import json
import time
from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from parameternet_llm.bench import training_step, twin_configs, twin_models
from parameternet_llm.configuration_parameternet_llama import MOE_PROJECTIONS


class OpTimer(TorchDispatchMode):
    """Wall seconds and calls of every aten op run under it, keyed by op name (and output shape)."""

    def __init__(self, by_shape: bool):
        super().__init__()
        self.by_shape = by_shape
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        elapsed = time.perf_counter() - start
        key = func.overloadpacket.__name__
        if func.namespace != "aten":
            key = f"{func.namespace}::{key}"
        if self.by_shape and isinstance(out, torch.Tensor):
            key += f" {list(out.shape)}"
        self.seconds[key] += elapsed
        self.calls[key] += 1
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (the routers balance as they train)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--top", type=int, default=25, help="ops shown, largest difference (either way) first")
    parser.add_argument("--shapes", action="store_true", help="one row per op and output shape")
    args = parser.parse_args()
    torch.manual_seed(0)
    dense_config, routed_config = twin_configs("cpu-small", 8, list(MOE_PROJECTIONS), "auto", args.seq_len)
    ids = torch.randint(0, dense_config.vocab_size, (args.batch_size, args.seq_len))
    models = twin_models(dense_config, routed_config, torch.device("cpu"), torch.float32)
    steps = {name: training_step(model, ids) for name, model in models.items()}
    timers = {name: OpTimer(args.shapes) for name in steps}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    for _ in range(args.rounds):
        for name, step in steps.items():
            with timers[name]:
                step()

    ms = {name: {key: 1e3 * s / args.rounds for key, s in timer.seconds.items()} for name, timer in timers.items()}
    calls = {name: {key: n // args.rounds for key, n in timer.calls.items()} for name, timer in timers.items()}
    totals = {name: sum(values.values()) for name, values in ms.items()}
    keys = sorted(set(ms["dense"]) | set(ms["parameternet"]),
                  key=lambda key: -abs(ms["parameternet"].get(key, 0.0) - ms["dense"].get(key, 0.0)))[:args.top]
    print(f"ops of one training step (cpu-small, batch {args.batch_size} x {args.seq_len}, 8 experts on "
          f"gate+up+down, fused AdamW), ms per step over {args.rounds} rounds, {torch.get_num_threads()} threads")
    print("| op | dense ms (calls) | ParameterNet ms (calls) | difference |")
    print("|---|---|---|---|")
    for key in keys:
        dense, routed = ms["dense"].get(key, 0.0), ms["parameternet"].get(key, 0.0)
        print(f"| {key} | {dense:.2f} ({calls['dense'].get(key, 0)}) | {routed:.2f} "
              f"({calls['parameternet'].get(key, 0)}) | {routed - dense:+.2f} |")
    print(f"| all ops | {totals['dense']:.1f} | {totals['parameternet']:.1f} | "
          f"{totals['parameternet'] - totals['dense']:+.1f} |")
    print(json.dumps({"breakdown": "train", "batch": [args.batch_size, args.seq_len], "warmup": args.warmup,
                      "rounds": args.rounds, "ms_per_step": totals,
                      "ops": {key: [ms["dense"].get(key, 0.0), ms["parameternet"].get(key, 0.0)] for key in keys}}))


if __name__ == "__main__":
    main()
