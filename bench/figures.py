"""figures.py — the CPU experiments' findings at a glance (bench/EXPERIMENTS.md, experiments 1-3): per arm
the mean over seeds with its 95 % band, the cap (max_new_tokens) and the share of wrong answers it cut, and
the registered paired differences, each seed a dot, their mean with its 95 % CI and a zero line.

Run it (from the repository root, in the venv; needs matplotlib):
    python bench/figures.py all              # the three figures below, from bench/results/<experiment>/
    python bench/figures.py negative [DIR]   # experiment 2: DIR/negative.png (DIR: bench/results/negative)
    python bench/figures.py horizon [DIR]    # experiment 3: DIR/horizon.png (DIR: bench/results/horizon)
    python bench/figures.py incentive [DIR]  # experiment 1: DIR/incentive.png (DIR: bench/results/incentive)
    python bench/figures.py gap runs/gap     # experiment 4: runs/gap/gap.png, once its pairs are in

DIR holds the run folders (<algo>_<agg>_s<seed>, each with config.json and metrics.jsonl, read by
rlino.read_run) or, for experiment 1, the per-replicate records <policy>.jsonl of bench/incentive.py. Every
number a figure shows is printed as well, to be compared with the experiment's .md tables. The statistics are
the registered ones, computed as bench/paired.py and bench/table.py compute them: the least-squares slope of
`len_incorrect` over the training steps with incorrect completions (rlino.slope; from step 25 on for
experiment 3's late slope), the last evaluation's accuracy, paired by seed; mean ± the half-width of the 95 %
CI (table.ci_half_width: Student's t, n - 1 df) and the exact two-sided sign-flip p (table.sign_flip_p).
Experiment 1's per-replicate records of the initial policy were lost (EXPERIMENTS.md); its two published
contrasts are drawn from INITIAL_POLICY_PUBLISHED, as published, without dots, unless DIR has an
initial.jsonl.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # rlino.py lives one folder up
import rlino  # noqa: E402
from table import ci_half_width, sign_flip_p  # noqa: E402  (bench/table.py)

RESULTS = Path(__file__).resolve().parent / "results"
NEGATIVE_ARMS = {"seq": ("fisft-", "seq"), "token": ("fisft-", "token"), "const": ("fisft-", "const")}
HORIZON_ARMS = {"GRPO": ("grpo", "seq"), "F-ISFT+": ("fisft+", "seq"), "PPO": ("ppo", "seq")}
COLOURS = {"seq": "tab:red", "token": "tab:blue", "const": "tab:green",
           "GRPO": "tab:blue", "F-ISFT+": "tab:orange", "PPO": "tab:purple"}
LATE_FROM = 25  # experiment 3's late slope: steps 25-48
# experiment 1's registered contrasts (bench/incentive.py's PAIRS), the first the primary one
INCENTIVE_CONTRASTS = (("grpo seq", "grpo token"), ("grpo seq", "grpo const"),
                       ("fisft- seq", "fisft- token"), ("fisft- seq", "fisft- const"))
# The initial policy's records were lost with a machine (EXPERIMENTS.md, experiment 1); its contrasts as
# published (commit 3a89179, 20 replicates): (mean, half-width of the 95 % CI, replicates positive). Its
# seq - const contrasts were not published apart: token and const take the same step there.
INITIAL_POLICY_PUBLISHED = {("grpo seq", "grpo token"): (-1.36, 6.55, 10),
                            ("fisft- seq", "fisft- token"): (9.70, 5.58, 18)}


# --------------------------------------------------------------------------- reading and statistics
def arm_runs(folder: Path, arms: dict) -> dict:
    """{arm label: {seed: metrics lines}} of the run folders under folder whose (algo, loss-agg) is an arm's,
    and the cap (max_new_tokens), which must be one for all of them."""
    runs, caps = {label: {} for label in arms}, set()
    for run in sorted(p for p in folder.iterdir() if (p / "config.json").exists()):
        cfg, rows = rlino.read_run(str(run))
        for label, spec in arms.items():
            if (cfg["algo"], cfg["loss_agg"]) == spec:
                if cfg["seed"] in runs[label]:
                    raise rlino.UsageError(f"{run}: a second run of {label}, seed {cfg['seed']}")
                runs[label][cfg["seed"]] = rows
                caps.add(cfg["max_new_tokens"])
    if len(caps) != 1 or any(not seeds for seeds in runs.values()):
        raise rlino.UsageError(f"{folder}: runs of every arm of {list(arms)}, with one cap, please "
                               f"(caps {sorted(caps)})")
    return {"runs": runs, "cap": caps.pop()}


def train_steps(rows: list[dict]) -> list[dict]:
    """The training steps' metrics lines (an evaluation-only line has no reward_mean)."""
    return [r for r in rows if "reward_mean" in r]


