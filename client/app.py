"""The site side of AutoSAM-FL: the train/evaluate handlers behind the ClientApp (:mod:`client.entry`).

For every train instruction the site loads the global trainable state into its AutoSam, trains
``local-epochs`` epochs on its private data (:class:`autosam_core.training.SiteTrainer`) and replies
with exactly ``model.trainable_state()`` plus its sample count and training metrics (see
:mod:`client.protocol`). The frozen SAM and the images never leave the site.

Which site am I?
    Deployment: the SuperNode's node config ``site-config`` (path of the site YAML).
    Simulation: Flower gives each virtual SuperNode ``partition-id``; the site is
    ``sites[partition-id]`` of the federation YAML named by the run config ``federation-config``.

The model (SAM + g) is built once per process and cached in :data:`_MODELS` (keyed by the SAM and
model config, so a simulation actor serving several sites holds one SAM); each site's
:class:`SiteTrainer` (dataset + embedding cache) is cached in :data:`_SITES` keyed by the site YAML
path. Every call loads the complete global state first, so sharing one model between the sites a
simulation actor serves is exact. In a deployment the handlers run in ``autosam-client``'s long-lived
site worker (:mod:`client.worker`), so the model, the data and the embedding cache are loaded once
per site and run, not once per message.

DP sites (a ``privacy`` section in the site YAML) train with
:class:`autosam_core.privacy.DPSiteTrainer`; their accountant ledger lives in the site's state
folder (:func:`site_state_dir`), so epsilon composes across rounds, fresh processes and resumed
federations. Every DP reply reports the epsilon spent so far; a site whose next round would exceed
its target replies with the unchanged weights, ``num-examples`` 0, ``status`` ``skipped`` and the
reason. With the reply audit on (:mod:`client.audit`) every reply is checked against the
allow-lists of :mod:`client.protocol` and recorded before it is sent.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from autosam_core.autosam import AutoSam
from autosam_core.config import ConfigError, FederationConfig, ModelConfig, SamConfig, SiteConfig, load_yaml_config
from autosam_core.trainable_state import Signature

from autosam_fl import protocol as P
from autosam_fl.transfer import check_transfer_dtype, from_wire, to_wire, wire_signature
from .audit import AuditViolation, ReplyAudit, audit_dir, audit_enabled, expected_signature

log = logging.getLogger("autosam.client")

from .entry import app  # noqa: E402,F401  (the ClientApp component; ``client.app:app`` still names it)

#: Show a progress bar per local epoch (set by ``autosam-client``'s site worker; off in simulation).
PROGRESS = False

_MODELS: dict[str, AutoSam] = {}
_SITES: dict[str, "SiteRuntime"] = {}
_FEDERATIONS: dict[str, FederationConfig] = {}


class SiteSetupError(ConfigError):
    """The ClientApp cannot tell which site it is, or the site YAML is unusable."""


@dataclass
class SiteRuntime:
    """A site's cached state in this process: its config, YAML path and trainer."""

    site: SiteConfig
    yaml_path: Path
    trainer: object  # autosam_core.training.SiteTrainer (imported lazily)
    model: AutoSam
    audit: ReplyAudit | None = None
    expected: Signature | None = None


def resolve_site_yaml(context: Context) -> Path:
    """Path of this node's site YAML (node config ``site-config``, else simulation partition).

    Raises:
        SiteSetupError: neither ``site-config`` nor (``partition-id`` + run config
        ``federation-config``) is available, or the partition has no site.
    """
    node_cfg, run_cfg = context.node_config, context.run_config
    if P.NODE_SITE_CONFIG in node_cfg and str(node_cfg[P.NODE_SITE_CONFIG]).strip():
        return Path(str(node_cfg[P.NODE_SITE_CONFIG])).expanduser().resolve()
    fed_path = str(run_cfg.get(P.RUN_FEDERATION_CONFIG, "")).strip()
    if "partition-id" in node_cfg and fed_path:
        fed_file = Path(fed_path).expanduser().resolve()
        fed = _FEDERATIONS.get(str(fed_file))
        if fed is None:
            fed = _FEDERATIONS[str(fed_file)] = load_yaml_config(fed_file, FederationConfig)
        pid = int(node_cfg["partition-id"])
        if not 0 <= pid < len(fed.sites):
            raise SiteSetupError(
                f"{fed_file}: simulated node partition-id {pid} has no site: the federation lists "
                f"{len(fed.sites)} sites (key 'sites'); run the simulation with num-supernodes = {len(fed.sites)}")
        p = Path(fed.sites[pid]).expanduser()
        return (p if p.is_absolute() else fed_file.parent / p).resolve()
    raise SiteSetupError(
        "this SuperNode does not know its site: start it with --node-config 'site-config=\"/path/site.yaml\"' "
        f"(node config found: {dict(node_cfg)})")


