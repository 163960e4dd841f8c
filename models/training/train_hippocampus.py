"""Train the shipped hippocampus segmentation network (MONAI 3-D UNet) on CPU and write weights + card figures.

Usage (from the repository root; the data set lives next to the repository, as in CI)::

    nice -n 10 python -m models.training.train_hippocampus --out models/weights

Data: the Medical Segmentation Decathlon Task04 training crops in ``../shared/data/mr/hippocampus_msd``
(Vanderbilt; 1 mm T1-weighted crops around one hippocampus; expert labels 1 = anterior, 2 = posterior).
Protocol, chosen so that the card's figures are an honest estimate:

- split by subject, not by crop. The set numbers its crops in pairs from one person: crops ``2k-1`` and ``2k``
  share the scanner's intensity scaling (median log-ratio of their median intensities 0.03, against 0.29 for the
  neighbours ``2k`` and ``2k+1``, and the same stored data type in 50 of 50 complete pairs against 38 of 48), so
  subject = ``(id + 1) // 2``; a fifth of the subjects, drawn with a fixed seed, form the validation split;
- seeded everything (subject draw, data order, augmentation, initialisation), deterministic algorithms, 2 threads;
- a fixed recipe (epochs, learning-rate schedule) with no early stopping: the validation split is read once,
  after the weights are written, by reloading them exactly as the analyzer does, and only to fill in the card;
- augmentation: 32x56x32 patches around the hippocampus with random offsets (translation), small rotations
  (+/- 10 degrees) and scaling (0.9-1.1), gamma and linear intensity jitter. No flips: the crops share one
  handedness and label 1 is the anterior end.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the conventional torch alias

from models.hippocampus_net import (
    LABELS,
    NETWORK_VOXEL_MM,
    UNetConfig,
    build_unet,
    case_figures,
    load_shipped_segmenter,
    normalise_intensity,
    summarise_figures,
)
from models.weights_io import load_checked, save_pinned, sha256_of_file

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "mr" / "hippocampus_msd"
CARD_PATH = REPO_ROOT / "models" / "cards" / "mr-hippocampus.json"
WEIGHTS_NAME = "hippocampus_unet.pt"

SPLIT_SEED = 20240521
VALIDATION_FRACTION = 0.2
PATCH = (32, 56, 32)
"""Training patch (mm = voxels), drawn around the hippocampus's centre with +/- ``JITTER`` voxels; every training
crop is edge-padded to at least ``PATCH + 8`` first. Smaller than a crop to keep a training run to tens of CPU
minutes; the network is fully convolutional and segments whole crops."""
JITTER = 6

DICE_TARGET = 0.88
DICE_TARGET_SOURCE = (
    "issue #21: mean Dice >= 0.88 on the validation split; anchor nnU-Net 0.90 (anterior) / 0.89 (posterior) "
    "on MSD Task04 (Isensee et al., Nat Methods 2021)"
)


@dataclass(frozen=True)
class Case:
    """One labelled crop: its MSD number, its subject (see the module docstring), image and labels (x, y, z), and
    the NIfTI voxel-to-RAS affine (the identity in this copy: 1 mm, axes right, anterior, superior)."""

    case_id: int
    image: np.ndarray
    labels: np.ndarray
    affine: np.ndarray

    @property
    def subject(self) -> int:
        return subject_of(self.case_id)


def subject_of(case_id: int) -> int:
    """The person a crop belongs to: MSD Task04 numbers the two hippocampi of one subject ``2k-1`` and ``2k``."""
    return (case_id + 1) // 2


def case_id_of(path: Path) -> int:
    return int(path.name.removesuffix(".nii.gz").rsplit("_", 1)[1])


def labelled_case_ids(data_dir: Path) -> list[int]:
    """Crops that have both an image and a label file (the copy here has one of each without its partner)."""
    images = {case_id_of(p) for p in (data_dir / "images").glob("*.nii.gz")}
    labels = {case_id_of(p) for p in (data_dir / "labels").glob("*.nii.gz")}
    return sorted(images & labels)


def read_case(data_dir: Path, case_id: int) -> Case:
    import nibabel
    from nibabel.spatialimages import SpatialImage

    name = f"hippocampus_{case_id:03d}.nii.gz"
    image = nibabel.load(str(data_dir / "images" / name))
    labels = nibabel.load(str(data_dir / "labels" / name))
    if not isinstance(image, SpatialImage) or not isinstance(labels, SpatialImage):
        raise ValueError(f"{name} is not a NIfTI image in both images/ and labels/")
    return Case(
        case_id,
        np.asarray(image.dataobj, dtype=np.float32),
        np.rint(np.asarray(labels.dataobj)).astype(np.uint8),
        np.asarray(image.affine, dtype=np.float64),
    )


def subject_split(case_ids: list[int], seed: int = SPLIT_SEED, fraction: float = VALIDATION_FRACTION) -> list[int]:
    """The validation case ids: all crops of a seeded random fifth of the subjects."""
    subjects = sorted({subject_of(c) for c in case_ids})
    rng = np.random.default_rng(seed)
    chosen = set(rng.choice(subjects, size=round(fraction * len(subjects)), replace=False).tolist())
    return [c for c in case_ids if subject_of(c) in chosen]


# ---------------------------------------------------------------------------------------------------------------
# Training


def padded(case: Case) -> tuple[np.ndarray, np.ndarray]:
    """Normalised image and labels, edge-padded (labels: zero-padded) to at least the patch plus 8 voxels."""
    image = normalise_intensity(case.image)
    extra = [max(p + 8, s) - s for p, s in zip(PATCH, image.shape, strict=True)]
    pads = [(e // 2, e - e // 2) for e in extra]
    return np.pad(image, pads, mode="edge"), np.pad(case.labels, pads, mode="constant")


def sample_patches(
    data: list[tuple[np.ndarray, np.ndarray]], index: list[int], generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of random ``PATCH``-sized windows, one from each chosen case."""
    images, labels = [], []
    for i in index:
        image, label = data[i]
        centre = [float(c.mean()) for c in np.nonzero(label)]
        corner = [
            min(max(round(c - p / 2) + int(torch.randint(-JITTER, JITTER + 1, (1,), generator=generator)), 0), s - p)
            for c, p, s in zip(centre, PATCH, image.shape, strict=True)
        ]
        window = tuple(slice(c, c + p) for c, p in zip(corner, PATCH, strict=True))
        images.append(torch.from_numpy(np.ascontiguousarray(image[window])))
        labels.append(torch.from_numpy(np.ascontiguousarray(label[window])))
    return torch.stack(images)[:, None], torch.stack(labels)[:, None].float()


