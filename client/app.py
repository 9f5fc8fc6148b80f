"""Flower ClientApp of one AutoSAM-FL site (``client.app:app``).

For every train instruction the site loads the global trainable state into its AutoSam, trains
``local-epochs`` epochs on its private data (:class:`autosam_core.engine.SiteTrainer`) and replies
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
simulation actor serves is exact. In a deployment each round runs in a fresh ClientApp process:
the SAM embeddings are then reused from the on-disk cache.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from autosam_core.autosam import AutoSam
from autosam_core.config import ConfigError, FederationConfig, ModelConfig, SamConfig, SiteConfig, load_yaml_config

from . import protocol as P

log = logging.getLogger("autosam.client")

app = ClientApp()

_MODELS: dict[str, AutoSam] = {}
_SITES: dict[str, "SiteRuntime"] = {}
_FEDERATIONS: dict[str, FederationConfig] = {}


class SiteSetupError(ConfigError):
    """The ClientApp cannot tell which site it is, or the site YAML is unusable."""


class InjectedFault(RuntimeError):
    """Raised on purpose by the ``AUTOSAM_FL_FAULT`` test hook."""


@dataclass
class SiteRuntime:
    """A site's cached state in this process: its config, YAML path and trainer."""

    site: SiteConfig
    yaml_path: Path
    trainer: object  # autosam_core.engine.SiteTrainer (imported lazily)
    model: AutoSam


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


def _model_key(config: ConfigRecord) -> tuple[str, SamConfig, ModelConfig, bool]:
    try:
        sam_cfg = SamConfig(kind=str(config[P.SAM_KIND]), checkpoint=str(config.get(P.SAM_CHECKPOINT, "")) or None)
        model_cfg = ModelConfig.model_validate(json.loads(str(config[P.MODEL_CONFIG])))
    except KeyError as err:
        raise SiteSetupError(f"the server's instruction lacks config key {err}; server and site run different "
                             "AutoSAM-FL versions") from None
    dp = bool(config.get(P.DP, False))
    key = json.dumps({"sam": sam_cfg.model_dump(), "model": model_cfg.model_dump(), "seed": int(config.get(P.SEED, 0)),
                      "dp": dp}, sort_keys=True)
    return key, sam_cfg, model_cfg, dp


def site_state_dir(site: SiteConfig, yaml_path: Path) -> Path:
    """Persistent per-site folder (privacy ledger): ``<cache root>/site-state`` (writable, unlike the YAML's folder)."""
    from autosam_core.data.cache import default_cache_dir

    root = Path(site.cache_dir) if site.cache_dir else Path(default_cache_dir())
    if not root.is_absolute():
        root = yaml_path.parent / root
    return root / "site-state"


def get_site_runtime(context: Context, config: ConfigRecord) -> SiteRuntime:
    """This process's cached model + trainer for the node's site (built on first use).

    A site with a ``privacy`` section trains with DP-SGD (:class:`autosam_core.privacy.DPSiteTrainer`)
    on a DP-compatible g (GroupNorm); the server's ``dp`` flag must agree.

    Raises:
        SiteSetupError / ConfigError: unknown site, bad site YAML, missing data, empty split, or a
        DP setting that differs from the federation's.
    """
    from autosam_core.engine import SiteTrainer, build_autosam

    yaml_path = resolve_site_yaml(context)
    key, sam_cfg, model_cfg, dp = _model_key(config)
    runtime_key = f"{yaml_path}|{key}"
    rt = _SITES.get(runtime_key)
    if rt is not None:
        return rt
    site = load_yaml_config(yaml_path, SiteConfig)
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
        if dp:
            from autosam_core.privacy import make_autosam_private_compatible

            make_autosam_private_compatible(model)
        _MODELS[key] = model
    if dp:
        from autosam_core.privacy import DPSiteTrainer

        trainer = DPSiteTrainer(model, site, state_dir=site_state_dir(site, yaml_path), cache_dir=None,
                                base_dir=yaml_path.parent, progress=False,
                                planned_rounds=int(config.get(P.PLANNED_ROUNDS, 0)) or None)
    else:
        trainer = SiteTrainer(model, site, cache_dir=None, base_dir=yaml_path.parent, progress=False)
    rt = _SITES[runtime_key] = SiteRuntime(site, yaml_path, trainer, model)
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


