"""Training and evaluation of AutoSAM: one local training run, central evaluation, h training.

Used by ``autosam train`` (centralised), by a federated site for one round (:class:`SiteTrainer`)
and by the server's central evaluation (:class:`CentralEvaluator`). Never imports flwr.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .autosam import AutoSam, StateMismatchError
from .config import ConfigError, DataRef, ModelConfig, SamConfig, SiteConfig
from .data.cache import EmbeddingCache
from .data.dataset import Pair, PairingReport, data_root, pair_by_stem, read_split, verify_pixels
from .data.io import load_image, load_mask
from .data.transforms import build_augmentation
from .losses import bce_dice_loss
from .metrics import dice_iou
from .prompt_generator import PromptGenerator
from .sam import FrozenSam, load_frozen_sam
from .surrogate_decoder import SurrogateDecoder

log = logging.getLogger(__name__)


# ----- model ------------------------------------------------------------------------------------
def build_autosam(sam_cfg: SamConfig, model_cfg: ModelConfig, sam: FrozenSam | None = None, seed: int = 0) -> AutoSam:
    """Build AutoSAM: frozen SAM (``sam`` if given, else loaded from ``sam_cfg``) + g (+ h).

    g's weights are drawn from ``seed`` so every site and the server start from the same
    initial model when no checkpoint is given.
    """
    sam = sam or load_frozen_sam(sam_cfg.kind, sam_cfg.checkpoint)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        g = build_prompt_generator(model_cfg, sam.spec.embed_dim, sam.spec.embedding_size)
        h = SurrogateDecoder(embed_dim=sam.spec.embed_dim) if model_cfg.surrogate else None
    g.set_prompt_base(sam.prompt_encoder.no_mask_embed.weight)
    model = AutoSam(sam, g, h, g_input_size=model_cfg.g_input_size, refine=model_cfg.refine)
    return model.to(sam.device)


def build_prompt_generator(model_cfg: ModelConfig, embed_dim: int = 256,
                           embedding_size: tuple[int, int] = (64, 64), pretrained: bool = True) -> PromptGenerator:
    """g from a :class:`ModelConfig` (the one place that maps config keys to the constructor).

    ``pretrained=False`` ignores ``model_cfg.pretrained`` (e.g. to build a reference signature).
    The "offset" base (SAM's no-mask embedding) is set by :func:`build_autosam`.
    """
    return PromptGenerator(backbone=model_cfg.backbone,
                           pretrained_path=model_cfg.pretrained if pretrained else None,
                           embed_dim=embed_dim, embedding_size=embedding_size, output=model_cfg.output,
                           fuse_embeddings=model_cfg.fuse_embeddings, head_channels=model_cfg.head_channels)


# ----- data -------------------------------------------------------------------------------------
def resolve_dataset_dir(ref: DataRef, base_dir: Path | None = None) -> Path:
    """Folder of ``ref.dataset``: absolute, relative to ``base_dir`` if it exists there, else under
    the data root (``$AUTOSAM_DATA`` or ``../shared/data``).

    Raises:
        ConfigError: the folder does not exist or lacks images/ and masks/.
    """
    p = Path(ref.dataset)
    candidates = [p] if p.is_absolute() else ([base_dir / p] if base_dir else []) + [data_root() / p]
    for c in candidates:
        if (c / "images").is_dir() and (c / "masks").is_dir():
            return c
    raise ConfigError(
        f"dataset {ref.dataset!r}: no folder with images/ and masks/ at {', '.join(map(str, candidates))}; "
        "fix the 'dataset' key or set AUTOSAM_DATA to the data root")


def resolve_pairs(ref: DataRef, base_dir: Path | None = None, unreadable: str = "skip") -> list[Pair]:
    """Image/mask pairs of one :class:`DataRef` (split, then the first ``limit`` stems).

    Every selected image and mask is decoded in full first
    (:func:`autosam_core.data.dataset.verify_pixels`), so an unreadable file is found before any
    model is built or image encoded. Skipped pairs (missing mask, size mismatch, unreadable, ...)
    are logged by reason, never dropped silently.

    Args:
        unreadable: ``"skip"`` (evaluation: leave unreadable pairs out, logged and counted) or
            ``"error"`` (training: stop at once listing every bad file, its reason and how to
            exclude it).

    Raises:
        ConfigError: missing folder or split file, zero usable pairs, or (``unreadable="error"``)
        any image/mask that cannot be read.
    """
    return resolve_data(ref, base_dir, unreadable).pairs


def resolve_data(ref: DataRef, base_dir: Path | None = None, unreadable: str = "skip") -> PairingReport:
    """Like :func:`resolve_pairs`, returning the whole :class:`PairingReport` (pairs and skips by reason)."""
    if unreadable not in ("skip", "error"):
        raise ValueError(f"unreadable must be 'skip' or 'error', found {unreadable!r}")
    d = resolve_dataset_dir(ref, base_dir)
    if ref.split and ref.stems_file:
        raise ConfigError(f"dataset {ref.dataset!r}: give either 'split' or 'stems_file', not both")
    stems = read_split(d, ref.split) if ref.split else None
    if ref.stems_file:
        f = Path(ref.stems_file)
        f = f if f.is_absolute() or base_dir is None else base_dir / f
        if not f.is_file():
            raise ConfigError(f"stems_file {f} not found (one image stem per line)")
        stems = [line.strip() for line in f.read_text().splitlines() if line.strip()]
    if stems is not None and ref.limit:
        stems = stems[: ref.limit]
    report = pair_by_stem(d / "images", d / "masks", stems=stems)
    header_unreadable = len(report.unreadable)
    verify_pixels(report, report.pairs[: ref.limit] if stems is None and ref.limit else None)
    if unreadable == "error" and report.unreadable:
        lines = "\n".join(f"  {path}: {why}" for _, path, why in report.unreadable)
        raise ConfigError(
            f"dataset {d}{f' split {ref.split!r}' if ref.split else ''}: {len(report.unreadable)} unreadable "
            f"image/mask file(s); nothing was trained or encoded:\n{lines}\n"
            "re-export or remove these files, or exclude their stems: list the stems to use in "
            "'stems_file' (or a split file under splits/ named by 'split')")
    if report.num_skipped:
        log.warning("%s: %s", ref.label, report.summary())
    if len(report.unreadable) > header_unreadable:
        log.warning("%s: %d unreadable image/mask pairs skipped", ref.label, len(report.unreadable))
    if not report.pairs:
        raise ConfigError(f"dataset {d} split {ref.split!r}: no usable image/mask pairs ({report.summary()})")
    return report


def split_validation(pairs: Sequence[Pair], fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """Hold out ``round(fraction * N)`` pairs (seeded shuffle) as a validation split: (train, val)."""
    n_val = int(round(fraction * len(pairs)))
    if n_val == 0:
        return list(pairs), []
    idx = list(range(len(pairs)))
    random.Random(seed).shuffle(idx)
    val = set(idx[:n_val])
    return [p for i, p in enumerate(pairs) if i not in val], [p for i, p in enumerate(pairs) if i in val]


class AutoSamDataset(Dataset):
    """Training/evaluation samples for AutoSAM.

    Items are dicts with ``g_input`` float32 (3, G, G) (absent when g reads no image), ``target`` float32 (1, 256, 256) in {0, 1}
    (low-res frame, padding = 0), ``valid`` int64 (2,) = (h, w) of the content region in that frame,
    and either ``image_embeddings`` float16 (256, 64, 64) from the cache or ``sam_input`` float32
    (3, S, S) to be encoded by the caller (uncached, paper-exact path).

    With a cache only photometric augmentation is applied (to g's input): the cached embeddings
    were computed from the unaugmented image, so the geometry must not change. Without a cache the
    full preset is applied to image and mask before both SAM and g see them. ``seed`` seeds the
    augmentation's own random stream (see :meth:`reseed`).
    """

    def __init__(self, model: AutoSam, pairs: Sequence[Pair], augmentation: str = "none",
                 cache: EmbeddingCache | None = None, seed: int = 0):
        self.model = model
        self.pairs = list(pairs)
        self.cache = cache
        self.augment = build_augmentation(augmentation, photometric_only=cache is not None, seed=seed)

    def reseed(self, seed: int) -> None:
        """Restart the augmentation's own random stream (albumentations does not use torch's RNG)."""
        if self.augment is not None:
            self.augment.set_random_seed(int(seed))

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        pair = self.pairs[i]
        mask = load_mask(pair.mask_path)
        out: dict = {}
        if self.cache is not None and not self.model.reads_images:
            # g reads only the cached SAM embeddings: the image itself is never decoded.
            out["image_embeddings"] = self.cache.get(pair.image_path)
            target, (h, w) = self.model.low_res_target(mask)
            out.update(target=target, valid=torch.tensor([h, w]))
            return out
        image = load_image(pair.image_path)
        if self.cache is not None:
            out["image_embeddings"] = self.cache.get(pair.image_path)
            if self.augment is not None:
                image = self.augment(image=image)["image"]
        else:
            if self.augment is not None:
                r = self.augment(image=image, mask=mask)
                image, mask = r["image"], r["mask"]
            out["sam_input"] = self.model.sam.preprocess(image)[0]
        target, (h, w) = self.model.low_res_target(mask)
        out.update(g_input=self.model.g_input(image), target=target, valid=torch.tensor([h, w]))
        return out


def _embeddings(model: AutoSam, batch: dict) -> torch.Tensor:
    if "image_embeddings" in batch:
        return batch["image_embeddings"].to(model.sam.device)
    return model.sam.encode(batch["sam_input"])


def _dense_prompt(model: AutoSam, batch: dict, image_embeddings: torch.Tensor | None) -> torch.Tensor:
    return model.dense_prompt(image_embeddings, batch.get("g_input"))


def masked_loss_and_dice(low_res_logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor
                         ) -> tuple[torch.Tensor, float]:
    """BCE + Dice (paper Eq. 2-4) per sample on its content region, averaged; plus the mean Dice
    of the thresholded (logits > 0) masks on the same regions.

    Args:
        low_res_logits: (B, 1, 256, 256); target: (B, 1, 256, 256) {0, 1}; valid: (B, 2) (h, w).
    """
    losses, dices = [], []
    low_res_logits = low_res_logits.float()
    target = target.to(low_res_logits.device)
    for i, (h, w) in enumerate(valid.tolist()):
        lo, tg = low_res_logits[i:i + 1, :, :h, :w], target[i:i + 1, :, :h, :w]
        losses.append(bce_dice_loss(lo, tg))
        dices.append(dice_iou((lo > 0)[0, 0].detach().cpu().numpy(), tg[0, 0].cpu().numpy() > 0.5)[0])
    return torch.stack(losses).mean(), float(np.mean(dices))


def lr_schedule(optimizer: torch.optim.Optimizer, total_steps: int, schedule: str = "constant",
                warmup_fraction: float = 0.05) -> torch.optim.lr_scheduler.LambdaLR:
    """Learning-rate multiplier per optimizer step: ``constant`` (paper) or ``cosine`` (linear
    warm-up over ``warmup_fraction`` of ``total_steps``, then cosine decay to 0; Loshchilov & Hutter
    2017, Goyal et al. 2017).

    Raises:
        ValueError: unknown schedule.
    """
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule must be 'constant' or 'cosine', found {schedule!r}")
    total = max(int(total_steps), 1)
    warm = max(int(round(warmup_fraction * total)), 1) if schedule == "cosine" else 0

    def factor(step: int) -> float:
        if schedule == "constant":
            return 1.0
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(step - warm, total - warm) / max(total - warm, 1)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_epochs(model: AutoSam, loader: Iterable[dict], epochs: int, optimizer: torch.optim.Optimizer,
                 proximal_mu: float = 0.0, progress: bool = True, desc: str = "train",
                 recalibrate_bn: bool = True, scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                 scaler: torch.amp.GradScaler | None = None) -> dict:
    """Train g for ``epochs`` epochs with frozen SAM (paper section 3).

    g and SAM's decoder run under autocast in ``model.sam.precision`` (see
    :mod:`autosam_core.precision`); the loss, master weights and optimizer state stay float32.

    Args:
        proximal_mu: FedProx proximal weight mu; adds mu/2 * ||w - w_start||^2 over g's parameters.
        recalibrate_bn: after training, re-estimate g's BatchNorm statistics on the same loader
            (:func:`recalibrate_batchnorm`), so that eval-mode predictions match training.
        scheduler: optional per-step learning-rate scheduler (:func:`lr_schedule`).
        scaler: optional gradient scaler (fp16 on CUDA, :func:`autosam_core.precision.grad_scaler`).

    Returns:
        {"loss": mean loss of the last epoch, "dice": mean train Dice of the last epoch,
         "num_examples": samples seen per epoch, "seconds": wall time (s), "steps": optimizer steps,
         "data_seconds": time spent waiting for the loader (s)}.

    Raises:
        SamNotFrozenError: a SAM parameter requires grad or is in the optimizer (:func:`check_sam_frozen`).
        FloatingPointError: the loss became non-finite.
    """
    from .precision import autocast

    check_sam_frozen(model, optimizer)
    device, precision = model.sam.device, model.sam.precision
    model.train()
    params = [p for p in model.prompt_generator.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else None
    t0, steps, loss_sum, dice_sum, n, data_seconds = time.perf_counter(), 0, 0.0, 0.0, 0, 0.0
    for epoch in range(epochs):
        loss_sum, dice_sum, n = 0.0, 0.0, 0
        label = f"{desc} epoch {epoch + 1}/{epochs}" if epochs > 1 else desc
        bar = tqdm(loader, desc=label, leave=False, disable=not progress, unit="batch")
        t_wait = time.perf_counter()
        for batch in bar:
            data_seconds += time.perf_counter() - t_wait
            b = batch["target"].shape[0]
            if b == 0:
                continue
            emb = _embeddings(model, batch)
            with autocast(device, precision):
                dense = _dense_prompt(model, batch, emb)
            low = model.sam.decode(emb, dense)
            loss, dice = masked_loss_and_dice(low, batch["target"], batch["valid"])
            total = loss
            if anchor is not None:
                total = total + proximal_mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None and scaler.is_enabled():
                scaler.scale(total).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                total.backward()
                optimizer.step()
            if scheduler is not None:
                scheduler.step()
            steps += 1
            loss_sum, dice_sum, n = loss_sum + loss.item() * b, dice_sum + dice * b, n + b
            bar.set_postfix(loss=f"{loss.item():.3f}", dice=f"{dice:.3f}")
            t_wait = time.perf_counter()
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"training loss became {loss_sum} in epoch {epoch + 1}")
    if recalibrate_bn and steps:
        recalibrate_batchnorm(model, loader)
    return {"loss": loss_sum / max(n, 1), "dice": dice_sum / max(n, 1), "num_examples": n,
            "seconds": time.perf_counter() - t0, "steps": steps, "data_seconds": data_seconds}


class SamNotFrozenError(RuntimeError):
    """A SAM parameter requires grad or is in the optimiser: training would change the frozen SAM."""


def check_sam_frozen(model: AutoSam, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Before a local training run: no SAM parameter may require grad or be in ``optimizer``.

    Raises:
        SamNotFrozenError: naming the first offending parameter (``sam.<name>``) and the fix.
    """
    for name, p in model.sam.named_parameters():
        if p.requires_grad:
            raise SamNotFrozenError(
                f"SAM parameter sam.{name} requires grad: the frozen SAM must not train; call "
                "model.sam.requires_grad_(False) (AutoSAM trains only the prompt generator g and h)")
    if optimizer is not None:
        sam_params = {id(p): name for name, p in model.sam.named_parameters()}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) in sam_params:
                    raise SamNotFrozenError(
                        f"SAM parameter sam.{sam_params[id(p)]} is in the optimiser: build it over "
                        "model.prompt_generator.parameters() only")


