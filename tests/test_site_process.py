"""The site process on 127.0.0.1 (tiny SAM): one message per connection failure cause, and a site killed
with SIGKILL during training leaves no process and no temporary folder behind."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.deploy_helpers import REPO, Deployment, descendants, kill
from tests.fl_helpers import make_federation

pytestmark = pytest.mark.skipif(
    shutil.which("flower-superlink", path=str(Path(sys.executable).parent)) is None
    and shutil.which("flower-superlink") is None,
    reason="flwr binaries (flower-superlink/flower-supernode) are not installed")


def _client(d: Deployment, site_yaml: Path, *args: str, timeout: float = 300) -> tuple[int, str]:
    res = subprocess.run([sys.executable, "-m", "client.cli", "--site", str(site_yaml), *args], env=d.env, cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    return res.returncode, res.stdout


@pytest.fixture()
def tls_superlink(tmp_path):
    """A bare SuperLink with TLS and SuperNode authentication; site_a's key registered, rogue's not."""
    from autosam_fl.processes import TlsFiles, start_superlink, write_connection
    from server.cli import CONNECTION, register_sites

    make_federation(tmp_path, sites={"site_a": 1}, rounds=1, min_sites=1)
    d = Deployment(tmp_path, ["site_a", "rogue"])
    tls = TlsFiles(d.certs / "ca.crt", d.certs / "server.pem", d.certs / "server.key")
    start_superlink(d.tracker, host="127.0.0.1", port=d.port, env=d.env, log_path=tmp_path / "superlink.log",
                    simulation=False, tls=tls, supernode_auth=True)
    write_connection(Path(d.env["FLWR_HOME"]), CONNECTION, f"127.0.0.1:{d.port}", root_certificates=tls.ca_cert)
    register_sites({"site_a": d.certs / "site_a.pub"}, d.env)
    try:
        yield d
    finally:
        d.tracker.stop()
    assert d.tracker.alive() == []


def test_connection_failures_name_their_cause(tls_superlink, tmp_path):
    d = tls_superlink
    site = tmp_path / "sites" / "site_a.yaml"
    link = f"127.0.0.1:{d.port}"
    # A CA that did not sign the SuperLink's certificate.
    from server.certs import generate_tls

    generate_tls(tmp_path / "other")
    rc, out = _client(d, site, "--superlink", link, "--root-certificates", str(tmp_path / "other" / "ca.crt"))
    assert rc == 4, out
    assert "certificate verification failed" in out and str(tmp_path / "other" / "ca.crt") in out, out
    # Plain text against a TLS SuperLink: fails at once (no endless retry).
    t0 = time.time()
    rc, out = _client(d, site, "--superlink", link, "--insecure")
    assert rc == 4 and "speaks TLS" in out and "drop --insecure" in out, out
    assert time.time() - t0 < 290  # bounded (it used to retry forever); ~10 s on an idle machine
    # Nothing listening: waits --max-wait-time, then says so.
    from autosam_fl.processes import free_port

    dead = f"127.0.0.1:{free_port()}"
    t0 = time.time()
    rc, out = _client(d, site, "--superlink", dead, "--root-certificates", str(d.certs / "ca.crt"),
                      "--max-wait-time", "3")
    assert rc == 4 and f"nothing listens at {dead}" in out and "waiting up to 3 s" in out, out
    assert 3 <= time.time() - t0 < 290
    # A key the coordinator never registered: refused, exit 3, with the command to fix it.
    rc, out = _client(d, site, "--superlink", link, "--root-certificates", str(d.certs / "ca.crt"),
                      "--auth-key", str(d.certs / "rogue"))
    assert rc == 3 and "its key is not registered" in out and "--site-key site_a=" in out, out
    # A thread count that is not a whole number >= 1: refused before connecting, exit 2, naming the option.
    rc, out = _client(d, site, "--superlink", link, "--root-certificates", str(d.certs / "ca.crt"), "--threads", "0")
    assert rc == 2 and "--threads: expected a whole number >= 1, found 0" in out, out
    rc, out = _client(d, site, "--superlink", link, "--root-certificates", str(d.certs / "ca.crt"),
                      "--poll-interval", "-1")
    assert rc == 2 and "--poll-interval: expected a number of seconds > 0, found -1" in out, out
    rc, out = _client(d, site, "--superlink", link, "--root-certificates", str(d.certs / "ca.crt"),
                      "--heartbeat-interval", "5")
    assert rc == 2 and "--heartbeat-interval: expected 10-1800 seconds (the SuperLink's range), found 5" in out, out


def test_plaintext_superlink_against_tls_site(tmp_path):
    from autosam_fl.processes import start_superlink

    make_federation(tmp_path, sites={"site_a": 1}, rounds=1, min_sites=1)
    with Deployment(tmp_path, []) as d:
        start_superlink(d.tracker, host="127.0.0.1", port=d.port, env=d.env, log_path=tmp_path / "superlink.log",
                        simulation=False, tls=None)
        rc, out = _client(d, tmp_path / "sites" / "site_a.yaml", "--superlink", f"127.0.0.1:{d.port}",
                          "--root-certificates", str(d.certs / "ca.crt"))
    assert rc == 4 and "does not speak TLS" in out and "--certs" in out, out


def test_sigkill_of_autosam_client_during_training_leaves_nothing(tmp_path):
    # Enough images that round 1 is still training when the site is killed.
    fed = make_federation(tmp_path, sites={"site_a": 24}, rounds=2, min_sites=1, round_timeout=120)
    with Deployment(tmp_path, ["site_a"]) as d:
        d.server(fed, ["site_a"], "--timeout", "600")
        d.wait_for("server", "registered sites", 300)  # minutes only on a loaded machine
        client = d.client("site_a", tmp_path / "sites" / "site_a.yaml")
        d.wait_for("site_a", "training ...", 300)
        kids = descendants(client.pid)
        temp = [Path(p) for p in Path("/tmp").glob("autosam-site-site_a-*")
                if any(str(p) in (Path(f"/proc/{k}/cmdline").read_text(errors="replace") if Path(f"/proc/{k}").exists()
                                  else "") for k in kids)]
        assert any("flower-supernode" in Path(f"/proc/{k}/cmdline").read_text(errors="replace") for k in kids
                   if Path(f"/proc/{k}").exists()), kids
        kill(client.pid, signal.SIGKILL)
        client.wait(timeout=10)
        deadline = time.time() + 10
        alive = kids
        while time.time() < deadline:
            alive = {k for k in kids if Path(f"/proc/{k}").exists()
                     and Path(f"/proc/{k}/stat").read_text().split(") ")[-1][0] != "Z"}
            if not alive:
                break
            time.sleep(0.2)
        assert not alive, f"children of the killed autosam-client still running: {alive}\n{d.all_text()}"
        assert temp and not any(p.exists() for p in temp), temp
