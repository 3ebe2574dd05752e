"""Does a model follow the direction word? A counterfactual check on the synthetic data's captions.

Direction accuracy (:mod:`ddm.eval.groundtruth`) is a forced choice with chance 1/4; at N = 100 its SE is
0.043, so a model that moves shapes only a little towards the asked side reads as chance. This check asks
directly: every moving caption is sampled four times with only its direction word changed (left, right, up,
down) and the same noise, and each video's foreground velocity is measured as the ground truth measures it
(the circular centroid track of the pixels that differ from the fitted background). Paired over captions:

* ``right − left`` of the x velocity and ``down − up`` of the y velocity, px/frame (0: the word is ignored;
  a real clip of the generator at 16 px moves 0.19–0.63 px/frame, so a real set reads about twice that);
* the velocity along the asked direction, averaged over the four versions of a caption;
* the direction accuracy of the 4N videos, beside its chance 1/4.

Videos whose foreground cannot be tracked (none stands out) count as velocity 0 and are counted.

CLI: ``python -m ddm.eval.direction_response --model FOLDER --prompts FILE [--num-prompts 40] [--out DIR]``
(synthetic captions, e.g. a held-out ``synthetic.csv``'s ``text`` column, one per line; stills are skipped
and counted).
"""
from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ddm.eval.groundtruth import GroundTruthEvaluator, attributes_of, families_in
from ddm.eval.motion_track import direction_of
from ddm.eval.stats import mean_and_stderr
from ddm.files import atomic_write
from ddm.synthetic import MOTIONS

__all__ = ["DIRECTIONS", "with_direction", "DirectionResponse", "direction_response", "measure_velocities", "main"]

DIRECTIONS: tuple[str, ...] = tuple(MOTIONS)  # left, right, up, down
_DIRECTION_WORD = re.compile(rf" ({'|'.join(DIRECTIONS)}) across ")


def with_direction(caption: str, direction: str) -> str:
    """``caption`` with its direction word replaced by ``direction``; ValueError for a caption that does not
    move (a still) or a direction the generator does not know."""
    if direction not in MOTIONS:
        raise ValueError(f"unknown direction {direction!r}; the generator's are {DIRECTIONS}")
    if len(_DIRECTION_WORD.findall(caption)) != 1:
        raise ValueError(f"not a moving synthetic caption (no '<direction> across'): {caption!r}")
    return _DIRECTION_WORD.sub(f" {direction} across ", caption)


@dataclass(frozen=True)
class DirectionResponse:
    """The paired measurements (px/frame, mean ± SE over N captions) and the counts behind them."""

    n: int
    right_minus_left_x: tuple[float, float]
    down_minus_up_y: tuple[float, float]
    along_asked: tuple[float, float]
    accuracy: tuple[float, float]
    untracked: int  # videos without a trackable foreground (velocity taken as 0)

    def lines(self) -> list[str]:
        """Human-readable summary."""
        def ms(v: tuple[float, float]) -> str:
            return f"{v[0]:+.3f} ± {v[1]:.3f}"
        return [f"direction response over N={self.n} captions x 4 directions (same noise per caption):",
                f"  x velocity, right - left: {ms(self.right_minus_left_x)} px/frame (0: the word is ignored)",
                f"  y velocity, down - up:    {ms(self.down_minus_up_y)} px/frame",
                f"  velocity along the asked direction: {ms(self.along_asked)} px/frame",
                f"  direction accuracy: {self.accuracy[0]:.3f} ± {self.accuracy[1]:.3f} (chance 0.250); "
                f"untracked videos: {self.untracked} of {4 * self.n}"]


def _mean_se(x: np.ndarray) -> tuple[float, float]:
    mean, se, _ = mean_and_stderr(x)
    return mean, se


