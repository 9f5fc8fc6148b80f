"""Ablation of the prompt generator g on the embedded LiteMedSAM (issue 10): docs/benchmark/ABLATION.md.

Every variant gets the same data, budget and seed(s); decisions are made on the validation split only
(never on a test split). Each trained model is also evaluated with the automatic box refinement
(``refine: box`` and ``box_only``), which needs no retraining.

Data (a stated subset of the PraNet protocol, all from the training splits except the test rows):
  train: the first ``--train-per-dataset`` stems of Kvasir-SEG and CVC-ClinicDB ``pranet_train``;
  validation: the last ``--val-per-dataset`` stems of the same splits (disjoint from train);
  test: Kvasir / ClinicDB ``pranet_test`` and the ColonDB / ETIS images present (reported, not used
  to decide anything).

Run (fill the embedding cache first: ``autosam embed sites/polyp/central_full.yaml``)::

    python benchmarks/ablation.py --variants all --seeds 0 --out runs/ablation
    python benchmarks/ablation.py --report runs/ablation   # ABLATION.md from the JSON rows

Each finished row is appended to ``<out>/rows.jsonl`` at once, so an interrupted run keeps its rows
and a rerun skips the (variant, seed) pairs already there.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from autosam_core.config import DataRef, ModelConfig, SamConfig
from autosam_core.data.cache import EmbeddingCache
from autosam_core.data.io import load_image
from autosam_core.data.dataset import resolve_pairs
from autosam_core.data.torch_dataset import AutoSamDataset, make_loader
from autosam_core.evaluation import evaluate_pairs
from autosam_core.model_factory import build_autosam
from autosam_core.training import lr_schedule, train_epochs
from autosam_core.precision import resolve_device, resolve_precision
from autosam_core.sam import load_frozen_sam

# name -> (ModelConfig keys, schedule). "paper" is the paper-faithful g (section 3).
VARIANTS: dict[str, tuple[dict, str]] = {
    "paper": ({"preset": "paper"}, "constant"),
    "paper_offset": ({"preset": "paper", "output": "offset"}, "constant"),
    "hardnet85_fused_offset": ({"backbone": "hardnet85", "output": "offset", "fuse_embeddings": True,
                                "head_channels": 256}, "constant"),
    "sam_head_tanh": ({"preset": "sam_head", "output": "tanh", "refine": "none"}, "constant"),
    "sam_head_offset": ({"preset": "sam_head", "output": "offset", "refine": "none"}, "constant"),
    "sam_head_offset_c128": ({"preset": "sam_head", "output": "offset", "head_channels": 128, "refine": "none"},
                             "constant"),
    "sam_head_offset_cosine": ({"preset": "sam_head", "output": "offset", "refine": "none"}, "cosine"),
}
VARIANTS["sam_head_tanh_dilated"] = ({"preset": "sam_head", "output": "tanh", "head_dilated": True, "refine": "none"},
                                     "constant")
# Head width (session 8): the 128-channel head lost 6 points against 256, so try wider.
VARIANTS["sam_head_tanh_c512"] = ({"preset": "sam_head", "output": "tanh", "head_channels": 512, "refine": "none"},
                                  "constant")
# Variants trained with another learning rate than --lr (same data, steps and seed).
VARIANT_LR = {"sam_head_offset_lr1e-3": 1e-3, "sam_head_tanh_lr1e-3": 1e-3}
VARIANTS["sam_head_offset_lr1e-3"] = ({"preset": "sam_head", "output": "offset", "refine": "none"}, "constant")
VARIANTS["sam_head_tanh_lr1e-3"] = ({"preset": "sam_head", "output": "tanh", "refine": "none"}, "constant")
# Variants trained with geometric augmentation from the cache: probability of a mirrored sample (the
# SAM embeddings of the mirrored training images are cached once more; same data, steps and seed).
VARIANT_HFLIP = {"sam_head_tanh_hflip": 0.5}
VARIANTS["sam_head_tanh_hflip"] = ({"preset": "sam_head", "output": "tanh", "refine": "none"}, "constant")
# Box-refinement settings tried with --refine-sweep (validation only: they need no retraining):
# name -> AutoSam attributes on top of refine "box_only".
REFINE_SWEEP = {
    "box_only:largest": {"refine_min_fraction": 1.0},
    "box_only:mf0.3": {"refine_min_fraction": 0.3},
    "box_only:margin3": {"refine_margin": 3.0},
    "box_only:margin6": {"refine_margin": 6.0},
    "box_only:iter2": {"refine_iterations": 2},
}
TEST = [DataRef(dataset="Kvasir-SEG", split="pranet_test", name="Kvasir"),
        DataRef(dataset="CVC-ClinicDB", split="pranet_test", name="ClinicDB"),
        DataRef(dataset="CVC-ColonDB", name="ColonDB"),
        DataRef(dataset="ETIS-LaribPolypDB", name="ETIS")]


def g_macs(model, g_input_size: int) -> float:
    """GMACs of one g forward pass (batch 1) at ``g_input_size``, from torch's FLOP counter (FLOPs / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    g = model.prompt_generator
    was = g.training
    g.eval()
    x = torch.zeros(1, 3, g_input_size, g_input_size) if model.reads_images else None
    e = torch.zeros(1, 256, 64, 64)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model.dense_prompt(e, x)
    g.train(was)
    return fc.get_total_flops() / 2 / 1e9


