"""DP-SGD training of g at a site (Abadi et al., CCS 2016) with Opacus, and the DP site trainer.

Each site trains g with DP-SGD: Poisson-sampled batches (each record joins each step's batch
independently with probability q), every per-sample gradient clipped to L2 norm <= C
(``max_grad_norm``), Gaussian noise N(0, sigma^2 C^2) added to the sum, divided by the expected batch
size q N. Implementation: Opacus 1.6 (Yousefpour et al. 2021, https://opacus.ai)
``PrivacyEngine.make_private``, ``GradSampleModule`` (per-sample gradients by hooks), ``DPOptimizer``,
``UniformWithReplacementSampler``.

Only g gets per-sample gradients: Opacus wraps ``AutoSam.prompt_generator`` alone; the loss flows
through the frozen SAM mask decoder (:meth:`FrozenSam.decode`, eval mode, no hooks, decoded one sample
at a time so no information crosses samples), whose weights stay bit-identical. The surrogate decoder
h is not trained here.

Empty Poisson batches: a step whose batch is empty is still a step of the sampled Gaussian mechanism.
It is taken as a *noise-only* step (sum of clipped gradients = 0, plus the same Gaussian noise, the
optimizer steps) and the accountant counts it. Skipping the update would reveal that the batch was
empty, which the accountant's analysis does not cover. This matches what Opacus 1.6's
``DPOptimizer`` does for a zero-length ``grad_sample``.

Budget: a site whose next round would take it past its target epsilon does not train
(:meth:`DPSiteTrainer.fit` returns ``num_examples`` 0 and ``skip_reason``).
"""

from __future__ import annotations

import logging
import math
import secrets
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate
from tqdm import tqdm

from ..autosam import AutoSam
from ..config import ConfigError, PrivacyConfig, SiteConfig
from ..training import SiteTrainer, check_sam_frozen, masked_loss_and_dice
from .accounting import calibrate_noise_multiplier, check_delta, poisson_sample_rate, steps_per_epoch
from .compat import check_private_compatible
from .errors import warn_privacy as _warn
from .ledger import PrivacyLedger

__all__ = ["dp_train_epochs", "DPSiteTrainer"]

log = logging.getLogger("autosam_core.privacy")


def _collate_or_none(items: list) -> dict | None:
    """default_collate, or None for an empty Poisson batch."""
    return default_collate(items) if items else None


def _embeddings(model: AutoSam, batch: dict) -> torch.Tensor:
    if "image_embeddings" in batch:
        return batch["image_embeddings"].to(model.sam.device)
    return model.sam.encode(batch["sam_input"])


def _batch_loss(model: AutoSam, g: nn.Module, batch: dict) -> tuple[torch.Tensor, float]:
    """Mean per-sample BCE+Dice of one non-empty batch, g applied through ``g`` (e.g. a GradSampleModule).

    g reads ``g_input`` (B, 3, G, G) and, when it fuses them, SAM's image_embeddings (B, 256, 64, 64).
    """
    emb = _embeddings(model, batch)
    g_in = batch["g_input"].to(model.sam.device) if "g_input" in batch else None
    fused = getattr(model.prompt_generator, "fuse_embeddings", False)
    dense_prompt_embeddings = g(g_in, emb) if fused else g(g_in)
    low_res_logits = model.sam.decode(emb, dense_prompt_embeddings)
    return masked_loss_and_dice(low_res_logits, batch["target"], batch["valid"])


def _backward(loss: torch.Tensor) -> None:
    with warnings.catch_warnings():  # g's first layer has no input requiring grad: expected, harmless
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        loss.backward()


def _drop_opacus_attrs(module: nn.Module) -> None:
    for p in module.parameters():
        for attr in ("grad_sample", "summed_grad", "_forward_counter", "_current_grad_sample", "_norm_sample"):
            if hasattr(p, attr):
                delattr(p, attr)


