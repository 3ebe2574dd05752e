"""Evaluation benchmark: metric throughput with the tiny backbones, and forward FLOPs of the real ones.

Run: ``python tests/benchmarks/bench_eval.py [--videos 12] [--threads 1] [--skip-full]``. Prints a Markdown
report (figures recorded in docs/bench/eval.md).

* Throughput: videos/s of each metric end to end (preprocessing included) on this CPU, with the tiny
  random-init backbones the tests use (``tiny-random (test only)``), on 16-frame 64×64 videos; the motion
  metric has no network, so it is also timed at 256², Paris 2.0's stage-2 resolution.
* FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over a forward of the full-size I3D (16×224² clip)
  and CLIP ViT-L/14 (one 224² frame; one 77-token caption) built on the meta device — no weights, no
  compute. CLIP's attention is switched to the eager path so its matmuls are counted. A closed-form
  count of the ViT-L/14 image tower is printed beside it as a cross-check.
* ``--skip-full`` skips timing one CPU forward of the full-size networks (random weights, same cost).
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig, CLIPVisionModelWithProjection

from ddm.eval.aesthetic import AestheticHead, aesthetic_score, load_aesthetic_head, make_tiny_aesthetic_head
from ddm.eval.clip_score import ClipEmbedder, clip_score
from ddm.eval.fvd import fvd_stats
from ddm.eval.i3d import InceptionI3d, load_i3d, make_tiny_i3d
from ddm.eval.motion import motion_score
from ddm.models.text import make_tiny_clip

VIT_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
               image_size=224, patch_size=14, projection_dim=768)
CLIP_L_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   max_position_embeddings=77, projection_dim=768)


def smooth_videos(n: int, frames: int, size: int, seed: int = 0) -> np.ndarray:
    """Moving low-frequency colour textures, uint8 (n, frames, size, size, 3)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 4, 8, 8, generator=g)
    v = torch.nn.functional.interpolate(base, size=(frames, size, size), mode="trilinear", align_corners=False)
    return (v.permute(0, 2, 3, 4, 1) * 255).round().to(torch.uint8).numpy()


def timed(fn, n_videos: int) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return n_videos / (time.perf_counter() - start), out


def bench_tiny(n: int, work: Path) -> list[tuple[str, str, float]]:
    """(metric, setting, videos/s) for each metric on tiny backbones."""
    videos, captions = smooth_videos(n, 16, 64), [f"a colourful texture number {i} drifts" for i in range(n)]
    i3d = load_i3d(make_tiny_i3d(work / "tiny_i3d.pt"))
    embedder = ClipEmbedder.from_folder(make_tiny_clip(work / "clip"))
    head = load_aesthetic_head(make_tiny_aesthetic_head(work / "head.pth", embedder.projection_dim))
    fvd_stats(videos[:2], i3d, progress=False)  # warm-up (TorchScript profiling runs)
    rows = []
    rate, _ = timed(lambda: fvd_stats(videos, i3d, progress=False), n)
    rows.append(("FVD features (one set)", "tiny I3D, 16×224² clip per video", rate))
    rate, _ = timed(lambda: clip_score(videos, captions, embedder, progress=False), n)
    rows.append(("CLIP text-video", "tiny CLIP 32², 16 frames", rate))
    rate, _ = timed(lambda: aesthetic_score(videos, embedder, head, progress=False), n)
    rows.append(("aesthetic", "tiny CLIP 32² + head, 16 frames", rate))
    rate, _ = timed(lambda: motion_score(videos, progress=False), n)
    rows.append(("motion", "Farneback at 64², 15 pairs", rate))
    big = smooth_videos(max(2, n // 3), 16, 256, seed=1)
    rate, _ = timed(lambda: motion_score(big, progress=False), len(big))
    rows.append(("motion", "Farneback at 256², 15 pairs", rate))
    return rows


def count_flops(model: torch.nn.Module, *args, **kwargs) -> int:
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            model(*args, **kwargs)
    return int(counter.get_total_flops())


def real_flops() -> dict[str, int]:
    """Forward FLOPs (multiply-add = 2) of the full-size backbones, counted on meta tensors."""
    with torch.device("meta"):
        i3d = InceptionI3d(400).eval()
        vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**VIT_L14, attn_implementation="eager")).eval()
        text = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L_TEXT, attn_implementation="eager")).eval()
        head = AestheticHead(768).eval()
        clip_in = torch.empty(1, 3, 16, 224, 224)
        frame = torch.empty(1, 3, 224, 224)
        tokens = torch.zeros(1, 77, dtype=torch.long)
        emb = torch.empty(1, 768)
    return {"i3d_clip": count_flops(i3d, clip_in, return_features=True),
            "clip_image_frame": count_flops(vision, pixel_values=frame),
            "clip_text_caption": count_flops(text, input_ids=tokens),
            "aesthetic_head_frame": count_flops(head, emb),
            "i3d_params": sum(p.numel() for p in i3d.parameters()),
            "vision_params": sum(p.numel() for p in vision.parameters())}


