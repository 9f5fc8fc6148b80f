"""Making g trainable with per-sample gradients: BatchNorm -> GroupNorm, checks.

BatchNorm mixes the samples of a batch (and its running statistics are un-noised data statistics that
would travel to the server), so :func:`make_private_compatible` replaces every BatchNorm of g by
GroupNorm (Wu & He, "Group Normalization", ECCV 2018) and turns in-place activations off, then checks
the result with Opacus's ``ModuleValidator`` (Yousefpour et al. 2021). g's trainable state then has
other keys than the BatchNorm g of a non-DP site: **a federation runs DP on all its sites or on
none**, and the server builds its global g the same way (a site's reply audit compares the keys,
shapes and dtypes with :func:`autosam_core.trainable_state.state_mismatches`);
:func:`require_uniform_privacy` checks the site configs.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from ..autosam import AutoSam
from ..config import require_uniform_privacy  # noqa: F401  (a config check; re-exported here)
from .errors import DPCompatibilityError, warn_privacy as _warn

__all__ = ["MAX_GROUPS", "groupnorm_groups", "dp_incompatibilities", "make_private_compatible",
           "check_private_compatible", "make_autosam_private_compatible", "require_uniform_privacy"]

log = logging.getLogger("autosam_core.privacy")

MAX_GROUPS = 32

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def groupnorm_groups(channels: int, max_groups: int = MAX_GROUPS) -> int:
    """Number of GroupNorm groups that replaces a BatchNorm over ``channels`` channels.

    Rule: the largest divisor of ``channels`` that is <= ``max_groups`` (32, Wu & He, "Group
    Normalization", ECCV 2018) and <= channels / 2, so every group holds >= 2 channels. With one
    channel per group, a layer that sees a 1x1 map normalises a single value: its output is the
    bias alone and no gradient reaches what comes before. For ``channels == 1`` no such divisor
    exists: 1 group is returned with a :class:`PrivacyWarning`.

    Examples: 256 -> 32, 48 -> 24, 14 -> 7, 3 -> 1, 2 -> 1.

    Raises:
        ValueError: ``channels < 1`` or ``max_groups < 1``.
    """
    if channels < 1 or max_groups < 1:
        raise ValueError(f"groupnorm_groups needs channels >= 1 and max_groups >= 1, found {channels}, {max_groups}")
    limit = min(max_groups, channels // 2)
    for g in range(limit, 0, -1):
        if channels % g == 0:
            return g
    _warn("GroupNorm over 1 channel: each sample's channel is normalised alone (degenerate on a 1x1 map)")
    return 1


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    parent._modules[leaf] = new


def _has_trainable_params(m: nn.Module) -> bool:
    return any(p.requires_grad for p in m.parameters(recurse=False))


def _incompatibilities(module: nn.Module) -> list[tuple[str, str]]:
    from opacus.validators import ModuleValidator

    problems = []
    for name, m in module.named_modules():
        label = f"{name or '(root)'} ({type(m).__name__})"
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            problems.append((name, f"{label}: BatchNorm mixes the samples of a batch; replace it "
                                   "(make_private_compatible)"))
            continue
        if isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.track_running_stats:
            problems.append((name, f"{label}: track_running_stats=True keeps un-noised data statistics"))
        if getattr(m, "inplace", False) is True:
            problems.append((name, f"{label}: inplace=True breaks Opacus's backward hooks"))
        if _has_trainable_params(m):
            buffers = [b for b, _ in m.named_buffers(recurse=False)]
            if buffers:
                problems.append((name, f"{label}: trainable layer with buffers {buffers}"))
            validator = ModuleValidator.VALIDATORS.get(type(m))
            if validator is not None:
                problems.extend((name, f"{label}: {err}") for err in validator(m))
    return problems


def dp_incompatibilities(module: nn.Module) -> list[str]:
    """Reasons ``module`` cannot be trained with Opacus per-sample gradients, one line per problem,
    each naming its module (dotted name and type).

    Checks: any BatchNorm (of any subclass, trainable or not: it mixes the samples of a batch and
    its running statistics are un-noised data statistics); InstanceNorm with
    ``track_running_stats``; a trainable layer holding buffers (Opacus ``GradSampleModule.validate``);
    a module still ``inplace=True``; and every error of Opacus's registered module validators
    (``ModuleValidator.VALIDATORS``: e.g. LSTM, GRU, MultiheadAttention need Opacus's DP variants).
    Returns an empty list for a compatible module. The module's train/eval mode is not checked.
    Functional in-place ops inside a ``forward`` cannot be seen here (Opacus fails at the first
    backward pass instead).
    """
    return [text for _, text in _incompatibilities(module)]


def make_private_compatible(module: nn.Module, max_groups: int = MAX_GROUPS) -> nn.Module:
    """A copy of g that Opacus can train with per-sample gradients (``ModuleValidator.fix``, our rules).

    1. Every BatchNorm1d/2d/3d/SyncBatchNorm over C channels becomes ``GroupNorm(groups, C)`` with
       ``groups = groupnorm_groups(C)`` (>= 2 channels per group), the same eps and affine flag; the
       affine weight and bias are copied (running statistics are dropped). Each replacement is logged
       at INFO: module name, C, groups.
    2. Every module with ``inplace=True`` (ReLU, ReLU6, LeakyReLU, Hardtanh, Dropout, ...) gets
       ``inplace=False``: an in-place op on a hooked module's output breaks Opacus's backward hooks.
    3. :func:`dp_incompatibilities` and Opacus ``ModuleValidator.validate`` (in train mode) must then
       report nothing.

    The input module is not modified. The copy keeps the input's train/eval mode. Its state has
    other keys than the input's (see the module docstring).

    Args:
        module: g (any nn.Module), e.g. ``AutoSam.prompt_generator``.
        max_groups: upper bound on GroupNorm groups (32).

    Returns:
        The compatible copy.

    Raises:
        DPCompatibilityError (a ValueError): something cannot be fixed, e.g. a BatchNorm subclass with
        extra behaviour (timm's BatchNormAct2d), an LSTM, a trainable layer with buffers; the message
        names every offending module. Raised before any training.
    """
    from opacus.validators import ModuleValidator

    fixed = copy.deepcopy(module)
    unfixable = []
    for name, m in list(fixed.named_modules()):
        if not isinstance(m, nn.modules.batchnorm._BatchNorm):
            continue
        if type(m) not in _BN_TYPES:
            unfixable.append((name, f"{name} ({type(m).__name__}): BatchNorm subclass with extra behaviour; "
                                    "replace it by hand (e.g. timm GroupNormAct)"))
            continue
        c = m.num_features
        groups = groupnorm_groups(c, max_groups)
        ref = next(iter(m.parameters()), None)
        if ref is None:
            ref = m.running_mean if m.running_mean is not None else torch.empty(0)
        gn = nn.GroupNorm(groups, c, eps=m.eps, affine=m.affine, device=ref.device, dtype=ref.dtype)
        if m.affine:
            with torch.no_grad():
                gn.weight.copy_(m.weight)
                gn.bias.copy_(m.bias)
            gn.weight.requires_grad_(m.weight.requires_grad)
            gn.bias.requires_grad_(m.bias.requires_grad)
        gn.train(m.training)
        if name:
            _set_submodule(fixed, name, gn)
        else:  # the module itself is a BatchNorm
            fixed = gn
        log.info("DP: %s BatchNorm(C=%d) -> GroupNorm(groups=%d, %d channels per group)", name, c, groups, c // groups)
    n_inplace = 0
    for _, m in fixed.named_modules():
        if getattr(m, "inplace", False) is True:
            m.inplace = False
            n_inplace += 1
    if n_inplace:
        log.info("DP: set inplace=False on %d modules", n_inplace)
    skip = {name for name, _ in unfixable}
    problems = [text for _, text in unfixable] + [t for n, t in _incompatibilities(fixed) if n not in skip]
    was_training = fixed.training
    fixed.train()
    try:
        opacus_errors = ModuleValidator.validate(fixed, strict=False)
    finally:
        fixed.train(was_training)
    if problems or opacus_errors:
        lines = problems + [f"opacus: {e}" for e in opacus_errors if not problems]
        raise DPCompatibilityError("g cannot be trained with DP-SGD (Opacus per-sample gradients):\n  "
                                   + "\n  ".join(lines))
    return fixed


def check_private_compatible(module: nn.Module) -> None:
    """Raise :class:`DPCompatibilityError` naming each offending module if ``module`` is not DP-ready.

    Use before training; build g with :func:`make_private_compatible` (on every site and the server).
    """
    problems = dp_incompatibilities(module)
    if problems:
        raise DPCompatibilityError(
            "g is not ready for DP-SGD; build it with autosam_core.privacy.make_private_compatible (on every "
            "site and on the server, since it changes g's state keys):\n  " + "\n  ".join(problems))


def make_autosam_private_compatible(model: AutoSam, max_groups: int = MAX_GROUPS) -> AutoSam:
    """Replace ``model.prompt_generator`` in place by :func:`make_private_compatible` of it; returns ``model``.

    Call right after building the model, before loading any trainable state: on every DP site *and*
    on the server of a DP federation (the trainable state's keys change).
    """
    model.prompt_generator = make_private_compatible(model.prompt_generator, max_groups)
    return model
