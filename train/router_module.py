"""The router's classifier LightningModule: (x_t, t) → which expert's cluster x0 came from.

Trained on every expert's shards with label = expert id − 1, noised with exactly the experts' flow
(same interpolation, logit-normal t, same video shift computed from the *expert's* patch geometry, t on
the experts' scale). Cross-entropy learns P(k | x_t), the weight of expert k in the exact mixture of
velocities (DESIGN §2). Validation measures, per timestep bin, accuracy, mean max-probability and
expected calibration error, and plots them against t.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from ddm import flow
from ddm.models.router import Router, RouterConfig
from train.flow_module import TrainingModule
from train.run import log_media
from train.settings import RouterSettings

log = logging.getLogger("ddm.train")


def calibration_by_t(t: torch.Tensor, probs: torch.Tensor, labels: torch.Tensor, bins: int,
                     conf_bins: int = 10) -> list[dict[str, float]]:
    """Per timestep bin over [0, 1]: count, accuracy, mean max-probability, expected calibration error."""
    conf, pred = probs.max(dim=1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    rows = []
    for i in range(bins):
        sel = (t >= edges[i]) & ((t < edges[i + 1]) if i < bins - 1 else (t <= edges[i + 1]))
        n = int(sel.sum())
        row = {"t_lo": float(edges[i]), "t_hi": float(edges[i + 1]), "n": n}
        if n:
            c, k = conf[sel], correct[sel]
            cb = torch.clamp((c * conf_bins).long(), max=conf_bins - 1)
            ece = sum(((cb == j).float().sum() / n) * (k[cb == j].mean() - c[cb == j].mean()).abs()
                      for j in range(conf_bins) if (cb == j).any())
            row.update(accuracy=float(k.mean()), mean_max_prob=float(c.mean()), ece=float(ece))
        rows.append(row)
    return rows


def plot_calibration(rows: list[dict[str, float]], path: Path, title: str = "router") -> None:
    """Accuracy, mean max-probability and ECE against t (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    filled = [r for r in rows if r["n"]]
    mid = [(r["t_lo"] + r["t_hi"]) / 2 for r in filled]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(mid, [r["accuracy"] for r in filled], "o-", label="accuracy")
    ax.plot(mid, [r["mean_max_prob"] for r in filled], "s--", label="mean max-probability")
    ax.plot(mid, [r["ece"] for r in filled], "^:", label="expected calibration error")
    ax.set_xlabel("t (1 = noise)")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class RouterModule(TrainingModule):
    """The router's classifier: cross-entropy of expert id on x_t, t (noised as the experts') from all
    experts' shards; validation on the EMA twin gives its calibration per t."""

    settings_class = RouterSettings

    def __init__(self, router_cfg: dict[str, Any], train: RouterSettings | Mapping[str, Any],
                 export_metadata: dict[str, Any], init_state_dict: dict[str, torch.Tensor] | None = None,
                 vae: torch.nn.Module | None = None) -> None:
        super().__init__(train, init_state_dict, vae)
        self.save_hyperparameters({"router_cfg": router_cfg, "train": self.settings.to_dict(),
                                   "export_metadata": export_metadata})
        self.router_cfg = RouterConfig.from_dict(router_cfg)
        self._val: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.calibration: list[dict[str, float]] = []

    def build_network(self) -> torch.nn.Module:
        return Router(self.router_cfg)

    def after_build(self) -> None:
        if self._init_state_dict is not None:
            self.load_initial_weights(self._init_state_dict)
            self._init_state_dict = None

    def flow_patch_size(self) -> tuple[int, int, int]:
        """The experts' patch (from the job), not the router's coarser one: x_t is noised as the experts'."""
        return self.settings.expert_patch_size

    def cond(self, batch: dict) -> dict[str, torch.Tensor]:
        cond = {"clip": batch["clip"].float()} if self.router_cfg.text_dim else {}
        if self.router_cfg.t5_dim:
            cond["t5"] = batch["t5"].float()
        return cond

    def labels(self, batch: dict) -> torch.Tensor:
        """The class of each sample: expert id − 1, or its position in ``expert_ids`` for a router over some of
        the pool's experts (``router_experts``)."""
        ids = self.settings.expert_ids
        if not ids or list(ids) == list(range(1, len(ids) + 1)):
            return batch["label"].long()
        lookup = torch.full((max(ids) + 1,), -1, dtype=torch.long)
        lookup[torch.tensor(ids)] = torch.arange(len(ids))
        return lookup.to(batch["expert"].device)[batch["expert"].long()]

    def training_step(self, batch: dict, batch_idx: int):
        x0 = self.latents(batch)
        t = self.sample_t(x0)
        x_t = flow.interpolate(x0, torch.randn_like(x0), t)
        logits = self.model(x_t, t, self.cond(batch))
        labels = self.labels(batch)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=float(self.settings.label_smoothing))
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        self.log("train/accuracy", (logits.argmax(1) == labels).float().mean(), on_step=True, on_epoch=False)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
        return self.guard_nonfinite(loss)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Evaluate the EMA router on a fixed grid of t (one per bin centre), seeded per batch."""
        x0 = self.latents(batch)
        bins = int(self.settings.calibration_bins)
        g = torch.Generator(device="cpu").manual_seed(1000 + batch_idx)
        for i in range(bins):
            t = torch.full((x0.shape[0],), (i + 0.5) / bins, device=x0.device)
            noise = torch.randn(x0.shape, generator=g).to(x0.device)
            logits = self.ema_model(flow.interpolate(x0, noise, t), t, self.cond(batch))
            self._val.append((t.cpu(), logits.float().softmax(-1).cpu(), self.labels(batch).cpu()))

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        t, probs, labels = (torch.cat(x) for x in zip(*self._val))
        self._val.clear()
        rows = calibration_by_t(t, probs, labels, int(self.settings.calibration_bins))
        self.calibration = rows
        acc = float((probs.argmax(1) == labels).float().mean())
        self.log("val/accuracy", acc)
        for r in rows:
            if r["n"]:
                key = f"{(r['t_lo'] + r['t_hi']) / 2:.2f}"
                self.log(f"val_t/accuracy_t{key}", r["accuracy"])
                self.log(f"val_t/ece_t{key}", r["ece"])
        if self.trainer.is_global_zero:
            out = Path(self.trainer.default_root_dir) / "plots"
            out.mkdir(parents=True, exist_ok=True)
            (out / "router_calibration.json").write_text(json.dumps({"step": self.global_step, "bins": rows},
                                                                    indent=2))
            plot_calibration(rows, out / "router_calibration.png",
                             title=f"router (EMA) at step {self.global_step}: accuracy {acc:.3f}")
            # the same PNG as wandb media when a wandb logger is attached (no-op otherwise)
            log_media(self.trainer.loggers, "val/router_calibration", [out / "router_calibration.png"],
                      step=self.global_step)
