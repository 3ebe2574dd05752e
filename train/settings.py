"""The typed training settings a job hands its LightningModule (issue 17: one contract per boundary).

``ExpertSettings.from_config(cfg, max_steps)`` / ``RouterSettings.from_config(cfg, ...)`` are the one place
where the resolved Hydra config (``optim``, ``flow``, ``trainer``, ``strategy``, and the role's own keys)
becomes training settings; the modules read attributes (``settings.optim.lr``), never config groups. The
checkpoint keeps them as plain dicts in its hyper-parameters (``to_dict``), and ``from_dict`` reads those back,
naming any key it does not know, so a typo in ``optim``/``flow`` fails at start instead of being ignored.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, TypeVar

from omegaconf import DictConfig, OmegaConf

from ddm import flow

S = TypeVar("S", bound="TrainSettings")


def _strict(cls: type, d: Mapping[str, Any], what: str) -> dict[str, Any]:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{what} has unknown keys {unknown}; known keys are {sorted(known)}")
    return dict(d)


@dataclass(frozen=True)
class OptimSettings:
    """AdamW, its LR schedule (warm-up, then constant or cosine to ``min_lr_ratio``), clipping and the EMA."""

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "constant"
    min_lr_ratio: float = 0.1
    grad_clip: float = 0.0
    ema_decay: float = 0.9999
    ema_warmup: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"optim.schedule must be constant or cosine, got {self.schedule!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OptimSettings:
        return cls(**_strict(cls, d, "optim"))


@dataclass(frozen=True)
class FlowSettings:
    """The training times (logit-normal, shifted by ``shift`` or the video shift), text dropout, target."""

    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float | None = None
    text_dropout_t5: float = 0.0
    text_dropout_clip: float = 0.0
    prediction: str = "velocity"

    def __post_init__(self) -> None:
        flow.check_prediction(self.prediction)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FlowSettings:
        return cls(**_strict(cls, d, "flow"))


@dataclass(frozen=True)
class TrainSettings:
    """What both training modules read."""

    optim: OptimSettings
    flow: FlowSettings
    max_steps: int
    max_nonfinite_steps: int = 0
    grad_clip_in_module: bool = True  # False under DeepSpeed, which clips itself

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dicts (the checkpoint's hyper-parameters)."""
        d = dataclasses.asdict(self)
        d["optim"]["betas"] = list(self.optim.betas)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls: type[S], d: Mapping[str, Any]) -> S:
        """Inverse of :meth:`to_dict`; an unknown key at any level is an error naming it."""
        d = _strict(cls, d, f"{cls.__name__}")
        d["optim"] = OptimSettings.from_dict(d["optim"])
        d["flow"] = FlowSettings.from_dict(d["flow"])
        return cls(**d)

    @classmethod
    def coerce(cls: type[S], settings: S | Mapping[str, Any]) -> S:
        """``settings`` as this class (a dict from a checkpoint or a test is read by :meth:`from_dict`)."""
        return settings if isinstance(settings, cls) else cls.from_dict(settings)

    @classmethod
    def _common(cls, cfg: DictConfig, max_steps: int) -> dict[str, Any]:
        return {"optim": OptimSettings.from_dict(OmegaConf.to_container(cfg.optim, resolve=True)),
                "flow": FlowSettings.from_dict(OmegaConf.to_container(cfg.flow, resolve=True)),
                "max_steps": int(max_steps), "max_nonfinite_steps": int(cfg.trainer.max_nonfinite_steps),
                "grad_clip_in_module": cfg.strategy.name != "deepspeed"}


INIT_SCHEMES = ("torch", "adaln_zero")


@dataclass(frozen=True)
class ExpertSettings(TrainSettings):
    """An expert's (or the monolith's): the conditioning mixture (t2v / i2v modes), the from-scratch weight
    initialisation and memory/speed switches."""

    conditioning: Mapping[str, Any] = field(default_factory=dict)
    activation_checkpointing: bool = False
    compile: bool = False
    # torch: every layer keeps PyTorch's default (as Open-Sora v2 builds it); adaln_zero: DiT's adaLN-Zero, every
    # block's modulation and the final layer zeroed, so each block starts as the identity and the output at 0
    init: str = "torch"

    def __post_init__(self) -> None:
        if self.init not in INIT_SCHEMES:
            raise ValueError(f"model.init must be one of {INIT_SCHEMES}, got {self.init!r}")

    @classmethod
    def from_config(cls, cfg: DictConfig, max_steps: int) -> ExpertSettings:
        """The expert job's settings from its resolved config (``conditioning``, ``model.activation_checkpointing``,
        ``model.compile`` besides the shared groups)."""
        return cls(**cls._common(cfg, max_steps), conditioning=OmegaConf.to_container(cfg.conditioning, resolve=True),
                   activation_checkpointing=bool(cfg.model.activation_checkpointing), compile=bool(cfg.model.compile),
                   init=str(cfg.model.get("init", "torch")))


@dataclass(frozen=True)
class RouterSettings(TrainSettings):
    """The router's: its loss, its calibration plot, and the experts' patch (x_t is noised as the experts')."""

    label_smoothing: float = 0.0
    calibration_bins: int = 10
    expert_patch_size: tuple[int, int, int] = (1, 2, 2)
    expert_ids: tuple[int, ...] | None = None  # the training expert id of each output (router_experts)

    def __post_init__(self) -> None:
        object.__setattr__(self, "expert_patch_size", tuple(int(p) for p in self.expert_patch_size))
        if self.expert_ids is not None:
            object.__setattr__(self, "expert_ids", tuple(int(i) for i in self.expert_ids))

    @classmethod
    def from_config(cls, cfg: DictConfig, max_steps: int, expert_patch_size: tuple[int, int, int],
                    expert_ids: list[int]) -> RouterSettings:
        """The router job's settings (``label_smoothing``, ``calibration_bins`` besides the shared groups)."""
        return cls(**cls._common(cfg, max_steps), label_smoothing=float(cfg.label_smoothing),
                   calibration_bins=int(cfg.calibration_bins), expert_patch_size=tuple(expert_patch_size),
                   expert_ids=tuple(expert_ids))
