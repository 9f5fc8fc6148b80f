"""Centralised training as a library function: one YAML's data, g trained for ``train.epochs`` epochs
with a validation pass after each, ``last.pt``/``best.pt``, optional h, evaluation of the best
checkpoint on the benchmark splits, ``history.json``, ``training.png`` and ``summary.json``.

``autosam train`` only parses arguments, calls :func:`train_central` and prints its summary.
Never imports flwr.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainJobConfig, config_hash, yaml_relative
from .data.cache import EmbeddingCache
from .data.dataset import resolve_ref, split_validation
from .data.io import load_image
from .data.torch_dataset import AutoSamDataset, make_loader
from .evaluation import evaluate_pairs, evaluate_refs
from .files import atomic_copy, atomic_write_json
from .model_factory import build_autosam, model_from_checkpoint
from .precision import grad_scaler, resolve_device, resolve_precision
from .sam import load_frozen_sam
from .training import lr_schedule, train_epochs, train_surrogate

log = logging.getLogger(__name__)


def plot_history(history: list[dict], path: Path) -> None:
    """Training loss and train/validation Dice per epoch (PNG at ``path``); nothing for an empty history."""
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    ax[0].plot(ep, [h["train_loss"] for h in history], marker="o")
    ax[0].set(title="training loss (BCE + Dice)", xlabel="epoch")
    ax[1].plot(ep, [h["train_dice"] for h in history], marker="o", label="train")
    ax[1].plot(ep, [h["val_dice"] for h in history], marker="o", label="validation")
    ax[1].set(title="Dice", xlabel="epoch", ylim=(0, 1))
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def training_split(cfg: TrainJobConfig, base: Path, where: str) -> tuple[list, list]:
    """(train pairs, validation pairs) of a training YAML: every pair of ``cfg.train_data`` (unreadable
    files raise), ``train.val_fraction`` of them held out, seeded by ``train.seed``. The one place the
    hold-out is drawn: :func:`train_central` and ``autosam evaluate --validation`` use it.

    Args:
        where: the YAML's path, named in errors with the key (``train_data.<i>.dataset`` ...).

    Raises:
        ConfigError: missing/unreadable data (names the file and the key).
    """
    pairs = [p for i, ref in enumerate(cfg.train_data)
             for p in resolve_ref(ref, base, where, f"train_data.{i}", unreadable="error")]
    return split_validation(pairs, cfg.train.val_fraction, cfg.train.seed)


def train_central(cfg: TrainJobConfig, config_path: str | Path, output: str | Path | None = None,
                  device: str | None = None, precision: str | None = None) -> dict:
    """Train AutoSAM centrally on ``cfg.train_data`` (paper section 3: g trained with frozen SAM,
    BCE + Dice, Adam) and evaluate the best epoch's checkpoint on ``cfg.evaluate``.

    Every pair of ``cfg.train_data`` is checked (unreadable files raise) before the model is built or
    any image encoded; ``train.val_fraction`` of them (seeded by ``train.seed``) is held out for
    validation, which alone picks ``best.pt`` (never a test split).

    Args:
        cfg: the validated job config; config_path: its YAML (relative dataset paths are relative to it).
        output: run folder (default ``<output_dir>/<name>``; a relative output_dir is relative to the
            YAML's folder, like every path in it).
        device, precision: override ``cfg.device``/``cfg.precision`` (``auto``: CUDA if present; bf16
            where the CPU/GPU computes it fast).

    Returns:
        the summary written to ``<output>/summary.json``: ``name``, ``train_images``, ``val_images``,
        ``epochs``, ``device``, ``precision``, ``best_epoch``, ``minutes`` (training wall time),
        ``history`` (one row per epoch: ``train_loss``, ``train_dice``, ``val_dice`` in [0, 1],
        ``seconds``, ``seconds_per_step``), ``checkpoint`` and, with ``cfg.evaluate``, ``evaluation``
        ({label: {"dice", "iou", "boundary_ratio", "num_images", "skipped", ...}}).

    Raises:
        ConfigError: missing/unreadable data; FloatingPointError: the loss became non-finite.
    """
    base = Path(config_path).resolve().parent
    train_pairs, val_pairs = training_split(cfg, base, where=str(config_path))
    for i, ref in enumerate(cfg.evaluate):
        resolve_ref(ref, base, str(config_path), f"evaluate.{i}")
    out = Path(output) if output else yaml_relative(cfg.output_dir, base) / cfg.name
    cache_dir = yaml_relative(cfg.cache_dir, base)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.train.seed)
    dev = resolve_device(device or cfg.device)
    prec = resolve_precision(precision or cfg.precision, dev)
    log.info("device %s, precision %s", dev, prec)
    sam = load_frozen_sam(cfg.sam.kind, cfg.sam.checkpoint).to(dev).set_precision(prec)
    model = build_autosam(cfg.sam, cfg.model, sam=sam, seed=cfg.train.seed)
    counts = model.num_trainable_parameters()
    log.info("AutoSAM: SAM %s (%d params, %d trainable), g %s %d params, h %d params", cfg.sam.kind,
             counts["sam_params"], counts["sam_trainable_params"], cfg.model.backbone, counts["g_params"],
             counts["h_params"])
    log.info("training on %d images, validating on %d (held out from the training split)",
             len(train_pairs), len(val_pairs))
    cache = EmbeddingCache(model.sam, cache_dir) if cfg.train.use_cache else None
    if cache is not None:
        stats = cache.ensure([p.image_path for p in train_pairs + val_pairs], load_image)
        log.info("embedding cache: %d cached, %d computed in %.1f s", stats["cached"], stats["computed"],
                 stats["seconds"])
    train_set = AutoSamDataset(model, train_pairs, cfg.train.augmentation, cache, seed=cfg.train.seed,
                               hflip_p=cfg.train.hflip)
    if cfg.train.hflip > 0:
        train_set.fill_cache()  # the mirrored training images (the plain ones are cached above)
    loader = make_loader(train_set, cfg.train.batch_size, shuffle=True, seed=cfg.train.seed)
    opt = torch.optim.Adam(model.prompt_generator.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = lr_schedule(opt, cfg.train.epochs * len(loader), cfg.train.schedule, cfg.train.warmup_fraction)
    scaler = grad_scaler(dev, prec)
    meta = {"sam": cfg.sam.model_dump(), "model": cfg.model.model_dump(), "backbone": cfg.model.backbone,
            "sam_kind": cfg.sam.kind, "sam_weights": sam.weights_id, "precision": prec,
            "config_hash": config_hash(cfg), "name": cfg.name}
    history, best, best_row = [], -1.0, None
    t_start = time.perf_counter()
    for epoch in range(1, cfg.train.epochs + 1):
        stats = train_epochs(model, loader, 1, opt, desc=f"epoch {epoch}/{cfg.train.epochs}", scheduler=scheduler,
                             scaler=scaler)
        val = evaluate_pairs(model, val_pairs, cache) if val_pairs else {"dice": float("nan"), "iou": float("nan")}
        row = {"epoch": epoch, "train_loss": stats["loss"], "train_dice": stats["dice"], "val_dice": val["dice"],
               "val_iou": val["iou"], "seconds": stats["seconds"],
               "seconds_per_step": stats["seconds"] / max(stats["steps"], 1)}
        history.append(row)
        log.info("epoch %d: loss %.4f train Dice %.3f val Dice %.3f (%.1f s, %.2f s/step)", epoch, row["train_loss"],
                 row["train_dice"], row["val_dice"], row["seconds"], row["seconds_per_step"])
        save_checkpoint(out / "last.pt", model.trainable_state(), {**meta, "epoch": epoch, **row})
        if not val_pairs or val["dice"] > best:  # no validation split: the last epoch is the best
            best, best_row = (val["dice"] if val_pairs else best), row
            atomic_copy(out / "last.pt", out / "best.pt")  # same bytes: no second serialisation
        atomic_write_json(out / "history.json", history, indent=2, default=str)
    if model.surrogate_decoder is not None and cfg.train.surrogate_epochs > 0:
        if (out / "best.pt").is_file():
            model.load_trainable_state(load_checkpoint(out / "best.pt")["trainable_state"])
        h_loader = make_loader(AutoSamDataset(model, train_pairs, cfg.train.augmentation, cache, seed=cfg.train.seed),
                               cfg.train.surrogate_batch_size, shuffle=True, seed=cfg.train.seed)
        h_stats = train_surrogate(model, h_loader, cfg.train.surrogate_epochs, cfg.train.lr, cfg.train.weight_decay)
        log.info("surrogate decoder h: loss %.4f Dice %.3f (%.1f s)", h_stats["loss"], h_stats["dice"], h_stats["seconds"])
        best_meta = {**meta, **(best_row or {}), "surrogate": h_stats}  # the best epoch's row, not the last
        save_checkpoint(out / "best.pt", model.trainable_state(), best_meta)
    minutes = (time.perf_counter() - t_start) / 60
    plot_history(history, out / "training.png")
    summary = {"name": cfg.name, "train_images": len(train_pairs), "val_images": len(val_pairs),
               "epochs": cfg.train.epochs, "device": str(dev), "precision": prec,
               "best_epoch": best_row["epoch"] if best_row else None, "minutes": minutes, "history": history,
               "checkpoint": str(out / "best.pt")}
    if cfg.evaluate:
        best_model, _ = model_from_checkpoint(out / "best.pt", sam=model.sam)
        summary["evaluation"] = evaluate_refs(best_model, cfg.evaluate, cache_dir=cache_dir, base=base)
    atomic_write_json(out / "summary.json", summary, indent=2, default=str)
    return summary
