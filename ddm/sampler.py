"""The routed sampler: K experts mixed by a router at every Euler step (DESIGN §2, §5.2).

The marginal velocity of a data set split into clusters is ``u_t(x) = Σ_k P(k | x_t = x) u_t^(k)(x)``.
At every step the router's logits become mixing weights by a strategy (``top1``, ``topk`` renormalised
over the kept k, ``full`` softmax, ``oracle`` one fixed expert per sample, ``threshold``), and the experts
are evaluated by **grouped dispatch**: each expert runs once per step, on exactly the samples that gave it
a non-zero weight (together with their classifier-free-guidance twins), experts nobody selected do not
run, and the outputs are scattered back and summed with the weights. Top-1 over K experts therefore costs
about one expert's step, not K.

Classifier-free guidance batches the conditional and unconditional inputs of an expert's samples into
one call, ``[cond; uncond]``, and guides per expert: ``v = Σ_k w_k (v_u^k + s·(v_c^k - v_u^k))``. The
router sees the conditional batch only. With a text-blind router (the published one) the weights do not
depend on the text, and because the sum is linear this equals mixing first and guiding after. With a
router that reads pooled text, its conditional weights P(k | x_t, c) are used for both branches (one
router call per step; the unconditional branch's ideal weights P(k | x_t) would need a second call).

Models are called as ``model(x, t, cond)`` with ``t`` a (B,) tensor in [0, 1] (t = 1 is noise); experts
return a velocity shaped like ``x``, the router returns logits (B, K). Expert ids are 1..K wherever a user
gives them (``oracle_ids``); list positions and router classes are 0..K-1.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ddm.conditioning import i2v_condition, mode_frame_mask, write_back_known_frames
from ddm.flow import drop_text, euler_schedule, euler_step
from ddm.models.text import pad_tokens
from ddm.sampling_spec import PLACEMENTS, STRATEGIES, Routing, SamplingSpec

__all__ = [
    "Routing",
    "SamplingSpec",
    "STRATEGIES",
    "PLACEMENTS",
    "routing_weights",
    "prepare_uncond",
    "ExpertPlacement",
    "routed_velocity",
    "RoutingTrace",
    "make_noise",
    "sample",
]

log = logging.getLogger(__name__)

ModelFn = Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]


# --- router logits → mixing weights ----------------------------------------------------------------------------
def _oracle_one_hot(oracle_ids, batch: int, num_experts: int, device: torch.device) -> torch.Tensor:
    if oracle_ids is None:
        raise ValueError("strategy 'oracle' needs oracle_ids: one expert id (1..K) per sample")
    ids = torch.as_tensor(oracle_ids, device=device).long().reshape(-1)
    if ids.numel() == 1:
        ids = ids.expand(batch)
    if ids.numel() != batch:
        raise ValueError(f"oracle_ids has {ids.numel()} entries for a batch of {batch}")
    if ((ids < 1) | (ids > num_experts)).any():
        raise ValueError(f"oracle_ids must be expert ids in 1..{num_experts}, got {ids.tolist()}")
    return torch.nn.functional.one_hot(ids - 1, num_experts)


def routing_weights(logits: torch.Tensor | None, strategy: str, num_experts: int, *, k: int = 2,
                    threshold: float = 0.1, oracle_ids=None, batch: int | None = None) -> torch.Tensor:
    """Mixing weights (B, K) from router logits (B, K); every row sums to 1.

    ``top1``: one-hot of the arg-max (the first on ties). ``topk``: softmax over the ``k`` largest logits,
    zero elsewhere. ``full``: softmax. ``threshold``: softmax, experts with weight below ``threshold``
    dropped (the arg-max always kept), renormalised. ``oracle``: one-hot of ``oracle_ids`` (expert ids
    1..K, one per sample or one for all); ``logits`` may be None, then ``batch`` gives B.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown routing strategy {strategy!r}; expected one of {STRATEGIES}")
    if strategy == "oracle":
        b = logits.shape[0] if logits is not None else batch
        device = logits.device if logits is not None else torch.device("cpu")
        dtype = logits.dtype if logits is not None and logits.is_floating_point() else torch.float32
        return _oracle_one_hot(oracle_ids, b, num_experts, device).to(dtype)
    if logits.ndim != 2 or logits.shape[1] != num_experts:
        got = logits.shape[1] if logits.ndim == 2 else f"a tensor of shape {tuple(logits.shape)} for"
        raise ValueError(f"router predicts {got} experts but {num_experts} are loaded")
    if torch.isnan(logits).any():
        raise ValueError("router returned NaN logits")
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if strategy == "top1":
        return torch.nn.functional.one_hot(logits.argmax(-1), num_experts).to(logits.dtype)
    if strategy == "full":
        return logits.softmax(-1)
    if strategy == "topk":
        if not 1 <= k <= num_experts:
            raise ValueError(f"top-k routing with k={k} needs 1 <= k <= {num_experts} (the experts loaded)")
        kept = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, logits.topk(k, dim=-1).indices, True)
        return logits.masked_fill(~kept, float("-inf")).softmax(-1)
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    probs = logits.softmax(-1)
    kept = (probs >= threshold).scatter_(1, probs.argmax(-1, keepdim=True), True)
    probs = probs * kept
    return probs / probs.sum(-1, keepdim=True)


