"""The geometry a shard set was written with, read back at training time.

``data.encode`` records its config in ``encode_plan.json`` (frame size, frames, fps, VAE spec) and every
sample carries its own metadata (height, width, num_frames, fps) and tensors (the latent or the frames,
the T5 states, the CLIP vector). :func:`read_shard_geometry` reads the plan (when present) and the first
training sample into a :class:`ShardGeometry`; :meth:`ShardGeometry.mismatches` lists where a training
recipe disagrees with it, so a job refuses e.g. ``resolution=32`` on 16-pixel shards instead of training
on the wrong size and recording it in its export.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from data.encode import PLAN_NAME
from ddm.shards import available_experts, decode_sample, iter_shard, list_shards

from ddm.export_metadata import VAE_RUNTIME_FIELDS, latent_space_spec  # noqa: F401  (one definition)


@dataclass(frozen=True)
class ShardGeometry:
    """What one shard set holds (``data.encode``'s output), as read from its plan and first sample.

    ``latent_shape`` is (C, T, h, w) for latent shards, None for raw-frame shards (``frames_shape``
    (F, H, W, 3) then); ``fps`` is None when the set was encoded at the clips' native rates; ``vae`` is the
    encoder's spec without runtime fields, None when the folder has no ``encode_plan.json`` (shards written
    by other tools) or holds raw frames.
    """

    shards_dir: str
    height: int
    width: int
    num_frames: int
    fps: float | None
    latent_shape: tuple[int, ...] | None
    frames_shape: tuple[int, ...] | None
    vae: dict[str, Any] | None
    t5_dim: int
    clip_dim: int
    source: str  # which files it was read from (for messages)

    @property
    def raw_frames(self) -> bool:
        return self.latent_shape is None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (export metadata ``geometry``)."""
        d = asdict(self)
        for key in ("latent_shape", "frames_shape"):
            d[key] = list(d[key]) if d[key] is not None else None
        d["resolution"] = [self.height, self.width]
        return d

    def mismatches(self, *, resolution: int | tuple[int, int] | None = None, num_frames: int | None = None,
                   fps: float | None = None, latent_shape: tuple[int, ...] | None = None,
                   vae: Mapping[str, Any] | None = None) -> list[tuple[str, Any, Any]]:
        """``[(field, wanted, in the shards)]`` for every given value the shards disagree with (a value
        the shards do not record, e.g. the VAE of a folder without a plan, cannot disagree)."""
        out: list[tuple[str, Any, Any]] = []
        if resolution is not None:
            h, w = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
            if (int(h), int(w)) != (self.height, self.width):
                out.append(("resolution", resolution if isinstance(resolution, int) else [h, w],
                            self.height if self.height == self.width else [self.height, self.width]))
        if num_frames is not None and int(num_frames) != self.num_frames:
            out.append(("num_frames", int(num_frames), self.num_frames))
        if fps is not None and self.fps is not None and not math.isclose(float(fps), self.fps, rel_tol=1e-3):
            out.append(("fps", float(fps), self.fps))
        if latent_shape is not None and self.latent_shape is not None \
                and tuple(int(v) for v in latent_shape) != self.latent_shape:
            out.append(("latent shape (C, T, h, w)", list(latent_shape), list(self.latent_shape)))
        if vae is not None and self.vae is not None:
            wanted = latent_space_spec(vae)
            if wanted != self.vae:
                out.append(("vae", wanted, self.vae))
        return out




def read_shard_geometry(shards_dir: str | Path) -> ShardGeometry:
    """Read ``shards_dir``'s geometry from ``encode_plan.json`` (if present) and its first training sample.

    Raises FileNotFoundError when the folder holds no training shard, ValueError when the first sample
    cannot be decoded or disagrees with the plan (a folder mixed from two encodes).
    """
    root = Path(shards_dir)
    first = next((shards[0] for k in available_experts(root) if (shards := list_shards(root, k, "train"))), None)
    if first is None:
        raise FileNotFoundError(f"no training shards in '{root}' (expected expert_<k>/train-NNNNNN.tar; write "
                                "them with python -m data.prepare)")
    try:
        key, members = next(iter(iter_shard(first)))
    except StopIteration:
        raise ValueError(f"shard '{first}' holds no sample") from None
    sample = decode_sample(key, members)
    meta = sample["meta"]
    body = sample.get("latent", sample.get("frames"))
    latent = tuple(int(v) for v in sample["latent"].shape) if "latent" in sample else None
    frames = None if latent is not None else tuple(int(v) for v in body.shape)
    plan_path = root / PLAN_NAME
    plan = json.loads(plan_path.read_text()).get("config", {}) if plan_path.is_file() else {}
    vae = latent_space_spec(plan["vae"]) if plan.get("vae") else None
    source = f"{first.name} sample {key}" + (f" and {PLAN_NAME}" if plan else "")
    # encoded at the clips' native rates (plan fps null), samples differ in fps: none is the set's
    fps = float(meta["fps"]) if meta.get("fps") and not (plan and plan.get("fps") is None) else None
    geometry = ShardGeometry(
        shards_dir=str(root), height=int(meta["height"]), width=int(meta["width"]),
        num_frames=int(meta["num_frames"]), fps=fps,
        latent_shape=latent, frames_shape=frames, vae=vae, t5_dim=int(sample["t5"].shape[-1]),
        clip_dim=int(sample["clip"].shape[-1]), source=f"{first.parent.name}/{source}")
    if plan:
        size, planned_frames = plan.get("size"), plan.get("num_frames")
        disagree = [(name, want, got) for name, want, got in (
            ("size", list(size) if size else None, [geometry.height, geometry.width]),
            ("num_frames", planned_frames, geometry.num_frames)) if want is not None and want != got]
        if disagree:
            raise ValueError(f"'{root}': {PLAN_NAME} and sample {key} disagree on "
                             + ", ".join(f"{n} ({w} vs {g})" for n, w, g in disagree)
                             + ": the folder mixes two encodes; re-encode it")
    return geometry
