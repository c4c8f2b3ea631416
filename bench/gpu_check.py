"""gpu_check.py — does rlino run right at the paper's shape on this GPU, and how long would a paper row
take?

Run it from the repository root (no network, no venv needed: the GPU machine's python3 is enough):
    ./run.sh gpu-check                                   # the CUDA tests, then the 0.5B shape: one command
    ./run.sh gpu-check --size 1.5b                       # the 1.5B shape, a second one (tests off by default)
    python3 bench/gpu_check.py --device cpu --size tiny  # the same code in seconds on a CPU
    python3 bench/gpu_check.py --device cpu --size tiny --no-tests --break syncs  # a gate that must fail
    bench/rehearse_gpu_check.sh                          # the lease rehearsed here, in a clean copy

Phases, in order; each prints its estimated minutes on an H100 (ESTIMATE_MIN) before it runs, and
OUT/gpu_check.json and OUT/gpu_check.md (OUT: --out, default runs/gpu-check/<size>) are rewritten after each,
so that a command cut at its time limit still returns figures. A phase that raises is recorded; the rest run.
  tests       pytest -k <device> on test_rlino.py, in a subprocess (gate "tests").
  setup       a Qwen2.5-0.5B- or 1.5B-shaped Qwen2ForCausalLM with random weights (seeded), or a tiny one;
              the tokenizer committed in bench/smollm2-tokenizer; GSM8K test prompts through the chat template
              (from --data-dir or $RLINO_DATA_DIR), else the synthetic arith task's; the paper's settings
              (rlino's cuda preset, shrunk for tiny); the bf16 copy training samples from (sampler_model).
  warm-up     one small call of each sampler and one GRPO step: one-time costs fall outside the timings.
  greedy      gate: rlino.sample's greedy rows equal model.generate's (fp32 policy, TF32 off, no autocast).
  samplers    at the paper's shape on the bf16 copy: rlino.sample; model.generate as TRL calls it; and last,
              generate with a static cache under torch.compile (transformers' fast path), twice: the first
              call compiles. Seconds, useful tokens/s, peak memory and the realised lengths of each.
  syncs       gate: device-to-host syncs of rlino.sample, at most one per CHECK_EVERY decode tokens.
  logprobs    gate: each drawn token's sampler log-prob against the update's, within a stated bf16 tolerance.
  reference   the KL reference pass of the paper's GRPO column (beta = 0.001): a frozen bf16 copy.
  update      rlino.step_targets and rlino.train_step on the rollout, with --grad-ckpt (the preset's; gate
              "finite") and without.
  evaluation  one batch of the preset's eval_batch test problems, greedy and one sampled answer each.
  checkpoint  rlino.save_checkpoint of the model and AdamW's state into a temporary folder: seconds, size.
The projection (one paper run, and a row of the paper's table: 4 arms) and the gate "memory" (every phase's
peak below the device's memory) are recomputed at every write. Random weights never emit a stop token: a
forward hook forces stops the same way for every sampler (section "forced stops"). The exit status is 1 when
a gate fails, and the last line names the failed gates; --break GATE injects a fault that must fail that gate.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from copy import deepcopy
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as rlino.main, before CUDA
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoTokenizer, CompileConfig, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # rlino.py and tasks.py live one folder up
import rlino  # noqa: E402
import tasks  # noqa: E402

# Qwen2.5-0.5B's and 1.5B's shapes (494M and 1,544M parameters), and a tiny one.
SHAPES = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
}
VOCAB = 151936                                    # Qwen2.5's; the tokenizer's ids (< 49,152) all fit
TOKENIZER = ROOT / "bench" / "smollm2-tokenizer"  # SmolLM2-135M-Instruct's, committed: no GGUF, no cache
TINY = dict(prompts_per_step=2, group_size=2, sample_batch=2, max_new_tokens=32, micro_batch=2, eval_batch=4)
GATE_CALLS = {  # (prompts, new tokens) of the greedy gate's calls and of the sync-counted one
    "greedy": {"0.5b": (8, 128), "1.5b": (8, 128), "tiny": (4, 24)},
    "syncs": {"0.5b": (16, 256), "1.5b": (16, 256), "tiny": (2, 32)}}
PAPER_EVAL = dict(eval_samples=1, eval_temperature=1.0, eval_top_p=0.95)  # every paper row's (run.sh paper)
PAPER_ARMS = ("grpo", "grpo-nokl", "fisft+", "fisft+-")  # a row of the paper's table; grpo alone has a KL
GSM8K_TEST_PROBLEMS = 1319                        # what each evaluation of a paper run decodes
GATES = ("tests", "greedy", "syncs", "logprobs", "finite", "memory")

# Estimated minutes of each phase on one H100, (0.5b, 1.5b), from first principles (no GPU has run this):
# - decoding is host-bound: eager PyTorch spends ~0.4 ms of Python and kernel launches per layer and token,
#   ~10-12 ms a token at 24 layers, ~12-14 ms at 28, while the GPU's own work a token (the bf16 weights and
#   the KV cache of 320 rows read at ~3 TB/s, sampling over 151,936 logits) is 2-4 ms and hides under it. A
#   sampler call decodes 1,024 tokens (one of 320 rows reaches the cap): ~12-15 s; generate also copies its
#   growing cache each token and checks its stop criteria on the host; an evaluation batch decodes 2 x 1,024;
# - compiling the static-cache decode step (inductor, CUDA graphs): ~1.5-2 min, then ~3-5 ms a token;
# - the update: 6 x parameters FLOPs a token (8 x with --grad-ckpt) over ~1e5 tokens at ~250 TFLOP/s in bf16
#   (1.5B without --grad-ckpt: one out-of-memory retry at half the micro-batch); reference: 2 x parameters;
# - a checkpoint: 12 bytes a parameter (fp32 weights, AdamW's two moments) written at ~1 GB/s;
# - the tests: ~43 small CUDA tests with their process and CUDA start; setup: random init on the CPU.
# Sums: 5.7 min at 0.5B with the tests, 6.0 min at 1.5B without.
ESTIMATE_MIN = {"tests": (1.5, 1.5), "setup": (0.3, 0.6), "warm-up": (0.3, 0.3), "greedy": (0.15, 0.2),
                "rlino.sample": (0.25, 0.3), "generate": (0.3, 0.35), "syncs": (0.1, 0.1),
                "logprobs": (0.05, 0.1), "reference": (0.05, 0.1), "update (grad_ckpt)": (0.08, 0.2),
                "update (no_ckpt)": (0.07, 0.25), "evaluation": (0.5, 0.6), "checkpoint": (0.15, 0.4),
                "generate-static (compiles)": (1.8, 2.3), "generate-static": (0.1, 0.15)}


# --------------------------------------------------------------------------- settings
def parse_args(argv=None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description="rlino at the paper's shape on one GPU (bench/gpu_check.py)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if cuda else "cpu",
                   help="default: cuda when torch sees one")
    p.add_argument("--size", choices=tuple(SHAPES), default=None,
                   help="model shape (default: 0.5b on cuda, tiny on cpu)")
    p.add_argument("--tests", action=argparse.BooleanOptionalAction, default=None,
                   help="run pytest -k <device> first (default: on for tiny and 0.5b, off for 1.5b)")
    p.add_argument("--out", default=None, help="folder of gpu_check.json and .md (runs/gpu-check/<size>)")
    p.add_argument("--data-dir", default=None, help="folder with gsm8k/test.jsonl (default: $RLINO_DATA_DIR; "
                                                    "without one the synthetic arith task gives the prompts)")
    p.add_argument("--tokenizer", default=str(TOKENIZER), help="tokenizer folder (default: %(default)s)")
    p.add_argument("--prompt-format", choices=("chat", "plain"), default="chat",
                   help="chat template, or plain prompts that also end at --stop-text, as paper rows do")
    p.add_argument("--seed", type=int, default=0, help="of the random weights and the sampling (default: 0)")
    p.add_argument("--break", dest="fault", choices=GATES, default=None,
                   help="inject one fault that must fail exactly this gate")
    args = p.parse_args(argv)
    if args.device == "cuda" and not cuda:
        p.error("--device cuda asked for, but torch sees no CUDA device")
    args.size = args.size or ("0.5b" if args.device == "cuda" else "tiny")
    args.tests = args.fault == "tests" or (args.tests if args.tests is not None else args.size != "1.5b")
    args.out = Path(args.out or f"runs/gpu-check/{args.size}")
    args.device = torch.device(args.device)
    return args


def check_config(size: str, prompt_format: str) -> rlino.Config:
    """The paper's settings (rlino's cuda preset, whatever the device), shrunk for the tiny size. The run's
    length (steps, eval_every, save_every) stays the paper's: the projection is always of one paper run."""
    cfg = rlino.resolve_config({"task": "gsm8k", "prompt_format": prompt_format}, torch.device("cuda"))
    return dataclasses.replace(cfg, **(TINY if size == "tiny" else {}))


