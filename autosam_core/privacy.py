"""Record-level differential privacy at a site: DP-SGD on the prompt generator g with Opacus.

What is protected: one training record (an image and its mask) of one site. Each site trains g with
DP-SGD (Abadi et al., "Deep Learning with Differential Privacy", CCS 2016): Poisson-sampled batches
(each record joins each step's batch independently with probability q, the sample rate), every
per-sample gradient clipped to L2 norm <= C (``max_grad_norm``), Gaussian noise N(0, sigma^2 C^2)
added to the sum, divided by the expected batch size q N. The privacy loss is tracked by an Opacus
accountant: RDP (Mironov, "Renyi Differential Privacy", CSF 2017; Mironov, Talwar, Zhang 2019 for the
sampled Gaussian mechanism) by default, or PRV (Gopi, Lee, Wutschitz 2021). Guarantees are
(epsilon, delta)-DP: epsilon is unitless (a log-likelihood-ratio bound, smaller is more private),
delta a probability (choose delta << 1/N, N = number of training records of the site).
Implementation: Opacus 1.6 (Yousefpour et al. 2021, https://opacus.ai) ``PrivacyEngine.make_private``,
``GradSampleModule`` (per-sample gradients by hooks), ``DPOptimizer``, ``UniformWithReplacementSampler``.

Only g gets per-sample gradients: Opacus wraps ``AutoSam.prompt_generator`` alone in a
``GradSampleModule``; the loss flows through the frozen SAM mask decoder (:meth:`FrozenSam.decode`,
eval mode, no hooks, decoded one sample at a time so no information crosses samples), whose weights
stay bit-identical. The surrogate decoder h is not trained here.

Model change (matters for federation): BatchNorm mixes the samples of a batch (and its running
statistics are un-noised data statistics that would travel to the server), so
:func:`make_private_compatible` replaces every BatchNorm of g by GroupNorm. g's trainable state then
has different keys (no ``running_mean``/``running_var``/``num_batches_tracked``) from the BatchNorm g
of a non-DP site: **a federation runs DP on all its sites or on none**, and the server must build its
global g the same way. :func:`dp_state_signature` gives a short fingerprint of a trainable state's
keys, shapes and dtypes for the server to compare; :func:`require_uniform_privacy` checks site configs.

Accounting across rounds: each round may run in a fresh process, so a site's accountant history
``[(noise_multiplier, sample_rate, steps), ...]`` is persisted in a JSON file (:class:`PrivacyLedger`)
and restored before the next round. A site whose next round would take it past its target epsilon
does not train (:meth:`PrivacyLedger.would_exceed`, :meth:`DPSiteTrainer.fit` returns
``num_examples`` 0 and ``skip_reason``).

Empty Poisson batches: a step whose batch is empty is still a step of the sampled Gaussian mechanism.
It is taken as a *noise-only* step (sum of clipped gradients = 0, plus the same Gaussian noise, the
optimizer steps) and the accountant counts it. Skipping the update would reveal that the batch was
empty, which the accountant's analysis does not cover. This matches what Opacus 1.6's
``DPOptimizer`` does for a zero-length ``grad_sample``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import secrets
import time
import warnings
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate
from tqdm import tqdm

from .autosam import AutoSam
from .checkpoint import atomic_write_text
from .config import ConfigError, PrivacyConfig, SiteConfig
from .data.io import load_image
from .engine import SiteTrainer, check_sam_frozen, masked_loss_and_dice

log = logging.getLogger(__name__)

MAX_GROUPS = 32
LEDGER_FORMAT = 1
ACCOUNTANTS = ("rdp", "prv")

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class PrivacyWarning(UserWarning):
    """A DP setting is legal but weak or surprising (clamped sample rate, delta >= 1/N, sigma = 0)."""


class DPCompatibilityError(ValueError):
    """g cannot be trained with per-sample gradients; the message names every offending module."""


class PrivacyLedgerError(ValueError):
    """A site's privacy ledger file is unreadable or was written with another accountant."""


def _warn(msg: str) -> None:
    log.warning(msg)
    warnings.warn(msg, PrivacyWarning, stacklevel=3)


