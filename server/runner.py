"""One federated AutoSAM run on the server side (what the ServerApp executes).

Responsibilities: build the global model, resume from a checkpoint (refusing an incompatible one
before any site is contacted), drive Flower's ``strategy.start`` with central evaluation after
every round, write an atomic checkpoint per round (``checkpoints/last.pt``) and the best one on
the validation split (``checkpoints/best.pt``; never chosen on a test split), keep the metric
history across resumed runs (``history.json``), and write the run outputs (summary.json,
metrics.csv, global_dice.png, predictions.png, server.log; for a DP federation also each site's
epsilon per round in summary.json's ``privacy`` and metrics.csv, and epsilon.png).

Round numbering: Flower numbers the rounds of *this* run from 1; a resumed run adds the round of
its checkpoint (``offset``), so history and checkpoints carry global round numbers.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid

from autosam_core.config import ConfigError, FederationConfig, config_hash, yaml_relative
from autosam_core.trainable_state import MISSING, SHAPE, state_mismatches

from autosam_fl import protocol as P
from autosam_fl.preflight import load_federation
from autosam_fl.reply_polling import ReplyPollingGrid

from . import outputs
from .outputs import BEST, LAST, resolve_cache_dir, resolve_run_dir
from .strategy import MinSitesError, arrayrecord_nbytes, build_strategy, wire_record

log = logging.getLogger("autosam.server")

class CheckpointMismatchError(ConfigError):
    """The resume checkpoint does not fit this federation's model (other backbone or shapes)."""


def model_hash(fed: FederationConfig) -> str:
    """Hash of what fixes the trainable state's meaning: the SAM and model configs (DP's GroupNorm
    layout shows in the state's keys, which resume also compares)."""
    return config_hash(FederationConfig(name="-", sites=[], sam=fed.sam, model=fed.model))


def checkpoint_metadata(fed: FederationConfig, server_round: int, state: dict, validation: dict | None = None,
                        best: dict | None = None, runtime: dict | None = None) -> dict:
    """Metadata of a round's checkpoint: the full ``sam`` and ``model`` configs (``model.dp_compatible``
    included, so :func:`autosam_core.model_factory.model_from_checkpoint` rebuilds the same g), the round,
    hashes, validation, the best round so far and ``runtime`` (the device and precision of the central
    evaluation and of each site's training, :meth:`FederatedServer.runtime`)."""
    return {"server_round": server_round, "config_hash": config_hash(fed), "model_hash": model_hash(fed),
            "backbone": fed.model.backbone, "sam_kind": fed.sam.kind,
            "sam": fed.sam.model_dump(), "model": fed.model.model_dump(),
            "federation": fed.name, "validation": validation, "best": best, "runtime": runtime,
            "state_sha256": outputs.state_digest(state)}


def check_resume_checkpoint(fed: FederationConfig, ckpt_path: Path, expected: dict) -> dict:
    """Load the resume checkpoint and check it fits this federation's model.

    Args:
        expected: the freshly built model's trainable state (key -> tensor) to compare with.

    Returns:
        the checkpoint payload (``trainable_state``, ``metadata``).

    Raises:
        CheckpointError: unreadable file. CheckpointMismatchError: other backbone/SAM or a state
        whose keys/shapes differ; names the first mismatched key and both shapes.
    """
    from autosam_core.checkpoint import load_checkpoint

    payload = load_checkpoint(ckpt_path)
    meta = payload.get("metadata", {})
    reason = first_state_mismatch(payload["trainable_state"], expected)
    theirs = f"backbone {meta.get('backbone', '?')}, SAM {meta.get('sam_kind', '?')}"
    ours = f"backbone {fed.model.backbone}, SAM {fed.sam.kind}"
    if reason:
        raise CheckpointMismatchError(
            f"{ckpt_path}: cannot resume: the checkpoint was trained with {theirs}, this federation uses {ours}: "
            f"{reason}. Use another output_dir/name or set resume: false.")
    if meta.get("model_hash") not in (None, model_hash(fed)):
        raise CheckpointMismatchError(
            f"{ckpt_path}: cannot resume: the checkpoint's SAM/model config ({theirs}, {meta.get('model')}) differs "
            f"from this federation's ({ours}, {fed.model.model_dump()}). Use another output_dir/name or set "
            "resume: false.")
    return payload


