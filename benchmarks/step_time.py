"""Seconds per training step with and without the SAM embedding cache (issue 2 measurement).

    .venv/bin/python benchmarks/step_time.py [--steps 3] [--batch-size 10]

Trains g (HarDNet-85) on the first Kvasir-SEG pranet_train images with the frozen LiteMedSAM, once
reading cached image_embeddings and once re-encoding every batch (the paper-exact path), and prints
the median wall seconds per optimizer step of each (the first step of each is a warm-up).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from autosam_core.config import DataRef, ModelConfig, SamConfig
from autosam_core.data.cache import EmbeddingCache
from autosam_core.data.io import load_image
from autosam_core.engine import AutoSamDataset, build_autosam, make_loader, masked_loss_and_dice, resolve_pairs


def time_steps(model, loader, steps: int) -> list[float]:
    opt = torch.optim.Adam(model.prompt_generator.parameters(), lr=3e-4, weight_decay=1e-5)
    model.train()
    times, it = [], iter(loader)
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        batch = next(it)
        emb = batch["image_embeddings"] if "image_embeddings" in batch else model.sam.encode(batch["sam_input"])
        loss, _ = masked_loss_and_dice(model(emb, batch["g_input"]), batch["target"], batch["valid"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return times[1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=10)
    args = ap.parse_args()
    n = args.batch_size * (args.steps + 1)
    model = build_autosam(SamConfig(), ModelConfig(backbone="hardnet85"))
    pairs = resolve_pairs(DataRef(dataset="Kvasir-SEG", split="pranet_train", limit=n))
    cache = EmbeddingCache(model.sam)
    fill = cache.ensure([p.image_path for p in pairs], load_image)
    out = {"batch_size": args.batch_size, "threads": torch.get_num_threads(), "cache_fill": fill}
    for name, c in (("cached", cache), ("uncached", None)):
        loader = make_loader(AutoSamDataset(model, pairs, "polyp", c), args.batch_size, shuffle=False)
        t = time_steps(model, loader, args.steps)
        out[f"{name}_seconds_per_step"] = statistics.median(t)
        out[f"{name}_all_steps"] = t
    out["speedup"] = out["uncached_seconds_per_step"] / out["cached_seconds_per_step"]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