# ----- model preparation ------------------------------------------------------------------------
def groupnorm_groups(channels: int, max_groups: int = MAX_GROUPS) -> int:
    """Number of GroupNorm groups that replaces a BatchNorm over ``channels`` channels.

    Rule: the largest divisor of ``channels`` that is <= ``max_groups`` (32, Wu & He, "Group
    Normalization", ECCV 2018) and <= channels / 2, so every group holds >= 2 channels. With one
    channel per group, a layer that sees a 1x1 map normalises a single value: its output is the
    bias alone and no gradient reaches what comes before. For ``channels == 1`` no such divisor
    exists: 1 group is returned with a :class:`PrivacyWarning`.

    Examples: 256 -> 32, 48 -> 24, 14 -> 7, 3 -> 1, 2 -> 1.

    Raises:
        ValueError: ``channels < 1`` or ``max_groups < 1``.
    """
    if channels < 1 or max_groups < 1:
        raise ValueError(f"groupnorm_groups needs channels >= 1 and max_groups >= 1, found {channels}, {max_groups}")
    limit = min(max_groups, channels // 2)
    for g in range(limit, 0, -1):
        if channels % g == 0:
            return g
    _warn("GroupNorm over 1 channel: each sample's channel is normalised alone (degenerate on a 1x1 map)")
    return 1


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    parent._modules[leaf] = new


def _has_trainable_params(m: nn.Module) -> bool:
    return any(p.requires_grad for p in m.parameters(recurse=False))


def _incompatibilities(module: nn.Module) -> list[tuple[str, str]]:
    from opacus.validators import ModuleValidator

    problems = []
    for name, m in module.named_modules():
        label = f"{name or '(root)'} ({type(m).__name__})"
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            problems.append((name, f"{label}: BatchNorm mixes the samples of a batch; replace it "
                                   "(make_private_compatible)"))
            continue
        if isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.track_running_stats:
            problems.append((name, f"{label}: track_running_stats=True keeps un-noised data statistics"))
        if getattr(m, "inplace", False) is True:
            problems.append((name, f"{label}: inplace=True breaks Opacus's backward hooks"))
        if _has_trainable_params(m):
            buffers = [b for b, _ in m.named_buffers(recurse=False)]
            if buffers:
                problems.append((name, f"{label}: trainable layer with buffers {buffers}"))
            validator = ModuleValidator.VALIDATORS.get(type(m))
            if validator is not None:
                problems.extend((name, f"{label}: {err}") for err in validator(m))
    return problems


def dp_incompatibilities(module: nn.Module) -> list[str]:
    """Reasons ``module`` cannot be trained with Opacus per-sample gradients, one line per problem,
    each naming its module (dotted name and type).

    Checks: any BatchNorm (of any subclass, trainable or not: it mixes the samples of a batch and
    its running statistics are un-noised data statistics); InstanceNorm with
    ``track_running_stats``; a trainable layer holding buffers (Opacus ``GradSampleModule.validate``);
    a module still ``inplace=True``; and every error of Opacus's registered module validators
    (``ModuleValidator.VALIDATORS``: e.g. LSTM, GRU, MultiheadAttention need Opacus's DP variants).
    Returns an empty list for a compatible module. The module's train/eval mode is not checked.
    Functional in-place ops inside a ``forward`` cannot be seen here (Opacus fails at the first
    backward pass instead).
    """
    return [text for _, text in _incompatibilities(module)]


def make_private_compatible(module: nn.Module, max_groups: int = MAX_GROUPS) -> nn.Module:
    """A copy of g that Opacus can train with per-sample gradients (``ModuleValidator.fix``, our rules).

    1. Every BatchNorm1d/2d/3d/SyncBatchNorm over C channels becomes ``GroupNorm(groups, C)`` with
       ``groups = groupnorm_groups(C)`` (>= 2 channels per group), the same eps and affine flag; the
       affine weight and bias are copied (running statistics are dropped). Each replacement is logged
       at INFO: module name, C, groups.
    2. Every module with ``inplace=True`` (ReLU, ReLU6, LeakyReLU, Hardtanh, Dropout, ...) gets
       ``inplace=False``: an in-place op on a hooked module's output breaks Opacus's backward hooks.
    3. :func:`dp_incompatibilities` and Opacus ``ModuleValidator.validate`` (in train mode) must then
       report nothing.

    The input module is not modified. The copy keeps the input's train/eval mode. Its state has
    other keys than the input's (see the module docstring and :func:`dp_state_signature`).

    Args:
        module: g (any nn.Module), e.g. ``AutoSam.prompt_generator``.
        max_groups: upper bound on GroupNorm groups (32).

    Returns:
        The compatible copy.

    Raises:
        DPCompatibilityError (a ValueError): something cannot be fixed, e.g. a BatchNorm subclass with
        extra behaviour (timm's BatchNormAct2d), an LSTM, a trainable layer with buffers; the message
        names every offending module. Raised before any training.
    """
    from opacus.validators import ModuleValidator

    fixed = copy.deepcopy(module)
    unfixable = []
    for name, m in list(fixed.named_modules()):
        if not isinstance(m, nn.modules.batchnorm._BatchNorm):
            continue
        if type(m) not in _BN_TYPES:
            unfixable.append((name, f"{name} ({type(m).__name__}): BatchNorm subclass with extra behaviour; "
                                    "replace it by hand (e.g. timm GroupNormAct)"))
            continue
        c = m.num_features
        groups = groupnorm_groups(c, max_groups)
        ref = next(iter(m.parameters()), None)
        if ref is None:
            ref = m.running_mean if m.running_mean is not None else torch.empty(0)
        gn = nn.GroupNorm(groups, c, eps=m.eps, affine=m.affine, device=ref.device, dtype=ref.dtype)
        if m.affine:
            with torch.no_grad():
                gn.weight.copy_(m.weight)
                gn.bias.copy_(m.bias)
            gn.weight.requires_grad_(m.weight.requires_grad)
            gn.bias.requires_grad_(m.bias.requires_grad)
        gn.train(m.training)
        if name:
            _set_submodule(fixed, name, gn)
        else:  # the module itself is a BatchNorm
            fixed = gn
        log.info("DP: %s BatchNorm(C=%d) -> GroupNorm(groups=%d, %d channels per group)", name, c, groups, c // groups)
    n_inplace = 0
    for _, m in fixed.named_modules():
        if getattr(m, "inplace", False) is True:
            m.inplace = False
            n_inplace += 1
    if n_inplace:
        log.info("DP: set inplace=False on %d modules", n_inplace)
    skip = {name for name, _ in unfixable}
    problems = [text for _, text in unfixable] + [t for n, t in _incompatibilities(fixed) if n not in skip]
    was_training = fixed.training
    fixed.train()
    try:
        opacus_errors = ModuleValidator.validate(fixed, strict=False)
    finally:
        fixed.train(was_training)
    if problems or opacus_errors:
        lines = problems + [f"opacus: {e}" for e in opacus_errors if not problems]
        raise DPCompatibilityError("g cannot be trained with DP-SGD (Opacus per-sample gradients):\n  "
                                   + "\n  ".join(lines))
    return fixed


def check_private_compatible(module: nn.Module) -> None:
    """Raise :class:`DPCompatibilityError` naming each offending module if ``module`` is not DP-ready.

    Use before training; build g with :func:`make_private_compatible` (on every site and the server).
    """
    problems = dp_incompatibilities(module)
    if problems:
        raise DPCompatibilityError(
            "g is not ready for DP-SGD; build it with autosam_core.privacy.make_private_compatible (on every "
            "site and on the server, since it changes g's state keys):\n  " + "\n  ".join(problems))


def make_autosam_private_compatible(model: AutoSam, max_groups: int = MAX_GROUPS) -> AutoSam:
    """Replace ``model.prompt_generator`` in place by :func:`make_private_compatible` of it; returns ``model``.

    Call right after building the model, before loading any trainable state: on every DP site *and*
    on the server of a DP federation (the trainable state's keys change).
    """
    model.prompt_generator = make_private_compatible(model.prompt_generator, max_groups)
    return model


def dp_state_signature(state: Mapping[str, torch.Tensor] | nn.Module) -> str:
    """16-hex-digit fingerprint of a trainable state's keys, shapes and dtypes (not its values).

    A BatchNorm g and its GroupNorm (DP) version have different signatures, so a server can refuse a
    site whose model does not match the federation's before aggregating (send it as a string in a
    ConfigRecord, or as ``int(sig, 16)``, which fits in an unsigned 64-bit integer).

    Args:
        state: a trainable state (``AutoSam.trainable_state()``), an AutoSam (its trainable state is
            used) or any module (its ``state_dict()``).
    """
    if isinstance(state, AutoSam):
        state = state.trainable_state()
    elif isinstance(state, nn.Module):
        state = state.state_dict()
    text = "\n".join(f"{k}:{tuple(v.shape)}:{v.dtype}" for k, v in sorted(state.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def require_uniform_privacy(sites: Mapping[str, SiteConfig] | Sequence[SiteConfig]) -> bool:
    """True if every site trains with DP, False if none does.

    Raises:
        ConfigError: some sites have ``privacy`` and others not (names both groups): their g differ
        (GroupNorm vs BatchNorm), so their states cannot be averaged.
    """
    items = list(sites.values()) if isinstance(sites, Mapping) else list(sites)
    dp = [s.site_id for s in items if s.privacy is not None]
    plain = [s.site_id for s in items if s.privacy is None]
    if dp and plain:
        raise ConfigError(f"a federation runs DP on all sites or none: sites {dp} set 'privacy' but {plain} do not "
                          "(DP replaces g's BatchNorm by GroupNorm, so the models differ)")
    return bool(dp)


# ----- sampling and accounting --------------------------------------------------------------------
def poisson_sample_rate(num_records: int, batch_size: int) -> float:
    """Poisson sample rate q for an expected batch of about ``batch_size`` records.

    Opacus's rule (``DPDataLoader.from_data_loader``): q = 1 / ceil(N / B), so an epoch is
    ceil(N / B) steps and the expected batch is N q <= B. q never exceeds 1: with B > N the rate is
    clamped to 1 (every record in every step, no amplification by subsampling) with a
    :class:`PrivacyWarning`. (A rate above 1 is what makes the accountants fail with
    "math domain error".)

    Raises:
        ConfigError: ``num_records < 1`` or ``batch_size < 1``.
    """
    if num_records < 1 or batch_size < 1:
        raise ConfigError(f"DP needs >= 1 training record and batch_size >= 1, found N={num_records}, "
                          f"batch_size={batch_size}")
    if batch_size > num_records:
        _warn(f"batch_size {batch_size} > {num_records} training records: DP sample rate clamped to 1.0 (every "
              "record in every step, no privacy amplification by subsampling); lower batch_size for a smaller epsilon")
    return 1.0 / math.ceil(num_records / batch_size)


def steps_per_epoch(sample_rate: float) -> int:
    """Poisson steps per epoch: round(1 / q) (Opacus ``UniformWithReplacementSampler``)."""
    return max(1, round(1.0 / sample_rate))


def check_delta(delta: float, num_records: int) -> None:
    """Warn (:class:`PrivacyWarning`) if delta >= 1 / N: such a delta allows releasing a record outright."""
    if num_records > 0 and delta >= 1.0 / num_records:
        _warn(f"DP delta {delta:g} >= 1/N = {1.0 / num_records:g} (N = {num_records} training records): a mechanism "
              f"that publishes one random record in full satisfies it; use delta << 1/N (e.g. {0.1 / num_records:.1g})")


def _accountant_kwargs(mechanism: str) -> dict:
    """RDP orders: Opacus's defaults (1.1 ... 63) extended to 256, so that small-epsilon regimes (few
    steps, much noise), whose best order exceeds 63, get a tighter bound (any order gives a valid one)."""
    if mechanism != "rdp":
        return {}
    from opacus.accountants import RDPAccountant

    return {"alphas": list(RDPAccountant.DEFAULT_ALPHAS) + list(range(64, 257, 8))}


def _epsilon(history: Sequence[Sequence[float]], delta: float, mechanism: str) -> float:
    if not history or all(int(s) == 0 for *_, s in history):
        return 0.0
    if any(float(sigma) == 0.0 for sigma, _, s in history if int(s) > 0):
        return math.inf
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=mechanism)
    acc.history = [(float(a), float(b), int(c)) for a, b, c in history if int(c) > 0]
    with warnings.catch_warnings():
        # PRV at q = 1 emits numpy divide warnings (the result is finite); PRV's domain-size bound runs
        # an RDP accountant at delta/4 that may hit the largest order (a valid, looser, internal bound).
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(acc.get_epsilon(delta=delta, **_accountant_kwargs(mechanism)))


def calibrate_noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, total_steps: int,
                               accountant: str = "rdp") -> float:
    """Smallest noise multiplier sigma (std of the noise / max_grad_norm) for which ``total_steps``
    steps at sample rate q spend at most ``target_epsilon`` (at ``delta``): Opacus
    ``get_noise_multiplier`` (binary search, tolerance 0.01 in epsilon).

    Raises:
        ConfigError: the budget is unreachable (sigma would exceed 1e6) or q is outside (0, 1].
    """
    from opacus.accountants.utils import get_noise_multiplier

    if not 0 < sample_rate <= 1:
        raise ConfigError(f"DP sample rate must be in (0, 1], found {sample_rate}")
    try:
        with warnings.catch_warnings():  # the search tries huge sigmas, whose best RDP order is the largest
            warnings.simplefilter("ignore", RuntimeWarning)
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                              sample_rate=sample_rate, steps=int(total_steps), accountant=accountant,
                                              **_accountant_kwargs(accountant)))
    except ValueError as err:
        raise ConfigError(f"privacy.target_epsilon {target_epsilon} at delta {delta:g} cannot be met over "
                          f"{total_steps} steps at sample rate {sample_rate:.4g}: {err}") from err