def first_state_mismatch(checkpoint: dict, model: dict) -> str | None:
    """The first difference between a checkpoint's state and a model's state, in the model's key order.

    Returns None when keys and shapes agree, else a sentence naming the first mismatched key and
    both shapes (for a key missing on one side: the other side's entry at the same position).
    The comparison is :func:`autosam_core.trainable_state.state_mismatches`.
    """
    diff = state_mismatches(checkpoint, model)
    if not diff:
        return None
    m = next((d for d in diff if d.kind in (MISSING, SHAPE)), diff[0])
    if m.kind == SHAPE:
        return f"first mismatched key {m.key!r}: shape {m.found[0]} in the checkpoint, {m.expected[0]} in this model"
    if m.kind == MISSING:
        i = list(model).index(m.key)
        ck_items = list(checkpoint.items())
        other = ck_items[i] if i < len(ck_items) else None
        where = (f"the checkpoint has {other[0]!r} with shape {tuple(other[1].shape)} at that position"
                 if other else "the checkpoint has no entry at that position")
        return f"first mismatched key {m.key!r} (shape {m.expected[0]} in this model) is not in the checkpoint; {where}"
    return f"first mismatched key {m.key!r} (shape {m.found[0]} in the checkpoint) is not in this model"


class _StreamFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname} [autosam] {record.getMessage()}"


