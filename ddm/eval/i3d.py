"""The I3D video network behind FVD: loader for the released weights, our Inception-3D, a tiny stand-in.

FVD features are the 400 pre-softmax Kinetics-400 logits of I3D (Carreira & Zisserman, 2017), averaged
over time, for a clip ``(N, 3, 16, 224, 224)`` with values in [-1, 1] (DESIGN §5.8).

Two weight formats load through :func:`load_i3d`:

* **TorchScript** (primary): ``i3d_torchscript.pt`` from the StyleGAN-V FVD release — a port of the
  tf.hub ``i3d-kinetics-400`` module used by the original FVD code. It is called as
  ``detector(x, rescale=False, resize=False, return_features=True)``: we do the [-1, 1] scaling and the
  224² resize ourselves (:mod:`ddm.eval.fvd`), so the flags stay off and the network sees exactly our clip.
* **State dict** in the pytorch-i3d layout (``Conv3d_1a_7x7.conv3d.weight``, ``Mixed_3b.b1b.bn.running_var``,
  ``logits.conv3d.bias``, …, e.g. ``rgb_imagenet.pt``), loaded strictly into :class:`InceptionI3d`.
  Its weights differ from the tf.hub ones, so its FVD values are not comparable with TorchScript ones.

:class:`InceptionI3d` follows the published architecture: Inception-v1 inflated to 3D, TF "SAME"
padding, BatchNorm(eps 1e-3) + ReLU after every convolution, a (2, 7, 7) VALID average pool, a 1×1×1
logits convolution with bias, and logits averaged over the remaining time steps. ``width_divisor``
shrinks every channel count for the tiny random-init test network that :func:`make_tiny_i3d` scripts
and saves, so tests load it through the very same TorchScript path as the real file.
"""
from __future__ import annotations

import json
import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ddm.assets import require_path
from ddm.files import file_sha256
from ddm.models.weights import load_state_dict_strict
from ddm.eval.stats import TINY_LABEL

__all__ = ["InceptionI3d", "I3DBackbone", "load_i3d", "make_tiny_i3d"]

log = logging.getLogger(__name__)

_EXTRA_FILE = "ddm_backbone.json"  # metadata we store inside TorchScript archives we write

# Inception modules: (name, [b0, b1a, b1b, b2a, b2b, b3b]) from the I3D paper / Inception-v1.
_MIXED: list[tuple[str, list[int]]] = [
    ("Mixed_3b", [64, 96, 128, 16, 32, 32]),
    ("Mixed_3c", [128, 128, 192, 32, 96, 64]),
    ("Mixed_4b", [192, 96, 208, 16, 48, 64]),
    ("Mixed_4c", [160, 112, 224, 24, 64, 64]),
    ("Mixed_4d", [128, 128, 256, 24, 64, 64]),
    ("Mixed_4e", [112, 144, 288, 32, 64, 64]),
    ("Mixed_4f", [256, 160, 320, 32, 128, 128]),
    ("Mixed_5b", [256, 160, 320, 32, 128, 128]),
    ("Mixed_5c", [384, 192, 384, 48, 128, 128]),
]


