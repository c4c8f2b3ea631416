"""bench.py — how fast is rlino? Its sampler against `model.generate`, one GRPO step against TRL's GRPOTrainer,
and the update's FLOP/s against a matmul peak measured in the same run. rlino.py itself compares with nothing.

Run it (from the repository root, in the venv; `pip install -r bench/requirements.txt` adds TRL):
    python bench/bench.py --quick                       # < 10 minutes on 2 CPU cores, embedded SmolLM2-135M
    python bench/bench.py --json bench.json             # the full size (~30 min on 2 cores, estimated)
    python bench/bench.py --device cuda --qwen-shaped   # a Qwen2.5-0.5B-shaped model with random weights, on a GPU

Three measurements, one table, and every figure in --json:
  a. sampler:   rlino.sample vs model.generate, same model, prompts, seed and batch (B prompts x G = 32 sequences):
                useful tokens/s (completion tokens up to and including the first stop token), their ratio; rlino
                samples from its bf16 copy of the weights where --sampler-dtype says so, generate from the policy
                and, in a second row, from that same copy.
  b. GRPO step: rlino's step (exactly the calls of rlino.train) vs TRL GRPOTrainer with the same model weights,
                prompts, B, G, max new tokens, temperature, lr, loss aggregation (seq), mu = 1, beta = 0:
                seconds per step (median; the first step is dropped as warm-up when there are 3 or more).
  c. MFU:       FLOP/s of rlino.train_step's forward + backward over a fixed rollout, as a fraction of the FLOP/s of a
                square matmul measured in the same run.
  d. stop text: the host's time for one --stop-text look at a paper step's 320 rows (16 new tokens each): every
                window decoded, as rlino did, against only those that end at a token able to complete the text
                (rlino.stop_text_enders), on the tokenizer's own tokens of the task's prompts.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # rlino.py and tasks.py live one folder up
import rlino  # noqa: E402
import tasks  # noqa: E402

# The targets, checked in the table's last column.
TARGETS = {"sampler_speedup": 3.0, "grpo_step_ratio": 0.5, "mfu": 0.5}

# Two sizes. The sampler batch is always sampler_prompts x group = 32 sequences.
SIZES = {
    "quick": dict(sampler_prompts=8, group=4, sampler_tokens=128, grpo_prompts=4, grpo_tokens=96, steps=3,
                  mfu_rows=8, mfu_repeats=2),
    "full": dict(sampler_prompts=8, group=4, sampler_tokens=256, grpo_prompts=8, grpo_tokens=256, steps=4,
                 mfu_rows=32, mfu_repeats=3),
}


# --------------------------------------------------------------------------- settings
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="rlino benchmark: sampler, GRPO step against TRL, MFU",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=rlino.EMBEDDED_MODEL, help="anything rlino.load_model accepts")
    p.add_argument("--qwen-shaped", action="store_true",
                   help="a Qwen2.5-0.5B-shaped model with random weights and the SmolLM2 tokenizer (for GPUs)")
    p.add_argument("--task", default="gsm8k", choices=tuple(tasks.TASKS), help="prompts from its test split")
    p.add_argument("--data-dir", default=None, help="local data folder (default $RLINO_DATA_DIR); "
                                                    "without data the offline 'arith' task is used")
    p.add_argument("--quick", action="store_true", help="the small size (< 10 minutes on 2 CPU cores)")
    p.add_argument("--steps", type=int, default=None, help="GRPO steps per side (default: 3 quick, 4 full)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="as rlino's --dtype: auto = bf16 autocast on CUDA and on CPUs with AVX512-BF16, else fp32; "
                        "both trainers and the peak")
    p.add_argument("--sampler-dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="as rlino's --sampler-dtype: the weights rlino samples from (auto: bf16 on CUDA and on CPUs "
                        "with AVX512-BF16)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (lengths vary)")
    p.add_argument("--lr", type=float, default=5e-6, help="learning rate of both GRPO trainers")
    p.add_argument("--micro-batch", type=int, default=4, help="sequences per forward/backward, both trainers")
    p.add_argument("--reward", default="task", choices=("task", "parity"),
                   help="task: the task's verifier; parity: 1 for every other completion of a group, so that no "
                        "row has a zero advantage (rlino then cannot skip any row of the update)")
    p.add_argument("--peak-size", type=int, default=None, help="side of the square matmul (default 2048 CPU, "
                                                               "8192 CUDA)")
    p.add_argument("--skip", nargs="*", default=[], choices=("sampler", "grpo", "trl", "mfu", "stoptext"),
                   help="parts to leave out (for debugging)")
    p.add_argument("--json", default=None, metavar="PATH", help="write every figure here")
    args = p.parse_args(argv)
    args.size = dict(SIZES["quick" if args.quick else "full"])
    args.size["steps"] = args.steps or args.size["steps"]
    want = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    args.device = torch.device(want)
    if (args.size["grpo_prompts"] * args.size["group"]) % args.micro_batch:
        p.error(f"--micro-batch must divide the {args.size['grpo_prompts'] * args.size['group']} rows of a step")
    return args


def clock(device: torch.device) -> float:
    """Wall time in seconds, after the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def compute_dtype(args) -> torch.dtype:
    """The matmul dtype of the run: bf16 under rlino's autocast (--dtype bfloat16, or auto where bf16 is native)."""
    bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and rlino.native_bf16(args.device))
    return torch.bfloat16 if bf16 else torch.float32