def _maybe_inject_fault(site_id: str, server_round: int) -> None:
    spec = os.environ.get(P.FAULT_ENV, "").strip()
    for item in filter(None, (s.strip() for s in spec.split(","))):
        site, _, rnd = item.partition("@")
        if site in ("*", site_id) and rnd.strip().isdigit() and int(rnd) == server_round:
            raise InjectedFault(f"injected fault ({P.FAULT_ENV}={spec}) at site {site_id} in round {server_round}")


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train on the site's data from the global state; reply with g/h state and metrics.

    Raises:
        RuntimeError: any failure, re-raised as ``[site <id>] round <r>: <Type>: <text>`` so the
        server can log which site failed and why (Flower turns it into an error reply).
    """
    config = msg.content[P.CONFIG]
    server_round = int(config.get(P.GLOBAL_ROUND, config.get(P.SERVER_ROUND, 0)))
    label = _site_label(context)
    try:
        rt = get_site_runtime(context, config)
        label = rt.site.site_id
        _maybe_inject_fault(label, server_round)
        rt.model.load_trainable_state(msg.content[P.ARRAYS].to_torch_state_dict())
        epochs = int(config.get(P.LOCAL_EPOCHS, 0)) or rt.site.local_epochs
        mu = float(config.get(P.PROXIMAL_MU, 0.0))
        stats = rt.trainer.fit(epochs, proximal_mu=mu, seed=int(config.get(P.SEED, 0)) + server_round)
        metrics = MetricRecord({
            P.NUM_EXAMPLES: int(stats.get("num_examples", rt.trainer.num_examples)),
            "train_loss": float(stats["loss"]),
            "train_dice": float(stats["dice"]),
            "train_seconds": float(stats["seconds"]),
            "local_epochs": int(epochs),
        })
        for k in ("epsilon", "delta"):
            if stats.get(k) is not None:
                metrics[k] = float(stats[k])
        if stats.get("skip_reason"):
            log.warning("site %s did not train in round %d: %s", label, server_round, stats["skip_reason"])
        content = RecordDict({
            P.ARRAYS: ArrayRecord(rt.model.trainable_state()),
            P.METRICS: metrics,
            P.SITE: ConfigRecord({P.SITE_ID: label}),
        })
        return Message(content, reply_to=msg)
    except Exception as err:
        raise RuntimeError(P.site_error_text(label, server_round, err)) from err


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Federated validation: Dice/IoU of the global model on the site's held-out split.

    The held-out split is ``SiteConfig.val_fraction`` of the site's training data (seeded, disjoint
    from what it trains on). A site without one replies ``num-examples`` 0 and is ignored.

    Raises:
        RuntimeError: ``[site <id>] round <r>: ...`` on any failure.
    """
    from autosam_core.engine import evaluate_pairs

    config = msg.content[P.CONFIG]
    server_round = int(config.get(P.GLOBAL_ROUND, config.get(P.SERVER_ROUND, 0)))
    label = _site_label(context)
    try:
        rt = get_site_runtime(context, config)
        label = rt.site.site_id
        pairs = rt.trainer.val_pairs
        dice = iou = 0.0
        if pairs:
            rt.model.load_trainable_state(msg.content[P.ARRAYS].to_torch_state_dict())
            res = evaluate_pairs(rt.model, pairs, rt.trainer.cache)
            dice, iou = float(res["dice"]), float(res["iou"])
        metrics = MetricRecord({P.NUM_EXAMPLES: len(pairs), "val_dice": dice, "val_iou": iou})
        return Message(RecordDict({P.METRICS: metrics, P.SITE: ConfigRecord({P.SITE_ID: label})}), reply_to=msg)
    except Exception as err:
        raise RuntimeError(P.site_error_text(label, server_round, err)) from err
