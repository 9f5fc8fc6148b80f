"""FedAvg in one process, without Flower: a quick way to compare federated recipes (issue 10).

    .venv/bin/python benchmarks/fed_emulation.py sites/polyp/federation_cpu.yaml [--rounds 12]
        [--local-epochs 1] [--mu 0.0] [--keep-optimizer] [--server-momentum 0.9]
        [--extra-validation DATASET:STEMS_FILE ...] [--device auto] [--json out.json]

Every round, each site of the federation YAML trains the global trainable state with the project's
own :class:`autosam_core.training.SiteTrainer` (seed = federation seed + round, as ``client.app``
does), the states are averaged with :func:`server.aggregation.weighted_average` weighted by each
site's num-examples (FedAvg, McMahan et al. 2017, eq. of Algorithm 1), and the global model is
validated on the sites' held-out splits (image-weighted mean Dice, as the server's federated
evaluation; ``--extra-validation`` scores more held-out images, never test images, every round).
``--keep-optimizer``: every site keeps its Adam moments across rounds (``optimizer_state: keep``, in
memory); ``--server-momentum``: FedAvgM on g's parameters (server lr 1; Hsu et al. 2019). The best
round on validation is then evaluated once on the federation's ``evaluate`` list (test splits:
reported, never used to choose). Sites share one SAM and one model object; what this leaves out
of a real federation is only transport (Flower messages, wire dtype float32).

Prints one JSON object: per-round validation Dice and loss per site, the best round, its test Dice
per benchmark, and wall seconds. Use it on a GPU machine to explore budgets in minutes; numbers
for the project's claims come from ``autosam simulate`` on the target machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autosam_core.config import DataRef, FederationConfig, SiteConfig, load_yaml_config  # noqa: E402
from autosam_core.data.dataset import resolve_pairs  # noqa: E402
from autosam_core.evaluation import CentralEvaluator, evaluate_pairs, image_weighted_mean  # noqa: E402
from autosam_core.model_factory import build_autosam  # noqa: E402
from autosam_core.training import SiteTrainer  # noqa: E402
from server.aggregation import weighted_average  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("federation")
    ap.add_argument("--rounds", type=int, help="override the YAML's rounds")
    ap.add_argument("--local-epochs", type=int, help="override every site's local_epochs")
    ap.add_argument("--mu", type=float, default=0.0, help="FedProx proximal term (0 = FedAvg)")
    ap.add_argument("--seed", type=int, help="override the YAML's seed (g's initialisation, data order)")
    ap.add_argument("--keep-optimizer", action="store_true",
                    help="every site keeps its Adam moments across rounds, in memory (optimizer_state: keep)")
    ap.add_argument("--server-momentum", type=float, default=0.0,
                    help="FedAvgM server momentum beta on g's parameters (Hsu et al. 2019; 0 = FedAvg)")
    ap.add_argument("--extra-validation", nargs="*", default=[], metavar="DATASET:STEMS_FILE",
                    help="more held-out validation images (never test images), reported per round")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args()
    fed_path = Path(args.federation).resolve()
    fed = load_yaml_config(fed_path, FederationConfig)
    if args.seed is not None:
        fed = fed.model_copy(update={"seed": args.seed})
    rounds = args.rounds or fed.rounds
    t0 = time.time()
    model = build_autosam(fed.sam, fed.model, seed=fed.seed)
    trainers = []
    for rel in fed.sites:
        site_path = (fed_path.parent / rel).resolve()
        site = load_yaml_config(site_path, SiteConfig).model_copy(update={"device": args.device})
        if args.keep_optimizer:
            site = site.model_copy(update={"optimizer_state": "keep"})
        trainers.append(SiteTrainer(model, site, base_dir=site_path.parent, progress=False))
    global_state = {k: v.detach().cpu().numpy().copy() for k, v in model.trainable_state().items()}
    velocity = {f"prompt_generator.{k}": 0.0 for k, _ in model.prompt_generator.named_parameters()}
    extra = {}
    for spec in args.extra_validation:
        dataset, stems = spec.split(":", 1)
        ref = DataRef(dataset=dataset, stems_file=str(Path(stems).resolve()))
        extra[f"{dataset}:{Path(stems).name}"] = resolve_pairs(ref)
    history, best = [], None
    for rnd in range(1, rounds + 1):
        states, weights, sites = [], [], {}
        for tr in trainers:
            model.load_trainable_state({k: torch.from_numpy(v) for k, v in global_state.items()})
            epochs = args.local_epochs or tr.site.local_epochs
            stats = tr.fit(epochs, proximal_mu=args.mu, seed=fed.seed + rnd, run_id="emulation",
                           server_round=rnd)
            states.append({k: v.detach().cpu().numpy().copy() for k, v in model.trainable_state().items()})
            weights.append(tr.num_examples)
            sites[tr.site.site_id] = {"loss": float(stats.get("loss", float("nan"))), "steps": stats.get("steps")}
        averaged = weighted_average(states, weights)
        if args.server_momentum:
            for k in velocity:
                velocity[k] = args.server_momentum * velocity[k] + (averaged[k] - global_state[k])
                averaged[k] = (global_state[k] + velocity[k]).astype(averaged[k].dtype)
        global_state = averaged
        model.load_trainable_state({k: torch.from_numpy(v) for k, v in global_state.items()})
        vals = {tr.site.site_id: evaluate_pairs(model, tr.val_pairs, tr.cache) for tr in trainers if tr.val_pairs}
        val_dice = image_weighted_mean(vals, "dice")
        extra_vals = {k: evaluate_pairs(model, pairs, trainers[0].cache) for k, pairs in extra.items()}
        rec = {"round": rnd, "val_dice": val_dice, "val_dice_per_site": {k: v["dice"] for k, v in vals.items()},
               "extra_val_dice": image_weighted_mean(extra_vals, "dice") if extra_vals else None,
               "extra_val_dice_per_set": {k: v["dice"] for k, v in extra_vals.items()},
               "sites": sites, "wall_seconds": time.time() - t0}
        history.append(rec)
        print(json.dumps(rec), file=sys.stderr, flush=True)
        if best is None or val_dice > best["val_dice"]:
            best = {"round": rnd, "val_dice": val_dice, "state": {k: v.copy() for k, v in global_state.items()}}
    model.load_trainable_state({k: torch.from_numpy(v) for k, v in best.pop("state").items()})
    evaluator = CentralEvaluator(model, fed.evaluate, base_dir=fed_path.parent, device=args.device)
    test = {k: v["dice"] for k, v in evaluator.evaluate().items()}
    out = {"federation": fed.name, "seed": fed.seed, "rounds": rounds, "local_epochs": args.local_epochs, "mu": args.mu,
           "keep_optimizer": args.keep_optimizer, "server_momentum": args.server_momentum,
           "device": str(trainers[0].device), "precision": trainers[0].precision, "history": history,
           "best": best, "test_dice_of_best": test, "wall_seconds": time.time() - t0}
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
