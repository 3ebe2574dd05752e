"""``python -m ddm.generate``: sample videos from a model folder with the routed sampler.

::

    python -m ddm.generate --model FOLDER --prompt "a red car" "a cat" [--image first_frame.png [--image-fit crop]]
        [--strategy top1|topk|full|threshold|oracle] [--k 2] [--num-steps 50] [--cfg-scale 7.5] [--seed 0]
        [--stage stage2|stage3] [--num-frames 129] [--out samples] [--trace]

Writes ``<out>/<index>_<slug>.mp4`` and ``.gif`` per sample, ``<out>/samples.json`` (prompt, seed and files
of every sample, and the settings), and with ``--trace`` the routing trace as ``routing_trace.json`` and
``routing_trace.png``. Sample i uses seed ``--seed + i``, so a run is reproducible.

The arguments, the images and a writable ``--out`` are checked before any expert is loaded. ``--steps``,
``--cfg`` and ``--frames`` are the old spellings of ``--num-steps``, ``--cfg-scale`` and ``--num-frames``
(deprecated aliases, kept for one release; ``ddm.assemble`` and ``ddm.evaluate`` share the same names).
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ddm.model_folder import read_model_index
from ddm.pipeline import DDMPipeline
from ddm.sampling_spec import Routing, SamplingSpec
from ddm.video_io import write_gif, write_video

log = logging.getLogger("ddm.generate")

DEFAULT_FPS = 8.0  # when the model folder records no frame rate for the stage


def slugify(text: str, max_length: int = 40) -> str:
    """A file-name-safe slug of a prompt: lower-case words joined by '-', at most ``max_length`` chars."""
    slug = "-".join(re.findall(r"[a-z0-9]+", text.lower()))[:max_length].strip("-")
    return slug or "sample"


def read_prompts(path: Path) -> list[str]:
    """One prompt per non-empty line."""
    prompts = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"'{path}' holds no prompts (one per line expected)")
    return prompts


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line (``None``: ``sys.argv``); nothing is checked or loaded here."""
    parser = argparse.ArgumentParser(prog="python -m ddm.generate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="the model folder (model_index.json, expert*/, ...)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", nargs="+", action="extend", help="one or more prompts")
    source.add_argument("--prompts", type=Path, help="a text file, one prompt per line")
    parser.add_argument("--image", type=Path, action="append", default=None,
                        help="first-frame image (i2v): once for every prompt, or once per prompt")
    parser.add_argument("--image-fit", choices=["crop", "resize"], default=None,
                        help="an image of another aspect ratio than the video: crop (scale to cover, centre-crop) "
                             "or resize (stretch); without it such an image is an error")
    parser.add_argument("--strategy", default="topk",
                        help="routing: top1, topk (with --k), topN (e.g. top2), full, threshold, oracle (with --expert)")
    parser.add_argument("--k", type=int, default=2, help="experts kept by --strategy topk")
    parser.add_argument("--threshold", type=float, default=0.1, help="weight threshold of --strategy threshold")
    parser.add_argument("--expert", type=int, default=None, help="the expert (1..K) of --strategy oracle")
    # The old spellings (--steps, --cfg, --frames) stay as deprecated aliases of the same arguments for one
    # release; the dest names are unchanged, so everything below reads what it always read.
    parser.add_argument("--num-steps", "--steps", dest="steps", type=int, default=None,
                        help="Euler steps (default: the model's, 50); --steps is a deprecated alias")
    parser.add_argument("--cfg-scale", "--cfg", dest="cfg", type=float, default=None,
                        help="guidance scale (default: the model's, 7.5); --cfg is a deprecated alias")
    parser.add_argument("--seed", type=int, default=0, help="seed of sample 0; sample i uses seed + i")
    parser.add_argument("--stage", default=None, help="stage2 | stage3 (default: the model's default stage)")
    parser.add_argument("--num-frames", "--frames", dest="frames", type=int, default=None,
                        help="frames per video, 4k+1 (default: the stage's); --frames is a deprecated alias")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("samples"))
    parser.add_argument("--trace", action="store_true", help="write the routing trace (json + png)")
    parser.add_argument("--no-gif", action="store_true", help="write only mp4 files")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="expert/router dtype (default: as stored)")
    parser.add_argument("--placement", choices=["same", "spread", "offload"], default="same")
    return parser.parse_args(argv)


