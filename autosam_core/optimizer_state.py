"""A site's Adam moments kept from one federated round to the next (``optimizer_state: keep``).

Under FedAvg each round a site starts from the new global g. With ``optimizer_state: reset`` (the
Flower-typical stateless client) it also starts a fresh Adam: first and second moments at zero and
bias correction from step 1, so every round begins with steps of about ``lr`` in every coordinate
(Kingma & Ba 2015, Algorithm 1). With ``keep`` the site's own moments carry over, as they do through
the epochs of centralised training. They are derived from the site's gradients and never leave the
site: nothing on the wire changes.

Where they are kept: a file ``optimizer-<site_id>.pt`` in the site's state folder
(:func:`client.app.site_state_dir`), written atomically after every round, so the moments survive a
restarted site worker and do not depend on which simulation actor serves the site. The file records
the run id and round it was written in; it is used only by the next round of the same run, so a new
or resumed federation starts from a fresh Adam. Without a folder (``path=None``, the one-process
emulation) the moments stay in memory.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch

from .checkpoint import atomic_torch_save

log = logging.getLogger(__name__)


class OptimizerStateError(RuntimeError):
    """The kept optimizer file cannot be read or does not fit this model's g."""


class OptimizerStateStore:
    """Load and save one site's optimizer state between rounds of one run.

    Args:
        path: the file (``<state_dir>/optimizer-<site_id>.pt``) or None to keep it in memory.
    """

    def __init__(self, path: Path | None):
        self.path = Path(path) if path is not None else None
        self._memory: dict | None = None

    def _read(self) -> dict | None:
        if self.path is None:
            return self._memory
        if not self.path.is_file():
            return None
        try:
            rec = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file gets the same advice
            first = (str(err).strip().splitlines() or [""])[0]
            raise OptimizerStateError(
                f"{self.path}: cannot read the kept optimizer state ({type(err).__name__}: {first}); delete the file "
                "to start this site's next round with a fresh Adam") from None
        if not isinstance(rec, dict) or not {"run_id", "server_round", "optimizer"} <= rec.keys():
            raise OptimizerStateError(
                f"{self.path}: expected a dict with run_id, server_round and optimizer, found "
                f"{sorted(rec) if isinstance(rec, dict) else type(rec).__name__}; delete the file to start afresh")
        return rec

    def load_into(self, optimizer: torch.optim.Optimizer, run_id: str, server_round: int) -> bool:
        """Restore the moments saved by round ``server_round - 1`` of run ``run_id`` into ``optimizer``.

        Returns:
            True when they were restored; False (the optimizer stays fresh) when nothing was saved,
            or it was saved by another run or by a round other than the previous one.

        Raises:
            OptimizerStateError: the file is unreadable, or its moments do not fit ``optimizer``'s
            parameters (names the file and the first mismatch).
        """
        rec = self._read()
        if rec is None or str(rec["run_id"]) != str(run_id) or int(rec["server_round"]) != server_round - 1:
            if rec is not None:
                log.info("optimizer state of run %s round %s not reused in run %s round %d: fresh Adam",
                         rec["run_id"], rec["server_round"], run_id, server_round)
            return False
        saved = rec["optimizer"]
        params = [p for g in optimizer.param_groups for p in g["params"]]
        for i, p in enumerate(params):
            moments = saved.get("state", {}).get(i, {})
            for name in ("exp_avg", "exp_avg_sq"):
                if name in moments and moments[name].shape != p.shape:
                    raise OptimizerStateError(
                        f"{self.path or 'kept optimizer state'}: parameter {i} {name} has shape "
                        f"{tuple(moments[name].shape)}, g's parameter has {tuple(p.shape)}; delete the file")
        try:
            optimizer.load_state_dict(saved)
        except (ValueError, KeyError) as err:
            raise OptimizerStateError(f"{self.path or 'kept optimizer state'}: does not fit g's optimizer: {err}; "
                                      "delete the file") from None
        return True

    def save(self, optimizer: torch.optim.Optimizer, run_id: str, server_round: int) -> None:
        """Keep ``optimizer``'s state as round ``server_round`` of run ``run_id`` (atomic file write)."""
        rec = {"run_id": str(run_id), "server_round": int(server_round), "optimizer": optimizer.state_dict()}
        if self.path is None:
            self._memory = copy.deepcopy(rec)  # state_dict() holds the live moment tensors
        else:
            atomic_torch_save(rec, self.path)
