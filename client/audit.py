"""Audit of everything that leaves a site: check each reply before it is sent, and keep a record.

Switched on by ``autosam-client --audit`` (node config ``audit``), by ``audit: true`` in the site
YAML, or by the environment variable ``AUTOSAM_FL_AUDIT=1`` (simulation). For every reply the
ClientApp is about to send (train and federated-validation replies, and error replies), the audit

1. checks it against the allow-lists of :mod:`client.protocol`:

   - records: only ``arrays`` (train replies only), ``metrics`` and ``site``;
   - ``arrays``: exactly the keys, shapes and dtypes of a *freshly built* g (and h) for the
     federation's model config (:func:`expected_signature`, computed from the config, not from the
     model that is being sent), so no SAM key, no extra tensor (e.g. a mask or an embedding) and
     no reshaped tensor can travel;
   - ``metrics``: only allow-listed keys (:data:`client.protocol.TRAIN_METRIC_KEYS` /
     :data:`~client.protocol.EVALUATE_METRIC_KEYS`), each one number (no lists, which could hold
     per-image values), finite (epsilon may be +inf), Dice/IoU in [0, 1], ``num-examples`` an
     integer between 0 and the site's number of images;
   - ``site``: only ``site-id`` (equal to this site's id), ``status`` (``trained``/``skipped``)
     and ``reason`` (must match a fixed template with numbers only,
     :data:`~client.protocol.REASON_PATTERNS`): no file name, stem or other free text;

2. records the reply (round, kind, number of arrays, bytes, metric keys and values, verdict) in
   ``<audit dir>/audit-<site_id>.json`` and a human-readable ``audit-<site_id>.md`` (rewritten
   after every reply, kept across rounds and runs: each round of a deployment runs in a fresh
   process);

3. blocks a reply that breaks a rule: :class:`AuditViolation` is raised *before* the reply is
   handed to Flower, and the error text that then goes to the server is generic (it names the
   number of violations, never the offending values); the details stay in the local report.

With the audit on, error replies (a failing site) also carry only the site id, the round and the
error's type: their message text (which may name local files) stays in the site's log and report.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from autosam_core.files import atomic_write_json, atomic_write_text
from autosam_core.trainable_state import (DTYPE, FOREIGN, MISSING, SHAPE, UNEXPECTED, Signature, state_mismatches,
                                          state_signature)
from autosam_fl import protocol as P
from autosam_fl.transfer import WireFormatError, unpack_arrays

log = logging.getLogger("autosam.client")

AUDIT_FORMAT = 1
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
KINDS = ("train", "evaluate", "error")

_SIGNATURES: dict[str, Signature] = {}


class AuditViolation(ValueError):
    """A reply breaks the site's allow-list; it is not sent. ``violations`` lists every broken rule."""

    def __init__(self, site_id: str, kind: str, violations: list[str], report: Path | None = None):
        self.site_id, self.kind, self.violations, self.report = site_id, kind, list(violations), report
        where = f" (report: {report})" if report else ""
        super().__init__(f"site {site_id}: the audit blocked this {kind} reply: {len(violations)} violation(s): "
                         + "; ".join(violations) + where)

    def public_text(self) -> str:
        """What may go to the server: the count of violations, no offending key or value."""
        return (f"the site's reply audit blocked this {self.kind} reply ({len(self.violations)} violation(s)); "
                "details are in the site's audit report")


def truthy(value: Any) -> bool:
    """True for True / 1 / "1" / "true" / "yes" / "on" (any case); False otherwise."""
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in TRUE_WORDS


def audit_enabled(node_config: Mapping[str, Any], site_audit: bool = False) -> bool:
    """Whether replies are audited: node config ``audit``, env ``AUTOSAM_FL_AUDIT`` or the site YAML's ``audit``."""
    return (truthy(node_config.get(P.NODE_AUDIT, False)) or truthy(os.environ.get(P.AUDIT_ENV, ""))
            or bool(site_audit))


