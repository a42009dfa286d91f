"""Where ParameterNet's training step spends the time its dense twin does not, op by op.

    python benchmarks/op_breakdown.py                  # CPU: cpu-small, batch 8 x 256, 8 experts on gate+up+down
    python benchmarks/op_breakdown.py --shapes --top 40 --warmup 40   # routers near balance first
    python benchmarks/op_breakdown.py --top 40         # GPU: llama-1b, batch 8 x 2048, bf16

Both models' training steps (forward, backward and fused AdamW, as in `parameternet-llm bench train`)
run interleaved in one process, each op timed, and the script prints each op's ms per step for dense
and ParameterNet and the difference, largest either way first, then one JSON line. On the CPU every op
(aten's and the package's compiled ones) is timed under a dispatch mode (`--shapes`: per op and output
shape): the timer's own Python runs between the ops, so a timed step is slower than a plain one but
each op's wall time is its own cost; Python and autograd work outside the ops is not counted. On a GPU
(or with `--profiler`) torch.profiler gives each op's self time: on the GPU, that of the kernels the op
launched (`--shapes`: per op and input shapes).
"""

import argparse
import json
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from parameternet_llm.bench import device_and_dtype, synchronize, training_step, twin_configs, twin_models
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


class ProfiledTimes:
    """Self seconds and calls of every op run under it, from torch.profiler: on CUDA the GPU time of the
    kernels each op launched, on the CPU the op's own CPU time; keyed by op name (and input shapes)."""

    def __init__(self, by_shape: bool, device: torch.device):
        self.by_shape = by_shape
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def __enter__(self):
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self.profiler = profile(activities=activities, record_shapes=self.by_shape)
        self.profiler.__enter__()

    def __exit__(self, *exc_info):
        synchronize(self.device)
        self.profiler.__exit__(*exc_info)
        for event in self.profiler.key_averages(group_by_input_shape=self.by_shape):
            microseconds = event.self_device_time_total if self.device.type == "cuda" else event.self_cpu_time_total
            if microseconds > 0:
                key = f"{event.key} {event.input_shapes}" if self.by_shape else event.key
                self.seconds[key] += microseconds / 1e6
                self.calls[key] += event.count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, help="default: 2048 on a GPU, 256 on the CPU")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (the routers balance as they train)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--top", type=int, default=25, help="ops shown, largest difference (either way) first")
    parser.add_argument("--shapes", action="store_true", help="one row per op and its shapes")
    parser.add_argument("--profiler", action="store_true", help="torch.profiler's self times on the CPU too")
    args = parser.parse_args()
    device, dtype = device_and_dtype()
    shape = "llama-1b" if device.type == "cuda" else "cpu-small"
    seq_len = args.seq_len or (2048 if device.type == "cuda" else 256)
    torch.manual_seed(0)
    dense_config, routed_config = twin_configs(shape, 8, list(MOE_PROJECTIONS), "auto", seq_len)
    ids = torch.randint(0, dense_config.vocab_size, (args.batch_size, seq_len), device=device)
    models = twin_models(dense_config, routed_config, device, dtype)
    steps = {name: training_step(model, ids) for name, model in models.items()}
    profiled = args.profiler or device.type == "cuda"
    timers = {name: ProfiledTimes(args.shapes, device) if profiled else OpTimer(args.shapes) for name in steps}
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
    keys = sorted(
        set(ms["dense"]) | set(ms["parameternet"]),
        key=lambda key: -abs(ms["parameternet"].get(key, 0.0) - ms["dense"].get(key, 0.0)),
    )[: args.top]
    timing = "torch.profiler self times" if profiled else "dispatch-mode wall times"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"ops of one training step ({shape}, batch {args.batch_size} x {seq_len}, 8 experts on gate+up+down, "
        f"fused AdamW, {dtype}), ms per step over {args.rounds} rounds, {timing}, {where}"
    )
    print("| op | dense ms (calls) | ParameterNet ms (calls) | difference |")
    print("|---|---|---|---|")
    for key in keys:
        dense, routed = ms["dense"].get(key, 0.0), ms["parameternet"].get(key, 0.0)
        print(
            f"| {key} | {dense:.2f} ({calls['dense'].get(key, 0)}) | {routed:.2f} "
            f"({calls['parameternet'].get(key, 0)}) | {routed - dense:+.2f} |"
        )
    print(
        f"| all ops | {totals['dense']:.1f} | {totals['parameternet']:.1f} | "
        f"{totals['parameternet'] - totals['dense']:+.1f} |"
    )
    print(
        json.dumps(
            {
                "breakdown": "train",
                "device": where,
                "timing": timing,
                "shape": shape,
                "batch": [args.batch_size, seq_len],
                "warmup": args.warmup,
                "rounds": args.rounds,
                "ms_per_step": totals,
                "ops": {key: [ms["dense"].get(key, 0.0), ms["parameternet"].get(key, 0.0)] for key in keys},
            }
        )
    )


if __name__ == "__main__":
    main()
