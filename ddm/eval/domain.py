"""A "domain backbone" for a Fréchet distance that means something offline on the synthetic data.

FVD needs a feature network that knows what videos of the domain look like; I3D's weights are a
download, and a random-init stand-in measures nothing. For the built-in synthetic data a small 3-D
conv net trained for a few seconds on real generator clips (a seed of their own, see
:data:`TRAIN_SEED`) to predict every attribute the captions name — family, background, foreground
colours, direction, speed — has features that separate exactly what matters here. Its penultimate
layer (``feature_dim`` values after temporal and spatial pooling) is the feature space; the Fréchet
math is :mod:`ddm.eval.fvd`'s (:func:`~ddm.eval.fvd.feature_stats`, :func:`~ddm.eval.fvd.frechet_distance`).

Every number it makes is labelled :data:`DOMAIN_LABEL` ("domain backbone"), and every distance comes
with its **floor**: the same distance between two disjoint real sets of the same size, which is what
a perfect generator would score at that N (Fréchet distances are biased upward at small N).

Cached as one safetensors file whose metadata holds the config (JSON) and the held-out accuracy it
reached; :func:`load_or_build` reuses it when the config matches and rebuilds otherwise.
CLI: ``python -m ddm.eval.domain --out PATH`` builds (or reuses) one.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ddm.files import atomic_write
from ddm.eval.fvd import FeatureStats, feature_stats, frechet_distance
from ddm.eval.stats import MetricResult
from ddm.eval.videos import count_videos, iter_videos
from ddm.synthetic import FAMILIES, make_synthetic_dataset, MOTIONS, SHAPE_COLOURS, SPEEDS
from ddm.eval.groundtruth import attributes_of, read_manifest
from ddm.video_io import read_video

__all__ = ["DomainConfig", "DomainBackbone", "build_domain_backbone", "load_or_build", "domain_features",
           "domain_stats", "domain_fvd", "DOMAIN_LABEL", "TRAIN_SEED"]

log = logging.getLogger(__name__)

DOMAIN_LABEL = "domain backbone"
TRAIN_SEED = 4242  # the backbone's own generator seed: never the demo's training (0) or held-out sets
_HEADS = ("family", "background", "colour", "motion", "speed")


@dataclass(frozen=True)
class DomainConfig:
    """Architecture and training recipe of a domain backbone (all of it goes into the cache metadata)."""

    resolution: int = 16  # every video is resized to this square size before the network
    num_frames: int = 9  # frames the network sees (the first ones of each video)
    channels: tuple[int, int, int] = (32, 64, 96)
    feature_dim: int = 32
    families: tuple[str, ...] = ("ocean", "desert", "forest", "dusk", "concrete", "ember")  # generator order
    num_clips: int = 960
    shape_scale: float = 1.0  # the generator's shape radius multiplier (data.synthetic --shape-scale)
    seed: int = TRAIN_SEED
    epochs: int = 20
    batch_size: int = 32
    lr: float = 3e-3

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "DomainConfig":
        d = json.loads(text)
        d["channels"], d["families"] = tuple(d["channels"]), tuple(d["families"])
        return cls(**d)


def _vocab() -> dict[str, list[str]]:
    return {"family": [f.name for f in FAMILIES], "background": [b for f in FAMILIES for b, _ in f.backgrounds],
            "colour": [c for c, _ in SHAPE_COLOURS], "motion": list(MOTIONS),
            "speed": ["slowly" if s == "slowly" else "quickly" if s == "quickly" else "normal" for s in SPEEDS]}


class DomainBackbone(nn.Module):
    """Early-fusion video CNN: (N, 3, T, R, R) in [-1, 1] → pooled penultimate features → attribute heads.

    The first layer is a 3-D convolution whose kernel spans all T frames (written as a 2-D convolution
    over the T·3 stacked channels — the same operator, several times faster on a CPU): it sees where
    the foreground is in every frame at once, which is what direction and speed are. Mean- and
    max-pooling over space keep both the background (mean) and a few-pixel shape's colour (max).
    """

    def __init__(self, config: DomainConfig):
        super().__init__()
        self.config = config
        c1, c2, c3 = config.channels
        self.body = nn.Sequential(
            nn.Conv2d(6 * config.num_frames, c1, 3, padding=1), nn.GroupNorm(4, c1), nn.SiLU(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.GroupNorm(4, c2), nn.SiLU(),
            nn.Conv2d(c2, c3, 3, stride=2, padding=1), nn.GroupNorm(4, c3), nn.SiLU(),
        )
        self.project = nn.Linear(2 * c3, config.feature_dim)
        vocab = _vocab()
        self.heads = nn.ModuleDict({k: nn.Linear(config.feature_dim, len(vocab[k])) for k in _HEADS})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, feature_dim): mean+max pooled conv features → projection → SiLU."""
        n, c, t, h, w = x.shape
        # each frame and its difference from the clip's temporal mean (the static background cancels,
        # leaving what moves: a fixed transform that makes direction and speed easy to learn)
        x = torch.cat([x, 4.0 * (x - x.mean(dim=2, keepdim=True))], dim=1)
        y = self.body(x.permute(0, 2, 1, 3, 4).reshape(n, t * 2 * c, h, w))
        return F.silu(self.project(torch.cat([y.mean(dim=(2, 3)), y.amax(dim=(2, 3))], dim=1)))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        return {k: head(f) for k, head in self.heads.items()}

    def details(self) -> dict[str, Any]:
        """How the features were made (goes into every MetricResult's details)."""
        return {"backbone": DOMAIN_LABEL, "domain_config": asdict(self.config), "tiny_test_backbone": False}

    def save(self, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
        """Write the weights + config (and ``metadata``) as one safetensors file, atomically."""
        from safetensors.torch import save_file

        meta = {"label": DOMAIN_LABEL, "config": self.config.to_json(), **(metadata or {})}
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        return atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=meta))

    @classmethod
    def load(cls, path: str | Path) -> tuple["DomainBackbone", dict[str, str]]:
        """The backbone saved at ``path`` (in eval mode) and its metadata."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found: build it with `python -m ddm.eval.domain --out {p}` "
                                    "(seconds on a CPU)")
        with safe_open(str(p), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
        if meta.get("label") != DOMAIN_LABEL or "config" not in meta:
            raise ValueError(f"{p} is not a domain backbone (its metadata has no '{DOMAIN_LABEL}' config)")
        model = cls(DomainConfig.from_json(meta["config"]))
        model.load_state_dict(load_file(str(p)))
        return model.eval(), meta


def prepare_batch(videos: Sequence[np.ndarray], config: DomainConfig) -> torch.Tensor:
    """uint8 (F, H, W, 3) videos → float (N, 3, T, R, R) in [-1, 1] (first T frames, bilinear resize)."""
    out = []
    for v in videos:
        if v.shape[0] < config.num_frames:
            raise ValueError(f"the domain backbone needs videos of at least {config.num_frames} frames, "
                             f"got {v.shape[0]} (build one with --num-frames {v.shape[0]})")
        x = torch.from_numpy(np.ascontiguousarray(v[: config.num_frames])).permute(0, 3, 1, 2).float()
        r = config.resolution
        if x.shape[-2:] != (r, r):
            x = F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False,
                              antialias=min(x.shape[-2:]) > r)
        out.append((x / 127.5 - 1.0).permute(1, 0, 2, 3))
    return torch.stack(out)


def _targets(rows: Sequence[dict[str, str]]) -> dict[str, torch.Tensor]:
    vocab = _vocab()
    attrs = [attributes_of(r) for r in rows]
    t = {k: torch.tensor([vocab[k].index(getattr(a, k)) for a in attrs]) for k in ("family", "background",
                                                                                  "motion", "speed")}
    colour = torch.zeros(len(attrs), len(vocab["colour"]))
    for i, a in enumerate(attrs):
        for c in a.colours:
            colour[i, vocab["colour"].index(c)] = 1.0
    t["colour"] = colour
    return t


def _loss(out: dict[str, torch.Tensor], t: dict[str, torch.Tensor]) -> torch.Tensor:
    loss = F.binary_cross_entropy_with_logits(out["colour"], t["colour"])
    return loss + sum(F.cross_entropy(out[k], t[k]) for k in ("family", "background", "motion", "speed"))


def _accuracy(out: dict[str, torch.Tensor], t: dict[str, torch.Tensor]) -> dict[str, float]:
    acc = {k: float((out[k].argmax(1) == t[k]).float().mean()) for k in ("family", "background", "motion", "speed")}
    n_col = t["colour"].sum(1, keepdim=True)
    top = out["colour"].argsort(1, descending=True)
    ranks = torch.zeros_like(t["colour"]).scatter_(1, top, torch.arange(t["colour"].shape[1]).float().expand_as(top))
    pred = (ranks < n_col).float()  # the asked number of most likely colours
    acc["colour"] = float((pred == t["colour"]).all(1).float().mean())
    return acc


def _real_clips(folder: Path, config: DomainConfig, n: int, seed: int) -> tuple[list[np.ndarray], list[dict]]:
    names = [f.name for f in FAMILIES]
    if list(config.families) != names[: len(config.families)]:
        raise ValueError(f"families must be a prefix of the generator's order {names}, got {config.families}")
    # rendered at twice the network's size (area-downsampled like the data pipeline's 64 → 16 px, at a
    # quarter of the cost of rendering 64 px)
    make_synthetic_dataset(folder, n, seed=seed, size=max(2 * config.resolution, 16), num_frames=config.num_frames,
                           families=len(config.families), progress=False, shape_scale=config.shape_scale)
    rows = read_manifest(folder)
    return [read_video(folder / r["path"])[0] for r in rows], rows


def build_domain_backbone(config: DomainConfig = DomainConfig(), *,
                          val_clips: int = 120) -> tuple[DomainBackbone, dict]:
    """Train a domain backbone on ``config.num_clips`` real generator clips (seed ``config.seed``).

    Returns the model (eval mode) and a report: held-out accuracy per attribute on ``val_clips`` clips
    of the next seed, and the wall time. Deterministic for a given config and thread count.
    """
    t0 = time.time()
    torch.manual_seed(config.seed)
    with tempfile.TemporaryDirectory(prefix="domain_backbone_") as tmp:
        videos, rows = _real_clips(Path(tmp) / "train", config, config.num_clips, config.seed)
        val_videos, val_rows = _real_clips(Path(tmp) / "val", config, val_clips, config.seed + 1)
    x, t = prepare_batch(videos, config), _targets(rows)
    xv, tv = prepare_batch(val_videos, config), _targets(val_rows)
    model = DomainBackbone(config)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    steps = config.epochs * math.ceil(len(x) / config.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(config.seed)
    model.train()
    for _ in range(config.epochs):
        for idx in torch.randperm(len(x), generator=gen).split(config.batch_size):
            loss = _loss(model(x[idx]), {k: v[idx] for k, v in t.items()})
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        val_acc = _accuracy(model(xv), tv)
    report = {"val_accuracy": val_acc, "val_clips": val_clips, "train_clips": config.num_clips,
              "train_seconds": round(time.time() - t0, 1), "final_loss": float(loss.detach())}
    log.info("%s: trained in %.1f s on %d clips; held-out accuracy %s", DOMAIN_LABEL, report["train_seconds"],
             config.num_clips, {k: round(v, 3) for k, v in val_acc.items()})
    return model, report


def load_or_build(path: str | Path, config: DomainConfig | None = None) -> DomainBackbone:
    """The cached backbone at ``path``; built (and cached) when missing or made with another config.

    ``config=None`` accepts whatever config the cached file has (and builds the default when missing).
    """
    p = Path(path)
    if p.is_file():
        model, meta = DomainBackbone.load(p)
        if config is None or model.config == config:
            log.info("%s: reusing %s (held-out accuracy %s)", DOMAIN_LABEL, p, meta.get("val_accuracy", "?"))
            return model
        log.info("%s: %s was built with another config; rebuilding", DOMAIN_LABEL, p)
    model, report = build_domain_backbone(config or DomainConfig())
    p.parent.mkdir(parents=True, exist_ok=True)
    model.save(p, {"val_accuracy": json.dumps(report["val_accuracy"]), "report": json.dumps(report)})
    return model


@torch.no_grad()
def domain_features(videos: Any, backbone: DomainBackbone, *, batch_size: int = 64,
                    name: str = "videos") -> np.ndarray:
    """Penultimate features (N, feature_dim) float64 of a video set (any :mod:`ddm.eval.videos` form)."""
    feats, batch = [], []
    for video in iter_videos(videos, name=name):
        batch.append(video)
        if len(batch) == batch_size:
            feats.append(backbone.features(prepare_batch(batch, backbone.config)).double().numpy())
            batch.clear()
    if batch:
        feats.append(backbone.features(prepare_batch(batch, backbone.config)).double().numpy())
    return np.concatenate(feats, axis=0)


def domain_stats(videos: Any, backbone: DomainBackbone, *, name: str = "videos") -> FeatureStats:
    """Feature statistics of one set (reusable as ``real`` in :func:`domain_fvd`)."""
    feats = domain_features(videos, backbone, name=name)
    mu, sigma = feature_stats(feats)
    return FeatureStats(mu, sigma, feats.shape[0], backbone.details())


def domain_fvd(fake_videos: Any, real: Any, backbone: DomainBackbone, *, floor_real: Any = None) -> MetricResult:
    """Fréchet distance in domain-backbone features between a generated and a real set.

    ``floor_real``: a second real set, disjoint from ``real``, of the same size as the generated set;
    the real-vs-real distance is reported as ``details['floor']`` (what a perfect generator scores at
    this N). ``real``/``floor_real`` may be video sets or :class:`~ddm.eval.fvd.FeatureStats`.
    """
    def stats(v: Any, name: str) -> FeatureStats:
        return v if isinstance(v, FeatureStats) else domain_stats(v, backbone, name=name)

    real_stats = stats(real, "real videos")
    fake_stats = stats(fake_videos, "generated videos")
    value = frechet_distance(fake_stats.mu, fake_stats.sigma, real_stats.mu, real_stats.sigma)
    details: dict[str, Any] = {**backbone.details(), "n_real": real_stats.n,
                               "note": "no per-video SE; compare only at equal N; floor = real vs real"}
    if floor_real is not None:
        floor_stats = stats(floor_real, "second real set")
        if floor_stats.n != fake_stats.n:
            raise ValueError(f"the floor's second real set has {floor_stats.n} videos but the generated set has "
                             f"{fake_stats.n}: Fréchet distances are only comparable at equal N")
        details["floor"] = frechet_distance(floor_stats.mu, floor_stats.sigma, real_stats.mu, real_stats.sigma)
    return MetricResult("domain_fvd", value, None, fake_stats.n, details)


def main(argv: Sequence[str] | None = None) -> Path:
    """CLI: build (or reuse) a domain backbone at ``--out``."""
    ap = argparse.ArgumentParser(description="Build the synthetic data's domain backbone (seconds on a CPU)")
    ap.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")
    ap.add_argument("--num-frames", type=int, default=DomainConfig.num_frames)
    ap.add_argument("--resolution", type=int, default=DomainConfig.resolution)
    ap.add_argument("--num-clips", type=int, default=DomainConfig.num_clips)
    ap.add_argument("--epochs", type=int, default=DomainConfig.epochs)
    ap.add_argument("--families", type=int, default=len(DomainConfig.families),
                    help="the first N of the generator's scene families (data.synthetic --families)")
    ap.add_argument("--shape-scale", type=float, default=DomainConfig.shape_scale,
                    help="the generator's shape radius multiplier the evaluated data uses (data.synthetic --shape-scale)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    if not 1 <= args.families <= len(DomainConfig.families):
        ap.error(f"--families must be in 1..{len(DomainConfig.families)}")
    config = DomainConfig(num_frames=args.num_frames, resolution=args.resolution, num_clips=args.num_clips,
                          epochs=args.epochs, families=DomainConfig.families[: args.families],
                          shape_scale=args.shape_scale)
    load_or_build(args.out, config)
    _, meta = DomainBackbone.load(args.out)
    print(f"{DOMAIN_LABEL}: {args.out} (held-out accuracy {meta.get('val_accuracy')})")
    return args.out


if __name__ == "__main__":
    main()