def audit_dir(node_config: Mapping[str, Any], default: Path) -> Path:
    """Folder of the audit report: node config ``audit-dir``, else env ``AUTOSAM_FL_AUDIT_DIR``, else ``default``."""
    value = str(node_config.get(P.NODE_AUDIT_DIR, "") or os.environ.get(P.AUDIT_DIR_ENV, "")).strip()
    return Path(value).expanduser().resolve() if value else Path(default)


# ----- what the arrays must look like ----------------------------------------------------------------
def expected_signature(sam_kind: str, model_config, dp: bool) -> Signature:
    """Keys, shapes and dtypes of the trainable state of a freshly built g (+ h) for this model config.

    Built from the config alone (random init, no SAM weights loaded, the caller's RNG untouched),
    with the DP GroupNorm conversion when ``dp``; cached per (SAM kind, model config, dp).

    Args:
        sam_kind: ``SamConfig.kind`` (fixes g's output: SAM's embedding size).
        model_config: :class:`autosam_core.config.ModelConfig`.
        dp: the federation trains with DP (g's BatchNorm replaced by GroupNorm).

    Raises:
        ValueError: unknown SAM kind.
    """
    import torch

    from autosam_core.model_factory import build_prompt_generator
    from autosam_core.sam import SPECS
    from autosam_core.surrogate_decoder import SurrogateDecoder

    model_config = model_config.model_copy(update={"dp_compatible": bool(dp) or model_config.dp_compatible})
    key = json.dumps({"sam": sam_kind, "model": model_config.model_dump()}, sort_keys=True)
    if key in _SIGNATURES:
        return _SIGNATURES[key]
    if sam_kind not in SPECS:
        raise ValueError(f"unknown SAM kind {sam_kind!r}; expected one of {sorted(SPECS)}")
    spec = SPECS[sam_kind]
    plog = logging.getLogger("autosam_core.privacy")
    level = plog.level
    plog.setLevel(logging.WARNING)  # the site's own model build already logged each DP conversion
    try:
        with torch.random.fork_rng():
            g = build_prompt_generator(model_config, spec.embed_dim, spec.embedding_size, pretrained=False)
            h = SurrogateDecoder(embed_dim=spec.embed_dim) if model_config.surrogate else None
    finally:
        plog.setLevel(level)
    state = {f"prompt_generator.{k}": v for k, v in g.state_dict().items()}
    if h is not None:
        state.update({f"surrogate_decoder.{k}": v for k, v in h.state_dict().items()})
    sig = _SIGNATURES[key] = state_signature(state)
    return sig