def direction_response(velocities: Mapping[str, np.ndarray]) -> DirectionResponse:
    """The paired statistics from ``{direction: (N, 2) velocities (vx, vy)}``, row i of every direction being
    caption i with the same noise; NaN rows (untracked) count as velocity 0."""
    if set(velocities) != set(DIRECTIONS):
        raise ValueError(f"need velocities for every direction {DIRECTIONS}, got {sorted(velocities)}")
    v = {d: np.asarray(velocities[d], np.float64).reshape(-1, 2) for d in DIRECTIONS}
    n = len(v["left"])
    if n == 0 or any(len(a) != n for a in v.values()):
        raise ValueError(f"every direction needs the same N >= 1 captions, got {[len(a) for a in v.values()]}")
    tracked = {d: ~np.isnan(a).any(axis=1) for d, a in v.items()}
    v = {d: np.nan_to_num(a, nan=0.0) for d, a in v.items()}
    along = np.mean([v[d] @ np.asarray(MOTIONS[d], np.float64) for d in DIRECTIONS], axis=0)
    # read as the ground truth reads it; an untracked video is wrong
    correct = [float(ok and direction_of(vx, vy) == d) for d in DIRECTIONS for (vx, vy), ok in zip(v[d], tracked[d])]
    return DirectionResponse(n, _mean_se(v["right"][:, 0] - v["left"][:, 0]), _mean_se(v["down"][:, 1] - v["up"][:, 1]),
                             _mean_se(along), _mean_se(correct),
                             int(sum((~t).sum() for t in tracked.values())))


def measure_velocities(videos: Sequence[Any], families: Sequence[str]) -> np.ndarray:
    """(N, 2) foreground velocities (vx, vy) px/frame of ``videos``, NaN where nothing can be tracked."""
    evaluator = GroundTruthEvaluator(families)
    out = np.full((len(videos), 2), np.nan)
    for i, video in enumerate(videos):
        velocity = evaluator.measure(video).velocity
        if velocity is not None:
            out[i] = velocity
    return out


def main(argv: Sequence[str] | None = None) -> DirectionResponse:
    """CLI: sample each caption in the four directions from one model folder and print the response."""
    from ddm.pipeline import DDMPipeline
    from ddm.sampling_spec import Routing, SamplingSpec

    ap = argparse.ArgumentParser(description="Does a model follow the direction word? (paired counterfactual)")
    ap.add_argument("--model", type=Path, required=True, help="a model folder (ddm.assemble)")
    ap.add_argument("--prompts", type=Path, required=True, help="synthetic moving captions, one per line")
    ap.add_argument("--num-prompts", type=int, default=40, help="the first N moving captions (default 40)")
    ap.add_argument("--strategy", default="top1", help="routing of a DDM folder (default top1)")
    ap.add_argument("--stage", default=None, help="checkpoint stage (default: the folder's)")
    ap.add_argument("--seed", type=int, default=100, help="caption i is sampled with seed SEED + i in every direction")
    ap.add_argument("--batch-size", type=int, default=20)
    ap.add_argument("--out", type=Path, default=None, help="write direction_response.json here")
    args = ap.parse_args(argv)

    if args.num_prompts < 1:
        raise SystemExit(f"--num-prompts must be >= 1, got {args.num_prompts}")
    lines = [line.strip() for line in args.prompts.read_text(encoding="utf-8").splitlines() if line.strip()]
    all_moving = [p for p in lines if len(_DIRECTION_WORD.findall(p)) == 1]
    if not all_moving:
        raise SystemExit(f"{args.prompts} has no moving synthetic captions ('... moves left across ...')")
    moving, skipped = all_moving[: args.num_prompts], len(lines) - len(all_moving)
    families = families_in([attributes_of(p) for p in moving])
    pipe = DDMPipeline.from_pretrained(args.model, stage=args.stage)
    spec = SamplingSpec(routing=Routing.parse(args.strategy))
    seeds = [args.seed + i for i in range(len(moving))]
    velocities = {}
    print(f"[direction_response] {args.model}: {len(moving)} captions x {len(DIRECTIONS)} directions, seeds "
          f"{seeds[0]}..{seeds[-1]}" + (f" -> {args.out}" if args.out else ""), flush=True)
    for d in DIRECTIONS:
        print(f"[direction_response] sampling every caption as '... {d} across ...'", flush=True)
        prompts = [with_direction(p, d) for p in moving]
        videos = pipe.generate(prompts, spec, seeds=seeds, batch_size=args.batch_size, progress=False).videos
        velocities[d] = measure_velocities(list(videos), families)
    res = direction_response(velocities)
    print("\n".join(res.lines() + [f"  ({skipped} line(s) of {args.prompts} not a moving caption: skipped)"]))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        record = {**asdict(res), "model": str(args.model), "strategy": args.strategy, "seeds": seeds,
                  "families": families, "prompts": moving, "skipped": skipped,
                  "velocities": {d: v.tolist() for d, v in velocities.items()}}
        atomic_write(args.out / "direction_response.json",
                     lambda tmp: tmp.write_text(json.dumps(record, indent=1), encoding="utf-8"))
    return res


if __name__ == "__main__":
    main()
