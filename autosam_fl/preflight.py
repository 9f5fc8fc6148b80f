"""Checks done before any Flower process starts: federation and site YAMLs, data, resources.

Every failure raises :class:`autosam_core.config.ConfigError` whose message names the file, the key
and the fix, so a bad setup fails in seconds instead of in round 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from autosam_core.config import ConfigError, FederationConfig, SiteConfig, load_yaml_config
from autosam_core.data.dataset import resolve_ref


@dataclass
class SiteSummary:
    """A validated site: its YAML, config and sample counts (training and held-out validation)."""

    yaml_path: Path
    config: SiteConfig
    num_train: int
    num_val: int
    train_keys: set[tuple[str, str]]


def load_federation(path: str | Path) -> tuple[FederationConfig, Path]:
    """Load and validate a federation YAML; returns (config, absolute path).

    The returned config's ``model.dp_compatible`` is true when the federation's sites train with DP
    (:func:`federation_uses_dp`) or the YAML says so, so that every model built from it (the global
    model, resume checks, checkpoints, the instructions sent to sites) is the same g.

    Raises:
        ConfigError: missing file, bad YAML, unknown key or wrong type (names file and key); some
        sites use DP and others not.
    """
    p = Path(path).expanduser().resolve()
    fed = load_yaml_config(p, FederationConfig)
    dp = fed.model.dp_compatible or federation_uses_dp(fed, p)
    if dp != fed.model.dp_compatible:
        fed = fed.model_copy(update={"model": fed.model.model_copy(update={"dp_compatible": dp})})
    return fed, p


def federation_uses_dp(fed: FederationConfig, fed_path: Path) -> bool:
    """True if the federation's sites train with DP (their YAMLs have ``privacy``), False if none does.

    The server needs this to build a DP-compatible global g (GroupNorm). Site YAMLs that are not
    readable here (a deployment where the coordinator lacks them) count as non-DP; a DP site then
    refuses the instruction with a clear message (or set ``model.dp_compatible: true`` in the
    federation YAML).

    Raises:
        ConfigError: some sites use DP and others not.
    """
    from autosam_core.config import require_uniform_privacy  # no torch: the coordinator stays light

    sites = []
    for y in site_yaml_paths(fed, fed_path):
        try:
            sites.append(load_yaml_config(y, SiteConfig))
        except ConfigError:
            continue  # missing or invalid: check_sites reports it with the file, key and fix
    return require_uniform_privacy(sites) if sites else False


def site_yaml_paths(fed: FederationConfig, fed_path: Path) -> list[Path]:
    """Absolute paths of the federation's site YAMLs (relative entries are relative to ``fed_path``'s folder)."""
    out = []
    for s in fed.sites:
        p = Path(s).expanduser()
        out.append((p if p.is_absolute() else fed_path.parent / p).resolve())
    return out


def _pair_keys(pairs) -> set[tuple[str, str]]:
    return {(str(Path(p.image_path).resolve().parent.parent), p.stem) for p in pairs}


def check_sites(fed: FederationConfig, fed_path: Path) -> list[SiteSummary]:
    """Validate every site YAML of a federation and its data.

    Raises:
        ConfigError: bad site YAML (file + key), missing dataset folder, missing split, empty
        training split (also after the validation hold-out), duplicate ``site_id``, fewer sites
        than ``min_sites``, or DP (``privacy``) on some sites but not all.
    """
    from autosam_core.data.dataset import split_validation

    paths = site_yaml_paths(fed, fed_path)
    if len(paths) < fed.min_sites:
        raise ConfigError(f"{fed_path}: key 'min_sites' is {fed.min_sites} but key 'sites' lists only {len(paths)} "
                          f"site(s); list more sites or lower min_sites")
    if fed.start_sites is not None and not fed.min_sites <= fed.start_sites <= len(paths):
        raise ConfigError(f"{fed_path}: key 'start_sites' is {fed.start_sites}; expected between min_sites "
                          f"({fed.min_sites}) and the number of listed sites ({len(paths)})")
    out: list[SiteSummary] = []
    seen: dict[str, Path] = {}
    for i, p in enumerate(paths):
        if not p.is_file():
            raise ConfigError(f"{fed_path}: key 'sites.{i}': site YAML {p} does not exist; fix the path "
                              "(relative paths are relative to the federation YAML)")
        site = load_yaml_config(p, SiteConfig)
        if site.site_id in seen:
            raise ConfigError(f"{p}: key 'site_id': {site.site_id!r} is also used by {seen[site.site_id]}; "
                              "every site needs its own site_id")
        seen[site.site_id] = p
        pairs = resolve_ref(site.data, p.parent, str(p), "data", unreadable="error")
        train, val = split_validation(pairs, site.val_fraction, seed=0)
        if not train:
            raise ConfigError(f"{p}: key 'val_fraction': holding out {site.val_fraction} of {len(pairs)} pairs "
                              "leaves no training sample; lower val_fraction or add data")
        out.append(SiteSummary(p, site, len(train), len(val), _pair_keys(train)))
    from autosam_core.config import require_uniform_privacy

    try:
        require_uniform_privacy([s.config for s in out])
    except ConfigError as err:
        raise ConfigError(f"{fed_path}: key 'sites': {err}") from None
    return out


def check_validation(fed: FederationConfig, fed_path: Path, sites: list[SiteSummary] | None = None) -> None:
    """The central validation splits must be disjoint from the test benchmarks and the sites' training data.

    Raises:
        ConfigError: a validation entry names a ``*test*`` split, or shares images with an
        ``evaluate`` benchmark or with a site's training pairs (names the entry, the other side and
        an example stem).
    """
    base = fed_path.parent
    tests = {r.label: _pair_keys(resolve_ref(r, base, str(fed_path), f"evaluate.{i}"))
             for i, r in enumerate(fed.evaluate)}
    for i, ref in enumerate(fed.validation):
        if ref.split and "test" in ref.split.lower():
            raise ConfigError(f"{fed_path}: key 'validation.{i}.split': {ref.split!r} is a test split; the best "
                              "model must be chosen on a validation split, never on a test split")
        keys = _pair_keys(resolve_ref(ref, base, str(fed_path), f"validation.{i}"))
        for label, tk in tests.items():
            common = keys & tk
            if common:
                raise ConfigError(
                    f"{fed_path}: key 'validation.{i}': {len(common)} image(s) of {ref.label} are also in the test "
                    f"benchmark {label} (e.g. {sorted(common)[0][1]}); choose a disjoint validation split")
        for s in sites or []:
            common = keys & s.train_keys
            if common:
                raise ConfigError(
                    f"{fed_path}: key 'validation.{i}': {len(common)} image(s) of {ref.label} are in the training "
                    f"data of site {s.config.site_id} ({s.yaml_path}, e.g. {sorted(common)[0][1]}); choose a "
                    "disjoint validation split")


def available_cpus() -> int:
    """CPU cores this process may use (affinity-aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def check_client_resources(fed: FederationConfig, fed_path: Path) -> None:
    """A simulated site must ask for a whole number of CPU cores, no more than the machine has.

    Raises:
        ConfigError: ``client_cpus`` is fractional or exceeds the available cores (names both numbers).
    """
    cores = available_cpus()
    if fed.client_cpus != int(fed.client_cpus):
        raise ConfigError(f"{fed_path}: key 'client_cpus': Flower 1.42's simulation takes whole CPU cores per site, "
                          f"found {fed.client_cpus:g}; use {max(1, round(fed.client_cpus))}")
    if fed.client_cpus > cores:
        raise ConfigError(f"{fed_path}: key 'client_cpus': each simulated site asks for {fed.client_cpus:g} CPU "
                          f"cores but this machine has {cores}; set client_cpus <= {cores}")