def wrong_length_slope(rows: list[dict], first: int = 0) -> float | None:
    """The least-squares slope of len_incorrect over the training steps >= first that had incorrect
    completions: bench/table.py's (first 0) and bench/paired.py's --late-from statistic."""
    return rlino.slope([(r["step"], r["len_incorrect"]) for r in train_steps(rows)
                        if r.get("len_incorrect") is not None and r["step"] >= first])


def last_accuracy(rows: list[dict]) -> float:
    """The last evaluation's accuracy (rlino.run_record's 'end')."""
    return [r["eval_accuracy"] for r in rows if r.get("eval_accuracy") is not None][-1]


def wrong_length(row: dict) -> float | None:
    """A training step's mean length of its wrong answers; None at an evaluation-only line or without one."""
    return row.get("len_incorrect") if "reward_mean" in row else None


def truncated_wrong(row: dict) -> float | None:
    """The share of a step's wrong answers that hit the cap; None at a step without a wrong answer."""
    return row.get("truncated_frac_incorrect") if row.get("len_incorrect") is not None else None


def band(runs: dict, value) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per step, over the seeds that have value(row) there: steps, mean and the 95 % CI's half-width (NaN
    where only one seed has a value)."""
    by_step: dict[int, list[float]] = {}
    for rows in runs.values():
        for r in rows:
            v = value(r)
            if v is not None:
                by_step.setdefault(r["step"], []).append(v)
    steps = sorted(by_step)
    mean = np.array([np.mean(by_step[s]) for s in steps])
    half = np.array([ci_half_width(by_step[s]) if len(by_step[s]) > 1 else np.nan for s in steps])
    return np.array(steps), mean, half


def paired(a: dict, b: dict, statistic) -> dict:
    """The paired (by seed) differences statistic(A) - statistic(B) over the seeds both arms ran: the seeds,
    the differences, their mean, the 95 % CI's half-width, the exact sign-flip p and how many are > 0."""
    seeds = sorted(a.keys() & b.keys())
    return {"seeds": seeds, **summarised([statistic(a[s]) - statistic(b[s]) for s in seeds])}


def summarised(diffs: list[float]) -> dict:
    """Paired differences with their mean, 95 % CI half-width, exact sign-flip p and how many are > 0."""
    return {"diffs": diffs, "n": len(diffs), "mean": float(np.mean(diffs)), "half": ci_half_width(diffs),
            "p": sign_flip_p(diffs), "positive": sum(d > 0 for d in diffs)}


def ci_reading(s: dict) -> str:
    """Where the 95 % CI of a paired difference lies: the registered decision rules' reading of it."""
    low, high = s["mean"] - s["half"], s["mean"] + s["half"]
    return "CI above 0" if low > 0 else "CI below 0" if high < 0 else "CI contains 0"


def incentive_contrasts(records: list[dict], quantity: str = "wrong") -> dict:
    """Experiment 1 at one policy: per registered contrast (a, b), the per-replicate paired differences of the
    predicted change of the quantity, their mean, 95 % CI half-width and how many are > 0."""
    rows = [r["predicted"][quantity] for r in records if r["predicted"].get(quantity) is not None]
    out = {}
    for a, b in INCENTIVE_CONTRASTS:
        diffs = [row[a] - row[b] for row in rows]
        out[a, b] = {"diffs": diffs, "n": len(diffs), "mean": float(np.mean(diffs)),
                     "half": ci_half_width(diffs), "positive": sum(d > 0 for d in diffs)}
    return out


