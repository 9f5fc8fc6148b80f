"""DP accounting across rounds and the audit of what leaves a site (client/server, tiny SAM).

- The reply audit passes normal train/validation replies and writes a readable report; it blocks a
  reply with a per-image metric, a list metric, a free-text string, an unexpected record or a SAM
  array, and the error that reaches the server does not repeat the offending content.
- A DP site (HarDNet-68 g at 64 px, GroupNorm) called in three fresh "processes" sharing its state
  folder: epsilon grows from round 1 to 2 and stays under the target; in round 3 the budget would be
  exceeded, so it replies with the unchanged weights, 0 examples and the reason.
- A 2-site DP federation in Flower's simulation runtime: summary.json/metrics.csv/epsilon.png show
  epsilon per site per round; resuming for a third round continues the accountants (no reset), and
  the site whose budget is spent skips with its reason in the server log and summary.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

import client  # noqa: F401  (imports flwr's CLI deps quietly; see client/__init__.py)
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from client import app as client_app
from client import protocol as P
from client.audit import ReplyAudit, check_reply, expected_signature
from tests.fault_injection import inject as inject_fault
from tests.fl_helpers import DP_MODEL, TINY_MODEL, make_dataset, make_federation, write_yaml
from tests.test_federation_client import _context, _instruction
from tests.test_federation_simulation import PNG, no_leftover_processes  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def tiny_state():
    from autosam_core.config import ModelConfig, SamConfig
    from autosam_core.model_factory import build_autosam

    return build_autosam(SamConfig(kind="tiny"), ModelConfig(**TINY_MODEL)).trainable_state()


def _fresh_process(monkeypatch) -> None:
    """Forget every cached model and site, as a new ClientApp process would (deployment: one per round)."""
    monkeypatch.setattr(client_app, "_SITES", {})
    monkeypatch.setattr(client_app, "_MODELS", {})


# ----- the audit ---------------------------------------------------------------------------------------
def test_audit_passes_normal_replies_and_writes_report(tmp_path, tiny_state, monkeypatch):
    fed = make_federation(tmp_path, sites={"site_a": 3}, val_fraction=0.34, min_sites=1)
    monkeypatch.setenv("AUTOSAM_CACHE", str(tmp_path / "cache"))
    _fresh_process(monkeypatch)
    audit_dir = tmp_path / "audit"
    ctx = _context(7, {P.NODE_SITE_CONFIG: str(tmp_path / "sites" / "site_a.yaml"), P.NODE_AUDIT: True,
                       P.NODE_AUDIT_DIR: str(audit_dir)})
    reply = client_app.train(_instruction(tiny_state, 7, 1), ctx)
    assert not reply.has_error() and reply.content[P.SITE][P.STATUS] == P.STATUS_TRAINED
    client_app.evaluate(_instruction(tiny_state, 7, 1, "evaluate"), ctx)

    data = json.loads((audit_dir / "audit-site_a.json").read_text())
    train, val = data["replies"]
    assert (train["kind"], train["verdict"], val["kind"], val["verdict"]) == ("train", "sent", "evaluate", "sent")
    assert train["arrays"]["count"] == len(tiny_state) == train["arrays"]["expected_count"]
    assert train["arrays"]["keys_match_fresh_model"]
    sent_bytes = sum(len(a.data) for a in reply.content[P.ARRAYS].values())
    assert train["arrays"]["bytes"] == sent_bytes > 0
    assert set(train["metrics"]) == set(reply.content[P.METRICS]) <= P.TRAIN_METRIC_KEYS
    assert train["metrics"][P.NUM_EXAMPLES] == 2
    assert set(val["metrics"]) == {P.NUM_EXAMPLES, "val_dice", "val_iou"} and val["metrics"][P.NUM_EXAMPLES] == 1
    assert val["arrays"] == {"count": 0, "bytes": 0, "keys_match_fresh_model": False}
    md = (audit_dir / "audit-site_a.md").read_text()
    assert "# What left site `site_a`" in md and "| train | sent |" in md and "| evaluate | sent |" in md
    assert f"{sent_bytes:,}" in md and "keys/shapes match" in md and "train_loss=" in md
    assert "2 replies sent" in md and "0 blocked" in md
    # the stems and file names of the site's images appear nowhere in what was sent
    assert "s10_" not in json.dumps({k: v for k, v in train.items() if k != "utc"})


def _valid_reply(state) -> RecordDict:
    return RecordDict({
        P.ARRAYS: ArrayRecord(state),
        P.METRICS: MetricRecord({P.NUM_EXAMPLES: 2, "train_loss": 0.5, "train_dice": 0.4, "train_seconds": 1.0,
                                 "local_epochs": 1, "epsilon": 1.5, "delta": 1e-3, "target_epsilon": 8.0,
                                 "dp_steps": 4, "noise_multiplier": 1.1}),
        P.SITE: ConfigRecord({P.SITE_ID: "site_a", P.STATUS: P.STATUS_TRAINED}),
    })


def test_audit_blocks_forbidden_content(tmp_path, tiny_state, monkeypatch):
    from autosam_core.config import ModelConfig

    expected = expected_signature("tiny", ModelConfig(**TINY_MODEL), dp=False)
    assert list(expected) == list(tiny_state)  # the fresh-model signature equals a built model's state
    ok = _valid_reply(tiny_state)
    assert check_reply(ok, "train", "site_a", expected, max_examples=2) == []
    skipped = _valid_reply(tiny_state)
    skipped[P.SITE] = ConfigRecord({P.SITE_ID: "site_a", P.STATUS: P.STATUS_SKIPPED, P.REASON: (
        "privacy budget: 2 more steps would exceed target epsilon 8.0 (spent 7.95 at delta 0.001 over 12 steps)")})
    assert check_reply(skipped, "train", "site_a", expected) == []

    def violations(mutate) -> list[str]:
        reply = _valid_reply(tiny_state)
        mutate(reply)
        return check_reply(reply, "train", "site_a", expected, max_examples=2)

    per_image = violations(lambda r: r[P.METRICS].__setitem__("dice_s10_000", 0.9))
    assert len(per_image) == 1 and "'dice_s10_000' is not on the train allow-list" in per_image[0]
    assert "one number" in violations(lambda r: r[P.METRICS].__setitem__("train_dice", [0.9, 0.1]))[0]
    assert "exceeds the site's 2 images" in violations(lambda r: r[P.METRICS].__setitem__(P.NUM_EXAMPLES, 3))[0]
    assert "free text" in violations(lambda r: r[P.SITE].__setitem__(P.REASON, "could not read s10_000.png"))[0]
    assert "not on the allow-list" in violations(lambda r: r[P.SITE].__setitem__("stem", "s10_000"))[0]
    assert "not this site's id" in violations(lambda r: r[P.SITE].__setitem__(P.SITE_ID, "site_b"))[0]
    assert "record 'masks'" in violations(lambda r: r.__setitem__("masks", ArrayRecord(
        {"m": torch.zeros(2, 8, 8)})))[0]

    def sam_key(r):
        r[P.ARRAYS] = ArrayRecord({**tiny_state, "sam.mask_decoder.iou_token.weight": torch.zeros(1, 256)})

    sam = violations(sam_key)
    assert len(sam) == 1 and "unexpected non-g/h (e.g. SAM) array key" in sam[0] and "sam.mask_decoder" in sam[0]
    first = next(iter(tiny_state))
    reshaped = violations(lambda r: r.__setitem__(P.ARRAYS, ArrayRecord(
        {**tiny_state, first: tiny_state[first].flatten()})))
    assert f"array '{first}'" in reshaped[0]
    with pytest.raises(ValueError, match="kind"):
        check_reply(ok, "upload", "site_a", expected)

    # through the ClientApp: the reply is not sent, the server only learns that the audit blocked it
    fed = make_federation(tmp_path, sites={"site_a": 2}, min_sites=1)
    monkeypatch.setenv("AUTOSAM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(P.AUDIT_ENV, "1")
    monkeypatch.setenv(P.AUDIT_DIR_ENV, str(tmp_path / "audit"))
    _fresh_process(monkeypatch)
    real = client_app.train_metrics

    def leaky(stats, epochs, n):
        m = real(stats, epochs, n)
        m["dice_s10_000"] = 0.87  # a per-image score named after an image
        return m

    monkeypatch.setattr(client_app, "train_metrics", leaky)
    ctx = _context(7, {P.NODE_SITE_CONFIG: str(tmp_path / "sites" / "site_a.yaml")})
    with pytest.raises(RuntimeError) as info:
        client_app.train(_instruction(tiny_state, 7, 1), ctx)
    text = str(info.value)
    assert P.parse_site_error(text)[0] == "site_a" and "AuditViolation" in text and "blocked" in text
    assert "s10_000" not in text and "0.87" not in text  # the offending content does not reach the server
    assert info.value.__cause__ is None and info.value.__suppress_context__
    audit = ReplyAudit("site_a", tmp_path / "audit")
    assert [e["verdict"] for e in audit.replies] == ["blocked"]
    assert "dice_s10_000" in audit.replies[0]["violations"][0]  # ... but the site operator sees it
    assert "**BLOCKED:" in (tmp_path / "audit" / "audit-site_a.md").read_text()
    # other errors: with the audit on only the type leaves the site
    monkeypatch.setattr(client_app, "train_metrics", real)
    inject_fault(monkeypatch, "site_a@2")
    with pytest.raises(RuntimeError) as info:
        client_app.train(_instruction(tiny_state, 7, 2), ctx)
    assert "InjectedFault" in str(info.value) and "injected fault" not in str(info.value)
    assert ReplyAudit("site_a", tmp_path / "audit").replies[-1]["kind"] == "error"


def test_client_cli_audit_flag_reaches_the_node_config(tmp_path, monkeypatch, capfd):
    """`autosam-client --audit --audit-dir DIR` hands `audit`/`audit-dir` to the SuperNode's node config."""
    from flwr.common.config import parse_config_args

    from client import cli
    from server import processes

    make_dataset(tmp_path / "ds", 2, seed=4)
    site_yaml = write_yaml(tmp_path / "s.yaml", {"site_id": "s", "data": {"dataset": str(tmp_path / "ds")}})
    seen = {}

    def fake_popen(self, name, cmd, **kwargs):
        seen["node_config"] = parse_config_args([cmd[cmd.index("--node-config") + 1]])
        raise processes.FlowerProcessError("not started in this test")

    monkeypatch.setattr(processes.ProcessTracker, "popen", fake_popen)
    monkeypatch.setattr(cli.signal, "signal", lambda *a: None)  # keep pytest's SIGTERM handling
    import autosam_fl.connect

    monkeypatch.setattr(autosam_fl.connect, "probe_superlink", lambda *a, **k: None)  # as if it answered
    args = ["--site", str(site_yaml), "--superlink", "127.0.0.1:1", "--insecure"]
    assert cli.main(args + ["--audit", "--audit-dir", str(tmp_path / "aud")]) == 1
    cfg = seen["node_config"]  # the site worker's socket and the site id travel too (issue 12)
    assert {k: cfg.get(k) for k in (P.NODE_SITE_CONFIG, P.NODE_AUDIT, P.NODE_AUDIT_DIR)} == {
        P.NODE_SITE_CONFIG: str(site_yaml.resolve()), P.NODE_AUDIT: True,
        P.NODE_AUDIT_DIR: str((tmp_path / "aud").resolve())}
    assert "reply audit on" in capfd.readouterr().out
    assert cli.main(args) == 1
    assert seen["node_config"][P.NODE_SITE_CONFIG] == str(site_yaml.resolve())
    assert P.NODE_AUDIT not in seen["node_config"] and P.NODE_AUDIT_DIR not in seen["node_config"]
    assert cli.main(args + ["--audit-dir", str(tmp_path / "aud")]) == cli.EXIT_CONFIG  # needs --audit
    assert "--audit-dir needs --audit" in capfd.readouterr().err


