"""Dataset discovery, image/mask pairing by file stem, a config's data reference resolved to pairs, and
the seeded validation hold-out (the torch dataset is :class:`autosam_core.data.torch_dataset.AutoSamDataset`).

Data layout (docs/DESIGN.md section 6, ``../shared/data/README.md``)::

    <dataset>/images/<stem>.<jpg|png|...>
    <dataset>/masks/<stem>.png            0/255
    <dataset>/splits/<split>.txt          one stem per line

Images and masks are paired by stem, never by sorted order (docs/DESIGN.md section 1, known flaws of the
public AutoSAM code). Image/mask sizes are compared from the file headers and mismatches are rejected,
never padded. Nothing is dropped silently: every skipped file is listed in a :class:`PairingReport`.
This module does not import torch (the config module, which does, is imported only when a
:class:`~autosam_core.config.DataRef` is resolved).
"""

from __future__ import annotations

import logging
import os
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .io import ImageFormatError, image_size, load_image, load_mask

if TYPE_CHECKING:
    from ..config import DataRef

log = logging.getLogger(__name__)

__all__ = [
    "IMAGE_EXTENSIONS",
    "MASK_EXTENSIONS",
    "DATA_ROOT_ENV",
    "SplitNotFoundError",
    "Pair",
    "PairingReport",
    "data_root",
    "read_split",
    "list_splits",
    "pair_by_stem",
    "verify_pixels",
    "resolve_ref",
]

#: Recognised image file extensions (lower case; matching is case-insensitive).
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
#: Recognised mask extensions in order of preference when one stem has several (lossless first).
MASK_EXTENSIONS: tuple[str, ...] = (".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg")
#: Environment variable overriding :func:`data_root`.
DATA_ROOT_ENV = "AUTOSAM_DATA"

_MAX_NAMES_IN_SUMMARY = 5


class SplitNotFoundError(FileNotFoundError):
    """A split file ``<dataset>/splits/<split>.txt`` does not exist; the message lists the ones that do."""