# ----- the checks ------------------------------------------------------------------------------------
def _short(value: Any, n: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= n else text[:n] + "..."


def check_metrics(metrics: Mapping[str, Any], kind: str, max_examples: int | None = None) -> list[str]:
    """Violations of the metric allow-list for a ``train`` or ``evaluate`` reply (empty list: fine)."""
    allowed = P.TRAIN_METRIC_KEYS if kind == "train" else P.EVALUATE_METRIC_KEYS
    out = []
    for key, value in metrics.items():
        if key not in allowed:
            out.append(f"metric key {key!r} is not on the {kind} allow-list")
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            out.append(f"metric {key!r} must be one number, found {type(value).__name__} {_short(value)} "
                       "(lists could carry per-image values)")
            continue
        v = float(value)
        if math.isnan(v) or (math.isinf(v) and not (key in P.MAY_BE_INFINITE and v > 0)):
            out.append(f"metric {key!r} is {value}")
        elif key in P.UNIT_INTERVAL_METRICS and not 0.0 <= v <= 1.0:
            out.append(f"metric {key!r} = {value} is outside [0, 1]")
        elif key == P.NUM_EXAMPLES:
            if not isinstance(value, int) or value < 0:
                out.append(f"metric {key!r} must be an integer >= 0, found {_short(value)}")
            elif max_examples is not None and value > max_examples:
                out.append(f"metric {key!r} = {value} exceeds the site's {max_examples} images")
        elif v < 0:
            out.append(f"metric {key!r} = {value} is negative")
    if P.NUM_EXAMPLES not in metrics:
        out.append(f"metric {P.NUM_EXAMPLES!r} is missing")
    return out


def check_site_record(record: Mapping[str, Any], site_id: str) -> list[str]:
    """Violations of the ``site`` ConfigRecord rules (only allow-listed string fields, fixed texts)."""
    out = []
    for key, value in record.items():
        if key not in P.SITE_RECORD_KEYS:
            out.append(f"site record key {key!r} is not on the allow-list {sorted(P.SITE_RECORD_KEYS)}")
        elif not isinstance(value, str):
            out.append(f"site record {key!r} must be a string, found {type(value).__name__}")
        elif key == P.SITE_ID and value != site_id:
            out.append(f"site record {key!r} is {_short(value)}, not this site's id {site_id!r}")
        elif key in P.SITE_RECORD_VALUES and value not in P.SITE_RECORD_VALUES[key]:
            out.append(f"site record {key!r} is {_short(value)}, not one of {sorted(P.SITE_RECORD_VALUES[key])}")
        elif key == P.REASON and (len(value) > P.REASON_MAX_CHARS
                                  or not any(p.fullmatch(value) for p in P.REASON_PATTERNS)):
            out.append(f"site record {key!r} is free text {_short(value)}; only fixed reason templates with numbers "
                       "may leave the site (client.protocol.REASON_PATTERNS)")
    if record.get(P.SITE_ID) is None:
        out.append(f"site record lacks {P.SITE_ID!r}")
    return out


def check_arrays(arrays: Mapping[str, Any], expected: Signature) -> list[str]:
    """Violations of the array rule: exactly the keys, shapes and dtypes of ``expected`` (g/h only).

    ``arrays`` is the record as it is sent: packed (:func:`autosam_fl.transfer.pack_arrays`) arrays are
    unpacked first, and a packed record that does not match its own layout (e.g. bytes the layout does not
    account for) is a violation."""
    try:
        arrays = unpack_arrays(arrays)
    except WireFormatError as err:
        return [f"the packed arrays do not match their layout: {err}"]
    diff = state_mismatches(arrays, expected, compare_dtypes=True)
    out = []
    extra = [m for m in diff if m.kind in (FOREIGN, UNEXPECTED)]
    missing = [m for m in diff if m.kind == MISSING]
    changed = [m for m in diff if m.kind in (SHAPE, DTYPE)]
    if extra:
        what = "non-g/h (e.g. SAM) " if any(m.kind == FOREIGN for m in extra) else ""
        out.append(f"{len(extra)} unexpected {what}array key(s), first {extra[0].key!r}")
    if missing:
        out.append(f"{len(missing)} expected array key(s) missing, first {missing[0].key!r}")
    if changed:
        m = changed[0]
        out.append(f"array {m.key!r} is {m.found[0]} {m.found[1]}, expected {m.expected[0]} {m.expected[1]}")
    return out


def check_reply(content, kind: str, site_id: str, expected: Signature | None,
                max_examples: int | None = None) -> list[str]:
    """Every violation of the allow-lists by a reply's RecordDict (empty list: it may be sent).

    Args:
        content: the reply's ``RecordDict``.
        kind: ``train`` (must carry ``arrays``) or ``evaluate`` (must carry none).
        site_id: this site's id (the ``site`` record must name it).
        expected: :func:`expected_signature` of the federation's model (train replies).
        max_examples: upper bound of ``num-examples`` (the site's image count), None to skip.

    Raises:
        ValueError: unknown kind, or a train check without ``expected``.
    """
    if kind not in ("train", "evaluate"):
        raise ValueError(f"audit kind must be 'train' or 'evaluate', found {kind!r}")
    out = []
    names = list(content.keys())
    for name in names:
        if name not in P.REPLY_RECORDS:
            out.append(f"record {name!r} is not allowed (only {sorted(P.REPLY_RECORDS)})")
    arrays = content.array_records
    if kind == "train":
        if expected is None:
            raise ValueError("a train reply's audit needs the expected array signature")
        if list(arrays) != [P.ARRAYS]:
            out.append(f"a train reply holds exactly one ArrayRecord {P.ARRAYS!r}, found {sorted(arrays)}")
        if P.ARRAYS in arrays:
            out.extend(check_arrays(arrays[P.ARRAYS], expected))
    elif arrays:
        out.append(f"an evaluate reply carries no arrays, found {sorted(arrays)}")
    metrics = content.metric_records
    if list(metrics) != [P.METRICS]:
        out.append(f"a reply holds exactly one MetricRecord {P.METRICS!r}, found {sorted(metrics)}")
    if P.METRICS in metrics:
        out.extend(check_metrics(metrics[P.METRICS], kind, max_examples))
    configs = content.config_records
    if list(configs) != [P.SITE]:
        out.append(f"a reply holds exactly one ConfigRecord {P.SITE!r}, found {sorted(configs)}")
    if P.SITE in configs:
        out.extend(check_site_record(configs[P.SITE], site_id))
    return out


# ----- the record ------------------------------------------------------------------------------------
def _array_count(arrays: Mapping[str, Any] | None) -> int:
    """How many of g/h's arrays a record carries (packed: as many as its layout names)."""
    if arrays is None:
        return 0
    try:
        return len(unpack_arrays(arrays))
    except WireFormatError:
        return len(arrays)


def _utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _num(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class ReplyAudit:
    """One site's reply audit: checks replies (:func:`check_reply`) and keeps the report files.

    Args:
        site_id: the site's id.
        folder: where ``audit-<site_id>.json`` and ``.md`` live (created if needed).

    Raises:
        ValueError: the existing JSON report is unreadable (it is never overwritten silently).
    """

    def __init__(self, site_id: str, folder: str | Path):
        self.site_id = site_id
        self.folder = Path(folder)
        self.json_path = self.folder / f"audit-{site_id}.json"
        self.md_path = self.folder / f"audit-{site_id}.md"
        self.data: dict[str, Any] = self._read()

    def _read(self) -> dict[str, Any]:
        """The JSON report as on disk (a new one if there is no file)."""
        if not self.json_path.is_file():
            return {"format": AUDIT_FORMAT, "site_id": self.site_id, "replies": []}
        try:
            data = json.loads(self.json_path.read_text())
            if not isinstance(data.get("replies"), list):
                raise ValueError("no 'replies' list")
        except (OSError, ValueError) as err:
            raise ValueError(f"audit report {self.json_path} is unreadable ({err}); move it away to start a "
                             "new one") from err
        return data

    @property
    def replies(self) -> list[dict]:
        """Every recorded reply (oldest first)."""
        return self.data["replies"]

    def audit(self, content, kind: str, *, run_id: int, server_round: int, expected: Signature | None,
              max_examples: int | None = None) -> dict:
        """Check a reply and record it; raise :class:`AuditViolation` (after recording) if it breaks a rule.

        Args:
            content: the reply's RecordDict. kind: ``train`` or ``evaluate``.
            run_id: Flower run id. server_round: the global round.
            expected: :func:`expected_signature` (train replies).
            max_examples: bound of ``num-examples`` (training or held-out images of the site).

        Returns:
            the recorded entry (``verdict`` ``sent``).
        """
        violations = check_reply(content, kind, self.site_id, expected, max_examples)
        arrays = content.array_records.get(P.ARRAYS) if kind == "train" else None
        array_problems = check_arrays(arrays, expected) if arrays is not None and expected is not None else ["-"]
        entry: dict[str, Any] = {
            "utc": _utc(), "run_id": int(run_id), "round": int(server_round), "kind": kind,
            "verdict": "blocked" if violations else "sent",
            "arrays": {"count": _array_count(arrays),
                       "bytes": int(sum(len(a.data) for a in arrays.values())) if arrays is not None else 0,
                       "keys_match_fresh_model": not array_problems},
            "metrics": {k: _num(v) for rec in content.metric_records.values() for k, v in rec.items()},
            "site_record": {k: _short(v, 300) if not isinstance(v, str) else v
                            for rec in content.config_records.values() for k, v in rec.items()},
            "violations": violations,
        }
        if kind == "train" and expected is not None:
            entry["arrays"]["expected_count"] = len(expected)
        self._append(entry)
        if violations:
            log.error("site %s: audit blocked the %s reply of round %d: %s", self.site_id, kind, server_round,
                      "; ".join(violations))
            raise AuditViolation(self.site_id, kind, violations, self.md_path)
        log.info("site %s: audit passed the %s reply of round %d (%d arrays, %d bytes)", self.site_id, kind,
                 server_round, entry["arrays"]["count"], entry["arrays"]["bytes"])
        return entry

    def record_error(self, *, run_id: int, server_round: int, kind: str, error: BaseException, sent_text: str) -> None:
        """Record a failed round: the full error stays here, ``sent_text`` is what went to the server."""
        self._append({"utc": _utc(), "run_id": int(run_id), "round": int(server_round), "kind": "error",
                      "verdict": "error reply", "instruction": kind, "local_error": f"{type(error).__name__}: {error}",
                      "sent_text": sent_text, "arrays": {"count": 0, "bytes": 0}, "metrics": {}, "site_record": {},
                      "violations": []})

    # files
    def _append(self, entry: dict) -> None:
        # Re-read first: another process (a simulation actor serving this site) may have appended since.
        self.data = self._read()
        self.replies.append(entry)
        atomic_write_json(self.json_path, self.data, indent=1)
        atomic_write_text(self.md_path, self.markdown())

    def markdown(self) -> str:
        """The human-readable report (what ``audit-<site_id>.md`` holds)."""
        lines = [
            f"# What left site `{self.site_id}`",
            "",
            "Every reply this site sent (or refused to send) while the reply audit was on. Allowed: g/h "
            "weights with exactly the keys and shapes of a freshly built model, the allow-listed numeric "
            "metrics below, and the site record (site id, status, a fixed-template reason). Never: images, "
            "masks, SAM weights or embeddings, file names, stems, per-image scores.",
            "",
            f"- allowed train metrics: {', '.join(sorted(P.TRAIN_METRIC_KEYS))}",
            f"- allowed validation metrics: {', '.join(sorted(P.EVALUATE_METRIC_KEYS))}",
            f"- allowed site record fields: {', '.join(sorted(P.SITE_RECORD_KEYS))}",
            f"- machine-readable copy: `{self.json_path.name}`",
            "",
            "| time (UTC) | run | round | reply | verdict | arrays | bytes | metrics | site record / notes |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for e in self.replies:
            metrics = ", ".join(f"{k}={_fmt(v)}" for k, v in e.get("metrics", {}).items()) or "-"
            if e.get("kind") == "error":
                notes = f"error reply sent: {e.get('sent_text', '')} (local error: {e.get('local_error', '')})"
            else:
                notes = ", ".join(f"{k}={v}" for k, v in e.get("site_record", {}).items()) or "-"
            if e.get("violations"):
                notes += " **BLOCKED: " + "; ".join(e["violations"]) + "**"
            arr = e.get("arrays", {})
            arrays = f"{arr.get('count', 0)}"
            if "expected_count" in arr:
                arrays += f" of {arr['expected_count']} expected" + (
                    ", keys/shapes match" if arr.get("keys_match_fresh_model") else ", MISMATCH")
            lines.append(f"| {e.get('utc', '')} | {e.get('run_id', '')} | {e.get('round', '')} | {e.get('kind', '')} | "
                         f"{e.get('verdict', '')} | {arrays} | {arr.get('bytes', 0):,} | {metrics} | "
                         f"{_md(notes)} |")
        sent = [e for e in self.replies if e.get("verdict") == "sent"]
        lines += ["", f"{len(sent)} replies sent, {sum(e['arrays']['bytes'] for e in sent):,} bytes of arrays in "
                  f"total; {sum(e.get('verdict') == 'blocked' for e in self.replies)} blocked; "
                  f"{sum(e.get('kind') == 'error' for e in self.replies)} error replies.", ""]
        return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


__all__ = ["AuditViolation", "ReplyAudit", "audit_dir", "audit_enabled", "check_arrays", "check_metrics",
           "check_reply", "check_site_record", "expected_signature", "truthy"]