class FederatedServer:
    """Server side of one federated run.

    Args:
        fed_path: federation YAML.
        run_dir: output folder (default ``<output_dir>/<name>``, output_dir relative to the YAML's folder).
        node_sites: known node id -> site id (deployment: from SuperNode registration).
        local_epochs: override of every site's ``local_epochs`` (0 = use the site YAMLs).

    Raises:
        ConfigError: bad federation YAML.
    """

    def __init__(self, fed_path: str | Path, run_dir: str | Path | None = None,
                 node_sites: dict[int, str] | None = None, local_epochs: int = 0):
        self.fed_path = Path(fed_path).expanduser().resolve()
        self.fed, _ = load_federation(self.fed_path)  # model.dp_compatible from the sites
        self.run_dir = Path(run_dir).resolve() if run_dir else resolve_run_dir(self.fed, self.fed_path)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.node_sites = dict(node_sites or {})
        self.local_epochs = int(local_epochs)
        self.cache_dir = resolve_cache_dir(self.fed, self.fed_path)
        self.history: list[dict] = []
        self.offset = 0
        self.best: dict | None = None
        self.summary: dict[str, Any] = {}
        self._announced: set[str] = set()  # sites whose device/precision has been logged
        self._handlers: list[logging.Handler] = []
        self._t0 = time.time()
        self._t_last = self._t0

    # ----- logging ------------------------------------------------------------------------------
    def _setup_logging(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(self.run_dir / "server.log")
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(_StreamFormatter())
        self._handlers = [fh, sh]
        for name in ("autosam", "autosam_core"):
            lg = logging.getLogger(name)
            lg.setLevel(logging.INFO)
            lg.propagate = False
            for h in self._handlers:
                lg.addHandler(h)

    def _teardown_logging(self) -> None:
        for name in ("autosam", "autosam_core"):
            lg = logging.getLogger(name)
            for h in self._handlers:
                lg.removeHandler(h)
        for h in self._handlers:
            h.close()

    # ----- main ---------------------------------------------------------------------------------
    def run(self, grid: Grid) -> dict:
        """Execute the federation on ``grid``; returns the summary dict (also in summary.json).

        Raises:
            CheckpointMismatchError: incompatible resume checkpoint (before any site is contacted).
            MinSitesError: too few sites connected or successful in a round (run stops; the last
            checkpoint keeps the previous global model).
        """
        self._setup_logging()
        status, error = "failed", None
        try:
            self._prepare()
            self._execute(grid)
            status = "completed"
        except BaseException as err:
            error = f"{type(err).__name__}: {err}"
            log.error("run failed: %s", error)
            log.debug("%s", traceback.format_exc())
            raise
        finally:
            try:
                self._finish(status, error)
            finally:
                self._teardown_logging()
        return self.summary

    def _prepare(self) -> None:
        from autosam_core.evaluation import CentralEvaluator
        from autosam_core.model_factory import build_autosam

        fed = self.fed
        log.info("federation %s (%s): %d rounds, strategy %s, min_sites %d, round_timeout %.0f s, run dir %s",
                 fed.name, self.fed_path, fed.rounds, fed.strategy.name, fed.min_sites, fed.round_timeout, self.run_dir)
        self.dp = fed.model.dp_compatible  # load_federation set it from the sites' YAMLs
        self.model = build_autosam(fed.sam, fed.model, seed=fed.seed)
        if self.dp:
            log.info("DP federation: every site trains g with DP-SGD; g uses GroupNorm instead of BatchNorm")
        state = self.model.trainable_state()
        self.resumed_from: dict | None = None
        last = self.ckpt_dir / LAST
        if fed.resume and last.is_file():
            payload = check_resume_checkpoint(fed, last, state)
            meta = payload["metadata"]
            self.offset = int(meta.get("server_round", 0))
            state = payload["trainable_state"]
            self.model.load_trainable_state(state)
            hist_path = self.run_dir / "history.json"
            if hist_path.is_file():
                self.history = [h for h in json.loads(hist_path.read_text()) if h["round"] <= self.offset]
            self.best = meta.get("best")
            self.resumed_from = {"round": self.offset, "checkpoint": str(last),
                                 "state_sha256": outputs.state_digest(state),
                                 "config_hash": meta.get("config_hash")}
            if meta.get("config_hash") != config_hash(fed):
                log.info("resume: the federation config changed since the checkpoint (hash %s -> %s); "
                         "model and SAM are the same", meta.get("config_hash"), config_hash(fed))
            log.info("resuming after round %d from %s (state sha256 %s)", self.offset, last,
                     self.resumed_from["state_sha256"][:16])
        elif fed.resume:
            log.warning("resume: no checkpoint at %s; starting from round 0", last)
        self.initial_state = state
        runtime = {"device": fed.device, "precision": fed.precision}
        self.evaluator = CentralEvaluator(self.model, fed.evaluate, self.cache_dir, base_dir=self.fed_path.parent,
                                          **runtime) if fed.evaluate else None
        self.val_evaluator = CentralEvaluator(self.model, fed.validation, self.cache_dir,
                                              base_dir=self.fed_path.parent, **runtime) if fed.validation else None
        sam = self.model.sam
        import torch

        log.info("central evaluation: device %s, precision %s, %d torch threads", sam.device, sam.precision,
                 torch.get_num_threads())
        self.strategy = build_strategy(
            fed.strategy.name, fed.strategy.mu, min_sites=fed.min_sites, round_timeout=fed.round_timeout,
            node_sites=self.node_sites, federated_validation=not fed.validation, round_offset=self.offset,
            start_sites=fed.start_sites or len(fed.sites) or fed.min_sites, transfer_dtype=fed.transfer_dtype)

    def _model_config(self) -> ConfigRecord:
        fed = self.fed
        return ConfigRecord({
            # the architecture, SAM kind and SAM fingerprint; never a coordinator file path (sites own their
            # files; the global weights replace any pretrained init, so 'pretrained' is not sent)
            P.SAM_KIND: fed.sam.kind, P.SAM_WEIGHTS: self.model.sam.weights_id,
            P.MODEL_CONFIG: json.dumps(fed.model.model_copy(update={"pretrained": None}).model_dump()),
            P.SEED: int(fed.seed),
            P.LOCAL_EPOCHS: self.local_epochs, P.DP: bool(self.dp), P.PLANNED_ROUNDS: int(fed.rounds),
            P.FINAL_ROUND: int(fed.rounds), P.FEDERATED_EVALUATE: not fed.validation,
            P.TRANSFER_DTYPE: fed.transfer_dtype,
        })

    def _execute(self, grid: Grid) -> None:
        remaining = self.fed.rounds - self.offset
        if remaining <= 0:
            log.info("nothing to do: the checkpoint is at round %d and rounds is %d", self.offset, self.fed.rounds)
            return
        arrays = ArrayRecord(self.initial_state)
        self.summary["initial_state_sha256"] = outputs.state_digest(arrays.to_torch_state_dict())
        log.info("model: preset %s, backbone %s, g input %d, SAM %s; %d trainable tensors, %.1f MB per transfer in %s",
                 self.fed.model.preset or "none (custom keys)", self.fed.model.backbone, self.fed.model.g_input_size,
                 self.fed.sam.kind, len(arrays),
                 arrayrecord_nbytes(wire_record(arrays, self.fed.transfer_dtype)) / 1e6, self.fed.transfer_dtype)
        self._t_last = time.time()
        self.strategy.start(grid=ReplyPollingGrid(grid), initial_arrays=arrays, num_rounds=remaining, timeout=self.fed.round_timeout,
                            train_config=self._model_config(), evaluate_config=self._model_config(),
                            evaluate_fn=self._evaluate_fn)

    # ----- per round ----------------------------------------------------------------------------
    def _evaluate_fn(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        from autosam_core.checkpoint import save_checkpoint
        from autosam_core.evaluation import image_weighted_mean

        rnd = self.offset + server_round
        if server_round == 0 and self.offset > 0:
            return None  # the checkpoint's round is already in the history
        state = arrays.to_torch_state_dict()
        self.model.load_trainable_state(state)
        bench = {k: {m: v[m] for m in ("dice", "iou", "num_images")}
                 for k, v in (self.evaluator.evaluate() if self.evaluator else {}).items()}
        report = self.strategy.reports.get(server_round) if server_round > 0 else None
        validation = None
        if self.val_evaluator is not None:
            vals = self.val_evaluator.evaluate()
            validation = {"dice": image_weighted_mean(vals, "dice"), "iou": image_weighted_mean(vals, "iou"),
                          "num_images": sum(v["num_images"] for v in vals.values()), "source": "central",
                          "splits": list(vals)}
        elif report is not None and report.validation:
            validation = report.validation
        now = time.time()
        rec: dict[str, Any] = {"round": rnd, "benchmarks": bench, "validation": validation,
                               "wall_seconds": now - self._t0, "round_seconds": now - self._t_last}
        self._t_last = now
        if report is not None:
            rec.update(sites=report.sites, failed_sites=report.failed, ignored_sites=report.ignored,
                       aggregated=report.aggregated, reply_keys_ok=report.reply_keys_ok,
                       download_bytes=report.download_bytes)
        if server_round > 0:
            meta = checkpoint_metadata(self.fed, rnd, state, validation, self.best, runtime=self.runtime())
            if validation and (self.best is None or validation["dice"] > self.best["val_dice"]):
                self.best = {"round": rnd, "val_dice": validation["dice"], "source": validation["source"]}
                meta["best"] = self.best
                save_checkpoint(self.ckpt_dir / BEST, state, meta)
            save_checkpoint(self.ckpt_dir / LAST, state, meta)
            rec["checkpoint"] = str(self.ckpt_dir / LAST)
        self.history.append(rec)
        outputs.write_json(self.run_dir / "history.json", self.history)
        self._write_summary("running", None)
        self._log_round(rec, report)
        if server_round < self.fed.rounds - self.offset:  # the strategy now sends g to the sites
            log.info("round %d/%d: g sent to the sites, waiting for their training replies%s", rnd + 1, self.fed.rounds,
                     " (a site's first round also encodes its training images with the frozen SAM once, "
                     "~2-3 s per image on a CPU, unless its embedding cache is filled)" if server_round == 0 else "")
        flat: dict[str, float] = {}
        for label, m in bench.items():
            flat[f"{label}/dice"], flat[f"{label}/iou"] = float(m["dice"]), float(m["iou"])
        if validation:
            flat["val_dice"] = float(validation["dice"])
        return MetricRecord(flat) if flat else None

    def runtime(self) -> dict:
        """``{"central_evaluation": {"device", "precision"}, "sites": {site: {"device", "precision"}}}``:
        where and in which precision the coordinator evaluates and each site last trained g (from the
        sites' train replies; a site that never replied is absent)."""
        sam = self.model.sam
        sites: dict[str, dict] = {}
        for rec in self.history:
            for s, v in (rec.get("sites") or {}).items():
                if v.get("precision") is not None:
                    sites[s] = {"device": v.get("device"), "precision": v["precision"]}
        return {"central_evaluation": {"device": str(sam.device), "precision": sam.precision}, "sites": sites}

    def _log_round(self, rec: dict, report) -> None:
        parts = [f"round {rec['round']}/{self.fed.rounds}"]
        if report is not None:
            for s, v in report.sites.items():
                if v.get("precision") is not None and s not in self._announced:
                    self._announced.add(s)
                    log.info("site %s trains g on %s in %s", s, v.get("device"), v["precision"])
            ok = ", ".join(f"{s}({v['num_examples']})" for s, v in report.sites.items()) or "none"
            parts.append(f"sites ok: {ok}")
            eps = [f"{s} {v['epsilon']:.4g}" + (f"/{v['target_epsilon']:g}" if v.get("target_epsilon") else "")
                   for s, v in report.sites.items() if v.get("epsilon") is not None]
            if eps:
                parts.append("epsilon spent: " + ", ".join(eps))
            skipped = {s: v.get("reason") for s, v in report.sites.items() if v.get("status") == "skipped"}
            if skipped:
                parts.append("skipped: " + "; ".join(f"{s}: {r}" for s, r in skipped.items()))
            if report.failed:
                parts.append("failed: " + "; ".join(f"{s}: {t}" for s, t in report.failed.items()))
            if not report.aggregated:
                parts.append("global model unchanged")
        if rec.get("validation"):
            parts.append(f"val dice {rec['validation']['dice']:.4f} ({rec['validation']['source']})")
        for label, m in rec["benchmarks"].items():
            parts.append(f"{label} dice {m['dice']:.4f} iou {m['iou']:.4f}")
        parts.append(f"{rec['round_seconds']:.1f} s")
        log.info(" | ".join(parts))

    # ----- outputs ------------------------------------------------------------------------------
    def _write_summary(self, status: str, error: str | None) -> None:
        sites_n: dict[str, int] = {}
        bytes_site: dict[str, dict] = {}
        for rec in self.history:
            for s, v in (rec.get("sites") or {}).items():
                sites_n[s] = v["num_examples"]
                bytes_site[s] = {"upload": v["upload_bytes"], "download": v["download_bytes"],
                                 "total": v["upload_bytes"] + v["download_bytes"]}
        self.summary.update({
            "name": self.fed.name, "status": status, "error": error,
            "federation_config": str(self.fed_path), "config_hash": config_hash(self.fed),
            "model_hash": model_hash(self.fed), "backbone": self.fed.model.backbone,
            "g_input_size": self.fed.model.g_input_size, "sam_kind": self.fed.sam.kind,
            "strategy": self.fed.strategy.model_dump(), "rounds_planned": self.fed.rounds,
            "transfer_dtype": self.fed.transfer_dtype,
            "rounds_completed": max([r["round"] for r in self.history], default=0),
            "resumed_from": self.resumed_from if hasattr(self, "resumed_from") else None,
            "best": self.best, "num_examples_per_site": sites_n, "bytes_per_site_per_round": bytes_site,
            "runtime": self.runtime() if hasattr(self, "model") else None,
            "privacy": outputs.privacy_summary(self.history),
            "wall_seconds": time.time() - self._t0, "rounds": self.history, "run_dir": str(self.run_dir),
        })
        outputs.write_json(self.run_dir / "summary.json", self.summary)

    def _finish(self, status: str, error: str | None) -> None:
        if status == "completed" and self.history:
            self._final_outputs()
        self._write_summary(status, error)
        if status == "completed":
            log.info("run completed in %.1f s: %s", time.time() - self._t0, self.run_dir / "summary.json")

    def _final_outputs(self) -> None:
        from autosam_core.checkpoint import load_checkpoint

        outputs.write_metrics_csv(self.run_dir / "metrics.csv", self.history)
        outputs.plot_dice(self.run_dir / "global_dice.png", self.history,
                          f"{self.fed.name}: global model Dice per round")
        if outputs.plot_epsilon(self.run_dir / "epsilon.png", outputs.privacy_summary(self.history),
                                f"{self.fed.name}: privacy spent per site (DP-SGD)"):
            log.info("epsilon per site per round: %s", self.run_dir / "epsilon.png")
        chosen = self.ckpt_dir / (BEST if (self.ckpt_dir / BEST).is_file() else LAST)
        if self.evaluator is not None and chosen.is_file():
            self.model.load_trainable_state(load_checkpoint(chosen)["trainable_state"])
            outputs.plot_predictions(self.run_dir / "predictions.png", self.model, self.evaluator.benchmarks,
                                     self.evaluator.cache, per_benchmark=2,
                                     title=f"{self.fed.name}: {chosen.stem} model (test images)")
        if self.best is None:
            log.info("no validation metric was available: best.pt not written; last.pt is the final model")
        else:
            log.info("best round on validation (%s): %d (Dice %.4f)", self.best["source"], self.best["round"],
                     self.best["val_dice"])


def parse_node_sites(text: str) -> dict[int, str]:
    """Parse run config ``node-sites`` ("<node id>:<site id>,..."); empty text gives {}.

    Raises:
        ConfigError: an entry is not ``<int>:<name>``.
    """
    out: dict[int, str] = {}
    for item in filter(None, (s.strip() for s in (text or "").split(","))):
        node, _, site = item.partition(":")
        if not node.strip().isdigit() or not site.strip():
            raise ConfigError(f"run config 'node-sites': entry {item!r} is not '<node id>:<site id>'")
        out[int(node)] = site.strip()
    return out


__all__ = ["FederatedServer", "CheckpointMismatchError", "MinSitesError", "check_resume_checkpoint",
           "model_hash", "parse_node_sites"]
