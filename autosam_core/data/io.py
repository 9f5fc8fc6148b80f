"""Image and mask file reading for AutoSAM-FL.

Contracts (docs/ARCHITECTURE.md, "autosam_core.data"; docs/DESIGN.md section 6):

* images entering the pipeline are ``numpy.uint8`` arrays of shape (H, W, 3), RGB;
* masks are ``numpy.uint8`` arrays of shape (H, W) with values in {0, 1};
* 0-255 masks (including JPEG masks with compression noise) are binarised at ``>= 128``
  (docs/DESIGN.md section 1: the public AutoSAM code thresholded JPEG masks at ``> 0``, which turns
  compression noise into foreground);
* any other mask (a label map holding 0, 1, 2, ..., a soft mask) is never silently emptied: it is
  read by the rule in :func:`load_mask` with a :class:`MaskValuesWarning` naming the file and the
  values found.

Pixels are returned as stored: EXIF orientation tags are deliberately ignored so that an image and
its mask (which rarely carries EXIF) stay aligned.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "ImageFormatError",
    "AlphaChannelDroppedWarning",
    "MaskValuesWarning",
    "load_image",
    "load_mask",
    "image_size",
]

PathLike = str | os.PathLike


class ImageFormatError(ValueError):
    """A file that cannot be turned into a pipeline image or mask.

    Raised for unreadable files and for pixel formats without a safe meaning here: floating point
    images, 2-channel (gray + alpha) images, negative or ambiguous wide-integer masks. The message
    names the file, the dtype and the shape that were found, and what was expected.
    """


class AlphaChannelDroppedWarning(UserWarning):
    """Warning issued by :func:`load_image` when an alpha channel is discarded."""


class MaskValuesWarning(UserWarning):
    """Warning issued by :func:`load_mask` for a mask that is not 0/255, 0/1 or a JPEG-smeared 0/255.

    The message names the file, the values found and the rule applied (nonzero = foreground for
    a label map whose values are all below 128; ``>= 128`` otherwise).
    """


# Fraction of pixels of an 8-bit mask allowed strictly between 32 and 223 for it to count as a
# JPEG-smeared 0/255 mask (compression noise and soft edges; measured: 0 % in every shared dataset).
_SMEAR_BAND = (32, 223)
_SMEAR_MAX_FRACTION = 0.05

# Pillow modes holding integers wider than 8 bits.
_WIDE_INT_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}
_EXPECTED_IMAGE = "expected 8/16-bit grayscale, RGB or RGBA"


def _open(path: Path, kind: str) -> Image.Image:
    """Open ``path`` lazily with Pillow, turning failures into clear errors."""
    if not path.is_file():
        raise FileNotFoundError(f"{kind} file not found: {path}")
    try:
        return Image.open(path)
    except UnidentifiedImageError as exc:
        raise ImageFormatError(f"{path}: not a readable {kind} file ({exc})") from exc


def _load_pixels(im: Image.Image, path: Path, kind: str) -> np.ndarray:
    """Decode all pixels of an opened Pillow image into a writable numpy array."""
    try:
        return np.array(im)
    except (OSError, ValueError, SyntaxError) as exc:  # truncated / corrupt data
        raise ImageFormatError(f"{path}: cannot decode {kind} pixels ({exc})") from exc


def _is_16bit_color(im: Image.Image) -> bool:
    """True when an RGB/RGBA file stores 16 bits per channel.

    Pillow has no 16-bit colour mode and silently keeps only the high byte of such files; the
    decoder's raw mode (e.g. ``"RGB;16B"`` for PNG, ``"RGB;16N"`` for TIFF) still tells us.
    """
    if im.mode not in ("RGB", "RGBA"):
        return False
    for tile in getattr(im, "tile", None) or []:
        args = getattr(tile, "args", None)
        if args is None and isinstance(tile, tuple) and len(tile) > 3:
            args = tile[3]
        raw = args[0] if isinstance(args, tuple) and args else args
        if isinstance(raw, str) and ";16" in raw:
            return True
    return False


def _read_16bit_color(path: Path) -> np.ndarray:
    """Read a 16-bit-per-channel colour file at full depth with OpenCV; returns RGB(A) order."""
    import cv2  # local import: only needed for this rare format

    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.ndim != 3 or arr.shape[2] not in (3, 4):
        shape = None if arr is None else arr.shape
        raise ImageFormatError(
            f"{path}: 16-bit colour file could not be read at full depth (OpenCV gave {shape}); "
            f"{_EXPECTED_IMAGE}"
        )
    order = [2, 1, 0] if arr.shape[2] == 3 else [2, 1, 0, 3]
    return np.ascontiguousarray(arr[..., order])


def _rescale_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Map an integer array linearly from its own [min, max] to [0, 255] uint8.

    All channels share one range (colour balance is kept). A constant array maps to zeros.
    """
    a = arr.astype(np.float64)
    lo = float(a.min())
    hi = float(a.max())
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    return np.rint((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _drop_alpha(rgba: np.ndarray, path: Path, mode: str) -> np.ndarray:
    warnings.warn(
        f"{path}: alpha channel dropped (mode {mode}); RGB values kept as stored",
        AlphaChannelDroppedWarning,
        stacklevel=3,
    )
    return np.ascontiguousarray(rgba[..., :3])


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))


