"""The one model factory: AutoSAM from its configuration, and from a checkpoint.

:func:`build_autosam` is the only place that maps a :class:`~autosam_core.config.ModelConfig` to
modules (g, h, the DP variant of g); :func:`model_from_checkpoint` rebuilds exactly what a checkpoint
describes (its ``sam`` and ``model`` metadata) and loads its trainable state. Never imports flwr.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch

from .autosam import AutoSam, StateMismatchError
from .config import ModelConfig, SamConfig
from .prompt_generator import PromptGenerator
from .sam import FrozenSam, load_frozen_sam
from .surrogate_decoder import SurrogateDecoder


def build_autosam(sam_cfg: SamConfig, model_cfg: ModelConfig, sam: FrozenSam | None = None, seed: int = 0) -> AutoSam:
    """Build AutoSAM: frozen SAM (``sam`` if given, else loaded from ``sam_cfg``) + g (+ h).

    The one model factory: sites, the server, centralised training, the CLI and checkpoint loading
    all build through it. g's weights are drawn from ``seed`` so every site and the server start from
    the same initial model when no checkpoint is given. ``model_cfg.dp_compatible`` builds the DP-SGD
    variant of g (BatchNorm -> GroupNorm, :func:`autosam_core.privacy.make_private_compatible`), whose
    trainable state has other keys.

    Returns:
        AutoSam on ``sam.device`` (g and h float32, train mode).

    Raises:
        ValueError: unknown SAM kind or backbone; DPCompatibilityError: g cannot be made DP-compatible.
    """
    sam = sam or load_frozen_sam(sam_cfg.kind, sam_cfg.checkpoint)
    g, h = _trainable_modules(model_cfg, sam.spec, seed)
    g.set_prompt_base(sam.prompt_encoder.no_mask_embed.weight)
    model = AutoSam(sam, g, h, g_input_size=model_cfg.g_input_size, refine=model_cfg.refine,
                    refine_min_fraction=model_cfg.refine_min_fraction, refine_margin=model_cfg.refine_margin,
                    refine_iterations=model_cfg.refine_iterations, refine_max_boxes=model_cfg.refine_max_boxes,
                    tta=model_cfg.tta)
    return model.to(sam.device)


def _trainable_modules(model_cfg: ModelConfig, spec, seed: int, pretrained: bool = True
                       ) -> tuple[PromptGenerator, SurrogateDecoder | None]:
    """g (and h when ``model_cfg.surrogate``) for a SAM of ``spec``, their weights drawn from ``seed``
    (torch's global RNG is left as it was)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        g = build_prompt_generator(model_cfg, spec.embed_dim, spec.embedding_size, pretrained=pretrained)
        h = SurrogateDecoder(embed_dim=spec.embed_dim) if model_cfg.surrogate else None
    return g, h


def trainable_state_template(sam_cfg: SamConfig, model_cfg: ModelConfig, seed: int = 0
                             ) -> "OrderedDict[str, torch.Tensor]":
    """The trainable state that :func:`build_autosam` gives for these configs (the same keys
    ``prompt_generator.*`` / ``surrogate_decoder.*``, shapes and dtypes, the same seeded initial
    values), built without loading SAM's weights: g and h need only its spec (embedding dim and
    grid). For checks that compare a state with the configs, e.g. the coordinator's resume preflight.

    Raises:
        ValueError: unknown SAM kind or backbone; DPCompatibilityError: g cannot be made DP-compatible.
    """
    from .sam import SPECS
    from .trainable_state import is_trainable_key

    if sam_cfg.kind not in SPECS:
        raise ValueError(f"unknown SAM kind {sam_cfg.kind!r}; expected one of {', '.join(SPECS)}")
    holder = torch.nn.Module()  # the attribute names AutoSam gives g and h
    holder.prompt_generator, h = _trainable_modules(model_cfg, SPECS[sam_cfg.kind], seed, pretrained=False)
    if h is not None:
        holder.surrogate_decoder = h
    return OrderedDict((k, v.detach().clone()) for k, v in holder.state_dict().items() if is_trainable_key(k))


def build_prompt_generator(model_cfg: ModelConfig, embed_dim: int = 256,
                           embedding_size: tuple[int, int] = (64, 64), pretrained: bool = True) -> PromptGenerator:
    """g from a :class:`ModelConfig` (the one place that maps config keys to the constructor).

    ``pretrained=False`` ignores ``model_cfg.pretrained`` (e.g. to build a reference signature).
    The "offset" base (SAM's no-mask embedding) is set by :func:`build_autosam`.
    ``model_cfg.dp_compatible``: the GroupNorm variant (DP-SGD), as :func:`build_autosam` builds it.
    """
    g = PromptGenerator(backbone=model_cfg.backbone,
                        pretrained_path=model_cfg.pretrained if pretrained else None,
                        embed_dim=embed_dim, embedding_size=embedding_size, output=model_cfg.output,
                        fuse_embeddings=model_cfg.fuse_embeddings, head_channels=model_cfg.head_channels,
                        head_dilated=model_cfg.head_dilated)
    return _dp_compatible(g) if model_cfg.dp_compatible else g


def _dp_compatible(g: PromptGenerator) -> PromptGenerator:
    from .privacy.compat import make_private_compatible  # Opacus: imported only for DP models

    return make_private_compatible(g)


def model_from_checkpoint(path: str | Path, sam: FrozenSam | None = None, device: str | torch.device = "cpu",
                          precision: str = "fp32") -> tuple[AutoSam, dict]:
    """Rebuild AutoSam from a checkpoint's metadata (``sam`` and ``model`` configs) and load g/h.

    ``device``/``precision`` (resolved) apply when ``sam`` is not given; the state is loaded on the CPU
    and moved with the model (``map_location`` handled here once).

    Returns:
        (model in eval mode, metadata).

    Raises:
        CheckpointError: unreadable file, or a state that does not fit (one line naming the file, the
        first mismatched key and both shapes).
    """
    from .checkpoint import CheckpointError, load_checkpoint

    payload = load_checkpoint(path)
    meta = payload["metadata"]
    if "sam" not in meta or "model" not in meta:
        raise CheckpointError(f"checkpoint {path}: metadata lacks 'sam'/'model' configs; found keys {sorted(meta)}")
    try:
        sam_cfg, model_cfg = SamConfig(**meta["sam"]), ModelConfig(**meta["model"])
    except (TypeError, ValueError) as err:  # pydantic's ValidationError is a ValueError
        errors = err.errors() if hasattr(err, "errors") else []
        why = "; ".join(f"key '{'.'.join(map(str, e['loc']))}': {e['msg']} (found {e.get('input')!r})"
                        for e in errors[:2]) or str(err).splitlines()[0]
        raise CheckpointError(f"checkpoint {path}: metadata 'sam'/'model' do not describe a model of this tool: "
                              f"{why}") from None
    if sam is not None and sam.spec.kind != sam_cfg.kind:
        raise CheckpointError(f"checkpoint {path} was trained with SAM {sam_cfg.kind}, not {sam.spec.kind}")
    if sam is None:
        sam = load_frozen_sam(sam_cfg.kind, sam_cfg.checkpoint).to(device).set_precision(precision)
    model = build_autosam(sam_cfg, model_cfg, sam=sam)
    try:
        model.load_trainable_state(payload["trainable_state"])
    except StateMismatchError as err:
        raise CheckpointError(f"checkpoint {path} does not fit the model its metadata describes "
                              f"(g {model_cfg.backbone}, SAM {sam_cfg.kind}): {err}") from None
    model.eval()
    return model, meta
