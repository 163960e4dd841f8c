"""Train the nodule analyzer's false-positive network, type cut-offs and suspicion model, on CPU, and write the card.

Usage::

    nice -n 10 python -m models.training.train_nodules --out models/weights

Data: the shared LIDC-IDRI volumes of interest (``../shared/data/ct/lidc_nodule_vois``), split by patient
(:func:`models.training.lidc_vois.split_of`: about 70 % train, 10 % validation, 20 % test), and the two whole
chest CTs the project has (pyradiomics ``lung1`` and ``lung2``, 5 mm slices, one labelled lesion each).

1. **Candidates.** The candidate stage (:func:`models.nodules.detect.find_candidates`) runs on every crop as
   acquired and thickened to 5 mm slices (thin slices averaged, as a thick reconstruction does). Candidates whose
   centre lies in the consensus mask are positives; those clear of it (vessels, fissures, airway walls, chest wall
   in the crop) are negatives. The crops hold no hilum, heart border or diaphragm and nothing above or below the
   nodule, so the candidates of the two whole CTs (their labelled lesion positive, everything else negative) are
   added: a network trained on crops alone accepted most whole-CT candidates (70 % of lung1's).
2. **False-positive network, cross-fitted by scan** (:class:`models.nodules.network.CandidateNet`): two networks,
   each trained on all training crops and ONE of the two whole CTs; the shipped model averages their logits. A
   scan's detection figures are measured with the network that never saw it, so they are honest estimates for
   the shipped ensemble (which saw both), and ``imaging-cds evaluate`` recomputes them the same way. AdamW,
   binary cross-entropy; each epoch takes every positive and as many negatives (the whole CT's always, the crops'
   drawn at random); augmentation by in-plane flips, 90-degree rotations, plane-order flips and +/- 20 HU noise;
   the epoch with the best validation AUC is kept. A threshold keeps 90 % of the validation nodules' candidates.
3. **Type cut-offs** (:class:`models.nodules.measure.TypeRule`): the two cut-offs on the share of the nodule at
   -300 HU or more that agree best (Cohen's kappa) with the radiologists' texture rating on the training patients.
4. **Suspicion model**: L2-regularised logistic regression of rating 4-5 against 1-2 on the measured features of
   the training patients' nodules; its threshold maximises Youden's J on the validation patients.
5. The test patients are read once, after the weights are written, through
   :func:`models.training.assess_nodules.assess_lidc` (the same code ``imaging-cds evaluate`` runs), to fill in the
   card's figures.

Seeded and deterministic; two torch threads.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the conventional torch alias

from models import metrics
from models.nodules.measure import TypeRule, classify_type, with_type_rule
from models.nodules.network import (
    SUSPICION_FEATURES,
    CandidateNet,
    CandidateNetConfig,
    SuspicionModel,
    models_from_checkpoint,
    suspicion_features,
)
from models.training.assess_nodules import (
    CandidateSet,
    MeasuredVoi,
    assess_lidc,
    card_figures,
    cohen_kappa,
    measure_voi,
    scan_candidates,
    scan_detection,
    voi_candidates,
)
from models.training.chest_scans import read_labelled_scans
from models.training.lidc_vois import SPLIT_RULE, iter_vois, thicken
from models.weights_io import load_checked, save_pinned, sha256_of_file

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA = REPO_ROOT.parent / "shared" / "data" / "ct" / "lidc_nodule_vois"
WHOLE_CTS = REPO_ROOT.parent / "shared" / "data" / "ct" / "chest_pyradiomics"
CARD = REPO_ROOT / "models" / "cards" / "ct-lung-nodules.json"
WEIGHTS_NAME = "lung_nodules.pt"
CANDIDATE_SENSITIVITY = 0.90


@dataclass
class CandidateData:
    patches: np.ndarray
    features: np.ndarray
    labels: np.ndarray
    splits: np.ndarray  # "train" / "val" / "test" for crops, "scan" for the whole CTs
    scans: np.ndarray  # the whole CT a candidate comes from ("" for crops)

    def subset(self, chosen: np.ndarray) -> CandidateData:
        return CandidateData(
            self.patches[chosen], self.features[chosen], self.labels[chosen], self.splits[chosen], self.scans[chosen]
        )


def collect(root: Path, whole_cts: Path) -> tuple[CandidateData, list[MeasuredVoi]]:
    """Candidates of every crop (as acquired and 5 mm thick) and of the whole CTs; every nodule measured."""
    patches, features, labels, splits, scans = [], [], [], [], []
    measured: list[MeasuredVoi] = []

    def add(found: CandidateSet, split: str, scan: str) -> None:
        chosen = found.inside | found.outside
        patches.append(found.patches[chosen])
        features.append(found.features[chosen])
        labels.append(found.inside[chosen].astype(np.float32))
        splits.extend([split] * int(chosen.sum()))
        scans.extend([scan] * int(chosen.sum()))

    for voi in iter_vois(root):
        measured.append(measure_voi(voi))
        for version in (voi, thicken(voi)):
            if version is not None:
                add(voi_candidates(version), voi.record.split, "")
    for scan in read_labelled_scans(whole_cts):
        add(scan_candidates(scan), "scan", scan.name)
    data = CandidateData(
        patches=np.concatenate(patches),
        features=np.concatenate(features),
        labels=np.concatenate(labels),
        splits=np.asarray(splits),
        scans=np.asarray(scans),
    )
    return data, measured


def augment(patches: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """In-plane flips and 90-degree turns, plane-order flips (anatomy has no preferred direction at this scale)."""
    n = patches.shape[0]
    out = patches
    flip_y = torch.rand(n, generator=generator) < 0.5
    out = torch.where(flip_y[:, None, None, None, None], out.flip(-2), out)
    flip_x = torch.rand(n, generator=generator) < 0.5
    out = torch.where(flip_x[:, None, None, None, None], out.flip(-1), out)
    turn = torch.rand(n, generator=generator) < 0.5
    out = torch.where(turn[:, None, None, None, None], out.transpose(-1, -2), out)
    flip_z = torch.rand(n, generator=generator) < 0.5
    out = torch.where(flip_z[:, None, None, None, None], out.flip(-3), out)
    noise = torch.randn(out.shape, generator=generator) * (20.0 / 700.0)
    return out + noise


def predict(net: CandidateNet, patches: np.ndarray, features: np.ndarray, batch: int = 512) -> np.ndarray:
    net.eval()
    out = []
    with torch.no_grad():
        for start in range(0, patches.shape[0], batch):
            x = torch.from_numpy(patches[start : start + batch])[:, None]
            f = torch.from_numpy(features[start : start + batch])
            out.append(((net(x, f) + net(x.flip(-1), f)) / 2.0).numpy().reshape(-1))
    return np.concatenate(out) if out else np.zeros(0)


def train_candidate_net(
    data: CandidateData, seed: int, epochs: int, config: CandidateNetConfig, *, whole_ct: str
) -> tuple[CandidateNet, list[dict[str, float]]]:
    """One network on the training crops and the whole CT ``whole_ct`` (see the module docstring)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train = (data.splits == "train") | (data.scans == whole_ct)
    val = data.splits == "val"
    x = torch.from_numpy(data.patches[train])[:, None]
    f = torch.from_numpy(data.features[train])
    y = torch.from_numpy(data.labels[train])[:, None]
    positive = np.flatnonzero(data.labels[train] > 0)
    always = np.flatnonzero((data.labels[train] == 0) & (data.scans[train] == whole_ct))
    crops = np.flatnonzero((data.labels[train] == 0) & (data.scans[train] == ""))
    per_epoch = positive.size + max(positive.size - always.size, 0) + always.size
    net = CandidateNet(config)
    optimiser = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-3)
    batch = 256
    steps = epochs * math.ceil(per_epoch / batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=2e-3, total_steps=steps, pct_start=0.2)
    best: tuple[float, int, dict[str, torch.Tensor]] = (-1.0, -1, {})
    log = []
    sampler = np.random.default_rng(seed)
    for epoch in range(epochs):
        net.train()
        drawn = sampler.choice(crops, size=min(crops.size, max(positive.size - always.size, 0)), replace=False)
        members = torch.from_numpy(np.concatenate([positive, always, drawn]))
        order = members[torch.randperm(members.numel(), generator=generator)]
        total = 0.0
        for start in range(0, order.numel(), batch):
            index = order[start : start + batch]
            logits = net(augment(x[index], generator), f[index])
            loss = F.binary_cross_entropy_with_logits(logits, y[index])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            total += float(loss.detach()) * index.numel()
        scores = predict(net, data.patches[val], data.features[val])
        auc = metrics.roc_auc(data.labels[val], scores)
        log.append({"epoch": epoch, "train_loss": total / order.numel(), "val_auc": auc})
        print(f"  [{whole_ct}] epoch {epoch:2d} loss {total / order.numel():.4f} val AUC {auc:.4f}", flush=True)
        if auc > best[0]:
            best = (auc, epoch, {k: v.detach().clone() for k, v in net.state_dict().items()})
    net.load_state_dict(best[2])
    net.eval()
    return net, log


