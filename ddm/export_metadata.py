"""The metadata an export carries, typed: :class:`ExportMetadata` and the :class:`StageSpec` it trained at.

Training writes these fields at the top level of every export's metadata (``train.job.export_metadata``);
``ddm.assemble``, the pipeline, ``ddm.pool`` and ``ddm.evaluate`` read them through :meth:`ExportMetadata.from_dict`
and nothing else looks inside the resolved training config (``train_config``, kept whole for provenance).
Exports written before these fields existed carry them only inside ``train_config``; ``from_dict`` reads them
from there — the one place that still does — so old exports load unchanged.

On-disk keys (all optional): ``kind``, ``stage``, ``experiment``, ``num_experts``, ``expert_id``,
``prediction``, ``manifest_hash`` (the sha256 of the ``shards.parquet`` the job read; :attr:`shards_index_hash`),
``centroids_hash``, ``stage_spec`` (:class:`StageSpec`), ``vae`` (the VAE spec trained with), ``text``
(``t5_dir``, ``clip_dir``), ``geometry`` (what the job read from its shards, ``data.geometry.ShardGeometry``).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["StageSpec", "ExportMetadata", "VAE_RUNTIME_FIELDS", "latent_space_spec"]

# VAE spec fields that say where the weights sit or how they run, not which latent space they produce
VAE_RUNTIME_FIELDS = ("path", "device", "dtype", "tiling")


def latent_space_spec(vae: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A VAE spec without the fields that do not change the latents (None stays None)."""
    return None if not vae else {k: v for k, v in dict(vae).items() if k not in VAE_RUNTIME_FIELDS}


@dataclass(frozen=True)
class StageSpec:
    """One training stage's geometry and schedule facts: what the recipe asked for (resolution, frames, fps),
    the VAE's spatial factor, the text padding and the flow shift (None: the video shift)."""

    resolution: int | tuple[int, int] | None = None
    num_frames: int | None = None
    fps: float | None = None
    vae_spatial_factor: int | None = None
    text_pad_to: int | None = None
    flow_shift: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if isinstance(self.resolution, tuple):
            d["resolution"] = list(self.resolution)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> StageSpec:
        d = dict(d or {})
        res = d.get("resolution")
        return cls(resolution=tuple(int(v) for v in res) if isinstance(res, (list, tuple)) else res,
                   num_frames=d.get("num_frames"), fps=d.get("fps"), vae_spatial_factor=d.get("vae_spatial_factor"),
                   text_pad_to=d.get("text_pad_to"), flow_shift=d.get("flow_shift"))


@dataclass(frozen=True)
class ExportMetadata:
    """The typed view of an export's metadata (module docstring); ``raw`` keeps every key as written."""

    kind: str | None = None
    stage: str | None = None
    experiment: str | None = None
    num_experts: int | None = None
    expert_id: int | str | None = None
    prediction: str = "velocity"
    shards_index_hash: str | None = None
    centroids_hash: str | None = None
    stage_spec: StageSpec = field(default_factory=StageSpec)
    vae: dict[str, Any] | None = None
    text: dict[str, Any] | None = None
    geometry: dict[str, Any] | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def config(self) -> dict[str, Any]:
        """The model's own config (ExpertConfig / RouterConfig as a dict)."""
        return dict(self.raw.get("config") or {})

    @property
    def latent_space(self) -> dict[str, Any] | None:
        """The VAE spec without its runtime fields: what two exports must share to share latents."""
        return latent_space_spec(self.vae)

    @property
    def shards_dir(self) -> str | None:
        """The shard folder the job read (``geometry.shards_dir``)."""
        legacy = (self.raw.get("train_config") or {}).get("data") or {}  # exports before geometry was recorded
        return (self.geometry or {}).get("shards_dir") or legacy.get("shards_dir") or None

    @classmethod
    def from_dict(cls, meta: Mapping[str, Any]) -> ExportMetadata:
        """Read an export's metadata, new (top-level fields) or old (inside ``train_config``)."""
        meta = dict(meta or {})
        legacy = meta.get("train_config") or {}
        stage = meta.get("stage")
        spec = meta.get("stage_spec")
        if spec is None:  # an export written before stage_spec: the recipe and flow groups of its config
            recipe = legacy.get("recipe") or {}
            per_stage = recipe.get(stage) or {} if stage else {}
            spec = {"resolution": per_stage.get("resolution"), "num_frames": per_stage.get("num_frames"),
                    "fps": per_stage.get("fps"), "vae_spatial_factor": recipe.get("vae_spatial_factor"),
                    "text_pad_to": recipe.get("text_pad_to"), "flow_shift": (legacy.get("flow") or {}).get("shift")}
        k = meta.get("num_experts", legacy.get("num_experts"))
        return cls(kind=meta.get("kind"), stage=stage, experiment=meta.get("experiment") or legacy.get("experiment_name"),
                   num_experts=int(k) if k is not None else None, expert_id=meta.get("expert_id"),
                   prediction=meta.get("prediction") or "velocity", shards_index_hash=meta.get("manifest_hash"),
                   centroids_hash=meta.get("centroids_hash") or None, stage_spec=StageSpec.from_dict(spec),
                   vae=dict(meta["vae"]) if isinstance(meta.get("vae"), Mapping) else
                   (dict(legacy["vae"]) if isinstance(legacy.get("vae"), Mapping) else None),
                   text=dict(meta["text"]) if isinstance(meta.get("text"), Mapping) else
                   (dict(legacy["text"]) if isinstance(legacy.get("text"), Mapping) else None),
                   geometry=dict(meta["geometry"]) if isinstance(meta.get("geometry"), Mapping) else None, raw=meta)

    def fields(self) -> dict[str, Any]:
        """The typed fields as top-level metadata keys (what training writes beside ``train_config``)."""
        out: dict[str, Any] = {"kind": self.kind, "stage": self.stage, "experiment": self.experiment,
                               "num_experts": self.num_experts, "manifest_hash": self.shards_index_hash,
                               "centroids_hash": self.centroids_hash or "", "stage_spec": self.stage_spec.to_dict(),
                               "vae": self.vae, "text": self.text}
        if self.kind == "expert":  # a router has no prediction target
            out["prediction"] = self.prediction
        if self.expert_id is not None:
            out["expert_id"] = self.expert_id
        if self.geometry is not None:
            out["geometry"] = self.geometry
        return out
