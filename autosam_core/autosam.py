"""AutoSAM: a frozen SAM prompted by the trained prompt generator g (paper section 3, Fig. 2).

    low_res_logits = D_s(E_s(I), dense_prompt_embeddings = g(I), sparse = empty)

Only g (``prompt_generator``) and the optional surrogate decoder h (``surrogate_decoder``) are
trainable; they are the *trainable state* that a site sends to the server. SAM never travels.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data.cache import mirror
from .prompt_generator import IMAGENET_MEAN, IMAGENET_STD
from .sam import FrozenSam, resize_and_pad, resized_shape
from .trainable_state import FOREIGN, MISSING, UNEXPECTED, is_trainable_key, state_mismatches

# Inference refinement: "box" = SAM prompted with the box of each component of the first mask plus
# g's dense prompt; "box_only" = the same boxes with SAM's own no-mask dense embedding.
REFINE_MODES = ("none", "box", "box_only")
# Test-time augmentation of the first pass: "hflip" = the mean of the low_res_logits of the image and
# of its left-right mirror (its own SAM image_embeddings, mapped back), before any refinement.
TTA_MODES = ("none", "hflip")


def mirror_low_res(low_res_logits: torch.Tensor, valid: list[tuple[int, int]] | None = None) -> torch.Tensor:
    """Mirror low_res_logits (B, C, L, L) left-right inside each image's content region.

    SAM's input is the image resized (longest side) and padded bottom/right, so the low-res frame of a
    mirrored image holds the same content region (h, w) at the top left, columns reversed. This maps
    one onto the other (it is its own inverse); the padding (columns >= w) is left as it is.

    Args:
        low_res_logits: (B, C, L, L) any float dtype.
        valid: per-image (h, w) content region in the L x L frame (``resized_shape``); None: the whole
            frame (a square image).

    Returns:
        a new tensor of the same shape and dtype.

    Raises:
        ValueError: ``valid`` does not have one entry per image.
    """
    if valid is None:
        return low_res_logits.flip(-1)
    if len(valid) != low_res_logits.shape[0]:
        raise ValueError(f"valid has {len(valid)} regions for {low_res_logits.shape[0]} images")
    out = low_res_logits.clone()
    for i, (_, w) in enumerate(valid):
        out[i, :, :, :w] = low_res_logits[i, :, :, :w].flip(-1)
    return out


class StateMismatchError(ValueError):
    """A trainable state does not fit the model (missing/unexpected key or a different shape)."""


class AutoSam(nn.Module):
    """Frozen SAM + prompt generator g (+ optional surrogate decoder h).

    Args:
        sam: a :class:`FrozenSam`.
        prompt_generator: module mapping ImageNet-normalised images (B, 3, G, G) to
            dense_prompt_embeddings (B, 256, 64, 64) in [-1, 1].
        surrogate_decoder: optional module mapping (B, 256, 64, 64) to mask logits (B, 1, 256, 256).
        g_input_size: side G (pixels) of g's square input; the image is resized (longest side) and
            padded bottom/right exactly like SAM's input so g's output grid aligns with SAM's.
        refine, refine_*: inference refinement (:data:`REFINE_MODES`, :meth:`refine_low_res`).
        tta: test-time augmentation of the first pass (:data:`TTA_MODES`, :meth:`predict_low_res`);
            "hflip" needs the mirrored image's embeddings at inference (``mirrored_embeddings``).

    Raises:
        ValueError: unknown ``refine`` or ``tta``.
    """

    def __init__(self, sam: FrozenSam, prompt_generator: nn.Module, surrogate_decoder: nn.Module | None = None,
                 g_input_size: int = 256, refine: str = "none", refine_min_fraction: float = 0.1,
                 refine_margin: float = 0.0, refine_iterations: int = 1, refine_max_boxes: int = 8,
                 tta: str = "none"):
        super().__init__()
        if refine not in REFINE_MODES:
            raise ValueError(f"refine must be one of {', '.join(REFINE_MODES)}, found {refine!r}")
        if tta not in TTA_MODES:
            raise ValueError(f"tta must be one of {', '.join(TTA_MODES)}, found {tta!r}")
        self.tta = tta
        self.sam = sam
        self.prompt_generator = prompt_generator
        self.surrogate_decoder = surrogate_decoder
        self.g_input_size = g_input_size
        self.refine = refine
        self.refine_min_fraction, self.refine_margin = float(refine_min_fraction), float(refine_margin)
        self.refine_iterations, self.refine_max_boxes = int(refine_iterations), int(refine_max_boxes)

    @property
    def reads_images(self) -> bool:
        """Whether g reads the image (False for a g that reads only SAM's image_embeddings)."""
        return getattr(self.prompt_generator, "reads_images", True)

    @property
    def channels_last(self) -> bool:
        """Whether g computes in channels_last memory format (:meth:`set_channels_last`)."""
        return getattr(self, "_channels_last", False)

    def set_channels_last(self, enabled: bool) -> None:
        """Put g's weights, and its inputs in :meth:`dense_prompt`, in channels_last (NHWC) memory format
        or back to contiguous. Same values; on the Sapphire Rapids CPU (AVX-512) oneDNN's convolutions
        are faster in NHWC (sam_head g forward + backward, batch 4: 1.6x in bf16, 1.2x in fp32, issue 9),
        on an AVX2-only CPU slower; :func:`autosam_core.precision.prefers_channels_last` picks the
        layout site training uses. Exported state (:meth:`trainable_state`) is always contiguous."""
        self._channels_last = bool(enabled)
        self.prompt_generator.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)

    def dense_prompt(self, image_embeddings: torch.Tensor | None, g_inputs: torch.Tensor | None) -> torch.Tensor:
        """g(I): dense_prompt_embeddings float32 (B, 256, 64, 64) from g's inputs (B, 3, G, G) and,
        for a g that fuses them, SAM's image_embeddings (B, 256, 64, 64); both on SAM's device."""
        device = self.sam.device
        fmt = torch.channels_last if self.channels_last else torch.preserve_format
        g_inputs = None if g_inputs is None else g_inputs.to(device, memory_format=fmt)
        if getattr(self.prompt_generator, "fuse_embeddings", False):
            return self.prompt_generator(g_inputs, image_embeddings.to(device, memory_format=fmt))
        return self.prompt_generator(g_inputs)

    # ----- inputs -------------------------------------------------------------------------------
    def g_input(self, image: np.ndarray) -> torch.Tensor:
        """uint8 RGB (H, W, 3) -> g's input float32 (3, G, G): longest side G, ImageNet-normalised, padded."""
        return resize_and_pad(image, self.g_input_size, IMAGENET_MEAN, IMAGENET_STD)[0]

    def low_res_target(self, mask: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """Binary mask (H, W) -> (target float32 (1, 256, 256) in {0, 1}, valid (h, w) region).

        The mask is resized (nearest) into the low-res frame of SAM's padded input: its longest side
        becomes 256 pixels, the rest is padding (background, excluded from the loss).
        """
        lh, lw = self.sam.spec.low_res_size
        h, w = resized_shape(mask.shape[:2], lh)
        m = torch.from_numpy(np.ascontiguousarray(mask > 0)).float()[None, None]
        m = F.interpolate(m, size=(h, w), mode="nearest")[0]
        return F.pad(m, (0, lw - w, 0, lh - h)), (h, w)

    # ----- forward ------------------------------------------------------------------------------
    def forward(self, image_embeddings: torch.Tensor, g_inputs: torch.Tensor) -> torch.Tensor:
        """AutoSAM forward (paper Eq. 1 with Z_I = g(I)).

        Args:
            image_embeddings: (B, 256, 64, 64) from the frozen encoder (cached float16 accepted).
            g_inputs: (B, 3, G, G) float32 from :meth:`g_input`, or None when g reads no image.

        Returns:
            low_res_logits float32 (B, 1, 256, 256) of the single dense-prompted pass (training).
        """
        return self.sam.decode(image_embeddings, self.dense_prompt(image_embeddings, g_inputs))

    @torch.no_grad()
    def predict_low_res(self, image_embeddings: torch.Tensor, g_inputs: torch.Tensor | None,
                        valid: list[tuple[int, int]] | None = None,
                        mirrored_embeddings: torch.Tensor | None = None,
                        mirrored_g_inputs: torch.Tensor | None = None,
                        dense_prompt_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """Inference: :meth:`forward` (with ``tta`` "hflip": the mean of its low_res_logits and those
        of the mirrored image mapped back, :func:`mirror_low_res`), then (``refine`` "box" /
        "box_only") SAM prompted again with the box of each connected component of that mask
        (:meth:`FrozenSam.refine_with_boxes`), with g's dense prompt ("box") or SAM's own no-mask
        embedding ("box_only"), on the original image's embeddings.

        Args:
            image_embeddings: (B, 256, 64, 64); g_inputs: (B, 3, G, G) or None; valid: optional
                per-image (h, w) content region in the 256x256 low-res frame (None: the whole frame).
            mirrored_embeddings / mirrored_g_inputs: the same for each image mirrored left-right
                before encoding (``EmbeddingCache.get(path, hflip=True)``, ``g_input(mirror(image))``);
                needed by ``tta`` "hflip" (g_inputs only for a g that reads images), ignored otherwise.
            dense_prompt_embeddings: g(I) of these images (B, 256, 64, 64) when the caller has already
                computed it (the benchmark shares it with h); None computes it here.

        Returns:
            low_res_logits float32 (B, 1, 256, 256).

        Raises:
            ValueError: ``tta`` "hflip" without the mirrored inputs it needs.
        """
        dense = (self.dense_prompt(image_embeddings, g_inputs) if dense_prompt_embeddings is None
                 else dense_prompt_embeddings)
        first = self.sam.decode(image_embeddings, dense)
        if self.tta == "hflip":
            if mirrored_embeddings is None or (self.reads_images and mirrored_g_inputs is None):
                raise ValueError("tta 'hflip' needs the mirrored image's embeddings"
                                 f"{' and g inputs' if self.reads_images else ''} (mirrored_embeddings=...)")
            mirrored = self.sam.decode(mirrored_embeddings, self.dense_prompt(mirrored_embeddings, mirrored_g_inputs))
            first = (first.float() + mirror_low_res(mirrored.float(), valid)) / 2
        return self.refine_low_res(image_embeddings, first, dense, valid)

    @torch.no_grad()
    def refine_low_res(self, image_embeddings: torch.Tensor, low_res_logits: torch.Tensor,
                       dense_prompt_embeddings: torch.Tensor, valid: list[tuple[int, int]] | None = None
                       ) -> torch.Tensor:
        """Apply ``self.refine`` to a first pass's low_res_logits (B, 1, 256, 256); "none" returns them.

        ``refine_iterations`` > 1 repeats the box step on its own output (mask -> boxes -> SAM -> mask);
        ``refine_min_fraction``, ``refine_margin`` and ``refine_max_boxes`` are
        :meth:`FrozenSam.refine_with_boxes`'s ``min_fraction``, ``box_margin`` and ``max_boxes``.
        """
        if self.refine == "none":
            return low_res_logits
        dense = dense_prompt_embeddings
        if self.refine == "box_only":
            no_mask = self.sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
            dense = no_mask.to(dense_prompt_embeddings.dtype).expand_as(dense_prompt_embeddings)
        out = low_res_logits
        for _ in range(max(self.refine_iterations, 1)):
            out = self.sam.refine_with_boxes(image_embeddings, out, dense, min_fraction=self.refine_min_fraction,
                                             valid=valid, box_margin=self.refine_margin,
                                             max_boxes=self.refine_max_boxes)
        return out

    def surrogate_logits(self, g_inputs: torch.Tensor | None, image_embeddings: torch.Tensor | None = None
                         ) -> torch.Tensor:
        """h(g(I)): (B, 3, G, G) (and SAM's image_embeddings for a g that reads them) -> mask logits
        (B, 1, 256, 256) in the same low-res frame as SAM's.

        Raises:
            RuntimeError: the model has no surrogate decoder.
        """
        if self.surrogate_decoder is None:
            raise RuntimeError("this AutoSam has no surrogate decoder (set model.surrogate: true)")
        return self.surrogate_decoder(self.dense_prompt(image_embeddings, g_inputs))

    @torch.no_grad()
    def predict_logits(self, image: np.ndarray, image_embeddings: torch.Tensor | None = None,
                       surrogate: bool = False, mirrored_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """Full pipeline for one image: uint8 (H, W, 3) -> logits float32 (H, W) at the original size.

        Args:
            image: uint8 RGB (H, W, 3).
            image_embeddings: optional cached (1, 256, 64, 64) or (256, 64, 64) embeddings of ``image``.
            surrogate: use h(g(I)) instead of SAM(g(I)).
            mirrored_embeddings: optional cached embeddings of ``image`` mirrored left-right, for
                ``tta`` "hflip" (encoded here when None).
        """
        was_training = self.training
        self.eval()
        try:
            input_size = resized_shape(image.shape[:2], self.sam.spec.input_size)
            g = self.g_input(image)[None] if self.reads_images else None
            needs_embeddings = not surrogate or not self.reads_images
            if needs_embeddings and image_embeddings is None:
                image_embeddings = self.sam.encode(self.sam.preprocess(image)[0][None])
            if image_embeddings is not None:
                image_embeddings = image_embeddings.reshape(1, *image_embeddings.shape[-3:])
            if surrogate:
                low = self.surrogate_logits(g, image_embeddings)
            else:
                low_res_valid = resized_shape(image.shape[:2], self.sam.spec.low_res_size[0])
                g_m = None
                if self.tta == "hflip":
                    flipped = mirror(image)
                    if mirrored_embeddings is None:
                        mirrored_embeddings = self.sam.encode(self.sam.preprocess(flipped)[0][None])
                    mirrored_embeddings = mirrored_embeddings.reshape(1, *mirrored_embeddings.shape[-3:])
                    g_m = self.g_input(flipped)[None] if self.reads_images else None
                low = self.predict_low_res(image_embeddings, g, valid=[low_res_valid],
                                           mirrored_embeddings=mirrored_embeddings, mirrored_g_inputs=g_m)
            # h's output lives in the same 256x256 low-res frame as SAM's, so one postprocess serves both.
            logits = self.sam.postprocess(low.cpu(), input_size, image.shape[:2])
            return logits[0, 0]
        finally:
            self.train(was_training)

    # ----- trainable state ----------------------------------------------------------------------
    def trainable_state(self) -> "OrderedDict[str, torch.Tensor]":
        """g's (and h's) parameters and buffers, keys ``prompt_generator.*`` / ``surrogate_decoder.*``.

        Tensors are detached CPU copies; BatchNorm ``num_batches_tracked`` stays int64. Nothing of
        SAM is included.
        """
        return OrderedDict((k, v.detach().cpu().clone(memory_format=torch.contiguous_format))
                           for k, v in self.state_dict().items()
                           if is_trainable_key(k))

    def load_trainable_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load g's (and h's) state strictly.

        Raises:
            StateMismatchError: a SAM key is present, a key is missing or unexpected, or a shape
            differs; the message names the first offending key and both shapes.
        """
        own = self.trainable_state()
        diff = state_mismatches(state, own)
        if diff:
            m = diff[0]
            if m.kind == FOREIGN:
                raise StateMismatchError(f"trainable state may only hold g/h keys; found {m.key!r}")
            if m.kind == UNEXPECTED:
                raise StateMismatchError(f"unexpected key {m.key!r} (this model's g/h has no such entry)")
            if m.kind == MISSING:
                raise StateMismatchError(f"missing key {m.key!r} (expected shape {m.expected[0]})")
            raise StateMismatchError(f"key {m.key!r}: shape {m.found[0]} in the state, {m.expected[0]} in this model")
        self.load_state_dict({k: torch.as_tensor(v).to(own[k].dtype) for k, v in state.items()}, strict=False)

    def num_trainable_parameters(self) -> dict[str, int]:
        """Parameter counts: ``g_params``, ``h_params``, ``sam_params``, ``sam_trainable_params``."""
        count = lambda m: sum(p.numel() for p in m.parameters()) if m is not None else 0  # noqa: E731
        return {
            "g_params": count(self.prompt_generator),
            "h_params": count(self.surrogate_decoder),
            "sam_params": count(self.sam),
            "sam_trainable_params": sum(p.numel() for p in self.sam.parameters() if p.requires_grad),
        }