# --------------------------------------------------------------------------- drawing
def pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise rlino.UsageError("figures.py needs matplotlib: pip install matplotlib") from None
    return plt


def draw_bands(ax, bands: dict, *, marker: str | None = None, names: dict | None = None,
               alpha: float = 0.18) -> None:
    """One line per arm (its mean, named names[arm] in a legend) with its 95 % band, in the arm's colour."""
    for label, (steps, mean, half) in bands.items():
        ax.plot(steps, mean, color=COLOURS[label], marker=marker, markersize=4, linewidth=1.8,
                label=(names or {}).get(label, label))
        ax.fill_between(steps, mean - half, mean + half, color=COLOURS[label], alpha=alpha, linewidth=0)


def draw_cap(ax, cap: int) -> None:
    ax.axhline(cap, color="black", linestyle="--", linewidth=1)
    ax.text(0.99, cap, f"cap: {cap} new tokens", transform=ax.get_yaxis_transform(), va="bottom",
            ha="right", fontsize=8)


def draw_contrasts(ax, contrasts: list[tuple[str, dict, str]], *, unit: str, fmt: str) -> None:
    """Paired differences, one column per contrast (its x label, its statistics or None, its colour): each
    pair a dot, the mean with its 95 % CI as an error bar, the figures written beside it, and a zero line."""
    ax.axhline(0, color="black", linewidth=0.8)
    rng = np.random.default_rng(0)                      # a fixed jitter, so that dots do not hide each other
    for x, (_, s, colour) in enumerate(contrasts):
        if s is None:
            continue
        if s.get("diffs"):
            jitter = rng.uniform(-0.08, 0.08, len(s["diffs"]))
            ax.scatter(x - 0.12 + jitter, s["diffs"], s=14, color=colour, alpha=0.45, linewidths=0, zorder=2)
        ax.errorbar(x + 0.08, s["mean"], yerr=s["half"], fmt="o", color=colour, markersize=7, capsize=5,
                    linewidth=2, zorder=3, markerfacecolor=colour if s.get("diffs") else "white")
        text = f"{s['mean']:+{fmt}}\n± {s['half']:{fmt}}"
        if "p" in s:
            text += f"\np = {s['p']:.3g}"
        if "positive" in s:
            text += f"\n{s['positive']}/{s['n']} > 0"
        ax.annotate(text, (x + 0.16, s["mean"]), fontsize=8, va="center", ha="left",
                    bbox=dict(facecolor="white", edgecolor="none", alpha=0.8, pad=1))
    ax.set_xticks(range(len(contrasts)), [label + ("" if s is None else f"\n{ci_reading(s)}")
                                          for label, s, _ in contrasts], fontsize=8)
    ax.set_xlim(-0.5, len(contrasts) - 0.5 + 0.35)
    ax.set_ylabel(unit)


def save(fig, out_png: Path) -> None:
    try:
        fig.savefig(out_png, dpi=110)
    except OSError as err:
        raise rlino.UsageError(f"cannot write {out_png}: {err.strerror}") from None
    print(f"wrote {out_png}")


def print_contrasts(title: str, contrasts: dict, fmt: str) -> None:
    print(title)
    for name, s in contrasts.items():
        per = ", ".join(f"{d:+{fmt}}" for d in s["diffs"]) if s.get("diffs") else "(records lost)"
        p = f", sign-flip p {s['p']:.4f}" if "p" in s else ""
        p += f", {ci_reading(s)}"
        print(f"  {name.replace(chr(10), ' ')}: {s['mean']:+{fmt}} ± {s['half']:{fmt}}{p}, "
              f"{s['positive']}/{s['n']} > 0  [{per}]")