class PrivacyLedger:
    """A site's DP accountant state, persisted as JSON so that rounds in fresh processes compose.

    File content: ``{"format": 1, "mechanism": "rdp"|"prv", "history": [[noise_multiplier,
    sample_rate, steps], ...]`` (Opacus accountant history, consecutive equal entries merged),
    ``"noise_multiplier"``, ``"sample_rate"``, ``"planned_steps"`` (the calibration of this site's
    noise, if any) and ``"rounds"`` (an audit list: steps, empty steps, epsilon after each round)}.
    Written atomically (:func:`autosam_core.checkpoint.atomic_write_text`): a crash mid-write keeps the previous file.

    Args:
        path: the JSON file (e.g. ``<state dir>/privacy-<site_id>.json``); None keeps it in memory.
        mechanism: ``rdp`` or ``prv``.

    Raises:
        PrivacyLedgerError: unreadable file, or a file written with another mechanism.
    """

    def __init__(self, path: str | Path | None, mechanism: str = "rdp"):
        if mechanism not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, found {mechanism!r}")
        self.path = Path(path) if path is not None else None
        self.mechanism = mechanism
        self.history: list[tuple[float, float, int]] = []
        self.noise_multiplier: float | None = None
        self.sample_rate: float | None = None
        self.planned_steps: int | None = None
        self.rounds: list[dict] = []
        if self.path is not None and self.path.is_file():
            self.load()

    # persistence
    def load(self) -> None:
        """Read the file (if it exists). Raises PrivacyLedgerError if it is malformed or of another mechanism."""
        if self.path is None or not self.path.is_file():
            return
        try:
            data = json.loads(self.path.read_text())
            history = [(float(a), float(b), int(c)) for a, b, c in data["history"]]
            mechanism = str(data["mechanism"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise PrivacyLedgerError(f"privacy ledger {self.path} is unreadable ({type(err).__name__}: {err}); "
                                     "do not delete it to reset a budget: the spent epsilon stays spent") from err
        if mechanism != self.mechanism:
            raise PrivacyLedgerError(f"privacy ledger {self.path} was written by the {mechanism!r} accountant; the "
                                     f"config says {self.mechanism!r}: set privacy.accountant: {mechanism}")
        self.history = history
        self.noise_multiplier = data.get("noise_multiplier")
        self.sample_rate = data.get("sample_rate")
        self.planned_steps = data.get("planned_steps")
        self.rounds = list(data.get("rounds", []))

    def save(self) -> None:
        """Write the file atomically (no-op for an in-memory ledger)."""
        if self.path is None:
            return
        payload = {"format": LEDGER_FORMAT, "mechanism": self.mechanism,
                   "history": [list(h) for h in self.history], "noise_multiplier": self.noise_multiplier,
                   "sample_rate": self.sample_rate, "planned_steps": self.planned_steps, "rounds": self.rounds}
        atomic_write_text(self.path, json.dumps(payload, indent=1))

    # accounting
    @property
    def steps(self) -> int:
        """Total DP-SGD steps recorded (empty-batch steps included)."""
        return sum(int(s) for *_, s in self.history)

    def record(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Append steps as Opacus's accountants do (merged with the last entry if sigma and q are equal)."""
        if steps <= 0:
            return
        if self.history and self.history[-1][0] == noise_multiplier and self.history[-1][1] == sample_rate:
            self.history[-1] = (noise_multiplier, sample_rate, self.history[-1][2] + int(steps))
        else:
            self.history.append((float(noise_multiplier), float(sample_rate), int(steps)))

    def spent_epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta`` (0.0 before any step; inf if a step had no noise)."""
        return _epsilon(self.history, delta, self.mechanism)

    def would_exceed(self, target_epsilon: float, delta: float, next_steps: int,
                     noise_multiplier: float | None = None, sample_rate: float | None = None) -> bool:
        """True if ``next_steps`` more steps would take the spent epsilon above ``target_epsilon``.

        Args:
            target_epsilon: the site's budget; delta: its delta.
            next_steps: steps the next round would take (local epochs x steps per epoch).
            noise_multiplier, sample_rate: of the next round; default: the ledger's calibration.

        Raises:
            ValueError: no noise multiplier / sample rate given or stored.
        """
        sigma = self.noise_multiplier if noise_multiplier is None else noise_multiplier
        q = self.sample_rate if sample_rate is None else sample_rate
        if sigma is None or q is None:
            raise ValueError("would_exceed needs the next round's noise_multiplier and sample_rate (none stored)")
        trial = PrivacyLedger(None, self.mechanism)
        trial.history = list(self.history)
        trial.record(float(sigma), float(q), int(next_steps))
        return trial.spent_epsilon(delta) > target_epsilon


# ----- training -----------------------------------------------------------------------------------
def _collate_or_none(items: list) -> dict | None:
    """default_collate, or None for an empty Poisson batch."""
    return default_collate(items) if items else None


def _embeddings(model: AutoSam, batch: dict) -> torch.Tensor:
    return batch["image_embeddings"] if "image_embeddings" in batch else model.sam.encode(batch["sam_input"])


def _batch_loss(model: AutoSam, g: nn.Module, batch: dict) -> tuple[torch.Tensor, float]:
    """Mean per-sample BCE+Dice of one non-empty batch, g applied through ``g`` (e.g. a GradSampleModule)."""
    dense_prompt_embeddings = g(batch["g_input"])
    low_res_logits = model.sam.decode(_embeddings(model, batch), dense_prompt_embeddings)
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


def per_sample_gradients(model: AutoSam, batch: dict) -> dict[str, torch.Tensor]:
    """Per-sample gradients of the training loss w.r.t. g's parameters (diagnostics and tests).

    g is wrapped in an Opacus ``GradSampleModule`` for one forward/backward and unwrapped again
    (hooks removed, Opacus attributes deleted, ``.grad`` cleared).

    Args:
        model: AutoSam whose g is DP-compatible (:func:`check_private_compatible`).
        batch: collated dict with ``g_input`` (B, 3, G, G), ``image_embeddings`` (B, 256, 64, 64) or
            ``sam_input``, ``target`` (B, 1, 256, 256), ``valid`` (B, 2); B >= 1.

    Returns:
        {name of a trainable parameter of g: tensor (B, *param.shape)} with the gradient of sample
        i's own loss in row i (Opacus rescales the batch mean's gradients by B).

    Raises:
        DPCompatibilityError: g is not DP-compatible.
    """
    from opacus import GradSampleModule

    g = model.prompt_generator
    check_private_compatible(g)
    check_sam_frozen(model)
    was_training = g.training
    g.train()
    gsm = GradSampleModule(g, batch_first=True, loss_reduction="mean", strict=True)
    try:
        loss, _ = _batch_loss(model, gsm, batch)
        _backward(loss)
        return {n: p.grad_sample.detach().clone() for n, p in g.named_parameters() if p.requires_grad}
    finally:
        gsm._close()
        _drop_opacus_attrs(g)
        g.zero_grad(set_to_none=True)
        g.train(was_training)


def _generator(seed: int | None) -> torch.Generator:
    return torch.Generator().manual_seed(secrets.randbits(63) if seed is None else int(seed))


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
        dataset: items as :class:`autosam_core.engine.AutoSamDataset` (``g_input``, ``target``,
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
    ledger = ledger if ledger is not None else PrivacyLedger(None)
    if noise_multiplier == 0:
        _warn("DP noise_multiplier is 0: clipping only, no privacy (epsilon is infinite)")

    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    sampling_gen = _generator(insecure_seed)
    noise_gen = _generator(None if insecure_seed is None else insecure_seed + 1)
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

    t0, steps, empty = time.perf_counter(), 0, 0
    loss_sum, dice_sum, n = 0.0, 0.0, 0
    try:
        for epoch in range(epochs):
            loss_sum, dice_sum, n = 0.0, 0.0, 0
            bar = tqdm(loader, desc=f"{desc} epoch {epoch + 1}/{epochs}", leave=False, disable=not progress,
                       unit="step")
            for batch in bar:
                dp_optimizer.zero_grad(set_to_none=True)
                b = 0 if batch is None else int(batch["g_input"].shape[0])
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

    def noise_multiplier(self, epochs: int) -> float:
        """sigma for the next round of ``epochs`` local epochs (see the class docstring).

        Raises:
            ConfigError: target_epsilon without planned rounds, or an unreachable budget.
        """
        p, led = self.privacy, self.ledger
        if p.noise_multiplier is not None:
            if led.noise_multiplier is not None and led.noise_multiplier != p.noise_multiplier:
                log.warning("site %s: noise_multiplier changed from %s to %s (the ledger accounts each step)",
                            self.site.site_id, led.noise_multiplier, p.noise_multiplier)
            led.noise_multiplier, led.sample_rate = float(p.noise_multiplier), self.sample_rate
            return float(p.noise_multiplier)
        if led.noise_multiplier is not None and led.sample_rate == self.sample_rate:
            return float(led.noise_multiplier)
        if led.noise_multiplier is not None:
            log.warning("site %s: sample rate changed from %s to %s; noise recalibrated (spent budget kept)",
                        self.site.site_id, led.sample_rate, self.sample_rate)
        if not self.planned_rounds:
            raise ConfigError(f"site {self.site.site_id}: privacy.target_epsilon needs privacy.planned_rounds (or "
                              "the federation's rounds) to spread the budget over")
        planned = self.planned_rounds * epochs * self.steps_per_epoch
        sigma = calibrate_noise_multiplier(p.target_epsilon, p.delta, self.sample_rate, planned, p.accountant)
        log.info("site %s: DP noise multiplier %.4f for epsilon %.3g at delta %.3g over %d steps (q = %.4g)",
                 self.site.site_id, sigma, p.target_epsilon, p.delta, planned, self.sample_rate)
        led.noise_multiplier, led.sample_rate, led.planned_steps = sigma, self.sample_rate, planned
        led.save()
        return sigma

    def spent_epsilon(self) -> float:
        """Epsilon spent so far by this site at ``privacy.delta``."""
        return self.ledger.spent_epsilon(self.privacy.delta)

    def would_exceed(self, epochs: int) -> bool:
        """True if a round of ``epochs`` local epochs would exceed ``privacy.target_epsilon`` (False without one)."""
        if self.privacy.target_epsilon is None:
            return False
        return self.ledger.would_exceed(self.privacy.target_epsilon, self.privacy.delta,
                                        epochs * self.steps_per_epoch, self.noise_multiplier(epochs), self.sample_rate)

    def fit(self, epochs: int, proximal_mu: float = 0.0, seed: int = 0, insecure_seed: int | None = None) -> dict:
        """One round of DP training of g in place, or nothing if the budget would be exceeded.

        The ledger is re-read from its file first, so a long-lived trainer never accounts from a stale
        copy when another process has trained this site in between.

        Args:
            epochs: local epochs. proximal_mu: FedProx mu.
            seed: accepted for :class:`SiteTrainer` compatibility and ignored: a public seed must not
                drive DP sampling or noise.
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
        self.cache.ensure([pr.image_path for pr in self.train_pairs], load_image, progress=self.progress,
                          desc=f"{self.site.site_id}: SAM embeddings")  # every round: edited images re-encode
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


__all__ = [
    "ACCOUNTANTS", "DPCompatibilityError", "DPSiteTrainer", "PrivacyLedger", "PrivacyLedgerError", "PrivacyWarning",
    "calibrate_noise_multiplier", "check_delta", "check_private_compatible", "dp_incompatibilities",
    "dp_state_signature", "dp_train_epochs", "groupnorm_groups", "make_autosam_private_compatible",
    "make_private_compatible", "per_sample_gradients", "poisson_sample_rate", "require_uniform_privacy",
    "steps_per_epoch",
]