def _model_key(config: ConfigRecord, site: SiteConfig, yaml_path: Path) -> tuple[str, SamConfig, ModelConfig, bool]:
    """(cache key, SAM config, model config, dp) of the instruction, with SAM loaded from the site's own
    ``sam_checkpoint`` (relative to its YAML), never from a path of the coordinator's."""
    try:
        ckpt = site.sam_checkpoint
        if ckpt and not Path(ckpt).expanduser().is_absolute():
            ckpt = str((yaml_path.parent / ckpt).resolve())
        sam_cfg = SamConfig(kind=str(config[P.SAM_KIND]), checkpoint=ckpt or None)
        model_cfg = ModelConfig.model_validate(json.loads(str(config[P.MODEL_CONFIG])))
    except KeyError as err:
        raise SiteSetupError(f"the server's instruction lacks config key {err}; server and site run different "
                             "AutoSAM-FL versions") from None
    dp = bool(config.get(P.DP, False)) or model_cfg.dp_compatible
    model_cfg = model_cfg.model_copy(update={"dp_compatible": dp})  # the factory builds the DP g from it
    key = json.dumps({"sam": sam_cfg.model_dump(), "model": model_cfg.model_dump(), "seed": int(config.get(P.SEED, 0)),
                      "dp": dp}, sort_keys=True)
    return key, sam_cfg, model_cfg, dp


def check_sam_weights(model, expected: str, site: SiteConfig, yaml_path: Path) -> None:
    """Refuse to train when this site's SAM weights are not the federation's (``expected`` fingerprint,
    ``FrozenSam.weights_id``; empty: the server did not say, nothing to compare).

    Raises:
        SiteSetupError: naming both fingerprints and the site's checkpoint path.
    """
    ours = model.sam.weights_id
    if expected and ours != expected:
        where = (f"its checkpoint {site.sam_checkpoint} (key 'sam_checkpoint' of {yaml_path})" if site.sam_checkpoint
                 else f"the built-in weights of {model.sam.spec.kind} (no 'sam_checkpoint' in {yaml_path})")
        raise SiteSetupError(
            f"site {site.site_id}: SAM weights fingerprint {ours} from {where} differs from the federation's {expected}; "
            "every site must run the same frozen SAM: point 'sam_checkpoint' at the coordinator's SAM file")


def site_state_dir(site: SiteConfig, yaml_path: Path) -> Path:
    """The site's persistent folder (privacy ledger ``privacy-<site_id>.json``, audit report, the Adam
    moments of ``optimizer_state: keep``: ``optimizer-<site_id>.pt``).

    In order: the site YAML's ``state_dir`` (relative to the YAML's folder), ``$AUTOSAM_SITE_STATE``,
    else ``<embedding cache root>/site-state`` (cache root: the YAML's ``cache_dir``, else
    ``$AUTOSAM_CACHE``, which a simulation sets to the federation's ``cache_dir``, else
    ``<repo>/.cache/embeddings``). The folder does not depend on the run, so a resumed federation (and
    any later federation on the same data) continues the same accountant.
    """
    from autosam_core.data.cache import default_cache_dir

    if site.state_dir:
        p = Path(site.state_dir).expanduser()
        return p if p.is_absolute() else (yaml_path.parent / p).resolve()
    env = os.environ.get(P.SITE_STATE_ENV, "").strip()
    if env:
        return Path(env).expanduser().resolve()
    root = Path(site.cache_dir).expanduser() if site.cache_dir else Path(default_cache_dir())
    if not root.is_absolute():
        root = yaml_path.parent / root
    return (root / "site-state").resolve()


def preload(dp: bool = False) -> float:
    """Import what the first train instruction needs (model factory, trainer, timm, the SAM builders;
    Opacus for a DP site), so a site worker can do it while its SuperNode connects and the coordinator's
    ServerApp starts instead of inside round 1 (measured here: 5-6 s on a loaded 2-core CPU). Builds
    no model: which SAM and g to build is the server's instruction. Safe to run in a thread: a message
    that arrives meanwhile waits on Python's import lock.

    Returns:
        seconds spent (float).
    """
    import time

    t0 = time.perf_counter()
    import timm  # noqa: F401  (the prompt generator's backbones)

    import autosam_core.evaluation  # noqa: F401
    import autosam_core.model_factory  # noqa: F401
    import autosam_core.training  # noqa: F401

    if dp:
        import autosam_core.privacy  # noqa: F401
    return time.perf_counter() - t0


