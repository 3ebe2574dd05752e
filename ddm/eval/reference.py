"""The synthetic reference set of an evaluation: held-out generator clips, their captions, and the metrics
that need them — ground-truth accuracies (:mod:`ddm.eval.groundtruth`) and the domain-backbone Fréchet
distance with its real-vs-real floor (:mod:`ddm.eval.domain`).

A reference set is a folder written by ``python -m data.synthetic --out DIR --seed S`` with a seed no model
trained on; ``ddm.evaluate --groundtruth DIR`` reads it. Its captions are the prompts (unless others are
given), its clips the real videos: for N generated videos per run the domain FVD compares them with real
clips ``0..N-1`` and reports beside it the floor — clips ``N..2N-1`` against the same ``0..N-1`` — so the
folder needs at least 2N clips. Real clips are decoded and resized to the generated size the way the data
pipeline prepares training clips (``ddm.video_io.resize_center_crop``, first frames).

Metric names (the ``--metrics`` keys, also the columns of the report): ``gt_prompt`` (every measured
attribute right), ``gt_family``, ``gt_background``, ``gt_colour``, ``gt_direction``, ``gt_speed`` and
``domain_fvd``. Each ground-truth result keeps ``details["per_video"]`` (0/1 per video, for paired
differences) and ``details["chance"]``; the domain FVD keeps ``details["floor"]``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ddm.eval.groundtruth import (EVALUATOR_LABEL, attributes_of, evaluate_videos, families_in, make_evaluator,
                                  read_manifest)
from ddm.eval.stats import MetricResult
from ddm.video_io import read_video, resize_center_crop

__all__ = ["GT_METRICS", "DOMAIN_METRIC", "SyntheticReference", "groundtruth_metrics", "DomainReference",
           "check_synthetic_request", "SyntheticMetrics"]

log = logging.getLogger(__name__)

# metric key -> attribute of ddm.eval.groundtruth ("prompt" = all measured attributes right)
GT_METRICS = {"gt_prompt": "prompt", "gt_family": "family", "gt_background": "background", "gt_colour": "colour",
              "gt_direction": "motion", "gt_speed": "speed"}
DOMAIN_METRIC = "domain_fvd"


@dataclass
class SyntheticReference:
    """A generator folder's moving clips (stills are left out): captions, attributes, families, files."""

    root: Path
    rows: list[dict[str, str]]
    families: list[str]

    @classmethod
    def load(cls, path: str | Path) -> "SyntheticReference":
        """Read ``synthetic.csv`` of ``path`` (the csv or its folder); ValueError when it has no clips."""
        p = Path(path)
        csv_path = p / "synthetic.csv" if p.is_dir() else p
        rows = [r for r in read_manifest(csv_path) if r.get("kind", "video") == "video"]
        if not rows:
            raise ValueError(f"{csv_path} lists no video clips (the ground truth needs moving clips)")
        for r in rows:
            attributes_of(r)  # captions and columns must agree, or every score would be meaningless
        return cls(csv_path.parent, rows, families_in(rows))

    @property
    def prompts(self) -> list[str]:
        """The clips' captions, in file order."""
        return [r["text"] for r in self.rows]

    def clip_path(self, index: int) -> Path:
        """The mp4 of clip ``index``."""
        return self.root / self.rows[index]["path"]

    def real_videos(self, indices: Sequence[int], frames: int, height: int, width: int) -> list[np.ndarray]:
        """Clips ``indices`` decoded, cut to their first ``frames`` frames and resized to height × width."""
        out = []
        for i in indices:
            video = read_video(self.clip_path(i))[0]
            if len(video) < frames:
                raise ValueError(f"reference clip {self.clip_path(i)} has {len(video)} frames, the generated videos "
                                 f"{frames}: write the reference set with --num-frames >= {frames}")
            out.append(resize_center_crop(video[:frames], (height, width)))
        return out


def groundtruth_metrics(videos: Iterable[Any], prompts: Sequence[str], families: Sequence[str], *,
                        frame_step: float = 1.0) -> dict[str, MetricResult]:
    """The ground-truth accuracies of one run's videos (``prompts[i]`` asked for video i), as MetricResults.

    ``families``: the reference set's families (the vocabulary every measurement chooses from).
    """
    asked = [attributes_of(p) for p in prompts]
    evaluator = make_evaluator(families, frame_step=frame_step)
    res = evaluate_videos(evaluator, videos, asked)
    details = {"backbone": EVALUATOR_LABEL, "tiny_test_backbone": False, "families": list(families),
               "not_measured": list(res.not_measured)}
    out = {}
    for key, attr in GT_METRICS.items():
        if attr == "prompt":
            (value, se, n), per_video = res.prompt_accuracy, [
                float(all(v for v in s.values() if v is not None)) for s in res.per_video]
        elif attr in res.accuracy:
            (value, se, n), per_video = res.accuracy[attr], [float(s[attr]) for s in res.per_video
                                                            if s.get(attr) is not None]
        else:
            continue
        out[key] = MetricResult(key, value, se, n, {**details, "attribute": attr, "chance": res.chance[attr],
                                                    "per_video": per_video})
    return out


