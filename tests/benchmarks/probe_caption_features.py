"""How well each caption feature tells a caption's scene family: a linear probe trained on the training captions'
features, scored on held-out captions (docs/bench/grow.md, "The router reads T5").

    python tests/benchmarks/probe_caption_features.py grow_out          # the grow demo's folders
    python tests/benchmarks/probe_caption_features.py demo_out --train raw --heldout heldout_n100

The features are what a router can read: pooled CLIP, the T5 token states averaged over the caption's tokens
(``ddm.models.router.mean_over_tokens``), and both. The encoders are the folder's own (``prep/tiny_text``).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ddm.eval.groundtruth import read_manifest
from ddm.models.router import mean_over_tokens
from ddm.models.text import TextEncoders, pad_tokens


def captions(folder: Path) -> tuple[list[str], torch.Tensor]:
    """A generator folder's captions and family ids (its ``synthetic.csv``)."""
    rows = read_manifest(folder)
    return [r["text"] for r in rows], torch.tensor([int(r["family"]) for r in rows])


def features(encoders: TextEncoders, texts: list[str]) -> dict[str, torch.Tensor]:
    t5, clip = encoders.encode(texts)
    t5_mean = mean_over_tokens(pad_tokens(t5)[0])
    return {"pooled CLIP": clip, "T5 mean over tokens": t5_mean, "both": torch.cat([clip, t5_mean], dim=1)}


def probe(x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor, steps: int = 500) -> torch.Tensor:
    """Multinomial logistic regression on standardised features; the held-out predictions."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    x, x_test = (x - mean) / std, (x_test - mean) / std
    torch.manual_seed(0)
    head = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(x), y).backward()
        opt.step()
    with torch.no_grad():
        return head(x_test).argmax(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path, help="a grow or demo output folder")
    ap.add_argument("--train", nargs="+", default=["raw", "new"], help="generator folders of training captions")
    ap.add_argument("--heldout", default="heldout", help="generator folder of held-out captions")
    ap.add_argument("--new-family", type=int, default=3, help="list the old captions read as this family")
    args = ap.parse_args()
    text = args.root / "prep" / "tiny_text"
    encoders = TextEncoders.from_folder(text / "t5", text / "clip")
    train = [captions(args.root / name) for name in args.train if (args.root / name / "synthetic.csv").is_file()]
    texts, y = [t for c, _ in train for t in c], torch.cat([labels for _, labels in train])
    test_texts, y_test = captions(args.root / args.heldout)
    train_x, test_x = features(encoders, texts), features(encoders, test_texts)
    print(f"{len(texts)} training captions, {len(test_texts)} held-out captions, {int(y.max()) + 1} families")
    print("| caption feature | held-out family accuracy | old held-out captions read as the new family |")
    print("|---|---:|---|")
    for name in train_x:
        pred = probe(train_x[name], y, test_x[name])
        wrong = ((pred == args.new_family) & (y_test != args.new_family)).nonzero().flatten().tolist()
        print(f"| {name} | {float((pred == y_test).float().mean()):.3f} | {', '.join(map(str, wrong)) or 'none'} |")


if __name__ == "__main__":
    main()