def load_image(path: PathLike) -> np.ndarray:
    """Load an image file as an RGB ``uint8`` array of shape (H, W, 3).

    Contract: docs/ARCHITECTURE.md ("Images entering the pipeline"); docs/DESIGN.md section 6.

    Conversions:

    * 8-bit RGB: returned as stored.
    * 8-bit grayscale (Pillow modes ``L``, ``1``): replicated to 3 identical channels.
    * Palette (``P``, ``PA``): expanded to RGB through the palette.
    * RGBA / palette with transparency: the alpha channel is dropped (RGB kept as stored, never
      composited) and exactly one :class:`AlphaChannelDroppedWarning` naming the file is issued.
    * 16-bit (and 32-bit integer) grayscale, and 16-bit-per-channel colour: rescaled linearly by
      the image's own range, min..max -> 0..255 (one range shared by all channels); a constant
      image maps to zeros. The full bit depth is read (Pillow modes ``I;16``/``I``; 16-bit colour,
      which Pillow truncates to 8 bits, is read with OpenCV).
    * CMYK / YCbCr: converted to RGB by Pillow.

    Args:
        path: file path (PNG, JPEG, TIFF, BMP or anything else Pillow opens).

    Returns:
        ``numpy.uint8`` array, shape (H, W, 3), C-contiguous and writable, values 0..255.

    Raises:
        FileNotFoundError: the file does not exist.
        ImageFormatError (a ``ValueError``): unreadable file, floating point pixels (mode ``F``),
            2-channel gray + alpha (``LA``/``La``/``I;16`` + alpha) or any other unsupported mode;
            the message names the file, dtype and shape.
    """
    path = Path(path)
    with _open(path, "image") as im:
        mode = im.mode
        if _is_16bit_color(im):
            rgb = _rescale_to_uint8(_read_16bit_color(path))
            return _drop_alpha(rgb, path, mode + " 16-bit") if rgb.shape[2] == 4 else rgb
        if mode == "RGB":
            return _load_pixels(im, path, "image")
        if mode == "RGBA":
            return _drop_alpha(_load_pixels(im, path, "image"), path, mode)
        if mode == "L":
            return _gray_to_rgb(_load_pixels(im, path, "image"))
        if mode == "1":
            return _gray_to_rgb(_load_pixels(im.convert("L"), path, "image"))
        if mode in ("P", "PA"):
            if mode == "PA" or "transparency" in im.info:
                return _drop_alpha(_load_pixels(im.convert("RGBA"), path, "image"), path, mode)
            return _load_pixels(im.convert("RGB"), path, "image")
        if mode in ("CMYK", "YCbCr"):
            return _load_pixels(im.convert("RGB"), path, "image")
        if mode in _WIDE_INT_MODES:
            arr = _load_pixels(im, path, "image")
            if arr.ndim == 2 and np.issubdtype(arr.dtype, np.integer):
                return _gray_to_rgb(_rescale_to_uint8(arr))
        else:
            arr = _load_pixels(im, path, "image")
    raise ImageFormatError(
        f"{path}: unsupported image: dtype {arr.dtype}, shape {tuple(arr.shape)} "
        f"(Pillow mode {mode!r}); {_EXPECTED_IMAGE}"
    )


