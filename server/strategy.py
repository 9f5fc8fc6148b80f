"""Flower strategies for AutoSAM-FL: FedAvg / FedProx that survive failing and empty sites.

Flower 1.42's message-based ``FedAvg`` (checked in ``flwr/serverapp/strategy``) already skips
error replies, but it (a) divides by zero when every reply has 0 examples, (b) turns int64
BatchNorm counters into float64, (c) waits forever in ``sample_nodes`` when fewer than
``min_available_nodes`` nodes are connected, (d) does not enforce a minimum number of successful
replies, and (e) logs failures by node id only. :class:`RobustAggregation` overrides just
``configure_train``/``aggregate_train`` (and the evaluate pair) to fix these; sampling, message
construction, FedProx's ``proximal-mu`` and ``start()`` stay Flower's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx

from autosam_core.trainable_state import is_trainable_key
from autosam_fl import protocol as P
from autosam_fl.transfer import (TransferDtypeError, WireFormatError, check_transfer_dtype, decode_state, to_wire,
                                 unpack_arrays)

from .aggregation import check_num_examples, check_state, weighted_average

log = logging.getLogger("autosam.server")


class MinSitesError(RuntimeError):
    """Fewer sites than ``min_sites`` are connected or replied successfully; the run stops."""


@dataclass
class RoundReport:
    """What happened in one training round (server_round counts from 1 within this run)."""

    server_round: int
    sent_to: dict[int, str] = field(default_factory=dict)
    sites: dict[str, dict] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)
    reply_keys_ok: dict[str, bool] = field(default_factory=dict)
    aggregated: bool = False
    download_bytes: int = 0
    started: float = field(default_factory=time.time)
    sent_at: float | None = None  # time.monotonic() when the train instructions were sent
    validation: dict | None = None


def arrayrecord_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """ArrayRecord -> {key: ndarray} (dtype and shape preserved)."""
    return {k: v.numpy() for k, v in record.items()}


def wire_record(record: ArrayRecord, transfer_dtype: str) -> ArrayRecord:
    """The global state as it travels to the sites: packed, floating arrays in ``transfer_dtype``
    (:func:`autosam_fl.transfer.to_wire`)."""
    return to_wire(arrayrecord_to_numpy(record), transfer_dtype)


def arrayrecord_nbytes(record: ArrayRecord) -> int:
    """Serialized size of an ArrayRecord's arrays in bytes (what crosses the network, before gRPC framing)."""
    return int(sum(len(v.data) for v in record.values()))


def no_reply_text(elapsed: float | None, round_timeout: float) -> str:
    """Why a site sent no train reply: its connection was lost (heartbeats stopped) or the round timed out."""
    if elapsed is not None and elapsed < round_timeout - 5:
        return (f"no reply: the site's connection was lost {elapsed:.0f} s into the round (its SuperNode stopped "
                f"sending heartbeats: the site process was stopped or its network failed); round_timeout "
                f"{round_timeout:.0f} s was not reached")
    return f"no reply within round_timeout = {round_timeout:.0f} s"


