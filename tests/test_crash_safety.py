"""Crash safety of what is written: a writer SIGKILLed mid-write leaves the previous file loadable.

Each test starts a subprocess that writes a new version of a file through the project's own code,
with the lowest-level write slowed down so that it stops half-way through the bytes (after
signalling the parent). The parent SIGKILLs it there, then loads the file: it must be the previous
version, complete, never a truncated one, and the next write must work.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

# Replaces torch.save and Path.write_text in the child: write half the bytes, flush, tell the
# parent (marker file), then hang until killed.
_HALF_WRITE = textwrap.dedent("""
    import io, os, sys, time, pathlib, torch
    MARKER = pathlib.Path(sys.argv[1])
    _save = torch.save

    def _hang(fh, data):
        fh.write(data[: len(data) // 2]); fh.flush(); os.fsync(fh.fileno())
        MARKER.write_bytes(b"mid-write")
        time.sleep(120)
        fh.write(data[len(data) // 2:])

    def slow_save(obj, f, *a, **k):
        buf = io.BytesIO(); _save(obj, buf, *a, **k)
        with open(f, "wb") as fh:
            _hang(fh, buf.getvalue())

    def slow_write_text(self, text, encoding=None, errors=None, newline=None):
        with open(self, "wb") as fh:
            _hang(fh, text.encode(encoding or "utf-8"))

    torch.save = slow_save
    pathlib.Path.write_text = slow_write_text
""")


def _kill_mid_write(tmp_path: Path, body: str, *args: str) -> list[Path]:
    """Run ``body`` in a child with half-writes; SIGKILL it mid-write. Returns the temp files left."""
    marker = tmp_path / "marker"
    before = set(tmp_path.rglob("*"))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", _HALF_WRITE + textwrap.dedent(body), str(marker), *args],
                            cwd=REPO, env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(f"writer exited ({proc.returncode}) before writing: {proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("writer never reached the write")
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return sorted(p for p in set(tmp_path.rglob("*")) - before if p.is_file() and p != marker)


def test_sigkill_during_checkpoint_write_keeps_previous(tmp_path):
    from autosam_core.checkpoint import load_checkpoint, save_checkpoint

    ck = tmp_path / "ckpts" / "last.pt"
    old = {"prompt_generator.w": torch.arange(50_000, dtype=torch.float32)}
    save_checkpoint(ck, old, {"epoch": 1})
    size = ck.stat().st_size
    left = _kill_mid_write(tmp_path, """
        from autosam_core.checkpoint import save_checkpoint
        save_checkpoint(sys.argv[2], {"prompt_generator.w": torch.zeros(50_000)}, {"epoch": 2})
    """, str(ck))
    assert left and all(p.name.startswith(".last.pt.") and p.stat().st_size < size for p in left)  # killed mid-write
    assert ck.stat().st_size == size
    payload = load_checkpoint(ck)
    assert payload["metadata"]["epoch"] == 1 and torch.equal(payload["trainable_state"]["prompt_generator.w"],
                                                             old["prompt_generator.w"])
    save_checkpoint(ck, {"prompt_generator.w": torch.ones(3)}, {"epoch": 2})  # the next save works
    assert load_checkpoint(ck)["metadata"]["epoch"] == 2


def test_sigkill_during_cache_write_keeps_cache_valid(tmp_path, tiny_sam):
    from autosam_core.data.cache import EmbeddingCache
    from autosam_core.data.io import load_image

    imgs = []
    for i in range(2):
        imgs.append(tmp_path / f"img{i}.png")
        Image.fromarray(np.full((32, 40, 3), 60 * (i + 1), np.uint8)).save(imgs[-1])
    root = tmp_path / "cache"
    cache = EmbeddingCache(tiny_sam, root)
    cache.ensure(imgs[:1], load_image, progress=False)
    first = cache.get(imgs[0]).clone()
    left = _kill_mid_write(tmp_path, """
        from autosam_core.data.cache import EmbeddingCache
        from autosam_core.data.io import load_image
        from autosam_core.sam import load_frozen_sam
        EmbeddingCache(load_frozen_sam("tiny", seed=0), sys.argv[2]).ensure([sys.argv[3]], load_image, progress=False)
    """, str(root), str(imgs[1]))
    assert left and all(p.name.startswith(".") and p.suffix == ".tmp" for p in left)  # killed mid-write
    fresh = EmbeddingCache(tiny_sam, root)
    assert not fresh.path(imgs[1]).exists()  # no truncated entry under the real name
    assert torch.equal(fresh.get(imgs[0]), first)
    stats = fresh.ensure(imgs, load_image, progress=False)
    assert stats["computed"] == 1 and stats["cached"] == 1
    assert fresh.get(imgs[1]).shape == (256, 64, 64)


def test_sigkill_during_privacy_ledger_update_keeps_previous(tmp_path):
    from autosam_core.privacy import PrivacyLedger

    path = tmp_path / "state" / "privacy-site.json"
    ledger = PrivacyLedger(path)
    ledger.record(1.1, 0.01, 300)
    ledger.rounds.append({"steps": 300, "epsilon": 1.5})
    ledger.save()
    text = path.read_text()
    left = _kill_mid_write(tmp_path, """
        from autosam_core.privacy import PrivacyLedger
        led = PrivacyLedger(sys.argv[2])
        led.record(1.1, 0.01, 300)
        led.rounds.append({"steps": 300, "epsilon": 2.2})
        led.save()
    """, str(path))
    assert left and all(p.name.startswith(".privacy-site.json.") for p in left)  # killed mid-write
    assert path.read_text() == text and json.loads(text)["history"] == [[1.1, 0.01, 300]]
    again = PrivacyLedger(path)
    assert again.steps == 300 and again.rounds == [{"steps": 300, "epsilon": 1.5}]
    again.record(1.1, 0.01, 100)
    again.save()
    assert PrivacyLedger(path).steps == 400