def _generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded from ``seed``, or from the OS's entropy (:mod:`secrets`) when None.
    Opacus draws the noise with it on the parameters' device, so the noise generator must live there
    (a CPU generator for CUDA parameters raises "Expected a 'cuda' device type for generator")."""
    return torch.Generator(device=device).manual_seed(secrets.randbits(63) if seed is None else int(seed))


def dp_train_epochs(model: AutoSam, dataset: Dataset, *, epochs: int, batch_size: int, noise_multiplier: float,
                    max_grad_norm: float, lr: float = 3e-4, weight_decay: float = 1e-5,
                    ledger: PrivacyLedger | None = None, proximal_mu: float = 0.0, insecure_seed: int | None = None,
                    progress: bool = False, desc: str = "dp-train") -> dict:
    """Train g with DP-SGD for ``epochs`` epochs of Poisson-sampled steps (Abadi et al. 2016; Opacus).

    Opacus ``PrivacyEngine.make_private`` wraps g (only g) in a ``GradSampleModule`` and Adam in a
    ``DPOptimizer`` (flat clipping to ``max_grad_norm``, Gaussian noise of std
    ``noise_multiplier * max_grad_norm`` on the summed clipped gradients, divided by the expected
    batch size N q); the engine's accountant is restored from ``ledger`` first and copied back after
    every epoch (also if training fails), so steps already taken are never lost. Poisson sampling:
    Opacus ``UniformWithReplacementSampler`` with q = :func:`poisson_sample_rate` (N, batch_size),
    ``steps_per_epoch(q)`` steps per epoch. An empty batch is a noise-only step (module docstring).
    FedProx: mu (w - w_start) is added to the noised gradient (data-independent, no privacy cost).
    SAM is only used through :meth:`FrozenSam.decode` (eval, no hooks, unchanged).

    Args:
        model: AutoSam whose g passes :func:`check_private_compatible`.
        dataset: items as :class:`autosam_core.data.torch_dataset.AutoSamDataset` (``g_input``, ``target``,
            ``valid`` and ``image_embeddings`` or ``sam_input``).
        epochs: local epochs (>= 1). batch_size: expected batch size B.
        noise_multiplier: sigma (>= 0; 0 means no privacy: epsilon is infinite).
        max_grad_norm: per-sample clipping bound C (L2 norm, > 0).
        lr, weight_decay: Adam's (paper: 3e-4, 1e-5).
        ledger: accountant state to continue and update (in memory if None).
        insecure_seed: seed for sampling and noise, for reproducible tests only (a seed someone else
            knows lets them recompute the noise: the guarantee is void). None: fresh OS entropy.

    Returns:
        {"loss", "dice" (means over the non-empty samples of the last epoch), "num_examples"
        (records N), "samples" (records drawn in the last epoch), "steps" (DP steps taken, empty ones
        included), "empty_steps", "sample_rate" q, "noise_multiplier", "seconds" (wall time, s),
        "seconds_per_step"}.

    Raises:
        DPCompatibilityError: g is not DP-compatible. ValueError: epochs < 1 or an empty dataset.
        FloatingPointError: the loss became non-finite.
    """
    from opacus import PrivacyEngine

    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, found {epochs}")
    n_records = len(dataset)
    q = poisson_sample_rate(n_records, batch_size)
    k = steps_per_epoch(q)
    g = model.prompt_generator
    check_private_compatible(g)
    check_sam_frozen(model)
    if model.sam.precision != "fp32":
        # Per-sample clipping is checked in float32 only: DP-SGD runs g and SAM's decoder in fp32.
        log.info("DP-SGD runs in fp32 (site precision %s applies to the SAM encoder and evaluation only)",
                 model.sam.precision)
    ledger = ledger if ledger is not None else PrivacyLedger(None)
    if noise_multiplier == 0:
        _warn("DP noise_multiplier is 0: clipping only, no privacy (epsilon is infinite)")

    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    sampling_gen = _generator(insecure_seed)
    noise_gen = _generator(None if insecure_seed is None else insecure_seed + 1,
                           device=next(g.parameters()).device)  # noise is drawn where g's parameters are
    sampler = UniformWithReplacementSampler(num_samples=n_records, sample_rate=q, generator=sampling_gen, steps=k)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=_collate_or_none, num_workers=0)
    was_training = g.training
    g.train()
    optimizer = torch.optim.Adam([p for p in g.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant=ledger.mechanism)
    if ledger.history:
        engine.accountant.load_state_dict({"history": list(ledger.history), "mechanism": ledger.mechanism})
    # poisson_sampling=False: the loader above already samples (Opacus's own Poisson sampler); letting
    # make_private rebuild it would crash on a first empty batch of dict items (Opacus 1.6).
    gsm, dp_optimizer, _ = engine.make_private(
        module=g, optimizer=optimizer, data_loader=loader, noise_multiplier=float(noise_multiplier),
        max_grad_norm=float(max_grad_norm), poisson_sampling=False, loss_reduction="mean",
        noise_generator=noise_gen)
    gsm.forbid_grad_accumulation()
    if abs(1.0 / len(loader) - q) > 1e-12:
        raise RuntimeError(f"Opacus accounts sample rate {1.0 / len(loader)} but the sampler uses {q}")
    # Opacus sets int(N q), which float rounding can make 0 (N = 49, q = 1/49): divide by N q itself.
    dp_optimizer.expected_batch_size = n_records * q
    anchor = [p.detach().clone() for p in dp_optimizer.params] if proximal_mu > 0 else None

    saved_precision, model.sam.precision = model.sam.precision, "fp32"  # restored in the finally below
    t0, steps, empty = time.perf_counter(), 0, 0
    loss_sum, dice_sum, n = 0.0, 0.0, 0
    try:
        for epoch in range(epochs):
            loss_sum, dice_sum, n = 0.0, 0.0, 0
            bar = tqdm(loader, desc=f"{desc} epoch {epoch + 1}/{epochs}", leave=False, disable=not progress,
                       unit="step")
            for batch in bar:
                dp_optimizer.zero_grad(set_to_none=True)
                b = 0 if batch is None else int(batch["target"].shape[0])
                if b == 0:
                    # Noise-only step: zero-length per-sample gradients -> clipped sum 0, plus noise.
                    for p in dp_optimizer.params:
                        p.grad_sample = p.new_zeros((0, *p.shape))
                    empty += 1
                else:
                    loss, dice = _batch_loss(model, gsm, batch)
                    _backward(loss)
                    loss_sum, dice_sum, n = loss_sum + loss.item() * b, dice_sum + dice * b, n + b
                if anchor is None:
                    dp_optimizer.step()
                elif dp_optimizer.pre_step():  # clip, noise, scale, account
                    for p, a in zip(dp_optimizer.params, anchor):
                        p.grad.add_(p.detach() - a, alpha=proximal_mu)
                    dp_optimizer.original_optimizer.step()
                steps += 1
                bar.set_postfix(batch=b)
            ledger.history = [tuple(h) for h in engine.accountant.history]
            ledger.save()
            if not math.isfinite(loss_sum):
                raise FloatingPointError(f"DP training loss became {loss_sum} in epoch {epoch + 1}")
    finally:
        model.sam.precision = saved_precision
        ledger.history = [tuple(h) for h in engine.accountant.history]
        ledger.save()
        dp_optimizer.zero_grad(set_to_none=True)
        gsm._close()
        _drop_opacus_attrs(g)
        g.train(was_training)
    seconds = time.perf_counter() - t0
    return {"loss": loss_sum / max(n, 1), "dice": dice_sum / max(n, 1), "num_examples": n_records, "samples": n,
            "steps": steps, "empty_steps": empty, "sample_rate": q, "noise_multiplier": float(noise_multiplier),
            "seconds": seconds, "seconds_per_step": seconds / max(steps, 1)}


class DPSiteTrainer(SiteTrainer):
    """One site's local training with record-level DP (drop-in for :class:`SiteTrainer` when
    ``site.privacy`` is set).

    Noise: ``privacy.noise_multiplier`` if given; else calibrated once (first round) so that
    ``planned_rounds x local_epochs`` epochs spend ``privacy.target_epsilon`` at ``privacy.delta``
    (:func:`calibrate_noise_multiplier`), stored in the ledger and reused by later rounds. Budget: with
    a ``target_epsilon``, a round that would exceed it is not run (:meth:`fit` returns
    ``num_examples`` 0 and ``skip_reason``); the client must then reply with unchanged weights.

    Args:
        model: the site's AutoSam; its g must already be DP-compatible
            (:func:`make_autosam_private_compatible`, the same on every site and the server).
        site: the site's config; ``site.privacy`` must be set.
        state_dir: folder of the site's persistent state; the ledger is
            ``<state_dir>/privacy-<site_id>.json`` (keep it for the whole life of the data set: the
            budget is per data set, also across resumed federations).
        planned_rounds: rounds the budget is spread over (overrides ``privacy.planned_rounds``;
            pass the federation's ``rounds``).
        cache_dir, base_dir, progress: as :class:`SiteTrainer`.

    Raises:
        ConfigError: no ``privacy`` section, or neither target_epsilon nor noise_multiplier;
        DPCompatibilityError: g not DP-compatible; PrivacyLedgerError: bad ledger file. Warns
        (:class:`PrivacyWarning`) on a clamped sample rate and on delta >= 1/N.
    """

    CHANNELS_LAST = False  # Opacus' per-sample gradient hooks run on g in its default layout

    @property
    def training_precision(self) -> str:
        """DP-SGD always trains g in fp32 (the site's precision applies to SAM and evaluation only)."""
        return "fp32"

    def __init__(self, model: AutoSam, site: SiteConfig, state_dir: str | Path, cache_dir: Path | None = None,
                 base_dir: Path | None = None, progress: bool = True, planned_rounds: int | None = None):
        if site.privacy is None:
            raise ConfigError(f"site {site.site_id}: DPSiteTrainer needs a 'privacy' section in the site config")
        p = site.privacy
        if p.target_epsilon is None and p.noise_multiplier is None:
            raise ConfigError(f"site {site.site_id}: privacy needs target_epsilon (with delta) or noise_multiplier")
        check_private_compatible(model.prompt_generator)
        super().__init__(model, site, cache_dir=cache_dir, base_dir=base_dir, progress=progress)
        self.privacy: PrivacyConfig = p
        self.planned_rounds = planned_rounds or p.planned_rounds
        self.sample_rate = poisson_sample_rate(self.num_examples, site.batch_size)
        check_delta(p.delta, self.num_examples)
        self.ledger = PrivacyLedger(Path(state_dir) / f"privacy-{site.site_id}.json", mechanism=p.accountant)

    @property
    def steps_per_epoch(self) -> int:
        """Poisson steps per local epoch, ceil(N / batch_size)."""
        return steps_per_epoch(self.sample_rate)

    def _next_noise(self, epochs: int) -> tuple[float, int | None]:
        """(sigma, planned steps or None) for the next round, computed without touching the ledger.

        Raises:
            ConfigError: target_epsilon without planned rounds, or an unreachable budget.
        """
        p, led = self.privacy, self.ledger
        if p.noise_multiplier is not None:
            return float(p.noise_multiplier), None
        if led.noise_multiplier is not None and led.sample_rate == self.sample_rate:
            return float(led.noise_multiplier), led.planned_steps
        if not self.planned_rounds:
            raise ConfigError(f"site {self.site.site_id}: privacy.target_epsilon needs privacy.planned_rounds (or "
                              "the federation's rounds) to spread the budget over")
        planned = self.planned_rounds * epochs * self.steps_per_epoch
        return calibrate_noise_multiplier(p.target_epsilon, p.delta, self.sample_rate, planned, p.accountant), planned

    def noise_multiplier(self, epochs: int) -> float:
        """sigma for the next round of ``epochs`` local epochs (see the class docstring).

        A first calibration (or a recalibration after the sample rate changed) is stored in the ledger
        and the ledger file is written; a fixed ``privacy.noise_multiplier`` is recorded in memory and
        written with the round.

        Raises:
            ConfigError: target_epsilon without planned rounds, or an unreachable budget.
        """
        p, led = self.privacy, self.ledger
        sigma, planned = self._next_noise(epochs)
        if p.noise_multiplier is not None:
            if led.noise_multiplier is not None and led.noise_multiplier != sigma:
                log.warning("site %s: noise_multiplier changed from %s to %s (the ledger accounts each step)",
                            self.site.site_id, led.noise_multiplier, sigma)
            led.noise_multiplier, led.sample_rate = sigma, self.sample_rate
            return sigma
        if led.noise_multiplier == sigma and led.sample_rate == self.sample_rate:
            return sigma
        if led.noise_multiplier is not None:
            log.warning("site %s: sample rate changed from %s to %s; noise recalibrated (spent budget kept)",
                        self.site.site_id, led.sample_rate, self.sample_rate)
        log.info("site %s: DP noise multiplier %.4f for epsilon %.3g at delta %.3g over %d steps (q = %.4g)",
                 self.site.site_id, sigma, p.target_epsilon, p.delta, planned, self.sample_rate)
        led.noise_multiplier, led.sample_rate, led.planned_steps = sigma, self.sample_rate, planned
        led.save()
        return sigma

    def spent_epsilon(self) -> float:
        """Epsilon spent so far by this site at ``privacy.delta``."""
        return self.ledger.spent_epsilon(self.privacy.delta)

    def would_exceed(self, epochs: int) -> bool:
        """True if a round of ``epochs`` local epochs would exceed ``privacy.target_epsilon`` (False without one).

        A yes/no question: it re-reads the ledger file (another process may have trained this site)
        and never writes it, nor changes the ledger's calibration; an uncalibrated site's sigma is
        computed for the answer and discarded.

        Raises:
            ConfigError: target_epsilon without planned rounds, or an unreachable budget.
            PrivacyLedgerError: the ledger file is unreadable.
        """
        if self.privacy.target_epsilon is None:
            return False
        self.ledger.load()
        sigma, _ = self._next_noise(epochs)
        return self.ledger.would_exceed(self.privacy.target_epsilon, self.privacy.delta,
                                        epochs * self.steps_per_epoch, sigma, self.sample_rate)

    def fit(self, epochs: int, proximal_mu: float = 0.0, seed: int = 0, run_id: str = "", server_round: int = 0,
            insecure_seed: int | None = None) -> dict:
        """One round of DP training of g in place, or nothing if the budget would be exceeded.

        The ledger is re-read from its file first, so a long-lived trainer never accounts from a stale
        copy when another process has trained this site in between.

        Args:
            epochs: local epochs. proximal_mu: FedProx mu.
            seed: accepted for :class:`SiteTrainer` compatibility and ignored: a public seed must not
                drive DP sampling or noise. run_id, server_round: accepted and ignored (a DP site
                cannot keep its optimizer state; :class:`SiteConfig` refuses ``optimizer_state: keep``).
            insecure_seed: reproducible sampling/noise for tests only (voids the guarantee).

        Returns:
            :func:`dp_train_epochs`'s dict plus ``epsilon`` (spent after the round), ``delta``,
            ``target_epsilon``, ``dp_steps_total``, ``skip_reason`` (None when trained). When the round
            would exceed the budget nothing is trained and the dict has ``num_examples`` 0,
            ``steps`` 0 and a ``skip_reason`` text.
        """
        p = self.privacy
        # The file is the truth: another process (a deployment's next round, another simulation actor
        # serving this site) may have trained this site since this trainer last looked.
        self.ledger.load()
        sigma = self.noise_multiplier(epochs)
        next_steps = epochs * self.steps_per_epoch
        base = {"delta": p.delta, "target_epsilon": p.target_epsilon, "sample_rate": self.sample_rate,
                "noise_multiplier": sigma}
        if self.would_exceed(epochs):
            spent = self.spent_epsilon()
            reason = (f"privacy budget: {next_steps} more steps would exceed target epsilon {p.target_epsilon} "
                      f"(spent {spent:.4g} at delta {p.delta:g} over {self.ledger.steps} steps)")
            log.warning("site %s: not training this round: %s", self.site.site_id, reason)
            return {**base, "loss": 0.0, "dice": 0.0, "num_examples": 0, "samples": 0, "steps": 0, "empty_steps": 0,
                    "seconds": 0.0, "seconds_per_step": 0.0, "epsilon": spent, "dp_steps_total": self.ledger.steps,
                    "skip_reason": reason}
        self.ensure_embeddings()
        stats = dp_train_epochs(self.model, self.dataset, epochs=epochs, batch_size=self.site.batch_size,
                                noise_multiplier=sigma, max_grad_norm=p.max_grad_norm, lr=self.site.lr,
                                weight_decay=self.site.weight_decay, ledger=self.ledger, proximal_mu=proximal_mu,
                                insecure_seed=insecure_seed, progress=self.progress, desc=self.site.site_id)
        eps = self.spent_epsilon()
        self.ledger.rounds.append({"steps": stats["steps"], "empty_steps": stats["empty_steps"], "epsilon": eps,
                                   "delta": p.delta, "noise_multiplier": sigma, "sample_rate": self.sample_rate,
                                   "utc": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        self.ledger.save()
        log.info("site %s: DP round done: %d steps (%d empty), epsilon %.4g at delta %.3g", self.site.site_id,
                 stats["steps"], stats["empty_steps"], eps, p.delta)
        return {**stats, **base, "epsilon": eps, "dp_steps_total": self.ledger.steps, "skip_reason": None}