@torch.no_grad()
def recalibrate_batchnorm(model: AutoSam, loader: Iterable[dict], max_batches: int | None = None) -> int:
    """Re-estimate BatchNorm running statistics of g on training inputs ("precise BN").

    After a few optimizer steps BatchNorm's exponential running averages (momentum 0.1, starting
    at mean 0 / var 1) lag far behind the weights, and eval-mode outputs collapse (measured here:
    train-mode Dice 0.59 vs eval-mode Dice 0.00 after 4 steps). The statistics are reset and
    recomputed as an exact average over the given batches with the weights fixed; only g's
    forward pass runs (SAM has no BatchNorm).

    Args:
        model: the AutoSam whose g (``model.prompt_generator``) is recalibrated.
        loader: batches as :class:`AutoSamDataset` yields them.

    Returns:
        number of batches used (0 means nothing changed: no BatchNorm or an empty loader).
    """
    from .precision import autocast

    module = model.prompt_generator
    bns = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    saved = [(m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bns]
    was_training = module.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average = exact mean over the batches seen
    module.train()
    used = 0
    for batch in loader:
        if max_batches is not None and used >= max_batches:
            break
        if batch["target"].shape[0] < 2:
            continue
        emb = batch["image_embeddings"].to(model.sam.device) if "image_embeddings" in batch else None
        if emb is None and getattr(module, "fuse_embeddings", False):
            emb = model.sam.encode(batch["sam_input"])
        with autocast(model.sam.device, model.sam.precision):
            _dense_prompt(model, batch, emb)
        used += 1
    for m, (momentum, mean, var, nbt) in zip(bns, saved):
        m.momentum = momentum
        if used == 0:
            m.running_mean.copy_(mean), m.running_var.copy_(var), m.num_batches_tracked.copy_(nbt)
        else:
            m.num_batches_tracked.copy_(nbt + used)
    module.train(was_training)
    return used


def train_surrogate(model: AutoSam, loader: Iterable[dict], epochs: int, lr: float = 3e-4,
                    weight_decay: float = 1e-5, progress: bool = True) -> dict:
    """Train the surrogate decoder h on g(I) with g fixed (paper section 3, Adam 3e-4, wd 1e-5).

    Returns:
        {"loss", "dice", "num_examples", "seconds"} of the last epoch.
    """
    if model.surrogate_decoder is None:
        raise RuntimeError("model has no surrogate decoder (set model.surrogate: true)")
    opt = torch.optim.Adam(model.surrogate_decoder.parameters(), lr=lr, weight_decay=weight_decay)
    model.prompt_generator.eval()
    t0, stats = time.perf_counter(), {}
    for epoch in range(epochs):
        model.surrogate_decoder.train()
        loss_sum, dice_sum, n = 0.0, 0.0, 0
        for batch in tqdm(loader, desc=f"h epoch {epoch + 1}/{epochs}", leave=False, disable=not progress):
            with torch.no_grad():
                emb = _embeddings(model, batch) if getattr(model.prompt_generator, "fuse_embeddings", False) else None
                z = _dense_prompt(model, batch, emb)
            low = model.surrogate_decoder(z)
            loss, dice = masked_loss_and_dice(low, batch["target"], batch["valid"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            b = low.shape[0]
            loss_sum, dice_sum, n = loss_sum + loss.item() * b, dice_sum + dice * b, n + b
        stats = {"loss": loss_sum / max(n, 1), "dice": dice_sum / max(n, 1), "num_examples": n}
    stats["seconds"] = time.perf_counter() - t0
    return stats


# ----- evaluation -------------------------------------------------------------------------------
@dataclass
class ImageResult:
    """Per-image evaluation result (kept on the evaluating machine; never sent by a site)."""

    stem: str
    dice: float
    iou: float
    boundary_ratio: float | None = None  # predicted / ground-truth boundary length (None: empty GT)


@torch.no_grad()
def evaluate_pairs(model: AutoSam, pairs: Sequence[Pair], cache: EmbeddingCache | None = None,
                   surrogate: bool = False, progress: bool = False, desc: str = "eval",
                   batch_size: int = 8) -> dict:
    """Image-level Dice and IoU (paper section 4 'Evaluation Metrics'), averaged over images.

    Images are processed in batches of ``batch_size`` (one batched g and SAM-decoder call each);
    each prediction is postprocessed to its image's original size and thresholded at logits > 0,
    then compared with the full-resolution ground truth. ``model.refine`` applies.

    Returns:
        {"dice", "iou" (means in [0, 1]), "boundary_ratio" (mean predicted / ground-truth boundary
        length, :mod:`autosam_core.boundary`), "num_images", "seconds_per_image", "per_image": [ImageResult]}.
    """
    from .boundary import boundary_ratio
    from .precision import autocast
    from .sam import resized_shape

    t0 = time.perf_counter()
    needs_embeddings = not surrogate or not model.reads_images
    if cache is not None and needs_embeddings:
        cache.ensure([p.image_path for p in pairs], load_image, progress=progress, desc=f"{desc}: SAM embeddings")
    was_training = model.training
    model.eval()
    sam, results = model.sam, []
    bar = tqdm(total=len(pairs), desc=desc, leave=False, disable=not progress, unit="img")
    try:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            images = [load_image(p.image_path) for p in chunk]
            g_in = torch.stack([model.g_input(im) for im in images]) if model.reads_images else None
            emb = None
            if needs_embeddings:
                if cache is not None:
                    emb = torch.stack([cache.get(p.image_path) for p in chunk]).to(sam.device)
                else:
                    emb = sam.encode(torch.stack([sam.preprocess(im)[0] for im in images]))
            valid = [resized_shape(im.shape[:2], sam.spec.low_res_size[0]) for im in images]
            with autocast(sam.device, sam.precision):
                low = (model.surrogate_logits(g_in, emb) if surrogate
                       else model.predict_low_res(emb, g_in, valid=valid)).float().cpu()
            for i, (pair, image) in enumerate(zip(chunk, images)):
                input_size = resized_shape(image.shape[:2], sam.spec.input_size)
                logits = sam.postprocess(low[i:i + 1], input_size, image.shape[:2])[0, 0]
                pred, gt = (logits > 0).numpy(), load_mask(pair.mask_path) > 0
                d, j = dice_iou(pred, gt)
                results.append(ImageResult(pair.stem, d, j, boundary_ratio(pred, gt)))
            bar.update(len(chunk))
    finally:
        bar.close()
        model.train(was_training)
    n = len(results)
    ratios = [r.boundary_ratio for r in results if r.boundary_ratio is not None]
    return {"dice": float(np.mean([r.dice for r in results])) if n else float("nan"),
            "iou": float(np.mean([r.iou for r in results])) if n else float("nan"),
            "boundary_ratio": float(np.mean(ratios)) if ratios else float("nan"),
            "num_images": n, "seconds_per_image": (time.perf_counter() - t0) / max(n, 1), "per_image": results}


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """A CPU DataLoader (main process; workers would duplicate SAM-sized memory)."""
    g = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=g, num_workers=0)


# ----- federated roles --------------------------------------------------------------------------
class SiteTrainer:
    """One site's local training (a federated round's ``fit``), with its embedding cache.

    Args:
        model: the site's AutoSam (built once per process; SAM stays local).
        site: the site's :class:`SiteConfig`.
        cache_dir: embedding cache root (``site.cache_dir`` wins when set); None -> default.
        base_dir: folder of the site YAML, for relative dataset paths.

    Raises:
        ConfigError: missing dataset folder or empty training split (at construction).
    """

    def __init__(self, model: AutoSam, site: SiteConfig, cache_dir: Path | None = None,
                 base_dir: Path | None = None, progress: bool = True):
        from .precision import resolve_device, resolve_precision

        self.device = resolve_device(site.device)
        self.precision = resolve_precision(site.precision, self.device)
        model.sam.set_precision(self.precision)
        self.model, self.site, self.progress = model.to(self.device), site, progress
        log.info("site %s: device %s, precision %s", site.site_id, self.device, self.precision)
        pairs = resolve_pairs(site.data, base_dir, unreadable="error")
        self.train_pairs, self.val_pairs = split_validation(pairs, site.val_fraction, seed=0)
        root = Path(site.cache_dir) if site.cache_dir else cache_dir
        if site.cache_dir and base_dir is not None and not root.is_absolute():
            root = base_dir / root
        self.cache = EmbeddingCache(model.sam, root)
        self.dataset = AutoSamDataset(model, self.train_pairs, site.augmentation, self.cache)

    @property
    def num_examples(self) -> int:
        """Number of training samples at this site."""
        return len(self.train_pairs)

    def ensure_embeddings(self) -> None:
        """Fill the embedding cache for the training images; called by every ``fit`` (an image edited
        in place since the last round is re-encoded: cache keys follow file bytes)."""
        self.cache.ensure([p.image_path for p in self.train_pairs], load_image, progress=self.progress,
                          desc=f"{self.site.site_id}: SAM embeddings")

    def fit(self, epochs: int, proximal_mu: float = 0.0, seed: int = 0) -> dict:
        """Train the model in place for ``epochs`` local epochs; see :func:`train_epochs`.

        ``seed`` fixes everything random here: data order (the DataLoader's generator), augmentation
        (albumentations' own stream) and torch's global RNG inside the run (restored afterwards), so
        one seed gives bit-identical weights on CPU.
        """
        self.ensure_embeddings()
        opt = torch.optim.Adam(self.model.prompt_generator.parameters(), lr=self.site.lr,
                               weight_decay=self.site.weight_decay)
        self.dataset.reseed(seed)
        loader = make_loader(self.dataset, self.site.batch_size, shuffle=True, seed=seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            stats = train_epochs(self.model, loader, epochs, opt, proximal_mu=proximal_mu, progress=self.progress,
                                 desc=self.site.site_id)
        stats["num_examples"] = self.num_examples
        return stats


class CentralEvaluator:
    """Server-side evaluation of the global model on public benchmark splits.

    Args:
        model: AutoSam holding the global trainable state (moved to ``device``).
        refs: benchmark splits (:class:`DataRef`).
        cache_dir: embedding cache root.
        device, precision: as in :mod:`autosam_core.precision` (``auto``: CUDA if present; bf16 where
            fast), so the server's cache keys match the sites' when both use ``auto``.
    """

    def __init__(self, model: AutoSam, refs: Sequence[DataRef], cache_dir: Path | None = None,
                 base_dir: Path | None = None, progress: bool = False, device: str = "auto",
                 precision: str = "auto"):
        from .precision import resolve_device, resolve_precision

        dev = resolve_device(device)
        model.sam.set_precision(resolve_precision(precision, dev))
        self.model, self.progress = model.to(dev), progress
        self.benchmarks = {r.label: resolve_pairs(r, base_dir) for r in refs}
        self.cache = EmbeddingCache(model.sam, cache_dir)

    def evaluate(self, per_image: bool = False) -> dict[str, dict]:
        """{label: {"dice", "iou", "num_images", "seconds_per_image"}} (plus "per_image" if asked)."""
        out = {}
        for label, pairs in self.benchmarks.items():
            r = evaluate_pairs(self.model, pairs, self.cache, progress=self.progress, desc=label)
            if not per_image:
                r.pop("per_image")
            out[label] = r
        return out


def model_from_checkpoint(path: str | Path, sam: FrozenSam | None = None, device: str | torch.device = "cpu",
                          precision: str = "fp32") -> tuple[AutoSam, dict]:
    """Rebuild AutoSam from a checkpoint's metadata (``sam`` and ``model`` configs) and load g/h.

    ``device``/``precision`` (resolved) apply when ``sam`` is not given; the state is loaded on the CPU
    and moved with the model (``map_location`` handled here once).

    Returns:
        (model in eval mode, metadata).

    Raises:
        CheckpointError: unreadable file, or a state that does not fit (one line naming the file, the
        first mismatched key and both shapes).
    """
    from .checkpoint import CheckpointError, load_checkpoint

    payload = load_checkpoint(path)
    meta = payload["metadata"]
    if "sam" not in meta or "model" not in meta:
        raise CheckpointError(f"checkpoint {path}: metadata lacks 'sam'/'model' configs; found keys {sorted(meta)}")
    try:
        sam_cfg, model_cfg = SamConfig(**meta["sam"]), ModelConfig(**meta["model"])
    except (TypeError, ValueError) as err:  # pydantic's ValidationError is a ValueError
        errors = err.errors() if hasattr(err, "errors") else []
        why = "; ".join(f"key '{'.'.join(map(str, e['loc']))}': {e['msg']} (found {e.get('input')!r})"
                        for e in errors[:2]) or str(err).splitlines()[0]
        raise CheckpointError(f"checkpoint {path}: metadata 'sam'/'model' do not describe a model of this tool: "
                              f"{why}") from None
    if sam is not None and sam.spec.kind != sam_cfg.kind:
        raise CheckpointError(f"checkpoint {path} was trained with SAM {sam_cfg.kind}, not {sam.spec.kind}")
    if sam is None:
        sam = load_frozen_sam(sam_cfg.kind, sam_cfg.checkpoint).to(device).set_precision(precision)
    model = build_autosam(sam_cfg, model_cfg, sam=sam)
    try:
        model.load_trainable_state(payload["trainable_state"])
    except StateMismatchError as err:
        raise CheckpointError(f"checkpoint {path} does not fit the model its metadata describes "
                              f"(g {model_cfg.backbone}, SAM {sam_cfg.kind}): {err}") from None
    model.eval()
    return model, meta
