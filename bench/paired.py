"""paired.py — two arms of an experiment compared seed by seed (README: "Experiments", 2 and 3).

Run it (from the repository root, in the venv):
    python bench/paired.py runs/claims/fisft-_seq_s* --vs runs/claims/fisft-_token_s*
    python bench/paired.py runs/horizon/grpo_seq_s* --vs runs/horizon/fisft+_seq_s* --late-from 25

`bench/table.py` pairs every arm with GRPO-seq; an experiment's registered statistic is often another pair
(F-ISFT- seq against token; GRPO against F-ISFT+). For each seed that both arms ran, from each run folder's
config.json and metrics.jsonl: the least-squares slope of `len_incorrect` over the training steps (steps
without incorrect completions left out, as `bench/table.py` does), over the steps from `--late-from` on as
well when it is given, and the last evaluation's accuracy; then each paired difference A - B, mean +- the
half-width of its 95 % CI (Student's t, pairs - 1 degrees of freedom), and its exact two-sided sign-flip p
(which needs no normality; its smallest value is 2 / 2^pairs). Prints a markdown table.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # rlino.py lives one folder up
import rlino  # noqa: E402
from table import mean_ci, sign_flip_p  # noqa: E402  (bench/table.py)


def per_seed(run_dirs: list[str], late_from: int | None) -> tuple[str, dict]:
    """One arm's runs by seed: the arm's name and, per seed, its slope(s) and final accuracy."""
    names, runs = set(), {}
    for run in run_dirs:
        cfg, rows = rlino.read_run(run)
        names.add(f"{cfg['algo']} {cfg['loss_agg']}")
        if cfg["seed"] in runs:
            raise rlino.UsageError(f"{run}: a second run of seed {cfg['seed']}")
        summary = rlino.run_record(run, rows)                                # what bench/table.py reads
        record = {"slope": summary["slope_wrong"], "accuracy": summary["end"],
                  "eval step": [r["step"] for r in rows if r.get("eval_accuracy") is not None][-1]}
        if late_from is not None:
            record["late slope"] = rlino.slope([(r["step"], r["len_incorrect"]) for r in rows
                                                if "reward_mean" in r and r.get("len_incorrect") is not None
                                                and r["step"] >= late_from])
        runs[cfg["seed"]] = record
    if len(names) != 1:
        raise rlino.UsageError(f"one arm per side, please: {sorted(names)}")
    return names.pop(), runs


def paired_table(a_dirs: list[str], b_dirs: list[str], *, late_from: int | None = None) -> str:
    """The markdown table: per seed each arm's figures and A - B, then each difference's mean +- 95 % CI."""
    (a_name, a), (b_name, b) = per_seed(a_dirs, late_from), per_seed(b_dirs, late_from)
    seeds = sorted(a.keys() & b.keys())
    if not seeds:
        raise rlino.UsageError("no seed that both arms ran")
    keys = ["slope"] + (["late slope"] if late_from is not None else []) + ["accuracy"]
    titles = {"slope": "slope of len wrong", "late slope": f"slope of len wrong from step {late_from}",
              "accuracy": "last eval accuracy"}
    head = ["seed"] + [f"{titles[k]}: {arm}" for k in keys for arm in (a_name, b_name, "A − B")]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    diffs = {k: [] for k in keys}
    for seed in seeds:
        cells = [str(seed)]
        for k in keys:
            x, y = a[seed][k], b[seed][k]
            d = None if x is None or y is None else x - y
            if d is not None:
                diffs[k].append(d)
            cells += ["-" if v is None else f"{v:+.3f}" if k != "accuracy" else f"{v:.3f}" for v in (x, y)]
            cells.append("-" if d is None else f"{d:+.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    mean_row = ["mean ± 95 % CI"] + [cell for k in keys for cell in ("", "", mean_ci(diffs[k]))]
    p_row = ["exact sign-flip p"] + [cell for k in keys for cell in ("", "", f"{sign_flip_p(diffs[k]):.4f}")]
    lines += ["| " + " | ".join(mean_row) + " |", "| " + " | ".join(p_row) + " |"]
    steps = sorted({r["eval step"] for r in (*a.values(), *b.values())})
    return "\n".join(lines) + (f"\n\nA = {a_name}, B = {b_name}; {len(seeds)} pairs (seeds "
                               f"{', '.join(map(str, seeds))}); last evaluation at step "
                               f"{'/'.join(map(str, steps))}; slopes in tokens per step.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", nargs="+", help="arm A's run folders, one per seed")
    parser.add_argument("--vs", nargs="+", required=True, help="arm B's run folders, one per seed")
    parser.add_argument("--late-from", type=int, help="also the slope over the steps from this one on")
    args = parser.parse_args()
    try:
        print(paired_table(args.a, args.vs, late_from=args.late_from))
    except rlino.UsageError as err:
        sys.exit(f"paired.py: {err}")


if __name__ == "__main__":
    main()
