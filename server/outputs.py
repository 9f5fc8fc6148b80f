"""Run outputs: summary.json, metrics.csv, a Dice-per-round plot, a prediction grid and, for a DP
federation, an epsilon-per-round plot (PNG).

All files are written atomically (temporary file + ``os.replace``) so a reader never sees half a file.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from autosam_core.config import FederationConfig, yaml_relative
from autosam_core.files import atomic_write_bytes, atomic_write_json


#: Run outputs are meant to be shared: readable by all (the core's atomic writes default to owner-only).
OUTPUT_MODE = 0o644


#: Checkpoint file names in ``<run dir>/checkpoints``.
LAST, BEST = "last.pt", "best.pt"


def resolve_run_dir(fed: FederationConfig, fed_path: Path) -> Path:
    """``<output_dir>/<name>``; a relative output_dir is relative to the federation YAML's folder, like
    every other path in a YAML (``sites``, ``cache_dir``), so the run folder does not depend on where the
    command was started."""
    out = yaml_relative(fed.output_dir, Path(fed_path).parent)
    return (out / fed.name).resolve()


def resolve_cache_dir(fed: FederationConfig, fed_path: Path) -> Path | None:
    """The federation's embedding cache (relative to the federation YAML), or None for the default."""
    return yaml_relative(fed.cache_dir, fed_path.parent)