def candidate_threshold(nets: list[CandidateNet], data: CandidateData) -> float:
    """The probability (of the nets' mean logit) keeping :data:`CANDIDATE_SENSITIVITY` of validation positives."""
    val = (data.splits == "val") & (data.labels > 0)
    logits = np.mean([predict(net, data.patches[val], data.features[val]) for net in nets], axis=0)
    return float(np.quantile(1.0 / (1.0 + np.exp(-logits)), 1.0 - CANDIDATE_SENSITIVITY))


def fit_type_rule(measured: list[MeasuredVoi]) -> tuple[TypeRule, float]:
    """The two cut-offs (steps of 0.05) with the best kappa against the texture rating on training patients."""
    chosen = [m for m in measured if m.record.split == "train" and m.measures is not None]
    truth = [m.record.texture for m in chosen]
    shares = [m.measures.solid_share for m in chosen if m.measures is not None]
    best = (TypeRule(), -1.0)
    grid = np.round(np.arange(0.05, 1.0, 0.05), 2)
    for low in grid:
        for high in grid[grid > low]:
            rule = TypeRule(float(low), float(high))
            kappa = cohen_kappa(truth, [classify_type(s, rule) for s in shares])
            if kappa > best[1]:
                best = (rule, kappa)
    return best


def fit_suspicion(measured: list[MeasuredVoi], seed: int) -> tuple[SuspicionModel, float, dict[str, float]]:
    """L2 logistic regression (train patients), threshold by Youden's J (validation patients)."""

    def table(split: str) -> tuple[np.ndarray, np.ndarray]:
        rows = [m for m in measured if m.record.split == split and m.measures is not None and m.record.malignancy != 3]
        features = np.stack([suspicion_features(m.measures) for m in rows if m.measures is not None])
        labels = np.array([1.0 if m.record.malignancy >= 4 else 0.0 for m in rows])
        return features, labels

    x_train, y_train = table("train")
    mean, scale = x_train.mean(axis=0), x_train.std(axis=0)
    scale[scale < 1e-9] = 1.0
    torch.manual_seed(seed)
    z = torch.from_numpy((x_train - mean) / scale)
    y = torch.from_numpy(y_train)
    w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")
    l2 = 1.0 / z.shape[0]

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = F.binary_cross_entropy_with_logits(z @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    model = SuspicionModel(mean=mean, scale=scale, weights=w.detach().numpy().copy(), bias=float(b.detach()[0]))
    x_val, y_val = table("val")
    val_scores = model.probability(x_val)
    threshold = metrics.youden_threshold(y_val, val_scores)
    summary = {
        "train_nodules": int(y_train.size),
        "train_auc": metrics.roc_auc(y_train, model.probability(x_train)),
        "val_nodules": int(y_val.size),
        "val_auc": metrics.roc_auc(y_val, val_scores),
    }
    return model, threshold, summary


def plain(value: Any) -> Any:
    """Numpy numbers and arrays as plain Python values: ``torch.load(weights_only=True)`` refuses numpy objects."""
    if isinstance(value, dict):
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def update_card(
    card_path: Path,
    checkpoint: dict[str, Any],
    digest: str,
    assessment: dict[str, Any],
    whole_ct: dict[str, Any],
) -> None:
    """Write the machine-measured parts of the card; the hand-written prose stays as it is."""
    card: dict[str, Any] = json.loads(card_path.read_text()) if card_path.is_file() else {}
    validation = dict(card.get("validation", {}))
    validation["figures"] = card_figures(assessment)
    validation["operating_threshold"] = checkpoint["candidate_threshold"]
    validation["suspicion_threshold"] = checkpoint["suspicion_threshold"]
    validation["lidc_assessment"] = assessment
    validation["whole_ct_detection"] = whole_ct
    validation["split_rule"] = SPLIT_RULE
    card["validation"] = validation
    card["weights"] = {"file": f"models/weights/{WEIGHTS_NAME}", "sha256": digest}
    card["training_log"] = checkpoint["training_log"]
    card_path.write_text(json.dumps(card, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--whole-cts", type=Path, default=WHOLE_CTS)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "models" / "weights")
    parser.add_argument("--card", type=Path, default=CARD)
    parser.add_argument("--seed", type=int, default=18)
    parser.add_argument("--epochs", type=int, default=14)
    parser.add_argument("--no-test", action="store_true", help="stop after writing the weights (test not read)")
    parser.add_argument(
        "--card-only", action="store_true", help="do not train: re-measure the existing weights and rewrite the card"
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    weights = args.out / WEIGHTS_NAME
    if args.card_only:
        write_card(args, load_checked(weights), weights)
        return
    started = time.monotonic()
    data, measured = collect(args.data, args.whole_cts)
    print(
        f"collected {data.labels.size} candidates ({int(data.labels.sum())} on nodules) and {len(measured)} "
        f"nodules in {time.monotonic() - started:.0f} s",
        flush=True,
    )
    config = CandidateNetConfig()
    folds: dict[str, CandidateNet] = {}
    log: dict[str, list[dict[str, float]]] = {}
    for scan in sorted(str(s) for s in set(data.scans) - {""}):
        folds[scan], log[scan] = train_candidate_net(data, args.seed, args.epochs, config, whole_ct=scan)
    threshold = candidate_threshold(list(folds.values()), data)
    fold_thresholds = {scan: candidate_threshold([net], data) for scan, net in folds.items()}
    type_rule, kappa = fit_type_rule(measured)
    print(f"type rule {type_rule} (train kappa {kappa:.3f}); candidate threshold {threshold:.4f}", flush=True)
    refit = [replace(m, measures=with_type_rule(m.measures, type_rule)) if m.measures else m for m in measured]
    suspicion, suspicion_threshold, suspicion_log = fit_suspicion(refit, args.seed)
    print(f"suspicion: {suspicion_log}, threshold {suspicion_threshold:.4f}", flush=True)
    checkpoint: dict[str, Any] = {
        "format": "imaging-cds lung nodules v1",
        "candidate_net": config.as_dict(),
        "candidate_folds": {
            scan: {
                "state": {k: v.detach().clone() for k, v in net.state_dict().items()},
                "threshold": fold_thresholds[scan],
            }
            for scan, net in folds.items()
        },
        "candidate_threshold": threshold,
        "suspicion": suspicion.as_dict(),
        "suspicion_threshold": suspicion_threshold,
        "type_rule": {"ground_glass_below": type_rule.ground_glass_below, "solid_from": type_rule.solid_from},
        "split_rule": SPLIT_RULE,
        "training_log": {
            "seed": args.seed,
            "candidates": {
                split: {
                    "positives": int(data.labels[data.splits == split].sum()),
                    "total": int((data.splits == split).sum()),
                }
                for split in ("train", "val", "test", "scan")
            },
            "epochs": log,
            "type_rule_train_kappa": kappa,
            "suspicion": suspicion_log,
            "suspicion_features": list(SUSPICION_FEATURES),
            "seconds": round(time.monotonic() - started),
        },
    }
    digest = save_pinned(plain(checkpoint), weights)
    print(f"wrote {weights} sha256 {digest} in {time.monotonic() - started:.0f} s", flush=True)
    if args.no_test:
        return
    write_card(args, checkpoint, weights)


def write_card(args: argparse.Namespace, checkpoint: dict[str, Any], weights: Path) -> None:
    """Measure the written weights as the analyzer loads them (test patients, whole CTs) and update the card."""
    from models.nodules.analyzer import LungNoduleAnalyzer

    digest = sha256_of_file(weights)
    models = models_from_checkpoint(checkpoint, digest)
    assessment = assess_lidc(args.data, models)  # the one read of the test patients
    print(json.dumps(card_figures(assessment), indent=1))
    whole_ct = scan_detection(LungNoduleAnalyzer(weights, digest), read_labelled_scans(args.whole_cts))
    print(json.dumps(whole_ct, indent=1))
    update_card(args.card, checkpoint, digest, assessment, whole_ct)
    print(f"updated {args.card}")


if __name__ == "__main__":
    main()