def load_mask(path: PathLike) -> np.ndarray:
    """Load a binary segmentation mask as ``uint8`` (H, W) with values in {0, 1}.

    Contract: docs/ARCHITECTURE.md ("Masks"); docs/DESIGN.md sections 1 and 6 (masks are 0/255 PNG,
    binarise 0-255 masks at ``>= 128``).

    Rules, applied in order:

    * multi-channel masks (RGB, RGBA, LA) take the first channel; palette (``P``) masks use the
      palette indices, not the colours (index 0 = background);
    * a mask whose values are all in {0, 1} is kept as is (so a 0/1 PNG stays non-empty);
    * a mask whose values are all in {0, 255}, or a JPEG-smeared 0/255 mask (at most 5 % of its
      pixels strictly between 32 and 223), is binarised at ``value >= 128``, silently;
    * any other mask whose maximum is below 128 (a label map holding 0, 1, 2, ...) is read as
      ``value != 0`` = foreground, with a :class:`MaskValuesWarning` naming the file and the
      values: never silently emptied;
    * any other 8-bit-range mask (maximum 128..255, e.g. {0, 100, 200} or a soft mask) is
      binarised at ``value >= 128``, with a :class:`MaskValuesWarning` naming the file, the
      values and how many nonzero pixels fell below 128;
    * a wider-integer mask (16/32-bit) with maximum > 255 is accepted only when it holds exactly
      two values {0, v} (foreground = v); anything else (e.g. an instance label image) is
      ambiguous and rejected.

    Args:
        path: mask file path (any format Pillow opens; PNG preferred).

    Returns:
        ``numpy.uint8`` array, shape (H, W), values in {0, 1}.

    Warns:
        MaskValuesWarning: the mask is not 0/255, 0/1 or a JPEG-smeared 0/255 (rules above).

    Raises:
        FileNotFoundError: the file does not exist.
        ImageFormatError (a ``ValueError``): unreadable file, floating point mask, negative values,
            or an ambiguous wide-integer mask; the message names the file, dtype and shape.
    """
    path = Path(path)
    with _open(path, "mask") as im:
        mode = im.mode
        arr = _load_pixels(im, path, "mask")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if arr.ndim == 3:
        arr = arr[..., 0]
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise ImageFormatError(
            f"{path}: unsupported mask: dtype {arr.dtype}, shape {tuple(arr.shape)} "
            f"(Pillow mode {mode!r}); expected an integer (H, W) mask, 0/255 or 0/1"
        )
    if arr.size == 0:
        return np.zeros(arr.shape, dtype=np.uint8)
    lo = int(arr.min())
    hi = int(arr.max())
    if lo < 0:
        raise ImageFormatError(
            f"{path}: mask has negative values (min {lo}): dtype {arr.dtype}, "
            f"shape {tuple(arr.shape)}; expected 0/255 or 0/1"
        )
    if hi <= 1:
        return np.ascontiguousarray(arr, dtype=np.uint8)
    if hi <= 255:
        return _binarise_8bit(arr, path)
    values = np.unique(arr)
    if values.size == 2 and values[0] == 0:
        return (arr == values[1]).astype(np.uint8)
    shown = ", ".join(str(v) for v in values[:6]) + (", ..." if values.size > 6 else "")
    raise ImageFormatError(
        f"{path}: ambiguous wide-integer mask: dtype {arr.dtype}, shape {tuple(arr.shape)}, "
        f"{values.size} distinct values ({shown}); expected a binary mask (0/255 8-bit PNG)"
    )


def _shown_values(arr: np.ndarray, limit: int = 8) -> str:
    values = np.unique(arr)
    shown = ", ".join(str(int(v)) for v in values[:limit]) + (", ..." if values.size > limit else "")
    return f"{{{shown}}} ({values.size} distinct)"


def _binarise_8bit(arr: np.ndarray, path: Path) -> np.ndarray:
    """Binarise a mask with values in [0, 255] whose maximum is >= 2 (rules in :func:`load_mask`)."""
    hi = int(arr.max())
    foreground = arr >= 128
    if hi < 128:  # a label map: thresholding at 128 would empty it
        foreground = arr != 0
        warnings.warn(
            f"{path}: mask values {_shown_values(arr)} are not 0/255, 0/1 or a JPEG-smeared 0/255; read as "
            f"nonzero = foreground ({int(foreground.sum())} of {arr.size} pixels); save it as a 0/255 PNG to "
            "silence this",
            MaskValuesWarning,
            stacklevel=3,
        )
        return foreground.astype(np.uint8)
    lo_band, hi_band = _SMEAR_BAND
    middle = float(((arr > lo_band) & (arr < hi_band)).mean())
    if middle > _SMEAR_MAX_FRACTION:
        dropped = int(((arr != 0) & ~foreground).sum())
        warnings.warn(
            f"{path}: mask values {_shown_values(arr)} are not 0/255, 0/1 or a JPEG-smeared 0/255 "
            f"({100 * middle:.1f} % of pixels between {lo_band + 1} and {hi_band - 1}); read as foreground = "
            f"value >= 128 ({int(foreground.sum())} pixels; {dropped} nonzero pixels below 128 counted as "
            "background)",
            MaskValuesWarning,
            stacklevel=3,
        )
    return foreground.astype(np.uint8)


def image_size(path: PathLike) -> tuple[int, int]:
    """Return (H, W) of an image or mask file, reading only its header (no pixel decoding).

    Used by :func:`autosam_core.data.dataset.pair_by_stem` to reject image/mask size mismatches
    cheaply (docs/ARCHITECTURE.md, "autosam_core.data").

    Args:
        path: file path of any format Pillow opens.

    Returns:
        ``(height, width)`` as Python ints.

    Raises:
        FileNotFoundError: the file does not exist.
        ImageFormatError (a ``ValueError``): Pillow cannot identify the file.
    """
    path = Path(path)
    with _open(path, "image") as im:
        width, height = im.size
    return int(height), int(width)