def check_out_writable(out: Path) -> None:
    """Create ``out`` and write a probe file there, so a read-only or impossible ``--out`` fails before any
    model is loaded or any sample drawn."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as err:
        raise SystemExit(f"--out {out} is not writable: {err}") from None


def routing_of(args: argparse.Namespace) -> Routing:
    """The :class:`ddm.sampling_spec.Routing` of the flags (``--k`` counts only for ``--strategy topk``)."""
    return Routing.parse(args.strategy, k=args.k if args.strategy == "topk" else None, threshold=args.threshold)


def check_args(args: argparse.Namespace) -> None:
    """Every cheap check before the experts are loaded: the numbers, the model index, the images, --out."""
    for name, value, low in (("--num-steps", args.steps, 1), ("--k", args.k, 1),
                             ("--batch-size", args.batch_size, 1), ("--num-frames", args.frames, 1),
                             ("--height", args.height, 1), ("--width", args.width, 1)):
        if value is not None and value < low:
            raise SystemExit(f"{name} must be >= {low}, got {value}")
    if args.frames is not None and (args.frames - 1) % 4:
        raise SystemExit(f"--num-frames must be 4k+1 (1, 5, 9, ...), got {args.frames}")
    try:
        routing = routing_of(args)
    except ValueError as err:
        raise SystemExit(f"--strategy/--k/--threshold: {err}") from None
    try:
        num_experts = read_model_index(args.model).num_experts  # model_index.json alone: no weights read
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(str(err)) from None
    if num_experts and num_experts > 1:
        if routing.strategy == "topk" and routing.k > num_experts:
            raise SystemExit(f"--k {routing.k} is more than the {num_experts} experts of {args.model}")
        if routing.strategy == "oracle" and args.expert is not None and not 1 <= args.expert <= num_experts:
            raise SystemExit(f"--expert {args.expert} is outside 1..{num_experts}")
    missing = [str(p) for p in args.image or [] if not p.is_file()]
    if missing:
        raise SystemExit(f"--image file(s) not found: {', '.join(missing)}")
    check_out_writable(args.out)


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Run the CLI; returns the written video paths."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    prompts = list(args.prompt) if args.prompt else read_prompts(args.prompts)
    images = None
    if args.image:
        if len(args.image) not in (1, len(prompts)):
            raise SystemExit(f"--image given {len(args.image)} times for {len(prompts)} prompts: give it once "
                             "(for every prompt) or once per prompt")
        images = args.image * len(prompts) if len(args.image) == 1 else list(args.image)
    if args.strategy == "oracle" and args.expert is None:
        raise SystemExit("--strategy oracle needs --expert K (the expert every sample uses)")
    check_args(args)

    log.info("loading %s (stage %s) on %s", args.model, args.stage or "default", args.device)
    pipe = DDMPipeline.from_pretrained(args.model, stage=args.stage, device=args.device,
                                       dtype=getattr(torch, args.dtype) if args.dtype else None,
                                       placement=args.placement)
    spec = SamplingSpec(routing_of(args), num_steps=args.steps, cfg_scale=args.cfg)
    result = pipe.generate(prompts, spec, num_frames=args.frames, height=args.height, width=args.width,
                           seeds=args.seed, images=images, batch_size=args.batch_size, trace=args.trace,
                           oracle_ids=args.expert, image_fit=args.image_fit)
    fps = result.fps or DEFAULT_FPS
    written, records = [], []
    for i, (prompt, video) in enumerate(tqdm(list(zip(prompts, result.videos)), desc="writing", unit="video")):
        stem = args.out / f"{i:03d}_{slugify(prompt)}"
        mp4 = write_video(stem.with_suffix(".mp4"), video, fps)
        gif = None if args.no_gif else write_gif(stem.with_suffix(".gif"), video, fps)
        written.append(mp4)
        records.append({"index": i, "prompt": prompt, "seed": result.seeds[i], "mp4": mp4.name,
                        "gif": gif.name if gif else None,
                        "image": str(images[i]) if images else None})
        print(mp4)
    settings = {"model": str(args.model), **result.settings, "fps": fps}
    (args.out / "samples.json").write_text(json.dumps({"settings": settings, "samples": records}, indent=2) + "\n")
    if result.traces is not None:
        print(result.traces.to_json(args.out / "routing_trace.json"))
        print(result.traces.plot(args.out / "routing_trace.png"))
    log.info("%d video(s) written to %s", len(written), args.out)
    return written


if __name__ == "__main__":
    main()
