"""The message contract between the AutoSAM-FL ServerApp and ClientApp (keys in one place).

Train instruction (server -> site), ``RecordDict``:
    ``arrays``  ArrayRecord: the global trainable state (g/h keys only), packed: one array per dtype plus
                a ``__layout__`` (:func:`autosam_fl.transfer.to_wire`; Flower sends each array as its own
                request, so a g of 254 tensors would cost hundreds of requests per hop).
    ``config``  ConfigRecord: ``server-round`` (int, set by Flower's FedAvg, restarts at 1 in a
                resumed run), ``global-round`` (int, counts across resumed runs), ``local-epochs``
                (int; 0 = use the site YAML's ``local_epochs``), ``proximal-mu`` (float, FedProx
                only), ``sam-kind`` (str), ``sam-weights`` (str: the federation's SAM weights
                fingerprint; never a path), ``model-config`` (JSON of
                :class:`autosam_core.config.ModelConfig`, ``pretrained`` cleared), ``seed`` (int), ``dp`` (bool: the global g
                is DP-compatible, BatchNorm replaced by GroupNorm; every site must then set
                ``privacy``), ``planned-rounds`` (int: the federation's rounds, for DP budgets), ``transfer-dtype``
                (str: the dtype of ``arrays`` on the wire, both directions, :mod:`autosam_fl.transfer`).

Train reply (site -> server), ``RecordDict``:
    ``arrays``  ArrayRecord: exactly ``AutoSam.trainable_state()`` after local training, its
                floating-point arrays in the instruction's ``transfer-dtype``, packed the same way.
    ``metrics`` MetricRecord: ``num-examples`` (training samples, never batches; 0 when a DP
                site's budget is spent and it did not train), ``train_loss``, ``train_dice``,
                ``train_seconds``, ``local_epochs``; DP sites add ``epsilon`` (spent so far, all
                rounds and runs, at ``delta``), ``delta``, ``target_epsilon`` (0 = no target),
                ``dp_steps`` (DP-SGD steps accounted so far) and ``noise_multiplier``.
    ``site``    ConfigRecord: ``site-id`` (str) so the server can tell sites apart (MetricRecord
                values must be numbers, so the name travels here), ``status`` (``trained`` or
                ``skipped``) and, when skipped, ``reason`` (a fixed template with numbers only,
                :data:`REASON_PATTERNS`).

Everything a site may send is allow-listed below (:data:`TRAIN_METRIC_KEYS`,
:data:`EVALUATE_METRIC_KEYS`, :data:`SITE_RECORD_KEYS`, :data:`REASON_PATTERNS`); the site's reply
audit (:mod:`client.audit`, ``autosam-client --audit``) refuses to send anything else.

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
#: the federation's SAM weights fingerprint (``FrozenSam.weights_id``); never a file path: a site
#: loads SAM from its own YAML's ``sam_checkpoint`` and refuses to train if the fingerprints differ.
SAM_WEIGHTS = "sam-weights"
MODEL_CONFIG = "model-config"
SEED = "seed"
DP = "dp"
PLANNED_ROUNDS = "planned-rounds"
#: Instruction config: the global round after which the run ends (resume offset included), and whether
#: a federated evaluate message follows every train round; a site uses them to tell that a run is over.
FINAL_ROUND = "final-round"
#: Instruction config: the dtype g's floating-point arrays travel in, both directions
#: (``float32``/``bfloat16``/``float16``, :mod:`autosam_fl.transfer`); absent = float32.
TRANSFER_DTYPE = "transfer-dtype"
FEDERATED_EVALUATE = "federated-evaluate"

# Site record (ConfigRecord ``site``) keys and values.
STATUS = "status"
REASON = "reason"
STATUS_TRAINED = "trained"
STATUS_SKIPPED = "skipped"
#: Train replies: the device type and the precision the site trained g in (issue 9: the chosen
#: precision is reported); fixed values only, never a device index or a host name.
DEVICE = "device"
PRECISION = "precision"
DEVICE_VALUES = frozenset({"cpu", "cuda"})
PRECISION_VALUES = frozenset({"fp32", "bf16", "fp16"})

# ----- allow-lists: the only things a site's reply may carry --------------------------------------
#: Numeric metrics of a train reply (MetricRecord ``metrics``), each a single int or float, never a list.
TRAIN_METRIC_KEYS = frozenset({
    NUM_EXAMPLES, "train_loss", "train_dice", "train_seconds", "local_epochs",
    "epsilon", "delta", "target_epsilon", "dp_steps", "noise_multiplier",
})
#: Numeric metrics of an evaluate (federated validation) reply: aggregates over the held-out images.
EVALUATE_METRIC_KEYS = frozenset({NUM_EXAMPLES, "val_dice", "val_iou"})
#: Metrics whose value must lie in [0, 1] (means of per-image Dice/IoU).
UNIT_INTERVAL_METRICS = frozenset({"train_dice", "val_dice", "val_iou", "delta"})
#: Metrics that may be +inf (epsilon of a noise-free run); every other value must be finite.
MAY_BE_INFINITE = frozenset({"epsilon"})
#: String fields of the ``site`` ConfigRecord (the only strings a reply may carry).
SITE_RECORD_KEYS = frozenset({SITE_ID, STATUS, REASON, DEVICE, PRECISION})
STATUS_VALUES = frozenset({STATUS_TRAINED, STATUS_SKIPPED})
#: Site-record fields that carry one of a fixed set of values (the audit refuses any other text).
SITE_RECORD_VALUES = {STATUS: STATUS_VALUES, DEVICE: DEVICE_VALUES, PRECISION: PRECISION_VALUES}
_NUM = r"[-+0-9.eE]+|inf|nan"
#: The only texts allowed in ``reason``: fixed wording, numbers only (no file names, no stems).
REASON_PATTERNS = (
    re.compile(rf"privacy budget: \d+ more steps would exceed target epsilon (?:{_NUM}) "
               rf"\(spent (?:{_NUM}) at delta (?:{_NUM}) over \d+ steps\)"),
)
REASON_MAX_CHARS = 300
#: The only record names of a reply (RecordDict keys).
REPLY_RECORDS = frozenset({ARRAYS, METRICS, SITE})

# Node config (SuperNode --node-config) and run config ([tool.flwr.app.config]) keys.
NODE_SITE_CONFIG = "site-config"
RUN_FEDERATION_CONFIG = "federation-config"
RUN_RUN_DIR = "run-dir"
RUN_NODE_SITES = "node-sites"
RUN_LOCAL_EPOCHS = "local-epochs"

# Reply audit switch: node config ``audit`` (``autosam-client --audit``), env AUTOSAM_FL_AUDIT=1 or the
# site YAML's ``audit: true``; the report folder: node config ``audit-dir`` or env AUTOSAM_FL_AUDIT_DIR
# (default: the site's state folder, next to its privacy ledger).
NODE_AUDIT = "audit"
NODE_AUDIT_DIR = "audit-dir"
# Deployment (autosam-client): the site worker's socket that keeps SAM, g and the data loaded across
# rounds (client.worker), and the site id (so even a ClientApp that cannot reach it names its site).
NODE_SITE_WORKER = "site-worker"
NODE_SITE_ID = "site-id"
AUDIT_ENV = "AUTOSAM_FL_AUDIT"
AUDIT_DIR_ENV = "AUTOSAM_FL_AUDIT_DIR"
# Persistent per-site folder (privacy ledger, audit report) when the site YAML has no ``state_dir``.
SITE_STATE_ENV = "AUTOSAM_SITE_STATE"

_SITE_TAG = re.compile(r"\[site (?P<site>[^\]]+)\] (?P<text>[^\n'\"]*)")


def instruction_round(config) -> int:
    """The round of an instruction's ConfigRecord: ``global-round`` (counts across resumed runs), else
    ``server-round``, else 0."""
    return int(config.get(GLOBAL_ROUND, config.get(SERVER_ROUND, 0)))


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
        # The text is the rest of its line: it may quote names (key 'sam_checkpoint'), so it does not end at a
        # quote; only the wrapper around it goes (Flower's "<class 'RuntimeError'>:<'text'>", or a repr's "')").
        text = (reason or "")[m.start("text"):].split("\n", 1)[0].strip()
        for wrapper in ("'>", "')", '")'):
            if text.endswith(wrapper):
                text = text[:-len(wrapper)]
                break
        return m.group("site"), text.strip()
    lines = [ln.strip() for ln in (reason or "").splitlines() if ln.strip()]
    text = next((ln for ln in reversed(lines) if "Error" in ln or "Exception" in ln), lines[-1] if lines else "")
    return None, text[:500]
