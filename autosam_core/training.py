"""Training g with frozen SAM: local epochs (BCE + Dice, autocast, FedProx term), BatchNorm
recalibration, the surrogate decoder h, and one site's local training run (:class:`SiteTrainer`).

Used by centralised training (:mod:`autosam_core.central_training`), by a federated site for one
round and by the DP trainer (:mod:`autosam_core.privacy.trainer`). Never imports flwr.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .autosam import AutoSam
from .config import SiteConfig
from .data.cache import EmbeddingCache
from .data.dataset import resolve_pairs, split_validation
from .data.torch_dataset import AutoSamDataset, make_loader
from .losses import bce_dice_loss
from .metrics import dice_iou

log = logging.getLogger(__name__)


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
                 scaler: torch.amp.GradScaler | None = None, max_steps: int | None = None) -> dict:
    """Train g for ``epochs`` epochs with frozen SAM (paper section 3), or ``max_steps`` steps.

    g and SAM's decoder run under autocast in ``model.sam.precision`` (see
    :mod:`autosam_core.precision`); the loss, master weights and optimizer state stay float32.

    Args:
        proximal_mu: FedProx proximal weight mu; adds mu/2 * ||w - w_start||^2 over g's parameters.
        recalibrate_bn: after training, re-estimate g's BatchNorm statistics on the same loader
            (:func:`recalibrate_batchnorm`), so that eval-mode predictions match training.
        scheduler: optional per-step learning-rate scheduler (:func:`lr_schedule`).
        scaler: optional gradient scaler (fp16 on CUDA, :func:`autosam_core.precision.grad_scaler`).
        max_steps: stop after this many optimizer steps (within ``epochs``; None: whole epochs); the
            BatchNorm recalibration then reads as many batches.

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
        if max_steps is not None and steps >= max_steps:
            break  # the last epoch's statistics stay those of the batches trained
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
            if max_steps is not None and steps >= max_steps:
                break  # before the loader reads a batch that would not be trained on
            t_wait = time.perf_counter()
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"training loss became {loss_sum} in epoch {epoch + 1}")
    if recalibrate_bn and steps:
        recalibrate_batchnorm(model, loader, max_batches=max_steps)
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


class SiteTrainer:
    """One site's local training (a federated round's ``fit``), with its embedding cache.

    Args:
        model: the site's AutoSam (built once per process; SAM stays local).
        site: the site's :class:`SiteConfig`.
        cache_dir: embedding cache root (``site.cache_dir`` wins when set); None -> default.
        base_dir: folder of the site YAML, for relative dataset paths.
        state_dir: the site's persistent folder, where ``optimizer_state: keep`` keeps its Adam
            moments between rounds; None keeps them in this object's memory.

    Raises:
        ConfigError: missing dataset folder or empty training split (at construction).
    """

    #: g's memory format while this trainer holds it (:meth:`AutoSam.set_channels_last`): None decides
    #: per device and precision (:func:`autosam_core.precision.prefers_channels_last`, measured); the
    #: DP trainer fixes it to False for Opacus.
    CHANNELS_LAST: bool | None = None

    def __init__(self, model: AutoSam, site: SiteConfig, cache_dir: Path | None = None,
                 base_dir: Path | None = None, progress: bool = True, state_dir: Path | None = None):
        from .optimizer_state import OptimizerStateStore
        from .precision import prefers_channels_last, resolve_device, resolve_precision

        self.device = resolve_device(site.device)
        self.precision = resolve_precision(site.precision, self.device)
        model.sam.set_precision(self.precision)
        self.model, self.site, self.progress = model.to(self.device), site, progress
        channels_last = (prefers_channels_last(self.device, self.precision) if self.CHANNELS_LAST is None
                         else self.CHANNELS_LAST)
        model.set_channels_last(channels_last)
        log.info("site %s: device %s, precision %s, g in %s", site.site_id, self.device, self.precision,
                 "channels_last" if channels_last else "contiguous memory format")
        pairs = resolve_pairs(site.data, base_dir, unreadable="error")
        self.train_pairs, self.val_pairs = split_validation(pairs, site.val_fraction, seed=0)
        root = Path(site.cache_dir) if site.cache_dir else cache_dir
        if site.cache_dir and base_dir is not None and not root.is_absolute():
            root = base_dir / root
        self.cache = EmbeddingCache(model.sam, root)
        self.dataset = AutoSamDataset(model, self.train_pairs, site.augmentation, self.cache, hflip_p=site.hflip)
        self.optimizer_store = (OptimizerStateStore(Path(state_dir) / f"optimizer-{site.site_id}.pt" if state_dir
                                                    else None) if site.optimizer_state == "keep" else None)

    @property
    def training_precision(self) -> str:
        """The precision g trains in here: ``fp32``, ``bf16`` or ``fp16`` (the site's resolved
        ``precision``; the DP trainer always trains in fp32)."""
        return self.precision

    @property
    def num_examples(self) -> int:
        """Number of training samples at this site."""
        return len(self.train_pairs)

    def ensure_embeddings(self) -> None:
        """Fill the embedding cache for the training images; called by every ``fit`` (an image edited
        in place since the last round is re-encoded: cache keys follow file bytes)."""
        self.dataset.fill_cache(progress=self.progress, desc=f"{self.site.site_id}: SAM embeddings")

    def fit(self, epochs: int, proximal_mu: float = 0.0, seed: int = 0, run_id: str = "",
            server_round: int = 0) -> dict:
        """Train the model in place for ``epochs`` local epochs, or the site's ``local_steps`` steps when
        set (then ``epochs`` is ignored); see :func:`train_epochs`.

        ``seed`` fixes everything random here: data order (the DataLoader's generator), augmentation
        (albumentations' own stream) and torch's global RNG inside the run (restored afterwards), so
        one seed gives bit-identical weights on CPU. With the site's ``optimizer_state: keep`` the
        Adam moments saved by round ``server_round - 1`` of run ``run_id`` are restored first and this
        round's are saved after (:mod:`autosam_core.optimizer_state`); ``reset``: a fresh Adam.

        Raises:
            OptimizerStateError: the kept optimizer file is unreadable or does not fit g.
        """
        self.ensure_embeddings()
        opt = torch.optim.Adam(self.model.prompt_generator.parameters(), lr=self.site.lr,
                               weight_decay=self.site.weight_decay)
        if self.optimizer_store is not None and self.optimizer_store.load_into(opt, run_id, server_round):
            log.info("site %s: Adam moments of round %d kept (optimizer_state: keep)", self.site.site_id,
                     server_round - 1)
        self.dataset.reseed(seed)
        loader = make_loader(self.dataset, self.site.batch_size, shuffle=True, seed=seed)
        steps = self.site.local_steps
        if steps is not None:  # the site's local_steps replace whole epochs (and a server's local-epochs)
            epochs = math.ceil(steps / max(len(loader), 1))
            log.info("site %s: %d local steps this round (local_steps; %d batches per epoch)", self.site.site_id,
                     steps, len(loader))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            stats = train_epochs(self.model, loader, epochs, opt, proximal_mu=proximal_mu, progress=self.progress,
                                 desc=self.site.site_id, max_steps=steps)
        if self.optimizer_store is not None:
            self.optimizer_store.save(opt, run_id, server_round)
        stats["num_examples"] = self.num_examples
        return stats