def get_site_runtime(context: Context, config: ConfigRecord) -> SiteRuntime:
    """This process's cached model + trainer for the node's site (built on first use).

    A site with a ``privacy`` section trains with DP-SGD (:class:`autosam_core.privacy.DPSiteTrainer`)
    on a DP-compatible g (GroupNorm); the server's ``dp`` flag must agree.

    Raises:
        SiteSetupError / ConfigError: unknown site, bad site YAML, missing data, empty split, or a
        DP setting that differs from the federation's.
    """
    from autosam_core.model_factory import build_autosam
    from autosam_core.training import SiteTrainer

    yaml_path = resolve_site_yaml(context)
    site = load_yaml_config(yaml_path, SiteConfig)  # milliseconds; names the file and key on error
    key, sam_cfg, model_cfg, dp = _model_key(config, site, yaml_path)
    runtime_key = f"{yaml_path}|{key}"
    rt = _SITES.get(runtime_key)
    if rt is not None:
        return rt
    if (site.privacy is not None) != dp:
        raise SiteSetupError(
            f"{yaml_path}: key 'privacy': this site {'trains with' if site.privacy else 'does not use'} DP but the "
            f"federation's global model is {'' if dp else 'not '}DP-compatible; a federation runs DP on all its "
            "sites or on none")
    model = _MODELS.get(key)
    if model is None:
        log.info("building AutoSam (SAM %s, %s%s) in process %d", sam_cfg.kind, model_cfg.backbone,
                 ", DP" if dp else "", os.getpid())
        model = build_autosam(sam_cfg, model_cfg, seed=int(config.get(P.SEED, 0)))
        _MODELS[key] = model
    check_sam_weights(model, str(config.get(P.SAM_WEIGHTS, "")), site, yaml_path)
    state_dir = site_state_dir(site, yaml_path)
    if dp:
        from autosam_core.privacy import DPSiteTrainer

        # The site's own plan wins; the federation's rounds are the fallback (the noise is calibrated once,
        # in the site's first DP round, and kept in the ledger).
        planned = site.privacy.planned_rounds or int(config.get(P.PLANNED_ROUNDS, 0)) or None
        trainer = DPSiteTrainer(model, site, state_dir=state_dir, cache_dir=None, base_dir=yaml_path.parent,
                                progress=PROGRESS, planned_rounds=planned)
        led = trainer.ledger
        log.info("site %s: DP ledger %s: %s", site.site_id, led.path,
                 f"{led.steps} steps already accounted, epsilon {trainer.spent_epsilon():.4g} at delta "
                 f"{site.privacy.delta:g} spent before this round (earlier rounds or runs)" if led.steps
                 else "new (nothing spent yet)")
    else:
        trainer = SiteTrainer(model, site, cache_dir=None, base_dir=yaml_path.parent, progress=PROGRESS,
                              state_dir=state_dir)
    audit = expected = None
    if audit_enabled(context.node_config, site.audit):
        audit = ReplyAudit(site.site_id, audit_dir(context.node_config, state_dir))
        expected = expected_signature(sam_cfg.kind, model_cfg, dp)
        log.info("site %s: reply audit on: report %s", site.site_id, audit.md_path)
    rt = _SITES[runtime_key] = SiteRuntime(site, yaml_path, trainer, model, audit, expected)
    return rt


def _site_label(context: Context) -> str:
    try:
        path = resolve_site_yaml(context)
    except Exception:  # noqa: BLE001 - only used to label an error
        return f"node-{context.node_id}"
    for rt in _SITES.values():
        if rt.yaml_path == path:
            return rt.site.site_id
    return path.stem


def _runtime_for(context: Context) -> SiteRuntime | None:
    try:
        path = resolve_site_yaml(context)
    except Exception:  # noqa: BLE001 - only used on the error path
        return None
    return next((rt for rt in _SITES.values() if rt.yaml_path == path), None)