# ----- DP accounting at one site -------------------------------------------------------------------------
def test_dp_site_accounts_across_fresh_processes_and_stops_at_budget(tmp_path, monkeypatch):
    """Three rounds sharing the site's state folder (the ledger): round 1 in "process" A, round 2 in a
    fresh process B, round 3 back in A (as when simulation actors take turns serving a site): A must
    account from the file, not from its stale copy (with which round 3 would still fit the budget)."""
    from autosam_core.config import ModelConfig, SamConfig
    from autosam_core.model_factory import build_autosam
    from autosam_core.privacy import make_autosam_private_compatible

    monkeypatch.setenv("AUTOSAM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(P.SITE_STATE_ENV, raising=False)
    make_dataset(tmp_path / "ds", 4, seed=3)
    site_yaml = write_yaml(tmp_path / "dp_a.yaml", {
        "site_id": "dp_a", "data": {"dataset": str(tmp_path / "ds")}, "batch_size": 2, "augmentation": "none",
        "privacy": {"target_epsilon": 3.0, "delta": 1e-3, "max_grad_norm": 1.0, "planned_rounds": 2}})
    state = make_autosam_private_compatible(
        build_autosam(SamConfig(kind="tiny"), ModelConfig(**DP_MODEL))).trainable_state()
    ctx = _context(11, {P.NODE_SITE_CONFIG: str(site_yaml), P.NODE_AUDIT: True})
    dp = {P.DP: True, P.PLANNED_ROUNDS: 5}  # the site's own planned_rounds (2) wins over the federation's

    replies = []
    processes = {"A": ({}, {}), "B": ({}, {})}
    for rnd, proc in ((1, "A"), (2, "B"), (3, "A")):
        monkeypatch.setattr(client_app, "_SITES", processes[proc][0])
        monkeypatch.setattr(client_app, "_MODELS", processes[proc][1])
        reply = client_app.train(_instruction(state, 11, rnd, model=DP_MODEL, **dp), ctx)
        replies.append((state, reply))
        state = client_app.received_state(reply.content[P.ARRAYS], "float32")
    m = [r.content[P.METRICS] for _, r in replies]
    site = [r.content[P.SITE] for _, r in replies]
    assert [x[P.NUM_EXAMPLES] for x in m] == [4, 4, 0]
    assert [x["dp_steps"] for x in m] == [2, 4, 4]  # q = 1/2: 2 Poisson steps per epoch, accumulated
    assert 0 < m[0]["epsilon"] < m[1]["epsilon"] <= 3.0  # grows across processes, within the target
    assert m[2]["epsilon"] == pytest.approx(m[1]["epsilon"])  # skipped round spends nothing
    assert all(x["delta"] == 1e-3 and x["target_epsilon"] == 3.0 and x["noise_multiplier"] > 0 for x in m)
    assert [s[P.STATUS] for s in site] == ["trained", "trained", "skipped"] and P.REASON not in site[0]
    assert re.fullmatch(r"privacy budget: 2 more steps would exceed target epsilon 3\.0 .*over 4 steps\)",
                        site[2][P.REASON])
    sent, reply3 = replies[2]
    got = client_app.received_state(reply3.content[P.ARRAYS], "float32")
    assert all(torch.equal(got[k], v) for k, v in sent.items())  # unchanged weights
    ledger = tmp_path / "cache" / "site-state" / "privacy-dp_a.json"
    assert sum(s for *_, s in json.loads(ledger.read_text())["history"]) == 4
    audit = json.loads((ledger.parent / "audit-dp_a.json").read_text())["replies"]
    assert [(e["round"], e["verdict"]) for e in audit] == [(1, "sent"), (2, "sent"), (3, "sent")]
    assert audit[2]["site_record"][P.STATUS] == "skipped" and audit[2]["metrics"]["epsilon"] == m[2]["epsilon"]


# ----- a simulated DP federation, resumed ------------------------------------------------------------------
def test_dp_simulation_reports_epsilon_and_resume_continues(tmp_path, no_leftover_processes):  # noqa: F811
    import yaml

    from server.simulation import run_simulation_from_yaml

    privacy = {"target_epsilon": 6.0, "delta": 1e-3, "max_grad_norm": 1.0}
    fed = make_federation(
        tmp_path, sites={"site_a": 4, "site_b": 4}, rounds=2, min_sites=2, model=DP_MODEL, bench_images=1,
        site_options={"site_a": {"privacy": {**privacy, "planned_rounds": 3}, "audit": True},
                      "site_b": {"privacy": {**privacy, "planned_rounds": 2}, "audit": True}})
    run_dir = run_simulation_from_yaml(fed, echo=lambda s: None, timeout=400)
    s1 = json.loads((run_dir / "summary.json").read_text())
    assert s1["status"] == "completed"
    eps1 = {site: [r["epsilon"] for r in d["rounds"]] for site, d in s1["privacy"].items()}
    assert set(eps1) == {"site_a", "site_b"} and all(len(v) == 2 for v in eps1.values())
    for site, (e1, e2) in eps1.items():
        assert 0 < e1 < e2 <= 6.0, site
        assert s1["rounds"][2]["sites"][site]["epsilon"] == e2
        assert s1["privacy"][site]["target_epsilon"] == 6.0 and s1["privacy"][site]["delta"] == 1e-3
    assert (run_dir / "epsilon.png").read_bytes()[:8] == PNG
    csv = (run_dir / "metrics.csv").read_text()
    assert csv.startswith("round,split,kind,dice,iou,num_images,epsilon,delta")
    assert re.search(r"\n2,site_a,privacy,,,4,[0-9.]+,0\.001", csv)

    cfg = yaml.safe_load(fed.read_text())
    cfg.update(rounds=3, resume=True)
    fed.write_text(yaml.safe_dump(cfg))
    run_simulation_from_yaml(fed, echo=lambda s: None, timeout=400)
    s2 = json.loads((run_dir / "summary.json").read_text())
    assert s2["status"] == "completed" and s2["resumed_from"]["round"] == 2
    a = [r["epsilon"] for r in s2["privacy"]["site_a"]["rounds"]]
    assert a[:2] == eps1["site_a"] and eps1["site_a"][1] < a[2] <= 6.0  # continued, not reset
    b3 = s2["rounds"][3]["sites"]["site_b"]  # budget for 2 rounds: round 3 would exceed it
    assert b3["num_examples"] == 0 and b3["status"] == "skipped"
    assert b3["epsilon"] == pytest.approx(eps1["site_b"][1]) and "target epsilon 6.0" in b3["reason"]
    assert "privacy budget" in s2["rounds"][3]["ignored_sites"]["site_b"]
    assert s2["privacy"]["site_b"]["rounds"][2]["status"] == "skipped"
    log = (run_dir / "server.log").read_text()
    assert "site site_b sent 0 examples (privacy budget:" in log and "skipped: site_b: privacy budget" in log
    assert "\n3,site_a,privacy,,,4," in (run_dir / "metrics.csv").read_text()
    from server.autosam_cli import format_federation_summary

    table = format_federation_summary(s2)  # what `autosam simulate` prints
    assert "privacy site_a: epsilon r1 " in table and "skipped rounds 3 (budget)" in table
    for site in ("site_a", "site_b"):  # the audit followed every reply, across both runs
        audit = json.loads((tmp_path / "cache" / "site-state" / f"audit-{site}.json").read_text())["replies"]
        assert [(e["round"], e["verdict"]) for e in audit if e["kind"] == "train"] == [
            (1, "sent"), (2, "sent"), (3, "sent")]
    assert math.isfinite(s2["privacy"]["site_a"]["epsilon"])


# ----- the shipped DP demo ---------------------------------------------------------------------------------
def test_demo_dp_mirrors_demo_with_privacy_on_every_site(shared_data):
    """sites/polyp/demo_dp.yaml = demo.yaml + a privacy block (delta << 1/N) and the audit on every site
    (the demo sites' ``optimizer_state: keep`` excepted: not available with DP)."""
    import warnings
    from pathlib import Path

    import yaml

    from autosam_core.privacy import PrivacyWarning, check_delta
    from server.preflight import check_sites, check_validation, load_federation

    sites_dir = Path(__file__).resolve().parents[1] / "sites" / "polyp"
    fed, path = load_federation(sites_dir / "demo_dp.yaml")
    sites = check_sites(fed, path)
    check_validation(fed, path, sites)
    plain = yaml.safe_load((sites_dir / "demo.yaml").read_text())
    dp = yaml.safe_load((sites_dir / "demo_dp.yaml").read_text())
    differ = {k for k in plain.keys() | dp.keys() if plain.get(k) != dp.get(k)}
    assert differ == {"name", "sites", "round_timeout"}
    for s, demo_site in zip(sites, plain["sites"]):
        mine = yaml.safe_load(s.yaml_path.read_text())
        plain_site = yaml.safe_load((sites_dir / demo_site).read_text())
        # the one demo key a DP site cannot mirror: its DP optimizer starts afresh every round
        assert plain_site.pop("optimizer_state") == "keep" and s.config.optimizer_state == "reset"
        assert {k: v for k, v in mine.items() if k not in ("privacy", "state_dir", "audit")} == plain_site
        p = s.config.privacy
        assert p is not None and s.config.audit and p.target_epsilon == 8.0 and p.max_grad_norm == 1.0
        assert p.delta < 0.01 / s.num_train  # delta << 1/N (N = 24)
        with warnings.catch_warnings():
            warnings.simplefilter("error", PrivacyWarning)
            check_delta(p.delta, s.num_train)
