"""docker-compose.yml (parsed with pyyaml; no Docker engine needed): a SuperLink, the coordinator and one
SuperNode per polyp site; each site gets only its own data (read-only), its site YAML as node config,
and its own certificate folder; TLS and site authentication are on."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from autosam_core.config import SiteConfig, load_yaml_config

REPO = Path(__file__).resolve().parents[1]
SITES = {"kvasir": "Kvasir-SEG", "clinicdb": "CVC-ClinicDB"}


def _compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def _interpolate(text: str) -> str:
    """Compose-style ``${VAR:-default}`` with the default (as with VAR unset)."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?-([^}]*))?\}", lambda m: m.group(1) or "", text)


def _mounts(service: dict) -> list[tuple[str, str, str]]:
    out = []
    for v in service.get("volumes", []):
        parts = _interpolate(v).split(":")
        src, dst, mode = parts[0], parts[1], parts[2] if len(parts) > 2 else "rw"
        out.append((src, dst, mode))
    return out


def _arg(cmd: list[str], flag: str) -> str | None:
    for i, a in enumerate(cmd):
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
        if a == flag and i + 1 < len(cmd):
            return cmd[i + 1]
    return None


def test_services_and_tls():
    services = _compose()["services"]
    assert {"superlink", "server", *SITES} <= set(services)
    link = services["superlink"]["command"]
    assert link[0] == "flower-superlink" and "--insecure" not in link
    assert _arg(link, "--ssl-certfile") and _arg(link, "--ssl-keyfile") and _arg(link, "--ssl-ca-certfile")
    assert "--enable-supernode-auth" in link
    coord = services["server"]["command"]
    assert coord[0] == "autosam-server" and _arg(coord, "--superlink") == "superlink:9092"
    keys = [a.split("=", 1)[1] for a in coord if a.startswith("--site-key=")]
    assert sorted(k.split("=")[0] for k in keys) == sorted(SITES)
    for svc in services.values():
        assert "--insecure" not in svc["command"]


def test_each_site_gets_only_its_own_data_read_only_and_node_config():
    services = _compose()["services"]
    for site, dataset in SITES.items():
        svc = services[site]
        cmd = svc["command"]
        assert cmd[0] == "autosam-client"
        mounts = _mounts(svc)
        # node config: the site YAML given to autosam-client is mounted read-only from sites/
        site_yaml = _arg(cmd, "--site")
        yaml_mounts = [m for m in mounts if m[1] == site_yaml]
        assert len(yaml_mounts) == 1 and yaml_mounts[0][2] == "ro", yaml_mounts
        host_yaml = REPO / yaml_mounts[0][0]
        cfg = load_yaml_config(host_yaml, SiteConfig)
        assert cfg.site_id == site and cfg.data.dataset == dataset
        # data: exactly one dataset mount, its own, read-only, under AUTOSAM_DATA
        data_mounts = [m for m in mounts if m[1].startswith("/data")]
        assert data_mounts == [(data_mounts[0][0], f"/data/{dataset}", "ro")], data_mounts
        assert data_mounts[0][0].endswith(f"/{dataset}")
        env = svc.get("environment") or {}
        assert env.get("AUTOSAM_DATA") == "/data"
        # certificates from its own folder, read-only; the auth key is that site's
        cert_mounts = [m for m in mounts if m[1] == "/certs"]
        assert cert_mounts == [(f"./certs/{site}", "/certs", "ro")]
        assert _arg(cmd, "--auth-key") == f"/certs/{site}" and _arg(cmd, "--root-certificates") == "/certs/ca.crt"
        # no other site's data or the whole data root
        others = [d for s, d in SITES.items() if s != site]
        assert not any(o in m[0] for m in mounts for o in others)


def test_server_side_holds_benchmarks_read_only():
    services = _compose()["services"]
    for name in ("superlink", "server"):
        data = [m for m in _mounts(services[name]) if m[1].startswith("/data")]
        assert {m[1] for m in data} == {"/data/Kvasir-SEG", "/data/CVC-ClinicDB", "/data/ETIS-LaribPolypDB",
                                        "/data/CVC-ColonDB"}
        assert all(m[2] == "ro" for m in data)
    assert ("./certs/superlink", "/certs", "ro") in _mounts(services["superlink"])
    assert ("./certs/coordinator", "/certs", "ro") in _mounts(services["server"])
    assert (REPO / "docker" / "Dockerfile").is_file()