# --- the unconditional (null-text) batch -----------------------------------------------------------------------
def prepare_uncond(cond: dict, uncond: dict, batch: int) -> tuple[dict, dict]:
    """Make the unconditional dict batch-compatible with ``cond``; returns ``(cond, uncond)``.

    - Keys ``uncond`` lacks (``i2v``, ``guidance``) are taken from ``cond``: the image condition is shared by
      both branches, only the text is guided.
    - Null text tensors with batch 1 (``null_t5.pt`` (1, L', D), ``null_clip.pt`` (1, D)) are fitted to the
      batch exactly as training's text dropout does (:func:`ddm.flow.drop_text`: T5 truncated or zero-padded
      to cond's L), so the sampler's null is the null the experts were trained with.
    - Other batch-1 tensors are expanded to the batch; per-sample T5 states (negative prompts) of another
      length are zero-padded, with cond's, to the longer L.
    """
    unknown = set(uncond) - set(cond)
    if unknown:
        raise ValueError(f"uncond has keys {sorted(unknown)} that cond lacks")
    cond, out = dict(cond), {}
    text_keys = ("t5", "clip")
    if all(key in uncond and key in cond and uncond[key].shape[0] == 1 for key in text_keys):
        ref = cond["t5"]
        out["t5"], out["clip"], _, _ = drop_text(ref, cond["clip"], uncond["t5"], uncond["clip"], 1.0, 1.0,
                                                 generator=torch.Generator(device=ref.device))
    for key, ref in cond.items():
        if key in out:
            continue
        value = uncond.get(key, ref).to(ref.device)
        if value.shape[0] == 1 and batch != 1:
            value = value.expand(batch, *value.shape[1:])
        if key == "t5" and value.ndim == 3 and ref.ndim == 3 and value.shape[1] != ref.shape[1]:
            length = max(value.shape[1], ref.shape[1])
            value, cond["t5"] = pad_tokens(list(value), length)[0], pad_tokens(list(ref), length)[0]
        if value.shape != cond[key].shape:
            raise ValueError(f"uncond[{key!r}] of shape {tuple(value.shape)} does not match cond[{key!r}] of "
                             f"shape {tuple(cond[key].shape)}")
        out[key] = value
    return cond, out


def _select(cond: dict, rows: torch.Tensor | None) -> dict:
    return dict(cond) if rows is None else {key: value[rows] for key, value in cond.items()}


def _cat(first: dict, second: dict) -> dict:
    return {key: torch.cat([first[key], second[key]]) for key in first}


def _check_batch_first(cond: dict, batch: int, name: str) -> None:
    for key, value in cond.items():
        if not isinstance(value, torch.Tensor) or value.ndim == 0 or value.shape[0] != batch:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{name}[{key!r}] must be a batch-first tensor with {batch} rows, got {shape}")


