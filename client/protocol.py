"""The message contract between the AutoSAM-FL ServerApp and ClientApp (keys in one place).

Train instruction (server -> site), ``RecordDict``:
    ``arrays``  ArrayRecord: the global trainable state (g/h keys only).
    ``config``  ConfigRecord: ``server-round`` (int, set by Flower's FedAvg, restarts at 1 in a
                resumed run), ``global-round`` (int, counts across resumed runs), ``local-epochs``
                (int; 0 = use the site YAML's ``local_epochs``), ``proximal-mu`` (float, FedProx
                only), ``sam-kind`` / ``sam-checkpoint`` (str), ``model-config`` (JSON of
                :class:`autosam_core.config.ModelConfig`), ``seed`` (int), ``dp`` (bool: the global g
                is DP-compatible, BatchNorm replaced by GroupNorm; every site must then set
                ``privacy``), ``planned-rounds`` (int: the federation's rounds, for DP budgets).

Train reply (site -> server), ``RecordDict``:
    ``arrays``  ArrayRecord: exactly ``AutoSam.trainable_state()`` after local training.
    ``metrics`` MetricRecord: ``num-examples`` (training samples, never batches; 0 when a DP
                site's budget is spent and it did not train), ``train_loss``, ``train_dice``,
                ``train_seconds``, ``local_epochs`` (+ ``epsilon``, ``delta`` for DP sites).
    ``site``    ConfigRecord: ``site-id`` (str) so the server can tell sites apart (MetricRecord
                values must be numbers, so the name travels here).

Evaluate instruction/reply (federated validation on each site's held-out split,
``SiteConfig.val_fraction``): same ``arrays``/``config``; the reply's MetricRecord holds
``num-examples`` (validation images), ``val_dice``, ``val_iou``, plus the ``site`` ConfigRecord.

A site that fails raises an exception whose text starts with ``[site <site-id>]``; Flower turns
it into an error reply and the server logs the site id and the error text.
"""

from __future__ import annotations

import re

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
SITE = "site"

SITE_ID = "site-id"
NUM_EXAMPLES = "num-examples"
SERVER_ROUND = "server-round"
GLOBAL_ROUND = "global-round"
LOCAL_EPOCHS = "local-epochs"
PROXIMAL_MU = "proximal-mu"
SAM_KIND = "sam-kind"
SAM_CHECKPOINT = "sam-checkpoint"
MODEL_CONFIG = "model-config"
SEED = "seed"
DP = "dp"
PLANNED_ROUNDS = "planned-rounds"

# Node config (SuperNode --node-config) and run config ([tool.flwr.app.config]) keys.
NODE_SITE_CONFIG = "site-config"
RUN_FEDERATION_CONFIG = "federation-config"
RUN_RUN_DIR = "run-dir"
RUN_NODE_SITES = "node-sites"
RUN_LOCAL_EPOCHS = "local-epochs"

# Test hook: "SITE@ROUND[,SITE@ROUND...]" (SITE may be "*") makes that site raise in that round.
FAULT_ENV = "AUTOSAM_FL_FAULT"

_SITE_TAG = re.compile(r"\[site (?P<site>[^\]]+)\] (?P<text>[^\n'\"]*)")


def site_error_text(site_id: str, server_round: int | str, err: BaseException) -> str:
    """The one-line error text a failing site raises: ``[site <id>] round <r>: <Type>: <message>``."""
    message = " ".join(str(err).split())
    return f"[site {site_id}] round {server_round}: {type(err).__name__}: {message}"


def parse_site_error(reason: str) -> tuple[str | None, str]:
    """Extract (site id, one-line error text) from a Flower error reason (which holds a traceback).

    Returns (None, last meaningful line) when the reason carries no ``[site ...]`` tag.
    """
    m = _SITE_TAG.search(reason or "")
    if m:
        return m.group("site"), m.group("text").strip()
    lines = [ln.strip() for ln in (reason or "").splitlines() if ln.strip()]
    text = next((ln for ln in reversed(lines) if "Error" in ln or "Exception" in ln), lines[-1] if lines else "")
    return None, text[:500]