def median_steady(times: list[float]) -> float:
    """Median step time; the first step (warm-up: allocations, lazy init) is dropped when there are 3 or more."""
    return statistics.median(times[1:] if len(times) >= 3 else times)


# --------------------------------------------------------------------------- model and prompts
def load_bench_model(args):
    """Model and tokenizer, freshly loaded: the same weights every call (random ones seeded by --seed)."""
    if not args.qwen_shaped:
        return rlino.load_model(args.model, args.device)
    from transformers import Qwen2Config, Qwen2ForCausalLM

    _, tokenizer = rlino.load_model(rlino.EMBEDDED_MODEL, torch.device("cpu"))
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(args.seed)
    model = Qwen2ForCausalLM(config)  # built on the CPU so that the weights do not depend on the device
    return model.to(args.device), tokenizer


def load_examples(args, n: int) -> tuple[str, list[dict]]:
    """The first n problems of the task's test split; the offline 'arith' task when that data is unavailable."""
    try:
        return args.task, tasks.get_task(args.task).load("test", data_dir=args.data_dir)[:n]
    except tasks.DataError as err:
        print(f"no data for {args.task} ({str(err).splitlines()[0]}): using the offline 'arith' task", flush=True)
        return "arith", tasks.get_task("arith").load("test")[:n]


def rlino_config(args, task_name: str, prompts_per_step: int, max_new_tokens: int) -> rlino.Config:
    """rlino's config for the GRPO step: the device preset with the benchmark's sizes (one sampler call per step)."""
    cfg = dict(algo="grpo", task=task_name, model=args.model, seed=args.seed, device=args.device.type,
               steps=args.size["steps"], prompts_per_step=prompts_per_step, group_size=args.size["group"],
               sample_batch=prompts_per_step, max_new_tokens=max_new_tokens, temperature=args.temperature,
               lr=args.lr, micro_batch=args.micro_batch, loss_agg="seq", beta=0.0, mu=1,
               dtype=args.dtype, sampler_dtype=args.sampler_dtype)
    return rlino.resolve_config(cfg, args.device)


def non_embedding_params(model) -> int:
    """Parameters outside the token embedding and the LM head (those are counted by the LM-head term)."""
    skip = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def parity_rewards(n: int) -> list[float]:
    """1, 0, 1, 0, ...: every group of even size has two distinct rewards, so every advantage is +-1."""
    return [float(i % 2 == 0) for i in range(n)]


