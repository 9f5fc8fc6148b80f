"""YAML configuration: models, datasets, centralised training, sites and federations.

Every model rejects unknown keys. :func:`load_yaml_config` turns validation failures into a
:class:`ConfigError` naming the file, the key, what was found and how to fix it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

#: The frozen SAM backbones ``sam.kind`` can name (built by :func:`autosam_core.sam.load_frozen_sam`).
#: Defined here, not in :mod:`autosam_core.sam`, so reading a YAML never imports torch.
SAM_KINDS = ("lite_medsam", "vit_b", "vit_l", "vit_h", "tiny")


T = TypeVar("T", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration file is missing, malformed, or names data that does not exist."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class SamConfig(_Strict):
    """Frozen SAM backbone: ``kind`` in lite_medsam (default), vit_b, vit_l, vit_h, tiny."""

    kind: str = "lite_medsam"
    checkpoint: str | None = None

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        if v not in SAM_KINDS:
            raise ValueError(f"must be one of {', '.join(SAM_KINDS)}")
        return v


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # The paper's g (section 3): HarDNet-85 on the image, two decoder blocks, BatchNorm -> tanh.
    "paper": {"backbone": "hardnet85", "output": "tanh", "fuse_embeddings": False},
    # Issue 10's recipe (docs/benchmark/ABLATION.md, chosen on validation): a conv head on the frozen
    # SAM image_embeddings (BatchNorm -> tanh output), then SAM prompted with the box of each
    # connected component of that mask and its own no-mask embedding.
    "sam_head": {"backbone": "none", "output": "tanh", "fuse_embeddings": True, "head_channels": 256,
                 "refine": "box_only", "refine_min_fraction": 0.3, "refine_margin": 3.0},
}


class ModelConfig(_Strict):
    """Prompt generator g (and surrogate decoder h) settings.

    preset: a named recipe (:data:`MODEL_PRESETS`: ``paper``, ``sam_head``) whose values fill every
    key not given explicitly; the stored (checkpoint) config is always the expanded one.
    backbone: ``hardnet85`` (paper), ``hardnet68``, ``timm:<name>`` or ``none`` (g reads only SAM's
    image_embeddings); pretrained: optional local ImageNet weights file for the backbone;
    g_input_size: side (pixels) of g's square padded input (divisible by 32; unused for ``none``);
    output: ``tanh`` (paper) or ``offset`` (SAM's no-mask embedding + gain x tanh);
    fuse_embeddings: g also reads SAM's image_embeddings; head_channels: width of that head;
    refine: ``none``, ``box`` or ``box_only`` (inference: SAM is prompted again with the bounding box
    of each connected component of the first mask, plus g's dense prompt (``box``) or SAM's own
    no-mask embedding (``box_only``); fully automatic, no ground truth); refine_min_fraction:
    components smaller than this fraction of the largest are not prompted; refine_margin: pixels (SAM
    input frame) added around each box; refine_iterations: box steps in a row; refine_max_boxes: at
    most this many components (the largest) are prompted per image; tta: ``hflip`` averages the
    first pass's low_res_logits with those of the image mirrored left-right (its own SAM embeddings,
    cached as the ``-hflip`` entry) before refinement, at twice g's and the decoder's inference cost
    and one more encoder pass per uncached image; head_dilated: the
    embedding head's three 3x3 convs use dilation 1, 2, 4 (receptive field 15 instead of 7 cells of
    the 64x64 grid);
    surrogate: also train h after g;
    dp_compatible: g's BatchNorm layers are GroupNorm (the DP-SGD variant,
    :func:`autosam_core.privacy.make_private_compatible`); a federation sets it when its sites train
    with DP, and checkpoints record it, so a DP checkpoint rebuilds the same g.
    """

    preset: Literal["paper", "sam_head"] | None = None
    backbone: str = "hardnet85"
    pretrained: str | None = None
    g_input_size: int = Field(256, ge=32)
    output: Literal["tanh", "offset"] = "tanh"
    fuse_embeddings: bool = False
    head_channels: int = Field(256, ge=8)
    refine: Literal["none", "box", "box_only"] = "none"
    refine_min_fraction: float = Field(0.1, ge=0.0, le=1.0)
    refine_margin: float = Field(0.0, ge=0.0)
    refine_iterations: int = Field(1, ge=1, le=5)
    refine_max_boxes: int = Field(8, ge=1, le=64)
    tta: Literal["none", "hflip"] = "none"
    head_dilated: bool = False
    surrogate: bool = False
    dp_compatible: bool = False

    @model_validator(mode="before")
    @classmethod
    def _expand_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") in MODEL_PRESETS:
            data = {**MODEL_PRESETS[data["preset"]], **data}
        return data

    @field_validator("g_input_size")
    @classmethod
    def _div32(cls, v: int) -> int:
        if v % 32:
            raise ValueError(f"must be divisible by 32 (HarDNet downsamples 32x); use {max(32, round(v / 32) * 32)}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "ModelConfig":
        if self.backbone == "none" and not self.fuse_embeddings:
            raise ValueError("backbone 'none' reads only SAM's image_embeddings: set fuse_embeddings: true")
        return self


class DataRef(_Strict):
    """One dataset split: ``dataset`` is a folder under the data root (or an absolute path).

    split: name of ``splits/<split>.txt`` or null for every pair; stems_file: instead of a split, a
    text file of stems (one per line, relative to the YAML), e.g. a per-patient site partition;
    limit: use the first N stems (a stated subset); name: label used in tables (defaults to
    dataset[/split]).
    """

    dataset: str
    split: str | None = None
    stems_file: str | None = None
    limit: int | None = Field(None, ge=1)
    name: str | None = None

    @property
    def label(self) -> str:
        """Name used in tables and JSON keys."""
        return self.name or (f"{Path(self.dataset).name}/{self.split}" if self.split else Path(self.dataset).name)


class TrainConfig(_Strict):
    """Optimisation (paper section 4 'Training details': Adam lr 3e-4, wd 1e-5, batch 10).

    schedule: ``constant`` (paper) or ``cosine`` (linear warm-up over ``warmup_fraction`` of the
    steps, then cosine decay); seed: g's initialisation, the validation hold-out, shuffling.
    hflip: probability in [0, 1] that a training sample is served mirrored left-right, with the
    cached image_embeddings of the mirrored image (each training image is encoded once more, 2 MiB
    of cache each; needs ``use_cache``); 0 = off.
    """

    epochs: int = Field(10, ge=0)
    batch_size: int = Field(10, ge=1)
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    augmentation: Literal["none", "polyp", "glas", "monuseg"] = "polyp"
    use_cache: bool = True
    hflip: float = Field(0.0, ge=0.0, le=1.0)
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    surrogate_epochs: int = Field(0, ge=0)
    surrogate_batch_size: int = Field(24, ge=1)
    seed: int = 0
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _hflip_needs_cache(self) -> "TrainConfig":
        if self.hflip > 0 and not self.use_cache:
            raise ValueError(f"hflip: {self.hflip} serves cached embeddings of mirrored images and needs "
                             "use_cache: true (found use_cache: false)")
        return self


Precision = Literal["auto", "fp32", "bf16", "fp16"]


def yaml_relative(path: str | None, yaml_dir: Path) -> Path | None:
    """``path`` from a YAML, absolute (``~`` expanded; relative paths are relative to ``yaml_dir``, the
    YAML's folder); None stays None."""
    if not path:
        return None
    p = Path(path).expanduser()
    return p if p.is_absolute() else (Path(yaml_dir) / p).resolve()


class TrainJobConfig(_Strict):
    """Centralised training job (``autosam train``).

    device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``; precision: ``auto`` | ``fp32`` | ``bf16`` |
    ``fp16`` (see :mod:`autosam_core.precision`). Every relative path (``output_dir``, ``cache_dir``,
    dataset folders) is relative to the YAML's folder; the run folder is ``<output_dir>/<name>``.
    """

    name: str = "autosam"
    device: str = "auto"
    precision: Precision = "auto"
    sam: SamConfig = SamConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    train_data: list[DataRef]
    evaluate: list[DataRef] = []
    output_dir: str = "runs"
    cache_dir: str | None = None


class PrivacyConfig(_Strict):
    """Record-level DP-SGD at a site (Opacus). Either target_epsilon or noise_multiplier.

    planned_rounds: federated rounds the target_epsilon budget is spread over (noise is calibrated
    for planned_rounds x local_epochs epochs; when null the client must pass the federation's ``rounds``
    to DPSiteTrainer); accountant:
    ``rdp`` (Mironov 2017) or ``prv`` (Gopi et al. 2021). See :mod:`autosam_core.privacy`.
    """

    target_epsilon: float | None = Field(None, gt=0)
    noise_multiplier: float | None = Field(None, ge=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    planned_rounds: int | None = Field(None, ge=1)
    accountant: Literal["rdp", "prv"] = "rdp"


class SiteConfig(_Strict):
    """One hospital site (``sites/<site>.yaml``): its private data and local training settings.

    privacy: record-level DP-SGD (all sites of a federation or none). state_dir: the site's
    persistent folder (privacy ledger, reply audit report; relative to the YAML's folder); keep it
    for the life of the data set: deleting it resets the DP accountant. Default:
    ``$AUTOSAM_SITE_STATE`` or ``<embedding cache root>/site-state``. audit: check and record every
    reply this site sends (as ``autosam-client --audit``; see :mod:`client.audit`). sam_checkpoint:
    the site's own SAM weights file for ViT kinds (relative to the YAML's folder; LiteMedSAM needs
    none): the coordinator sends only the SAM kind and its weights fingerprint, never a path, and a
    site whose weights have another fingerprint refuses to train. hflip: as in :class:`TrainConfig`
    (mirrored samples from the site's embedding cache). optimizer_state: ``reset`` starts a fresh Adam
    every round; ``keep`` carries the site's Adam moments from one round to the next of the same run,
    in its state folder, never sent (:mod:`autosam_core.optimizer_state`; not with ``privacy``).
    local_steps: optimizer steps per round instead of whole epochs (null: ``local_epochs`` epochs):
    each round trains on the first ``local_steps`` batches of that round's seeded shuffle, so two
    rounds of half an epoch's steps see about one epoch's samples (more, shorter rounds at the same
    budget; McMahan et al. 2017 vary the local steps E*n/B the same way); not with ``privacy``.
    """

    site_id: str
    data: DataRef
    device: str = "auto"
    precision: Precision = "auto"
    local_epochs: int = Field(1, ge=1)
    batch_size: int = Field(10, ge=1)
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    augmentation: Literal["none", "polyp", "glas", "monuseg"] = "polyp"
    hflip: float = Field(0.0, ge=0.0, le=1.0)
    cache_dir: str | None = None
    val_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    privacy: PrivacyConfig | None = None
    state_dir: str | None = None
    audit: bool = False
    sam_checkpoint: str | None = None
    optimizer_state: Literal["reset", "keep"] = "reset"
    local_steps: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _keep_needs_plain_training(self) -> "SiteConfig":
        if self.optimizer_state == "keep" and self.privacy is not None:
            raise ValueError("optimizer_state: 'keep' is not available with a 'privacy' section (the DP trainer "
                             "starts a fresh DP optimizer every round); use optimizer_state: reset")
        if self.local_steps is not None and self.privacy is not None:
            raise ValueError(f"local_steps: {self.local_steps} is not available with a 'privacy' section (the DP "
                             "accountant counts whole local epochs); remove local_steps and set local_epochs")
        return self


class StrategyConfig(_Strict):
    """Aggregation: ``fedavg`` (default) or ``fedprox`` with proximal term ``mu``."""

    name: Literal["fedavg", "fedprox"] = "fedavg"
    mu: float = Field(0.0, ge=0)


class FederationConfig(_Strict):
    """A federation (``sites/<name>/<federation>.yaml``).

    sites: site YAML paths relative to this file; evaluate: public benchmark splits the server
    evaluates the global model on after each round; validation: split used to choose the best
    round (never a test split); round_timeout in seconds. min_sites: successful replies a round needs
    (fewer stops the run; a smaller value lets a round average the survivors when a site fails);
    start_sites: sites connected before the first round starts (default: the number of listed
    ``sites``, else ``min_sites``). client_gpus: GPUs per simulated site
    (fractional allowed: Flower/Ray's per-client GPU resource; Ray gives each site its own
    CUDA_VISIBLE_DEVICES, so sites are spread over the GPUs instead of all using cuda:0).
    device/precision: the server's central evaluation (:mod:`autosam_core.precision`).
    transfer_dtype: the dtype g's floating-point arrays travel in, server -> sites and back
    (``bfloat16`` / ``float16`` halve the bytes per round; the server keeps and averages float32;
    integer buffers travel unchanged; :mod:`autosam_fl.transfer`). Every
    relative path (``sites``, ``output_dir``, ``cache_dir``, dataset folders) is relative to this
    file's folder; the run folder is ``<output_dir>/<name>``.
    """

    name: str
    sam: SamConfig = SamConfig()
    model: ModelConfig = ModelConfig()
    rounds: int = Field(3, ge=1)
    strategy: StrategyConfig = StrategyConfig()
    min_sites: int = Field(2, ge=1)
    start_sites: int | None = Field(None, ge=1)
    round_timeout: float = Field(600.0, gt=0)
    sites: list[str]
    evaluate: list[DataRef] = []
    validation: list[DataRef] = []
    output_dir: str = "runs"
    cache_dir: str | None = None
    resume: bool = False
    client_cpus: float = Field(1.0, gt=0)
    client_gpus: float = Field(0.0, ge=0)
    device: str = "auto"
    precision: Precision = "auto"
    transfer_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    seed: int = 0


def _fmt_loc(loc: tuple) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def load_yaml_config(path: str | Path, model: type[T]) -> T:
    """Read ``path`` and validate it against ``model``.

    Raises:
        ConfigError: file missing, not YAML, not a mapping, or invalid; the message names the file,
        each offending key, the value found and the rule it broke.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, found {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            key = _fmt_loc(e["loc"])
            if e["type"] == "extra_forbidden":
                valid = _valid_keys(model, e["loc"][:-1])
                lines.append(f"  key '{key}': unknown key; valid keys here: {', '.join(valid)}")
            elif e["type"] == "missing":
                lines.append(f"  key '{key}': required but missing")
            else:
                lines.append(f"  key '{key}': {e['msg']} (found {e.get('input')!r})")
        raise ConfigError(f"{path}: invalid {model.__name__}:\n" + "\n".join(lines)) from None


def _valid_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    m: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = m.model_fields.get(part)
        if field is None:
            break
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        cand = [a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not cand:
            break
        m = cand[0]
    return sorted(m.model_fields)


def config_hash(cfg: BaseModel) -> str:
    """Stable 12-hex-digit sha256 of a config's JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:12]


def require_uniform_privacy(sites: Mapping[str, SiteConfig] | Sequence[SiteConfig]) -> bool:
    """True if every site trains with DP, False if none does (a config check: needs no torch).

    Raises:
        ConfigError: some sites have ``privacy`` and others not (names both groups): their g differ
        (GroupNorm vs BatchNorm), so their states cannot be averaged.
    """
    items = list(sites.values()) if isinstance(sites, Mapping) else list(sites)
    dp = [s.site_id for s in items if s.privacy is not None]
    plain = [s.site_id for s in items if s.privacy is None]
    if dp and plain:
        raise ConfigError(f"a federation runs DP on all sites or none: sites {dp} set 'privacy' but {plain} do not "
                          "(DP replaces g's BatchNorm by GroupNorm, so the models differ)")
    return bool(dp)
