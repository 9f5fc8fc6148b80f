"""The staged app folder ``flwr run`` bundles (autosam_fl/app_bundle.py): same FAB as the clone, no walk of
``.venv`` or the cache, clear refusals."""

from __future__ import annotations

import hashlib

import pytest

from autosam_fl.app_bundle import APP_DIR, bundle_files, stage_app


def test_staged_folder_builds_the_same_bundle_as_the_clone(tmp_path):
    from flwr.cli.build import build_fab_from_disk

    staged = stage_app(tmp_path / "app")
    from_clone = build_fab_from_disk(APP_DIR)
    from_stage = build_fab_from_disk(staged)
    assert hashlib.sha256(from_stage).hexdigest() == hashlib.sha256(from_clone).hexdigest()


def test_bundle_holds_the_apps_and_nothing_from_venv_runs_or_cache():
    files = {p.as_posix() for p in bundle_files()}
    assert {"pyproject.toml", "server/app.py", "client/entry.py", "autosam_fl/app_bundle.py"} <= files
    assert "sites/polyp/demo.yaml" in files
    assert not [f for f in files if f.split("/")[0] in {".venv", ".cache", "runs", "tests", "docs", ".git"}]
    assert all(f.endswith((".py", ".yaml")) for f in files - {"pyproject.toml", ".gitignore"})


def test_stage_app_refuses_a_non_empty_folder_and_overwrites_nothing(tmp_path):
    dest = tmp_path / "app"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        stage_app(dest)
    assert [p.name for p in dest.iterdir()] == ["keep.txt"] and (dest / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("body, needle", [
    ("[tool.flwr.app]\npublisher = 'x'\n", "fab-include must be a non-empty list"),
    ("[tool.flwr.app]\nfab-include = ['nothing/**/*.py']\n", "matches no file"),
])
def test_bundle_files_names_the_pyproject_and_the_problem(tmp_path, body, needle):
    (tmp_path / "pyproject.toml").write_text(body)
    with pytest.raises(ValueError, match=needle) as err:
        bundle_files(tmp_path)
    assert str(tmp_path / "pyproject.toml") in str(err.value)


def test_bundle_files_without_pyproject_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no pyproject.toml"):
        bundle_files(tmp_path)


def test_bundle_files_with_a_single_match_and_no_gitignore(tmp_path):
    (tmp_path / "pyproject.toml").write_text("[tool.flwr.app]\nfab-include = ['app.py', 'none/*.py']\n")
    (tmp_path / "app.py").write_text("x = 1\n")
    (tmp_path / "other.py").write_text("y = 2\n")
    assert [p.as_posix() for p in bundle_files(tmp_path)] == ["app.py", "pyproject.toml"]
