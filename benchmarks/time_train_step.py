"""CPU time of the two-stage model's training step with trained weights, for two mask clean-ups (one thread).

Loads two trained ``faithful_tiny`` checkpoints (each with the ``mask_morphology`` it was trained with), and times,
interleaved, the full training step (both stages, every loss, backward, AdamW) on the same SpuriousShapes training
batches: the kept fraction, and so stage 2's work, is the one each trained stage 1 produces. Reports the median
process CPU time per step.

Example::

    OMP_NUM_THREADS=1 python benchmarks/time_train_step.py runs/a/faithful_tiny/seed1/checkpoints/best.pt open \
        runs/b/faithful_tiny/seed1/checkpoints/best.pt reconstruct
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import faithful_vit
from faithful_vit.data import SpuriousShapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs=4, metavar="CHECKPOINT MORPHOLOGY", help="two (checkpoint, mask_morphology)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per model (interleaved)")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    batch = SpuriousShapes("train").tensors()
    models = {}
    for path, morphology in zip(args.runs[::2], args.runs[1::2]):
        model = faithful_vit.create_model("faithful_tiny", mask_morphology=morphology)
        model.load_state_dict(torch.load(path, weights_only=True)["model"])
        optimizer = torch.optim.AdamW(model.param_groups(1e-4, 0.05))
        models[morphology] = (model.train(), optimizer)
    times: dict[str, list[float]] = {name: [] for name in models}
    kept: dict[str, list[float]] = {name: [] for name in models}
    torch.manual_seed(0)
    for step in range(args.steps + 1):
        index = torch.randint(len(batch.labels), (args.batch_size,))
        for name, (model, optimizer) in models.items():
            start = time.process_time()
            out = model(batch.images[index])
            loss = model.compute_losses(out, batch.images[index], batch.labels[index])["total"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step:  # the first step warms up
                times[name].append(time.process_time() - start)
                kept[name].append(out.kept_fraction.mean().item())
    print(
        json.dumps(
            {
                name: {"median_step_cpu_s": statistics.median(t), "train_kept_fraction": statistics.mean(kept[name])}
                for name, t in times.items()
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