def _same_padding(size: int, kernel: int, stride: int) -> List[int]:
    """TF "SAME" padding (front, back) for one axis: output length ceil(size / stride)."""
    if size % stride == 0:
        total = max(kernel - stride, 0)
    else:
        total = max(kernel - size % stride, 0)
    return [total // 2, total - total // 2]


def _pad_same(x: torch.Tensor, kernel: List[int], stride: List[int]) -> torch.Tensor:
    pt = _same_padding(x.shape[2], kernel[0], stride[0])
    ph = _same_padding(x.shape[3], kernel[1], stride[1])
    pw = _same_padding(x.shape[4], kernel[2], stride[2])
    # Zero padding is exact for the max pools too: every pooled input follows a ReLU (>= 0).
    return F.pad(x, [pw[0], pw[1], ph[0], ph[1], pt[0], pt[1]])


class Unit3D(nn.Module):
    """Conv3d with TF SAME padding, then BatchNorm3d(eps=1e-3) and ReLU (keys ``conv3d``, ``bn``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: List[int], stride: List[int] | None = None,
                 batch_norm: bool = True, relu: bool = True, bias: bool = False):
        super().__init__()
        self.kernel = list(kernel)
        self.stride = list(stride or [1, 1, 1])
        self.conv3d = nn.Conv3d(in_channels, out_channels, self.kernel, self.stride, padding=0, bias=bias)
        self.bn = nn.BatchNorm3d(out_channels, eps=1e-3, momentum=0.01) if batch_norm else nn.Identity()
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv3d(_pad_same(x, self.kernel, self.stride)))
        return F.relu(x) if self.relu else x


class MaxPoolSame(nn.Module):
    """3D max pool with TF SAME padding (no parameters)."""

    def __init__(self, kernel: List[int], stride: List[int]):
        super().__init__()
        self.kernel = list(kernel)
        self.stride = list(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool3d(_pad_same(x, self.kernel, self.stride), self.kernel, self.stride)


class InceptionModule(nn.Module):
    """Four parallel branches (1×1; 1×1→3×3; 1×1→3×3; pool→1×1) concatenated on channels."""

    def __init__(self, in_channels: int, widths: List[int]):
        super().__init__()
        self.b0 = Unit3D(in_channels, widths[0], [1, 1, 1])
        self.b1a = Unit3D(in_channels, widths[1], [1, 1, 1])
        self.b1b = Unit3D(widths[1], widths[2], [3, 3, 3])
        self.b2a = Unit3D(in_channels, widths[3], [1, 1, 1])
        self.b2b = Unit3D(widths[3], widths[4], [3, 3, 3])
        self.b3a = MaxPoolSame([3, 3, 3], [1, 1, 1])
        self.b3b = Unit3D(in_channels, widths[5], [1, 1, 1])
        self.out_channels = widths[0] + widths[2] + widths[4] + widths[5]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1)


class InceptionI3d(nn.Module):
    """Inception-v1 I3D (pytorch-i3d key names). ``forward`` mirrors the TorchScript detector's call.

    Input (N, 3, T, 224, 224) in [-1, 1]; with ``return_features=True`` the output is the (N, num_classes)
    pre-softmax logits averaged over time, else their softmax. ``rescale``/``resize`` exist only so both
    weight formats share one call signature; preprocessing happens in :mod:`ddm.eval.fvd`, so they must be False.
    """

    def __init__(self, num_classes: int = 400, width_divisor: int = 1):
        super().__init__()

        def w(c: int) -> int:
            return max(1, c // width_divisor)

        self.num_classes = num_classes
        self.Conv3d_1a_7x7 = Unit3D(3, w(64), [7, 7, 7], [2, 2, 2])
        self.MaxPool3d_2a_3x3 = MaxPoolSame([1, 3, 3], [1, 2, 2])
        self.Conv3d_2b_1x1 = Unit3D(w(64), w(64), [1, 1, 1])
        self.Conv3d_2c_3x3 = Unit3D(w(64), w(192), [3, 3, 3])
        self.MaxPool3d_3a_3x3 = MaxPoolSame([1, 3, 3], [1, 2, 2])
        channels = w(192)
        mixed = {}
        for name, widths in _MIXED:
            mixed[name] = InceptionModule(channels, [w(c) for c in widths])
            channels = mixed[name].out_channels
        self.Mixed_3b, self.Mixed_3c = mixed["Mixed_3b"], mixed["Mixed_3c"]
        self.MaxPool3d_4a_3x3 = MaxPoolSame([3, 3, 3], [2, 2, 2])
        self.Mixed_4b, self.Mixed_4c, self.Mixed_4d = mixed["Mixed_4b"], mixed["Mixed_4c"], mixed["Mixed_4d"]
        self.Mixed_4e, self.Mixed_4f = mixed["Mixed_4e"], mixed["Mixed_4f"]
        self.MaxPool3d_5a_2x2 = MaxPoolSame([2, 2, 2], [2, 2, 2])
        self.Mixed_5b, self.Mixed_5c = mixed["Mixed_5b"], mixed["Mixed_5c"]
        self.avg_pool = nn.AvgPool3d(kernel_size=[2, 7, 7], stride=[1, 1, 1])  # VALID, as in the release
        self.dropout = nn.Dropout(0.5)
        self.logits = Unit3D(channels, num_classes, [1, 1, 1], batch_norm=False, relu=False, bias=True)

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        if rescale or resize:
            raise ValueError("InceptionI3d expects preprocessed clips: call it with rescale=False, resize=False")
        x = self.MaxPool3d_3a_3x3(self.Conv3d_2c_3x3(self.Conv3d_2b_1x1(self.MaxPool3d_2a_3x3(self.Conv3d_1a_7x7(x)))))
        x = self.MaxPool3d_4a_3x3(self.Mixed_3c(self.Mixed_3b(x)))
        x = self.MaxPool3d_5a_2x2(self.Mixed_4f(self.Mixed_4e(self.Mixed_4d(self.Mixed_4c(self.Mixed_4b(x))))))
        x = self.logits(self.dropout(self.avg_pool(self.Mixed_5c(self.Mixed_5b(x)))))
        logits = x.mean(dim=[2, 3, 4])  # spatial dims are 1 at 224²; average the logits over time
        return logits if return_features else F.softmax(logits, dim=1)


@dataclass
class I3DBackbone:
    """A loaded I3D detector plus what a result must record about it."""

    module: Any  # torch.jit.ScriptModule or InceptionI3d
    name: str
    tiny: bool
    route: str  # "torchscript" | "state_dict"
    path: str
    sha256: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @torch.inference_mode()
    def features(self, clips: torch.Tensor) -> np.ndarray:
        """Pre-softmax logits (N, D) in float64 for clips (N, 3, T, 224, 224) in [-1, 1]."""
        if clips.ndim != 5 or clips.shape[1] != 3:
            raise ValueError(f"I3D clips must be (N, 3, T, H, W), got {tuple(clips.shape)}")
        out = self.module(clips.to(self.device, torch.float32), rescale=False, resize=False, return_features=True)
        return out.detach().to("cpu", torch.float64).numpy()

    def details(self) -> dict[str, Any]:
        """Backbone fields for ``MetricResult.details`` (tiny stand-ins carry the test-only label)."""
        return {"backbone": TINY_LABEL if self.tiny else self.name, "backbone_route": self.route,
                "backbone_sha256": self.sha256[:16], "tiny_test_backbone": self.tiny}


def _is_torchscript_archive(path: Path) -> bool:
    """TorchScript zips hold a ``code/`` folder; plain ``torch.save`` zips (and legacy pickles) do not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in n for n in z.namelist())


