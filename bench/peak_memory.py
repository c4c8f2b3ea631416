"""peak_memory.py — how much memory does one GRPO step take at a big vocabulary?

Run it (from the repository root, in the venv; offline, about a minute on 2 CPU cores):
    python bench/peak_memory.py                  # 16 x 128 completion tokens, Qwen's 151,936-token vocabulary
    python bench/peak_memory.py --vocab 49152    # SmolLM2's

A Llama of hidden size 64 and 2 layers (random weights, seeded) with the vocabulary asked for, so that almost
all the memory of the step is what the LM head's logits take. One rlino.train_step call (the GRPO step of
rlino.train, fp32, beta > 0, so that the reference's log-probs are computed too) over 16 completions of 128
tokens after prompts of 32 tokens, in one micro-batch, advantages +1, -1, ... so that no row is skipped.
Prints the resident set before the step and its peak (the process's high-water mark, ru_maxrss) in GB.
"""
from __future__ import annotations

import argparse
import dataclasses
import resource
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # rlino.py lives one folder up
import rlino  # noqa: E402


def resident_gb() -> float:
    """The resident set now (Linux: /proc/self/statm), in GB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 1e9


def peak_gb() -> float:
    """The process's peak resident set so far (ru_maxrss is in KB on Linux), in GB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1e3 / 1e9


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description="peak memory of one GRPO step at a big vocabulary")
    p.add_argument("--vocab", type=int, default=151936, help="vocabulary size (default: Qwen2.5's)")
    p.add_argument("--rows", type=int, default=16, help="completions in the one micro-batch")
    p.add_argument("--tokens", type=int, default=128, help="tokens per completion")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model, ref_model = LlamaForCausalLM(config), LlamaForCausalLM(config).eval().requires_grad_(False)
    ref_model.load_state_dict(model.state_dict())
    n, prompt_tokens = args.rows, 32
    fields = dict(prompt_ids=torch.randint(3, args.vocab, (n, prompt_tokens)),
                  prompt_mask=torch.ones(n, prompt_tokens, dtype=torch.long),
                  completion_ids=torch.randint(3, args.vocab, (n, args.tokens)),
                  completion_mask=torch.ones(n, args.tokens), lengths=torch.full((n,), args.tokens),
                  truncated=torch.ones(n, dtype=torch.bool), entropy=torch.ones(n),
                  sampler_logprobs=torch.zeros(n, args.tokens))
    rollout = rlino.Rollout(**{f.name: fields[f.name] for f in dataclasses.fields(rlino.Rollout)})
    cfg = rlino.Config(dtype="float32", sampler_dtype="float32", max_new_tokens=args.tokens, temperature=0.6,
                       lr=1e-6, micro_batch=n, beta=0.001, grad_ckpt=False, group_size=2)
    cfg.clip_eps_high = cfg.clip_eps
    optimizer = rlino.make_optimizer(model, cfg)
    rewards = torch.tensor([1.0, 0.0]).repeat(n // 2)  # groups of 2, each mixed: advantages +-0.71
    before = resident_gb()
    targets, _ = rlino.step_targets(model, ref_model, rollout, rewards, cfg)
    stats = rlino.train_step(model, optimizer, rollout, targets, cfg)
    result = {"vocab": args.vocab, "rows": n, "tokens": args.tokens,
              "parameters_M": sum(p.numel() for p in model.parameters()) / 1e6,
              "resident_before_gb": before, "peak_gb": peak_gb(), "loss": stats["loss"]}
    print(f"one GRPO step, {n} x {args.tokens} completion tokens in one micro-batch, vocabulary {args.vocab} "
          f"({result['parameters_M']:.1f}M parameters, fp32, beta {cfg.beta}): resident {before:.2f} GB "
          f"before, peak {result['peak_gb']:.2f} GB")
    return result


if __name__ == "__main__":
    main()
