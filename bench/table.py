"""table.py — markdown tables of run folders: mean ± 95 % CI over seeds, and the paper's layout.

Run it (from the repository root, in the venv):
    python bench/table.py runs/claims/*                    # every arm, paired by seed with GRPO-seq
    python bench/table.py runs/paper/qwen05-gsm8k-*        # a paper row, beside the paper's figures

Runs are grouped by (task, model, algo, loss-agg, beta), one run per seed; what each run tells is
rlino.run_record (also the run's summary.json). Three tables: eval accuracy (start, end, gain), the length of
incorrect answers in training (slope over the steps, first and last step), each as mean ± 95 % CI over seeds
with each group's paired difference (by seed) to GRPO-seq (beta 0); then the final accuracies in the paper's
layout. `bench/paired.py` pairs any two arms.
"""
from __future__ import annotations

import argparse
import itertools
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # rlino.py lives one folder up
import rlino  # noqa: E402

# two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom (beyond: the normal's 1.96)
T_95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052,
        2.048, 2.045, 2.042)


def mean_ci(values: list) -> str:
    """'mean ± h' over runs, h the half-width of the 95 % confidence interval of the mean (Student's t with
    n - 1 degrees of freedom); 'mean (n = 1)' for a single run, '-' when there is nothing to average."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f} (n = 1)"
    return f"{np.mean(values):.3f} ± {ci_half_width(values):.3f}"


def sign_flip_p(differences) -> float:
    """The exact two-sided sign-flip (randomisation) p of paired differences: the share of the 2^n sign
    patterns whose mean is at least as far from 0 as the observed one. With n pairs it is never below 2 / 2^n
    (0.0625 at 5 pairs, 0.031 at 6); it needs no normality, which the t interval does."""
    d = np.asarray([v for v in differences if v is not None], dtype=float)
    if len(d) == 0:
        return float("nan")
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(d))))      # (2^n, n)
    return float(np.mean(np.abs(signs @ d) >= abs(d.sum()) - 1e-12))


def ci_half_width(values) -> float:
    """Half-width of the 95 % confidence interval of the mean of n >= 2 values (Student's t, n - 1 df)."""
    t = T_95[len(values) - 2] if len(values) - 1 <= len(T_95) else 1.96
    return t * float(np.std(values, ddof=1)) / math.sqrt(len(values))



# The paper's table (arXiv 2505.13697 v4, final test accuracy in %, as its summaries give it, see PAPER.md in
# the project's shared notes) by (model, benchmark), one figure per column of PAPER_ARMS; None where the
# paper has none. F-ISFT-'s 0.00 on Countdown is given without the model: we put it in both rows. Its PPO
# figure is for a 7B model only (v4), so no row here has one.
# (algo, GRPO with KL) -> the paper's column
PAPER_ARMS = {("grpo", True): "GRPO", ("grpo", False): "GRPO w/o KL", ("fisft+", False): "F-ISFT+",
              ("fisft+-", False): "F-ISFT+−", ("fisft-", False): "F-ISFT−", ("ppo", False): "PPO"}
PAPER_TABLE = {("Qwen2.5-0.5B", "gsm8k"): (55.87, 55.19, 51.71, 55.72, None, None),
               ("Qwen2.5-1.5B", "gsm8k"): (78.24, 76.87, 74.98, 76.37, None, None),
               ("Qwen2.5-0.5B", "countdown"): (37.73, 42.43, 44.01, 37.86, 0.00, None),
               ("Qwen2.5-1.5B", "countdown"): (71.43, 70.82, 53.57, 65.89, 0.00, None),
               ("Llama-3.2-1B-Instruct", "gsm8k"): (62.01, None, 57.31, 63.07, None, None),
               ("Llama-3.2-3B-Instruct", "gsm8k"): (84.59, None, 81.95, 83.54, None, None)}


def results_table(run_dirs: list[str]) -> str:
    """Three markdown tables over runs grouped by (task, model, algo, loss-agg, beta), one run per seed: eval
    accuracy (start, end, gain) and the length of incorrect answers in training (slope over the steps, first
    and last step), each as mean ± 95 % CI over seeds, with each group's paired difference (by seed) to
    GRPO-seq (beta 0); then the final accuracies in the paper's layout (paper_layout)."""
    groups = {}
    for run in run_dirs:
        cfg, rows = rlino.read_run(run)
        key = (cfg["task"], cfg["model"], cfg["algo"], cfg["loss_agg"], cfg.get("beta", 0.0))
        runs = groups.setdefault(key, {})
        if cfg["seed"] in runs:
            raise rlino.UsageError(f"{run}: a second run of {cfg['algo']} {cfg['loss_agg']} beta {key[-1]}, "
                                   f"seed {cfg['seed']}")
        runs[cfg["seed"]] = rlino.run_record(run, rows)

    def paired(task, model, runs: dict, key: str) -> str:
        reference = groups.get((task, model, "grpo", "seq", 0.0), {})
        diffs = [runs[s][key] - reference[s][key] for s in sorted(runs.keys() & reference.keys())
                 if runs[s][key] is not None and reference[s][key] is not None]
        return "(reference)" if runs is reference else mean_ci(diffs) + f" [{len(diffs)} pairs]"

    def first_to_last(runs: dict, key: str) -> str:
        firsts, lasts = zip(*(r[key] for r in runs.values()))
        return f"{mean_ci(list(firsts))} → {mean_ci(list(lasts))}"

    accuracy = ["| task | model | algo | loss-agg | beta | seeds | eval acc. start | eval acc. end | gain | "
                "end − GRPO-seq, paired |", "|" + " --- |" * 10]
    length = ["| task | model | algo | loss-agg | beta | seeds | slope of len wrong (tokens/step) | "
              "len wrong, first → last step | len right, first → last step | truncated | "
              "groups with signal | slope − GRPO-seq, paired |",
              "|" + " --- |" * 12]
    for (task, model, algo, agg, beta), runs in sorted(groups.items()):
        head = f"| {task} | {Path(model).name} | {algo} | {agg} | {beta:g} | {len(runs)} | "
        records = list(runs.values())
        accuracy.append(head + " | ".join([mean_ci([r[k] for r in records]) for k in ("start", "end", "gain")]
                                          + [paired(task, model, runs, "end")]) + " |")
        length.append(head + " | ".join([mean_ci([r["slope_wrong"] for r in records]),
                                         first_to_last(runs, "wrong"), first_to_last(runs, "right"),
                                         mean_ci([r["truncated"] for r in records]),
                                         mean_ci([r["signal"] for r in records]),
                                         paired(task, model, runs, "slope_wrong")]) + " |")
    n_eval = sorted({r["eval_n"] for runs in groups.values() for r in runs.values()})
    note = (f"\n\nEval accuracy: greedy, on {'/'.join(map(str, n_eval))} test problems. Mean ± half-width "
            "of the 95 % CI over seeds (Student's t); paired: the difference to the GRPO-seq run of the same "
            "seed.\n\n")
    return "\n".join(accuracy) + note + "\n".join(length) + "\n\n" + paper_layout(groups)


def paper_layout(groups: dict) -> str:
    """The last evaluation of the seq runs in the paper's layout, in %, next to its figures: a column per
    PAPER_ARMS, rows the paper, ours greedy and ours sampled (pass@1), per (task, model)."""
    columns = " | ".join(PAPER_ARMS.values())
    paper = [f"| model | task | final accuracy, % | {columns} |", "|" + " --- |" * (3 + len(PAPER_ARMS))]
    for task, model in sorted({key[:2] for key in groups}):
        arms = {arm: [] for arm in PAPER_ARMS.values()}  # the seq runs of each column
        for (t, m, algo, agg, beta), runs in groups.items():
            if (t, m, agg) == (task, model, "seq"):
                arms[PAPER_ARMS[algo, algo == "grpo" and beta > 0]] += runs.values()
        figures = PAPER_TABLE.get((Path(model).name, task.removesuffix("-paper")), (None,) * len(arms))
        rows = {"the paper": ["–" if f is None else f"{f:.2f}" for f in figures]}
        for what, key in (("ours, greedy", "end"), ("ours, sampled (pass@1)", "sampled")):
            rows[what] = [mean_ci([100 * r[key] for r in runs if r[key] is not None])
                          for runs in arms.values()]
        paper += [f"| {Path(model).name} | {task} | {what} | " + " | ".join(cells) + " |"
                  for what, cells in rows.items()]
    note = ("\n\nIn the paper's layout (seq runs; GRPO with beta > 0 is its GRPO column): the last "
            "evaluation, greedy and with --eval-samples (the authors sampled one answer at T 1.0, "
            "top-p 0.95); F-ISFT+− is GRPO without KL in another form (the same update).\n")
    return "\n".join(paper) + note



def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders")
    try:
        print(results_table(parser.parse_args(argv).runs))
    except rlino.UsageError as err:
        sys.exit(f"table.py: {err}")


if __name__ == "__main__":
    main()
