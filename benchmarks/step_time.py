"""Seconds per training step, encoder and decoder cost, by precision, in one process (issue 9).

    .venv/bin/python benchmarks/step_time.py [--steps 3] [--batch-size 10] [--preset paper] [--device auto]

Prints JSON with stable keys:

- ``fp32_seconds_per_step``, ``bf16_seconds_per_step``, ``speedup_bf16``: one cached training step
  of g (``--preset``, default ``paper`` = HarDNet-85) + the frozen SAM decoder + loss + Adam, median
  over ``--steps`` after one warm-up step; on CUDA the half-precision row is bf16 where supported;
- ``fp32_channels_last_seconds_per_step``, ``bf16_channels_last_seconds_per_step``,
  ``speedup_bf16_channels_last``: the same cached steps with g (weights and inputs) in channels_last
  memory format, the layout site training uses where
  ``autosam_core.precision.prefers_channels_last`` says so (``prefers_channels_last`` in the JSON);
- ``uncached_seconds_per_step``: the same step re-encoding every batch (paper-exact path), in the
  faster precision;
- ``encoder_seconds_per_image_fp32`` / ``_bf16``: the frozen image encoder (inference);
- ``decoder_batched_seconds_per_image``, ``decoder_loop_seconds_per_image``, ``speedup_batched_decoder``:
  the mask decoder forward + backward, batched vs segment_anything's per-sample loop (fp32);
- ``peak_rss_megabytes`` (this process, ``resource.getrusage``), ``device``, ``threads``, ``preset``.

On a GPU machine: ``--device cuda --sam lite_medsam`` times LiteMedSAM; ``--sam vit_h_random``
builds segment-anything's ViT-H image encoder with random weights (same shapes and cost as the real
one, nothing downloaded) so encoder timings at 1024x1024 need no checkpoint.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch

from autosam_core.config import DataRef, ModelConfig, SamConfig
from autosam_core.data.cache import EmbeddingCache
from autosam_core.data.io import load_image
from autosam_core.data.dataset import resolve_pairs
from autosam_core.data.torch_dataset import AutoSamDataset, make_loader
from autosam_core.model_factory import build_autosam
from autosam_core.training import masked_loss_and_dice
from autosam_core.precision import autocast, cpu_has_fast_bf16, prefers_channels_last, resolve_device
from autosam_core.sam import SPECS, FrozenSam, load_frozen_sam


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(model, loader, steps: int) -> list[float]:
    """Wall seconds of ``steps`` training steps (after one warm-up step) in ``model.sam.precision``."""
    sam = model.sam
    opt = torch.optim.Adam(model.prompt_generator.parameters(), lr=3e-4, weight_decay=1e-5)
    model.train()
    times = []
    batches = list(loader)
    for i in range(steps + 1):
        batch = batches[i % len(batches)]
        _sync(sam.device)
        t0 = time.perf_counter()
        emb = (batch["image_embeddings"].to(sam.device) if "image_embeddings" in batch
               else sam.encode(batch["sam_input"]))
        g_in = batch.get("g_input")  # AutoSam.dense_prompt puts g's inputs in g's memory format
        with autocast(sam.device, sam.precision):
            dense = model.dense_prompt(emb, g_in)
        loss, _ = masked_loss_and_dice(sam.decode(emb, dense), batch["target"], batch["valid"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        _sync(sam.device)
        times.append(time.perf_counter() - t0)
    return times[1:]


def time_encoder(sam, images: torch.Tensor, precision: str) -> float:
    """Seconds per image of the frozen encoder in ``precision`` (after a warm-up call)."""
    sam.set_precision(precision)
    sam.encode(images[:1])
    _sync(sam.device)
    t0 = time.perf_counter()
    sam.encode(images)
    _sync(sam.device)
    return (time.perf_counter() - t0) / len(images)


def time_decoder(sam, emb: torch.Tensor, per_sample: bool) -> float:
    """Seconds per image of the mask decoder forward + backward (fp32), batched or SAM's loop."""
    sam.set_precision("fp32")
    fn = sam.decode_per_sample if per_sample else sam.decode
    best = float("inf")
    for _ in range(3):
        dense = (torch.randn_like(emb) * 0.05).requires_grad_()
        _sync(sam.device)
        t0 = time.perf_counter()
        fn(emb, dense).sum().backward()
        _sync(sam.device)
        best = min(best, time.perf_counter() - t0)
    return best / len(emb)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--preset", default="paper", choices=("paper", "sam_head"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--sam", default="lite_medsam", choices=("lite_medsam", "vit_h_random"))
    ap.add_argument("--fp32-only", action="store_true",
                    help="skip the half-precision rows (a CPU without bf16 units emulates bf16 slowly: "
                         "cpu_has_fast_bf16() is false there and precision auto picks fp32)")
    args = ap.parse_args()
    device = resolve_device(args.device)
    half = "bf16" if device.type == "cpu" or torch.cuda.is_bf16_supported() else "fp16"
    fast_half = device.type == "cuda" or cpu_has_fast_bf16()
    halves = [] if args.fp32_only else [half]
    n = args.batch_size * (args.steps + 1)
    sam = load_frozen_sam("lite_medsam").to(device)
    model = build_autosam(SamConfig(), ModelConfig(preset=args.preset), sam=sam)
    pairs = resolve_pairs(DataRef(dataset="Kvasir-SEG", split="pranet_train", limit=n))
    out: dict = {"device": str(device), "threads": torch.get_num_threads(), "batch_size": args.batch_size,
                 "preset": args.preset, "sam": args.sam, "fast_half_precision": fast_half,
                 "prefers_channels_last": {p: prefers_channels_last(device, p) for p in ("fp32", *halves)}}
    # contiguous g, then channels_last g (weights and inputs in NHWC, as SiteTrainer trains it)
    for layout in ("", "_channels_last"):
        model.set_channels_last(bool(layout))
        for precision in ("fp32", *halves):
            sam.set_precision(precision)
            cache = EmbeddingCache(sam)
            cache.ensure([p.image_path for p in pairs], load_image, progress=False)  # filled once, then read
            loader = make_loader(AutoSamDataset(model, pairs, "polyp", cache), args.batch_size, shuffle=False)
            out[f"{precision}{layout}_seconds_per_step"] = statistics.median(time_steps(model, loader, args.steps))
        if halves:
            out[f"speedup_{half}{layout}"] = (out[f"fp32{layout}_seconds_per_step"]
                                              / out[f"{half}{layout}_seconds_per_step"])
    model.set_channels_last(False)
    sam.set_precision((halves or ["fp32"])[-1])
    loader = make_loader(AutoSamDataset(model, pairs[: 2 * args.batch_size], "polyp", None), args.batch_size,
                         shuffle=False)
    out["uncached_seconds_per_step"] = statistics.median(time_steps(model, loader, 1))
    enc_sam = sam
    if args.sam == "vit_h_random":
        from segment_anything import sam_model_registry

        vit = sam_model_registry["vit_h"](checkpoint=None)  # random weights, real shapes
        enc_sam = FrozenSam(SPECS["vit_h"], vit.image_encoder, vit.prompt_encoder, vit.mask_decoder,
                            weights_id="random").to(device)
    s = enc_sam.spec.input_size
    images = torch.randn(4, 3, s, s)
    for precision in ("fp32", *halves):
        out[f"encoder_seconds_per_image_{precision}"] = time_encoder(enc_sam, images, precision)
    emb = (torch.randn(args.batch_size, 256, 64, 64) * 0.1).to(device)
    out["decoder_batched_seconds_per_image"] = time_decoder(sam, emb, per_sample=False)
    out["decoder_loop_seconds_per_image"] = time_decoder(sam, emb, per_sample=True)
    out["speedup_batched_decoder"] = out["decoder_loop_seconds_per_image"] / out["decoder_batched_seconds_per_image"]
    out["peak_rss_megabytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        out["peak_cuda_megabytes"] = torch.cuda.max_memory_allocated(device) / 2**20
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
