"""Switch load balancing over the global batch (`train.router_aux_loss_scope: global`).

The model's own auxiliary loss balances each micro-batch on its own tokens: E * sum_e f_e * P_e with f the share
of the micro-batch's tokens whose top-1 is e and P their mean probability for e. Balancing on statistics of the
global batch (every data-parallel rank and every accumulation micro-batch of an optimizer step) constrains the
routers less and lets experts specialise (Qiu et al. 2025, arXiv 2501.11873). Here f comes from a forward
without gradients over the step's micro-batches, summed over ranks, and each micro-batch contributes its share of
the global P, so the gradients of a step equal those of the loss formed once over the whole global batch.
"""

import torch

from ..modeling_parameternet_llama import one_hot


def expert_counts(routing) -> tuple[torch.Tensor, torch.Tensor]:
    """([R, E] tokens whose top-1 is each expert, in every routed linear; number of valid tokens)."""
    counts = torch.stack(
        [(one_hot(r.expert, r.probs.shape[-1]) & r.valid.unsqueeze(1)).sum(0) for r in routing]
    ).float()
    return counts, routing[0].valid.sum().float()


def global_aux_loss(routing, shares: torch.Tensor, total_tokens: torch.Tensor, scale: float) -> torch.Tensor:
    """This micro-batch's part of E * sum_e f_e * P_e over the global batch, averaged over the routed linears and
    multiplied by `scale` (ranks x accumulation steps, which the averaging of gradients and of the accumulated loss
    divides out again). `shares` [R, E] are the global f, `total_tokens` the global batch's valid tokens."""
    probability_sums = torch.stack([(r.probs * r.valid.unsqueeze(1)).sum(0) for r in routing])  # [R, E]
    num_experts = shares.shape[-1]
    per_linear = num_experts * (shares * probability_sums).sum(-1) / total_tokens
    return scale * per_linear.mean()
