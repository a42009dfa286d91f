"""How each upcycling init keeps a dense checkpoint's function at step 0: validation loss against the dense
model's, and the routing's balance (the share of tokens Switch's training capacity factor would drop).

    python benchmarks/upcycling_init.py                       # the dense model of recipes/tiny-dense.yaml
    python benchmarks/upcycling_init.py --recipe R --checkpoint DIR --experts 8

The checkpoint is scored on its recipe's validation blocks, in its recipe's micro-batches; every init is
built in memory from the dense safetensors as `parameternet-llm upcycle` writes it. Prints a markdown table.
"""

import argparse

from transformers import AutoModelForCausalLM

from parameternet_llm.demo.run import routing_diagnostics, validation_blocks, validation_loss
from parameternet_llm.training.recipe import load_recipe
from parameternet_llm.upcycling import UpcycleOptions, read_dense_config, upcycled_config, upcycled_model

PROJECTION_SETS = {"up_proj": ["up_proj"], "gate+up+down": ["gate_proj", "up_proj", "down_proj"]}
INITS = {
    "copies, straight-through (default)": ("straight_through", UpcycleOptions()),
    "copies, noise 0.01, straight-through": ("straight_through", UpcycleOptions(expert_noise=0.01)),
    "Drop-Upcycling 0.5, straight-through": ("straight_through", UpcycleOptions(drop_fraction=0.5)),
    "copies, probability scale": ("probability", UpcycleOptions()),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/tiny-dense.yaml", help="the recipe the checkpoint was trained by")
    parser.add_argument("--checkpoint", default="runs/tiny-dense/final", help="dense LLaMA checkpoint directory")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--capacity-factor", type=float, default=1.25, help="for the dropped share")
    args = parser.parse_args()

    recipe = load_recipe(args.recipe)
    validation = validation_blocks(recipe)
    batch = recipe["train"]["micro_batch_size"]
    dense_loss = validation_loss(AutoModelForCausalLM.from_pretrained(args.checkpoint), validation, batch)
    print(f"dense {args.checkpoint}: validation loss {dense_loss:.4f} ({len(validation)} blocks)\n")
    print(f"| routed ({args.experts} experts) | init | val loss | / dense | dropped at {args.capacity_factor} |")
    print("|---|---|---|---|---|")
    dense_config = read_dense_config(args.checkpoint)
    for projections_name, projections in PROJECTION_SETS.items():
        for init_name, (scale, options) in INITS.items():
            config = upcycled_config(
                dense_config, num_experts=args.experts, moe_projections=projections, expert_scale=scale
            )
            model = upcycled_model(args.checkpoint, config, options)
            loss = validation_loss(model, validation, batch)
            dropped = routing_diagnostics(model, validation, batch, args.capacity_factor)["dropped_at_capacity"]
            print(
                f"| {projections_name} | {init_name} | {loss:.4f} | {loss / dense_loss:.4f} | {100 * dropped:.1f}% |",
                flush=True,
            )


if __name__ == "__main__":
    main()