# --------------------------------------------------------------------------- the figures
def negative_figure(folder: Path, out_png: Path) -> dict:
    """Experiment 2: the wrong answers' length per arm over the steps, with the cap, the share of wrong
    answers it cut, and the registered paired differences of the slope (seq - token, seq - const)."""
    plt = pyplot()
    data = arm_runs(folder, NEGATIVE_ARMS)
    runs, cap = data["runs"], data["cap"]
    contrasts = {"seq − token (primary)": paired(runs["seq"], runs["token"], wrong_length_slope),
                 "seq − const (secondary)": paired(runs["seq"], runs["const"], wrong_length_slope)}
    slopes = {label: [wrong_length_slope(rows) for rows in r.values()] for label, r in runs.items()}
    fig = plt.figure(figsize=(13, 6.2))
    grid = fig.add_gridspec(2, 2, width_ratios=(1.7, 1), height_ratios=(3, 1.15), hspace=0.08, wspace=0.25)
    length, cut = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[1, 0])
    diff = fig.add_subplot(grid[:, 1])
    draw_bands(length, {label: band(r, wrong_length) for label, r in runs.items()},
               names={label: f"F-ISFT− {label} (slope {np.mean(s):+.2f} tokens/step)"
                      for label, s in slopes.items()})
    draw_cap(length, cap)
    length.set_ylim(0, cap * 1.08)
    length.set_ylabel("wrong answers' mean length, tokens")
    length.tick_params(labelbottom=False)
    length.legend(loc="upper left", bbox_to_anchor=(0.0, 0.955), fontsize=8, frameon=False)
    draw_bands(cut, {label: band(r, truncated_wrong) for label, r in runs.items()})
    cut.set_ylim(0, 1)
    cut.set_ylabel("wrong answers\ncut by the cap", fontsize=9)
    cut.set_xlabel("training step")
    cut.sharex(length)
    draw_contrasts(diff, [(name, s, COLOURS["seq"]) for name, s in contrasts.items()],
                   unit="paired difference of the slope, tokens/step", fmt=".2f")
    diff.set_title(f"per seed (dots), mean ± 95 % CI; {len(contrasts['seq − token (primary)']['seeds'])} "
                   "pairs", fontsize=9)
    length.set_title(f"mean over {len(runs['seq'])} seeds ± 95 % band (t)", fontsize=9)
    fig.suptitle("Experiment 2, F-ISFT− (negative term alone): under seq the wrong answers grow toward the "
                 "cap, under token and const they do not", fontsize=11)
    fig.subplots_adjust(left=0.07, right=0.98, top=0.88, bottom=0.09)
    save(fig, out_png)
    print_contrasts("experiment 2: paired difference of the slope of len wrong (tokens/step)", contrasts,
                    ".2f")
    for label, s in slopes.items():
        print(f"  F-ISFT− {label}: slope {np.mean(s):+.3f} ± {ci_half_width(s):.3f}")
    return contrasts