# --- where experts live ----------------------------------------------------------------------------------------
class ExpertPlacement:
    """Where each expert is stored and where it computes; calling it runs one expert on one group.

    - ``same``: every expert on ``devices[0]`` (or left where it is when ``devices`` is None).
    - ``spread``: expert j on ``devices[j % len(devices)]``; its inputs are moved there, its output back.
    - ``offload``: experts kept on ``storage`` (CPU) and moved to ``devices[0]`` only while selected, so
      3 × 11B fit one 80 GB card. The last ``max_resident`` experts used stay on the device (least recently
      used is moved back first), which saves the transfer when consecutive steps pick the same expert;
      ``max_resident=0`` moves each expert back right after its call. Call :meth:`release` at the end.

    Experts that must move have to be ``torch.nn.Module`` s (anything with ``.to``).
    """

    def __init__(self, experts: Sequence[ModelFn], policy: str = "same",
                 devices: Sequence[torch.device | str] | None = None, storage: torch.device | str = "cpu",
                 max_resident: int = 1) -> None:
        if policy not in PLACEMENTS:
            raise ValueError(f"unknown placement {policy!r}; expected one of {PLACEMENTS}")
        if policy != "same" and not devices:
            raise ValueError(f"placement {policy!r} needs a list of devices")
        if max_resident < 0:
            raise ValueError(f"max_resident must be >= 0, got {max_resident}")
        self.experts = list(experts)
        self.policy = policy
        self.devices = [torch.device(d) for d in devices] if devices else None
        self.storage = torch.device(storage)
        self.max_resident = max_resident
        self._resident: list[int] = []  # offload: experts now on the compute device, least recent first
        if self.devices is None:
            return
        for j, expert in enumerate(self.experts):
            if not hasattr(expert, "to"):
                raise ValueError(f"expert {j + 1} is a {type(expert).__name__}, not a module; placement "
                                 f"{policy!r} must move it")
            expert.to(self.storage if policy == "offload" else self.compute_device(j))

    @property
    def home(self) -> torch.device | None:
        """The device the sampler state lives on (``devices[0]``), or None when nothing is placed."""
        return self.devices[0] if self.devices else None

    def compute_device(self, j: int) -> torch.device | None:
        """The device expert ``j`` (0-based) computes on."""
        if self.devices is None:
            return None
        return self.devices[j % len(self.devices)] if self.policy == "spread" else self.devices[0]

    def _bring_in(self, j: int) -> None:
        if j in self._resident:
            self._resident.remove(j)
        else:
            while self._resident and len(self._resident) >= max(self.max_resident, 1):
                self.experts[self._resident.pop(0)].to(self.storage)
            self.experts[j].to(self.devices[0])
        self._resident.append(j)

    def release(self) -> None:
        """Offload: move every resident expert back to storage."""
        while self._resident:
            self.experts[self._resident.pop(0)].to(self.storage)

    def __call__(self, j: int, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """Run expert ``j`` (0-based) on ``x``; the output comes back on ``x``'s device."""
        device = self.compute_device(j)
        if self.policy == "offload":
            self._bring_in(j)
        if device is not None and device != x.device:
            v = self.experts[j](x.to(device), t.to(device), {key: c.to(device) for key, c in cond.items()})
        else:
            v = self.experts[j](x, t, cond)
        if self.policy == "offload" and self.max_resident == 0:
            self.release()
        return v.to(x.device)


# --- one routed velocity ---------------------------------------------------------------------------------------
def routed_velocity(x: torch.Tensor, t: torch.Tensor | float, cond: dict, experts: Sequence[ModelFn],
                    router: ModelFn | None, routing: Routing | None = None, *, oracle_ids=None,
                    cfg_scale: float = 1.0, uncond: dict | None = None, return_weights: bool = False,
                    placement: ExpertPlacement | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The mixed (and guided) velocity at ``(x, t)`` by grouped dispatch; see the module docstring.

    ``routing`` (:class:`ddm.sampling_spec.Routing`, default top-1) says how the router's logits (plus its
    ``prior_correction``) become weights. ``router`` is not called for the oracle and may be None then, or with
    a single expert (the monolith, weight 1). ``cfg_scale != 1`` needs ``uncond`` (see :func:`prepare_uncond`).
    ``placement`` runs the experts (default: where they are). With ``return_weights`` also returns the
    (B, K) weights; expert j ran on exactly the samples whose weight in column j is non-zero.
    """
    routing = routing if routing is not None else Routing()
    strategy, prior_correction = routing.strategy, routing.prior_correction
    num = len(experts)
    if num == 0:
        raise ValueError("no experts given")
    batch = x.shape[0]
    if not isinstance(t, torch.Tensor):  # float64 times for float64 states (oracle tests), else float32
        t = torch.tensor(t, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    t = t.to(x.device)
    t = t.expand(batch) if t.ndim == 0 else t
    if t.shape != (batch,):
        raise ValueError(f"t must be a scalar or have shape ({batch},), got {tuple(t.shape)}")
    _check_batch_first(cond, batch, "cond")

    if router is None and strategy != "oracle":
        if num != 1:
            raise ValueError(f"strategy {strategy!r} needs a router to mix {num} experts")
        weights = x.new_ones(batch, 1, dtype=torch.promote_types(x.dtype, torch.float32))
    else:
        logits = None if strategy == "oracle" else router(x, t, cond).to(x.device)
        if logits is not None and prior_correction is not None:
            correction = torch.as_tensor(prior_correction, dtype=logits.dtype, device=x.device)
            if correction.shape != (num,):
                raise ValueError(f"prior_correction must have shape ({num},), got {tuple(correction.shape)}")
            logits = logits + correction
        weights = routing_weights(logits, strategy, num, k=routing.k, threshold=routing.threshold,
                                  oracle_ids=oracle_ids, batch=batch)
        weights = weights.to(x.device, torch.promote_types(weights.dtype, x.dtype))

    guided = cfg_scale != 1.0
    if guided:
        if uncond is None:
            raise ValueError(f"cfg_scale={cfg_scale} needs uncond (the null-text conditioning)")
        cond, uncond = prepare_uncond(cond, uncond, batch)
    if placement is not None and placement.experts != list(experts):
        raise ValueError("the placement was built for other experts than the ones given")
    run = placement if placement is not None else ExpertPlacement(experts)

    out = torch.zeros_like(x)
    mix = weights.to(x.dtype)
    for j in range(num):
        rows = (mix[:, j] != 0).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue  # nobody selected this expert: it does not run
        if rows.numel() == batch:
            rows = None  # the whole batch: no gather / scatter copies
        xj = x if rows is None else x[rows]
        tj = t if rows is None else t[rows]
        cj = _select(cond, rows)
        if guided:
            v_c, v_u = run(j, torch.cat([xj, xj]), torch.cat([tj, tj]), _cat(cj, _select(uncond, rows))).chunk(2)
            v = v_u + cfg_scale * (v_c - v_u)
        else:
            v = run(j, xj, tj, cj)
        if v.shape != xj.shape:
            raise ValueError(f"expert {j + 1} returned shape {tuple(v.shape)} for input {tuple(xj.shape)}")
        if not bool(torch.isfinite(v).all()):
            # caught here, not one step later as "NaN router logits" on the corrupted sample
            raise FloatingPointError(f"expert {j + 1} returned a non-finite velocity (NaN or inf) at t="
                                     f"{float(tj.flatten()[0]):.4g}: its weights or inputs are damaged "
                                     "(check its export, e.g. with ddm.export_files.load_export)")
        w = mix[:, j] if rows is None else mix[rows, j]
        contribution = w.view(-1, *([1] * (x.ndim - 1))) * v.to(x.dtype)
        if rows is None:
            out += contribution
        else:
            out.index_add_(0, rows, contribution)
    return (out, weights) if return_weights else out


# --- the routing trace -----------------------------------------------------------------------------------------
@dataclass
class RoutingTrace:
    """Routing weights recorded at every step: ``t`` (N,) and ``weights`` (N, B, K) (expert k+1 in column k)."""

    strategy: str
    t: list[float]
    weights: torch.Tensor

    @property
    def samples_per_expert(self) -> torch.Tensor:
        """(N, K) int: on how many samples each expert ran at each step (CFG twins not counted)."""
        return (self.weights != 0).sum(1)

    @property
    def experts_run(self) -> torch.Tensor:
        """(N,) int: how many experts ran at each step."""
        return (self.samples_per_expert > 0).sum(1)

    @property
    def mean_weights(self) -> torch.Tensor:
        """(N, K): mean weight of each expert over the samples at each step."""
        return self.weights.mean(1)

    def to_json(self, path: str | Path) -> Path:
        """Write the trace (and its per-step counts) as JSON; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "strategy": self.strategy,
            "t": self.t,
            "weights": self.weights.double().tolist(),
            "mean_weights": self.mean_weights.double().tolist(),
            "samples_per_expert": self.samples_per_expert.tolist(),
            "experts_run": self.experts_run.tolist(),
        }
        path.write_text(json.dumps(data))
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> RoutingTrace:
        """Read a trace written by :meth:`to_json`."""
        data = json.loads(Path(path).read_text())
        return cls(data["strategy"], data["t"], torch.tensor(data["weights"], dtype=torch.float64))

    def plot(self, path: str | Path) -> Path:
        """Two panels: mean expert weight vs t (one line per expert) and samples per expert per step (PNG)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        mean, usage = self.mean_weights.double(), self.samples_per_expert
        steps = range(len(self.t))
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
        for j in range(mean.shape[1]):
            left.plot(self.t, mean[:, j].tolist(), label=f"expert {j + 1}")
            right.plot(steps, usage[:, j].tolist(), label=f"expert {j + 1}")
        left.set(xlabel="t (1 = noise)", ylabel="mean weight", title=f"routing weights ({self.strategy})")
        left.invert_xaxis()
        right.set(xlabel="step", ylabel="samples", title="expert usage per step")
        left.legend()
        right.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


# --- the sampler -----------------------------------------------------------------------------------------------
def make_noise(shape: Sequence[int], seeds: Sequence[int] | None = None, *, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Initial noise of ``shape`` (B, ...). With ``seeds`` sample i is drawn from its own CPU generator
    seeded ``seeds[i]``, so it is the same whatever the batch it is in and whatever the device."""
    shape = tuple(shape)
    if seeds is None:
        return torch.randn(shape, generator=generator, dtype=dtype).to(device)
    if len(seeds) != shape[0]:
        raise ValueError(f"{len(seeds)} seeds for a batch of {shape[0]}")
    rows = [torch.randn(shape[1:], generator=torch.Generator().manual_seed(int(s)), dtype=dtype) for s in seeds]
    return torch.stack(rows).to(device)


