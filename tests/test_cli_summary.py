"""The final table printed by `autosam simulate` (and `make demo`)."""

from autosam_core.cli import format_table
from server.autosam_cli import format_federation_summary


def test_federation_summary_table():
    bench = lambda d: {"A": {"dice": d, "iou": d / 2, "num_images": 10}}  # noqa: E731
    summary = {"name": "demo", "rounds": [{"round": 0, "benchmarks": bench(0.0), "validation": None},
                                          {"round": 1, "benchmarks": bench(0.5), "validation": {"dice": 0.25}}],
               "num_examples_per_site": {"s1": 24}, "bytes_per_site_per_round": {"s1": {"total": 334_739_488}},
               "best": {"round": 1}, "wall_seconds": 61.2}
    text = format_federation_summary(summary)
    assert "| 0 | 0.0 / 0.0 | - |" in text
    assert "| 1 | 50.0 / 25.0 | 25.0 |" in text
    assert "s1 (24 training images, 335 MB per round)" in text and "best round on validation: 1" in text
    # The model the run keeps is named with its own row's Dice, not the last round's.
    summary["rounds"].append({"round": 2, "benchmarks": bench(0.3), "validation": {"dice": 0.2}})
    text = format_federation_summary(summary)
    assert "model kept: round 1 (checkpoints/best.pt, chosen on the sites' validation): A 50.0 Dice (%)" in text
    del summary["best"]
    assert "model kept" not in format_federation_summary(summary)
    assert "wall time 61 s\n" in text + "\n" and "ServerApp" not in text  # no launcher record: one time
    summary["launcher"] = {"total_wall_seconds": 70.4}
    assert "wall time 61 s (ServerApp; 70 s with Flower's start-up and shutdown)" in format_federation_summary(summary)


def test_run_outputs_lists_the_files_that_exist_by_absolute_path(tmp_path):
    from server.autosam_cli import format_run_outputs

    (tmp_path / "checkpoints").mkdir()
    for name in ("summary.json", "predictions.png", "checkpoints/best.pt"):
        (tmp_path / name).write_text("x")
    lines = format_run_outputs(tmp_path).splitlines()
    assert lines == [f"outputs in {tmp_path.resolve()}:", f"  {tmp_path.resolve() / 'summary.json'}",
                     f"  {tmp_path.resolve() / 'predictions.png'}", f"  {tmp_path.resolve() / 'checkpoints/best.pt'}"]


def test_evaluation_table_in_percent():
    text = format_table({"Kvasir": {"dice": 0.8123, "iou": 0.7, "num_images": 100}})
    assert "| Kvasir | 100 | 81.2 | 70.0 |" in text


def test_flower_processes_find_their_siblings_without_an_activated_venv(tmp_path, monkeypatch):
    import os
    import sys
    from pathlib import Path

    from server.processes import flower_env

    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # as under `make demo`: .venv/bin not on PATH
    env = flower_env(tmp_path)
    first = env["PATH"].split(os.pathsep)[0]
    assert first == str(Path(sys.executable).parent)
    assert (Path(first) / "flower-superexec").exists()


def test_flwr_cli_calls_that_do_not_answer_are_errors_not_tracebacks(tmp_path, monkeypatch):
    """On a loaded machine ``flwr ls`` / ``flwr supernode register`` can exceed their timeout: the launchers get
    ('unknown', why) and a FlowerProcessError naming the site, not an uncaught TimeoutExpired."""
    import subprocess

    import pytest

    from autosam_fl import processes
    from server import cli

    def slow(cmd, **kw):
        raise subprocess.TimeoutExpired(cmd, kw.get("timeout"))

    monkeypatch.setattr(subprocess, "run", slow)
    status, details = processes.run_status("autosam", 7, {})
    assert status == "unknown" and "did not answer within 180 s" in details and "--run-id 7" in details
    key = tmp_path / "site_a.pub"
    key.write_text("x")
    started, killed = [], []

    class Hanging:  # a `flwr supernode register` that never answers
        def __init__(self, cmd, **kw):
            started.append(cmd)

        def communicate(self, timeout=None):
            raise subprocess.TimeoutExpired("flwr", timeout)

        def poll(self):
            return None

        def kill(self):
            killed.append(self)

        def wait(self):
            return -9

    monkeypatch.setattr(subprocess, "Popen", Hanging)
    with pytest.raises(processes.FlowerProcessError, match="registering site site_a .* did not answer within 1 s"):
        cli.register_sites({"site_a": key, "site_b": key}, {}, timeout=1)
    assert len(started) == 2 and len(killed) == 2  # both started at once; neither is left running


def test_finished_status_trusts_only_this_runs_completed_summary(tmp_path, monkeypatch):
    """A summary.json the ServerApp wrote during this run with status ``completed`` answers without
    ``flwr ls``; an older summary, another status, or none asks Flower (``run_status``)."""
    import json
    import os
    import time

    from autosam_fl import processes

    asked = []
    monkeypatch.setattr(processes, "run_status", lambda c, r, e: asked.append(r) or ("finished:failed", "boom"))
    summary = tmp_path / "summary.json"
    t0 = time.time()
    assert processes.finished_status("autosam", 1, {}, summary, t0) == ("finished:failed", "boom")  # no summary
    summary.write_text(json.dumps({"status": "completed"}))
    assert processes.finished_status("autosam", 2, {}, summary, t0) == ("finished:completed", "")
    summary.write_text(json.dumps({"status": "failed"}))
    assert processes.finished_status("autosam", 3, {}, summary, t0) == ("finished:failed", "boom")
    summary.write_text(json.dumps({"status": "completed"}))
    os.utime(summary, (t0 - 60, t0 - 60))  # written by an earlier run
    assert processes.finished_status("autosam", 4, {}, summary, t0) == ("finished:failed", "boom")
    summary.write_text("{not json")
    assert processes.finished_status("autosam", 5, {}, summary, t0) == ("finished:failed", "boom")
    assert asked == [1, 3, 4, 5]


def test_verbose_puts_only_the_projects_loggers_at_debug():
    import logging

    from autosam_core import cli

    root_level = logging.getLogger().level
    try:
        cli._setup_logging(True)
        for name in ("autosam", "autosam_core.training", "server.runner", "client.app", "autosam_fl.connect"):
            assert logging.getLogger(name).isEnabledFor(logging.DEBUG), name
        assert not logging.getLogger("PIL.PngImagePlugin").isEnabledFor(logging.DEBUG)
        cli._setup_logging(False)
        assert not logging.getLogger("autosam_core.training").isEnabledFor(logging.DEBUG)
        assert logging.getLogger("autosam_core.training").isEnabledFor(logging.INFO)
    finally:
        logging.getLogger().setLevel(root_level)
        for name in cli.PROJECT_LOGGERS:
            logging.getLogger(name).setLevel(logging.NOTSET)


def test_autosam_version_names_the_package_version(capsys):
    import pytest

    import autosam_core
    from autosam_core.cli import build_parser

    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"autosam {autosam_core.__version__}"