def clock(device: torch.device) -> float:
    """Wall time in seconds, after the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


# --------------------------------------------------------------------------- forced stops
# Random weights never emit a stop token. A forward hook on the model forces stops the same way for every
# sampler: when the key of a row's last input token, (token x KEY_MIX + its position) mod V, lies in a seeded
# trigger set S (a fraction h of the V keys; never the key that ends a prompt), STOP_BOOST is added to its
# stop-token logit at the last position, so that the next token is the stop token. The position makes a row
# that repeats one token (greedy decoding of random weights does) meet a new key at every step, so a
# completion's length is geometric whatever the sampler: P(length > n) = (1 - h)^(n - 1). With h =
# HAZARD_X_CAP / max_new_tokens (2.66 / 1,024 at the paper's shape) the median is ~0.26 of the cap (267 of
# 1,024: GSM8K-like, ~260) and 7 % reach the cap (e^-2.66; the 8 % asked for would put the median at 282);
# smaller caps (tiny, the gates' calls) scale alike.
HAZARD_X_CAP = 2.66
STOP_BOOST = 100.0  # e^(100 / T) outweighs the other 151,935 tokens at every temperature used here
KEY_MIX = 1_000_003


def trigger_keys(token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    return (token * KEY_MIX + position) % VOCAB


def stop_triggers(cap: int, exclude: set[int], seed: int, device: torch.device) -> torch.Tensor:
    """(V,) bool over the keys: the trigger set S for completions of up to `cap` tokens."""
    order = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(seed))
    chosen = order[:round(VOCAB * HAZARD_X_CAP / cap)]
    trigger = torch.zeros(VOCAB, dtype=torch.bool)
    trigger[chosen] = True
    trigger[sorted(exclude)] = False
    return trigger.to(device)


def intended_lengths(cap: int) -> dict:
    """The geometric law of the forced lengths: median, p90 and the share that reaches the cap."""
    h = HAZARD_X_CAP / cap
    quantile = lambda q: min(cap, 1 + math.ceil(math.log(1 - q) / math.log(1 - h)))
    return {"median": quantile(0.5), "p90": quantile(0.9), "at_cap": (1 - h) ** (cap - 2)}


@contextlib.contextmanager
def forced_stops(model, trigger: torch.Tensor, stop_id: int):
    """While the block runs, each forward of `model` forces a stop after a trigger token: tensor ops only, so
    torch.compile traces it and it reads nothing on the host. Outputs that are not vocabulary logits (rlino's
    update runs without its LM head) are left alone."""
    def hook(module, args, kwargs, output):
        logits, ids, position = output.logits, kwargs.get("input_ids"), kwargs.get("position_ids")
        if ids is not None and position is not None and logits.shape[-1] == VOCAB:
            hit = trigger[trigger_keys(ids[:, -1], position[:, -1])]        # (n,)
            logits[:, -1, stop_id] += STOP_BOOST * hit.to(logits.dtype)
        return output

    handle = model.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def length_figures(lengths: torch.Tensor, cap: int) -> dict:
    lengths = lengths.float().cpu()
    return {"tokens": int(lengths.sum()), "median": lengths.median().item(),
            "p90": lengths.quantile(0.9).item(), "at_cap": (lengths >= cap).float().mean().item()}


def useful_lengths(completions: torch.Tensor, stop_ids: list[int]) -> torch.Tensor:
    """(N,) tokens up to and including the first stop token (T if there is none). completions: (N, T)."""
    is_stop = torch.isin(completions, torch.tensor(stop_ids, device=completions.device))
    return torch.where(is_stop.any(-1), is_stop.int().argmax(-1) + 1, completions.shape[1]).cpu()


# --------------------------------------------------------------------------- the run the phases share
@dataclasses.dataclass
class Bench:
    args: argparse.Namespace
    cfg: rlino.Config
    tokenizer: object
    task: object
    examples: list
    prompts: list          # token ids of each example's prompt
    model: object          # the fp32 policy
    sampler: object        # its bf16 copy
    ref_model: object      # the GRPO column's KL reference (beta 0.001): the initial weights, frozen in bf16
    optimizer: object
    amp: object            # bf16 autocast
    stops: dict            # stop_ids, stop_text and tokenizer, as rlino.sample takes them
    exclude: set           # keys that never trigger: those that end a prompt
    rollout: object = None  # the paper-shape rollout of rlino.sample

    def triggers(self, cap: int) -> torch.Tensor:
        return stop_triggers(cap, self.exclude, self.args.seed, self.args.device)


def setup(args) -> Bench:
    cfg = check_config(args.size, args.prompt_format)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    data_dir = tasks.resolve_data_dir(args.data_dir)
    task = tasks.get_task("gsm8k" if data_dir else "arith")
    examples = task.load("test", data_dir=data_dir, limit=max(cfg.prompts_per_step, cfg.eval_batch))
    prompts = rlino.encode_prompts(task, examples, tokenizer, cfg.prompt_format)
    config = Qwen2Config(vocab_size=VOCAB, max_position_embeddings=32768, rope_theta=1e6,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         **SHAPES[args.size])
    torch.manual_seed(args.seed)
    model = Qwen2ForCausalLM(config).to(args.device)  # random fp32 weights, drawn on the CPU
    stop_ids = rlino.stop_token_ids(tokenizer, model, cfg.prompt_format)
    if args.device.type == "cuda":  # as rlino.train does
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return Bench(args, cfg, tokenizer, task, examples, prompts, model, rlino.sampler_model(model, "bfloat16"),
                 rlino.frozen(deepcopy(model), "bfloat16"), rlino.make_optimizer(model, cfg), rlino.autocast(args.device, cfg),
                 dict(stop_ids=stop_ids, stop_text=rlino.completion_stop_text(tokenizer, cfg),
                      tokenizer=tokenizer), {(p[-1] * KEY_MIX + len(p) - 1) % VOCAB for p in prompts})


# --------------------------------------------------------------------------- the samplers
def rlino_sample(model, prompts, *, stops: dict, max_new_tokens: int, group_size: int = 1,
                 temperature: float = 0.0, seed: int = 0, amp=rlino.NO_AMP):
    device = next(model.parameters()).device
    generator = rlino.sampler_generator(seed, 0, 0, device) if temperature > 0 else None
    return rlino.sample(model, prompts, max_new_tokens=max_new_tokens, group_size=group_size,
                        temperature=temperature, generator=generator, amp=amp, **stops)


def generate(model, prompts, *, stop_ids: list[int], max_new_tokens: int, group_size: int = 1,
             temperature: float = 0.0, static: bool = False, **extra):
    """model.generate as TRL calls it (sampling at T, top-p 1, no top-k, G return sequences, stopping at the
    stop ids; a dynamic cache), or with static=True transformers' fast path: a static cache and the decode
    step under torch.compile (by default on CUDA; on a CPU only when asked, as here). Returns the (N, T)
    completions and generate's output."""
    device = next(model.parameters()).device
    ids, mask = (x.to(device) for x in rlino.left_pad(prompts, stop_ids[0]))  # (B, P)
    sampling = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if temperature > 0 else \
        dict(do_sample=False)
    if static:
        compile_config = CompileConfig() if device.type == "cuda" else CompileConfig(mode="default")
        compile_config._compile_all_devices = device.type != "cuda"
        extra.update(cache_implementation="static", compile_config=compile_config)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             num_return_sequences=group_size, eos_token_id=stop_ids,
                             pad_token_id=stop_ids[0], **sampling, **extra)
    return (out.sequences if hasattr(out, "sequences") else out)[:, ids.shape[1]:], out


