"""HarDNet-68 / HarDNet-85 feature extractors (Chao et al., "HarDNet: A Low Memory Traffic Network",
ICCV 2019), the backbone of the AutoSAM prompt generator g (AutoSAM paper section 3, "Architecture").

Written from the HarDNet paper's description:

* Harmonic dense block (HarDNet section 3.1, Fig. 1): layers are numbered 1..L, layer 0 is the block
  input. Layer k takes the channel concatenation of layers k - 2**n for every n with 2**n dividing k
  (ordered k-1, k-2, k-4, ...). Its width is ``growth * grmul**n_max`` (n_max: the largest such n),
  rounded to the nearest even integer. The block output concatenates the odd layers and the last
  layer, in layer order; the block input and the other even layers are discarded.
* Every layer is Conv(no bias)-BN-ReLU6 (HarDNet section 3.3: Conv-BN-ReLU order, no bottleneck);
  3x3 inside blocks, 1x1 for the transition after each block, which sets the block's output width.
* Stem: 3x3 conv stride 2, 3x3 conv, 3x3 max-pool stride 2 (stride 4 overall). Downsampling between
  blocks is a 2x2 max-pool with stride 2 (the depth-wise variants are not built here).

No classifier head. Module names follow the ImageNet checkpoints' layout (``base.<i>.conv/norm``,
``base.<i>.layers.<j>.conv/norm``), so such a file, once on local disk, loads without renaming; the
classifier-head keys in it are dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

GRMUL = 1.7
CONFIGS: dict[int, dict[str, tuple[int, ...]]] = {
    68: dict(stem=(32, 64), channels=(128, 256, 320, 640, 1024), growth=(14, 16, 20, 40, 160),
             layers=(8, 16, 16, 16, 4), downsample=(1, 0, 1, 1, 0)),
    85: dict(stem=(48, 96), channels=(192, 256, 320, 480, 720, 1280), growth=(24, 24, 28, 36, 48, 256),
             layers=(8, 16, 16, 16, 16, 4), downsample=(1, 0, 1, 0, 1, 0)),
}


class ConvBNReLU6(nn.Sequential):
    """Conv2d(bias=False) -> BatchNorm2d -> ReLU6 (HarDNet section 3.3), "same" padding.

    (B, c_in, H, W) float32 -> (B, c_out, ceil(H/stride), ceil(W/stride)) float32 in [0, 6].
    """

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1) -> None:
        super().__init__()
        self.add_module("conv", nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False))
        self.add_module("norm", nn.BatchNorm2d(c_out))
        self.add_module("relu", nn.ReLU6(inplace=True))


def harmonic_links(k: int) -> list[int]:
    """Indices of the earlier layers that layer ``k >= 1`` of a HarD block reads: k - 2**n for every n
    with 2**n | k, nearest first (HarDNet section 3.1). E.g. 8 -> [7, 6, 4, 0]; 6 -> [5, 4]."""
    links, step = [], 1
    while step <= k and k % step == 0:
        links.append(k - step)
        step *= 2
    return links


class HarDBlock(nn.Module):
    """Harmonic dense block (HarDNet section 3.1).

    Args:
        c_in: channels of the block input (layer 0).
        growth: base growth rate k; layer l has ``k * grmul**n`` channels (n = len(links(l)) - 1),
            rounded to the nearest even integer.
        n_layers: number of 3x3 Conv-BN-ReLU6 layers L.
        grmul: growth multiplier m (1.7 for HarDNet-68/85).

    ``forward``: (B, c_in, H, W) float32 -> (B, out_channels, H, W) float32 >= 0, the concatenation of
    the odd layers and layer L.
    """

    def __init__(self, c_in: int, growth: int, n_layers: int, grmul: float = GRMUL) -> None:
        super().__init__()
        widths = [c_in]
        self.links = [harmonic_links(k) for k in range(1, n_layers + 1)]
        layers = []
        for links in self.links:
            c_out = 2 * int(growth * grmul ** (len(links) - 1) / 2 + 0.5)
            layers.append(ConvBNReLU6(sum(widths[j] for j in links), c_out))
            widths.append(c_out)
        self.layers = nn.ModuleList(layers)
        self.out_ids = [k for k in range(1, n_layers + 1) if k % 2 == 1 or k == n_layers]
        self.out_channels = sum(widths[k] for k in self.out_ids)

    def forward(self, x: Tensor) -> Tensor:
        outs = [x]
        for links, layer in zip(self.links, self.layers):
            outs.append(layer(torch.cat([outs[j] for j in links], 1) if len(links) > 1 else outs[links[0]]))
        return torch.cat([outs[k] for k in self.out_ids], 1)


class HarDNet(nn.Module):
    """HarDNet-68 or HarDNet-85 backbone without classifier (HarDNet paper Table 1 / section 3.3).

    Args:
        arch: 68 or 85 (others raise ValueError).
        pretrained_path: optional local file with ImageNet weights (a state dict, possibly wrapped as
            ``{"state_dict": ...}``), loaded with :meth:`load_pretrained`. None: random init (logged at
            INFO).
        num_blocks: build only the first ``num_blocks`` HarD blocks (default: all; 6 for 85, 5 for 68).

    Attributes:
        feature_channels: output channels of each kept block (after its 1x1 transition), e.g.
            [192, 256, 320, 480, 720, 1280] for HarDNet-85 and [128, 256, 320, 640, 1024] for 68.
        feature_strides: their strides relative to the input: [4, 8, 8, 16, 16, 32] (85) and
            [4, 8, 8, 16, 32] (68).

    ``forward(x)``: x (B, 3, H, W) float32, ImageNet-normalised -> list of ``num_blocks`` float32
    tensors (B, feature_channels[i], ceil(H / s_i), ceil(W / s_i)) with values in [0, 6] (ReLU6); exact
    divisions when H and W are multiples of 32. Raises ValueError for a non-(B, 3, H, W) input.
    """

    def __init__(self, arch: int = 85, pretrained_path: str | Path | None = None,
                 num_blocks: int | None = None) -> None:
        super().__init__()
        if arch not in CONFIGS:
            raise ValueError(f"HarDNet arch must be one of {sorted(CONFIGS)}, got {arch!r}")
        cfg = CONFIGS[arch]
        total = len(cfg["channels"])
        num_blocks = total if num_blocks is None else num_blocks
        if not 1 <= num_blocks <= total:
            raise ValueError(f"HarDNet-{arch} num_blocks must be in 1..{total}, got {num_blocks!r}")
        self.arch, self.num_blocks = arch, num_blocks
        s0, s1 = cfg["stem"]
        base: list[nn.Module] = [ConvBNReLU6(3, s0, 3, stride=2), ConvBNReLU6(s0, s1, 3),
                                 nn.MaxPool2d(3, stride=2, padding=1)]
        c, stride = s1, 4
        self.feature_channels: list[int] = []
        self.feature_strides: list[int] = []
        self._taps: list[int] = []  # indices in base whose outputs are returned
        for i in range(num_blocks):
            block = HarDBlock(c, cfg["growth"][i], cfg["layers"][i])
            base.append(block)
            if arch == 85 and i == total - 1:
                # The ImageNet HarDNet-85 has a dropout here; a placeholder keeps checkpoint indices.
                base.append(nn.Identity())
            base.append(ConvBNReLU6(block.out_channels, cfg["channels"][i], 1))
            c = cfg["channels"][i]
            self._taps.append(len(base) - 1)
            self.feature_channels.append(c)
            self.feature_strides.append(stride)
            if cfg["downsample"][i] and i < num_blocks - 1:
                base.append(nn.MaxPool2d(2, stride=2))
                stride *= 2
        self.base = nn.ModuleList(base)
        if pretrained_path is None:
            logger.info("HarDNet-%d: no pretrained_path given, using random initialisation", arch)
        else:
            self.load_pretrained(pretrained_path)

    def forward(self, x: Tensor) -> list[Tensor]:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"HarDNet expects images of shape (B, 3, H, W), got {tuple(x.shape)}")
        feats = []
        taps = set(self._taps)
        for i, module in enumerate(self.base):
            x = module(x)
            if i in taps:
                feats.append(x)
        return feats

    def load_pretrained(self, path: str | Path) -> None:
        """Load weights from a local file (mapped to CPU, never downloaded).

        Keys under ``base.<i>.`` with ``i >= len(self.base)`` (the ImageNet classifier head, or blocks
        this model does not build when ``num_blocks`` is smaller) are dropped and logged. All other keys
        must match exactly in name and shape.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            ValueError: the file is unreadable or holds no state dict; or (message names them) the first
                missing key, the first unexpected key, or the first shape mismatch with both shapes.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"HarDNet-{self.arch} pretrained weights not found: {path}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # unpickling / zip errors vary by torch version
            raise ValueError(f"{path}: could not be read as a torch checkpoint: {err}") from err
        if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
            state = state["state_dict"]
        if not isinstance(state, Mapping):
            raise ValueError(f"{path}: expected a state dict (mapping of name -> tensor), "
                             f"found {type(state).__name__}")
        n = len(self.base)
        beyond = [k for k in state if k.startswith("base.") and k.split(".")[1].isdigit()
                  and int(k.split(".")[1]) >= n]
        state = {k: v for k, v in state.items() if k not in set(beyond)}
        if beyond:
            logger.info("%s: ignoring %d keys of modules this backbone does not build (first: %s)",
                        path, len(beyond), beyond[0])
        own = self.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if missing or unexpected:
            raise ValueError(
                f"{path}: state dict does not match HarDNet-{self.arch} ({self.num_blocks} blocks): "
                f"{len(missing)} missing keys (first: {missing[0] if missing else None!r}), "
                f"{len(unexpected)} unexpected keys (first: {unexpected[0] if unexpected else None!r})")
        for k, v in own.items():
            if tuple(state[k].shape) != tuple(v.shape):
                raise ValueError(f"{path}: key {k!r} expected shape {tuple(v.shape)}, "
                                 f"found {tuple(state[k].shape)}")
        self.load_state_dict(state, strict=True)
        logger.info("HarDNet-%d: loaded pretrained weights from %s", self.arch, path)