def horizon_figure(folder: Path, out_png: Path) -> dict:
    """Experiment 3: accuracy per arm at the evaluations, the wrong answers' length with the cap and the share
    it cut, and the registered paired differences (GRPO - F-ISFT+: final accuracy, late slope; PPO - GRPO:
    final accuracy)."""
    plt = pyplot()
    data = arm_runs(folder, HORIZON_ARMS)
    runs, cap = data["runs"], data["cap"]

    def late(rows):
        return wrong_length_slope(rows, LATE_FROM)
    accuracy = {"GRPO − F-ISFT+\n(primary)": paired(runs["GRPO"], runs["F-ISFT+"], last_accuracy),
                "PPO − GRPO\n(PPO arm's primary)": paired(runs["PPO"], runs["GRPO"], last_accuracy)}
    slope = {"GRPO − F-ISFT+\n(decision rule b)": paired(runs["GRPO"], runs["F-ISFT+"], late)}
    fig = plt.figure(figsize=(15, 5.6))
    grid = fig.add_gridspec(2, 4, width_ratios=(1.2, 1.35, 1.05, 0.75), height_ratios=(3, 1.1), hspace=0.08,
                            wspace=0.42)
    acc = fig.add_subplot(grid[:, 0])
    length, cut = fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[1, 1])
    acc_diff, slope_diff = fig.add_subplot(grid[:, 2]), fig.add_subplot(grid[:, 3])
    final = {label: [last_accuracy(rows) for rows in r.values()] for label, r in runs.items()}
    eval_steps = sorted({r["step"] for seeds in runs.values() for rows in seeds.values() for r in rows
                         if r.get("eval_accuracy") is not None})
    draw_bands(acc, {label: band(r, lambda row: row.get("eval_accuracy")) for label, r in runs.items()},
               marker="o", alpha=0.12,
               names={label: f"{label}: {np.mean(end):.3f} ± {ci_half_width(end):.3f} at step "
                      f"{eval_steps[-1]}" for label, end in final.items()})
    acc.set_ylim(0, 0.7)
    acc.set_xlabel("training step")
    n_eval = sorted({r["eval_n"] for seeds in runs.values() for rows in seeds.values() for r in rows
                     if r.get("eval_accuracy") is not None})
    acc.set_ylabel(f"greedy accuracy, {'/'.join(map(str, n_eval))} test problems")
    acc.set_xticks(eval_steps)
    acc.legend(loc="upper left", fontsize=8, frameon=False)
    acc.set_title("accuracy, mean ± 95 % band", fontsize=9)
    draw_bands(length, {label: band(r, wrong_length) for label, r in runs.items()})
    draw_cap(length, cap)
    last_step = max(r["step"] for seeds in runs.values() for rows in seeds.values()
                    for r in train_steps(rows))
    length.axvspan(LATE_FROM - 0.5, last_step + 0.5, color="grey", alpha=0.1, linewidth=0)
    length.text(LATE_FROM, cap * 0.55, "late slope\nread here", fontsize=8, color="dimgrey")
    length.set_ylim(0, cap * 1.08)
    length.set_ylabel("wrong answers' mean length, tokens")
    length.tick_params(labelbottom=False)
    length.set_title("wrong answers' length, mean ± 95 % band", fontsize=9)
    draw_bands(cut, {label: band(r, truncated_wrong) for label, r in runs.items()})
    cut.set_ylim(0, 1)
    cut.set_ylabel("wrong answers\ncut by the cap", fontsize=9)
    cut.set_xlabel("training step")
    cut.sharex(length)
    draw_contrasts(acc_diff, [(name, s, "black") for name, s in accuracy.items()],
                   unit=f"paired difference of accuracy at step {eval_steps[-1]}", fmt=".3f")
    acc_diff.set_title("final accuracy, per seed and mean ± 95 % CI", fontsize=9)
    draw_contrasts(slope_diff, [(name, s, "black") for name, s in slope.items()],
                   unit=f"paired difference of the slope, steps {LATE_FROM}–{last_step}, tokens/step",
                   fmt=".2f")
    slope_diff.set_title("late slope of len wrong", fontsize=9)
    fig.suptitle(f"Experiment 3, {last_step} steps: GRPO and F-ISFT+ cannot be told apart (both turn terse, "
                 "far below the cap); PPO ends above GRPO (fragile: sign-flip p 0.0625)", fontsize=11)
    fig.subplots_adjust(left=0.05, right=0.985, top=0.87, bottom=0.1)
    save(fig, out_png)
    print_contrasts("experiment 3: paired difference of the last eval accuracy", accuracy, ".3f")
    print_contrasts("experiment 3: paired difference of the slope of len wrong from step 25", slope, ".2f")
    for label, end in final.items():
        print(f"  {label}: accuracy at the last evaluation {np.mean(end):.3f} ± {ci_half_width(end):.3f}")
    return {**accuracy, **slope}