def paper_batch(b: Bench, sampler: str) -> dict:
    """One sampler call at the paper's shape (B prompts x G, up to T new tokens, at T) on the bf16 copy,
    stops forced: the realised lengths. The rlino rollout is kept for the phases after it."""
    cfg, stop_ids = b.cfg, b.stops["stop_ids"]
    shape = dict(max_new_tokens=cfg.max_new_tokens, group_size=cfg.group_size, temperature=cfg.temperature)
    torch.manual_seed(b.args.seed)
    with forced_stops(b.sampler, b.triggers(cfg.max_new_tokens), stop_ids[0]):
        if sampler == "rlino":
            b.rollout = rlino_sample(b.sampler, b.prompts[:cfg.prompts_per_step], stops=b.stops, amp=b.amp,
                                     seed=b.args.seed, **shape)
            return length_figures(b.rollout.lengths, cfg.max_new_tokens)
        completions = generate(b.sampler, b.prompts[:cfg.prompts_per_step], stop_ids=stop_ids,
                               static=sampler == "static", **shape)[0]
        return length_figures(useful_lengths(completions, stop_ids), cfg.max_new_tokens)


# --------------------------------------------------------------------------- gates
def greedy_gate(b: Bench, tie: float = 1e-3) -> dict:
    """rlino.sample's greedy rows against generate's on the fp32 policy (TF32 off, no autocast), stops forced.
    Where a row first differs it is a tie, not a failure, only if generate's top-2 logit gap there is below
    `tie`."""
    n, cap = GATE_CALLS["greedy"][b.args.size]
    model, prompts, stop_ids = b.model.eval(), b.prompts[:n], b.stops["stop_ids"]
    trigger = b.triggers(cap)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with forced_stops(model, trigger, stop_ids[0]):
            with wrong_token_fault(model) if b.args.fault == "greedy" else contextlib.nullcontext():
                ours = rlino_sample(model, prompts, stops=dict(stop_ids=stop_ids), max_new_tokens=cap)
            theirs, out = generate(model, prompts, stop_ids=stop_ids, max_new_tokens=cap, output_logits=True,
                                   return_dict_in_generate=True)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = b.args.device.type == "cuda"
    their_lengths, equal, ties, differ = useful_lengths(theirs, stop_ids), 0, 0, []
    for row in range(n):
        mine = ours.completion_ids[row, :int(ours.lengths[row])].tolist()
        reference = theirs[row, :int(their_lengths[row])].tolist()
        if mine == reference:
            equal += 1
            continue
        k = next((i for i, pair in enumerate(zip(mine, reference)) if pair[0] != pair[1]),
                 min(len(mine), len(reference)))                           # where the row first differs
        top2 = out.logits[k][row].float().topk(2).values if k < len(out.logits) else None
        gap = math.inf if top2 is None else float(top2[0] - top2[1])
        ties += gap < tie
        differ += [] if gap < tie else [{"row": row, "position": k, "top2_gap": gap}]
    return {"passed": not differ, "rows": n, "equal": equal, "cut_at_a_tie": ties, "tie_tolerance": tie,
            "differ": differ[:4], "left_the_batch": int((ours.lengths < cap).sum()), "new_tokens": cap}


