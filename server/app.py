"""Flower ServerApp of AutoSAM-FL (``server.app:app``).

Run config keys (``[tool.flwr.app.config]`` in pyproject.toml, overridable with
``flwr run --run-config``):

- ``federation-config``: federation YAML (absolute, or relative to the current directory or the
  app folder).
- ``run-dir``: output folder; empty = ``<output_dir>/<name>`` of the federation YAML.
- ``node-sites``: ``"<node id>:<site id>,..."`` known from SuperNode registration; empty = learn
  site ids from the replies.
- ``local-epochs``: override of every site's ``local_epochs``; 0 = use the site YAMLs.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from autosam_core.config import ConfigError

from autosam_fl import protocol as P
from autosam_fl.app_bundle import APP_DIR

from .runner import FederatedServer, parse_node_sites

app = ServerApp()


def resolve_federation_path(value: str) -> Path:
    """Federation YAML from the run config: absolute, else relative to the cwd, else to the app folder.

    Raises:
        ConfigError: empty value or no such file.
    """
    if not value.strip():
        raise ConfigError(f"run config '{P.RUN_FEDERATION_CONFIG}' is empty; pass --run-config "
                          f"'{P.RUN_FEDERATION_CONFIG}=\"/path/federation.yaml\"'")
    p = Path(value).expanduser()
    for cand in ([p] if p.is_absolute() else [Path.cwd() / p, APP_DIR / p]):
        if cand.is_file():
            return cand.resolve()
    raise ConfigError(f"run config '{P.RUN_FEDERATION_CONFIG}': federation YAML {value!r} not found "
                      f"(looked in {Path.cwd()} and {APP_DIR})")


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation named by the run config (see module docstring)."""
    cfg = context.run_config
    fed_path = resolve_federation_path(str(cfg.get(P.RUN_FEDERATION_CONFIG, "")))
    run_dir = str(cfg.get(P.RUN_RUN_DIR, "")).strip() or None
    server = FederatedServer(fed_path, run_dir=run_dir,
                             node_sites=parse_node_sites(str(cfg.get(P.RUN_NODE_SITES, ""))),
                             local_epochs=int(cfg.get(P.RUN_LOCAL_EPOCHS, 0)))
    server.run(grid)
