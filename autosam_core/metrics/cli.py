"""``autosam metrics``: SUN-SEG metrics of prediction folders (arguments and printing only).

The work is :func:`autosam_core.metrics.sunseg_protocol.evaluate_clips`; this module parses the
options, prints its result as JSON (NaN written as null) and optionally writes it to a file.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from ..files import atomic_write_text
from .sunseg_conventions import MODES

__all__ = ["add_metrics_arguments", "cmd_metrics", "metrics_main"]


def add_metrics_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``autosam metrics`` options to ``p`` (for wiring into autosam_core.cli); returns ``p``."""
    p.add_argument("--pred", required=True, help="prediction folder (0-255 grayscale maps)")
    p.add_argument("--gt", required=True, help="ground-truth folder (binary masks)")
    p.add_argument("--video", action="store_true",
                   help="clip layout DIR/<clip>/<frame>.png (default: flat folders)")
    p.add_argument("--mode", choices=MODES, default="safe",
                   help="safe (never NaN, values in [0, 1]) or toolbox (SUN-SEG toolbox conventions)")
    p.add_argument("--averaging", choices=("clip", "frame"),
                   help="per-clip then over clips (default with --video) or frame-pooled")
    ends = p.add_mutually_exclusive_group()
    ends.add_argument("--drop-ends", dest="drop_ends", action="store_true", default=None,
                      help="exclude first and last frame of each clip (default in toolbox mode)")
    ends.add_argument("--keep-ends", dest="drop_ends", action="store_false",
                      help="keep all frames (default in safe mode)")
    p.add_argument("--on-missing", choices=("skip", "empty", "error"), default="skip",
                   help="ground-truth frame without prediction (always listed)")
    p.add_argument("--json", metavar="OUT", help="also write the JSON result here")
    return p


def _json_safe(obj: Any) -> Any:
    """NaN/inf -> None (JSON null), recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def cmd_metrics(args: argparse.Namespace) -> int:
    """Run ``autosam metrics`` from parsed arguments; prints JSON to stdout. Returns 0, or 2 on errors."""
    from .sunseg_protocol import evaluate_clips

    try:
        result = evaluate_clips(args.pred, args.gt, video=args.video, mode=args.mode,
                                averaging=args.averaging, drop_ends=args.drop_ends,
                                on_missing=args.on_missing)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    text = json.dumps(_json_safe(result), indent=2, allow_nan=False)
    if args.json:
        atomic_write_text(args.json, text + "\n", mode=0o644)
    print(text)
    return 0


def metrics_main(argv: list[str] | None = None) -> int:
    """CLI ``autosam metrics --pred DIR --gt DIR [--video] [--mode safe|toolbox] [--json OUT]``.

    Prints the ``evaluate_clips`` result as JSON (NaN written as null) to stdout; warnings go to
    stderr. Returns 0, or 2 with one ``error:`` line on stderr for bad folders or files (argparse
    exits with 2 on bad options).
    """
    parser = add_metrics_arguments(argparse.ArgumentParser(
        prog="autosam metrics", description="SUN-SEG video polyp segmentation metrics"))
    return cmd_metrics(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(metrics_main())