def run_variant(name: str, seed: int, args, sam, train_pairs, val_pairs, test_sets) -> list[dict]:
    cfg_keys, schedule = VARIANTS[name]
    cfg = ModelConfig(**cfg_keys)
    model = build_autosam(SamConfig(), cfg, sam=sam, seed=seed)
    cache = EmbeddingCache(sam)
    hflip = VARIANT_HFLIP.get(name, 0.0)
    train_set = AutoSamDataset(model, train_pairs, "polyp", cache, seed=seed, hflip_p=hflip)
    train_set.fill_cache()  # only the mirrored entries are new (main() cached the rest)
    torch.manual_seed(seed)
    loader = make_loader(train_set, args.batch_size, shuffle=True, seed=seed)
    lr = VARIANT_LR.get(name, args.lr)
    opt = torch.optim.Adam(model.prompt_generator.parameters(), lr=lr, weight_decay=1e-5)
    sched = lr_schedule(opt, args.epochs * len(loader), schedule)
    stats = train_epochs(model, loader, args.epochs, opt, scheduler=sched, desc=f"{name} s{seed}")
    state = model.trainable_state()
    base = {"variant": name, "seed": seed, "model": cfg.model_dump(), "schedule": schedule,
            "g_params": sum(p.numel() for p in model.prompt_generator.parameters()),
            "gmacs": g_macs(model, cfg.g_input_size),
            "seconds_per_step": stats["seconds"] / max(stats["steps"], 1), "steps": stats["steps"],
            "data_seconds_per_step": stats["data_seconds"] / max(stats["steps"], 1),
            "train_loss": stats["loss"], "train_dice": stats["dice"],
            "bytes_per_round": sum(v.numel() * v.element_size() for v in state.values()),
            "train_images": len(train_pairs), "val_images": len(val_pairs), "epochs": args.epochs,
            "batch_size": args.batch_size, "lr": lr, "precision": sam.precision, "hflip": hflip}
    rows = []
    for refine in ("none", "box", "box_only"):
        model.refine = refine
        t0 = time.perf_counter()
        val = evaluate_pairs(model, val_pairs, cache)
        tests = {label: evaluate_pairs(model, pairs, cache) for label, pairs in test_sets.items()}
        row = {**base, "refine": refine, "val_dice": val["dice"], "val_boundary_ratio": val["boundary_ratio"],
               "test": {k: {"dice": v["dice"], "iou": v["iou"], "boundary_ratio": v["boundary_ratio"],
                            "num_images": v["num_images"]} for k, v in tests.items()},
               "eval_seconds": time.perf_counter() - t0}
        print(f"{name} seed {seed} refine {refine}: val Dice {100 * val['dice']:.1f}, "
              + ", ".join(f"{k} {100 * v['dice']:.1f}" for k, v in tests.items()), flush=True)
        rows.append(row)
    if args.refine_sweep:
        model.refine = "box_only"
        for label, attrs in REFINE_SWEEP.items():
            saved = {k: getattr(model, k) for k in attrs}
            for k, v in attrs.items():
                setattr(model, k, v)
            val = evaluate_pairs(model, val_pairs, cache)
            for k, v in saved.items():
                setattr(model, k, v)
            rows.append({**base, "refine": label, "val_dice": val["dice"], "val_boundary_ratio": val["boundary_ratio"],
                         "test": {}, "refine_settings": attrs})
            print(f"{name} seed {seed} refine {label}: val Dice {100 * val['dice']:.1f} (validation only)", flush=True)
    return rows