@contextlib.contextmanager
def wrong_token_fault(model):
    """--break greedy: each decode step (one input position) sees the token after the one it was given."""
    def pre_hook(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] == 1:
            kwargs["input_ids"] = (ids + 1) % VOCAB
        return args, kwargs

    handle = model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu")


@contextlib.contextmanager
def counted_syncs(device: torch.device, count: list):
    """Appends to `count` the device-to-host syncs of the block: on CUDA the warnings of
    torch.cuda.set_sync_debug_mode("warn"); on a CPU, which has none, the host reads that would be syncs on
    CUDA (HOST_READS of any tensor)."""
    if device.type == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode("default")
        count.append(sum("synchroniz" in str(w.message) for w in caught))
        return
    reads, own = [0], {name: torch.Tensor.__dict__.get(name) for name in HOST_READS}
    for name in HOST_READS:
        def counting(self, *args, _real=getattr(torch.Tensor, name), **kwargs):
            reads[0] += 1
            return _real(self, *args, **kwargs)
        setattr(torch.Tensor, name, counting)
    try:
        yield
    finally:
        for name, method in own.items():  # put back: the class's own method, or none (inherited)
            setattr(torch.Tensor, name, method) if method is not None else delattr(torch.Tensor, name)
        count.append(reads[0])


# Allowed per sampler call besides one per look: the prefill's host-to-device copies (prompt ids and mask, the
# stop ids, the prefill's index), the final read of the longest length, and 3 more.
PER_CALL_SYNCS = 8


def syncs_gate(b: Bench) -> dict:
    """Device-to-host syncs of one rlino.sample call (bf16 copy, G samples at T, stops forced): at most one
    per look (every CHECK_EVERY decode tokens, and at the last) + PER_CALL_SYNCS. Decode steps = forwards - 1.
    --break syncs: one .item() more per forward."""
    n, cap = GATE_CALLS["syncs"][b.args.size]
    device, count, forwards = b.args.device, [], [0]
    every = rlino.CHECK_EVERY.get(device.type, rlino.CHECK_EVERY["cuda"])
    hooks = [b.sampler.register_forward_pre_hook(lambda *a: forwards.__setitem__(0, forwards[0] + 1))]
    if b.args.fault == "syncs":
        def extra_read(module, args, output):
            output.logits.sum().item()
        hooks.append(b.sampler.register_forward_hook(extra_read))
    try:
        with forced_stops(b.sampler, b.triggers(cap), b.stops["stop_ids"][0]), counted_syncs(device, count):
            rollout = rlino_sample(b.sampler, b.prompts[:n], stops=b.stops, max_new_tokens=cap,
                                   group_size=b.cfg.group_size, temperature=b.cfg.temperature, amp=b.amp)
    finally:
        for hook in hooks:
            hook.remove()
    steps = forwards[0] - 1
    allowed = math.ceil(steps / every) + 1 + PER_CALL_SYNCS
    return {"passed": count[0] <= allowed, "syncs": count[0], "decode_steps": steps, "allowed": allowed,
            "syncs_per_token": count[0] / max(steps, 1), "check_every": every,
            "lengths": length_figures(rollout.lengths, cap),
            "counted": "sync debug mode" if device.type == "cuda" else "host reads " + "/".join(HOST_READS)}


