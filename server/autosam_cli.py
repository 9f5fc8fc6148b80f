"""``autosam``: the core CLI (:mod:`autosam_core.cli`) plus ``autosam simulate``.

The console script points here so that one command covers both, while the core stays free of
Flower: the core parser takes extra subcommands, and this adapter adds the federation's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def cmd_simulate(args: argparse.Namespace) -> int:
    from autosam_fl.processes import unwind_on_sigterm
    from server.simulation import FederationRunError, run_simulation_from_yaml

    unwind_on_sigterm()  # SIGTERM stops the private SuperLink, Flower's simulation and Ray by PID, too
    try:
        run_dir = run_simulation_from_yaml(args.federation)
    except FederationRunError as err:
        print(f"error: federation run failed: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: every Flower/Ray process of this simulation was stopped", file=sys.stderr)
        return 130
    summary_path = Path(run_dir) / "summary.json"
    if summary_path.is_file():
        print(format_federation_summary(json.loads(summary_path.read_text())))
    print(format_run_outputs(Path(run_dir)))
    return 0


def format_run_outputs(run_dir: Path) -> str:
    """The lines `autosam simulate` ends with: the run folder and, by absolute path, each of the run's
    outputs that exists (summary, per-round metrics, Dice plot, prediction grid, checkpoints)."""
    from server.outputs import BEST, LAST

    names = ("summary.json", "metrics.csv", "global_dice.png", "predictions.png", "epsilon.png",
             f"checkpoints/{BEST}", f"checkpoints/{LAST}")
    run_dir = run_dir.resolve()
    return "\n".join([f"outputs in {run_dir}:"] + [f"  {run_dir / n}" for n in names if (run_dir / n).is_file()])


def format_federation_summary(summary: dict) -> str:
    """Final table of a federated run: global Dice/IoU (%) per round and benchmark, plus the budget."""
    rounds = summary.get("rounds", [])
    names = list(rounds[0]["benchmarks"]) if rounds else []
    lines = [f"### {summary.get('name', 'federation')}: global model per round (Dice / IoU, %)", "",
             "| round | " + " | ".join(names) + " | site validation Dice |",
             "|---:|" + "---:|" * (len(names) + 1)]
    for r in rounds:
        cells = [f"{100 * r['benchmarks'][n]['dice']:.1f} / {100 * r['benchmarks'][n]['iou']:.1f}" for n in names]
        val = r.get("validation") or {}
        lines.append(f"| {r['round']} | " + " | ".join(cells) + f" | {100 * val['dice']:.1f} |" if val else
                     f"| {r['round']} | " + " | ".join(cells) + " | - |")
    sites = summary.get("num_examples_per_site", {})
    per = summary.get("bytes_per_site_per_round", {})
    mb = {k: v.get("total", 0) / 1e6 if isinstance(v, dict) else v / 1e6 for k, v in per.items()}
    best = summary.get("best") or {}
    lines += ["", "sites: " + ", ".join(f"{k} ({n} training images, {mb.get(k, 0):.0f} MB per round)"
                                        for k, n in sites.items()),
              f"best round on validation: {best.get('round', '-')}; wall time {summary.get('wall_seconds', 0):.0f} s"
              + (f" (ServerApp; {summary['launcher']['total_wall_seconds']:.0f} s with Flower's start-up and shutdown)"
                 if (summary.get("launcher") or {}).get("total_wall_seconds") is not None else "")]
    kept = next((r for r in rounds if best and r["round"] == best.get("round")), None)
    if kept is not None:  # the model the run keeps (checkpoints/best.pt), chosen on the sites' validation only
        lines.append(f"model kept: round {kept['round']} (checkpoints/best.pt, chosen on the sites' validation): "
                     + ", ".join(f"{n} {100 * kept['benchmarks'][n]['dice']:.1f}" for n in names) + " Dice (%)")
    for site, d in (summary.get("privacy") or {}).items():  # DP federation: epsilon spent per site
        per_round = ", ".join(f"r{r['round']} " + (f"{r['epsilon']:.3g}" if r.get("epsilon") is not None else "inf")
                              for r in d.get("rounds", []))
        skipped = [str(r["round"]) for r in d.get("rounds", []) if r.get("status") == "skipped"]
        target = f" of target {d['target_epsilon']:g}" if d.get("target_epsilon") else ""
        lines.append(f"privacy {site}: epsilon {per_round}{target} at delta {d.get('delta', 0):g}"
                     + (f"; skipped rounds {', '.join(skipped)} (budget)" if skipped else ""))
    return "\n".join(lines)


def add_simulate_command(sub) -> None:
    """Register ``autosam simulate FEDERATION.yaml`` on the core parser's subcommands."""
    s = sub.add_parser("simulate", help="simulated federation from a federation YAML")
    s.add_argument("federation")
    s.set_defaults(func=cmd_simulate)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``autosam`` (every core command, plus ``simulate``)."""
    from autosam_core.cli import main as core_main

    return core_main(argv, extra_commands=add_simulate_command)


if __name__ == "__main__":
    sys.exit(main())
