"""Global-batch load balancing: 2 processes x 2 accumulation steps, 1 process x 4 micro-batches and one forward
over the whole batch give the same auxiliary loss and router gradients; and a run with the option trains."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from parameternet_llm import ParameterNetLlamaForCausalLM
from parameternet_llm.modeling_parameternet_llama import routing_summary

ROUTING = dict(num_experts=4, moe_projections=["up_proj", "down_proj"], capacity_factor=None)
WORKER = textwrap.dedent(
    """
    import json, sys, torch, torch.distributed as dist
    from conftest import tiny_config
    from parameternet_llm import ParameterNetLlamaForCausalLM
    from parameternet_llm.training.balance import expert_counts, global_aux_loss

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = ParameterNetLlamaForCausalLM(tiny_config(**json.loads(sys.argv[1])))
    batches = torch.load(sys.argv[2])[rank::world]  # this process's micro-batches of the global batch
    counts = tokens = 0
    with torch.no_grad():
        for batch in batches:
            batch_counts, batch_tokens = expert_counts(model(batch).routing)
            counts, tokens = counts + batch_counts, tokens + batch_tokens
    dist.all_reduce(counts)
    dist.all_reduce(tokens)
    total = 0.0
    for batch in batches:  # accumulation: each micro-batch's loss divided by the steps, gradients averaged over ranks
        aux = global_aux_loss(model(batch).routing, counts / tokens, tokens, world * len(batches))
        (aux / len(batches)).backward()
        total += aux.item() / len(batches)
    for parameter in model.parameters():
        if parameter.grad is not None:
            dist.all_reduce(parameter.grad)
            parameter.grad /= world
    loss = torch.tensor(total)
    dist.all_reduce(loss)
    grads = {name: p.grad.tolist() for name, p in model.named_parameters() if name.endswith("router.weight")}
    if rank == 0:
        print(json.dumps({"aux": loss.item() / world, "grads": grads}))
    dist.destroy_process_group()
    """
)


@pytest.mark.parametrize("processes", [1, 2])
def test_global_balance_does_not_depend_on_the_process_and_accumulation_layout(tmp_path, processes):
    batches = torch.randint(3, 90, (4, 2, 12), generator=torch.Generator().manual_seed(1))
    torch.save(batches, tmp_path / "batches.pt")
    (tmp_path / "worker.py").write_text(WORKER)
    torch.manual_seed(0)
    model = ParameterNetLlamaForCausalLM(tiny_config(**ROUTING))
    aux, _, _, _ = routing_summary(list(model(batches.flatten(0, 1)).routing))  # one forward, the whole batch
    aux.mean().backward()
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
        + [str(tmp_path / "worker.py"), json.dumps(ROUTING), str(tmp_path / "batches.pt")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)},  # the worker imports conftest
    )
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["aux"] == pytest.approx(aux.mean().item(), rel=1e-5)
    for name, parameter in model.named_parameters():
        if name.endswith("router.weight"):
            torch.testing.assert_close(torch.tensor(got["grads"][name]), parameter.grad, rtol=1e-4, atol=1e-7)


def test_a_run_balances_on_the_global_batch(small_world, tmp_path):
    from parameternet_llm.training.train import run

    _, recipes = small_world
    overrides = ["train.max_steps=4", "train.gradient_accumulation_steps=2", "train.router_aux_loss_scope=global"]
    run(str(recipes["tiny"]), [f"output_dir={tmp_path}", *overrides])
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2, 4]
    assert all(1.0 - 1e-4 <= m["aux_loss"] < 1.5 and m["loss"] > m["lm_loss"] for m in metrics)