def write_atomic(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`autosam_core.files.atomic_write_bytes`), mode 0o644."""
    return atomic_write_bytes(path, data, mode=OUTPUT_MODE)


def write_json(path: Path, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON (NaN written as null), mode 0o644."""
    return atomic_write_json(path, _jsonable(obj), mode=OUTPUT_MODE, indent=2)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if not np.isfinite(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def state_digest(state: Mapping[str, Any]) -> str:
    """sha256 over sorted keys, dtypes, shapes and raw bytes of a state (torch tensors or NumPy arrays)."""
    h = hashlib.sha256()
    for key in sorted(state):
        v = state[key]
        arr = v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
        arr = np.ascontiguousarray(arr)
        h.update(f"{key}|{arr.dtype.str}|{arr.shape}|".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def write_metrics_csv(path: Path, history: Sequence[Mapping]) -> Path:
    """One row per (round, split): round, split, kind (test/validation), dice, iou, num_images,
    epsilon, delta; plus, for DP sites, one row per (round, site) with kind ``privacy``, split = the
    site id, num_images = the images it trained on that round (0 when it skipped), and the epsilon
    it has spent so far at its delta (empty for the other kinds)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["round", "split", "kind", "dice", "iou", "num_images", "epsilon", "delta"])
    for rec in history:
        for label, m in (rec.get("benchmarks") or {}).items():
            w.writerow([rec["round"], label, "test", _fmt(m.get("dice")), _fmt(m.get("iou")), m.get("num_images"),
                        "", ""])
        val = rec.get("validation")
        if val:
            w.writerow([rec["round"], f"validation ({val.get('source')})", "validation", _fmt(val.get("dice")),
                        _fmt(val.get("iou")), val.get("num_images"), "", ""])
        for site, v in (rec.get("sites") or {}).items():
            if "epsilon" in v:
                w.writerow([rec["round"], site, "privacy", "", "", v.get("num_examples"), _fmt_eps(v["epsilon"]),
                            f"{float(v['delta']):g}" if v.get("delta") is not None else ""])
    return write_atomic(path, buf.getvalue().encode())


def _fmt_eps(x: Any) -> str:
    if x is None:
        return ""
    x = float(x)
    return "inf" if x == float("inf") else _fmt(x)


def privacy_summary(history: Sequence[Mapping]) -> dict[str, dict]:
    """Per DP site, from the round records: ``delta``, ``target_epsilon`` (None without a target),
    ``epsilon`` (latest spent), and ``rounds``: [{round, epsilon, dp_steps, num_examples, status,
    reason}] (epsilon spent so far after that round; status ``skipped`` with the site's reason when
    its budget would have been exceeded). Empty when no site reported epsilon."""
    out: dict[str, dict] = {}
    for rec in history:
        for site, v in (rec.get("sites") or {}).items():
            if "epsilon" not in v:
                continue
            d = out.setdefault(site, {"delta": v.get("delta"), "target_epsilon": v.get("target_epsilon") or None,
                                      "epsilon": None, "rounds": []})
            d["delta"], d["target_epsilon"] = v.get("delta"), v.get("target_epsilon") or None
            d["epsilon"] = v["epsilon"]
            d["rounds"].append({"round": rec["round"], "epsilon": v["epsilon"], "dp_steps": v.get("dp_steps"),
                                "num_examples": v.get("num_examples"), "status": v.get("status"),
                                "reason": v.get("reason")})
    return out


def plot_epsilon(path: Path, privacy: Mapping[str, Mapping], title: str) -> Path | None:
    """PNG of each DP site's spent epsilon per round (solid, x where it skipped a round) and its
    target epsilon (dashed, same colour). ``privacy`` is :func:`privacy_summary`'s dict; returns
    None (nothing written) when it is empty."""
    if not privacy:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    rounds: set[int] = set()
    top = 0.0
    for i, (site, d) in enumerate(sorted(privacy.items())):
        color = f"C{i % 10}"
        pts = [(r["round"], r["epsilon"]) for r in d["rounds"] if r["epsilon"] is not None
               and np.isfinite(r["epsilon"])]
        rounds.update(r["round"] for r in d["rounds"])
        delta = d.get("delta")
        label = f"{site} (delta {float(delta):g})" if delta is not None else site
        if pts:
            ax.plot(*zip(*pts), marker="o", color=color, label=label)
            top = max(top, max(e for _, e in pts))
        skipped = [(r["round"], r["epsilon"]) for r in d["rounds"] if r.get("status") == "skipped"
                   and r["epsilon"] is not None and np.isfinite(r["epsilon"])]
        if skipped:
            ax.plot(*zip(*skipped), linestyle="none", marker="x", markersize=10, color=color,
                    label=f"{site}: skipped (budget)")
        if d.get("target_epsilon"):
            top = max(top, float(d["target_epsilon"]))
            ax.axhline(float(d["target_epsilon"]), linestyle="--", color=color, alpha=0.8,
                       label=f"{site} target {float(d['target_epsilon']):g}")
    ax.set_xlabel("server round")
    ax.set_ylabel("epsilon spent so far (at the site's delta)")
    ax.set_ylim(0, 1.12 * top if top > 0 else 1.0)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    if rounds:
        ax.set_xticks(sorted(rounds))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return write_atomic(path, buf.getvalue())


def _fmt(x: Any) -> str:
    return "" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{float(x):.6f}"


def plot_dice(path: Path, history: Sequence[Mapping], title: str) -> Path:
    """PNG of the global model's Dice per round, one line per benchmark (validation dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    labels = sorted({lb for rec in history for lb in (rec.get("benchmarks") or {})})
    for label in labels:
        pts = [(rec["round"], rec["benchmarks"][label]["dice"]) for rec in history
               if label in (rec.get("benchmarks") or {}) and rec["benchmarks"][label].get("dice") is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    vpts = [(rec["round"], rec["validation"]["dice"]) for rec in history if rec.get("validation")]
    if vpts:
        ax.plot(*zip(*vpts), marker="s", linestyle="--", color="black", label="validation")
    ax.set_xlabel("server round (0 = initial model)")
    ax.set_ylabel("Dice (mean over images)")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if labels or vpts:
        ax.legend(fontsize=7, loc="best")
    rounds = sorted({rec["round"] for rec in history})
    if rounds:
        ax.set_xticks(rounds)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return write_atomic(path, buf.getvalue())


def _cached(cache, image_path, hflip: bool):
    """The cached image_embeddings of ``image_path`` (mirrored when ``hflip``), or None when not cached
    (the model then encodes the image itself)."""
    try:
        return cache.get(image_path, hflip=hflip)
    except KeyError:
        return None


def plot_predictions(path: Path, model, benchmarks: Mapping[str, Sequence], cache=None, per_benchmark: int = 2,
                     title: str = "") -> Path | None:
    """PNG grid: one row per test image (image, ground truth, AutoSAM mask), ``per_benchmark`` per benchmark.

    Args:
        model: AutoSam holding the model to show.
        benchmarks: {label: [Pair]} (e.g. ``CentralEvaluator.benchmarks``).
        cache: optional EmbeddingCache with the images' SAM embeddings.

    Returns:
        the path, or None when there is no image to show.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from autosam_core.data.io import load_image, load_mask
    from autosam_core.metrics import dice_iou

    rows = [(label, p) for label, pairs in benchmarks.items() for p in list(pairs)[:per_benchmark]]
    if not rows:
        return None
    fig, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.4 * len(rows)), dpi=100, squeeze=False)
    for r, (label, pair) in enumerate(rows):
        image, mask = load_image(pair.image_path), load_mask(pair.mask_path)
        emb = emb_m = None
        if cache is not None:
            emb = _cached(cache, pair.image_path, hflip=False)
            emb_m = _cached(cache, pair.image_path, hflip=True) if model.tta == "hflip" else None
        pred = (model.predict_logits(image, image_embeddings=emb, mirrored_embeddings=emb_m) > 0).numpy()
        d, _ = dice_iou(pred, mask > 0)
        for c, (img, name) in enumerate([(image, f"{label}\n{pair.stem}"), (mask, "ground truth"),
                                          (pred, f"AutoSAM (Dice {d:.2f})")]):
            ax = axes[r][c]
            ax.imshow(img, cmap=None if img.ndim == 3 else "gray", interpolation="nearest")
            ax.set_title(name, fontsize=7)
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (2.4 * len(rows))) if title else None)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return write_atomic(path, buf.getvalue())
