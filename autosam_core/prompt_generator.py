"""The AutoSAM prompt generator g: image -> dense_prompt_embeddings for SAM's mask decoder.

AutoSAM paper section 3, "Architecture": a HarDNet-85 encoder (six HarD blocks, 192 ... 1280 channels)
and a decoder of two upsampling blocks. Each block upsamples the previous output by 2 (bilinear),
concatenates the skip feature of the encoder block with the same spatial resolution, and applies two
3x3 convs (padding 1), then BatchNorm and ReLU (block 1) or tanh (block 2). As in the paper's text,
there is no normalisation or activation between the two convs of a block. The result is resized
(bilinear) to SAM's 64x64 embedding grid.

Which encoder features feed the decoder (one rule for every backbone): the deepest map (stride S, 32
for HarDNet and most timm models) enters block 1, and the skips are the *first* map at stride S/2 and
at stride S/4. For HarDNet-85 these are blocks 5 (1280 ch, /32), 3 (480 ch, /16) and 1 (256 ch, /8)
(0-based), so every parameter is used and ``PromptGenerator("hardnet85")`` has 41,804,572 parameters,
0.59 % above the paper's 41.56 M. (The backbone alone has 35,389,212, leaving about 6.17 M for the
decoder; the last /16 and /8 blocks, 720 and 320 channels, would give 42,504,988, or +2.27 %.)
HarDNet-68: blocks 4 (1024 ch, /32), 3 (640, /16), 1 (256, /8); 22,734,524 parameters.

Beyond the paper (issue 10, measured in docs/benchmark/ABLATION.md), three options:

- ``output="offset"``: g's output is SAM's own no-mask dense embedding (``prompt_encoder.no_mask_embed``,
  set by the model factory) plus a learned per-channel gain (initialised to 0.1, about the std of
  LiteMedSAM's image_embeddings, 0.108) times tanh(...). Training starts near SAM's no-prompt state
  instead of a dense prompt ~5x larger than the image embedding it is added to (DESIGN.md section 8).
- ``fuse_embeddings=True``: the decoder also reads the frozen SAM image_embeddings (B, 256, 64, 64)
  that g is about to prompt (pretrained, in-domain features, already cached): a fusion block at
  64x64 concatenates them with the upsampled decoder output.
- ``backbone="none"``: no image CNN at all; g is a small conv head on the SAM image_embeddings
  (three 3x3 conv + BatchNorm + ReLU, a 1x1 conv, then the output activation).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autosam_core.hardnet import HarDNet

logger = logging.getLogger(__name__)

# ImageNet statistics on the 0-255 scale (RGB); callers normalise images with these before g.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


class UpBlock(nn.Module):
    """One AutoSAM decoder block (paper section 3): upsample x2 (bilinear) -> concat skip ->
    conv3x3 -> conv3x3 -> BatchNorm -> activation ("relu", "tanh", or "none" when the caller applies one).

    ``forward(x (B, c_in, h, w), skip (B, c_skip, 2h, 2w)) -> (B, c_out, 2h, 2w)`` float32, in
    [0, inf) for relu and [-1, 1] for tanh. Raises ValueError if the skip's size is not (2h, 2w).
    """

    def __init__(self, c_in: int, c_skip: int, c_out: int, act: str) -> None:
        super().__init__()
        if act not in ("relu", "tanh", "none"):
            raise ValueError(f"UpBlock act must be 'relu', 'tanh' or 'none', got {act!r}")
        # No conv biases: the BatchNorm after conv2 removes any per-channel offset anyway.
        self.conv1 = nn.Conv2d(c_in + c_skip, c_out, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(c_out)
        self.act = {"relu": nn.ReLU(inplace=True), "tanh": nn.Tanh(), "none": nn.Identity()}[act]

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        size = (2 * x.shape[-2], 2 * x.shape[-1])
        if tuple(skip.shape[-2:]) != size:
            raise ValueError(f"skip feature is {tuple(skip.shape[-2:])}, expected {size} (2x the input)")
        x = torch.cat([F.interpolate(x, size=size, mode="bilinear", align_corners=False), skip], 1)
        return self.act(self.norm(self.conv2(self.conv1(x))))


class _TimmBackbone(nn.Module):
    """A timm ``features_only`` model (never downloads) exposing HarDNet's interface:
    ``forward(x) -> list[Tensor]``, ``feature_channels``, ``feature_strides``."""

    def __init__(self, name: str, pretrained_path: str | Path | None) -> None:
        super().__init__()
        import timm

        kwargs: dict = {}
        if pretrained_path is not None:
            path = Path(pretrained_path)
            if not path.is_file():
                raise FileNotFoundError(f"timm:{name} pretrained weights not found: {path}")
            # timm's own loader reads the local file (drops the classifier); no source is contacted.
            kwargs["pretrained_cfg_overlay"] = dict(file=str(path), source="", hf_hub_id="", url="")
        else:
            logger.info("timm:%s: no pretrained_path given, using random initialisation", name)
        self.model = timm.create_model(name, features_only=True, pretrained=pretrained_path is not None,
                                       **kwargs)
        self.feature_channels = list(self.model.feature_info.channels())
        self.feature_strides = list(self.model.feature_info.reduction())

    def forward(self, x: Tensor) -> list[Tensor]:
        return list(self.model(x))


class PromptGenerator(nn.Module):
    """AutoSAM prompt generator g (paper section 3, "Architecture"), with the options of issue 10.

    Args:
        backbone: "hardnet85" (paper), "hardnet68", "timm:<name>" (any timm model that supports
            ``features_only=True``; created with pretrained=False unless ``pretrained_path`` is given),
            or "none" (g reads only the SAM image_embeddings; needs ``fuse_embeddings=True``).
        pretrained_path: optional local file of ImageNet backbone weights (see
            :meth:`HarDNet.load_pretrained`; for timm, timm's loader). None: random init (logged).
        embed_dim: channels of the output (SAM's prompt embedding dim, 256).
        embedding_size: (h, w) of the output grid (SAM's image-embedding grid, (64, 64)).
        output: "tanh" (paper: BatchNorm then tanh, values in [-1, 1]) or "offset" (SAM's no-mask
            embedding ``prompt_base`` + per-channel gain x tanh(...)).
        fuse_embeddings: the decoder also reads SAM's image_embeddings at 64x64.
        head_channels: channels of the fusion block / the embedding-only head.
        head_dilated: the embedding-only head's three 3x3 convs use dilations 1, 2, 4 (receptive
            field 15 x 15 cells of the 64 x 64 grid instead of 7 x 7); same parameters.

    Attributes:
        feature_ids: indices into the backbone's feature list of (deepest map, stride-S/2 skip,
            stride-S/4 skip); (5, 3, 1) for HarDNet-85; () for backbone "none".
        stride: S, the deepest feature's stride; H and W must be multiples of it (1 for "none").
        reads_images: whether ``forward`` needs ``images``.
        prompt_base: buffer (1, embed_dim, 1, 1), SAM's no-mask embedding in "offset" mode (zeros
            until the model factory sets it; not part of the state dict, it comes from SAM).

    ``forward(images, image_embeddings=None)``: images (B, 3, H, W) float32, ImageNet-normalised
    (IMAGENET_MEAN / IMAGENET_STD), H and W multiples of ``stride``, or None when the backbone is
    "none"; image_embeddings (B, 256, 64, 64) (float16 cache accepted), required when
    ``fuse_embeddings`` -> dense_prompt_embeddings (B, embed_dim, *embedding_size) float32.

    Raises:
        ValueError: unknown backbone or output; backbone "none" without fuse_embeddings; a backbone
            without feature maps at strides S/2 and S/4; an input of the wrong shape, a size that is
            not a multiple of ``stride``, or a missing input.
        FileNotFoundError: ``pretrained_path`` does not exist.
    """

    def __init__(self, backbone: str = "hardnet85", pretrained_path: str | Path | None = None,
                 embed_dim: int = 256, embedding_size: tuple[int, int] = (64, 64), output: str = "tanh",
                 fuse_embeddings: bool = False, head_channels: int = 256, head_dilated: bool = False) -> None:
        super().__init__()
        if output not in ("tanh", "offset"):
            raise ValueError(f"output must be 'tanh' or 'offset', got {output!r}")
        self.backbone_name, self.output, self.fuse_embeddings = backbone, output, fuse_embeddings
        self.embed_dim, self.embedding_size = embed_dim, tuple(embedding_size)
        self.reads_images = backbone != "none"
        self.feature_ids: tuple[int, ...] = ()
        self.stride = 1
        if backbone == "none":
            if not fuse_embeddings:
                raise ValueError("backbone 'none' reads only SAM's image_embeddings: set fuse_embeddings true")
            self.backbone = None
        else:
            if backbone in ("hardnet85", "hardnet68"):
                self.backbone = HarDNet(int(backbone[-2:]), pretrained_path=pretrained_path)
            elif backbone.startswith("timm:") and len(backbone) > 5:
                self.backbone = _TimmBackbone(backbone[5:], pretrained_path)
            else:
                raise ValueError(
                    f"backbone must be 'hardnet85', 'hardnet68', 'timm:<name>' or 'none', got {backbone!r}")
            channels, strides = self.backbone.feature_channels, self.backbone.feature_strides
            self.stride = strides[-1]
            ids = [len(strides) - 1]
            for s in (self.stride // 2, self.stride // 4):
                if s not in strides:
                    raise ValueError(f"backbone {backbone!r} has feature strides {strides}; the decoder needs "
                                     f"maps at strides {self.stride // 2} and {self.stride // 4}")
                ids.append(strides.index(s))
            self.feature_ids = tuple(ids)
            deep, skip1, skip2 = (channels[i] for i in ids)
            self.up1 = UpBlock(deep, skip1, embed_dim, "relu")
            # Paper head: BatchNorm -> tanh. With fusion, block 2 ends in ReLU and the fusion block
            # carries the output activation.
            act2 = "relu" if fuse_embeddings else ("tanh" if output == "tanh" else "none")
            self.up2 = UpBlock(embed_dim, skip2, embed_dim, act2)
        self.fusion = None
        if fuse_embeddings:
            c_in = embed_dim + (embed_dim if self.reads_images else 0)
            layers: list[nn.Module] = []
            for i in range(3 if backbone == "none" else 1):
                d = 2 ** i if head_dilated else 1
                layers += [nn.Conv2d(c_in if i == 0 else head_channels, head_channels, 3, padding=d, dilation=d,
                                     bias=False),
                           nn.BatchNorm2d(head_channels), nn.ReLU()]
            layers.append(nn.Conv2d(head_channels, embed_dim, 1))
            self.fusion = nn.Sequential(*layers)
        self.gain = None
        if output == "offset":
            # Per-channel gain as a depthwise 1x1 conv (a module Opacus can compute per-sample grads for).
            self.gain = nn.Conv2d(embed_dim, embed_dim, 1, groups=embed_dim, bias=False)
            nn.init.constant_(self.gain.weight, 0.1)
        self.register_buffer("prompt_base", torch.zeros(1, embed_dim, 1, 1), persistent=False)

    def set_prompt_base(self, no_mask_embed: Tensor) -> None:
        """Set the "offset" base: SAM's no-mask dense embedding, (embed_dim,) or (1, embed_dim)."""
        self.prompt_base.copy_(no_mask_embed.detach().reshape(1, self.embed_dim, 1, 1))

    def forward(self, images: Tensor | None, image_embeddings: Tensor | None = None) -> Tensor:
        z = None
        if self.reads_images:
            if images is None or images.ndim != 4 or images.shape[1] != 3:
                found = None if images is None else tuple(images.shape)
                raise ValueError(f"PromptGenerator expects images of shape (B, 3, H, W), got {found}")
            h, w = images.shape[-2:]
            if h % self.stride or w % self.stride:
                raise ValueError(f"PromptGenerator input size {h}x{w} is not divisible by {self.stride}")
            feats = self.backbone(images)
            deep, skip1, skip2 = (feats[i] for i in self.feature_ids)
            z = self.up2(self.up1(deep, skip1), skip2)
            if tuple(z.shape[-2:]) != self.embedding_size:
                z = F.interpolate(z, size=self.embedding_size, mode="bilinear", align_corners=False)
        if self.fusion is not None:
            expected = (self.embed_dim, *self.embedding_size)
            if image_embeddings is None or image_embeddings.ndim != 4 or tuple(image_embeddings.shape[1:]) != expected:
                found = None if image_embeddings is None else tuple(image_embeddings.shape)
                raise ValueError(f"PromptGenerator with fuse_embeddings expects image_embeddings of shape "
                                 f"(B, {expected[0]}, {expected[1]}, {expected[2]}), got {found}")
            e = image_embeddings.to(torch.float32)
            z = self.fusion(e if z is None else torch.cat([z, e], 1))
            if self.output == "tanh":
                z = torch.tanh(z)
        if self.output == "offset":
            z = self.prompt_base + self.gain(torch.tanh(z))
        return z