class DomainReference:
    """The domain backbone with the real set's statistics and the real-vs-real floor, computed once."""

    def __init__(self, backbone: Any, reference: SyntheticReference, n: int, frames: int, height: int, width: int):
        from ddm.eval.domain import domain_stats

        if len(reference.rows) < 2 * n:
            raise ValueError(f"the domain FVD with its floor needs 2N = {2 * n} reference clips (two disjoint real "
                             f"sets of N = {n}), but {reference.root} has {len(reference.rows)}: write more with "
                             f"python -m data.synthetic --num-videos {2 * n}")
        if frames < backbone.config.num_frames:
            raise ValueError(f"the domain backbone was built for {backbone.config.num_frames}-frame videos, the "
                             f"generated ones have {frames}: rebuild it (delete the file) for {frames} frames")
        self.backbone, self.n = backbone, n
        self.real = domain_stats(reference.real_videos(range(n), frames, height, width), backbone, name="real set")
        self.second = domain_stats(reference.real_videos(range(n, 2 * n), frames, height, width), backbone,
                                   name="second real set")

    def fvd(self, videos: Iterable[Any]) -> MetricResult:
        """Domain FVD of one run's videos against the real set, with ``details['floor']``."""
        from ddm.eval.domain import domain_fvd

        result = domain_fvd(videos, self.real, self.backbone, floor_real=self.second)
        result.details["n_floor"] = self.second.n
        return result


def check_synthetic_request(metrics: Sequence[str], prompts: Sequence[str], reference: SyntheticReference | None,
                            domain_backbone: str | Path | None, num_videos: int) -> None:
    """ValueError, before anything is generated, when the synthetic metrics cannot be computed: no reference
    set, no backbone path for the domain FVD, fewer than 2N reference clips, or a prompt that is not a
    generator caption."""
    wanted = [m for m in metrics if m in GT_METRICS or m == DOMAIN_METRIC]
    if wanted and reference is None:
        raise ValueError(f"metrics {wanted} need --groundtruth DIR (a data.synthetic folder of a held-out seed)")
    if DOMAIN_METRIC in metrics:
        if domain_backbone is None:
            raise ValueError(f"the {DOMAIN_METRIC} metric needs --domain-backbone PATH (built there when missing)")
        assert reference is not None
        if len(reference.rows) < 2 * num_videos:
            raise ValueError(f"the domain FVD with its floor needs 2N = {2 * num_videos} reference clips (two "
                             f"disjoint real sets of N = {num_videos}), but {reference.root} has "
                             f"{len(reference.rows)}: write more with python -m data.synthetic --num-videos "
                             f"{2 * num_videos}")
    if wanted:
        for p in prompts:
            try:
                attributes_of(p)
            except ValueError as e:
                raise ValueError(f"the ground-truth metrics score synthetic-generator captions only: {e}") from e


class SyntheticMetrics:
    """The ground-truth and domain-FVD metrics of every run of an evaluation against one reference set.

    ``video_shape``: the runs' ``{"n", "frames", "height", "width"}``. The domain backbone is loaded from
    ``domain_backbone`` (or built there for these frames and families when missing) and the real sets'
    statistics are computed once. ``notes`` receives what the report should say about the sets.
    """

    def __init__(self, metrics: Sequence[str], reference: SyntheticReference, domain_backbone: str | Path | None,
                 video_shape: Mapping[str, int], notes: list[str]):
        self.reference, self.shape = reference, dict(video_shape)
        self.gt_keys = [m for m in metrics if m in GT_METRICS]
        self.domain: DomainReference | None = None
        n, frames = self.shape["n"], self.shape["frames"]
        if DOMAIN_METRIC in metrics:
            from ddm.eval.domain import DomainBackbone, DomainConfig, load_or_build

            if domain_backbone is None:
                raise ValueError(f"the {DOMAIN_METRIC} metric needs a domain backbone path")
            path = Path(domain_backbone)
            backbone = (DomainBackbone.load(path)[0] if path.is_file() else
                        load_or_build(path, DomainConfig(num_frames=frames, families=tuple(reference.families))))
            self.domain = DomainReference(backbone, reference, n, frames, self.shape["height"], self.shape["width"])
            notes.append(f"Domain FVD real sets: reference clips 0..{n - 1} (compared with every run) and "
                         f"{n}..{2 * n - 1} (the floor) of {reference.root}; backbone {path}.")
        if self.gt_keys:
            notes.append(f"Ground truth: each video scored against its prompt; vocabulary = the families of "
                         f"{reference.root} ({', '.join(reference.families)}).")

    def run_metrics(self, videos: Sequence[np.ndarray], prompts: Sequence[str], name: str) -> dict[str, MetricResult]:
        """The synthetic metrics of one run's videos (``prompts[i]`` asked for ``videos[i]``)."""
        out: dict[str, MetricResult] = {}
        try:
            if self.gt_keys:
                gt = groundtruth_metrics(videos, prompts, self.reference.families)
                out.update({k: gt[k] for k in self.gt_keys if k in gt})
            if self.domain is not None:
                out[DOMAIN_METRIC] = self.domain.fvd(videos)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from e
        return out

    def real_for_prompts(self, prompts: Sequence[str]) -> list[np.ndarray | None]:
        """The reference clip with each prompt's caption (None when it has none), at the runs' size."""
        index = {r["text"]: i for i, r in reversed(list(enumerate(self.reference.rows)))}
        return [None if p not in index else self.reference.real_videos(
            [index[p]], self.shape["frames"], self.shape["height"], self.shape["width"])[0] for p in prompts]