def incentive_figure(folder: Path, out_png: Path) -> dict:
    """Experiment 1: the registered paired contrasts of one update's predicted change of the wrong answers'
    length, per policy: from the per-replicate records where they are kept (<policy>.jsonl), else as
    published (INITIAL_POLICY_PUBLISHED, the initial policy)."""
    plt = pyplot()
    records = {path.stem: rlino.logged(path) for path in sorted(folder.glob("*.jsonl"))}
    if not records:
        raise rlino.UsageError(f"{folder}: no <policy>.jsonl of bench/incentive.py")
    policies = {}
    if "initial" not in records:
        policies["initial policy (published; records lost)"] = {
            pair: {"mean": m, "half": h, "positive": k, "diffs": [], "n": 20}
            for pair, (m, h, k) in INITIAL_POLICY_PUBLISHED.items()}
    for policy, recs in records.items():
        name = "GRPO step-12 policy" if policy == "grpo_seq_s0-step12" else policy
        policies[f"{name} ({len(recs)} replicates)"] = incentive_contrasts(recs)
    fig, axes = plt.subplots(1, len(policies), figsize=(6.3 * len(policies), 5.4), squeeze=False)
    labels = {("grpo seq", "grpo token"): "GRPO\nseq − token\n(primary)",
              ("grpo seq", "grpo const"): "GRPO\nseq − const",
              ("fisft- seq", "fisft- token"): "F-ISFT−\nseq − token",
              ("fisft- seq", "fisft- const"): "F-ISFT−\nseq − const"}
    colour = {"grpo": "tab:blue", "fisft-": "tab:red"}
    for ax, (policy, contrasts) in zip(axes[0], policies.items()):
        draw_contrasts(ax, [(labels[pair], contrasts.get(pair), colour[pair[0].split()[0]])
                            for pair in INCENTIVE_CONTRASTS],
                       unit="paired difference, tokens per update", fmt=".2f")
        ax.set_title(policy, fontsize=10)
        for x, pair in enumerate(INCENTIVE_CONTRASTS):
            if pair not in contrasts:
                ax.text(x, 0, "not published\n(= seq − token:\ntoken and const\ntake one step here)",
                        ha="center", va="bottom", fontsize=7, color="dimgrey")
    fig.suptitle("Experiment 1, one update's predicted change of the wrong answers' length: GRPO seq − "
                 "token cannot tell; F-ISFT− seq > token at both policies", fontsize=11)
    fig.text(0.5, 0.01, "dots: replicates (paired within one update and probe batch); marker and bar: mean "
             "± 95 % CI (t, n − 1 df); hollow: as published, without the records", ha="center", fontsize=8)
    fig.subplots_adjust(left=0.07, right=0.98, top=0.87, bottom=0.19, wspace=0.25)
    save(fig, out_png)
    for policy, contrasts in policies.items():
        print_contrasts(f"experiment 1, {policy}: paired difference of the predicted change of len wrong "
                        "(tokens per update)", {f"{a} − {b}": s for (a, b), s in contrasts.items()}, ".2f")
    return policies


