"""Development TLS certificates and SuperNode (site) keys for AutoSAM-FL deployments.

``python -m server.certs --out certs --san superlink --sites kvasir clinicdb`` writes (add
``--per-role`` for the one-folder-per-role layout that docker-compose.yml mounts):

- ``ca.crt`` / ``ca.key``: a self-signed development CA (keep ca.key private; sites get ca.crt).
- ``server.pem`` / ``server.key``: the SuperLink's certificate, signed by the CA, valid for
  ``localhost``, ``127.0.0.1`` and every ``--san`` (host names or IP addresses).
- ``<site>`` / ``<site>.pub``: each site's ECDSA P-384 key pair in OpenSSH format (what
  ``ssh-keygen -t ecdsa -b 384`` makes). The private key stays at the site (``autosam-client
  --auth-key``); the coordinator registers the ``.pub`` (``autosam-server --site-key site=...pub``).

For production use certificates from your institution's CA; these are for tests and demos only.
Uses the ``cryptography`` package (a Flower dependency); no openssl binary is needed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, 0o600 if private else 0o644)
    return path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "AutoSAM-FL dev"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def generate_tls(out_dir: str | Path, sans: Iterable[str] = (), days: int = 30) -> dict[str, Path]:
    """Write a development CA and a SuperLink certificate signed by it.

    Args:
        out_dir: folder for ca.crt, ca.key, server.pem, server.key.
        sans: extra subject alternative names (DNS names or IP addresses) besides localhost/127.0.0.1.
        days: validity in days.

    Returns:
        {"ca_cert", "ca_key", "server_cert", "server_key"} -> paths.
    """
    out = Path(out_dir)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = _name("AutoSAM-FL dev CA")
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, encipher_only=False, decipher_only=False),
                              critical=True)
               .sign(ca_key, hashes.SHA256()))
    srv_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    names: list[x509.GeneralName] = []
    for s in ["localhost", "127.0.0.1", *sans]:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(s)))
        except ValueError:
            names.append(x509.DNSName(s))
    srv_cert = (x509.CertificateBuilder().subject_name(_name("superlink")).issuer_name(ca_cert.subject)
                .public_key(srv_key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
                .add_extension(x509.SubjectAlternativeName(names), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    key_fmt = dict(encoding=pem, format=serialization.PrivateFormat.TraditionalOpenSSL,
                   encryption_algorithm=serialization.NoEncryption())
    return {
        "ca_cert": _write(out / "ca.crt", ca_cert.public_bytes(pem)),
        "ca_key": _write(out / "ca.key", ca_key.private_bytes(**key_fmt), private=True),
        "server_cert": _write(out / "server.pem", srv_cert.public_bytes(pem)),
        "server_key": _write(out / "server.key", srv_key.private_bytes(**key_fmt), private=True),
    }


def generate_site_key(out_dir: str | Path, site_id: str) -> tuple[Path, Path]:
    """Write ``<site_id>`` (private) and ``<site_id>.pub`` (public): ECDSA P-384, OpenSSH format.

    Raises:
        ValueError: ``site_id`` is empty or contains a path separator.
    """
    if not site_id or "/" in site_id or os.sep in site_id:
        raise ValueError(f"site id {site_id!r} cannot be used as a file name")
    key = ec.generate_private_key(ec.SECP384R1())
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    out = Path(out_dir)
    return (_write(out / site_id, priv, private=True), _write(out / f"{site_id}.pub", pub + f" {site_id}\n".encode()))


def generate_per_role(out_dir: str | Path, sites: Iterable[str], sans: Iterable[str] = (), days: int = 30
                      ) -> dict[str, Path]:
    """Least-privilege layout for docker-compose: one folder per role.

    ``<out>/superlink/``: ca.crt, server.pem, server.key; ``<out>/coordinator/``: ca.crt and every
    ``<site>.pub``; ``<out>/<site>/``: ca.crt and that site's private key only. The CA key stays in
    ``<out>/ca/``. No site can read another site's key or the SuperLink's key.

    Returns:
        {role: folder}.
    """
    import shutil

    out = Path(out_dir)
    tls = generate_tls(out / "ca", sans, days)
    roles = {"superlink": out / "superlink", "coordinator": out / "coordinator"}
    roles["superlink"].mkdir(parents=True, exist_ok=True)
    for name in ("server.pem", "server.key"):
        shutil.move(str(out / "ca" / name), roles["superlink"] / name)
    for site in sites:
        priv, pub = generate_site_key(out / site, site)
        shutil.move(str(pub), str(_ensure(roles["coordinator"]) / pub.name))
        roles[site] = out / site
    for folder in roles.values():
        shutil.copy2(tls["ca_cert"], _ensure(folder) / "ca.crt")
    return roles


def _ensure(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m server.certs --out DIR [--san NAME ...] [--sites SITE ...] [--days N] [--per-role]``."""
    ap = argparse.ArgumentParser(prog="python -m server.certs", description="Development CA, SuperLink "
                                 "certificate and site keys for AutoSAM-FL (tests and demos only).")
    ap.add_argument("--out", default="certs", help="output folder (default: certs)")
    ap.add_argument("--san", action="append", default=[], help="extra DNS name or IP of the SuperLink (repeatable)")
    ap.add_argument("--sites", nargs="*", default=[], help="site ids to make key pairs for")
    ap.add_argument("--days", type=int, default=30, help="certificate validity in days (default 30)")
    ap.add_argument("--per-role", action="store_true", help="one folder per role (superlink, coordinator, each "
                    "site) as docker-compose.yml mounts them")
    args = ap.parse_args(argv)
    if args.per_role:
        for role, folder in generate_per_role(args.out, args.sites, args.san, args.days).items():
            print(f"{role}: {folder} ({', '.join(sorted(p.name for p in folder.iterdir()))})")
        return 0
    files = generate_tls(args.out, args.san, args.days)
    for site in args.sites:
        files.update(dict(zip((site, f"{site}.pub"), generate_site_key(args.out, site))))
    for k, v in files.items():
        print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
