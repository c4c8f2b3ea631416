"""gap.py — experiment 4 (bench/EXPERIMENTS.md): the length gap between wrong and right answers of one group,
GRPO with --loss-agg seq against const (Dr. GRPO), paired by seed; and the gate of its task on a pilot run.

Run it (from the repository root, in the venv):
    python bench/gap.py gate runs/gap/pilot_s100     # the task's gate, on a 24-step GRPO-seq pilot
    python bench/gap.py pairs runs/gap               # the pairs grpo_seq_s<seed> / grpo_const_s<seed>

Everything is read from the run folders' rollouts.jsonl (every rollout: step, prompt, length, reward,
truncation), evals.jsonl, metrics.jsonl, config.json and cpu.txt (the CPU a run ran on, written by
`./run.sh gap`). A group is the G rollouts of one prompt at one step; it is mixed when it holds a right answer
(reward 1) and a wrong one. The primary statistic of a run: over steps 25-48, the mean over the mixed groups
of (mean wrong length - mean right length). Each pair gives seq - const; the pairs give mean +- 95 % CI
(Student's t) and the exact sign-flip p, and the registered verdict.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # rlino.py lives one folder up
import rlino  # noqa: E402
from table import ci_half_width, sign_flip_p  # noqa: E402  (bench/table.py)

FIRST, LAST = 25, 48          # the steps the primary statistic reads
SMALLEST_EFFECT = 10.0        # tokens: a seq - const gap inside +-10 is of no practical size
PAIRS = 6                     # the verdict is read when all six pairs (seeds 0-5) are in
ARMS = ("seq", "const")


def groups(rollouts: list[dict], group_size: int, first: int, last: int) -> list[list[dict]]:
    """The groups of steps first..last: each step's rollouts in order, G to a prompt."""
    by_step: dict[int, list[dict]] = {}
    for r in rollouts:
        if first <= r["step"] <= last:
            by_step.setdefault(r["step"], []).append(r)
    return [rows[i:i + group_size] for rows in by_step.values() for i in range(0, len(rows), group_size)]


def length_gap(rollouts: list[dict], group_size: int, *, first: int = FIRST, last: int = LAST,
               keep_truncated: bool = True) -> float | None:
    """Mean over the mixed groups of (mean wrong length - mean right length); None without a mixed group."""
    gaps = []
    for group in groups(rollouts, group_size, first, last):
        kept = [r for r in group if keep_truncated or not r["truncated"]]
        right = [r["length"] for r in kept if r["reward"] >= 1]
        wrong = [r["length"] for r in kept if r["reward"] < 1]
        if right and wrong:
            gaps.append(np.mean(wrong) - np.mean(right))
    return float(np.mean(gaps)) if gaps else None


def matched_wrong_length(a: list[dict], b: list[dict]) -> float | None:
    """Wrong answers' length matched by prompt: over the (step, prompt) of steps 25-48 where both arms have a
    wrong answer (both arms of a seed draw the same prompts), the mean of A's mean wrong length - B's."""
    def wrong(rollouts):
        by = {}
        for r in rollouts:
            if FIRST <= r["step"] <= LAST and r["reward"] < 1:
                by.setdefault((r["step"], r["prompt"]), []).append(r["length"])
        return {k: np.mean(v) for k, v in by.items()}
    wa, wb = wrong(a), wrong(b)
    both = wa.keys() & wb.keys()
    return float(np.mean([wa[k] - wb[k] for k in both])) if both else None


def run_figures(run: Path) -> dict:
    """One run's primary statistic and its secondaries' inputs."""
    cfg = json.loads((run / "config.json").read_text())
    rollouts = rlino.logged(run / "rollouts.jsonl")
    late = [r for r in rollouts if FIRST <= r["step"] <= LAST]
    evals = rlino.logged(run / "evals.jsonl")
    last_eval = max(r["step"] for r in evals)
    evals = [r for r in evals if r["step"] == last_eval]
    return {"gap": length_gap(rollouts, cfg["group_size"]),
            "gap without truncated": length_gap(rollouts, cfg["group_size"], keep_truncated=False),
            "truncated share": float(np.mean([r["truncated"] for r in late])),
            f"accuracy at step {last_eval}": float(np.mean([r["correct"] for r in evals])),
            "mixed groups": sum(1 for g in groups(rollouts, cfg["group_size"], FIRST, LAST)
                                if len({r["reward"] >= 1 for r in g}) == 2),
            "rollouts": rollouts, "cfg": cfg,
            "cpu": (run / "cpu.txt").read_text().strip() if (run / "cpu.txt").exists() else "?"}


def arm_folders(folder: Path) -> list[tuple[Path, str, int]]:
    """The run folders grpo_<agg>_s<seed> of the two arms (not those set aside as <name>.discarded-<time>)."""
    names = ((run, re.fullmatch(r"grpo_(seq|const)_s(\d+)", run.name)) for run in sorted(folder.iterdir()))
    return [(run, match[1], int(match[2])) for run, match in names if match]


def verdict(differences: list[float]) -> str:
    """The registered rule (bench/EXPERIMENTS.md, experiment 4) on seq - const, in tokens."""
    mean, half = float(np.mean(differences)), ci_half_width(differences)
    low, high, p = mean - half, mean + half, sign_flip_p(differences)
    if -SMALLEST_EFFECT < low and high < SMALLEST_EFFECT:
        return "no effect of practical size (the 95 % CI lies inside ±10 tokens)"
    if low > 0 and p <= 0.05:
        return "supports the paper (seq's gap larger: the CI above 0, sign-flip p <= 0.05)"
    if high < 0 and p <= 0.05:
        return "contradicts the paper (const's gap larger: the CI below 0, sign-flip p <= 0.05)"
    return "cannot tell"