def gap_figure(folder: Path, out_png: Path) -> dict:
    """Experiment 4: per arm (GRPO seq, const) the right and the wrong answers' length over the steps with
    the cap and the window of the primary statistic, the truncated share, and the paired differences seq -
    const of the primary (the within-group length gap; the smallest effect of interest shaded) and of the
    secondaries (bench/gap.py computes them all)."""
    import gap  # noqa: E402  (bench/gap.py)
    plt = pyplot()
    runs = {(agg, seed): run for run, agg, seed in gap.arm_folders(folder) if rlino.is_finished(run)}
    seeds = sorted(s for agg, s in runs if agg == "seq" and ("const", s) in runs)
    if len(seeds) < 2:
        raise rlino.UsageError(f"{folder}: fewer than two finished pairs grpo_seq_s<seed> / grpo_const_s<seed>")
    figures = {key: gap.run_figures(run) for key, run in runs.items() if key[1] in seeds}
    metrics = {arm: {s: rlino.read_run(str(runs[arm, s]))[1] for s in seeds} for arm in gap.ARMS}
    cap = figures["seq", seeds[0]]["cfg"]["max_new_tokens"]
    accuracy = next(k for k in figures["seq", seeds[0]] if k.startswith("accuracy"))

    def contrast(key):
        return paired({s: figures["seq", s] for s in seeds}, {s: figures["const", s] for s in seeds},
                      lambda f: f[key])
    tokens = {"gap, wrong − right\n(primary)": contrast("gap"),
              "gap without\ntruncated": contrast("gap without truncated")}
    matched = [gap.matched_wrong_length(figures["seq", s]["rollouts"], figures["const", s]["rollouts"])
               for s in seeds]
    tokens["wrong length,\nmatched by prompt"] = summarised(matched)
    shares = {"truncated share\n(steps 25–48)": contrast("truncated share"), accuracy: contrast(accuracy)}
    fig, axes = plt.subplots(1, 4, figsize=(19, 5.2), gridspec_kw={"width_ratios": [1.5, 1, 1.2, 0.9]})
    lengths, truncated, token_ax, share_ax = axes
    names = {"seq": "GRPO seq", "const": "GRPO const (Dr. GRPO)"}
    for arm in gap.ARMS:
        for key, style in (("len_incorrect", "-"), ("len_correct", ":")):
            steps, mean, half = band(metrics[arm], lambda r, key=key: r.get(key) if "reward_mean" in r else None)
            lengths.plot(steps, mean, style, color=COLOURS[arm], linewidth=1.8,
                         label=f"{names[arm]}, {'wrong' if key == 'len_incorrect' else 'right'}")
            lengths.fill_between(steps, mean - half, mean + half, color=COLOURS[arm], alpha=0.12, linewidth=0)
    draw_cap(lengths, cap)
    lengths.axvspan(gap.FIRST, gap.LAST, color="grey", alpha=0.12, linewidth=0)
    lengths.set(xlabel="training step", ylabel="mean length, tokens", ylim=(0, cap * 1.08),
                title=f"mean over {len(seeds)} seeds ± 95 % band; shaded: the primary's steps")
    lengths.legend(fontsize=8, loc="upper left")
    draw_bands(truncated, {arm: band(metrics[arm], lambda r: r.get("truncated_frac") if "reward_mean" in r
                                     else None) for arm in gap.ARMS}, names=names)
    truncated.set(xlabel="training step", ylabel="share of all answers cut by the cap", ylim=(0, 1),
                  title="truncated share")
    truncated.legend(fontsize=8, loc="upper left")
    token_ax.axhspan(-gap.SMALLEST_EFFECT, gap.SMALLEST_EFFECT, color="grey", alpha=0.15, linewidth=0)
    draw_contrasts(token_ax, [(label, s, "tab:red") for label, s in tokens.items()],
                   unit="seq − const, tokens (shaded: ±10, no practical size)", fmt=".1f")
    token_ax.set_title("paired by seed: dots, mean ± 95 % CI", fontsize=10)
    draw_contrasts(share_ax, [(label, s, "tab:grey") for label, s in shares.items()], unit="seq − const",
                   fmt=".3f")
    verdict = gap.verdict(tokens["gap, wrong − right\n(primary)"]["diffs"]) if len(seeds) >= gap.PAIRS else (
        f"not read: {len(seeds)} of {gap.PAIRS} pairs")
    fig.suptitle(f"Experiment 4, GRPO seq against const on sum-chain: {verdict}", fontsize=11)
    fig.subplots_adjust(left=0.05, right=0.98, top=0.86, bottom=0.17, wspace=0.3)
    save(fig, out_png)
    print_contrasts("experiment 4: paired differences seq − const", {**tokens, **shares}, ".3f")
    return {**tokens, **shares}


FIGURES = {"negative": negative_figure, "horizon": horizon_figure, "incentive": incentive_figure,
           "gap": gap_figure}
DONE = ("negative", "horizon", "incentive")  # what `all` draws: the experiments whose records are complete


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", choices=[*FIGURES, "all"])
    parser.add_argument("dir", nargs="?", help="the experiment's folder (default "
                        "bench/results/<experiment>); the PNG is written into it as <experiment>.png")
    args = parser.parse_args(argv)
    if args.experiment == "all" and args.dir:
        parser.error("'all' reads bench/results/; give DIR with one experiment")
    try:
        for name in DONE if args.experiment == "all" else [args.experiment]:
            folder = Path(args.dir) if args.dir else RESULTS / name
            if not folder.is_dir():
                raise rlino.UsageError(f"{folder}: no such folder")
            FIGURES[name](folder, folder / f"{name}.png")
    except rlino.UsageError as err:
        sys.exit(f"figures.py: {err}")


if __name__ == "__main__":
    main()
