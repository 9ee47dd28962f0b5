"""Teacher maps for distillation from the TTA ensemble (issue 21): computed once, stored with a run.

A converged model's TTA prediction (4 flips x the multi-scale sizes) is better than its single
pass near polyp boundaries. Distillation trains a single-pass student on those soft maps beside
the labels (``loss.distill_weight``, training/losses.py), so the student keeps one pass at inference.

    python -m effiseg.training.distill CHECKPOINT --data DATA --output runs/teacher-train.npz --tta multiscale

(``--tta`` as effiseg-run and effiseg-eval take it, one resolver: ``multiscale``, the default here, is
the teacher's validation-chosen setting from its config, or flips at ``--tta-sizes`` for a checkpoint
that records none, e.g. a protocol run's.)

The file holds one uint8 map (probability x 255, rounded: an error of at most 1/510) per training image at the training input size, keyed by stem, with the teacher's settings.
:func:`load_teacher_maps` returns them in the training set's order, as the trainer stacks its masks.

Training with them: ``effiseg-train --set teacher_maps=FILE --set loss.distill_weight=0.5``; the
trainer stacks the maps (divided by 255) as the masks' second channel, which the augmentation moves
with the label and the loss reads as soft targets.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .data import Sample


def teacher_maps(model, config: dict, samples: list[Sample], size: int, device="cpu", batch_size: int = 4,
                 tta: bool = True, tta_sizes=()) -> np.ndarray:
    """(N, size, size) uint8 teacher probabilities (x 255) at the training input size."""
    import torch
    import torch.nn.functional as F

    from .evaluate import predict_logits
    maps = []
    for start in range(0, len(samples), batch_size):
        chunk = [s.image for s in samples[start:start + batch_size]]
        for lg in predict_logits(model, config, chunk, device, batch_size, tta, tta_sizes=tta_sizes):
            t = torch.from_numpy(lg)[None, None]
            if t.shape[-2:] != (size, size):  # as stack_samples resizes the images (bilinear)
                t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
            maps.append(np.rint(torch.sigmoid(t)[0, 0].numpy() * 255.0).astype(np.uint8))
    return np.stack(maps)


def save_teacher_maps(path: str | Path, stems: list[str], maps: np.ndarray, meta: dict) -> Path:
    path = Path(path)
    if len(stems) != len(maps):
        raise ValueError(f"{len(stems)} stems but {len(maps)} teacher maps")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, stems=np.array(stems), maps=maps, meta=np.array(json.dumps(meta, sort_keys=True)))
    tmp.replace(path)
    return path


def load_teacher_maps(path: str | Path, stems: list[str], size: int) -> np.ndarray:
    """(N, 1, size, size) uint8 maps in the order of ``stems``; a ValueError naming the file when a
    stem has no map or the maps were made at another size."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            stored = [str(s) for s in data["stems"]]
            maps = data["maps"]
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"{path}: not a teacher-map file written by effiseg.training.distill ({e})") from e
    if maps.shape[1:] != (size, size):
        raise ValueError(f"{path}: teacher maps are {maps.shape[2]}x{maps.shape[1]}, the training size is "
                         f"{size}x{size}; write them again with --size {size}")
    index = {s: i for i, s in enumerate(stored)}
    missing = [s for s in stems if s not in index]
    if missing:
        raise ValueError(f"{path}: no teacher map for {len(missing)} training image(s), e.g. {missing[:5]}")
    return maps[[index[s] for s in stems]][:, None]


def _command():
    import click

    from effiseg.runtime.cli import tta_sizes_option
    from effiseg.runtime.tta import TTA_CHOICES
    from effiseg.runtime.console import Command

    from .data import DEFAULT_DATA_ROOT

    @click.command(cls=Command, context_settings={"show_default": True})
    @click.argument("checkpoint", type=click.Path(path_type=Path, exists=True))
    @click.option("--data", "data_root", default=DEFAULT_DATA_ROOT)
    @click.option("--split", default="train", help="The images the student trains on ('none': --data/images).")
    @click.option("--output", "out_file", type=click.Path(path_type=Path, dir_okay=False), required=True)
    @click.option("--size", type=click.IntRange(32), default=None, help="Training input size (default: the teacher's).")
    @click.option("--tta", type=click.Choice(TTA_CHOICES), default="multiscale",
                  help="The teacher's passes: multiscale (the ensemble: its validation-chosen flips and sizes), "
                       "flip (4 passes) or none (a one-pass teacher).")
    @click.option("--tta-sizes", default=None, callback=tta_sizes_option, metavar="SIZES",
                  help="Replace the multi-scale sizes of --tta, e.g. 352,416 (needed with --tta multiscale when the "
                       "checkpoint records no recommendation).")
    @click.option("--device", default="auto")
    @click.option("--batch-size", type=click.IntRange(1), default=4)
    @click.option("--limit", type=click.IntRange(1), default=None)
    def distill_command(checkpoint, data_root, split, out_file, size, tta, tta_sizes, device, batch_size, limit):
        """Write CHECKPOINT's TTA probability maps of a split's images, the soft targets of a student."""
        import sys

        from .checkpoint import load_model
        from .data import DatasetError, load_split
        from .trainer import resolve_device
        from .tta import resolve_tta_choice
        try:
            samples = load_split(data_root, None if split == "none" else split, limit)
            dev = resolve_device(device)
            model, cfg = load_model(checkpoint, device=dev)
            flips, sizes, _ = resolve_tta_choice(cfg, tta, tta_sizes)
            size = int(size or cfg.input_size)
            click.echo(f"teacher maps of {len(samples)} {split} images, flips {flips}, sizes {list(sizes)}", err=True)
            maps = teacher_maps(model, cfg, samples, size, dev, batch_size, flips, sizes)
            meta = {"checkpoint": str(checkpoint), "split": split, "size": size, "tta_choice": tta, "tta": flips,
                    "tta_sizes": list(sizes), "variant": cfg.variant}
            save_teacher_maps(out_file, [s.stem for s in samples], maps, meta)
        except (FileNotFoundError, DatasetError, ValueError, KeyError, RuntimeError) as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        click.echo(f"wrote {out_file}")

    return distill_command


if __name__ == "__main__":  # pragma: no cover
    _command()()
