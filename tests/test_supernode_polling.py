"""The SuperNode launcher caps Flower's idle sleep and runs the given script unchanged (issue 12)."""

import subprocess
import sys
import textwrap
import time

import pytest

from autosam_fl import supernode_polling as sp


def test_capped_sleep_waits_at_most_the_cap_and_passes_the_rest_through():
    fake = sp.CappedSleepTime(0.05)
    t0 = time.monotonic()
    fake.sleep(3)
    waited = time.monotonic() - t0
    assert 0.04 <= waited < 0.5
    t0 = time.monotonic()
    fake.sleep(0.01)  # shorter than the cap: unchanged
    assert time.monotonic() - t0 < 0.04
    assert fake.monotonic is time.monotonic and fake.time is time.time


@pytest.mark.parametrize("bad", [0, -1.0, float("nan")])
def test_cap_must_be_positive(bad):
    with pytest.raises(ValueError, match="cap must be > 0"):
        sp.CappedSleepTime(bad)


def test_install_patches_flowers_supernode_loop_only(monkeypatch):
    import flwr.supernode.start_client_internal as loop

    assert loop.time is time  # Flower 1.42's layout, which install() relies on
    monkeypatch.setattr(loop, "time", time)
    assert sp.install(0.05) is True
    assert isinstance(loop.time, sp.CappedSleepTime) and loop.time.cap == 0.05
    assert sp.install(0.1) is True and loop.time.cap == 0.1  # idempotent, no proxy of a proxy
    assert time.sleep is not loop.time.sleep  # the real module is untouched


def test_install_leaves_an_unexpected_layout_alone(monkeypatch):
    import flwr.supernode.start_client_internal as loop

    monkeypatch.delattr(loop, "time")
    assert sp.install() is False
    assert not hasattr(loop, "time")


def test_install_heartbeat_sets_the_interval_flower_announces_and_paces(monkeypatch):
    import flwr.common.constant as const
    import flwr.supercore.heartbeat as pace
    import flwr.supernode.fleet_http_connection as conn

    assert conn.HEARTBEAT_DEFAULT_INTERVAL == pace.HEARTBEAT_DEFAULT_INTERVAL == 30  # Flower 1.42's default
    assert const.HEARTBEAT_MIN_INTERVAL <= sp.HEARTBEAT_SECONDS <= const.HEARTBEAT_MAX_INTERVAL  # SuperLink accepts it
    assert const.HEARTBEAT_PATIENCE == sp.HEARTBEAT_PATIENCE
    monkeypatch.setattr(conn, "HEARTBEAT_DEFAULT_INTERVAL", 30)
    monkeypatch.setattr(pace, "HEARTBEAT_DEFAULT_INTERVAL", 30)
    assert sp.install_heartbeat(12.0) is True
    assert conn.HEARTBEAT_DEFAULT_INTERVAL == pace.HEARTBEAT_DEFAULT_INTERVAL == 12.0
    assert const.HEARTBEAT_DEFAULT_INTERVAL == 30  # Flower's constant itself (the SuperLink's side) untouched
    from autosam_fl.connect import NODE_RELEASE_SECONDS
    assert NODE_RELEASE_SECONDS == sp.HEARTBEAT_PATIENCE * sp.HEARTBEAT_SECONDS == 30


def test_install_heartbeat_leaves_an_unexpected_layout_alone(monkeypatch):
    import flwr.supercore.heartbeat as pace
    import flwr.supernode.fleet_http_connection as conn

    monkeypatch.setattr(pace, "HEARTBEAT_DEFAULT_INTERVAL", 30)
    monkeypatch.delattr(conn, "HEARTBEAT_DEFAULT_INTERVAL")
    assert sp.install_heartbeat() is False
    assert pace.HEARTBEAT_DEFAULT_INTERVAL == 30


def test_main_without_a_script_prints_usage():
    with pytest.raises(SystemExit) as e:
        sp.main([])
    assert e.value.code == 2


def _run_fake(tmp_path, env_cap=None, env_heartbeat=None):
    import os

    script = tmp_path / "fake-supernode"
    script.write_text(textwrap.dedent("""\
        #!/usr/bin/env python
        import sys, time
        import flwr.supernode.start_client_internal as loop
        t0 = time.monotonic()
        loop.time.sleep(3)
        import flwr.supernode.fleet_http_connection as conn
        print(sys.argv[0].endswith("fake-supernode"), " ".join(sys.argv[1:]), time.monotonic() - t0,
              conn.HEARTBEAT_DEFAULT_INTERVAL, sep="|")
        sys.exit(7)
    """))
    env = {k: v for k, v in os.environ.items() if k not in (sp.POLL_ENV, sp.HEARTBEAT_ENV)}
    if env_cap is not None:
        env[sp.POLL_ENV] = env_cap
    if env_heartbeat is not None:
        env[sp.HEARTBEAT_ENV] = env_heartbeat
    return subprocess.run([sys.executable, "-m", "autosam_fl.supernode_polling", str(script), "--superlink", "h:1"],
                          capture_output=True, text=True, timeout=60, env=env)


def test_main_runs_the_script_with_its_arguments_and_the_default_cap(tmp_path):
    out = _run_fake(tmp_path)
    assert out.returncode == 7, out.stderr
    ok, args, waited, heartbeat = out.stdout.strip().split("|")
    assert ok == "True" and args == "--superlink h:1" and float(heartbeat) == sp.HEARTBEAT_SECONDS
    assert sp.POLL_SECONDS - 0.05 <= float(waited) < sp.POLL_SECONDS + 0.5  # Flower's 3 s, capped at 1 s


def test_the_cap_comes_from_the_environment(tmp_path):
    out = _run_fake(tmp_path, "0.1")
    assert out.returncode == 7, out.stderr
    assert float(out.stdout.strip().split("|")[2]) < 0.6
    bad = _run_fake(tmp_path, "zero")
    assert bad.returncode == 2 and sp.POLL_ENV in bad.stderr and "'zero'" in bad.stderr


def test_the_heartbeat_interval_comes_from_the_environment_within_the_superlinks_range(tmp_path):
    out = _run_fake(tmp_path, env_heartbeat="10")
    assert out.returncode == 7, out.stderr
    assert float(out.stdout.strip().split("|")[3]) == 10.0
    for bad in ("9.5", "1801", "soon"):
        res = _run_fake(tmp_path, env_heartbeat=bad)
        assert res.returncode == 2 and sp.HEARTBEAT_ENV in res.stderr and repr(bad) in res.stderr, res.stderr
        assert "10-1800" in res.stderr
