"""The laptop demo's compute curve: colour and direction accuracy of the DDM and its compute-matched monolith
against the DDM's training FLOPs. ``python -m tests.benchmarks.plot_compute_curve [--data JSON] [--out PNG]``

The points are the measured demo runs of docs/bench/demo.md ("The compute curve"), kept with the command of
each in ``docs/bench/demo/compute_curve.json``; a new run is added there by hand from its ``eval/report.md`` and
the FLOPs line of the demo's compute ledger.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DOCS = Path(__file__).resolve().parents[2] / "docs" / "bench" / "demo"


PARIS_DROPOUT = 0.316  # text dropout per encoder of the runs that do not record one (before the ninth session)


def _dropout(row: dict) -> float:
    return float(row.get("text_dropout", PARIS_DROPOUT))


def _series(rows: list[dict]) -> dict[tuple[int, float], str]:
    """One marker per (width, text dropout) series."""
    keys = sorted({(r["width"], _dropout(r)) for r in rows})
    return {key: "osD^v<>"[i % 7] for i, key in enumerate(keys)}


def plot(rows: list[dict], out: Path) -> Path:
    """Two panels (colour, direction) of accuracy against DDM training FLOPs; one line per arm, width and text
    dropout (runs without ``text_dropout`` used Paris's 0.316 per encoder)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for ax, attr, target, title in ((axes[0], "colour", 0.60, "foreground colour (target 0.60, chance 0.11)"),
                                    (axes[1], "direction", 0.25, "motion direction (chance 0.25)")):
        for (width, dropout), marker in sorted(_series(rows).items()):
            pts = sorted((r for r in rows if (r["width"], _dropout(r)) == (width, dropout)),
                         key=lambda r: r["ddm_flops"])
            for arm, colours in (("ddm", ("tab:blue", "tab:green")), ("monolith", ("tab:orange", "tab:red"))):
                xy = [(r["ddm_flops"], r[f"{arm}_{attr}"]) for r in pts if r.get(f"{arm}_{attr}") is not None]
                if xy:
                    ax.plot(*zip(*xy), marker=marker, color=colours[dropout != PARIS_DROPOUT],
                            linestyle="-" if width == 128 else "--",
                            label=f"{'DDM top-1' if arm == 'ddm' else 'monolith'}, width {width}, "
                                  f"text dropout {dropout:g}")
        ax.axhline(target, color="grey", linewidth=0.8, linestyle=":")
        ax.set_xscale("log")
        ax.set_xlabel("DDM training FLOPs (monolith compute-matched)")
        ax.set_ylabel("accuracy, N = 100 held-out prompts")
        ax.set_title(title, fontsize=9)
        ax.set_ylim(0, 1)
    axes[0].legend(fontsize=7)
    fig.suptitle("laptop demo: what the tiny models learn against training compute (launch/demo.sh)", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DOCS / "compute_curve.json")
    ap.add_argument("--out", type=Path, default=DOCS / "compute_curve.png")
    args = ap.parse_args()
    rows = json.loads(args.data.read_text(encoding="utf-8"))["runs"]
    print(f"wrote {plot(rows, args.out)} ({len(rows)} runs)")


if __name__ == "__main__":
    main()
