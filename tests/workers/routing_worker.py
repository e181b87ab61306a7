"""Rank worker for tests/test_routing_distributed.py: trains a tiny AdaMix BERT under DDP (gloo) and
reports, from rank 0, what every rank routed and what the gradients and optimizer steps did."""

import json
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from adamix_ds import AdaMixConfig, ExpertStepGuard, TorchOptimizerAccess, adamix_loss, add_adamix
from adamix_ds.model import adamix_layers
from adamix_ds.routing import Projection

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from tiny_models import tiny_classifier, token_batch  # noqa: E402


def run(seed: int, steps: int) -> dict:
    rank = dist.get_rank()
    torch.manual_seed(0)  # same init on every rank; routing seed is the config's
    model = add_adamix(tiny_classifier("bert"), AdaMixConfig(bottleneck_dim=4, num_experts=4, share_up=False, seed=seed)).train()
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    guard = ExpertStepGuard(model, TorchOptimizerAccess(optimizer))
    layers = [layer for _, layer in adamix_layers(model)]
    routes, exact_zero, untouched = [], True, True
    ever_chosen = {(i, p): set() for i in range(len(layers)) for p in Projection}
    ever_grad = {(i, p): set() for i in range(len(layers)) for p in Projection}
    for step in range(steps):
        adamix_loss(ddp, token_batch(seed=1000 * rank + step), consistency_weight=1.0).loss.backward()
        step_routes = []
        before = {}
        for i, layer in enumerate(layers):
            for projection in Projection:
                used = sorted(layer.routed[projection])
                step_routes.append(used)
                ever_chosen[(i, projection)].update(used)
                for param in layer.projection_parameters(projection):
                    per_expert = param.grad.flatten(1).abs().sum(1)
                    ever_grad[(i, projection)].update(k for k in range(len(per_expert)) if per_expert[k] > 0)
                    exact_zero &= all(per_expert[k] == 0 for k in range(len(per_expert)) if k not in used)
                    before[id(param)] = (param.detach().clone(), used)
        routes.append(step_routes)
        guard.step(optimizer.step)
        optimizer.zero_grad()
        for layer in layers:
            for projection in Projection:
                for param in layer.projection_parameters(projection):
                    old, used = before[id(param)]
                    untouched &= all(torch.equal(param[k], old[k]) for k in range(param.shape[0]) if k not in used)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, routes)
    return {
        "routes_equal": all(r == everyone[0] for r in everyone),
        "routes": routes,
        "unchosen_exact_zero_grad": bool(exact_zero),
        "unchosen_unchanged": bool(untouched),
        "every_expert_chosen": all(len(v) == 4 for v in ever_chosen.values()),
        "every_expert_got_gradient": all(len(v) == 4 for v in ever_grad.values()),
    }


def main() -> None:
    output, steps = sys.argv[1], int(sys.argv[2])
    dist.init_process_group("gloo")
    results = {str(seed): run(seed, steps) for seed in (0, 1)}
    if dist.get_rank() == 0:
        with open(output, "w") as f:
            json.dump({"world_size": dist.get_world_size(), **results}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
