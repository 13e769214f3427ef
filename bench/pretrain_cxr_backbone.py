"""A chest X-ray backbone for the copy detector, pretrained here on real radiographs, for
`tools/train_copy_detector --backbone-weights` (Dar et al. start from ImageNet weights, which cannot be
downloaded on these machines; real radiographs are the closest pretraining data at hand).

    python bench/pretrain_cxr_backbone.py --out cxr_tiny32.safetensors [--backbone tiny --size 32 --epochs 20]

Self-supervised exactly as the copy detector (NT-Xent, rotation/flip positives, per-image [0, 1]
rescaling) on the NIH ChestX-ray14 sample (../shared/data/nih-cxr14-sample; 1,607 images of 1,283
patients), split by patient 90/10 for the checkpoint choice. Writes the network's state dict
(safetensors); its projection head is replaced when it is loaded as a backbone.
"""
from __future__ import annotations

import argparse
import os

import numpy as np
from safetensors.torch import save_file

from data_pipeline.atomic_files import atomic_path
from data_pipeline.cache import load_or_build_cache
from data_pipeline.nih import read_nih
from engine.audit.copy_detection import BACKBONES, CopyDetectorConfig, train_copy_detector

NIH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "nih-cxr14-sample")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--nih", default=os.path.normpath(NIH))
    ap.add_argument("--backbone", choices=BACKBONES, default="tiny")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--cache-dir", default="/tmp/memdiff_nih_cache")
    args = ap.parse_args()
    if not os.path.isdir(args.nih):
        raise SystemExit(f"{args.nih}: the NIH sample is not there")
    records = read_nih(args.nih).records
    cache = load_or_build_cache(records, args.size, args.cache_dir, progress=False)
    ok = np.asarray(cache.ok, bool)
    images = np.asarray(cache.images)[ok]
    patients = np.array([r.patient_id for r, good in zip(records, ok) if good])
    held = np.isin(patients, np.random.default_rng(0).permutation(np.unique(patients))[: len(np.unique(patients)) // 10])
    det = train_copy_detector(images[~held], images[held], CopyDetectorConfig(backbone=args.backbone, epochs=args.epochs),
                              progress=True)
    with atomic_path(args.out) as tmp:
        save_file({k: v.detach().contiguous() for k, v in det.model.state_dict().items()}, str(tmp))
    print(f"{args.out}: {args.backbone} backbone, {int((~held).sum())} training / {int(held.sum())} held-out NIH "
          f"images at {args.size} px, best epoch {det.info['best_epoch']} (validation loss {det.info['best_val_loss']:.4f})")


if __name__ == "__main__":
    main()
