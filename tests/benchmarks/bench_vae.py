"""VAE benchmark: encode/decode speed on this CPU, tiling overhead and error, activation memory at scale.

Run: ``python tests/benchmarks/bench_vae.py [--threads 1] [--repeats 3]``. Prints a Markdown report
(figures recorded in docs/bench/vae.md). Weights are random (no vae.pt here), which does not change speed;
the tiling error of a random network is not that of the trained one (see the report's note).
"""
from __future__ import annotations

import argparse
import platform
import time

import torch
from tqdm import tqdm

from ddm.models.hunyuan_vae import HunyuanVAEConfig
from ddm.models.vae import HunyuanVideoVAE, PixelVAE

GIB = 2**30


def median_seconds(fn, repeats: int, desc: str) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after one warm-up run."""
    fn()
    times = []
    for _ in tqdm(range(repeats), desc=desc, leave=False):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def bench_speed(vae, video: torch.Tensor, repeats: int, label: str) -> dict:
    with torch.no_grad():
        latent = vae.encode(video)
        enc = median_seconds(lambda: vae.encode(video), repeats, f"{label} encode")
        dec = median_seconds(lambda: vae.decode(latent), repeats, f"{label} decode")
    b, _, f, h, w = video.shape
    return {"vae": label, "video": f"{b}×{f}×{h}×{w}", "latent": "×".join(map(str, latent.shape[1:])),
            "encode_s": enc, "decode_s": dec, "clips_per_s": b / (enc + dec)}


def tiling_error(tile_px: int, frames: int, overlap: float) -> dict:
    """Relative L2 difference tiled vs untiled of a random-init tiny VAE (float64)."""
    torch.manual_seed(0)
    vae = HunyuanVideoVAE(HunyuanVAEConfig.tiny()).double().eval()
    x = torch.rand(1, 3, 17, 64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x)
        y = vae.decode(z)
        vae.enable_tiling(tile_px, overlap=overlap, tile_latent_min_frames=frames, progress=False)
        z_t, y_t = vae.encode(x), vae.decode(z)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    return {"tile": f"{tile_px} px, {frames} latent frames", "overlap": overlap,
            "encode_rel": rel(z_t, z), "decode_rel": rel(y_t, y)}


def largest_activation_gib(frames: int, size: int, bytes_per: int = 2) -> tuple[float, float]:
    """Largest single activation of the 884-16c encoder (128 ch at full size) and decoder (256 ch at full
    size: up block 2's upsampler output), in GiB; causal padding makes one more copy of each conv input."""
    pixels = frames * size * size
    return 128 * pixels * bytes_per / GIB, 256 * pixels * bytes_per / GIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.machine()}, {args.threads} torch threads, torch {torch.__version__}, CPU\n")

    rows = [bench_speed(PixelVAE(2), torch.rand(8, 3, 33, 64, 64) * 2 - 1, args.repeats, "pixel (s=2)")]
    torch.manual_seed(0)
    rows.append(bench_speed(HunyuanVideoVAE(HunyuanVAEConfig.tiny()).eval(), torch.rand(1, 3, 17, 64, 64) * 2 - 1,
                            args.repeats, "hunyuan-tiny"))
    full = HunyuanVideoVAE().eval()
    x = torch.rand(1, 3, 9, 64, 64) * 2 - 1
    rows.append(bench_speed(full, x, 1, "hunyuan 884-16c"))
    full.enable_tiling(32, overlap=0.25, progress=False)
    rows.append(bench_speed(full, x, 1, "hunyuan 884-16c, 32 px tiles"))
    print("### Encode / decode, float32, median wall time\n")
    print("| VAE | video B×F×H×W | latent C×T×h×w | encode s | decode s | clips/s |")
    print("|---|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['vae']} | {r['video']} | {r['latent']} | {r['encode_s']:.3f} | {r['decode_s']:.3f} | "
              f"{r['clips_per_s']:.2f} |")

    print("\n### Tiled vs untiled, random-init tiny VAE, 17×64×64 (relative L2 difference)\n")
    print("| tiles | overlap | encode | decode |")
    print("|---|---:|---:|---:|")
    for tile_px, frames, overlap in tqdm([(32, 99, 0.25), (32, 99, 0.5), (48, 99, 0.5), (512, 3, 0.5)],
                                         desc="tiling error", leave=False):
        r = tiling_error(tile_px, frames, overlap)
        print(f"| {r['tile']} | {r['overlap']} | {r['encode_rel']:.3f} | {r['decode_rel']:.3f} |")

    print("\n### Largest single activation of the 884-16c VAE in bf16 (closed form)\n")
    print("| input | encoder GiB | decoder GiB |")
    print("|---|---:|---:|")
    for frames, size, label in [(33, 256, "256² × 33 frames, untiled"), (129, 256, "256² × 129 frames, untiled"),
                                (129, 768, "768² × 129 frames, untiled"),
                                (65, 256, "one default tile: 256² × 65 frames (16 latent frames + context)")]:
        enc, dec = largest_activation_gib(frames, size)
        print(f"| {label} | {enc:.1f} | {dec:.1f} |")


if __name__ == "__main__":
    main()
