"""incentive.py — the length incentive of one update, measured at fixed policies (README: "Experiments").

Run it (from the repository root, in the venv):
    ./run.sh incentive                         # the pre-registered experiment: a GRPO run, then every policy
    python bench/incentive.py --policy initial --replicates 2 --out runs/incentive-pilot [rlino flags]

At a fixed policy pi_theta, how much longer (or shorter) does one update of each arm make the completions,
incorrect ones, correct ones and all? First order (the issue's way (a)): for a quantity q(theta) (the expected
length of the incorrect completions, of the correct ones, of all),
    predicted change of q by arm a = grad q(theta) . delta_a
where delta_a is the parameter step arm a's optimizer would take on an update batch (rlino.train_step, gradient
clipping and AdamW's step from the policy's own optimizer state, exactly as in training), and grad q is the
score-function estimate on a probe batch drawn independently of the update batch:
    grad E[L] = E[(L - b) grad log pi(o | q)]                          (all completions; b a baseline)
    grad (E[L w] / E[w]) = E[w (L - m) / W grad log pi(o | q)]     (w = 1 on incorrect ones, m = E[L w] / W,
                                                                   W = E[w]: the quotient rule)
m and W are the probe batch's own (a plug-in ratio estimate), the baseline b_i the mean of the other samples
of o_i's group (leave-one-out: unbiased). Every arm is scored on the same update batch and the same probe
batch, so the arms' differences are paired within a replicate. grad log pi(o_i | q_i) . delta_a is one
backward pass per probe completion, dotted with each arm's step.
Arms: GRPO with --loss-agg seq / token / const, F-ISFT+ (seq), F-ISFT- with seq / token / const (the negative
term alone), and "no gradient": AdamW's step on a zero gradient (its momentum alone; nothing at the initial
policy), so that what the batch itself adds can be read off. mu = 1 and beta = 0 (the CPU experiments'
settings).
Writes OUT/<policy>.jsonl (one line per replicate; a stopped measurement goes on where it was),
OUT/config.json, and OUT/incentive.md and OUT/incentive.png from every OUT/*.jsonl (only these with --table).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from copy import deepcopy
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # rlino.py and tasks.py live one folder up
import rlino  # noqa: E402
from table import ci_half_width, mean_ci  # noqa: E402  (bench/table.py)
import tasks  # noqa: E402

ARMS = {"grpo seq": ("grpo", "seq"), "grpo token": ("grpo", "token"), "grpo const": ("grpo", "const"),
        "fisft+ seq": ("fisft+", "seq"), "fisft- seq": ("fisft-", "seq"), "fisft- token": ("fisft-", "token"),
        "fisft- const": ("fisft-", "const"), "no gradient": ("none", "seq")}
QUANTITIES = ("wrong", "right", "all")   # the expected length of the incorrect, the correct, all completions
PROBE_STEP = 1_000_000                    # the probe batches' sampler RNG: steps no update batch uses
MAX_DRAWS = 5                             # update batches drawn per replicate until one carries a signal
PAIRS = (("grpo seq", "grpo token"), ("grpo seq", "grpo const"),   # the pre-registered paired differences:
         ("fisft- seq", "fisft- token"), ("fisft- seq", "fisft- const"))  # the first is the primary one


# --------------------------------------------------------------------------- the estimator
def length_score_weights(lengths: torch.Tensor, correct: torch.Tensor, quantity: str) -> torch.Tensor | None:
    """(N,) h_i such that mean_i h_i grad log pi(o_i) estimates grad q: L_i for all completions, and for the
    mean length of the incorrect (correct) ones w_i (L_i - m) / W, w_i = 1 on them, m their mean length in the
    batch, W their share of it. None when the batch has none of them."""
    lengths = lengths.float()
    if quantity == "all":
        return lengths
    chosen = (~correct if quantity == "wrong" else correct).float()
    share = chosen.mean()
    if share == 0:
        return None
    mean_length = (lengths * chosen).sum() / chosen.sum()
    return chosen * (lengths - mean_length) / share


def leave_one_out_centred(h: torch.Tensor, group_size: int) -> torch.Tensor:
    """h_i minus the mean of the other samples of its group (a baseline independent of o_i: unbiased)."""
    groups = h.view(-1, group_size)                                          # (B, G)
    others = (groups.sum(1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others).view(-1)


def predicted_changes(directions: torch.Tensor, lengths: torch.Tensor, correct: torch.Tensor,
                      group_size: int) -> dict:
    """{quantity: (A,) predicted change per arm} from directions (N, A) = grad log pi(o_i) . delta_a."""
    out = {}
    for quantity in QUANTITIES:
        h = length_score_weights(lengths, correct, quantity)
        if h is not None:
            out[quantity] = (leave_one_out_centred(h, group_size)[:, None] * directions).mean(0)
    return out


# --------------------------------------------------------------------------- one replicate
def arm_step(model, optimizer, rollout, rewards, cfg, algo: str, loss_agg: str, amp) -> list[torch.Tensor]:
    """The parameter step arm (algo, loss_agg) would take on this rollout: rlino.train_step (micro-batched
    backward, gradient clipping, the optimizer's step); the weights and the optimizer's state are put back
    afterwards. Arm 'none': the optimizer's step on a zero gradient."""
    params = list(model.parameters())
    before, state = [p.detach().clone() for p in params], deepcopy(optimizer.state_dict())
    arm_cfg = dataclasses.replace(cfg, algo=algo, loss_agg=loss_agg)
    if algo == "none":
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    else:
        targets, _ = rlino.step_targets(model, None, rollout, rewards, arm_cfg, amp=amp)
        rlino.train_step(model, optimizer, rollout, targets, arm_cfg, amp=amp)
    with torch.no_grad():
        step = [p - b for p, b in zip(params, before)]
        for p, b in zip(params, before):
            p.copy_(b)
    optimizer.load_state_dict(state)
    return step


def score_directions(model, probe, steps: list[list[torch.Tensor]], cfg, amp) -> torch.Tensor:
    """(N, A): grad_theta log pi(o_i | q_i) . delta_a for each probe completion i and each arm's step a, one
    backward pass per completion (log pi of the tempered distribution the samples came from)."""
    params = list(model.parameters())
    out = torch.zeros(len(probe.lengths), len(steps))
    model.eval()
    for i in range(len(probe.lengths)):
        model.zero_grad(set_to_none=True)
        rows = rlino.select_rows(probe, torch.tensor([i]))
        rlino.completion_logprobs(model, rows, temperature=cfg.temperature, amp=amp).sum().backward()
        for a, step in enumerate(steps):
            out[i, a] = sum((p.grad * d).sum() for p, d in zip(params, step))
    model.zero_grad(set_to_none=True)
    return out


def rollout_and_rewards(sampler, tokenizer, task, examples, cfg, *, step: int, stop_ids, amp):
    rollout = rlino.collect_rollouts(sampler, tokenizer, task, examples, cfg, step=step, stop_ids=stop_ids,
                                     amp=amp)
    texts = rlino.decode_completions(tokenizer, rollout, stop_text=rlino.completion_stop_text(tokenizer, cfg))
    return rollout, rlino.score(task, texts, examples, group_size=cfg.group_size)


def replicate(r: int, policy, cfg, args, amp) -> dict:
    """Replicate r: an update batch (--prompts-per-step x G; drawn again, up to MAX_DRAWS times, while no
    group is mixed) and a probe batch (--probe-prompts x G) of other prompts, both sampled afresh from the
    policy; each arm's step on the first, scored on the second."""
    model, optimizer, sampler, tokenizer, task, train_set, stop_ids = policy
    t0 = time.time()
    picked = np.random.default_rng((cfg.seed, r)).choice(len(train_set), cfg.prompts_per_step +
                                                         args.probe_prompts, replace=False).tolist()
    update_examples = [train_set[i] for i in picked[:cfg.prompts_per_step]]
    probe_examples = [train_set[i] for i in picked[cfg.prompts_per_step:]]
    for draw in range(MAX_DRAWS):  # an update batch without signal moves no arm: it is drawn again
        batch, rewards = rollout_and_rewards(sampler, tokenizer, task, update_examples, cfg,
                                             step=1 + r + draw * PROBE_STEP // MAX_DRAWS, stop_ids=stop_ids,
                                             amp=amp)
        advantages = rlino.group_advantages(rewards, cfg.group_size, scale=cfg.scale_adv)
        if advantages.abs().sum() > 0:
            break
    probe, probe_rewards = rollout_and_rewards(sampler, tokenizer, task, probe_examples, cfg,
                                               step=PROBE_STEP + r, stop_ids=stop_ids, amp=amp)
    t1 = time.time()
    steps = [arm_step(model, optimizer, batch, rewards, cfg, algo, agg, amp)
             for algo, agg in ARMS.values()]
    directions = score_directions(model, probe, steps, cfg, amp)
    changes = predicted_changes(directions, probe.lengths, probe_rewards >= 1.0, cfg.group_size)
    correct, probe_correct = rewards >= 1.0, probe_rewards >= 1.0
    return {"replicate": r, "update_draws": draw + 1,
            "seconds_sampling": t1 - t0, "seconds_gradients": time.time() - t1,
            "update_accuracy": correct.float().mean().item(),
            "update_groups_with_signal": int((advantages.view(-1, cfg.group_size) != 0).any(1).sum()),
            "probe_accuracy": probe_correct.float().mean().item(),
            "probe_len_wrong": probe.lengths[~probe_correct].float().mean().item(),
            "probe_len_right": probe.lengths[probe_correct].float().mean().item(),
            "probe_truncated": probe.truncated.float().mean().item(),
            "step_norms": {arm: torch.sqrt(sum((d.float() ** 2).sum() for d in step)).item()
                           for arm, step in zip(ARMS, steps)},
            "predicted": {q: dict(zip(ARMS, v.tolist())) for q, v in changes.items()}}


# --------------------------------------------------------------------------- policies and the command
def load_policy(spec: str, cfg, device):
    """'initial' (the model as loaded, a fresh optimizer) or RUN_DIR:STEP (a checkpoint of a run with its
    optimizer state, e.g. a GRPO run's)."""
    model, tokenizer = rlino.load_model(cfg.model, device)
    optimizer = rlino.make_optimizer(model, cfg)
    if spec != "initial":
        run_dir, _, step = spec.rpartition(":")
        state = torch.load(Path(run_dir) / "checkpoints" / f"step-{step}.pt", map_location="cpu",
                           weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    task = tasks.get_task(cfg.task)
    train_set = task.load("train", data_dir=cfg.data_dir, seed=cfg.seed)
    return (model, optimizer, rlino.sampler_model(model, cfg.sampler_dtype), tokenizer, task, train_set,
            rlino.stop_token_ids(tokenizer, model, cfg.prompt_format))


def policy_name(spec: str) -> str:
    run_dir, _, step = spec.rpartition(":")
    return "initial" if spec == "initial" else f"{Path(run_dir).name}-step{step}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="the length incentive of one update (bench/incentive.py); other "
                                            "flags are rlino's (python rlino.py --help)")
    p.add_argument("--policy", action="append", default=[], help="'initial' or RUN_DIR:STEP (a checkpoint); "
                                                                 "repeat for several")
    p.add_argument("--replicates", type=int, default=20, help="replicate batches per policy (default: 20)")
    p.add_argument("--probe-prompts", type=int, default=8, help="prompts of the probe batch, x G samples "
                                                                "(default: 8)")
    p.add_argument("--out", default="runs/incentive", help="folder for the results (default: runs/incentive)")
    p.add_argument("--table", action="store_true",
                   help="only write OUT/incentive.md and .png from OUT/*.jsonl")
    args, rest = p.parse_known_args(argv)
    return args, vars(rlino.build_parser().parse_args(rest))  # rlino's flags given


def main(argv=None) -> None:
    args, given = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.table:
        device, _, _ = rlino.setup_distributed(given.get("device", "auto"))  # one process: the device alone
        cfg = rlino.resolve_config(given, device)
        if cfg.beta != 0 or cfg.mu != 1:
            raise SystemExit("incentive.py: the measurement is for mu = 1 and beta = 0")
        rlino.write_json(out / "config.json", {**dataclasses.asdict(cfg), "replicates": args.replicates,
                                               "probe_prompts": args.probe_prompts, "policies": args.policy})
        amp = rlino.autocast(device, cfg)
        for spec in args.policy:
            path = out / f"{policy_name(spec)}.jsonl"
            done = len(rlino.logged(path)) if path.exists() else 0
            if done >= args.replicates:
                continue
            torch.manual_seed(cfg.seed)
            policy = load_policy(spec, cfg, device)
            for r in range(done, args.replicates):
                record = replicate(r, policy, cfg, args, amp)
                rlino.append_jsonl(path, record)
                wrong = record["predicted"].get("wrong", {})
                print(f"{policy_name(spec)} replicate {r + 1}/{args.replicates}: "
                      f"{record['seconds_sampling']:.0f}+{record['seconds_gradients']:.0f}s, predicted "
                      f"change of len wrong: " + ", ".join(f"{a} {v:+.3f}" for a, v in wrong.items()),
                      flush=True)
    table = results_table(out)
    (out / "incentive.md").write_text(table)
    print(table)
    plot(out)


# --------------------------------------------------------------------------- results
def policy_records(out: Path) -> dict:
    return {path.stem: rlino.logged(path) for path in sorted(out.glob("*.jsonl"))}


def results_table(out: Path) -> str:
    """Per policy and quantity: each arm's predicted change (mean ± 95 % CI over replicates), and the paired
    differences of PAIRS; per policy, what its batches looked like."""
    lines = ["| policy | quantity | replicates | " + " | ".join(ARMS) + " | " +
             " | ".join(f"{a} − {b}, paired" for a, b in PAIRS) + " |",
             "| --- " * (3 + len(ARMS) + len(PAIRS)) + "|"]
    notes = []
    for policy, records in policy_records(out).items():
        for quantity in QUANTITIES:
            rows = [r["predicted"][quantity] for r in records if quantity in r["predicted"]]
            cells = [mean_ci([row[arm] for row in rows]) for arm in ARMS]
            cells += [mean_ci([row[a] - row[b] for row in rows]) for a, b in PAIRS]
            lines.append(f"| {policy} | len {quantity} | {len(rows)} | " + " | ".join(cells) + " |")
        stat = {k: mean_ci([r[k] for r in records]) for k in
                ("update_draws", "update_accuracy", "update_groups_with_signal", "probe_accuracy",
                 "probe_len_wrong", "probe_len_right", "probe_truncated", "seconds_sampling",
                 "seconds_gradients")}
        notes.append(f"- {policy}: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in stat.items()))
    return ("\n".join(lines) + "\n\nPredicted change, in tokens, of the expected length of the probe "
            "completions (incorrect ones, correct ones, all) by one update of each arm: mean ± half-width of "
            "the 95 % CI over replicates (Student's t); paired: the difference within each replicate.\n\n" +
            "\n".join(notes) + "\n")


def plot(out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    records = policy_records(out)
    fig, axes = plt.subplots(1, len(QUANTITIES), figsize=(5 * len(QUANTITIES), 4), squeeze=False)
    width = 0.8 / max(len(records), 1)
    for ax, quantity in zip(axes[0], QUANTITIES):
        for k, (policy, recs) in enumerate(records.items()):
            rows = [r["predicted"][quantity] for r in recs if quantity in r["predicted"]]
            values = np.array([[row[arm] for arm in ARMS] for row in rows])          # (R, A)
            if len(values) < 2:
                continue
            half = [ci_half_width(column) for column in values.T]
            ax.bar(np.arange(len(ARMS)) + k * width, values.mean(0), width, yerr=half, capsize=3,
                   label=policy)
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.set_xticks(np.arange(len(ARMS)) + width * (len(records) - 1) / 2, list(ARMS), rotation=30,
                      ha="right", fontsize=8)
        ax.set_title(f"predicted change of len {quantity} (tokens / update)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "incentive.png", dpi=100)
    print(f"wrote {out / 'incentive.png'}")


if __name__ == "__main__":
    main()
