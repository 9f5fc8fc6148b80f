"""Privacy accounting of DP-SGD: Poisson sample rate, steps, epsilon of a history, noise calibration.

DP-SGD (Abadi et al., "Deep Learning with Differential Privacy", CCS 2016) with Poisson-sampled
batches is the sampled Gaussian mechanism; its privacy loss is bounded by an Opacus accountant: RDP
(Mironov, "Renyi Differential Privacy", CSF 2017; Mironov, Talwar, Zhang 2019) by default, or PRV
(Gopi, Lee, Wutschitz 2021). Guarantees are (epsilon, delta)-DP: epsilon is unitless (a
log-likelihood-ratio bound, smaller is more private), delta a probability (choose delta << 1/N).
An accountant history is ``[(noise_multiplier sigma, sample_rate q, steps), ...]``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

from ..config import ConfigError
from .errors import warn_privacy as _warn

__all__ = ["ACCOUNTANTS", "poisson_sample_rate", "steps_per_epoch", "check_delta", "epsilon_spent",
           "calibrate_noise_multiplier"]

ACCOUNTANTS = ("rdp", "prv")


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


def epsilon_spent(history: Sequence[Sequence[float]], delta: float, mechanism: str) -> float:
    """Epsilon at ``delta`` of an accountant history ``[(sigma, q, steps), ...]`` (Opacus accountant).

    Returns 0.0 for no steps and inf if a step had no noise (sigma = 0).

    Raises:
        ValueError: an unknown mechanism (Opacus).
    """
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