# The logprobs gate's tolerance, stated before any run. bf16 keeps 8 significant bits: a rounding moves a
# value by at most u = 2^-8 of itself, u / sqrt(3) rms. The sampler (bf16 weights, residual stream, LM head
# and logits) and the update (the same bf16-rounded weights in its matmuls under autocast, but an fp32
# residual stream and an fp32 LM head) part by the sampler's roundings of the residual stream at its 2L adds,
# of the final norm's output, of the head's weights and of the logits: 2L + 3 roundings, each relative to the
# size of what it rounds, so a logit is off by ~ sigma u sqrt((2L + 3) / 3) rms, sigma the logits' std. A
# log-prob at temperature T moves with the drawn token's logit / T (the log-sum-exp's error averages out over
# the vocabulary): rms ~ s u sqrt((2L + 3) / 3), s = sigma / T, measured. We allow twice that for the mean
# |diff| (errors also travel through the later layers, which the count ignores) and ten times for the max
# (the tail of ~1e5 draws reaches ~4.5 rms). Forced stop tokens are left out: the hook acts on the sampler.
LOGPROB_MEAN_X, LOGPROB_MAX_X, BF16_U = 2.0, 10.0, 2.0 ** -8


def logprobs_gate(b: Bench) -> dict:
    """Every drawn token's sampler log-prob (Rollout.sampler_logprobs) against the update's: rlino's
    rollout_logprobs on the fp32 policy under bf16 autocast at the sampling temperature. --break logprobs:
    the sampler's log-probs moved by 0.5."""
    rollout, cfg = b.rollout, b.cfg
    sampler_logprobs = rollout.sampler_logprobs + 0.5 * (b.args.fault == "logprobs") * rollout.completion_mask
    update = rlino.rollout_logprobs(b.model, rollout, micro_batch=cfg.micro_batch,
                                    temperature=cfg.temperature, amp=b.amp)  # (N, T)
    previous = torch.cat([rollout.prompt_ids[:, -1:], rollout.completion_ids[:, :-1]], dim=1)  # (N, T)
    position = rollout.prompt_mask.sum(-1, keepdim=True) - 1 + torch.arange(previous.shape[1],
                                                                             device=previous.device)
    forced = b.triggers(cfg.max_new_tokens)[trigger_keys(previous, position)]  # the stops the hook forced
    drawn = rollout.completion_mask.bool() & ~forced
    diff = (sampler_logprobs - update)[drawn].abs()
    with torch.no_grad():                                  # s: the tempered logits' std after the prompts
        ids, mask = (x.to(b.args.device) for x in rlino.left_pad(b.prompts[:8], 0))
        logits = b.sampler(input_ids=ids, attention_mask=mask, position_ids=rlino.positions(mask)).logits
        s = (logits[:, -1].float() / cfg.temperature).std(-1).mean().item()
    rms = s * BF16_U * math.sqrt((2 * b.model.config.num_hidden_layers + 3) / 3)
    measured, allowed = (diff.mean().item(), diff.max().item()), (LOGPROB_MEAN_X * rms, LOGPROB_MAX_X * rms)
    return {"passed": measured[0] <= allowed[0] and measured[1] <= allowed[1], "tokens": diff.numel(),
            "mean_abs_diff": measured[0], "allowed_mean": allowed[0], "max_abs_diff": measured[1],
            "allowed_max": allowed[1], "logits_std_over_T": s}


# --------------------------------------------------------------------------- update, evaluation, checkpoint
def grpo_update(b: Bench, *, grad_ckpt: bool) -> dict:
    """One update as rlino.train runs it (rlino.step_targets, rlino.train_step, each halving --micro-batch on
    a CUDA out-of-memory error; then the bf16 copy refreshed), with rewards 1, 0, 1, ... so that no row is
    skipped. Gate "finite": loss, grad norm and every parameter finite after it.
    --break finite: one weight that every token meets is inf during the step, then put back."""
    cfg, model = dataclasses.replace(b.cfg), b.model  # a copy of cfg: the out-of-memory halving edits it
    rlino.set_grad_ckpt(model, grad_ckpt)
    rewards = 1.0 - (torch.arange(len(b.rollout.lengths), device=b.args.device) % 2).float()  # (N,) 1, 0, ...
    weight = model.get_decoder().layers[0].mlp.down_proj.weight
    kept, broken = weight.data[0, 0].clone(), b.args.fault == "finite" and grad_ckpt
    if broken:
        weight.data[0, 0] = math.inf
    targets, _ = rlino.halving_on_oom(cfg, "micro_batch", rlino.step_targets, model, None, b.rollout, rewards,
                                      cfg, amp=b.amp)
    stats = rlino.halving_on_oom(cfg, "micro_batch", rlino.train_step, model, b.optimizer, b.rollout, targets,
                                 cfg, amp=b.amp)
    finite = math.isfinite(stats["loss"]) and math.isfinite(stats["grad_norm"]) and \
        all(bool(torch.isfinite(p).all()) for p in model.parameters())
    if broken:
        weight.data[0, 0] = kept
    rlino.set_grad_ckpt(model, False)
    rlino.refresh_sampler(b.sampler, model)
    return {"passed": finite, "loss": stats["loss"], "grad_norm": stats["grad_norm"],
            "update_rows": stats["update_rows"], "micro_batch": cfg.micro_batch,
            "sampler_logp_diff": stats.get("sampler_logp_diff")}  # forced stop tokens included