def _error_reply(context: Context, label: str, server_round: int, kind: str, err: Exception) -> RuntimeError:
    """The exception that carries a failure to the server (``[site <id>] round <r>: ...``).

    Without the audit: the error's type and text. With the audit on (node config, env or the site
    YAML): only the type; the text, which may name local files, stays in the site's log and report.
    """
    rt = _runtime_for(context)
    audited = audit_enabled(context.node_config, rt.site.audit if rt else False)
    if not audited:
        return RuntimeError(P.site_error_text(label, server_round, err))
    # Raised ``from None`` by the caller (``withheld``): no chained traceback carries the text either.
    if isinstance(err, AuditViolation):
        public = err.public_text()
    else:
        public = "error text withheld by the site's reply audit; see the site's log"
    text = f"[site {label}] round {server_round}: {type(err).__name__}: {public}"
    log.error("site %s: %s reply of round %d not sent: %s: %s", label, kind, server_round, type(err).__name__, err)
    if rt is not None and rt.audit is not None and not isinstance(err, AuditViolation):
        try:
            rt.audit.record_error(run_id=context.run_id, server_round=server_round, kind=kind, error=err,
                                  sent_text=text)
        except Exception as rec_err:  # noqa: BLE001 - never mask the original failure
            log.error("site %s: could not record the error in the audit report: %s", label, rec_err)
    out = RuntimeError(text)
    out.withheld = True
    return out


def _raise_error_reply(context: Context, label: str, server_round: int, kind: str, err: Exception) -> NoReturn:
    """Raise :func:`_error_reply`'s exception for ``err`` (called in the handler's ``except``): chained to
    ``err``, or with no chained exception at all when the audit withholds the text."""
    reply_err = _error_reply(context, label, server_round, kind, err)
    if getattr(reply_err, "withheld", False):
        raise reply_err from None
    raise reply_err from err


def train_metrics(stats: dict, epochs: int, num_examples: int) -> MetricRecord:
    """The train reply's MetricRecord from a trainer's ``fit`` stats (allow-listed keys only).

    DP stats (``epsilon`` present) add ``epsilon`` (spent so far at ``delta``), ``delta``,
    ``target_epsilon`` (0 when the site has none), ``dp_steps`` (accounted DP-SGD steps, all rounds)
    and ``noise_multiplier``.
    """
    metrics = MetricRecord({
        P.NUM_EXAMPLES: int(stats.get("num_examples", num_examples)),
        "train_loss": float(stats["loss"]),
        "train_dice": float(stats["dice"]),
        "train_seconds": float(stats["seconds"]),
        "local_epochs": int(epochs),
    })
    if stats.get("epsilon") is not None:
        metrics["epsilon"] = float(stats["epsilon"])
        metrics["delta"] = float(stats["delta"])
        metrics["target_epsilon"] = float(stats.get("target_epsilon") or 0.0)
        metrics["dp_steps"] = int(stats.get("dp_steps_total", 0))
        metrics["noise_multiplier"] = float(stats.get("noise_multiplier", 0.0))
    return metrics


def site_record(site_id: str, stats: dict | None = None, device: str | None = None,
                precision: str | None = None) -> ConfigRecord:
    """The reply's ``site`` ConfigRecord: ``site-id``; for train replies ``status`` (+ ``reason`` when
    skipped) and the ``device`` type and ``precision`` g was trained in (:attr:`SiteTrainer.training_precision`)."""
    rec = ConfigRecord({P.SITE_ID: site_id})
    if device is not None:
        rec[P.DEVICE] = device
    if precision is not None:
        rec[P.PRECISION] = precision
    if stats is not None:
        reason = stats.get("skip_reason")
        rec[P.STATUS] = P.STATUS_SKIPPED if reason else P.STATUS_TRAINED
        if reason:
            rec[P.REASON] = str(reason)
    return rec


def keep_only_model_of(config: ConfigRecord) -> int:
    """Drop cached models and site runtimes of other model configs (a long-lived site serving a new run).

    Returns:
        how many cached models were dropped.
    """
    key = _model_key(config)[0]
    stale = [k for k in _MODELS if k != key]
    for k in stale:
        del _MODELS[k]
    for k in [k for k in _SITES if k.split("|", 1)[-1] != key]:
        del _SITES[k]
    return len(stale)


def transfer_dtype_of(config: ConfigRecord) -> str:
    """The instruction's ``transfer-dtype`` (float32 when absent).

    Raises:
        TransferDtypeError: a value outside ``float32``/``bfloat16``/``float16``.
    """
    return check_transfer_dtype(str(config.get(P.TRANSFER_DTYPE, "float32")))