class RobustAggregation:
    """Mixin (put before FedAvg/FedProx): min-sites enforcement, failure logging by site, safe averaging.

    Args (keyword-only, the rest go to Flower's strategy):
        min_sites: successful replies needed per round; fewer stops the run (:class:`MinSitesError`).
        round_timeout: seconds to wait for ``min_sites`` nodes to be connected before a round.
        node_sites: known node id -> site id (deployment registration); learned from replies too.
        federated_validation: ask sites to evaluate on their held-out split after each round.
        round_offset: rounds done before this run (resume); logs and ``global-round`` add it.
        start_sites: sites to wait for before the first round (default ``min_sites``), so a run
            with ``min_sites`` below the number of sites still starts with all of them.
        transfer_dtype: dtype of g's floating-point arrays on the wire, both directions
            (:mod:`autosam_fl.transfer`); replies are decoded to float32 before they are checked
            and averaged, so the average and the global model stay float32.
    """

    def __init__(self, *args, min_sites: int = 1, round_timeout: float = 600.0,
                 node_sites: dict[int, str] | None = None, federated_validation: bool = False,
                 round_offset: int = 0, start_sites: int | None = None, transfer_dtype: str = "float32",
                 **kwargs):
        kwargs.setdefault("fraction_train", 1.0)
        kwargs.setdefault("min_train_nodes", min_sites)
        kwargs.setdefault("min_available_nodes", min_sites)
        kwargs.setdefault("fraction_evaluate", 1.0 if federated_validation else 0.0)
        kwargs.setdefault("min_evaluate_nodes", 1 if federated_validation else 0)
        super().__init__(*args, **kwargs)
        self.min_sites = min_sites
        self.start_sites = max(int(start_sites or min_sites), min_sites)
        self.round_timeout = round_timeout
        self.node_sites: dict[int, str] = dict(node_sites or {})
        self.federated_validation = federated_validation
        self.round_offset = round_offset
        self.transfer_dtype = check_transfer_dtype(transfer_dtype)
        self.reports: dict[int, RoundReport] = {}
        self._global_ref: dict[str, np.ndarray] = {}

    # ----- helpers ------------------------------------------------------------------------------
    def site_of(self, node_id: int) -> str:
        """Site id of a node (``node-<id>`` until the node has told us)."""
        return self.node_sites.get(node_id, f"node-{node_id}")

    def _wait_for_nodes(self, grid: Grid, server_round: int, needed: int) -> None:
        key = "min_sites" if needed == self.min_sites else "start_sites"
        server_round += self.round_offset
        deadline = time.monotonic() + self.round_timeout
        while True:
            nodes = list(grid.get_node_ids())
            if len(nodes) >= needed:
                return
            if time.monotonic() >= deadline:
                raise MinSitesError(
                    f"round {server_round}: only {len(nodes)} of the required {needed} sites ({key}) are "
                    f"connected after waiting round_timeout = {self.round_timeout:.0f} s; connected: "
                    f"{[self.site_of(n) for n in nodes]}. Start the missing sites or lower {key}.")
            log.info("round %d: waiting for sites: %d connected, %d needed", server_round, len(nodes), needed)
            time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))

    # ----- training -----------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Wait (up to ``round_timeout``) for ``start_sites`` nodes before the first round of this run and
        ``min_sites`` before later ones, then Flower's sampling/messages."""
        self._wait_for_nodes(grid, server_round, self.start_sites if server_round == 1 else self.min_sites)
        self._global_ref = arrayrecord_to_numpy(arrays)
        config[P.GLOBAL_ROUND] = self.round_offset + server_round
        config[P.TRANSFER_DTYPE] = self.transfer_dtype
        arrays = wire_record(arrays, self.transfer_dtype)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        report = self.reports[server_round] = RoundReport(server_round)
        report.sent_to = {m.metadata.dst_node_id: self.site_of(m.metadata.dst_node_id) for m in messages}
        report.download_bytes = arrayrecord_nbytes(arrays)
        report.sent_at = time.monotonic()
        self._messages = [(m, m.metadata.dst_node_id) for m in messages]
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the successful, non-empty replies weighted by ``num-examples``.

        Error replies, replies with a non-trainable key, a shape mismatch or a non-finite value are
        logged with the site id and left out; 0-example replies count as alive but do not vote.
        Returns (None, None) when nobody trained on a sample, so Flower keeps the previous model.

        Raises:
            MinSitesError: fewer than ``min_sites`` sites replied successfully (also when every
            site failed); the message names every failed site and its error.
        """
        replies = list(replies)
        report = self.reports.setdefault(server_round, RoundReport(server_round))
        g = self.round_offset + server_round
        replied: set[int] = set()
        contributors: list[tuple[str, dict[str, np.ndarray], float, dict]] = []
        alive = 0
        for msg in replies:
            node = self._reply_node(msg, report, replies)
            replied.add(node)
            if msg.has_error():
                tagged, text = P.parse_site_error(msg.error.reason)
                site = tagged or self.site_of(node)
                if tagged:
                    self.node_sites.setdefault(node, tagged)
                if "Node Unavailable" in text and report.sent_at is not None:
                    text += (f" (the site's SuperNode stopped sending heartbeats; noticed "
                             f"{time.monotonic() - report.sent_at:.0f} s into the round)")
                report.failed[site] = text
                log.error("round %d: site %s (node %d) failed: %s", g, site, node, text)
                continue
            content = msg.content
            site = self.site_of(node)
            site_rec = content.config_records.get(P.SITE)
            if site_rec is not None:
                site = str(site_rec.get(P.SITE_ID, site))
                self.node_sites[node] = site
            reason, state, metrics = self._validate_reply(content)
            report.reply_keys_ok[site] = state is not None and all(map(is_trainable_key, state))
            if reason:
                report.failed[site] = f"reply rejected: {reason}"
                log.error("round %d: site %s (node %d): reply rejected: %s", g, site, node, reason)
                continue
            alive += 1
            n = float(metrics[P.NUM_EXAMPLES])
            info: dict = {"num_examples": int(n)}
            info.update({k: v for k, v in metrics.items() if k != P.NUM_EXAMPLES})
            info["upload_bytes"] = arrayrecord_nbytes(next(iter(content.array_records.values())))
            info["download_bytes"] = report.download_bytes
            info["node_id"] = node
            for key in (P.STATUS, P.REASON, P.DEVICE, P.PRECISION):
                if site_rec is not None and site_rec.get(key) is not None:
                    info[key] = str(site_rec[key])
            report.sites[site] = info
            if n <= 0:
                why = info.get(P.REASON)
                report.ignored[site] = (f"did not train: {why}" if why else "trained on 0 samples") + \
                    "; left out of the average"
                log.warning("round %d: site %s sent 0 examples (%s); ignored in the average", g, site,
                            why or "no reason given")
                continue
            contributors.append((site, state, n, info))
        elapsed = time.monotonic() - report.sent_at if report.sent_at is not None else None
        for node in set(report.sent_to) - replied:
            site = self.site_of(node)
            report.failed[site] = no_reply_text(elapsed, self.round_timeout)
            log.error("round %d: site %s (node %d): %s", g, site, node, report.failed[site])
        if alive < self.min_sites:
            failed = "; ".join(f"{s}: {t}" for s, t in report.failed.items()) or "none"
            raise MinSitesError(
                f"round {g}: {alive} of the required {self.min_sites} sites (min_sites) replied "
                f"successfully; failed sites: {failed}. Stopping; the last checkpoint keeps the previous "
                "global model.")
        if not contributors:
            log.warning("round %d: every reply has 0 training examples; keeping the previous global model", g)
            return None, None
        contributors.sort(key=lambda c: c[0])  # by site id: the float sum does not depend on reply order
        avg = weighted_average([c[1] for c in contributors], [c[2] for c in contributors])
        report.aggregated = True
        total = sum(c[2] for c in contributors)
        agg = MetricRecord({"num_sites": len(contributors)})
        for key in ("train_loss", "train_dice"):
            if all(key in c[3] for c in contributors):
                agg[key] = float(sum(c[3][key] * c[2] for c in contributors) / total)
        return ArrayRecord({k: Array(v) for k, v in avg.items()}), agg

    def _reply_node(self, msg: Message, report: "RoundReport", replies: list[Message]) -> int:
        """The node a reply belongs to. Flower's own error replies (e.g. "Node Unavailable" for a node
        that missed its heartbeats) come from the SuperLink, not the node: match them to the
        instruction they answer (``reply_to_message_id``), else to the one node that did not reply."""
        node = msg.metadata.src_node_id
        if node in report.sent_to:
            return node
        for sent, dst in getattr(self, "_messages", []):
            try:
                if sent.metadata.message_id and sent.metadata.message_id == msg.metadata.reply_to_message_id:
                    return dst
            except Exception:  # noqa: BLE001 - metadata of a message not pushed yet
                continue
        answered = {r.metadata.src_node_id for r in replies}
        missing = [n for n in report.sent_to if n not in answered]
        return missing[0] if len(missing) == 1 else node

    def _validate_reply(self, content) -> tuple[str | None, dict[str, np.ndarray] | None, MetricRecord | None]:
        if len(content.array_records) != 1 or len(content.metric_records) != 1:
            return (f"expected exactly one ArrayRecord and one MetricRecord, found {len(content.array_records)} "
                    f"and {len(content.metric_records)}"), None, None
        metrics = next(iter(content.metric_records.values()))
        try:
            wire = unpack_arrays(next(iter(content.array_records.values())))
        except WireFormatError as err:
            return str(err), None, metrics
        try:
            state = decode_state(wire, self.transfer_dtype, self._global_ref or None)
        except TransferDtypeError as err:
            return str(err), wire, metrics
        if P.NUM_EXAMPLES not in metrics:
            return f"MetricRecord lacks {P.NUM_EXAMPLES!r}", state, metrics
        reason = check_num_examples(metrics[P.NUM_EXAMPLES]) or check_state(state, self._global_ref or None)
        for key in ("train_loss", "train_dice"):
            if key in metrics and not np.isfinite(float(metrics[key])):
                reason = reason or f"{key} is {metrics[key]}"
        return reason, state, metrics

    # ----- federated validation -----------------------------------------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Ask every connected site to validate on its held-out split (only with federated_validation)."""
        if not self.federated_validation:
            return []
        self._wait_for_nodes(grid, server_round, self.min_sites)
        config[P.GLOBAL_ROUND] = self.round_offset + server_round
        config[P.TRANSFER_DTYPE] = self.transfer_dtype
        return super().configure_evaluate(server_round, wire_record(arrays, self.transfer_dtype), config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Validation Dice/IoU weighted by validation images; failures are logged, never fatal."""
        per_site, num, dice, iou = {}, 0, 0.0, 0.0
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                tagged, text = P.parse_site_error(msg.error.reason)
                log.error("round %d: validation at site %s failed: %s", self.round_offset + server_round,
                          tagged or self.site_of(node), text)
                continue
            content = msg.content
            site = str(content.config_records[P.SITE].get(P.SITE_ID)) if P.SITE in content.config_records \
                else self.site_of(node)
            metrics = next(iter(content.metric_records.values()), None)
            if metrics is None or check_num_examples(metrics.get(P.NUM_EXAMPLES)):
                log.error("round %d: validation reply of site %s has no usable num-examples",
                          self.round_offset + server_round, site)
                continue
            n = int(metrics[P.NUM_EXAMPLES])
            per_site[site] = {"num_images": n, "dice": float(metrics["val_dice"]), "iou": float(metrics["val_iou"])}
            if n > 0 and np.isfinite(metrics["val_dice"]) and np.isfinite(metrics["val_iou"]):
                num, dice, iou = num + n, dice + n * float(metrics["val_dice"]), iou + n * float(metrics["val_iou"])
        report = self.reports.setdefault(server_round, RoundReport(server_round))
        if num == 0:
            report.validation = None
            return None
        report.validation = {"dice": dice / num, "iou": iou / num, "num_images": num, "source": "sites",
                             "sites": per_site}
        return MetricRecord({"val_dice": dice / num, "val_iou": iou / num, "val_num_images": num})


class AutoSamFedAvg(RobustAggregation, FedAvg):
    """FedAvg (McMahan et al. 2017) weighted by ``num-examples``, robust to failing/empty sites."""


class AutoSamFedProx(RobustAggregation, FedProx):
    """FedProx (Li et al. 2020): FedAvg on the server + ``proximal-mu`` sent to the sites."""


def build_strategy(name: str, mu: float, **kwargs) -> FedAvg:
    """Strategy for ``strategy.name`` (``fedavg`` or ``fedprox``); kwargs go to :class:`RobustAggregation`.

    Raises:
        ValueError: unknown strategy name.
    """
    if name == "fedavg":
        return AutoSamFedAvg(**kwargs)
    if name == "fedprox":
        return AutoSamFedProx(proximal_mu=mu, **kwargs)
    raise ValueError(f"strategy.name must be fedavg or fedprox, found {name!r}")