def reference_pass(b: Bench) -> dict:
    """The frozen bf16 reference's log-probs of the rollout (GRPO's KL at beta = 0.001)."""
    rlino.rollout_logprobs(b.ref_model, b.rollout, micro_batch=b.cfg.micro_batch, temperature=b.cfg.temperature,
                           amp=b.amp)
    return {"rows": len(b.rollout.lengths)}


def evaluation_batch(b: Bench) -> dict:
    """One batch of a paper run's evaluation (rlino.evaluate on the bf16 copy, stops forced): eval_batch test
    problems, greedy and one sampled answer (T 1.0, top-p 0.95) each."""
    cfg = dataclasses.replace(b.cfg, **PAPER_EVAL)
    with forced_stops(b.sampler, b.triggers(cfg.max_new_tokens), b.stops["stop_ids"][0]):
        got, _ = rlino.evaluate(b.sampler, b.tokenizer, b.task, b.examples[:cfg.eval_batch], cfg,
                                stop_ids=b.stops["stop_ids"], amp=b.amp)
    return {k: v for k, v in got.items() if k in ("eval_n", "eval_truncated_frac", "eval_len_incorrect_p50",
                                                  "eval_len_incorrect_p90")}   # greedy answers' lengths


def checkpoint_write(b: Bench) -> dict:
    """rlino.save_checkpoint of the model and AdamW's state into a temporary folder beside OUT, flushed to the
    disk; its size in GB. The folder is removed."""
    b.args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=b.args.out) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the scheduler's "step() before optimizer.step()"
        scheduler = torch.optim.lr_scheduler.LambdaLR(b.optimizer, lambda step: 1.0)
        path = rlino.save_checkpoint(Path(tmp), 1, b.model, b.optimizer, scheduler,
                                     stream=rlino.PromptStream(1, 0), extra={}, keep=1)
        os.sync()
        return {"gb": path.stat().st_size / 1e9}