def augment(
    images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random rotation (+/- 10 degrees about each axis) and scaling (0.9-1.1), then gamma and linear intensity."""
    n = images.shape[0]

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(*shape, generator=generator)

    angles = uniform(-10.0, 10.0, n, 3) * math.pi / 180.0
    scale = uniform(0.9, 1.1, n)
    rotations = []
    for a, b, c in angles:
        rx = torch.tensor([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
        ry = torch.tensor([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
        rz = torch.tensor([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
        rotations.append(rx @ ry @ rz)
    matrix = torch.stack(rotations) / scale[:, None, None]
    theta = torch.cat([matrix, torch.zeros(n, 3, 1)], dim=2).float()
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    labels = F.grid_sample(labels, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    low = images.amin(dim=(1, 2, 3, 4), keepdim=True)
    high = images.amax(dim=(1, 2, 3, 4), keepdim=True)
    unit = (images - low) / (high - low).clamp_min(1e-6)
    gamma = torch.exp(uniform(-0.3, 0.3, n, 1, 1, 1, 1))
    images = low + unit**gamma * (high - low)
    images = images * uniform(0.9, 1.1, n, 1, 1, 1, 1) + uniform(-0.1, 0.1, n, 1, 1, 1, 1)
    return images, labels


def train(
    cases: list[Case], config: UNetConfig, *, epochs: int, batch_size: int, learning_rate: float, seed: int
) -> tuple[torch.nn.Module, list[dict[str, float]]]:
    from monai.losses import DiceCELoss

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    network = build_unet(config)
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True)
    optimiser = torch.optim.AdamW(network.parameters(), lr=learning_rate, weight_decay=1e-4)
    data = [padded(c) for c in cases]
    steps_per_epoch = math.ceil(len(data) / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=learning_rate, total_steps=epochs * steps_per_epoch, pct_start=0.1
    )
    log: list[dict[str, float]] = []
    started = time.monotonic()
    for epoch in range(epochs):
        network.train()
        order = torch.randperm(len(data), generator=generator).tolist()
        losses = []
        for start in range(0, len(order), batch_size):
            images, labels = augment(*sample_patches(data, order[start : start + batch_size], generator), generator)
            loss = loss_function(network(images), labels)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            losses.append(float(loss.detach()))
        entry = {"epoch": epoch, "loss": float(np.mean(losses)), "minutes": (time.monotonic() - started) / 60.0}
        log.append(entry)
        print(f"epoch {epoch:3d} loss {entry['loss']:.4f} ({entry['minutes']:.1f} min)", flush=True)
    network.eval()
    return network, log


# ---------------------------------------------------------------------------------------------------------------
# Validation figures (on the written weights, loaded as the analyzer loads them)


def evaluate_weights(path: Path, cases: list[Case]) -> tuple[dict[str, dict[str, float]], list[dict[str, float]]]:
    segmenter = load_shipped_segmenter(path)
    rows = [{"case": float(c.case_id), **case_figures(c.labels, segmenter.segment(c.image))} for c in cases]
    return summarise_figures(rows, [c.subject for c in cases]), rows


def method_offset(data_dir: Path, case_ids: list[int]) -> dict[str, Any]:
    """How the training labels' own volumes sit on the nomogram: the share of expert-traced crops below the women's
    5th percentile at the chart's youngest and oldest ages. A large share in a set of mostly young adults measures
    the difference between the two methods (MSD protocol on a crop vs FSL FIRST), which the card must state."""
    from models.hippocampus_nomogram import AGES, ATROPHY_PERCENTILE, WOMEN_RIGHT_MM3

    volumes = np.array([float((read_case(data_dir, c).labels > 0).sum()) for c in case_ids])  # mm3 at 1 mm
    fifth = WOMEN_RIGHT_MM3[ATROPHY_PERCENTILE]
    return {
        "expert_total_volume_ml": {
            "mean": round(float(volumes.mean()) / 1000.0, 3),
            "sd": round(float(volumes.std(ddof=1)) / 1000.0, 3),
            "crops": len(case_ids),
        },
        f"share_below_womens_5th_percentile_at_{AGES[0]}": round(float((volumes < fifth[0]).mean()), 3),
        f"share_below_womens_5th_percentile_at_{AGES[-1]}": round(float((volumes < fifth[-1]).mean()), 3),
        "note": "expert (reference) volumes of all labelled crops of the MSD set (adults, healthy or with a psychotic "
        "disorder, both sexes) against the women's 5th-percentile curve; if both methods measured the same quantity, "
        "few such crops (of the order of 5 % or fewer) would fall below it",
    }


def update_card(
    digest: str,
    figures: dict[str, dict[str, float]],
    validation_ids: list[int],
    training_ids: list[int],
    recipe: dict[str, Any],
    log: list[dict[str, float]] | None,
    offset: dict[str, Any],
) -> None:
    """Write the machine-measured parts of the model card; hand-written prose is kept."""
    card: dict[str, Any] = json.loads(CARD_PATH.read_text()) if CARD_PATH.is_file() else {}
    dice_mean = figures["dice_mean"]
    bias, low, high = (
        figures[f"total_volume_ml_{k}"]["value"]
        for k in ("bias", "lower_limit_of_agreement", "upper_limit_of_agreement")
    )
    subjects = len({subject_of(c) for c in validation_ids})
    card["validation"] = {
        **card.get("validation", {}),
        "summary": (
            f"Validation split of the MSD Task04 training set ({len(validation_ids)} crops of {subjects} subjects, "
            f"never trained on), measured on the shipped weights: mean Dice {dice_mean['value']:.3f} "
            f"(95% CI {dice_mean['ci95_low']:.3f}-{dice_mean['ci95_high']:.3f}; anterior "
            f"{figures['dice_anterior']['value']:.3f}, posterior {figures['dice_posterior']['value']:.3f}); total "
            f"volume bias {bias:+.3f} mL, 95% limits of agreement {low:+.3f} to {high:+.3f} mL."
        ),
        "dataset": (
            f"../shared/data/mr/hippocampus_msd, split 'validation': cases {validation_ids[0]}..{validation_ids[-1]} "
            f"listed under validation.cases ({len(validation_ids)} crops, {subjects} subjects, seed {SPLIT_SEED})"
        ),
        "figures": figures,
        "decision_rule": "each voxel takes the label of the largest softmax output (argmax); the largest connected "
        "hippocampus is kept. No probability threshold is involved.",
        "confidence_intervals": "percentile bootstrap over subjects (both crops of a subject drawn together), "
        "2000 resamples, seed 20231",
        "cases": validation_ids,
        "per_case": "imaging-cds evaluate mr-hippocampus --dataset ../shared/data/mr/hippocampus_msd --split "
        "validation --json OUT writes each crop's Dice and volumes",
    }
    card["weights"] = {"file": f"models/weights/{WEIGHTS_NAME}", "sha256": digest}
    card["targets"] = [
        {
            "figure": "dice_mean",
            "target": f">= {DICE_TARGET}",
            "source": DICE_TARGET_SOURCE,
            "measured": dice_mean["value"],
            "met": dice_mean["value"] >= DICE_TARGET,
        }
    ]
    card["training_recipe"] = {**recipe, "training_cases": len(training_ids)}
    card["method_offset"] = offset
    if log is not None:
        card["training_log"] = [{k: round(v, 4) for k, v in e.items()} for e in log[:: max(1, len(log) // 20)]]
    CARD_PATH.write_text(json.dumps(card, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA_DIR)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "models" / "weights")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--res-units", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="train on the first N training cases (smoke test)")
    parser.add_argument("--no-card", action="store_true", help="write the weights only (validation not read)")
    parser.add_argument(
        "--card-only", action="store_true", help="do not train: re-measure the shipped weights and rewrite the card"
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(2)
    torch.set_flush_denormal(True)  # tiny activations late in training otherwise slow CPU convolutions many-fold
    torch.use_deterministic_algorithms(True)
    case_ids = labelled_case_ids(args.data)
    validation_ids = subject_split(case_ids)
    training_ids = [c for c in case_ids if c not in set(validation_ids)]
    weights_path = args.out / WEIGHTS_NAME
    recipe: dict[str, Any] = {}
    log = None
    if not args.card_only:
        config = UNetConfig(
            channels=tuple(args.channels), strides=(2,) * (len(args.channels) - 1), num_res_units=args.res_units
        )
        cases = [read_case(args.data, c) for c in training_ids[: args.limit]]
        print(
            f"training on {len(cases)} crops of {len({c.subject for c in cases})} subjects; "
            f"{len(validation_ids)} validation crops held out",
            flush=True,
        )
        recipe = {
            "network": config.as_dict(),
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "learning_rate": args.learning_rate,
            "schedule": "one-cycle (10 % warm-up), AdamW, weight decay 1e-4",
            "loss": "Dice + cross-entropy (monai.losses.DiceCELoss)",
            "patch": list(PATCH),
            "seed": args.seed,
        }
        started, cpu_started = time.monotonic(), time.process_time()
        network, log = train(
            cases,
            config,
            epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            seed=args.seed,
        )
        recipe["wall_minutes"] = round((time.monotonic() - started) / 60.0, 1)
        recipe["cpu_minutes"] = round((time.process_time() - cpu_started) / 60.0, 1)
        checkpoint = {
            "format": "imaging-cds hippocampus unet v1",
            "network": config.as_dict(),
            "state_dict": {k: v.detach().clone() for k, v in network.state_dict().items()},
            "labels": {str(k): v for k, v in LABELS.items()},
            "voxel_mm": NETWORK_VOXEL_MM,
            "frame": "RAS (MSD Task04 crop frame)",
            "recipe": recipe,
            "training_log": log,
        }
        digest = save_pinned(checkpoint, weights_path)
        print(f"wrote {weights_path} sha256 {digest}", flush=True)
        if args.no_card:
            return
    else:
        shipped = load_checked(weights_path)
        recipe, log = dict(shipped.get("recipe", {})), shipped.get("training_log")
    validation = [read_case(args.data, c) for c in validation_ids]  # read once, after the weights exist
    figures, _ = evaluate_weights(weights_path, validation)
    for name, estimate in figures.items():
        print(
            f"validation {name:42s} {estimate['value']:+.4f} [{estimate['ci95_low']:+.4f}, "
            f"{estimate['ci95_high']:+.4f}]"
        )
    offset = method_offset(args.data, case_ids)
    update_card(sha256_of_file(weights_path), figures, validation_ids, training_ids, recipe, log, offset)
    print(f"updated {CARD_PATH}")


if __name__ == "__main__":
    main()
