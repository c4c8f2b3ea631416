"""plot.py — the curves of run folders in one PNG: eval accuracy, train reward, and the lengths of correct and
incorrect answers over the steps, one line per run (a colour per algo and loss-agg, a line style per seed).

Run it (from the repository root, in the venv; needs matplotlib):
    python bench/plot.py runs/claims/* --out claims.png
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # rlino.py lives one folder up
import rlino  # noqa: E402


def plot_runs(run_dirs: list[str], out_png: str) -> None:
    """One line per run (algo, loss-agg, seed): eval accuracy, reward, and the lengths of correct and
    incorrect answers."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise rlino.UsageError("plot.py needs matplotlib: pip install matplotlib") from None
    if Path(out_png).suffix.lower() != ".png" or not Path(out_png).parent.is_dir():
        raise rlino.UsageError(f"--out {out_png}: a .png file in an existing folder, please")
    panels = [("eval_accuracy", "eval accuracy"), ("reward_mean", "train reward"),
              ("len_correct", "length of correct answers"), ("len_incorrect", "length of incorrect answers")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    colours, styles = {}, {}  # one colour per (algo, loss-agg), one line style per seed
    for run in run_dirs:
        run_cfg, rows = rlino.read_run(run)
        variant = f"{run_cfg['algo']} {run_cfg['loss_agg']}"
        colour = colours.setdefault(variant, f"C{len(colours) % 10}")
        style = styles.setdefault(run_cfg["seed"], ("-", "--", ":", "-.")[len(styles) % 4])
        for ax, (key, title) in zip(axes, panels):
            points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, color=colour, linestyle=style,
                        label=f"{variant} seed {run_cfg['seed']}")
            ax.set_title(title)
            ax.set_xlabel("step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(out_png, dpi=100)
    except OSError as err:
        raise rlino.UsageError(f"cannot write {out_png}: {err.strerror}") from None
    print(f"wrote {out_png}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders")
    parser.add_argument("--out", default="runs.png", help="the PNG to write")
    args = parser.parse_args(argv)
    try:
        plot_runs(args.runs, args.out)
    except rlino.UsageError as err:
        rlino.fail(str(err))


if __name__ == "__main__":
    main()
