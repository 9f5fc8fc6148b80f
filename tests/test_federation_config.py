"""Site and federation YAMLs: the shipped ones are valid; bad ones fail at start naming file, key and fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import server  # noqa: F401  (imports flwr's CLI deps quietly; see server/__init__.py)
from autosam_core.config import ConfigError, FederationConfig, SiteConfig, load_yaml_config
from server.preflight import check_client_resources, check_sites, check_validation, load_federation
from tests.fl_helpers import make_dataset, make_federation, write_yaml

SITES = Path(__file__).resolve().parents[1] / "sites" / "polyp"
TEST_SPLITS = ("pranet_test",)


def test_shipped_polyp_yamls_are_valid():
    for name in ("kvasir", "clinicdb", "demo_kvasir", "demo_clinicdb"):
        site = load_yaml_config(SITES / f"{name}.yaml", SiteConfig)
        assert site.data.split == "pranet_train" and site.val_fraction > 0
    full = load_yaml_config(SITES / "federation.yaml", FederationConfig)
    assert [(r.dataset, r.split) for r in full.evaluate] == [
        ("Kvasir-SEG", "pranet_test"), ("CVC-ClinicDB", "pranet_test"), ("ETIS-LaribPolypDB", None),
        ("CVC-ColonDB", None)]
    assert full.sites == ["kvasir.yaml", "clinicdb.yaml"] and full.strategy.name == "fedavg"
    demo = load_yaml_config(SITES / "demo.yaml", FederationConfig)
    assert demo.rounds == 3 and all(r.limit == 10 for r in demo.evaluate)
    for fed in (full, demo):
        assert all(r.split not in TEST_SPLITS for r in fed.validation)


def test_shipped_federations_pass_preflight_on_real_data(shared_data):
    for name, n_train in (("demo.yaml", 24), ("federation.yaml", None)):
        fed, path = load_federation(SITES / name)
        sites = check_sites(fed, path)
        check_validation(fed, path, sites)
        assert [s.config.site_id for s in sites] == ["kvasir", "clinicdb"]
        if n_train:
            assert all(s.num_train == n_train and s.num_val == 6 for s in sites)
        # the held-out validation images are never test images of the benchmarks
        from server.preflight import _pair_keys, resolve_ref

        tests = set().union(*(_pair_keys(resolve_ref(r, path.parent, name, "evaluate")) for r in fed.evaluate))
        assert all(not (s.train_keys & tests) for s in sites)


def _site(tmp: Path, **over) -> Path:
    ds = tmp / "ds"
    if not (ds / "images").is_dir():
        make_dataset(ds, 2, seed=1)
    data = {"site_id": "s", "data": {"dataset": str(ds)}, **over}
    return write_yaml(tmp / "site.yaml", data)


def _fed_with(tmp: Path, site: Path, **over) -> Path:
    return write_yaml(tmp / "fed.yaml", {"name": "f", "sites": [site.name], "min_sites": 1, **over})


@pytest.mark.parametrize("over, key, words", [
    ({"colour": "blue"}, "colour", "unknown key"),
    ({"local_epochs": "many"}, "local_epochs", "integer"),
    ({"data": {"dataset": "no/such/folder"}}, "data.dataset", "no folder with images/ and masks/"),
    ({"data": {"dataset": "DS", "split": "nope"}}, "data.split", "split file not found"),
])
def test_bad_site_yaml_fails_at_start_with_file_key_and_fix(tmp_path, over, key, words):
    if over.get("data", {}).get("dataset") == "DS":
        make_dataset(tmp_path / "DS", 1, seed=2)
        over = {"data": {"dataset": str(tmp_path / "DS"), "split": "nope"}}
    site = _site(tmp_path, **over)
    fed, path = load_federation(_fed_with(tmp_path, site))
    with pytest.raises(ConfigError) as info:
        check_sites(fed, path)
    msg = str(info.value)
    assert str(site) in msg and f"'{key}" in msg and words in msg, msg


def test_empty_training_split_fails_fast(tmp_path):
    ds = tmp_path / "EMPTY"
    make_dataset(ds, 2, seed=3)
    (ds / "splits").mkdir()
    (ds / "splits" / "train.txt").write_text("# no stems\n")
    site = _site(tmp_path, data={"dataset": str(ds), "split": "train"})
    fed, path = load_federation(_fed_with(tmp_path, site))
    with pytest.raises(ConfigError, match=r"site\.yaml: key 'data'.*no usable image/mask pairs"):
        check_sites(fed, path)
    # a hold-out that leaves nothing to train on is refused too
    site = _site(tmp_path, val_fraction=0.9)
    fed, path = load_federation(_fed_with(tmp_path, site))
    with pytest.raises(ConfigError, match="key 'val_fraction'.*leaves no training sample"):
        check_sites(fed, path)


def test_bad_federation_yaml_names_key(tmp_path):
    site = _site(tmp_path)
    with pytest.raises(ConfigError, match=r"(?s)fed\.yaml.*key 'rounds'"):
        load_federation(_fed_with(tmp_path, site, rounds="three"))
    with pytest.raises(ConfigError, match=r"key 'strategy\.mu'.*unknown key|key 'strategy\.mue'"):
        load_federation(_fed_with(tmp_path, site, strategy={"name": "fedprox", "mue": 0.1}))
    fed, path = load_federation(_fed_with(tmp_path, site, min_sites=3))
    with pytest.raises(ConfigError, match="key 'min_sites' is 3 but key 'sites' lists only 1"):
        check_sites(fed, path)
    fed, path = load_federation(write_yaml(tmp_path / "fed2.yaml", {"name": "f", "sites": ["missing.yaml"],
                                                                     "min_sites": 1}))
    with pytest.raises(ConfigError, match=r"key 'sites\.0'.*missing\.yaml does not exist"):
        check_sites(fed, path)


def test_client_cpus_larger_than_machine_names_both_numbers(tmp_path):
    from server.preflight import available_cpus

    site = _site(tmp_path)
    fed, path = load_federation(_fed_with(tmp_path, site, client_cpus=available_cpus() + 6))
    with pytest.raises(ConfigError, match=rf"asks for {available_cpus() + 6} CPU cores but this machine has "
                                          rf"{available_cpus()}"):
        check_client_resources(fed, path)


def test_validation_must_be_disjoint_from_test_and_training(tmp_path):
    fed_path = make_federation(tmp_path, sites={"a": 2, "b": 2})
    fed, path = load_federation(fed_path)
    check_validation(fed, path, check_sites(fed, path))  # synthetic val set: disjoint
    bench = str(tmp_path / "data" / "bench")
    bad = write_yaml(tmp_path / "bad.yaml", {**fed.model_dump(mode="json"), "sites": fed.sites,
                                             "validation": [{"dataset": bench}]})
    fed2, path2 = load_federation(bad)
    with pytest.raises(ConfigError, match=r"key 'validation\.0'.*also in the test benchmark bench"):
        check_validation(fed2, path2)
    bad = write_yaml(tmp_path / "bad2.yaml", {**fed.model_dump(mode="json"), "sites": fed.sites,
                                              "validation": [{"dataset": str(tmp_path / "data" / "ds_a")}]})
    fed3, path3 = load_federation(bad)
    with pytest.raises(ConfigError, match="in the training data of site a"):
        check_validation(fed3, path3, check_sites(fed3, path3))
    bad = write_yaml(tmp_path / "bad3.yaml", {**fed.model_dump(mode="json"), "sites": fed.sites,
                                              "validation": [{"dataset": "Kvasir-SEG", "split": "pranet_test"}]})
    fed4, path4 = load_federation(bad)
    with pytest.raises(ConfigError, match="is a test split"):
        check_validation(fed4, path4)


def test_resume_checkpoint_from_other_backbone_refused_before_any_site(tmp_path):
    from autosam_core.checkpoint import save_checkpoint
    from autosam_core.config import ModelConfig, SamConfig
    from autosam_core.model_factory import build_autosam
    from server.runner import CheckpointMismatchError
    from server.simulation import preflight

    fed_path = make_federation(tmp_path, sites={"a": 1, "b": 1}, resume=True,
                               model={"backbone": "timm:resnet10t", "g_input_size": 64})
    other = build_autosam(SamConfig(kind="tiny"), ModelConfig(backbone="timm:mobilenetv3_small_050", g_input_size=64))
    save_checkpoint(tmp_path / "runs" / "fedtest" / "checkpoints" / "last.pt", other.trainable_state(),
                    {"server_round": 2, "backbone": "timm:mobilenetv3_small_050", "sam_kind": "tiny"})
    with pytest.raises(CheckpointMismatchError) as info:
        preflight(fed_path)
    msg = str(info.value)
    assert "backbone timm:mobilenetv3_small_050" in msg and "timm:resnet10t" in msg
    assert "first mismatched key 'prompt_generator." in msg, msg
    assert "in this model" in msg and "the checkpoint has 'prompt_generator." in msg and "with shape (" in msg, msg
    # same architecture family, different shapes: both shapes named for the same key
    from server.runner import first_state_mismatch

    a = {"prompt_generator.w": torch.zeros(4, 3), "prompt_generator.b": torch.zeros(4)}
    b = {"prompt_generator.w": torch.zeros(8, 3), "prompt_generator.b": torch.zeros(8)}
    assert first_state_mismatch(a, b) == ("first mismatched key 'prompt_generator.w': shape (4, 3) in the "
                                          "checkpoint, (8, 3) in this model")


def test_every_relative_yaml_path_is_relative_to_the_yaml(tmp_path, monkeypatch):
    """output_dir (like sites and cache_dir) resolves against the YAML's folder, not the current folder."""
    from autosam_core.config import TrainJobConfig, load_yaml_config, yaml_relative
    from server.outputs import resolve_cache_dir, resolve_run_dir

    fed_yaml = make_federation(tmp_path / "proj", sites={"a": 2, "b": 2}, name="rel")
    raw = yaml.safe_load(fed_yaml.read_text())
    raw.update(output_dir="out", cache_dir="emb")
    fed_yaml.write_text(yaml.safe_dump(raw))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    fed, path = load_federation(fed_yaml)
    assert resolve_run_dir(fed, path) == (tmp_path / "proj" / "out" / "rel").resolve()
    assert resolve_cache_dir(fed, path) == (tmp_path / "proj" / "emb").resolve()
    job = tmp_path / "proj" / "job.yaml"
    job.write_text("name: j\ntrain_data: [{dataset: x}]\noutput_dir: ../runs\n")
    cfg = load_yaml_config(job, TrainJobConfig)
    assert yaml_relative(cfg.output_dir, job.parent) == (tmp_path / "runs").resolve()
    assert yaml_relative("/abs/p", job.parent) == Path("/abs/p") and yaml_relative(None, job.parent) is None