def _i2v_tensor(i2v: dict, x: torch.Tensor) -> torch.Tensor:
    latent = i2v.get("latent")
    if latent is None or latent.shape[0] != x.shape[0] or latent.shape[2:] != x.shape[2:] or x.ndim != 5:
        raise ValueError(f"i2v['latent'] must be (B, C, T, H, W) matching the sampled {tuple(x.shape)}, got "
                         f"{None if latent is None else tuple(latent.shape)}")
    batch, frames = x.shape[0], x.shape[2]
    mask = i2v.get("mask")
    if mask is None:
        mask = mode_frame_mask(i2v.get("mode", "first_frame"), frames)
    mask = torch.as_tensor(mask, dtype=torch.bool)
    if mask.shape == (frames,):
        mask = mask.expand(batch, frames)
    return i2v_condition(latent.to(x.device, x.dtype), mask.to(x.device))


def sample(experts: Sequence[ModelFn], router: ModelFn | None, noise: torch.Tensor | Sequence[int], cond: dict,
           spec: SamplingSpec | None = None, *, shift_alpha: float = 1.0, uncond: dict | None = None,
           oracle_ids=None, seeds: Sequence[int] | None = None, generator: torch.Generator | None = None,
           dtype: torch.dtype = torch.float32, i2v: dict | None = None, trace: bool = False, progress: bool = False,
           placement: ExpertPlacement | None = None, devices: Sequence[torch.device | str] | None = None,
           ) -> torch.Tensor | tuple[torch.Tensor, RoutingTrace]:
    """Integrate the routed velocity from noise (t = 1) to data (t = 0) with Euler on ``euler_schedule``.

    Args:
        experts, router: callables ``model(x, t, cond)``; ``router`` None for ``oracle`` or one expert.
        noise: the initial noise (B, ...), or its shape (drawn with ``seeds`` per sample, else ``generator``).
        cond: batch-first conditioning dict (docs/architecture.md); ``uncond`` the null dict for CFG.
        spec: :class:`ddm.sampling_spec.SamplingSpec` — routing, ``num_steps`` (default 50), ``cfg_scale``
            (guidance s, default 7.5; 1 = no guidance, no unconditional calls) and the placement policy.
        shift_alpha: the schedule ``shift(linspace(1, 0, N+1), alpha)`` (the caller resolves ``spec.shift``:
            it depends on the latent geometry).
        oracle_ids: the oracle's expert id (1..K) per sample.
        i2v: ``{"latent": (B, C, T, H, W), "mask": (B, T) or (T,) bool}`` (or ``"mode"``, default
            ``"first_frame"``) — packed into ``cond["i2v"]`` for every expert. Whenever ``cond`` has
            ``"i2v"``, the known latent frames are written into x before the first step, after each step and
            so in the output, which keeps the conditioning frames exactly.
        trace: also return a :class:`RoutingTrace`.
        placement, devices: a built :class:`ExpertPlacement` (the pipeline's), else one of ``spec.placement``
            over ``devices``; the sample lives on ``devices[0]`` (else on the noise's device). Module routers
            are moved there too.

    Returns:
        x0 (B, ...), and the trace when ``trace`` is set.
    """
    spec = spec if spec is not None else SamplingSpec()
    routing = spec.routing if spec.routing is not None else Routing()
    num_steps = int(spec.num_steps) if spec.num_steps is not None else 50
    cfg_scale = float(spec.cfg_scale) if spec.cfg_scale is not None else 7.5
    if placement is None:
        placement = ExpertPlacement(experts, spec.placement or "same", devices)
    if isinstance(noise, torch.Tensor):
        if seeds is not None:
            raise ValueError("give either a noise tensor or seeds, not both")
        home = placement.home or noise.device
        x = noise.to(home)
    else:
        home = placement.home or torch.device("cpu")
        x = make_noise(noise, seeds, dtype=dtype, device=home, generator=generator)
    if isinstance(router, torch.nn.Module):
        router.to(home)
    batch = x.shape[0]
    cond = {key: value.to(home) for key, value in cond.items()}
    if i2v is not None:
        cond["i2v"] = _i2v_tensor(i2v, x)
    if cfg_scale != 1.0:
        if uncond is None:
            raise ValueError(f"cfg_scale={cfg_scale} needs uncond (the null-text conditioning)")
        cond, uncond = prepare_uncond(cond, uncond, batch)  # once, not at every step
    known = cond.get("i2v")
    if known is not None:
        x = write_back_known_frames(x, known)

    times = euler_schedule(num_steps, shift_alpha).to(home)
    log.info("sampling %d x %s: %d Euler steps (shift %.3g), %d experts, routing %s, cfg %.3g, placement %s",
             batch, tuple(x.shape[1:]), num_steps, shift_alpha, len(experts), routing.label, cfg_scale,
             placement.policy)
    recorded = []
    try:
        for i in tqdm(range(num_steps), desc="sampling", disable=not progress):
            v, weights = routed_velocity(x, times[i].expand(batch), cond, experts, router, routing,
                                         oracle_ids=oracle_ids, cfg_scale=cfg_scale, uncond=uncond,
                                         return_weights=True, placement=placement)
            x = euler_step(x, v, times[i], times[i + 1])
            if known is not None:
                x = write_back_known_frames(x, known)
            if trace:
                recorded.append(weights.detach().cpu())
    finally:
        placement.release()
    if not trace:
        return x
    return x, RoutingTrace(routing.strategy, times[:-1].tolist(), torch.stack(recorded))