def write_report(out: Path) -> Path:
    """ABLATION.md from ``<out>/rows.jsonl``: one line per (variant, refine), mean over seeds."""
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines() if line.strip()]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["variant"], r["refine"]), []).append(r)
    bench = next((list(r["test"]) for r in rows if r["test"]), [])
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    lines = ["| variant | refine | seeds | g params (M) | GMACs | s/step | val Dice | "
             + " | ".join(f"{b} Dice" for b in bench) + " | val boundary ratio | MB per round |",
             "|---|---|---|---:|---:|---:|---:|" + "---:|" * len(bench) + "---:|---:|"]
    for (variant, refine), rs in groups.items():
        seeds = ",".join(str(r["seed"]) for r in rs)
        vals = [100 * r["val_dice"] for r in rs]
        val_txt = f"{mean(vals):.1f}" + (f" ({' / '.join(f'{v:.1f}' for v in vals)})" if len(rs) > 1 else "")
        lines.append(
            f"| {variant} | {refine} | {seeds} | {rs[0]['g_params'] / 1e6:.2f} | {rs[0]['gmacs']:.2f} | "
            f"{mean([r['seconds_per_step'] for r in rs]):.2f} | {val_txt} | "
            + " | ".join(f"{mean([100 * r['test'][b]['dice'] for r in rs]):.1f}" if rs[0]["test"] else "-"
                         for b in bench)
            + f" | {mean([r['val_boundary_ratio'] for r in rs]):.2f} | {rs[0]['bytes_per_round'] / 1e6:.1f} |")
    path = out / "ablation_table.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="all", help="comma-separated names from VARIANTS, or all")
    p.add_argument("--seeds", default="0")
    p.add_argument("--train-per-dataset", type=int, default=100)
    p.add_argument("--val-per-dataset", type=int, default=50)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--precision", default="auto")
    p.add_argument("--test-limit", type=int, help="first N images of each test set (smoke runs only)")
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--report", help="only write the table from an existing output folder")
    p.add_argument("--refine-sweep", action="store_true",
                   help="also evaluate the REFINE_SWEEP box settings on the validation split")
    args = p.parse_args()
    if args.report:
        print(write_report(Path(args.report)).read_text())
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    done = set()
    if (out / "rows.jsonl").is_file():
        done = {(r["variant"], r["seed"]) for r in map(json.loads, (out / "rows.jsonl").read_text().splitlines())}
    device = resolve_device("auto")
    sam = load_frozen_sam("lite_medsam").to(device).set_precision(resolve_precision(args.precision, device))
    train_pairs, val_pairs = [], []
    for ds in ("Kvasir-SEG", "CVC-ClinicDB"):
        pairs = resolve_pairs(DataRef(dataset=ds, split="pranet_train"))
        train_pairs += pairs[: args.train_per_dataset]
        val_pairs += pairs[-args.val_per_dataset:]
    test_sets = {r.label: resolve_pairs(r)[: args.test_limit] for r in TEST}
    cache = EmbeddingCache(sam)
    cache.ensure([q.image_path for q in train_pairs + val_pairs + [x for v in test_sets.values() for x in v]],
                 load_image)
    names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    for seed in map(int, args.seeds.split(",")):
        for name in names:
            if (name, seed) in done:
                continue
            rows = run_variant(name, seed, args, sam, train_pairs, val_pairs, test_sets)
            with open(out / "rows.jsonl", "a") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
    print(write_report(out).read_text())


if __name__ == "__main__":
    main()