def vit_l14_closed_form() -> int:
    """Matmul FLOPs of the ViT-L/14 image tower at 224² (patch embed, 24 blocks, projection)."""
    d, m, layers, tokens = 1024, 4096, 24, 1 + (224 // 14) ** 2
    patch = 2 * (tokens - 1) * (3 * 14 * 14) * d
    block = 2 * tokens * (4 * d * d + 2 * d * m) + 2 * 2 * tokens * tokens * d  # qkv+out, MLP; QK^T and AV
    return patch + layers * block + 2 * d * 768


def time_full() -> list[tuple[str, float]]:
    """Seconds for one CPU forward of the full-size networks (random weights: same cost as real ones)."""
    torch.manual_seed(0)
    out = []
    i3d = InceptionI3d(400).eval()
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**VIT_L14)).eval()
    runs = (("I3D, one 16×224² clip", lambda: i3d(torch.rand(1, 3, 16, 224, 224), return_features=True)),
            ("CLIP ViT-L/14 image tower, 8 frames", lambda: vision(pixel_values=torch.rand(8, 3, 224, 224))))
    with torch.no_grad():
        for name, fn in runs:
            fn()  # warm-up
            start = time.perf_counter()
            fn()
            out.append((name, time.perf_counter() - start))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=12, help="videos per throughput run")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (and OpenCV's)")
    parser.add_argument("--skip-full", action="store_true", help="skip timing the full-size networks")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import cv2

    cv2.setNumThreads(args.threads)
    print(f"machine: {platform.machine()}, {args.threads} threads, torch {torch.__version__}, CPU\n")

    with tempfile.TemporaryDirectory() as tmp:
        rows = bench_tiny(args.videos, Path(tmp))
    print(f"### Throughput with tiny backbones ({args.videos} videos of 16 frames at 64², uint8; labelled "
          "tiny-random (test only))\n")
    print("| metric | setting | videos/s |\n|---|---|---:|")
    for metric, setting, rate in rows:
        print(f"| {metric} | {setting} | {rate:.2f} |")

    f = real_flops()
    closed = vit_l14_closed_form()
    print("\n### Forward FLOPs of the real backbones (FlopCounterMode on the meta device; 1 MAC = 2 FLOPs)\n")
    print("| backbone | input | GFLOPs | per video |\n|---|---|---:|---|")
    print(f"| I3D Inception-v1 ({f['i3d_params']:,} params) | 1 clip 3×16×224² | {f['i3d_clip'] / 1e9:.1f} | "
          "one clip per video (FVD) |")
    print(f"| CLIP ViT-L/14 image tower ({f['vision_params']:,} params) | 1 frame 224² | "
          f"{f['clip_image_frame'] / 1e9:.1f} | × frames / stride (129-frame video: "
          f"{129 * f['clip_image_frame'] / 1e12:.1f} TFLOPs) |")
    print(f"| CLIP ViT-L/14 text tower | 1 caption, 77 tokens | {f['clip_text_caption'] / 1e9:.2f} | once per video |")
    print(f"| LAION aesthetic head | 1 embedding (768) | {f['aesthetic_head_frame'] / 1e9:.5f} | "
          "× frames, on the CLIP image embeddings above |")
    print(f"\nClosed-form ViT-L/14 image tower: {closed / 1e9:.1f} GFLOPs/frame "
          f"(counter/closed form = {f['clip_image_frame'] / closed:.4f}).")

    if not args.skip_full:
        print("\n### One CPU forward of the full-size networks (random weights)\n")
        print("| network | seconds |\n|---|---:|")
        for name, secs in time_full():
            print(f"| {name} | {secs:.2f} |")


if __name__ == "__main__":
    main()