def received_state(record: ArrayRecord, transfer_dtype: str) -> dict[str, torch.Tensor]:
    """The instruction's ``arrays`` (packed, :func:`autosam_fl.transfer.to_wire`) -> g/h state dict of
    float32 (floating) / int64 tensors, on the CPU.

    Raises:
        WireFormatError: the packed record does not match its layout.
        TransferDtypeError: a floating array is not in the wire dtype of ``transfer_dtype``.
    """
    return {k: torch.from_numpy(np.array(v)) for k, v in from_wire(record, transfer_dtype).items()}


def train(msg: Message, context: Context) -> Message:
    """Train on the site's data from the global state; reply with g/h state and metrics.

    DP sites add epsilon/delta/target_epsilon/dp_steps/noise_multiplier to the metrics; a DP site
    whose budget is spent replies with the unchanged weights, ``num-examples`` 0 and ``status``
    ``skipped`` + ``reason`` in the ``site`` record. With the audit on, the reply is checked and
    recorded first (:mod:`client.audit`).

    Raises:
        RuntimeError: any failure, re-raised as ``[site <id>] round <r>: <Type>: <text>`` so the
        server can log which site failed and why (Flower turns it into an error reply); with the
        audit on, the text is withheld (see :func:`_error_reply`), and a reply that breaks the
        allow-list is never sent.
    """
    config = msg.content[P.CONFIG]
    server_round = P.instruction_round(config)
    label = _site_label(context)
    try:
        rt = get_site_runtime(context, config)
        label = rt.site.site_id
        dtype = transfer_dtype_of(config)
        rt.model.load_trainable_state(received_state(msg.content[P.ARRAYS], dtype))
        epochs = int(config.get(P.LOCAL_EPOCHS, 0)) or rt.site.local_epochs
        mu = float(config.get(P.PROXIMAL_MU, 0.0))
        stats = rt.trainer.fit(epochs, proximal_mu=mu, seed=int(config.get(P.SEED, 0)) + server_round,
                               run_id=str(context.run_id), server_round=server_round)
        if stats.get("skip_reason"):
            log.warning("site %s did not train in round %d: %s", label, server_round, stats["skip_reason"])
        content = RecordDict({
            P.ARRAYS: to_wire(rt.model.trainable_state(), dtype),
            P.METRICS: train_metrics(stats, epochs, rt.trainer.num_examples),
            P.SITE: site_record(label, stats, device=rt.trainer.device.type,
                                precision=rt.trainer.training_precision),
        })
        if rt.audit is not None:
            rt.audit.audit(content, "train", run_id=context.run_id, server_round=server_round,
                           expected=wire_signature(rt.expected, dtype), max_examples=rt.trainer.num_examples)
        return Message(content, reply_to=msg)
    except Exception as err:
        _raise_error_reply(context, label, server_round, "train", err)


def evaluate(msg: Message, context: Context) -> Message:
    """Federated validation: Dice/IoU of the global model on the site's held-out split.

    The held-out split is ``SiteConfig.val_fraction`` of the site's training data (seeded, disjoint
    from what it trains on). A site without one replies ``num-examples`` 0 and is ignored. The reply
    holds only aggregates (mean Dice/IoU, image count); it is audited like a train reply.

    Raises:
        RuntimeError: ``[site <id>] round <r>: ...`` on any failure.
    """
    from autosam_core.evaluation import evaluate_pairs

    config = msg.content[P.CONFIG]
    server_round = P.instruction_round(config)
    label = _site_label(context)
    try:
        rt = get_site_runtime(context, config)
        label = rt.site.site_id
        pairs = rt.trainer.val_pairs
        dice = iou = 0.0
        if pairs:
            rt.model.load_trainable_state(received_state(msg.content[P.ARRAYS], transfer_dtype_of(config)))
            res = evaluate_pairs(rt.model, pairs, rt.trainer.cache)
            dice, iou = float(res["dice"]), float(res["iou"])
        metrics = MetricRecord({P.NUM_EXAMPLES: len(pairs), "val_dice": dice, "val_iou": iou})
        content = RecordDict({P.METRICS: metrics, P.SITE: site_record(label)})
        if rt.audit is not None:
            rt.audit.audit(content, "evaluate", run_id=context.run_id, server_round=server_round, expected=None,
                           max_examples=len(pairs))
        return Message(content, reply_to=msg)
    except Exception as err:
        _raise_error_reply(context, label, server_round, "evaluate", err)