# --------------------------------------------------------------------------- a. sampler
def completion_lengths(completions: torch.Tensor, stop_ids: list[int]) -> torch.Tensor:
    """(N,) tokens up to and including the first stop token; the full width when a row has none. completions: (N, T)."""
    is_stop = torch.isin(completions, torch.tensor(stop_ids, device=completions.device))
    first = torch.where(is_stop.any(-1), is_stop.int().argmax(-1) + 1, completions.shape[1])
    return first.cpu()


def generate_batch(model, tokenizer, prompts, group_size, max_new_tokens, stop_ids, temperature, amp):
    """transformers' sampler on the same B x G rows: each prompt repeated G times, left-padded. (N, T) completions."""
    rows = [p for p in prompts for _ in range(group_size)]
    ids, mask = rlino.left_pad(rows, tokenizer.pad_token_id)                     # (N, P)
    device = next(model.parameters()).device
    sampling = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if temperature > 0 else \
        dict(do_sample=False)
    with torch.no_grad(), amp:
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_ids, **sampling)
    return out[:, ids.shape[1]:]                                                 # (N, T)


def timed_generate(args, model, tokenizer, prompts, stop_ids, amp) -> dict:
    """model.generate on the B x G rows: seconds, useful tokens, useful tokens/s, mean and max length."""
    G, T = args.size["group"], args.size["sampler_tokens"]
    t0 = clock(args.device)
    torch.manual_seed(args.seed)
    lengths = completion_lengths(generate_batch(model, tokenizer, prompts, G, T, stop_ids, args.temperature, amp),
                                 stop_ids).float()
    seconds = clock(args.device) - t0
    return {"s": seconds, "tokens": int(lengths.sum()), "tokens_per_s": float(lengths.sum()) / seconds,
            "len_mean": lengths.mean().item(), "len_max": int(lengths.max())}


def bench_sampler(args, model, tokenizer, prompts, stop_ids, amp, cfg) -> tuple[dict, rlino.Rollout]:
    """Useful tokens/s of rlino.sample, as rlino.train runs it (on rlino.sampler_model: a bf16 copy of the weights
    where cfg.sampler_dtype says so), and of model.generate on the same 32 rows: generate on the policy as it is
    trained (what TRL's GRPOTrainer samples from) and, when they differ, generate on the same weights as rlino.
    rlino's greedy output is compared with generate's on the same weights. Also returns rlino's rollout (the MFU
    measurement reuses it)."""
    G, T, device = args.size["group"], args.size["sampler_tokens"], args.device
    model.eval()
    sampler = rlino.sampler_model(model, cfg.sampler_dtype)
    # warm-up: a few tokens each, so that one-time costs (allocator, lazy imports) fall outside the timings
    for m in dict.fromkeys((model, sampler)):
        rlino.sample(m, prompts[:2], max_new_tokens=4, stop_ids=stop_ids, group_size=2,
                     temperature=args.temperature, generator=torch.Generator(device).manual_seed(0), amp=amp)
        generate_batch(m, tokenizer, prompts[:2], 2, 4, stop_ids, args.temperature, amp)

    t0 = clock(device)
    rollout = rlino.sample(sampler, prompts, max_new_tokens=T, stop_ids=stop_ids, group_size=G,
                           temperature=args.temperature, amp=amp,
                           generator=torch.Generator(device).manual_seed(args.seed))
    seconds = clock(device) - t0
    ours = rollout.lengths.cpu().float()
    generate = timed_generate(args, model, tokenizer, prompts, stop_ids, amp)
    same_weights = generate if sampler is model else timed_generate(args, sampler, tokenizer, prompts, stop_ids, amp)

    # greedy agreement on the same weights: temperature 0, two prompts, a few tokens; the same tokens up to the
    # first stop token
    greedy_tokens = 24
    mine = rlino.sample(sampler, prompts[:2], max_new_tokens=greedy_tokens, stop_ids=stop_ids, amp=amp)
    ref = generate_batch(sampler, tokenizer, prompts[:2], 1, greedy_tokens, stop_ids, 0.0, amp)
    ref_lengths = completion_lengths(ref, stop_ids)
    agree = all(mine.completion_ids[i, :n].tolist() == ref[i, :m].tolist()
                for i, (n, m) in enumerate(zip(mine.lengths.tolist(), ref_lengths.tolist())))
    rlino_tokens_per_s = float(ours.sum()) / seconds
    return {"sequences": len(prompts) * G, "max_new_tokens": T, "sampler_dtype": cfg.sampler_dtype,
            "rlino_tokens": int(ours.sum()), "rlino_s": seconds, "rlino_tokens_per_s": rlino_tokens_per_s,
            "rlino_len_mean": ours.mean().item(), "rlino_len_max": int(ours.max()),
            **{f"generate_{k}": v for k, v in generate.items()},
            **{f"generate_same_weights_{k}": v for k, v in same_weights.items()},
            "speedup": rlino_tokens_per_s / generate["tokens_per_s"],
            "speedup_same_weights": rlino_tokens_per_s / same_weights["tokens_per_s"],
            "greedy_agree": agree, "greedy_tokens": greedy_tokens}, rollout