def data_root() -> Path:
    """Return the root folder of the shared datasets.

    Source: docs/DESIGN.md section 6 / docs/ARCHITECTURE.md: ``$AUTOSAM_DATA`` when set and non-empty,
    else ``<repo root>/../shared/data`` where the repo root is the parent of the ``autosam_core``
    package directory. The path is returned as is (``~`` expanded); its existence is not checked.

    Returns:
        ``pathlib.Path`` of the data root.
    """
    env = os.environ.get(DATA_ROOT_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    repo_root = Path(__file__).resolve().parents[2]
    return repo_root.parent / "shared" / "data"


def default_cache_dir() -> Path:
    """The embedding cache root: ``$AUTOSAM_CACHE`` or ``<repo>/.cache/embeddings`` (not created here).
    Lives beside :func:`data_root` because it imports no torch (the coordinator and the process
    launcher need it)."""
    env = os.environ.get("AUTOSAM_CACHE")
    return Path(env) if env else Path(__file__).resolve().parents[2] / ".cache" / "embeddings"


def list_splits(dataset_dir: str | os.PathLike) -> list[str]:
    """Names of the split files in ``<dataset_dir>/splits`` (``*.txt`` without the suffix), sorted.

    Returns an empty list when the ``splits`` folder does not exist. Source: docs/DESIGN.md section 6.
    """
    splits_dir = Path(dataset_dir) / "splits"
    if not splits_dir.is_dir():
        return []
    return sorted(p.stem for p in splits_dir.glob("*.txt") if p.is_file())


def read_split(dataset_dir: str | os.PathLike, split: str) -> list[str]:
    """Read the stems listed in ``<dataset_dir>/splits/<split>.txt``.

    Source: docs/DESIGN.md section 6 (one stem per line). Surrounding whitespace is stripped; blank
    lines and lines starting with ``#`` are ignored. ``split`` may be given with or without the
    ``.txt`` suffix.

    Args:
        dataset_dir: dataset folder (the one holding ``images/``, ``masks/``, ``splits/``).
        split: split name, e.g. ``"pranet_test"``.

    Returns:
        list of stems (str) in file order.

    Raises:
        SplitNotFoundError (a ``FileNotFoundError``): the split file is missing; the message names
            the file and lists the available splits.
        ValueError: the file lists a stem more than once (names the file and the stems).
    """
    name = split[:-4] if split.endswith(".txt") else split
    path = Path(dataset_dir) / "splits" / f"{name}.txt"
    if not path.is_file():
        available = list_splits(dataset_dir)
        listing = ", ".join(available) if available else "none"
        raise SplitNotFoundError(
            f"split file not found: {path} (split {split!r}); available splits: {listing}"
        )
    stems: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        stem = line.strip()
        if stem and not stem.startswith("#"):
            stems.append(stem)
    seen: set[str] = set()
    duplicates = sorted({s for s in stems if s in seen or seen.add(s)})
    if duplicates:
        raise ValueError(
            f"{path}: stems listed more than once: {', '.join(duplicates[:10])}"
            f"{' ...' if len(duplicates) > 10 else ''}; expected each stem once"
        )
    return stems


def _natural_key(stem: str) -> list[Any]:
    """Sort key ordering '2' before '10'."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", stem)]


@dataclass(frozen=True)
class Pair:
    """One image/mask pair sharing a file stem (docs/DESIGN.md sections 1 and 6).

    Attributes:
        stem: file name without extension, e.g. ``"cju0qkwl35piu0993l0dewei2"``.
        image_path: path of the image file.
        mask_path: path of the mask file (same (H, W) as the image, checked from headers).
    """

    stem: str
    image_path: Path
    mask_path: Path


def _fmt_size(hw: tuple[int, int]) -> str:
    return f"{hw[0]}x{hw[1]}"


def _fmt_names(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_MAX_NAMES_IN_SUMMARY])
    return shown + (", ..." if len(names) > _MAX_NAMES_IN_SUMMARY else "")


@dataclass
class PairingReport:
    """Outcome of :func:`pair_by_stem`: the usable pairs and every skipped file, by reason.

    Source: docs/ARCHITECTURE.md ("autosam_core.data"); docs/DESIGN.md section 1 (pair by stem).

    Attributes:
        pairs: usable pairs, in split order when stems were given, else in natural stem order.
        missing_masks: stems that have an image but no mask.
        orphan_masks: stems that have a mask but no image. Only filled when the whole folder is
            paired (``stems=None``); with a split, such stems are in ``missing_from_split``.
        size_mismatch: ``(stem, image (H, W), mask (H, W))`` for pairs rejected because the sizes
            differ (never padded or resized).
        missing_from_split: stems listed in the split that have no image file.
        ambiguous_images: ``(stem, [paths])`` for stems with several image files (e.g. ``a.jpg``
            and ``a.png``); rejected since the right one cannot be known.
        unreadable: ``(stem, path, error)`` for files whose header could not be read.
        images_dir, masks_dir: the folders that were paired.
    """

    pairs: list[Pair] = field(default_factory=list)
    missing_masks: list[str] = field(default_factory=list)
    orphan_masks: list[str] = field(default_factory=list)
    size_mismatch: list[tuple[str, tuple[int, int], tuple[int, int]]] = field(default_factory=list)
    missing_from_split: list[str] = field(default_factory=list)
    ambiguous_images: list[tuple[str, list[Path]]] = field(default_factory=list)
    unreadable: list[tuple[str, Path, str]] = field(default_factory=list)
    images_dir: Path | None = None
    masks_dir: Path | None = None

    @property
    def num_used(self) -> int:
        """Number of usable pairs."""
        return len(self.pairs)

    @property
    def num_skipped(self) -> int:
        """Number of skipped items over all reasons."""
        return (
            len(self.missing_masks)
            + len(self.orphan_masks)
            + len(self.size_mismatch)
            + len(self.missing_from_split)
            + len(self.ambiguous_images)
            + len(self.unreadable)
        )

    @property
    def stems(self) -> list[str]:
        """Stems of the usable pairs, in order."""
        return [p.stem for p in self.pairs]

    def summary(self) -> str:
        """One line counting used and skipped pairs by reason, naming the first few of each.

        Example: ``"1 pair used, 4 skipped: 1 missing mask (c); 1 orphan mask (d); 1 size mismatch
        (a: image HxW 389x517 vs mask HxW 389x516)"``.
        """
        used = f"{self.num_used} pair{'s' if self.num_used != 1 else ''} used"
        if self.num_skipped == 0:
            return f"{used}, 0 skipped"
        parts: list[str] = []
        if self.missing_masks:
            parts.append(f"{len(self.missing_masks)} missing mask ({_fmt_names(self.missing_masks)})")
        if self.orphan_masks:
            parts.append(f"{len(self.orphan_masks)} orphan mask ({_fmt_names(self.orphan_masks)})")
        if self.size_mismatch:
            items = [
                f"{stem}: image HxW {_fmt_size(ih)} vs mask HxW {_fmt_size(mh)}"
                for stem, ih, mh in self.size_mismatch
            ]
            parts.append(f"{len(items)} size mismatch ({_fmt_names(items)})")
        if self.missing_from_split:
            parts.append(
                f"{len(self.missing_from_split)} missing from split "
                f"({_fmt_names(self.missing_from_split)})"
            )
        if self.ambiguous_images:
            items = [
                f"{stem}: {' / '.join(p.name for p in paths)}" for stem, paths in self.ambiguous_images
            ]
            parts.append(f"{len(items)} ambiguous image ({_fmt_names(items)})")
        if self.unreadable:
            items = [f"{p.name}: {err}" for _, p, err in self.unreadable]
            parts.append(f"{len(items)} unreadable ({_fmt_names(items)})")
        return f"{used}, {self.num_skipped} skipped: " + "; ".join(parts)


def _index_dir(folder: Path, extensions: Sequence[str]) -> dict[str, list[Path]]:
    """Map stem -> files in ``folder`` with one of ``extensions`` (case-insensitive, hidden files skipped)."""
    index: dict[str, list[Path]] = {}
    exts = set(extensions)
    for entry in folder.iterdir():
        if entry.name.startswith(".") or entry.suffix.lower() not in exts or not entry.is_file():
            continue
        index.setdefault(entry.stem, []).append(entry)
    return index


def _pick_mask(paths: list[Path]) -> Path:
    """Choose the preferred mask file among several with the same stem (``.png`` first)."""
    return min(paths, key=lambda p: (MASK_EXTENSIONS.index(p.suffix.lower()), p.name))


def pair_by_stem(
    images_dir: str | os.PathLike,
    masks_dir: str | os.PathLike,
    stems: Iterable[str] | None = None,
) -> PairingReport:
    """Pair image and mask files by stem and check their sizes from the headers.

    Source: docs/ARCHITECTURE.md ("autosam_core.data"); docs/DESIGN.md sections 1 and 6.

    Image extensions: .jpg .jpeg .png .tif .tiff .bmp (case-insensitive); masks the same, and when a
    stem has several mask files the ``.png`` one is preferred (then .tif, .tiff, .bmp, .jpg, .jpeg).
    Pairs whose image and mask (H, W) differ are rejected and listed with both sizes.

    Args:
        images_dir: folder of image files.
        masks_dir: folder of mask files.
        stems: optional stems to keep (e.g. from :func:`read_split`); pairs follow this order and
            stems without an image are reported in ``missing_from_split``. Without it, every image
            is considered, in natural stem order.

    Returns:
        :class:`PairingReport` (``pairs`` plus the skipped items by reason).

    Raises:
        FileNotFoundError: ``images_dir`` or ``masks_dir`` is not a directory.
        ValueError: ``stems`` is a plain string (a single split name was probably meant).
    """
    images_dir = Path(images_dir)
    masks_dir = Path(masks_dir)
    for kind, folder in (("images", images_dir), ("masks", masks_dir)):
        if not folder.is_dir():
            raise FileNotFoundError(f"{kind} directory not found: {folder}")
    if isinstance(stems, str):
        raise ValueError(
            f"stems must be an iterable of stems, got the string {stems!r}; "
            "use read_split(dataset_dir, split) to read a split file"
        )

    images = _index_dir(images_dir, IMAGE_EXTENSIONS)
    masks = _index_dir(masks_dir, MASK_EXTENSIONS)
    report = PairingReport(images_dir=images_dir, masks_dir=masks_dir)

    if stems is None:
        wanted = sorted(images, key=_natural_key)
    else:
        wanted = list(dict.fromkeys(stems))  # keeps order, drops repeats

    for stem in wanted:
        image_files = images.get(stem)
        if not image_files:
            report.missing_from_split.append(stem)
            continue
        if len(image_files) > 1:
            report.ambiguous_images.append((stem, sorted(image_files)))
            continue
        mask_files = masks.get(stem)
        if not mask_files:
            report.missing_masks.append(stem)
            continue
        image_path = image_files[0]
        mask_path = _pick_mask(mask_files)
        sizes = []
        for path in (image_path, mask_path):
            try:
                sizes.append(image_size(path))
            except (ImageFormatError, OSError) as exc:
                report.unreadable.append((stem, path, str(exc)))
                break
        if len(sizes) < 2:
            continue
        if sizes[0] != sizes[1]:
            report.size_mismatch.append((stem, sizes[0], sizes[1]))
            continue
        report.pairs.append(Pair(stem=stem, image_path=image_path, mask_path=mask_path))

    # With a split, a listed stem whose mask exists but image does not is already in
    # missing_from_split, and masks outside the split are not candidates: orphans are only
    # reported when pairing the whole folder.
    if stems is None:
        report.orphan_masks = sorted(set(masks) - set(images), key=_natural_key)
    return report


# (path, size, mtime_ns) -> None (decodes) or the reason it does not; an edited file is checked again.
_VERIFIED: dict[tuple[str, int, int], str | None] = {}


def _decode_problem(path: Path, loader: Callable[[Path], Any]) -> str | None:
    try:
        st = path.stat()
    except OSError as exc:
        return f"cannot stat: {exc}"
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _VERIFIED:
        try:
            loader(path)
            _VERIFIED[key] = None
        except (ImageFormatError, OSError, ValueError, SyntaxError) as exc:
            _VERIFIED[key] = str(exc) or type(exc).__name__
    return _VERIFIED[key]


def verify_pixels(report: PairingReport, pairs: Sequence[Pair] | None = None) -> PairingReport:
    """Decode every image and mask in full, before any training or encoding reads them.

    :func:`pair_by_stem` reads only headers, so a truncated PNG or a corrupt JPEG passes pairing
    and used to fail hours later at the embedding step. Each file that does not decode (with
    :func:`load_image` / :func:`load_mask`) moves its pair from ``pairs`` to ``report.unreadable``
    with the reason. Results are memoised per (path, size, mtime_ns), so an unchanged dataset is
    checked once per process. Masks' :class:`~autosam_core.data.io.MaskValuesWarning` are issued
    here, up front.

    Args:
        report: the pairing report to update in place.
        pairs: the pairs to check (default ``report.pairs``, e.g. after a ``limit`` was applied);
            ``report.pairs`` becomes the readable ones among them, in order.

    Returns:
        ``report`` (updated).
    """
    good: list[Pair] = []
    for pair in report.pairs if pairs is None else pairs:
        for path, loader in ((pair.image_path, load_image), (pair.mask_path, load_mask)):
            reason = _decode_problem(path, loader)
            if reason is not None:
                report.unreadable.append((pair.stem, path, reason))
                break
        else:
            good.append(pair)
    report.pairs = good
    return report


def resolve_dataset_dir(ref: DataRef, base_dir: Path | None = None) -> Path:
    """Folder of ``ref.dataset``: absolute, relative to ``base_dir`` if it exists there, else under
    the data root (``$AUTOSAM_DATA`` or ``../shared/data``).

    Raises:
        ConfigError: the folder does not exist or lacks images/ and masks/ (names the places tried and,
            for a relative name, the closest dataset names found beside them: ``Kvasr-SEG`` ->
            ``Kvasir-SEG``).
    """
    import difflib

    from ..config import ConfigError

    p = Path(ref.dataset)
    candidates = [p] if p.is_absolute() else ([base_dir / p] if base_dir else []) + [data_root() / p]
    for c in candidates:
        if (c / "images").is_dir() and (c / "masks").is_dir():
            return c
    hint = ""
    if not p.is_absolute() and len(p.parts) == 1:
        names = sorted({d.name for c in candidates if c.parent.is_dir() for d in c.parent.iterdir()
                        if (d / "images").is_dir() and (d / "masks").is_dir()})
        close = difflib.get_close_matches(p.name, names, n=3, cutoff=0.6)
        if close:
            hint = f"; did you mean {' or '.join(map(repr, close))}?"
    raise ConfigError(
        f"dataset {ref.dataset!r}: no folder with images/ and masks/ at {', '.join(map(str, candidates))}{hint}; "
        "fix the 'dataset' key or set AUTOSAM_DATA to the data root")


def resolve_pairs(ref: DataRef, base_dir: Path | None = None, unreadable: str = "skip") -> list[Pair]:
    """Image/mask pairs of one :class:`DataRef` (split, then the first ``limit`` stems).

    Every selected image and mask is decoded in full first
    (:func:`autosam_core.data.dataset.verify_pixels`), so an unreadable file is found before any
    model is built or image encoded. Skipped pairs (missing mask, size mismatch, unreadable, ...)
    are logged by reason, never dropped silently.

    Args:
        unreadable: ``"skip"`` (evaluation: leave unreadable pairs out, logged and counted) or
            ``"error"`` (training: stop at once listing every bad file, its reason and how to
            exclude it).

    Raises:
        ConfigError: missing folder or split file, zero usable pairs, or (``unreadable="error"``)
        any image/mask that cannot be read.
    """
    return resolve_data(ref, base_dir, unreadable).pairs


def resolve_data(ref: DataRef, base_dir: Path | None = None, unreadable: str = "skip") -> PairingReport:
    """Like :func:`resolve_pairs`, returning the whole :class:`PairingReport` (pairs and skips by reason)."""
    from ..config import ConfigError

    if unreadable not in ("skip", "error"):
        raise ValueError(f"unreadable must be 'skip' or 'error', found {unreadable!r}")
    d = resolve_dataset_dir(ref, base_dir)
    if ref.split and ref.stems_file:
        raise ConfigError(f"dataset {ref.dataset!r}: give either 'split' or 'stems_file', not both")
    stems = read_split(d, ref.split) if ref.split else None
    if ref.stems_file:
        f = Path(ref.stems_file)
        f = f if f.is_absolute() or base_dir is None else base_dir / f
        if not f.is_file():
            raise ConfigError(f"stems_file {f} not found (one image stem per line)")
        stems = [line.strip() for line in f.read_text().splitlines() if line.strip()]
    if stems is not None and ref.limit:
        stems = stems[: ref.limit]
    report = pair_by_stem(d / "images", d / "masks", stems=stems)
    header_unreadable = len(report.unreadable)
    verify_pixels(report, report.pairs[: ref.limit] if stems is None and ref.limit else None)
    if unreadable == "error" and report.unreadable:
        lines = "\n".join(f"  {path}: {why}" for _, path, why in report.unreadable)
        raise ConfigError(
            f"dataset {d}{f' split {ref.split!r}' if ref.split else ''}: {len(report.unreadable)} unreadable "
            f"image/mask file(s); nothing was trained or encoded:\n{lines}\n"
            "re-export or remove these files, or exclude their stems: list the stems to use in "
            "'stems_file' (or a split file under splits/ named by 'split')")
    if report.num_skipped:
        log.warning("%s: %s", ref.label, report.summary())
    if len(report.unreadable) > header_unreadable:
        log.warning("%s: %d unreadable image/mask pairs skipped", ref.label, len(report.unreadable))
    if not report.pairs:
        raise ConfigError(f"dataset {d} split {ref.split!r}: no usable image/mask pairs ({report.summary()})")
    return report


def split_validation(pairs: Sequence[Pair], fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """Hold out ``round(fraction * N)`` pairs (seeded shuffle) as a validation split: (train, val)."""
    n_val = int(round(fraction * len(pairs)))
    if n_val == 0:
        return list(pairs), []
    idx = list(range(len(pairs)))
    random.Random(seed).shuffle(idx)
    val = set(idx[:n_val])
    return [p for i, p in enumerate(pairs) if i not in val], [p for i, p in enumerate(pairs) if i in val]


def resolve_ref(ref: "DataRef", base_dir: Path | None, where: str, key: str, unreadable: str = "skip") -> list[Pair]:
    """Image/mask pairs of ``ref``, with errors naming ``where`` (a file) and ``key``.

    ``unreadable``: ``"error"`` for training data (an image or mask that does not decode stops the
    run before it starts), ``"skip"`` for evaluation data (see :func:`resolve_pairs`).

    Raises:
        ConfigError: dataset folder missing (key ``<key>.dataset``), split file missing
        (``<key>.split``) or no usable pair (``<key>``).
    """
    from ..config import ConfigError

    try:
        resolve_dataset_dir(ref, base_dir)
    except ConfigError as err:
        raise ConfigError(f"{where}: key '{key}.dataset': {err}") from None
    try:
        return resolve_pairs(ref, base_dir, unreadable=unreadable)
    except FileNotFoundError as err:
        raise ConfigError(f"{where}: key '{key}.split': {err}; fix the split name or remove it") from None
    except ValueError as err:
        raise ConfigError(f"{where}: key '{key}': {err}; point it at a split with image/mask pairs") from None
