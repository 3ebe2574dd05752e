"""Evaluation metrics of Paris 2.0's table (DESIGN §5.8), each returning a :class:`MetricResult`.

* :mod:`ddm.eval.fvd` — FVD on I3D features (:mod:`ddm.eval.i3d` loads the network), no per-video SE;
* :mod:`ddm.eval.clip_score` — CLIP ViT-L/14 text-video cosine, mean ± SE over videos;
* :mod:`ddm.eval.aesthetic` — LAION aesthetic predictor on CLIP image embeddings, mean ± SE;
* :mod:`ddm.eval.motion` — mean Farneback optical-flow magnitude (px/frame), mean ± SE.

Videos go in as uint8 (F, H, W, 3) / (N, F, H, W, 3) arrays, float (N, 3, F, H, W) tensors in [-1, 1],
or iterables of single videos (:mod:`ddm.eval.videos`). The metric modules are imported on demand so
that, e.g., motion alone does not pull in transformers.
"""
from ddm.eval.stats import TINY_LABEL, MetricResult, mean_and_stderr

__all__ = ["MetricResult", "mean_and_stderr", "TINY_LABEL"]