# --------------------------------------------------------------------------- b. GRPO step: rlino
def bench_rlino_grpo(args, model, tokenizer, task, examples, cfg, stop_ids, amp) -> dict:
    """rlino's training step, the same calls as rlino.train (sample -> decode -> score -> targets -> train step
    -> refresh the sampler's weights), timed per step. examples: steps x B problems, step k takes the k-th block."""
    optimizer = rlino.make_optimizer(model, cfg)
    sampler = rlino.sampler_model(model, cfg.sampler_dtype)
    B, G = cfg.prompts_per_step, cfg.group_size
    times, sample_s, update_s, rows, lengths, rewards_mean = [], [], [], [], [], []
    for step in range(1, cfg.steps + 1):
        batch = examples[(step - 1) * B:step * B]
        t0 = clock(args.device)
        rollout = rlino.collect_rollouts(sampler, tokenizer, task, batch, cfg, step=step, stop_ids=stop_ids,
                                         amp=amp)
        texts = rlino.decode_completions(tokenizer, rollout)
        rewards = rlino.score(task, texts, batch, group_size=G, format_reward=cfg.format_reward)
        rewards = rewards.to(args.device)                                                               # (B*G,)
        if args.reward == "parity":
            rewards = torch.tensor(parity_rewards(len(texts)), device=args.device)
        t1 = clock(args.device)
        targets, _ = rlino.step_targets(model, None, rollout, rewards, cfg, amp=amp)
        stats = rlino.train_step(model, optimizer, rollout, targets, cfg, amp=amp)
        rlino.refresh_sampler(sampler, model)
        t2 = clock(args.device)
        times.append(t2 - t0), sample_s.append(t1 - t0), update_s.append(t2 - t1)
        rows.append(stats["update_rows"]), lengths.append(rollout.lengths.float().mean().item())
        rewards_mean.append(rewards.mean().item())
        print(f"  rlino step {step}: {t2 - t0:.1f} s (sample {t1 - t0:.1f} + update {t2 - t1:.1f}), "
              f"{stats['update_rows']}/{B * G} rows updated, len {lengths[-1]:.0f}", flush=True)
    return {"step_s": median_steady(times), "step_times": times, "sample_times": sample_s, "update_times": update_s,
            "update_rows": rows, "len_mean": statistics.mean(lengths), "reward_mean": statistics.mean(rewards_mean)}


