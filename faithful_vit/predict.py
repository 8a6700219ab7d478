"""Predict with a trained model and see its masks: ``python -m faithful_vit.predict RUN IMAGES... --out DIR``.

For every image (files, or folders searched recursively for image files): the predicted class and its softmax
confidence, and ``<out>/figures/<nnnn>_<name>.png`` with the image, the part map over it (a colour per part, the
background in dark grey, a legend) and the kept patches (for the full-image baseline: its attention rollout, a heat
map with a colour bar), the prediction in the title. ``<out>/contact_sheet_<n>.png``
shows up to ``--sheet-size`` images each, and ``<out>/predictions.json`` holds every prediction (and any file that
could not be decoded, which is skipped). Images are resized (shorter side) and centre-cropped to the model's input
size, as the evaluation transform of the folder datasets does.

Examples::

    python -m faithful_vit.predict runs/20260101-120000 photos/ --model faithful_tiny --seed 0 --out predictions
    python -m faithful_vit.predict runs/x/faithful_tiny/seed0/checkpoints/best.pt bird.jpg --out out
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

from faithful_vit import engine, viz
from faithful_vit.cli import Parser, UsageError, add_backend_flag, positive_int, run_command
from faithful_vit.data.datasets import IMAGE_EXTENSIONS, load_image
from faithful_vit.data.sample import CorruptImageError, normalize
from faithful_vit.data.transforms import cub_original
from faithful_vit.distributed import unwrap
from faithful_vit.model_spec import SpecError, load_model
from faithful_vit.run_folder import RunFolderError, write_text

__all__ = ["find_images", "main", "predict_images"]


def find_images(inputs: list[str | Path]) -> list[Path]:
    """The image files named by ``inputs``: files as given, folders searched recursively (sorted).

    Raises:
        UsageError: an input that does not exist, or no image at all.
    """
    files = []
    for item in map(Path, inputs):
        if item.is_file():
            files.append(item)
        elif item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        else:
            raise UsageError(f"IMAGE_OR_FOLDER: no such file or folder: {item}")
    if not files:
        raise UsageError(f"IMAGE_OR_FOLDER: no image files ({', '.join(IMAGE_EXTENSIONS)}) in {list(map(str, inputs))}")
    return files


@torch.no_grad()
def predict_images(model: nn.Module, images: torch.Tensor) -> dict:
    """Class probabilities, kept patches and part maps of a batch of normalised images (evaluation mode).

    Returns:
        ``probabilities`` ``[B, num_classes]``, ``keep`` ``[B, N]`` or None, ``part_maps`` ``[B, K + 1, h, w]`` or
        None, ``rollout`` ``[B, h, w]`` (the full-image baseline's attention rollout) or None; all on the CPU.
    """
    module = unwrap(model)
    if module.uses_ground_truth_mask:
        raise UsageError("RUN_OR_CHECKPOINT: the oracle needs ground-truth masks; predict takes images only")
    model.eval()
    with viz.rollout_recorder(module) as recorder:
        out = model(images)
    keep, part_maps = out.keep, out.part_maps
    return {
        "probabilities": out.logits.float().softmax(dim=1).cpu(),
        "keep": None if keep is None else keep.cpu(),
        "part_maps": None if part_maps is None else part_maps.float().cpu(),
        "rollout": None if recorder is None else recorder.rollout(),
    }


def _stacked(sheet: list[dict], key: str) -> torch.Tensor | None:
    return None if sheet[0][key] is None else torch.stack([item[key] for item in sheet])


def _write_sheet(out_dir: Path, number: int, sheet: list[dict], patch_size: int, title: str) -> Path:
    panels = 1 + sum(sheet[0][key] is not None for key in ("keep", "part_maps", "rollout"))
    return viz.plot_masks(
        _stacked(sheet, "image"),
        out_dir / f"contact_sheet_{number}.png",
        keep=_stacked(sheet, "keep"),
        part_maps=_stacked(sheet, "part_maps"),
        rollout=_stacked(sheet, "rollout"),
        patch_size=patch_size,
        title=title,
        sample_titles=[item["title"] for item in sheet],
        samples_per_row=max(1, 6 // panels),  # about six panels across
    )


def run(args) -> dict:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device: expected a device this machine has, got {args.device!r} but CUDA is not available")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    files = find_images(args.images)
    model = load_model(args.checkpoint, model=args.model, seed=args.seed, device=device)
    spec, out_dir = model.spec, Path(args.out)
    image_size, patch_size = spec["model"]["image_size"], engine.patch_size_of(model)
    class_names = (spec.get("data") or {}).get("class_names") or [str(c) for c in range(spec["model"]["num_classes"])]
    transform = cub_original(image_size, train=False)
    name = spec["model"]["name"]
    predictions, skipped, sheet, sheets = [], [], [], []
    bar = tqdm(total=len(files), desc="predict", disable=args.no_progress or not sys.stderr.isatty())
    for start in range(0, len(files), args.batch_size):
        batch_files, images = [], []
        for path in files[start : start + args.batch_size]:
            try:
                images.append(normalize(transform(load_image(path))[0]))
                batch_files.append(path)
            except CorruptImageError as error:
                skipped.append({"file": str(path), "error": str(error)})
        bar.update(len(files[start : start + args.batch_size]))
        if not images:
            continue
        batch = torch.stack(images)
        result = predict_images(model, batch.to(device))
        confidence, label = result["probabilities"].max(dim=1)
        for i, path in enumerate(batch_files):
            index = len(predictions)
            title = f"{class_names[label[i]]} ({100 * confidence[i]:.1f}%)"
            item = {
                "image": batch[i],
                "keep": None if result["keep"] is None else result["keep"][i],
                "part_maps": None if result["part_maps"] is None else result["part_maps"][i],
                "rollout": None if result["rollout"] is None else result["rollout"][i],
                "title": f"{path.name}\n{title}",
            }
            figure = out_dir / "figures" / f"{index:04d}_{path.stem}.png"
            viz.plot_masks(
                batch[i : i + 1],
                figure,
                keep=_stacked([item], "keep"),
                part_maps=_stacked([item], "part_maps"),
                rollout=_stacked([item], "rollout"),
                patch_size=patch_size,
                title=f"{path.name}: {title}",
            )
            predictions.append(
                {
                    "file": str(path),
                    "figure": str(figure),
                    "label": int(label[i]),
                    "class": class_names[label[i]],
                    "confidence": float(confidence[i]),
                    "probabilities": result["probabilities"][i].tolist(),
                    "kept_fraction": 1.0 if item["keep"] is None else float(item["keep"].float().mean()),
                }
            )
            sheet.append(item)
            if len(sheet) == args.sheet_size:
                sheets.append(_write_sheet(out_dir, len(sheets) + 1, sheet, patch_size, name))
                sheet = []
    bar.close()
    if sheet:
        sheets.append(_write_sheet(out_dir, len(sheets) + 1, sheet, patch_size, name))
    report = {
        "checkpoint": spec["checkpoint"],
        "model": name,
        "class_names": class_names,
        "image_size": image_size,
        "contact_sheets": [str(path) for path in sheets],
        "predictions": predictions,
        "skipped": skipped,
    }
    write_text(out_dir / "predictions.json", json.dumps(report, indent=2))
    for item in predictions:
        print(f"{item['class']:>12}  {100 * item['confidence']:5.1f}%  {item['file']}")
    print(f"{len(predictions)} image(s), {len(skipped)} skipped; written: {out_dir / 'predictions.json'}")
    return report


def _build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m faithful_vit.predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", help="a run folder of train.py, a model or seed folder in it, or a .pt file")
    parser.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files or folders of images")
    parser.add_argument("--out", required=True, help="output folder (figures, contact sheets, predictions.json)")
    parser.add_argument("--model", default=None, help="which model of a run folder that holds several")
    parser.add_argument("--seed", type=int, default=None, help="which seed of a run folder that holds several")
    parser.add_argument(
        "--batch-size", type=positive_int, default=32, help="images per forward pass (default: %(default)s)"
    )
    parser.add_argument(
        "--sheet-size", type=positive_int, default=24, help="images per contact sheet (default: %(default)s)"
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda (default: auto)")
    add_backend_flag(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; bad input is one line on stderr and exit code 2."""
    return run_command("predict", _build_parser(), run, argv, errors=(SpecError, RunFolderError))


if __name__ == "__main__":
    sys.exit(main())
