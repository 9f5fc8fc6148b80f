"""``autosam``: centralised training, evaluation, prediction, embedding cache, model info, simulation.

    autosam train CONFIG.yaml            train g (and h) on pooled data, choose the best epoch on a
                                         validation split, evaluate on the benchmark splits
    autosam evaluate --checkpoint CKPT   per-dataset Dice/IoU table (stdout + JSON)
    autosam predict --checkpoint CKPT --input DIR --output DIR
    autosam benchmark --checkpoint CKPT  paper Tables 1-2 rows side by side (BENCHMARK.md)
    autosam embed CONFIG.yaml            fill the SAM embedding cache
    autosam info [--json]                parameter counts and shapes
    autosam metrics --pred DIR --gt DIR [--video]   SUN-SEG metrics (S-alpha, E-phi, F-beta, Dice, ...)
    autosam simulate FEDERATION.yaml     simulated federation (added by server.autosam_cli)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .files import atomic_write_json

log = logging.getLogger("autosam")

POLYP_BENCHMARKS = [
    {"dataset": "Kvasir-SEG", "split": "pranet_test", "name": "Kvasir"},
    {"dataset": "CVC-ClinicDB", "split": "pranet_test", "name": "ClinicDB"},
    {"dataset": "CVC-ColonDB", "name": "ColonDB"},
    {"dataset": "ETIS-LaribPolypDB", "name": "ETIS"},
]


#: The project's logger trees: ``-v`` puts these at DEBUG; third-party libraries stay at INFO (PIL's
#: DEBUG lines alone were thousands per run).
PROJECT_LOGGERS = ("autosam", "autosam_core", "autosam_fl", "server", "client")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger().setLevel(logging.INFO)  # also where a handler was there before basicConfig
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.NOTSET)


def format_table(results: dict[str, dict], title: str = "") -> str:
    """Markdown table of {label: {"dice", "iou", "num_images"}} with Dice/IoU in percent."""
    lines = ([f"### {title}", ""] if title else []) + ["| dataset | images | Dice (%) | IoU (%) |", "|---|---:|---:|---:|"]
    for label, r in results.items():
        lines.append(f"| {label} | {r['num_images']} | {100 * r['dice']:.1f} | {100 * r['iou']:.1f} |")
    return "\n".join(lines)


def _runtime(args: argparse.Namespace, cfg=None) -> tuple[torch.device, str]:
    """(device, resolved precision) from ``--device``/``--precision``, else the config, else auto; logged."""
    from .precision import resolve_device, resolve_precision

    device = resolve_device(getattr(args, "device", None) or getattr(cfg, "device", None) or "auto")
    precision = resolve_precision(getattr(args, "precision", None) or getattr(cfg, "precision", None) or "auto", device)
    log.info("device %s, precision %s", device, precision)
    return device, precision


def _apply_inference_options(model, args: argparse.Namespace) -> None:
    """``--refine`` and ``--tta`` override the checkpoint's inference refinement and test-time
    augmentation (logged)."""
    if getattr(args, "refine", None) and args.refine != model.refine:
        log.info("refinement %s (checkpoint: %s)", args.refine, model.refine)
        model.refine = args.refine
    if getattr(args, "tta", None) and args.tta != model.tta:
        log.info("test-time augmentation %s (checkpoint: %s)", args.tta, model.tta)
        model.tta = args.tta


def _add_inference_arguments(p: argparse.ArgumentParser, tta: bool = True) -> None:
    p.add_argument("--refine", choices=("none", "box", "box_only"),
                   help="inference refinement instead of the checkpoint's: none (dense prompt only), box (plus the "
                        "box of each component of that mask), box_only (the boxes with SAM's no-mask embedding)")
    if tta:
        p.add_argument("--tta", choices=("none", "hflip"),
                       help="test-time augmentation instead of the checkpoint's: hflip averages the first pass with "
                            "that of the image mirrored left-right (one more SAM encoding per uncached image)")


def _add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="auto (default: CUDA when available) | cpu | cuda | cuda:N")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"),
                   help="autocast precision (default auto: bf16 where the CPU/GPU computes it fast, else fp32)")


# ----- train ------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from .central_training import train_central
    from .config import TrainJobConfig, load_yaml_config

    cfg = load_yaml_config(args.config, TrainJobConfig)
    if args.epochs is not None:  # through validation, like the YAML's own value
        cfg = _validated_override(cfg, args.config, ("train", "epochs"), args.epochs)
    summary = train_central(cfg, args.config, output=args.output, device=getattr(args, "device", None),
                            precision=getattr(args, "precision", None))
    results = summary.get("evaluation")
    if results:
        print(format_table(results, f"{cfg.name}: best checkpoint on the benchmark splits"))
        for line in _skipped_lines(results):
            print(line)
    print(f"\ntrained {summary['train_images']} images x {cfg.train.epochs} epochs in {summary['minutes']:.1f} min; "
          f"checkpoint {summary['checkpoint']}")
    return 0


def _validated_override(cfg, path, key: tuple[str, ...], value):
    """``cfg`` with ``key`` set to ``value`` and the whole config validated again.

    Raises:
        ConfigError: the new value breaks the key's rule (the message names the key and the value).
    """
    from pydantic import ValidationError

    from .config import ConfigError

    raw = cfg.model_dump()
    node = raw
    for k in key[:-1]:
        node = node[k]
    node[key[-1]] = value
    try:
        return type(cfg).model_validate(raw)
    except ValidationError as err:
        msgs = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']} (found {e.get('input')!r})" for e in err.errors())
        raise ConfigError(f"{path}: command-line override {'.'.join(key)}={value!r} is invalid: {msgs}") from None


def _skipped_lines(results: dict) -> list[str]:
    """One line per dataset that skipped pairs: 'skipped N in LABEL: <reasons>'."""
    return [f"skipped {r['skipped']} image/mask pair(s) in {label}: {r['skipped_reasons']}"
            for label, r in results.items() if r.get("skipped")]


# ----- evaluate / predict / embed / info ---------------------------------------------------------
def _refs_from_args(args) -> list:
    from .config import DataRef, TrainJobConfig, load_yaml_config

    if getattr(args, "config", None):
        cfg = load_yaml_config(args.config, TrainJobConfig)
        return cfg.evaluate
    if getattr(args, "data", None):
        refs = []
        for spec in args.data:
            dataset, _, split = spec.partition(":")
            refs.append(DataRef(dataset=dataset, split=split or None, limit=args.limit))
        return refs
    return [DataRef(**r, limit=args.limit) for r in POLYP_BENCHMARKS]


def _evaluate_validation(model, args: argparse.Namespace) -> dict:
    """``autosam evaluate --config YAML --validation``: the YAML's validation hold-out, drawn as
    :func:`autosam_core.central_training.training_split` draws it for training -> {"validation": results}.

    Raises:
        ConfigError: no ``--config``, or a config without a validation hold-out (val_fraction 0).
    """
    from .central_training import training_split
    from .config import ConfigError, TrainJobConfig, load_yaml_config, yaml_relative
    from .data.cache import EmbeddingCache
    from .evaluation import evaluate_pairs

    if not getattr(args, "config", None):
        raise ConfigError("--validation needs --config: the training YAML whose hold-out to evaluate")
    cfg = load_yaml_config(args.config, TrainJobConfig)
    if cfg.train.val_fraction <= 0:
        raise ConfigError(f"{args.config}: train.val_fraction is {cfg.train.val_fraction}: it holds out no "
                          "validation images")
    base = Path(args.config).resolve().parent
    _, val_pairs = training_split(cfg, base, where=str(args.config))
    cache = EmbeddingCache(model.sam, args.cache_dir or yaml_relative(cfg.cache_dir, base))
    r = evaluate_pairs(model, val_pairs, cache, surrogate=args.surrogate, progress=True, desc="validation")
    r.pop("per_image")
    return {"validation": r}


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluation import evaluate_refs
    from .model_factory import model_from_checkpoint

    device, precision = _runtime(args)
    model, meta = model_from_checkpoint(args.checkpoint, device=device, precision=precision)
    _apply_inference_options(model, args)
    if args.validation:
        results = _evaluate_validation(model, args)
    else:
        results = evaluate_refs(model, _refs_from_args(args), cache_dir=args.cache_dir, surrogate=args.surrogate)
    what = "h(g(I))" if args.surrogate else "AutoSAM SAM(g(I))"
    print(format_table(results, f"{what}, checkpoint {args.checkpoint} (SAM {meta.get('sam_kind')})"))
    for line in _skipped_lines(results):
        print(line)
    if args.json:
        atomic_write_json(Path(args.json), {"checkpoint": str(args.checkpoint), "method": what, "results": results},
                          indent=2, default=str)
        print(f"wrote {args.json}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from PIL import Image

    from .data.io import ImageFormatError, load_image
    from .model_factory import model_from_checkpoint

    src, dst = Path(args.input), Path(args.output)
    if not src.exists():  # before the model is built
        raise FileNotFoundError(f"input {'folder' if not src.suffix else 'file'} {src} does not exist "
                                "(--input takes an image file or a folder of images)")
    device, precision = _runtime(args)
    model, _ = model_from_checkpoint(args.checkpoint, device=device, precision=precision)
    _apply_inference_options(model, args)
    exts = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}
    files = sorted(p for p in src.iterdir() if p.suffix.lower() in exts) if src.is_dir() else [src]
    if not files:
        print(f"error: no images ({', '.join(sorted(exts))}) in {src}", file=sys.stderr)
        return 2
    (dst / "masks").mkdir(parents=True, exist_ok=True)
    (dst / "overlays").mkdir(parents=True, exist_ok=True)
    failed = []
    from tqdm import tqdm

    for f in tqdm(files, desc="predict", unit="img"):
        try:
            image = load_image(f)
        except (ImageFormatError, OSError) as err:
            failed.append(f"{f}: {err}")
            continue
        mask = (model.predict_logits(image, surrogate=args.surrogate) > 0).numpy()
        Image.fromarray((mask * 255).astype(np.uint8)).save(dst / "masks" / f"{f.stem}.png")
        overlay = image.astype(np.float32)
        overlay[mask] = 0.55 * overlay[mask] + 0.45 * np.array([0, 255, 0], np.float32)
        Image.fromarray(overlay.astype(np.uint8)).save(dst / "overlays" / f"{f.stem}.png")
    print(f"wrote {len(files) - len(failed)} masks to {dst / 'masks'} and overlays to {dst / 'overlays'}")
    for line in failed:
        print(f"skipped {line}", file=sys.stderr)
    return 1 if failed else 0


def cmd_embed(args: argparse.Namespace) -> int:
    from .config import TrainJobConfig, load_yaml_config, yaml_relative
    from .data.cache import EmbeddingCache
    from .data.io import load_image
    from .data.dataset import resolve_pairs
    from .sam import load_frozen_sam

    cfg = load_yaml_config(args.config, TrainJobConfig)
    base = Path(args.config).resolve().parent
    device, precision = _runtime(args, cfg)
    sam = load_frozen_sam(cfg.sam.kind, cfg.sam.checkpoint).to(device).set_precision(precision)
    cache = EmbeddingCache(sam, yaml_relative(cfg.cache_dir, base))
    train = [p.image_path for ref in cfg.train_data for p in resolve_pairs(ref, base)]
    test = [p.image_path for ref in cfg.evaluate for p in resolve_pairs(ref, base)]
    # Mirrored entries: the training images (and their validation hold-out) with train.hflip, every
    # evaluated image with model.tta hflip.
    mirrored = list(dict.fromkeys((train if cfg.train.hflip > 0 or cfg.model.tta == "hflip" else [])
                                  + (test if cfg.model.tta == "hflip" else [])))
    for what, paths, hflip in (("", train + test, False), ("mirrored ", mirrored, True)):
        if not paths:
            continue
        stats = cache.ensure(paths, load_image, hflip=hflip, desc=f"SAM embeddings{', mirrored' if hflip else ''}")
        print(f"{what}images: {stats['cached']} already cached, {stats['computed']} computed in "
              f"{stats['seconds']:.1f} s ({stats['seconds'] / max(stats['computed'], 1):.2f} s/image) under {cache.dir}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .config import ModelConfig, SamConfig
    from .model_factory import build_autosam

    keys = {"preset": args.preset, "surrogate": True, "g_input_size": args.g_input_size}
    if args.backbone:
        keys["backbone"] = args.backbone
    model_cfg = ModelConfig(**keys)
    model = build_autosam(SamConfig(kind=args.sam, checkpoint=args.sam_checkpoint), model_cfg)
    info = model.num_trainable_parameters()
    with torch.no_grad():
        model.eval()
        g_in = torch.zeros(1, 3, args.g_input_size, args.g_input_size) if model.reads_images else None
        dense = model.dense_prompt(torch.zeros(1, 256, *model.sam.spec.embedding_size), g_in)
    info.update({
        "preset": model_cfg.preset,
        "model": model_cfg.model_dump(),
        "sam_backbone": args.sam,
        "g_backbone": model_cfg.backbone,
        "g_input_size": args.g_input_size,
        "sam_input_size": model.sam.spec.input_size,
        "dense_prompt_shape": ["B", *dense.shape[1:]],
        "low_res_logits_shape": ["B", 1, *model.sam.spec.low_res_size],
        "g_state_megabytes": sum(v.numel() * v.element_size() for k, v in model.trainable_state().items()
                                 if k.startswith("prompt_generator.")) / 2**20,
    })
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:>22}: {v}")
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    from .benchmark import format_markdown, run_benchmark
    from .model_factory import model_from_checkpoint

    device, precision = _runtime(args)
    model, meta = model_from_checkpoint(args.checkpoint, device=device, precision=precision)
    _apply_inference_options(model, args)
    refs = _refs_from_args(args)
    info = {"checkpoint": str(args.checkpoint), "sam_kind": meta.get("sam_kind"), "backbone": meta.get("backbone"),
            "preset": (meta.get("model") or {}).get("preset"), "refine": model.refine, "tta": model.tta,
            "training": meta.get("training", "")}
    results = run_benchmark(model, refs, args.output, cache_dir=args.cache_dir, meta=info)
    print(format_markdown(results))
    print(f"wrote {Path(args.output) / 'BENCHMARK.md'}, benchmark.json and plots")
    return 0


def build_parser(extra_commands=None) -> argparse.ArgumentParser:
    """The ``autosam`` argument parser.

    ``extra_commands(subparsers)`` may add subcommands from outside the core: the federation's
    ``autosam simulate`` is added by :mod:`server.autosam_cli` (the core never imports the server).
    """
    p = argparse.ArgumentParser(prog="autosam", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true",
                   help="debug logs of AutoSAM-FL (other libraries stay at INFO)")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="centralised training from a YAML config")
    t.add_argument("config")
    t.add_argument("--epochs", type=int, help="override train.epochs")
    t.add_argument("--output", help="output folder (default <output_dir>/<name>)")
    _add_runtime_arguments(t)
    t.set_defaults(func=cmd_train)

    for name, func, help_ in (("evaluate", cmd_evaluate, "Dice/IoU per dataset"),
                              ("predict", cmd_predict, "masks + overlays for a folder of images")):
        e = sub.add_parser(name, help=help_)
        e.add_argument("--checkpoint", required=True)
        e.add_argument("--surrogate", action="store_true", help="use h(g(I)) instead of SAM(g(I))")
        if name == "evaluate":
            e.add_argument("--config", help="training YAML whose 'evaluate' list to use")
            e.add_argument("--validation", action="store_true",
                           help="with --config: evaluate on its validation hold-out (train.val_fraction of "
                                "train_data, seeded by train.seed, as `autosam train` drew it) instead of 'evaluate'")
            e.add_argument("--data", nargs="+", metavar="DATASET[:SPLIT]", help="datasets under the data root")
            e.add_argument("--limit", type=int, help="first N images of each split")
            e.add_argument("--json", help="write the results as JSON here")
            e.add_argument("--cache-dir")
        else:
            e.add_argument("--input", required=True, help="image file or folder")
            e.add_argument("--output", required=True)
        _add_inference_arguments(e)
        _add_runtime_arguments(e)
        e.set_defaults(func=func)

    b = sub.add_parser("benchmark", help="paper Tables 1-2 rows: AutoSAM, h, SAM with GT point/box/mask prompts")
    b.add_argument("--checkpoint", required=True)
    b.add_argument("--config", help="training YAML whose 'evaluate' list to use")
    b.add_argument("--data", nargs="+", metavar="DATASET[:SPLIT]")
    b.add_argument("--limit", type=int, help="first N images of each split")
    b.add_argument("--output", default="benchmark", help="folder for BENCHMARK.md, benchmark.json, plots")
    b.add_argument("--cache-dir")
    _add_inference_arguments(b)
    _add_runtime_arguments(b)
    b.set_defaults(func=cmd_benchmark)

    m = sub.add_parser("embed", help="fill the SAM embedding cache for a training YAML")
    m.add_argument("config")
    _add_runtime_arguments(m)
    m.set_defaults(func=cmd_embed)

    i = sub.add_parser("info", help="parameter counts and shapes of a g preset (default: paper)")
    i.add_argument("--json", action="store_true")
    i.add_argument("--sam", default="lite_medsam")
    i.add_argument("--sam-checkpoint")
    i.add_argument("--preset", choices=("paper", "sam_head"), default="paper",
                   help="g to describe (default paper: the paper's HarDNet-85 g, a YAML's default without "
                        "model.preset; every shipped polyp YAML and the demo use sam_head)")
    i.add_argument("--backbone", help="override the preset's g backbone (hardnet85, hardnet68, timm:<name>)")
    i.add_argument("--g-input-size", type=int, default=256)
    i.set_defaults(func=cmd_info)

    from .metrics.cli import add_metrics_arguments, cmd_metrics

    v = sub.add_parser("metrics", help="SUN-SEG image/video metrics of prediction maps against ground truth")
    add_metrics_arguments(v)
    v.set_defaults(func=cmd_metrics)

    if extra_commands is not None:
        extra_commands(sub)
    return p


def main(argv: list[str] | None = None, extra_commands=None) -> int:
    """Core entry point (``autosam`` without ``simulate``; :func:`server.autosam_cli.main` adds it).
    Configuration and data errors exit with status 2 and one clear line."""
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .sam import SamCheckpointError

    args = build_parser(extra_commands).parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except (ConfigError, CheckpointError, SamCheckpointError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