# --------------------------------------------------------------------------- projection
def projection(cfg: rlino.Config, phases: dict, parameters: int) -> dict:
    """One paper run: steps x (sampling + reference (GRPO with KL only) + update) + the evaluations (at the
    start, every eval_every steps, at the end) of the GSM8K test split in batches of eval_batch + the writes
    (a checkpoint every save_every steps and model/, each costed as a checkpoint), in minutes; a row of the
    paper's table (4 arms) in hours; and the disk a row needs. pi_old is not computed at mu = 1 (rlino skips
    it: the ratio is 1)."""
    n_evals = 1 + cfg.steps // cfg.eval_every + (cfg.steps % cfg.eval_every > 0)
    eval_batches = n_evals * math.ceil(GSM8K_TEST_PROBLEMS / cfg.eval_batch)
    times = {"sampling": ("rlino.sample", cfg.steps), "reference": ("reference", cfg.steps),
             "update (grad_ckpt)": ("update (grad_ckpt)", cfg.steps),
             "update (no_ckpt)": ("update (no_ckpt)", cfg.steps), "evaluation": ("evaluation", eval_batches),
             "writes": ("checkpoint", cfg.steps // cfg.save_every + 1)}
    done = {name: p["s"] for name, p in phases.items() if not p["error"]}
    minutes = {k: done[name] * n / 60 if name in done else None for k, (name, n) in times.items()}
    runs = {}
    for update in ("update (grad_ckpt)", "update (no_ckpt)"):
        parts = [minutes[k] for k in ("sampling", update, "evaluation", "writes")]
        nokl = None if None in parts else sum(parts)
        grpo = None if nokl is None or minutes["reference"] is None else nokl + minutes["reference"]
        runs[update] = {"grpo_min": grpo, "nokl_min": nokl,
                        "row_h": grpo and (grpo + (len(PAPER_ARMS) - 1) * nokl) / 60}
    disk, gb = None, phases.get("checkpoint", {}).get("gb")
    if gb:  # while an arm runs: its kept checkpoints and the one being written; after it: model/ (and more)
        model_gb = 4 * parameters / 1e9
        after = model_gb + (cfg.keep_checkpoints * gb if getattr(cfg, "final_checkpoint", True) else 0)
        disk = {"checkpoint_gb": gb, "model_gb": model_gb, "kept": cfg.keep_checkpoints,
                "row_peak_gb": (len(PAPER_ARMS) - 1) * after + (cfg.keep_checkpoints + 1) * gb,
                "row_after_gb": len(PAPER_ARMS) * after}
    return {"steps": cfg.steps, "evaluations": n_evals, "minutes": minutes, "runs": runs, "disk": disk}


# --------------------------------------------------------------------------- report
def machine_info(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "cpu_count": os.cpu_count(), "device": str(device),
            "check_every": rlino.CHECK_EVERY}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {**info, "device_name": props.name, "memory_gib": props.total_memory / 2**30}
    return {**info, "device_name": platform.processor() or platform.machine(),  # the device is the host
            "memory_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30}


def fmt(x, spec=".1f") -> str:
    return "-" if x is None else format(x, spec)


def markdown(r: dict) -> str:
    m, s, phases = r["machine"], r.get("sizes", {}), r["phases"]
    lines = [f"rlino gpu check, size {r['size']}: {m['device_name']} ({m['device']}), torch {m['torch']}, "
             f"transformers {m['transformers']}" + (f", {s['parameters'] / 1e6:.0f}M parameters, {r['task']} "
             f"prompts ({s['prompt_format']}), {s['prompts']} x {s['group_size']} rows, up to "
             f"{s['max_new_tokens']} new tokens" if s else ""), "",
             "| phase | estimate min (H100) | seconds | peak GiB | error |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {name} | {fmt(p['estimate_min'], '.2f')} | {p['s']:.1f} | {fmt(p['peak_gib'])} | "
              f"{p['error'] or ''} |" for name, p in phases.items()]
    samplers = {k: phases[k] for k in ("rlino.sample", "generate", "generate-static (compiles)",
                                       "generate-static") if k in phases and not phases[k]["error"]}
    speed = {k: p["tokens"] / p["s"] for k, p in samplers.items()}
    ours = speed.get("rlino.sample")
    ratio = {k: ours / v for k, v in speed.items() if ours and k != "rlino.sample"}  # rlino's / another's
    if s:
        want = r["intended_lengths"]
        lines += ["", "| sampler (bf16 copy, stops forced) | seconds | useful tok/s | rlino / this | "
                  "median | p90 | at cap |", "| --- | --- | --- | --- | --- | --- | --- |",
                  f"| intended (geometric) | | | | {want['median']} | {want['p90']} | {want['at_cap']:.1%} |"]
        lines += [f"| {k} | {p['s']:.1f} | {speed[k]:,.0f} | {fmt(ratio.get(k), '.2f')} | "
                  f"{p['median']:.0f} | {p['p90']:.0f} | {p['at_cap']:.1%} |" for k, p in samplers.items()]
    if "generate" in ratio:
        lines.append(f"\nrlino / generate: {ratio['generate']:.2f}x useful tokens/s")
    lines += ["", "| gate | result | detail |", "| --- | --- | --- |"]
    for name, g in r["gates"].items():
        detail = ", ".join(f"{k} {fmt(v, '.3g') if isinstance(v, float) else v}" for k, v in g.items()
                           if k != "passed" and not isinstance(v, (dict, list)))
        lines.append(f"| {name} | {'pass' if g['passed'] else '**FAIL**'} | {detail} |")
    lines += [f"| {name} | not run | |" for name in GATES if name not in r["gates"]]
    if r.get("projection"):
        pr, q = r["projection"], r["projection"]["minutes"]
        lines += ["", f"One paper run, projected: {pr['steps']} steps, {pr['evaluations']} evaluations of "
                  f"{GSM8K_TEST_PROBLEMS:,} problems (greedy + 1 sampled); pi_old is not computed at mu = 1.",
                  "", "| update | sampling | reference | update | evaluation | writes | GRPO+KL run | no-KL "
                  "run | row of 4 arms |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {key} | {fmt(q['sampling'])} min | {fmt(q['reference'])} min | {fmt(q[key])} min | "
                  f"{fmt(q['evaluation'])} min | {fmt(q['writes'])} min | {fmt(a['grpo_min'])} min | "
                  f"{fmt(a['nokl_min'])} min | {fmt(a['row_h'], '.2f')} h |" for key, a in pr["runs"].items()]
        if pr["disk"]:
            d = pr["disk"]
            lines.append(f"\nDisk: a checkpoint {d['checkpoint_gb']:.2f} GB, model/ {d['model_gb']:.2f} GB, "
                         f"{d['kept']} kept while a run goes: a row of 4 arms needs {d['row_peak_gb']:.1f} "
                         f"GB at its peak and keeps {d['row_after_gb']:.1f} GB.")
    lines.append(f"\nWall time of the check: {r['wall_s']:.0f} s.")
    if r["size"] == "tiny":
        lines.append("Tiny size: these figures check that the code runs, not what the machine can do.")
    return "\n".join(lines) + "\n"


class Check:
    """The results, phase by phase; written after each phase."""

    def __init__(self, args):
        self.args, self.start, self.cfg = args, time.perf_counter(), None
        self.r = {"machine": machine_info(args.device), "size": args.size, "fault": args.fault,
                  "phases": {}, "gates": {}}

    def run(self, name: str, work, *, gate: str | None = None):
        """work()'s result (None if it raised: recorded, and its gate failed), timed, its figures recorded."""
        size, device = self.args.size, self.args.device
        estimate = None if size == "tiny" else ESTIMATE_MIN[name][("0.5b", "1.5b").index(size)]
        print(f"[{name}] estimated {fmt(estimate, '.2f')} min on an H100 ...", flush=True)
        result, error = None, None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = clock(device)
        try:
            result = work()
        except Exception as err:  # recorded; the check goes on
            traceback.print_exc()
            error = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:160]}"
        seconds = clock(device) - t0
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        figures = result if isinstance(result, dict) and not gate else {}
        self.r["phases"][name] = {"estimate_min": estimate, "s": seconds, "peak_gib": peak, "error": error,
                                  **figures}
        print(f"[{name}] {seconds:.1f} s" + (f", peak {peak:.1f} GiB" if peak else "") +
              (f", FAILED: {error}" if error else ""), flush=True)
        if gate:
            self.r["gates"][gate] = result if result is not None else {"passed": False, "error": error}
            g = self.r["gates"][gate]
            print(f"  gate {gate}: {'pass' if g['passed'] else 'FAIL'}  {json.dumps(g, default=str)[:400]}")
        self.write()
        return result

    def memory_gate(self) -> dict:
        """Every phase's peak below the device's memory; on a CPU the process's peak resident memory against
        the host's. --break memory: the device has 0.01 GiB."""
        total = 0.01 if self.args.fault == "memory" else self.r["machine"]["memory_gib"]
        host_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        peaks = [p["peak_gib"] for p in self.r["phases"].values() if p["peak_gib"] is not None] \
            if self.args.device.type == "cuda" else [host_peak]
        return {"passed": max(peaks, default=0) < total, "device_gib": total, "largest_peak_gib": max(peaks),
                "measured": "max_memory_allocated" if self.args.device.type == "cuda" else "host peak RSS"}

    def write(self) -> None:
        r = self.r
        r["wall_s"] = time.perf_counter() - self.start
        r["gates"].pop("memory", None)
        r["gates"]["memory"] = self.memory_gate()  # last: it reads every phase
        if self.cfg is not None:
            r["projection"] = projection(self.cfg, r["phases"], r["sizes"]["parameters"])
        self.args.out.mkdir(parents=True, exist_ok=True)
        (self.args.out / "gpu_check.json").write_text(json.dumps(r, indent=2, default=str) + "\n")
        (self.args.out / "gpu_check.md").write_text(markdown(r))

    def finish(self) -> dict:
        """The last write, the tables, and the line that names the failed gates."""
        self.write()
        failed = [name for name, g in self.r["gates"].items() if not g["passed"]]
        self.r["failed_gates"] = failed + ([] if self.cfg else ["setup (nothing else ran)"])
        self.write()
        print("\n" + markdown(self.r) + f"\nwrote {self.args.out / 'gpu_check.json'} and gpu_check.md")
        print(f"gpu check: FAILED gates: {', '.join(self.r['failed_gates'])}" if self.r["failed_gates"] else
              "gpu check: all gates passed", flush=True)
        return self.r


# --------------------------------------------------------------------------- main
def run_tests(device: str, broken: bool, out: Path) -> dict:
    """pytest -k <device> on test_rlino.py (this check's own test left out: it would run the check again),
    its output kept in OUT/pytest.txt. --break tests: one injected failing test instead. Exit 5 (nothing
    selected) passes, and says so."""
    with tempfile.TemporaryDirectory() as tmp:
        target = [str(ROOT / "test_rlino.py"), "-k", f"{device} and not gpu_check"]
        if broken:
            (Path(tmp) / "test_injected.py").write_text(f"def test_{device}_fault():\n    assert False\n")
            target = [str(Path(tmp) / "test_injected.py")]
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *target],
                              cwd=ROOT, capture_output=True, text=True)
    output = (proc.stdout + proc.stderr).strip()
    out.mkdir(parents=True, exist_ok=True)
    (out / "pytest.txt").write_text(output + "\n")
    print("\n".join(line for line in output.splitlines()[:-1] if line.startswith(("FAILED", "ERROR"))) +
          "\n" + output.splitlines()[-1], flush=True)
    counts = {k: int(m.group(1)) if (m := re.search(rf"(\d+) {k}", output)) else 0
              for k in ("passed", "failed", "error", "skipped")}
    return {"passed": proc.returncode in (0, 5), "exit": proc.returncode,
            "nothing_selected": proc.returncode == 5, **{f"tests_{k}": v for k, v in counts.items()}}