# --------------------------------------------------------------------------- b. GRPO step: TRL
def bench_trl_grpo(args, model, tokenizer, task, examples, cfg, use_chat: bool) -> dict:
    """TRL's GRPOTrainer on the same model weights, prompts (in order, unshuffled), B, G, max new tokens,
    temperature, lr, micro-batch, loss aggregation ('grpo' = seq), mu = 1, beta = 0; each step timed by a
    callback (on_step_begin -> on_step_end), its transformers.generate calls by a wrapper."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    B, G = cfg.prompts_per_step, cfg.group_size
    prompt = (lambda ex: task.prompt_messages(ex)) if use_chat else (lambda ex: task.prompt_text(ex))
    dataset = Dataset.from_list([{"prompt": prompt(ex), "index": i} for i, ex in enumerate(examples)])

    def task_reward(prompts, completions, index, **_):
        """The task's verifier on each completion (chat completions are [{'role': 'assistant', 'content': ...}])."""
        if args.reward == "parity":
            return parity_rewards(len(completions))
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        return [task.reward(text, examples[i]) for text, i in zip(texts, index)]

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begin, self.times, self.logs = 0.0, [], []

        def on_step_begin(self, *_, **__):
            self.begin = clock(args.device)

        def on_step_end(self, *_, **__):
            self.times.append(clock(args.device) - self.begin)
            print(f"  TRL step {len(self.times)}: {self.times[-1]:.1f} s", flush=True)

        def on_log(self, _args, _state, _control, logs=None, **__):
            self.logs.append(dict(logs or {}))

    accumulation = B * G // args.micro_batch
    # TRL sets `gradient_checkpointing`, which transformers 5.24 renamed: one FutureWarning per call, no effect
    warnings.filterwarnings("ignore", message=".*checkpointing", category=FutureWarning)
    with tempfile.TemporaryDirectory() as out_dir:
        config = GRPOConfig(
            output_dir=out_dir, max_steps=cfg.steps, seed=args.seed, report_to="none", save_strategy="no",
            eval_strategy="no", logging_steps=1, disable_tqdm=True, use_cpu=args.device.type == "cpu",
            bf16=compute_dtype(args) == torch.bfloat16, tf32=args.device.type == "cuda" or None,
            gradient_checkpointing=False,
            per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=accumulation,  # B*G rows/step
            num_generations=G, max_completion_length=cfg.max_new_tokens, temperature=cfg.temperature, top_p=1.0,
            learning_rate=cfg.lr, lr_scheduler_type="constant", weight_decay=cfg.weight_decay, warmup_steps=0,
            max_grad_norm=cfg.max_grad_norm, beta=0.0, num_iterations=1, epsilon=cfg.clip_eps, loss_type="grpo",
            scale_rewards="group", shuffle_dataset=False, log_completions=False)
        trainer = GRPOTrainer(model=model, reward_funcs=[task_reward], args=config, train_dataset=dataset,
                              processing_class=tokenizer)
        timer = StepTimer()
        trainer.add_callback(timer)
        trainer.remove_callback(PrinterCallback)  # it prints every log dict; the timer prints one line per step
        generate_s = []
        generate = trainer._generate_single_turn  # private in TRL 1.16: wrapped only to split the step's time

        def timed_generate(*a, **k):
            t0 = clock(args.device)
            result = generate(*a, **k)
            generate_s.append(clock(args.device) - t0)
            return result

        trainer._generate_single_turn = timed_generate
        trainer.train()
    lengths = [log["completions/mean_length"] for log in timer.logs if "completions/mean_length" in log]
    rewards = [log["reward"] for log in timer.logs if "reward" in log]
    update_s = [step - gen for step, gen in zip(timer.times, generate_s)]  # one generate call per step
    return {"step_s": median_steady(timer.times), "step_times": timer.times, "sample_times": generate_s,
            "update_times": update_s, "len_mean": statistics.mean(lengths) if lengths else None,
            "reward_mean": statistics.mean(rewards) if rewards else None}


