"""Segmentation metrics, one concept per module.

* :mod:`.per_image` -- per-image Dice and IoU of binary masks (training, evaluation, benchmarks);
  ``from autosam_core.metrics import dice_iou`` keeps working.
* :mod:`.sunseg_conventions` -- the SUN-SEG (Ji et al. 2022) modes ``safe`` / ``toolbox``: input
  validation, per-frame rescaling and threshold levels, degenerate ground truth, constants.
* :mod:`.sunseg_frame` -- the per-frame SUN-SEG metrics (S_alpha, E_phi, weighted F, F_beta, Dice,
  sensitivity over 256 thresholds), computed by ``pysodmetrics`` with the modes' corrections.
* :mod:`.frame_files` -- pairing prediction files with ground-truth files (clip folders).
* :mod:`.sunseg_protocol` -- end-frame dropping, clip vs frame averaging, mean/max over thresholds:
  ``evaluate_frames``, ``evaluate_clips``.
* :mod:`.cli` -- ``autosam metrics`` (arguments and printing only).

The SUN-SEG modules are not imported here: ``pysodmetrics`` takes about 2 s to import and training
only needs :func:`dice_iou`.
"""

from .per_image import dice_iou

__all__ = ["dice_iou"]