def main(argv=None) -> dict:
    args = parse_args(argv)
    check = Check(args)
    if args.tests:
        check.run("tests", lambda: run_tests(args.device.type, args.fault == "tests", args.out), gate="tests")
    b = check.run("setup", lambda: setup(args))
    if b is None:
        return check.finish()
    cfg = check.cfg = b.cfg
    check.r.update(task=b.task.name, config=dataclasses.asdict(cfg), intended_lengths=intended_lengths(
        cfg.max_new_tokens), sizes={"prompts": cfg.prompts_per_step, "group_size": cfg.group_size,
        "max_new_tokens": cfg.max_new_tokens, "micro_batch": cfg.micro_batch, "eval_batch": cfg.eval_batch,
        "prompt_format": cfg.prompt_format, "parameters": sum(p.numel() for p in b.model.parameters()),
        **SHAPES[args.size]})
    print(f"gpu check: {check.r['sizes']['parameters'] / 1e6:.0f}M-parameter Qwen2-shaped model on "
          f"{args.device}, {b.task.name} prompts; forced lengths: {check.r['intended_lengths']}", flush=True)

    def warm_up():  # one-time costs (allocator, kernels, AdamW's state) fall outside the timings
        small = dict(max_new_tokens=8, group_size=2, temperature=cfg.temperature)
        b.rollout = rlino_sample(b.sampler, b.prompts[:2], stops=b.stops, amp=b.amp, **small)
        generate(b.sampler, b.prompts[:2], stop_ids=b.stops["stop_ids"], **small)
        grpo_update(b, grad_ckpt=False)
    check.run("warm-up", warm_up)
    check.run("greedy", lambda: greedy_gate(b), gate="greedy")
    b.rollout = None
    check.run("rlino.sample", lambda: paper_batch(b, "rlino"))
    check.run("generate", lambda: paper_batch(b, "generate"))
    check.run("syncs", lambda: syncs_gate(b), gate="syncs")
    if b.rollout is not None:  # the phases on rlino's paper-shape rollout
        check.run("logprobs", lambda: logprobs_gate(b), gate="logprobs")
        check.run("reference", lambda: reference_pass(b))
        check.run("update (grad_ckpt)", lambda: grpo_update(b, grad_ckpt=True), gate="finite")
        check.run("update (no_ckpt)", lambda: grpo_update(b, grad_ckpt=False))
    check.run("evaluation", lambda: evaluation_batch(b))
    check.run("checkpoint", lambda: checkpoint_write(b))
    check.run("generate-static (compiles)", lambda: paper_batch(b, "static"))
    check.run("generate-static", lambda: paper_batch(b, "static"))
    return check.finish()


if __name__ == "__main__":
    sys.exit(1 if main()["failed_gates"] else 0)