# --------------------------------------------------------------------------- c. MFU
def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 5) -> float:
    """FLOP/s of an (n, n) @ (n, n) matmul in dtype, best of `repeats`: 2 n^3 FLOPs each."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = clock(device)
        a @ b
        best = min(best, clock(device) - t0)
    return 2 * n ** 3 / best


def update_flops(model, rollout: rlino.Rollout) -> float:
    """Forward + backward FLOPs of rlino.train_step over the rollout's real (unpadded) tokens:
        6 N s            N = non-embedding parameters, s = prompt + completion tokens of a row (2 forward, 4 backward)
      + 6 d V c          the LM head on the c completion tokens (d = hidden size, V = vocabulary)
      + 12 L d s^2       attention scores and weighted sum, 4 L d s^2 forward (full square, no causal saving), x3
    summed over the rows. Padding, the softmax, norms and the optimizer are not counted (it is useful work only)."""
    cfg = model.config
    d, vocab, layers = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
    n_params = non_embedding_params(model)
    total = 0.0
    for prompt_len, completion_len in zip(rollout.prompt_mask.sum(-1).tolist(), rollout.lengths.tolist()):
        s = prompt_len + completion_len
        total += 6 * n_params * s + 6 * d * vocab * completion_len + 12 * layers * d * s ** 2
    return total


def bench_mfu(args, model, rollout: rlino.Rollout, cfg, amp) -> dict:
    """rlino.train_step's FLOP/s over a fixed rollout (rewards 1, 0, ... so that no row is skipped), with an
    lr = 0 SGD (the step computes and clips the gradient; nothing changes the weights), against the matmul peak."""
    rows = torch.arange(min(args.size["mfu_rows"], len(rollout.lengths)))
    rollout = rlino.Rollout(*(getattr(rollout, f.name)[rows] for f in dataclasses.fields(rlino.Rollout)))
    rewards = torch.tensor(parity_rewards(len(rows)), device=args.device)  # (n,)
    targets, _ = rlino.step_targets(model, None, rollout, rewards, cfg, amp=amp)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    model.train()
    times = []
    for _ in range(args.size["mfu_repeats"]):
        t0 = clock(args.device)
        stats = rlino.train_step(model, optimizer, rollout, targets, cfg, amp=amp)
        times.append(clock(args.device) - t0)
    optimizer.zero_grad(set_to_none=True)
    flops = update_flops(model, rollout)
    dtype = compute_dtype(args)
    peak = matmul_peak(args.device, dtype, args.peak_size or (8192 if args.device.type == "cuda" else 2048))
    achieved = flops / min(times)
    return {"rows": len(rows), "update_rows": stats["update_rows"], "tokens": int(rollout.prompt_mask.sum()
            + rollout.lengths.sum()), "completion_tokens": int(rollout.lengths.sum()), "flops": flops,
            "times": times, "gflops_per_s": achieved / 1e9, "peak_gflops_per_s": peak / 1e9,
            "peak_dtype": str(dtype).removeprefix("torch."), "mfu": achieved / peak}


# --------------------------------------------------------------------------- d. the --stop-text look
def bench_stop_text_look(tokenizer, task, examples, *, rows: int = 320, upto: int = 256, new: int = 16,
                         looks: int = 20, text: str = "\nUser:") -> dict:
    """Median ms of one look for `text` at `rows` rows over columns upto - new .. upto, decoding every window
    (before) or only the windows that end at one of rlino.stop_text_enders (now); rows are the tokens of the
    prompts' text, each row starting elsewhere. The enders' one-time cost per run is reported beside."""
    import numpy as np
    ids = tokenizer(" ".join(task.instruction(ex) for ex in examples), add_special_tokens=False)["input_ids"]
    ids = (ids * (1 + (rows + upto) // len(ids)))[:rows + upto]
    window = np.array([ids[r:r + upto] for r in range(rows)])                # (rows, upto)
    t0 = time.perf_counter()
    enders = rlino.stop_text_enders(tokenizer, text, len(tokenizer))
    enders_s = time.perf_counter() - t0
    every = np.ones(len(tokenizer), dtype=bool)
    result = {"rows": rows, "new_tokens": new, "enders_s": enders_s, "enders_share": float(enders.mean())}
    for name, kept in (("every_window", every), ("enders_only", enders)):
        times = []
        for _ in range(looks):
            t0 = time.perf_counter()
            found = rlino.first_stop_text(tokenizer, window, text, since=upto - new, enders=kept)
            times.append(time.perf_counter() - t0)
        result[f"{name}_ms"], result[f"{name}_found"] = 1000 * statistics.median(times), found
    assert result["every_window_found"] == result["enders_only_found"], "the two looks disagree"
    return result


# --------------------------------------------------------------------------- report
def table(results: dict) -> str:
    """The figures as an aligned plain-text table: one row per measurement, its target and whether it is met."""
    rows = [("measurement", "rlino", "reference", "ratio", "target", "met")]
    if "sampler" in results:
        s = results["sampler"]
        rows.append((f"a. sampler useful tok/s ({s['sequences']} seqs, {s['max_new_tokens']} new)",
                     f"{s['rlino_tokens_per_s']:.1f}", f"{s['generate_tokens_per_s']:.1f} generate",
                     f"{s['speedup']:.2f}x", f">= {TARGETS['sampler_speedup']:.0f}x",
                     "yes" if s["speedup"] >= TARGETS["sampler_speedup"] else "no"))
        rows.append(("   completion length mean / max", f"{s['rlino_len_mean']:.0f} / {s['rlino_len_max']}",
                     f"{s['generate_len_mean']:.0f} / {s['generate_len_max']}", "", "", ""))
        rows.append((f"   rlino's weights: {s['sampler_dtype']}; generate on the same weights",
                     f"{s['rlino_tokens_per_s']:.1f}", f"{s['generate_same_weights_tokens_per_s']:.1f} generate",
                     f"{s['speedup_same_weights']:.2f}x", "", ""))
        rows.append(("   greedy outputs agree (same weights)", str(s["greedy_agree"]).lower(), "", "", "", ""))
    if "grpo" in results:
        g = results["grpo"]
        trl_s = g.get("trl", {}).get("step_s")
        ratio = g["rlino"]["step_s"] / trl_s if trl_s else None
        rows.append((f"b. GRPO step s ({g['prompts']}x{g['group']}, {g['max_new_tokens']} new, median)",
                     f"{g['rlino']['step_s']:.1f}", f"{trl_s:.1f} TRL" if trl_s else "-",
                     f"{ratio:.2f}x" if ratio else "-", f"<= {TARGETS['grpo_step_ratio']}x",
                     "-" if ratio is None else "yes" if ratio <= TARGETS["grpo_step_ratio"] else "no"))
        r, t = g["rlino"], g.get("trl", {})
        split = lambda side: f"{median_steady(side['sample_times']):.1f} + {median_steady(side['update_times']):.1f}"
        rows.append(("   sampling + rest of the step s (median)", split(r), split(t) + " TRL" if t else "", "", "", ""))
        rows.append(("   completion length mean", f"{r['len_mean']:.0f}",
                     f"{t['len_mean']:.0f}" if t.get("len_mean") is not None else "", "", "", ""))
        rows.append(("   rows in the update, per step", ", ".join(map(str, r["update_rows"])),
                     f"{g['prompts'] * g['group']} each (all)" if t else "", "", "", ""))
    if "mfu" in results:
        m = results["mfu"]
        rows.append((f"c. update GFLOP/s ({m['rows']} rows, {m['tokens']} tokens)", f"{m['gflops_per_s']:.1f}",
                     f"{m['peak_gflops_per_s']:.1f} matmul {m['peak_dtype']}", f"{100 * m['mfu']:.0f}% MFU",
                     f">= {100 * TARGETS['mfu']:.0f}%", "yes" if m["mfu"] >= TARGETS["mfu"] else "no"))
    if "stop_text" in results:
        x = results["stop_text"]
        rows.append((f"d. --stop-text look ms ({x['rows']} rows, {x['new_tokens']} new)", f"{x['enders_only_ms']:.2f}",
                     f"{x['every_window_ms']:.1f} every window", f"{x['every_window_ms'] / x['enders_only_ms']:.0f}x",
                     "", ""))
        rows.append((f"   tokens that can end it: {100 * x['enders_share']:.1f}% of the vocabulary, found once in",
                     f"{x['enders_s']:.2f} s", "", "", "", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def machine_info(device: torch.device) -> dict:
    info = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "device": str(device), "platform": platform.platform(), "python": platform.python_version()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    with contextlib.suppress(ImportError):
        import transformers
        info["transformers"] = transformers.__version__
    with contextlib.suppress(ImportError):
        import trl
        info["trl"] = trl.__version__
    return info


# --------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    size = args.size
    n_examples = max(size["sampler_prompts"], size["grpo_prompts"] * size["steps"])
    task_name, examples = load_examples(args, n_examples)
    task = tasks.get_task(task_name)
    model, tokenizer = load_bench_model(args)
    cfg = rlino_config(args, task_name, size["grpo_prompts"], size["grpo_tokens"])
    stop_ids = rlino.stop_token_ids(tokenizer, model, cfg.prompt_format)
    amp = rlino.autocast(args.device, cfg)
    if args.device.type == "cuda":  # as rlino.train does; TRL gets tf32=True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    use_chat = tokenizer.chat_template is not None  # rlino's prompt_format 'auto'
    results = {"machine": machine_info(args.device),
               "settings": {"model": "qwen-shaped (random)" if args.qwen_shaped else args.model, "task": task_name,
                            "size": "quick" if args.quick else "full", "seed": args.seed, **size,
                            "temperature": args.temperature, "lr": args.lr, "micro_batch": args.micro_batch,
                            "dtype": str(compute_dtype(args)).removeprefix("torch."),
                            "reward": args.reward, "prompt_format": "chat" if use_chat else "plain",
                            "parameters": sum(p.numel() for p in model.parameters()),
                            "non_embedding_parameters": non_embedding_params(model)}}
    print(f"benchmark: {results['settings']['model']} ({results['settings']['parameters'] / 1e6:.0f}M parameters) "
          f"on {args.device} ({results['settings']['dtype']}), {os.cpu_count()} CPUs, task {task_name}, "
          f"size {results['settings']['size']}", flush=True)

    prompts = rlino.encode_prompts(task, examples[:size["sampler_prompts"]], tokenizer, cfg.prompt_format)
    sampler_rollout = None
    if "sampler" not in args.skip:
        print("a. sampler: rlino.sample vs model.generate ...", flush=True)
        results["sampler"], sampler_rollout = bench_sampler(args, model, tokenizer, prompts, stop_ids, amp, cfg)
    if "mfu" not in args.skip:
        print("c. MFU: rlino.train_step over a fixed rollout, and the matmul peak ...", flush=True)
        if sampler_rollout is None:  # sampled in fp32: the same rollout for --dtype float32 and bfloat16
            sampler_rollout = rlino.sample(model, prompts, max_new_tokens=size["sampler_tokens"],
                                           stop_ids=stop_ids, group_size=size["group"],
                                           temperature=args.temperature,
                                           generator=torch.Generator(args.device).manual_seed(args.seed))
        results["mfu"] = bench_mfu(args, model, sampler_rollout, cfg, amp)
    if "stoptext" not in args.skip:
        print("d. the --stop-text look at 320 rows ...", flush=True)
        results["stop_text"] = bench_stop_text_look(tokenizer, task, examples)
    if "grpo" not in args.skip:
        print(f"b. GRPO step: rlino, {size['steps']} steps ...", flush=True)
        grpo_examples = examples[:size["grpo_prompts"] * size["steps"]]
        results["grpo"] = {"prompts": size["grpo_prompts"], "group": size["group"], "max_new_tokens":
                           size["grpo_tokens"], "steps": size["steps"],
                           "rlino": bench_rlino_grpo(args, model, tokenizer, task, grpo_examples, cfg, stop_ids, amp)}
        if "trl" not in args.skip:
            del model, sampler_rollout
            gc.collect()
            print(f"b. GRPO step: TRL GRPOTrainer, {size['steps']} steps ...", flush=True)
            trl_model, tokenizer = load_bench_model(args)  # fresh weights: rlino's steps changed the others
            results["grpo"]["trl"] = bench_trl_grpo(args, trl_model, tokenizer, task, grpo_examples, cfg, use_chat)
            g = results["grpo"]
            g["ratio"] = g["rlino"]["step_s"] / g["trl"]["step_s"]
    results["wall_s"] = time.perf_counter() - start
    print()
    print(table(results))
    print(f"\nwall time {results['wall_s']:.0f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
