"""A site's privacy ledger: the accountant history persisted as JSON, so rounds in fresh processes compose.

Each federated round may run in a fresh process (deployment: a new ClientApp per round), so a site's
accountant history ``[(noise_multiplier, sample_rate, steps), ...]`` lives in
``<state dir>/privacy-<site_id>.json`` and is restored before every round. Never delete it to reset a
budget: the spent epsilon stays spent.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..files import atomic_write_json

from .accounting import ACCOUNTANTS, epsilon_spent
from .errors import PrivacyLedgerError

__all__ = ["LEDGER_FORMAT", "PrivacyLedger"]

LEDGER_FORMAT = 1


class PrivacyLedger:
    """A site's DP accountant state, persisted as JSON so that rounds in fresh processes compose.

    File content: ``{"format": 1, "mechanism": "rdp"|"prv", "history": [[noise_multiplier,
    sample_rate, steps], ...]`` (Opacus accountant history, consecutive equal entries merged),
    ``"noise_multiplier"``, ``"sample_rate"``, ``"planned_steps"`` (the calibration of this site's
    noise, if any) and ``"rounds"`` (an audit list: steps, empty steps, epsilon after each round)}.
    Written atomically (:func:`autosam_core.files.atomic_write_json`): a crash mid-write keeps the previous file.

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
        atomic_write_json(self.path, payload, indent=1)

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
        return epsilon_spent(self.history, delta, self.mechanism)

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