def _load_state_dict_i3d(path: Path) -> InceptionI3d:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or "logits.conv3d.weight" not in state:
        raise ValueError(f"{path} is neither a TorchScript archive nor a pytorch-i3d state dict "
                         "(no 'logits.conv3d.weight' key)")
    # The stem width (64 in the release) tells a narrowed test network apart from the real one.
    width_divisor = 64 // int(state["Conv3d_1a_7x7.conv3d.weight"].shape[0])
    model = InceptionI3d(num_classes=int(state["logits.conv3d.weight"].shape[0]), width_divisor=width_divisor)
    # Files saved by old torch versions lack BatchNorm's step counters, which inference never reads.
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = v
    load_state_dict_strict(model, state, str(path))
    return model


def load_i3d(path: str | Path, device: str | torch.device = "cpu") -> I3DBackbone:
    """Load an I3D detector from a TorchScript archive or a pytorch-i3d state dict, in eval mode.

    A missing file raises FileNotFoundError saying where ``i3d_torchscript.pt`` comes from.
    """
    p = require_path(path, "i3d")
    device = torch.device(device)
    if _is_torchscript_archive(p):
        extra = {_EXTRA_FILE: ""}
        module = torch.jit.load(str(p), map_location=device, _extra_files=extra)
        meta = json.loads(extra[_EXTRA_FILE]) if extra[_EXTRA_FILE] else {}
        route = "torchscript"
        name = meta.get("name", "I3D Kinetics-400 (TorchScript, tf.hub port)")
        tiny = bool(meta.get("tiny", False))
    else:
        module = _load_state_dict_i3d(p).to(device)
        tiny = module.Conv3d_1a_7x7.conv3d.out_channels != 64
        route, name = "state_dict", TINY_LABEL if tiny else "I3D Kinetics-400 (pytorch-i3d state dict)"
    module.eval()
    backbone = I3DBackbone(module, name, tiny, route, str(p), file_sha256(p), device)
    log.info("loaded I3D from %s (%s%s)", p, route, f", {TINY_LABEL}" if tiny else "")
    return backbone


def make_tiny_i3d(path: str | Path, seed: int = 0, *, num_classes: int = 8, width_divisor: int = 32) -> Path:
    """Script a random-init, narrow :class:`InceptionI3d` and save it as a TorchScript file (tests only).

    Same architecture and call signature as the real detector, channel counts divided by
    ``width_divisor``; the archive records that it is a tiny test backbone, so every result made with
    it is labelled ``tiny-random (test only)``.
    """
    torch.manual_seed(seed)
    model = InceptionI3d(num_classes=num_classes, width_divisor=width_divisor).eval()
    for m in model.modules():
        if isinstance(m, nn.Conv3d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        if isinstance(m, nn.BatchNorm3d):
            m.momentum = None  # cumulative average over the calibration pass below
    # A random deep ReLU net maps every input to nearly the same output. Setting the BatchNorm statistics
    # from a pass over smooth random clips re-centres each layer, so different videos keep different
    # features (and covariances of O(1) scale) - a stand-in that can tell video sets apart.
    g = torch.Generator().manual_seed(seed)
    calib = torch.rand(2, 3, 4, 28, 28, generator=g) * 2 - 1
    calib = F.interpolate(calib, size=(16, 224, 224), mode="trilinear", align_corners=False)
    model.train()
    with torch.no_grad():
        model(calib, return_features=True)
    model.eval()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    meta = {"name": TINY_LABEL, "tiny": True, "seed": seed, "num_classes": num_classes,
            "width_divisor": width_divisor}
    torch.jit.save(torch.jit.script(model), str(p), _extra_files={_EXTRA_FILE: json.dumps(meta)})
    return p
