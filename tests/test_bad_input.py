"""Bad-input corpus: every bad input a new user or a site operator may feed the CLI, one row each.

Each row of ``CASES`` names a case, builds the command line from small files generated at test
time (tiny random SAM, a 3-image dataset), and states the exit code and the key words the output
must (and must not) contain. Output = stdout + stderr + log records + warning messages. A new case
is one line. Library-level bad inputs (an encoder returning garbage, a SAM parameter left
trainable, a poisoned cache entry) follow the table.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from autosam_core.checkpoint import save_checkpoint
from autosam_core.cli import main
from autosam_core.config import ModelConfig, SamConfig
from autosam_core.model_factory import build_autosam

G = ModelConfig(backbone="timm:mobilenetv3_small_050", g_input_size=64)
H, W = 40, 48


# ----- generated files ----------------------------------------------------------------------------
def _dataset(root: Path, n: int = 3, mask_values: tuple[int, ...] = (0, 255)) -> Path:
    """images/img{i}.png (random RGB) + masks/img{i}.png: a rectangle per foreground value."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(root / "images" / f"img{i}.png")
        mask = np.full((H, W), mask_values[0], np.uint8)
        for k, v in enumerate(mask_values[1:]):
            mask[5 + 12 * k:15 + 12 * k, 8:40] = v
        Image.fromarray(mask, mode="L").save(root / "masks" / f"img{i}.png")
    return root


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_sam):
    """Shared files: a good dataset and a checkpoint of tiny SAM + a small g."""
    root = tmp_path_factory.mktemp("world")
    w = {"root": root, "good": _dataset(root / "good")}
    model = build_autosam(SamConfig(kind="tiny"), G, sam=tiny_sam)
    meta = {"sam": SamConfig(kind="tiny").model_dump(), "model": G.model_dump(), "sam_kind": "tiny",
            "backbone": G.backbone}
    w["ckpt"] = save_checkpoint(root / "ck.pt", model.trainable_state(), meta)
    bad = model.trainable_state()
    key = next(k for k, v in bad.items() if v.ndim == 4)
    w["mismatch_key"] = key
    bad[key] = torch.zeros(1, 1, 1, 1)
    w["mismatch"] = save_checkpoint(root / "mismatch.pt", bad, meta)
    (root / "random.pt").write_bytes(np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    (root / "empty.pt").write_bytes(b"")
    (root / "text.pt").write_text("this is a README, not weights\n")
    (root / "trunc.pt").write_bytes(w["ckpt"].read_bytes()[:5000])
    torch.save({"trainable_state": {}, "metadata": {}, "x": _Foreign()}, root / "pickle.pt")
    save_checkpoint(root / "foreign_meta.pt", model.trainable_state(), {**meta, "sam": {"kind": "vit_q"}})
    save_checkpoint(root / "no_meta.pt", model.trainable_state(), {})
    return w


class _Foreign:
    """A class safe loading must refuse."""


def _variant(tmp: Path, name: str, **kw) -> Path:
    return _dataset(tmp / name, **kw)


def _train_yaml(tmp: Path, dataset: Path, extra: str = "", train: str = "") -> Path:
    p = tmp / "train.yaml"
    p.write_text(
        "name: t\nsam: {kind: tiny}\n"
        f"model: {{backbone: '{G.backbone}', g_input_size: {G.g_input_size}}}\n"
        f"train: {{epochs: 1, batch_size: 2, augmentation: none, val_fraction: 0.0{train}}}\n"
        f"train_data: [{{dataset: '{dataset}'}}]\ncache_dir: '{tmp / 'cache'}'\n{extra}")
    return p


def _train(tmp, dataset, **kw):
    return ["train", str(_train_yaml(tmp, dataset, **kw)), "--output", str(tmp / "out")]


def _evaluate(w, tmp, dataset, ckpt=None):
    return ["evaluate", "--checkpoint", str(ckpt or w["ckpt"]), "--data", str(dataset),
            "--cache-dir", str(tmp / "cache")]


def _predict(w, tmp, src, ckpt=None):
    return ["predict", "--checkpoint", str(ckpt or w["ckpt"]), "--input", str(src), "--output", str(tmp / "pred")]


def _truncated_png(tmp):
    d = _variant(tmp, "ds")
    _truncate(d / "images" / "img1.png")
    return d


def _label_map(tmp):
    return _variant(tmp, "ds", mask_values=(0, 1, 2))


def _size_mismatch(tmp):
    d = _variant(tmp, "ds")
    Image.fromarray(np.zeros((H + 1, W), np.uint8), mode="L").save(d / "masks" / "img2.png")
    return d


def _missing_mask(tmp):
    d = _variant(tmp, "ds")
    (d / "masks" / "img0.png").unlink()
    return d


def _rgba(tmp):
    d = tmp / "rgba"
    d.mkdir()
    Image.fromarray(np.full((H, W, 4), 200, np.uint8), mode="RGBA").save(d / "a.png")
    return d


def _empty_dataset(tmp):
    d = tmp / "ds"
    (d / "images").mkdir(parents=True)
    (d / "masks").mkdir()
    return d


def _metrics_label_map(tmp):
    gt, pred = tmp / "gt", tmp / "pred"
    gt.mkdir(), pred.mkdir()
    m = np.zeros((H, W), np.uint8)
    m[5:15, 8:40] = 1
    m[17:27, 8:40] = 2
    Image.fromarray(m, mode="L").save(gt / "f.png")
    Image.fromarray(((m > 0) * 255).astype(np.uint8), mode="L").save(pred / "f.png")
    return ["metrics", "--pred", str(pred), "--gt", str(gt)]


# ----- the corpus -----------------------------------------------------------------------------------
# (case, argv builder (world, tmp) -> argv, exit code, must contain, must not contain). Matching is
# case-insensitive. One line per case.
CASES = [
    # rows of issue #11 (previously: traceback, silent emptying or unsafe advice)
    ("train: truncated PNG", lambda w, t: _train(t, _truncated_png(t)), 2, ["1 unreadable", "img1.png", "truncated", "stems_file", "nothing was trained"], ["traceback"]),
    ("evaluate: truncated PNG", lambda w, t: _evaluate(w, t, _truncated_png(t)), 0, ["skipped 1", "1 unreadable", "img1.png", "| 2 |"], []),
    ("train: label-map mask 0/1/2", lambda w, t: _train(t, _label_map(t)), 0, ["nonzero = foreground", "{0, 1, 2}", "img0.png", "trained 3 images"], []),
    ("evaluate: label-map mask 0/1/2", lambda w, t: _evaluate(w, t, _label_map(t)), 0, ["nonzero = foreground", "{0, 1, 2}", "| 3 |"], []),
    ("metrics: label-map ground truth", lambda w, t: _metrics_label_map(t), 0, ["nonzero = foreground", "{0, 1, 2}", '"dice_max": 1.0', '"sensitivity": 1.0', '"degenerate_frames": []'], ["ground truth is empty"]),
    ("predict: state does not fit", lambda w, t: _predict(w, t, w["good"] / "images", w["mismatch"]), 2, ["mismatch.pt", "does not fit", "(1, 1, 1, 1)", "prompt_generator."], ["traceback"]),
    ("evaluate: state does not fit", lambda w, t: _evaluate(w, t, w["good"], w["mismatch"]), 2, ["mismatch.pt", "does not fit", "(1, 1, 1, 1)"], ["traceback"]),
    ("predict: random-bytes checkpoint", lambda w, t: _predict(w, t, w["good"] / "images", w["root"] / "random.pt"), 2, ["random.pt", "not a checkpoint of this tool", "3000 bytes", "expected an autosam-fl checkpoint"], ["weights_only", "pop from empty"]),
    ("evaluate: random-bytes checkpoint", lambda w, t: _evaluate(w, t, w["good"], w["root"] / "random.pt"), 2, ["random.pt", "not a checkpoint of this tool", "3000 bytes"], ["weights_only"]),
    ("predict: empty checkpoint file", lambda w, t: _predict(w, t, w["good"] / "images", w["root"] / "empty.pt"), 2, ["empty.pt", "not a checkpoint of this tool", "0 bytes"], ["weights_only"]),
    ("predict: text file as checkpoint", lambda w, t: _predict(w, t, w["good"] / "images", w["root"] / "text.pt"), 2, ["text.pt", "not a checkpoint of this tool", "30 bytes", "b'this is"], ["weights_only"]),
    ("evaluate: text file as checkpoint", lambda w, t: _evaluate(w, t, w["good"], w["root"] / "text.pt"), 2, ["text.pt", "not a checkpoint of this tool"], ["weights_only"]),
    ("predict: pickle of a foreign class", lambda w, t: _predict(w, t, w["good"] / "images", w["root"] / "pickle.pt"), 2, ["pickle.pt", "not a checkpoint of this tool", "_foreign", "safe loading refuses"], ["weights_only", "add_safe_globals"]),
    ("predict: metadata names an unknown SAM", lambda w, t: _predict(w, t, w["good"] / "images", w["root"] / "foreign_meta.pt"), 2, ["foreign_meta.pt", "do not describe a model", "must be one of lite_medsam", "vit_q"], ["traceback"]),
    ("evaluate: checkpoint without metadata", lambda w, t: _evaluate(w, t, w["good"], w["root"] / "no_meta.pt"), 2, ["no_meta.pt", "lacks 'sam'/'model'"], []),
    ("predict: missing input folder", lambda w, t: _predict(w, t, t / "no_such_folder"), 2, ["input folder", "no_such_folder", "does not exist"], ["wrote 0 masks"]),
    # bad input that already behaved well
    ("predict: truncated checkpoint", lambda w, t: _predict(w, t, w["good"] / "images", w["root"] / "trunc.pt"), 2, ["trunc.pt", "truncated", "5000 bytes"], ["weights_only"]),
    ("predict: missing checkpoint", lambda w, t: _predict(w, t, w["good"] / "images", t / "nope.pt"), 2, ["nope.pt", "does not exist"], []),
    ("predict: folder without images", lambda w, t: _predict(w, t, _empty_dataset(t) / "images"), 2, ["no images", "images"], []),
    ("predict: RGBA image", lambda w, t: _predict(w, t, _rgba(t)), 0, ["alpha channel dropped", "a.png", "wrote 1 masks"], []),
    ("train: unknown YAML key", lambda w, t: _train(t, w["good"], extra="epochs: 3\n"), 2, ["train.yaml", "'epochs'", "unknown key", "valid keys"], []),
    ("train: wrong type", lambda w, t: _train(t, w["good"], train=", batch_size: many"), 2, ["train.yaml", "train.batch_size", "'many'"], []),
    ("train: missing dataset folder", lambda w, t: _train(t, t / "absent"), 2, ["train.yaml", "key 'train_data.0.dataset'", "absent", "no folder with images/ and masks/"], []),
    ("train: missing split", lambda w, t: _train(t, f"{w['good']}', split: 'nosuch"), 2, ["train.yaml", "key 'train_data.0.split'", "nosuch", "fix the split name"], ["traceback"]),
    ("train: missing evaluate dataset", lambda w, t: _train(t, w["good"], extra=f"evaluate: [{{dataset: '{t / 'gone'}'}}]\n"), 2, ["train.yaml", "key 'evaluate.0.dataset'", "gone"], ["traceback"]),
    ("train: empty dataset folder", lambda w, t: _train(t, _empty_dataset(t)), 2, ["no usable image/mask pairs", "0 pairs used"], []),
    ("evaluate: size-mismatched mask", lambda w, t: _evaluate(w, t, _size_mismatch(t)), 0, ["skipped 1", "size mismatch", "img2", "41x48", "| 2 |"], []),
    ("evaluate: missing mask", lambda w, t: _evaluate(w, t, _missing_mask(t)), 0, ["skipped 1", "missing mask", "img0", "| 2 |"], []),
    ("evaluate: empty dataset folder", lambda w, t: _evaluate(w, t, _empty_dataset(t)), 2, ["no usable image/mask pairs"], []),
    ("metrics: missing ground-truth folder", lambda w, t: ["metrics", "--pred", str(t), "--gt", str(t / "nogt")], 2, ["nogt"], []),
]


@pytest.mark.parametrize("case, argv, code, must, must_not", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, argv, code, must, must_not, world, tmp_path, capsys, caplog):
    args = argv(world, tmp_path)
    caplog.set_level(logging.INFO)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = main(args)
    out = capsys.readouterr()
    text = "\n".join([out.out, out.err, caplog.text, *(str(w.message) for w in caught)])
    assert rc == code, f"{case}: exit {rc}, expected {code}\n{text}"
    low = text.lower()
    for word in must:
        assert word.lower() in low, f"{case}: {word!r} not in output\n{text}"
    for word in must_not:
        assert word.lower() not in low, f"{case}: {word!r} in output\n{text}"
    if code == 2 and not case.startswith("train: truncated"):  # one error line, the list of bad files excepted
        errors = [line for line in out.err.splitlines() if line.strip()]
        assert len(errors) >= 1 and errors[0].startswith("error: ")
        if "checkpoint" in case or "does not fit" in case or "input folder" in case or "metadata" in case:
            assert len(errors) == 1, errors


def test_truncated_png_stops_training_before_encoding(world, tmp_path, capsys):
    """Nothing is encoded or written when a training image is unreadable (the run costs nothing)."""
    rc = main(_train(tmp_path, _truncated_png(tmp_path)))
    assert rc == 2
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()
    err = capsys.readouterr().err
    assert str(tmp_path / "ds" / "images" / "img1.png") in err


def test_evaluate_json_counts_skipped(world, tmp_path, capsys):
    args = _evaluate(world, tmp_path, _truncated_png(tmp_path)) + ["--json", str(tmp_path / "r.json")]
    assert main(args) == 0
    res = next(iter(json.loads((tmp_path / "r.json").read_text())["results"].values()))
    assert res["num_images"] == 2 and res["skipped"] == 1 and "unreadable" in res["skipped_reasons"]


def test_label_map_mask_values_and_rules(tmp_path):
    """0/1/2 is read as nonzero = foreground (warned); 0/255, 0/1 and JPEG 0/255 silently; never emptied."""
    from autosam_core.data.io import MaskValuesWarning, load_mask

    d = _label_map(tmp_path)
    with pytest.warns(MaskValuesWarning, match=r"img0\.png.*\{0, 1, 2\}.*nonzero = foreground"):
        m = load_mask(d / "masks" / "img0.png")
    assert m.sum() == 2 * 10 * 32  # both labels kept: 640 pixels
    three = np.zeros((20, 20), np.uint8)
    three[2:10, 2:10], three[12:18, 2:10] = 100, 200  # labels above and below 128
    Image.fromarray(three, mode="L").save(tmp_path / "l.png")
    with pytest.warns(MaskValuesWarning, match=r"\{0, 100, 200\}.*64 nonzero pixels below 128"):
        assert load_mask(tmp_path / "l.png").sum() == 48
    disc = np.zeros((64, 64), np.uint8)
    disc[16:48, 16:48] = 255
    Image.fromarray(disc, mode="L").save(tmp_path / "d.jpg", quality=85)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a JPEG-smeared 0/255 mask is not warned about
        assert abs(int(load_mask(tmp_path / "d.jpg").sum()) - 32 * 32) < 40


# ----- library-level bad input ----------------------------------------------------------------------
class _BrokenEncoder(torch.nn.Module):
    def __init__(self, out):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
        self.out = out

    def forward(self, x):
        return None if self.out is None else torch.zeros(x.shape[0], *self.out)


@pytest.mark.parametrize("out, found", [(None, "None"), ((256, 32, 32), "(2, 256, 32, 32)")])
def test_encode_checks_its_output(tiny_sam, out, found, tmp_path):
    from autosam_core.data.cache import EmbeddingCache
    from autosam_core.sam import FrozenSam

    sam = FrozenSam(tiny_sam.spec, _BrokenEncoder(out), tiny_sam.prompt_encoder, tiny_sam.mask_decoder, "broken")
    with pytest.raises(ValueError) as err:
        sam.encode(torch.zeros(2, 3, 256, 256))
    msg = str(err.value)
    assert "tiny" in msg and "(2, 256, 64, 64)" in msg and found in msg
    d = _dataset(tmp_path / "ds", n=2)
    cache = EmbeddingCache(sam, tmp_path / "cache")
    from autosam_core.data.io import load_image

    with pytest.raises(ValueError, match="64, 64"):
        cache.ensure(sorted((d / "images").iterdir()), load_image, progress=False)
    assert not list((tmp_path / "cache").rglob("*.pt"))  # nothing of the wrong shape was stored


def test_cache_never_stores_and_recomputes_a_poisoned_entry(tiny_sam, tmp_path, monkeypatch):
    from autosam_core.data.cache import CacheEntryWarning, EmbeddingCache
    from autosam_core.data.io import load_image

    d = _dataset(tmp_path / "ds", n=2)
    paths = sorted((d / "images").iterdir())
    cache = EmbeddingCache(tiny_sam, tmp_path / "cache")
    # an encode that lies about its shape (bypassing FrozenSam's own check) is refused by the cache
    monkeypatch.setattr(tiny_sam, "encode", lambda x: torch.zeros(x.shape[0], 256, 32, 32))
    with pytest.raises(ValueError, match=r"\(2, 256, 64, 64\)"):
        cache.ensure(paths, load_image, progress=False)
    monkeypatch.undo()
    assert not list((tmp_path / "cache").rglob("*.pt"))
    cache.ensure(paths, load_image, progress=False)
    good = cache.get(paths[0]).clone()
    torch.save(torch.zeros(256, 32, 32, dtype=torch.float16), cache.path(paths[0]))  # poisoned entry
    cache.path(paths[1]).write_bytes(b"\x00" * 10)  # unreadable entry
    for p, want in ((paths[0], r"shape \(256, 32, 32\)"), (paths[1], "unreadable")):
        with pytest.warns(CacheEntryWarning, match=want):
            entry = cache.get(p)
        assert entry.dtype == torch.float16 and entry.shape == (256, 64, 64)
    assert torch.equal(cache.get(paths[0]), good)


def test_sam_parameters_must_stay_frozen(tiny_sam, tmp_path):
    from autosam_core.data.dataset import resolve_pairs
    from autosam_core.data.torch_dataset import AutoSamDataset, make_loader
    from autosam_core.training import SamNotFrozenError, train_epochs
    from autosam_core.config import DataRef

    model = build_autosam(SamConfig(kind="tiny"), G, sam=tiny_sam)
    pairs = resolve_pairs(DataRef(dataset=str(_dataset(tmp_path / "ds", n=2))))
    loader = make_loader(AutoSamDataset(model, pairs), 2, shuffle=False)
    before = {k: v.clone() for k, v in tiny_sam.state_dict().items()}
    first = next(iter(tiny_sam.named_parameters()))[0]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)  # over all parameters, SAM's included
    with pytest.raises(SamNotFrozenError, match=f"sam.{first} is in the optimiser"):
        train_epochs(model, loader, 1, opt, progress=False)
    try:
        tiny_sam.image_encoder.requires_grad_(True)
        with pytest.raises(SamNotFrozenError, match=f"sam.{first} requires grad"):
            train_epochs(model, loader, 1, torch.optim.Adam(model.prompt_generator.parameters()), progress=False)
    finally:
        tiny_sam.requires_grad_(False)
    assert all(torch.equal(v, tiny_sam.state_dict()[k]) for k, v in before.items())