def pairs(folder: Path) -> None:
    """The table of pairs: each arm's primary statistic and seq - const, the secondaries' differences; the
    mean ± CI and sign-flip p of each; the verdict once all pairs are in."""
    finished = {}
    for run, agg, seed in arm_folders(folder):
        if (run / "summary.json").exists():
            finished[(agg, seed)] = run_figures(run)
    seeds = sorted(s for (agg, s) in finished if agg == "seq" and ("const", s) in finished)
    keys = ["gap", "gap without truncated", "truncated share",
            *[k for k in next(iter(finished.values()), {}) if k.startswith("accuracy")]]
    rows, diffs = [], {k: [] for k in [*keys, "wrong length matched by prompt"]}
    for seed in seeds:
        a, b = finished[("seq", seed)], finished[("const", seed)]
        if a["cpu"] != b["cpu"] or a["cfg"]["dtype"] != b["cfg"]["dtype"]:
            sys.exit(f"gap.py: seed {seed}: the arms ran on different arithmetic ({a['cpu']}, {a['cfg']['dtype']}"
                     f" / {b['cpu']}, {b['cfg']['dtype']}); rerun the pair whole")
        cells = [str(seed), str(a["mixed groups"]), str(b["mixed groups"])]
        for k in keys:
            d = None if a[k] is None or b[k] is None else a[k] - b[k]
            diffs[k].append(d)
            cells += [f"{v:+.2f}" if v is not None else "-" for v in (a[k], b[k], d)]
        matched = matched_wrong_length(a["rollouts"], b["rollouts"])
        diffs["wrong length matched by prompt"].append(matched)
        rows.append(cells + [f"{matched:+.2f}" if matched is not None else "-"])
    head = ["seed", "mixed groups seq", "mixed groups const",
            *[f"{k}: {arm}" for k in keys for arm in (*ARMS, "seq − const")], "wrong length matched: seq − const"]
    print("| " + " | ".join(head) + " |\n|" + " --- |" * len(head))
    for cells in rows:
        print("| " + " | ".join(cells) + " |")
    print(f"\n{len(seeds)} pairs (seeds {', '.join(map(str, seeds))}); steps {FIRST}-{LAST}; lengths in tokens.\n")
    for k, values in diffs.items():
        values = [v for v in values if v is not None]
        if len(values) >= 2:
            print(f"- {k}, seq − const: {np.mean(values):+.3f} ± {ci_half_width(values):.3f} (95 % t CI, "
                  f"{len(values)} pairs), exact sign-flip p {sign_flip_p(values):.4f}")
    primary = [v for v in diffs["gap"] if v is not None]
    if len(seeds) < PAIRS:
        print(f"\nverdict: not read: {len(seeds)} of {PAIRS} pairs are in")
    elif len(primary) < len(seeds):
        print("\nverdict: cannot tell (a run without a mixed group in steps 25-48)")
    else:
        print(f"\nverdict (primary, seq − const): {verdict(primary)}")


def gate(run: Path) -> None:
    """The task's gate on its pilot (bench/EXPERIMENTS.md): each criterion, its figure and pass / fail."""
    cfg = json.loads((run / "config.json").read_text())
    start = next(r for r in rlino.logged(run / "metrics.jsonl") if r["step"] == 0)
    rollouts = rlino.logged(run / "rollouts.jsonl")
    half = [r for r in rollouts if 13 <= r["step"] <= 24]
    right = [r["length"] for r in half if r["reward"] >= 1]
    mixed = [len({r["reward"] >= 1 for r in g}) == 2 for g in groups(rollouts, cfg["group_size"], 1, 24)]
    checks = [("A  sampled start accuracy >= 10 % on 100 test problems", start["eval_pass@1"],
               start["eval_pass@1"] >= 0.10 and start["eval_n"] >= 100),
              ("A' (fallback) sampled start accuracy >= 5 %", start["eval_pass@1"], start["eval_pass@1"] >= 0.05),
              (f"A'' (G = 8 design) the same, from {cfg['eval_samples']} draws per problem", start["eval_pass@1"],
               start["eval_pass@1"] >= 0.05 and cfg["eval_samples"] >= 4 and start["eval_n"] >= 100),
              ("B1 steps 13-24: median length of right answers >= 40 tokens",
               statistics.median(right) if right else float("nan"), bool(right) and statistics.median(right) >= 40),
              ("B2 steps 13-24: truncated share of all rollouts < 15 %", float(np.mean([r["truncated"] for r in half])),
               float(np.mean([r["truncated"] for r in half])) < 0.15),
              ("C  steps 1-24: share of mixed groups >= 20 %", float(np.mean(mixed)), float(np.mean(mixed)) >= 0.20)]
    for name, value, passed in checks:
        print(f"{'pass' if passed else 'FAIL'}  {name}: {value:.3f}")
    print(f"({len(right)} right answers in steps 13-24; {len(mixed)} groups in steps 1-24; "
          f"{start['eval_n']} problems at step 0)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("gate", "pairs"))
    parser.add_argument("folder", type=Path, help="gate: the pilot's run folder; pairs: the runs' folder")
    args = parser.parse_args()
    gate(args.folder) if args.what == "gate" else pairs(args.folder)


if __name__ == "__main__":
    main()
