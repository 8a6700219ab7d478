"""How well a stage-1 backbone's patch features separate bird from background on Waterbirds-lite validation images.

Diagnostic only (it reads ground-truth masks of the validation split, never the test split): for a backbone loaded
from ``--pretrained-file`` (or random init without it), a logistic-regression probe from each patch feature to
"patch is > 50% bird", fitted on half of the validation images and scored on the other half (patch IoU of its
predictions), and the best 2-means cluster's patch IoU (the unsupervised split part discovery would have to find).

    python benchmarks/results/waterbirds_lite/feature_probe.py [--pretrained-file backbone.safetensors]
"""

import argparse
import json

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.linear_model import LogisticRegression

import faithful_vit
from faithful_vit.data.mask_stats import gt_patch_fraction
from faithful_vit.model_spec import build_dataset, data_spec


def iou(pred, truth):
    return float((pred & truth).sum() / max((pred | truth).sum(), 1))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pretrained-file", default=None)
    parser.add_argument("--model", default="faithful_tiny_wblite")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = faithful_vit.create_model(args.model, pretrained_file=args.pretrained_file).eval()
    batch = build_dataset(data_spec("waterbirds_lite"), "val", augment=False).tensors()
    with torch.no_grad():
        tokens = model.stage1.forward_features(batch.images)[:, model.stage1.num_prefix_tokens :]
    truth = (gt_patch_fraction(batch.fg_masks, model.patch_size[0]).flatten(1) > 0.5).numpy()
    features = tokens.numpy()
    half = len(features) // 2
    fit_x, fit_y = features[:half].reshape(-1, features.shape[-1]), truth[:half].reshape(-1)
    probe = LogisticRegression(max_iter=2000, class_weight="balanced").fit(fit_x, fit_y)
    probe_pred = probe.predict(features[half:].reshape(-1, features.shape[-1])).astype(bool)
    flat = features.reshape(-1, features.shape[-1])
    clusters = KMeans(2, n_init=4, random_state=0).fit_predict(flat)
    best_cluster = max(iou(clusters == c, truth.reshape(-1)) for c in range(2))
    print(
        json.dumps(
            {
                "pretrained_file": args.pretrained_file,
                "linear_probe_patch_iou": iou(probe_pred, truth[half:].reshape(-1)),
                "kmeans2_best_cluster_patch_iou": best_cluster,
                "bird_patch_fraction": float(truth.mean()),
            }
        )
    )


if __name__ == "__main__":
    main()
