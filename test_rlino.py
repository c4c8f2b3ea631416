"""Tests for rlino: the math on hand-made tensors and tiny models built from a config (no download), the
verifiers on tables of right, wrong, tricky and adversarial answers, and the real data when RLINO_DATA_DIR
is set.

    pytest test_rlino.py                               # CI sets RLINO_DATA_DIR=../shared/data
    pytest test_rlino.py -k "equals or byte_for_byte or bit_for_bit or ppo_with"   # the proofs

The proofs: what a reader of the paper's argument checks first.
    test_grpo_gradient_equals_fisft_pm_gradient         GRPO = F-ISFT+-, gradient by gradient (mu 1, beta 0)
    test_a_fisft_pm_run_is_the_grpo_run_byte_for_byte   the same over a whole run: samples, metrics, weights
    test_seq_aggregation_makes_long_answers_cheap_per_token   the length argument's weights (--loss-agg)
    test_ppo_with_a_zero_critic_and_lambda_1_is_fisft   PPO reduces to F-ISFT where assumption (2) holds,
    test_ppo_with_a_critic_is_no_per_sample_weighting   and does not where it breaks (a critic, lambda < 1)
    test_gradient_equals_trls_formula_at_the_sampling_temperature   the update = TRL's formula at T = 0.6
    test_sampler_greedy_equals_generate                 the sampler = model.generate, greedy, row for row
    test_two_processes_equal_one_process                1 rank = 2 ranks
    test_resume_continues_bit_for_bit                   a resumed run = the run straight through
They come first, after the tiny models they run on. Then, section by section: (a) advantages, (b) the
reduction and PPO, (c) clipping and KL, (d) the sampler, (e) main() end to end and where a completion ends,
(f) the embedded model, evaluation, checkpoints and resume, faults, the command line, data parallel, the
tasks (verifiers, data).
"""
import contextlib
import dataclasses
import functools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.checkpoint import checkpoint
from hypothesis import HealthCheck, given, settings, strategies as st
from transformers import DynamicCache

import rlino
import tasks
from tasks import DataError, generate_countdown, get_task, math_equal, solve_countdown

HERE = Path(__file__).parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")


# --------------------------------------------------------------------------- tiny models
CHARS = [chr(c) for c in range(32, 127)] + ["\n"]
SPECIALS = ["<unk>", "<s>", "<|im_end|>", "<|im_start|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Llama 3.2's template in short: a system header that writes today's date unless date_string is given, turns
# that end with <|eot_id|>
LLAMA3_TEMPLATE = ("{{ bos_token }}{% if date_string is not defined %}{% if strftime_now is defined %}"
                   "{% set date_string = strftime_now('%d %b %Y') %}"
                   "{% else %}{% set date_string = '26 Jul 2024' %}{% endif %}{% endif %}"
                   "<|start_header_id|>system<|end_header_id|>\n\nToday Date: {{ date_string }}<|eot_id|>"
                   "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                   "{{ m['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
# Tokenizers built like the real ones (special tokens, bos, eos, chat template): the embedded SmolLM2's EOS is
# its end of turn; a Qwen2.5 base model's EOS is <|endoftext|> while its template ends a turn with <|im_end|>;
# Llama 3 stops at <|end_of_text|> and ends a turn with <|eot_id|>.
FLAVOURS = {
    "smollm2": (SPECIALS, "<s>", "<|im_end|>", CHAT_TEMPLATE),
    "qwen2.5-base": (["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|endoftext|>",
                     CHAT_TEMPLATE),
    "llama3": (["<unk>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|eot_id|>"], "<|begin_of_text|>", "<|end_of_text|>", LLAMA3_TEMPLATE)}


def make_tiny_model(folder: Path, seed: int = 0, layers: int = 2, flavour: str = "smollm2",
                    always: str | None = None) -> Path:
    """A random 2-layer Llama with a character-level tokenizer (about 100 tokens) of the given flavour, saved
    like a hub model; `always`: the token that the model then always emits next (see always_emits)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials, bos, eos, template = FLAVOURS[flavour]
    vocab = {token: i for i, token in enumerate(specials + CHARS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    others = [t for t in specials if t not in ("<unk>", bos, eos)]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token=bos,
                                        eos_token=eos, pad_token=eos, additional_special_tokens=others)
    tokenizer.chat_template = template
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, bos_token_id=vocab.get(bos), eos_token_id=vocab[eos],
                         pad_token_id=vocab[eos], tie_word_embeddings=always is None)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if always is not None:
        always_emits(model, vocab[always])
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@torch.no_grad()
def always_emits(model, token_id: int) -> None:
    """Rig a tiny Llama (untied head) so that its next token is always token_id, by a margin of hundreds of
    logits: hidden unit 0 holds a constant that no layer changes, the final norm keeps only that unit, and
    only token_id's row of the head reads it."""
    model.get_input_embeddings().weight[:, 0] = 100.0
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight[0] = 0.0
        layer.mlp.down_proj.weight[0] = 0.0
    model.model.norm.weight.zero_()
    model.model.norm.weight[0] = 1.0
    model.lm_head.weight.zero_()
    model.lm_head.weight[token_id, 0] = 50.0


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


# The math and sampler tests run on every device here: the CPU, and CUDA when torch sees one
# (./run.sh gpu-check).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="no CUDA device"))]


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


@pytest.fixture()
def tiny(tiny_dir, device):
    """The tiny model and its tokenizer, on `device`."""
    return rlino.load_model(str(tiny_dir), device)


def resolved(**overrides) -> rlino.Config:
    """A config as main() would see it on a CPU, with these fields set (CPU preset: temperature 0.8); fp32
    unless asked otherwise, whatever this CPU's bf16 support."""
    fields = {"dtype": "float32", "sampler_dtype": "float32", **overrides}
    return rlino.resolve_config(fields, torch.device("cpu"))


def random_rollout(n_prompts=3, group_size=4, vocab=100, seed=0, device="cpu") -> rlino.Rollout:
    """A hand-made rollout: prompts of different lengths, completions of different lengths."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(4, vocab, (5 + 3 * i,), generator=g).tolist() for i in range(n_prompts)]
    prompt_ids, prompt_mask = rlino.left_pad(prompts, 2)
    n = n_prompts * group_size
    lengths = torch.randint(2, 12, (n,), generator=g)
    width = int(lengths.max())
    completion_ids = torch.randint(4, vocab, (n, width), generator=g)
    completion_mask = (torch.arange(width)[None] < lengths[:, None]).float()
    fields = (prompt_ids.repeat_interleave(group_size, 0), prompt_mask.repeat_interleave(group_size, 0),
              completion_ids, completion_mask, lengths, torch.zeros(n, dtype=torch.bool), torch.ones(n),
              torch.zeros(n, width))
    return rlino.Rollout(*(x.to(device) for x in fields))


def noise(like: torch.Tensor, scale: float, seed: int) -> torch.Tensor:
    """Seeded Gaussian noise shaped and placed like `like`."""
    return scale * torch.randn(like.shape, generator=torch.Generator().manual_seed(seed)).to(like.device)


MIXED_REWARDS = torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 1, 1, 1, 1, 0])  # 3 groups of G = 4, every group mixed


@pytest.fixture()
def mixed(device):
    """random_rollout() with MIXED_REWARDS and their group advantages, on `device`."""
    rewards = MIXED_REWARDS.to(device)
    return random_rollout(device=device), rewards, rlino.group_advantages(rewards, 4)


def gradients(model) -> dict:
    """A snapshot of the parameters' gradients."""
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def parameters(model) -> list[torch.Tensor]:
    """A snapshot of the parameters."""
    return [p.detach().clone() for p in model.parameters()]


class GradientRecorder(torch.optim.SGD):
    """An optimizer that keeps the (clipped) gradient its step is given, and changes nothing."""

    def __init__(self, model):
        super().__init__(model.parameters(), lr=0.0)
        self.model = model

    def step(self, closure=None):
        self.grads = gradients(self.model)


def credit_targets(rollout, credit, cfg, *, old_logprobs=None, ref_logprobs=None) -> rlino.Targets:
    """GRPO's and F-ISFT's targets on one process: every token of a completion carries its sample's credit."""
    mask = rollout.completion_mask
    return rlino.Targets(advantages=credit[:, None] * mask,
                         weights=rlino.token_weights(mask, cfg.loss_agg, max_new_tokens=cfg.max_new_tokens),
                         old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, old_values=None, returns=None)


def gradient_of_update(model, rollout, credit, cfg, *, old_logprobs=None, ref_logprobs=None,
                       amp=rlino.NO_AMP) -> tuple[dict, dict]:
    """rlino.train_step's gradient (recorded, no parameter changes) and its statistics, every token of a
    completion carrying its sample's credit (GRPO's and F-ISFT's targets)."""
    recorder = GradientRecorder(model)
    targets = credit_targets(rollout, credit, cfg, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs)
    stats = rlino.train_step(model, recorder, rollout, targets, cfg, amp=amp)
    return recorder.grads, stats


def one_step(model, optimizer, rollout, rewards, cfg, *, ref_model=None, amp=rlino.NO_AMP) -> dict:
    """What rlino.train does with a batch of rollouts and their rewards: the targets, then the train step."""
    targets, ppo_stats = rlino.step_targets(model, ref_model, rollout, rewards, cfg, amp=amp)
    return {**rlino.train_step(model, optimizer, rollout, targets, cfg, amp=amp), **ppo_stats}


def fisft_weights(rewards) -> torch.Tensor:
    """F-ISFT+-'s sample weights w_i of MIXED_REWARDS-like groups of 4."""
    return rlino.fisft_sample_weights(rewards, rlino.group_advantages(rewards, 4), "fisft+-", "adv")


def assert_same_gradients(a: dict, b: dict, **tolerance) -> None:
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name, **tolerance)


def full_forward_logprobs(model, rollout, temperature: float) -> torch.Tensor:
    """(N, T) log-probs of the completion tokens from a plain forward over every position, at a temperature:
    log_softmax(logits / T), as TRL and verl take them. Independent of rlino's LM-head shortcut."""
    input_ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], 1)
    attention = torch.cat([rollout.prompt_mask, rollout.completion_mask.long()], 1)
    logits = model(input_ids=input_ids, attention_mask=attention,
                   position_ids=rlino.positions(attention)).logits
    P = rollout.prompt_ids.shape[1]
    logprobs = torch.log_softmax(logits[:, P - 1:-1].float() / temperature, -1)
    return logprobs.gather(-1, rollout.completion_ids[..., None])[..., 0] * rollout.completion_mask


# --------------------------------------------------------------------------- the proofs (the index above)
@pytest.mark.parametrize("loss_agg", ["seq", "token", "const"])
def test_grpo_gradient_equals_fisft_pm_gradient(tiny, mixed, loss_agg):
    """The paper's reduction: binary reward, mu = 1 (rho = 1), beta = 0 => grad J_GRPO = grad J_F-ISFT+-."""
    model, _ = tiny
    rollout, rewards, adv = mixed
    cfg = resolved(loss_agg=loss_agg, max_new_tokens=12, micro_batch=5, max_grad_norm=1e9, beta=0.0)
    grad_grpo, grpo = gradient_of_update(model, rollout, adv, cfg)
    fisft_cfg = dataclasses.replace(cfg, algo="fisft+-")
    grad_fisft, fisft = gradient_of_update(model, rollout, fisft_weights(rewards), fisft_cfg)
    assert_same_gradients(grad_grpo, grad_fisft)
    assert grpo["grad_norm"] > 0 and grpo["clip_frac"] == 0.0
    # the loss values differ; not the update
    assert fisft["grad_norm"] == pytest.approx(grpo["grad_norm"], rel=1e-5)


def test_a_fisft_pm_run_is_the_grpo_run_byte_for_byte(tiny_dir, tmp_path, monkeypatch):
    """The paper's reduction over a whole run (experiment 3 saw it over 48 steps): binary rewards, mu = 1 and
    beta = 0, and an F-ISFT+- run draws the same samples, logs the same metrics (all but the loss's value and
    the timings) and ends at the same weights as the GRPO run of the same seed."""
    from transformers import AutoModelForCausalLM
    monkeypatch.setattr(tasks.get_task("arith"), "reward", toy_reward)
    runs = {}
    for algo in ("grpo", "fisft+-"):
        out = tmp_path / algo
        rlino.main([*TINY_RUN, "--steps", "4", "--algo", algo, "--model", str(tiny_dir), "--out", str(out)])
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        timings = ("loss", "tokens_per_s", "time_sample", "time_update")  # the loss's value, and timings
        metrics = [{k: v for k, v in m.items() if k not in timings} for m in lines]
        weights = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
        runs[algo] = (out / "samples.jsonl").read_text(), metrics, weights
    (grpo_samples, grpo_metrics, grpo_weights), (samples, metrics, weights) = runs["grpo"], runs["fisft+-"]
    assert samples == grpo_samples and metrics == grpo_metrics
    assert any(m.get("update_rows", 0) > 0 for m in metrics), "no step had a group with signal"
    assert all(torch.equal(weights[name], grpo_weights[name]) for name in weights)


def test_seq_aggregation_makes_long_answers_cheap_per_token():
    """seq: weight 1/(N |o_i|), a long answer's tokens weigh less;
    token (DAPO) and const (Dr. GRPO) do not."""
    lengths = torch.tensor([10, 20, 40])
    mask = (torch.arange(40)[None] < lengths[:, None]).float()
    per_token = rlino.token_weights(mask, "seq", max_new_tokens=40)[:, 0]
    torch.testing.assert_close(per_token * lengths, torch.full((3,), 1 / 3))  # weight = 1/(N |o_i|)
    assert per_token[0] == 2 * per_token[1] == 4 * per_token[2]
    for agg in ("token", "const"):
        w = rlino.token_weights(mask, agg, max_new_tokens=40)[:, 0]
        assert torch.equal(w, w[:1].expand(3)), agg  # the same for every sequence, whatever its length
    assert rlino.token_weights(mask, "const", max_new_tokens=40)[0, 0] == 1 / (3 * 40)
    assert rlino.token_weights(mask, "token", max_new_tokens=40)[0, 0] == 1 / 70


@pytest.mark.parametrize("loss_agg", ["seq", "token", "const"])
def test_ppo_with_a_zero_critic_and_lambda_1_is_fisft(tiny, mixed, loss_agg):
    """V = 0 and lambda = 1: every token of o_i carries Ahat = whiten(r)_i (the token-level whitening of the
    rewards, computed here by hand), so PPO's gradient at mu = 1 equals F-ISFT's with w_i = whiten(r)_i on
    every parameter of the policy; the value loss reaches the value head alone."""
    model, _ = tiny
    rollout, rewards, _ = mixed
    rlino.attach_value_head(model)
    cfg = resolved(algo="ppo", gae_lambda=1.0, loss_agg=loss_agg, max_new_tokens=12, micro_batch=5,
                   max_grad_norm=1e9)
    grad_ppo, targets, stats = ppo_gradient(model, rollout, rewards, cfg)
    mask = rollout.completion_mask
    per_token = rewards[:, None].expand_as(mask)[mask.bool()]                # r_i once per token of o_i
    weights = (rewards - per_token.mean()) / (per_token.var() + 1e-8).sqrt()  # unbiased variance, as TRL
    torch.testing.assert_close(targets.advantages, weights[:, None] * mask)
    assert stats["adv_std_within_seq"] < 1e-6 and stats["value_loss"] > 0
    grad_fisft, _ = gradient_of_update(model, rollout, weights, dataclasses.replace(cfg, algo="fisft+-"))
    assert_same_gradients(policy_part(grad_ppo), policy_part(grad_fisft))
    assert grad_ppo["value_head.bias"].abs().item() > 0 and not grad_fisft["value_head.bias"].any()


@pytest.mark.parametrize("critic_std, lam", [(0.5, 1.0), (0.0, 0.5)])  # a learned V; lambda < 1
def test_ppo_with_a_critic_is_no_per_sample_weighting(tiny, mixed, critic_std, lam):
    """With a value that varies (a critic) or lambda < 1, the advantages vary along each completion, and PPO's
    policy gradient is no per-sample weighting of the F-ISFT gradients: the best one (least squares over
    w_1..w_N, each completion's gradient of sum_t weight_it log pi) leaves a residual of more than 10 % of
    its norm, where the same fit matches a zero critic with lambda = 1 to 1e-4 (measured: 0.50, 3e-7). The
    value loss does not reach the policy."""
    model, _ = tiny
    rollout, rewards, _ = mixed
    rlino.attach_value_head(model)
    mask = rollout.completion_mask

    def flat(grads: dict) -> torch.Tensor:
        return torch.cat([g.flatten() for _, g in sorted(policy_part(grads).items())]).double()

    fisft_cfg = resolved(algo="fisft+-", max_new_tokens=12, micro_batch=5, max_grad_norm=1e9)
    basis = torch.stack([flat(gradient_of_update(model, rollout, torch.eye(len(rewards))[i], fisft_cfg)[0])
                         for i in range(len(rewards))])                      # (N, parameters)

    def residual(grads: dict) -> float:
        target = flat(grads)
        weights = torch.linalg.lstsq(basis.T, target[:, None]).solution   # (N, 1)
        return ((basis.T @ weights).squeeze(-1) - target).norm().item() / target.norm().item()

    uniform, _, _ = ppo_gradient(model, rollout, rewards, dataclasses.replace(fisft_cfg, algo="ppo",
                                                                              gae_lambda=1.0))
    torch.nn.init.normal_(model.value_head.weight, std=critic_std, generator=torch.Generator().manual_seed(0))
    grads, targets, stats = ppo_gradient(model, rollout, rewards, dataclasses.replace(fisft_cfg, algo="ppo",
                                                                                      gae_lambda=lam))
    spread = [targets.advantages[i, :n].std().item() for i, n in enumerate(mask.sum(-1).long().tolist())]
    assert max(spread) > 1e-2 and stats["adv_std_within_seq"] > 1e-2  # no longer one number per completion
    print(f"critic std {critic_std}, lambda {lam}: residual of the best per-sample weighting "
          f"{residual(grads):.3f} (zero critic, lambda 1: {residual(uniform):.1e})")
    assert residual(uniform) < 1e-4 and residual(grads) > 0.1
    # the critic's loss reaches the value head alone
    without_value_loss, _, _ = ppo_gradient(model, rollout, rewards, dataclasses.replace(
        fisft_cfg, algo="ppo", gae_lambda=lam, vf_coef=0.0))
    assert_same_gradients(policy_part(without_value_loss), policy_part(grads))


@pytest.mark.parametrize("loss_agg", ["seq", "token", "const"])
def test_gradient_equals_trls_formula_at_the_sampling_temperature(tiny, mixed, loss_agg):
    """J_GRPO written as TRL writes it (log_softmax(logits / T), ratio to pi_old, clip, k3 KL, seq / token /
    const means), from a plain forward: the same gradient as rlino's micro-batched update, also with
    mu > 1."""
    model, _ = tiny
    rollout, _, adv = mixed
    cfg = resolved(loss_agg=loss_agg, temperature=0.6, max_new_tokens=12, micro_batch=5, max_grad_norm=1e9,
                   beta=0.1, clip_eps=0.1, clip_eps_high=0.15, mu=2)
    mask = rollout.completion_mask
    with torch.no_grad():
        now = full_forward_logprobs(model, rollout, 0.6)
    old = now + noise(now, 0.3, seed=1) * mask  # mu > 1
    ref = now - 0.2 * mask
    model.zero_grad()
    logprobs = full_forward_logprobs(model, rollout, 0.6)
    ratio = torch.exp(logprobs - old)
    surrogate = torch.minimum(ratio * adv[:, None], torch.clamp(ratio, 0.9, 1.15) * adv[:, None])
    per_token = -surrogate + 0.1 * (torch.exp(ref - logprobs) - (ref - logprobs) - 1)
    loss = {"seq": ((per_token * mask).sum(-1) / mask.sum(-1)).mean(),
            "token": (per_token * mask).sum() / mask.sum(),
            "const": (per_token * mask).sum() / (len(mask) * 12)}[loss_agg]
    loss.backward()
    trl = gradients(model)
    mine, stats = gradient_of_update(model, rollout, adv, cfg, old_logprobs=old, ref_logprobs=ref)
    worst = max((trl[n] - mine[n]).abs().max().item() for n in trl)
    print(f"{loss_agg}: max |grad rlino - grad TRL formula| = {worst:.2e}, "
          f"clip_frac {stats['clip_frac']:.3f}")
    assert stats["clip_frac"] > 0 and stats["kl"] > 0, "the comparison must exercise the clip and the KL"
    assert stats["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert_same_gradients(trl, mine, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("group_size", [1, 3])
def test_sampler_greedy_equals_generate(tiny, group_size, sampler_mode):
    """Greedy, every row equals generate's, also when G rows share their prompt's cache and after rows of
    other groups have stopped and left the batch, whether the sampler looks for them at every token or
    every 4."""
    model, tokenizer = tiny
    model.eval()
    prompts = [tokenizer(t)["input_ids"] for t in ["What is 2+2?", "Hi", "A longer prompt, of more tokens."]]
    ids, mask = (x.to(model.device) for x in rlino.left_pad(prompts, tokenizer.pad_token_id))
    free = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                          eos_token_id=None, pad_token_id=2)[:, ids.shape[1]:]
    stop = int(free[0, 5])  # a token the first row emits mid-way: rows stop at different times
    expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                              eos_token_id=[stop], pad_token_id=stop)[:, ids.shape[1]:]
    rollout = rlino.sample(model, prompts, max_new_tokens=16, stop_ids=[stop], group_size=group_size)
    assert rollout.lengths.min() < 16, "the test needs a row that stops early"
    for row in range(3 * group_size):
        n, reference = int(rollout.lengths[row]), expected[row // group_size]
        assert rollout.completion_ids[row, :n].tolist() == reference[:n].tolist()
        assert (rollout.completion_ids[row, n:] == stop).all()  # what a row drew after its end is cut off
        assert bool(rollout.truncated[row]) == (stop not in reference.tolist())
        assert rollout.completion_mask[row].sum() == n


@pytest.mark.parametrize("loss_agg, algorithm", [
    ("seq", ["--mu", "2", "--clip-eps", "0.02", "--beta", "0.05"]),  # mu > 1: ratios, clipping and KL
    ("token", []),
    ("seq", ["--algo", "ppo"]),  # the critic: its gradient all-reduced, the whitening over both ranks
])
def test_two_processes_equal_one_process(tiny_dir, tmp_path, loss_agg, algorithm):
    """DDP over 2 gloo ranks: the same metrics (clip_frac and kl included; PPO's value metrics) and parameters
    (PPO's value head too) as one process, in fp32 (TINY_RUN pins it)."""
    metrics, params = one_and_two_processes(tiny_dir, tmp_path, [*algorithm, "--loss-agg", loss_agg])
    for a, b in zip(metrics["one"], metrics["two"]):
        for key in ("reward_mean", "len_mean", "eval_accuracy", "eval_n"):
            assert a.get(key) == b.get(key), key
        for key in ("loss", "clip_frac", "kl", "value_loss", "explained_variance", "adv_std_within_seq"):
            assert (a.get(key) or 0) == pytest.approx(b.get(key) or 0, rel=1e-4, abs=1e-7), key
    assert all(x["grad_norm"] > 0 for x in metrics["one"][1:]), "every step must update"
    if "--beta" in algorithm:
        assert all(x["clip_frac"] > 0 and x["kl"] > 0 for x in metrics["one"][1:]), metrics["one"]
    for name in params["one"]:
        # atol: 5 % of one Adam step (lr 1e-3);
        # g / sqrt(v) magnifies the rounding of near-zero gradient entries
        torch.testing.assert_close(params["one"][name], params["two"][name], atol=5e-5, rtol=1e-4, msg=name)
    if "ppo" in algorithm:  # PPO's critic, saved beside each model
        one, two = (torch.load(tmp_path / n / "model" / "value_head.pt") for n in ("one", "two"))
        assert one["weight"].abs().sum() > 0
        for name in one:
            torch.testing.assert_close(one[name], two[name], atol=5e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_resume_continues_bit_for_bit(tiny_dir, tmp_path, monkeypatch, algo):
    """Every group mixed (an even number of reward calls per step and per evaluation keeps the alternation in
    step across the three runs), so the resumed steps update whatever tokens this machine's dtypes draw.
    PPO's value head resumes with the policy."""
    monkeypatch.setattr(tasks.get_task("arith"), "reward", alternating_reward())
    run = [*TINY_RUN, "--algo", algo, "--model", str(tiny_dir), "--steps", "4", "--eval-size", "2"]
    rlino.main([*run, "--out", str(tmp_path / "straight")])
    rlino.main([*run, "--out", str(tmp_path / "split"), "--steps", "2"])
    assert [p.name for p in rlino.checkpoint_paths(tmp_path / "split")] == ["step-2.pt"]
    rlino.main(["--resume", str(tmp_path / "split"), "--steps", "4"])
    lines = {name: [comparable(json.loads(x))
                    for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
             for name in ("straight", "split")}
    train_lines = {name: [{k: v for k, v in x.items() if not k.startswith("eval_")}
                          for x in rows if x["step"] > 0]
                   for name, rows in lines.items()}
    assert [x["step"] for x in train_lines["split"]] == [1, 2, 3, 4]
    assert train_lines["straight"] == train_lines["split"]
    assert any(x["grad_norm"] > 0 for x in train_lines["split"][2:]), "the resumed steps must update"
    straight = torch.load(rlino.checkpoint_paths(tmp_path / "straight")[-1], weights_only=False)["model"]
    resumed = torch.load(rlino.checkpoint_paths(tmp_path / "split")[-1], weights_only=False)["model"]
    assert ("value_head.weight" in straight) == (algo == "ppo")
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    with pytest.raises(SystemExit):  # a finished run is not trained again by accident
        rlino.main(["--resume", str(tmp_path / "split")])


# --------------------------------------------------------------------------- (a) advantages
def test_group_advantages_hand_computed():
    """GRPO's A_i = (r_i - mean r) / (std r + eps) per group, std with Bessel's correction (TRL's and verl's),
    and Dr. GRPO's unscaled r_i - mean r."""
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 4.0, 6.0, 8.0])
    adv = rlino.group_advantages(rewards, 4, eps=0.0)
    std2 = math.sqrt(20 / 3)  # sample std of 2, 4, 6, 8: squared deviations 9 + 1 + 1 + 9 over G - 1 = 3
    expected = torch.tensor([1.5, -0.5, -0.5, -0.5, -3 / std2, -1 / std2, 1 / std2, 3 / std2])  # std 0.5
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(rlino.group_advantages(rewards, 4, scale=False),
                               torch.tensor([0.75, -0.25, -0.25, -0.25, -3.0, -1.0, 1.0, 3.0]))


@pytest.mark.parametrize("n_correct,group_size", [(1, 4), (2, 5), (3, 4), (1, 8)])
def test_binary_advantages_closed_form(n_correct, group_size):
    """Binary rewards, a fraction p correct: A = +c sqrt((1-p)/p) for a correct sample, -c sqrt(p/(1-p))
    else, c = sqrt((G-1)/G) from the sample std."""
    p = n_correct / group_size
    c = math.sqrt((group_size - 1) / group_size)
    rewards = torch.tensor([1.0] * n_correct + [0.0] * (group_size - n_correct))
    adv = rlino.group_advantages(rewards, group_size, eps=1e-8)
    torch.testing.assert_close(adv[0], torch.tensor(c * math.sqrt((1 - p) / p)))
    torch.testing.assert_close(adv[-1], torch.tensor(-c * math.sqrt(p / (1 - p))))


def test_all_equal_group_gives_zero_not_nan():
    """A group whose rewards are all equal carries no signal: A = 0 (eps keeps it finite)."""
    adv = rlino.group_advantages(torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0]), 3)
    assert torch.equal(adv, torch.zeros(6))


def test_fisft_sample_weights():
    """F-ISFT weights under binary rewards: F-ISFT+- = A (GRPO's), F-ISFT+ / F-ISFT- keep one side;
    unit = +-1."""
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    adv = rlino.group_advantages(rewards, 4)
    assert torch.equal(rlino.fisft_sample_weights(rewards, adv, "fisft+-", "adv"), adv)
    assert torch.equal(rlino.fisft_sample_weights(rewards, adv, "fisft+", "unit"),
                       torch.tensor([1.0, 0, 0, 1]))
    assert torch.equal(rlino.fisft_sample_weights(rewards, adv, "fisft-", "unit"),
                       torch.tensor([0.0, -1, -1, 0]))
    plus = rlino.fisft_sample_weights(rewards, adv, "fisft+", "adv")
    assert (plus[[0, 3]] > 0).all() and (plus[[1, 2]] == 0).all()


@pytest.mark.parametrize("mode", ["adv", "unit"])
def test_fisft_never_pushes_a_sample_the_wrong_way(mode):
    """With a format reward (non-binary rewards), F-ISFT+ never lowers a likelihood,
    F-ISFT- never raises one."""
    # group 1: a formatted wrong answer leads
    rewards = torch.tensor([0.1, 0.0, 0.0, 0.0, 1.0, 0.1, 0.0, 0.1])
    adv = rlino.group_advantages(rewards, 4)
    assert adv[0] > 1.4  # what GRPO does: +1.50 for a wrong answer
    plus, minus, both = (rlino.fisft_sample_weights(rewards, adv, algo, mode)
                         for algo in ("fisft+", "fisft-", "fisft+-"))
    correct = rewards >= 1.0
    assert (plus >= 0).all() and (plus[~correct] == 0).all() and plus[4] > 0
    assert (minus <= 0).all() and (minus[correct] == 0).all() and (minus[[1, 2, 3, 6]] < 0).all()
    assert torch.equal(both, plus + minus) and both[0] <= 0


def test_format_reward_must_stay_below_a_correct_answer():
    """--format-reward lies in [0, 1): at 1 a well-formed wrong answer would count as correct."""
    assert resolved(format_reward=0.5).format_reward == 0.5
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(rlino.UsageError, match="format-reward"):
            resolved(format_reward=bad)


# --------------------------------------------------------------------------- (b) the paper's reduction
@pytest.mark.parametrize("loss_agg", ["seq", "token", "const"])
def test_under_bf16_autocast_grpo_still_equals_fisft_pm_and_stays_near_fp32(tiny, mixed, device, loss_agg):
    """--dtype bfloat16 (auto on CUDA and AVX512-BF16 CPUs): the reduction still holds, as both objectives
    backpropagate the same bf16 forward; and the gradient stays within 5 % (relative L2 norm, over all
    parameters) of the fp32 one: bf16 keeps 8 bits of mantissa, ~0.4 % per rounding."""
    model, _ = tiny
    rollout, rewards, adv = mixed
    cfg = resolved(loss_agg=loss_agg, max_new_tokens=12, micro_batch=5, max_grad_norm=1e9, dtype="bfloat16")
    bf16 = rlino.autocast(device, cfg)
    fisft_cfg = dataclasses.replace(cfg, algo="fisft+-")
    grad_grpo, _ = gradient_of_update(model, rollout, adv, cfg, amp=bf16)
    grad_fisft, _ = gradient_of_update(model, rollout, fisft_weights(rewards), fisft_cfg, amp=bf16)
    assert_same_gradients(grad_grpo, grad_fisft)
    grad_fp32, _ = gradient_of_update(model, rollout, adv, cfg)
    flat = {name: torch.cat([g[n].flatten() for n in sorted(g)]) for name, g in
            [("bf16", grad_grpo), ("fp32", grad_fp32)]}
    relative = ((flat["bf16"] - flat["fp32"]).norm() / flat["fp32"].norm()).item()
    print(f"bf16 autocast vs fp32 gradient ({device}, {loss_agg}): relative L2 difference {relative:.2e}")
    assert 0 < relative < 0.05  # > 0: the bf16 path really ran


# ----------------------------------------------------------------------- (b2) PPO: where the reduction breaks
def test_gae_hand_computed():
    """GAE(gamma = 1, lambda): the reward paid at the last token, delta_t = [t last] r + V_{t+1} - V_t,
    A_t = delta_t + lambda A_{t+1}, returns A + V; 0 after the end. With V = 0 and lambda = 1 every token of
    a completion gets r_i: the paper's uniform spread."""
    values = torch.tensor([[0.5, 0.2, 0.1, 0.0], [0.3, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 0, 0, 0]])
    advantages, returns = rlino.gae(values, torch.tensor([1.0, 0.0]), mask, lam=0.5)
    # row 0: deltas -0.3, -0.1, 0.9; A_2 = 0.9, A_1 = -0.1 + 0.45, A_0 = -0.3 + 0.5 * 0.35. row 1: 0 - 0.3
    torch.testing.assert_close(advantages, torch.tensor([[-0.125, 0.35, 0.9, 0], [-0.3, 0, 0, 0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.375, 0.55, 1.0, 0], [0.0, 0, 0, 0]]))
    uniform, _ = rlino.gae(torch.zeros(2, 4), torch.tensor([1.0, 0.0]), mask, lam=1.0)
    assert torch.equal(uniform, torch.tensor([[1.0, 1, 1, 0], [0, 0, 0, 0]]))


def ppo_gradient(model, rollout, rewards, cfg) -> tuple[dict, rlino.Targets, dict]:
    """PPO's gradient at mu = 1 (recorded, no parameter changes), its targets from the model's own critic,
    and the stats of both."""
    targets, stats = rlino.step_targets(model, None, rollout, rewards, cfg)
    recorder = GradientRecorder(model)
    stats |= rlino.train_step(model, recorder, rollout, targets, cfg)
    return recorder.grads, targets, stats


def policy_part(grads: dict) -> dict:
    return {n: g for n, g in grads.items() if not n.startswith("value_head.")}


@pytest.fixture(params=["avx2", "avx512-bf16"])
def cpu_kind(request, monkeypatch) -> str:
    """The hardware rule (rlino.native_bf16) forced each way, whatever this CPU is: the project's machines
    are of both kinds."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: request.param == "avx512-bf16")
    return request.param


def test_dtypes_auto_are_resolved_from_the_hardware(cpu_kind):
    """--dtype and --sampler-dtype auto: bf16 on CUDA and on CPUs with AVX512-BF16, else fp32; saved so."""
    expected = "bfloat16" if cpu_kind == "avx512-bf16" else "float32"
    cpu = rlino.resolve_config({}, torch.device("cpu"))
    assert (cpu.dtype, cpu.sampler_dtype) == (expected, expected)
    assert resolved(dtype="float32", sampler_dtype="float32").dtype == "float32"
    cuda = rlino.resolve_config({}, torch.device("cuda"))
    assert (cuda.dtype, cuda.sampler_dtype) == ("bfloat16", "bfloat16")
    assert rlino.autocast(torch.device("cpu"), resolved(dtype="float32")) is rlino.NO_AMP
    assert rlino.autocast(torch.device("cpu"), resolved(dtype="bfloat16")).fast_dtype == torch.bfloat16


def test_a_run_with_dtype_auto_takes_the_path_of_the_hardware(cpu_kind, tiny_dir, tmp_path, monkeypatch):
    """One tiny step with --dtype auto --sampler-dtype auto on each kind of CPU (forced): the update runs
    under bf16 autocast and samples from a bf16 copy exactly where the rule says so, and config.json saves
    what auto resolved to. (On an AVX2 CPU bf16 is slow, so the run is one step of one prompt.)"""
    monkeypatch.setattr(tasks.get_task("arith"), "reward", alternating_reward())
    seen = {}
    real_collect, real_train_step = rlino.collect_rollouts, rlino.train_step

    def collect(model, *args, **kwargs):
        seen["sampler"] = next(model.parameters()).dtype
        return real_collect(model, *args, **kwargs)

    def optimise(model, *args, amp, **kwargs):
        seen["update"] = getattr(amp, "fast_dtype", torch.float32)
        return real_train_step(model, *args, amp=amp, **kwargs)

    monkeypatch.setattr(rlino, "collect_rollouts", collect)
    monkeypatch.setattr(rlino, "train_step", optimise)
    out = tmp_path / "run"
    rlino.main([*TINY_RUN, "--model", str(tiny_dir), "--out", str(out), "--steps", "1", "--prompts-per-step",
                "1", "--eval-size", "2", "--dtype", "auto", "--sampler-dtype", "auto"])
    dtype = torch.bfloat16 if cpu_kind == "avx512-bf16" else torch.float32
    assert seen == {"sampler": dtype, "update": dtype}
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == config["sampler_dtype"] == str(dtype).removeprefix("torch.")


@pytest.mark.parametrize("algo", rlino.ALGOS)
def test_an_update_raises_good_samples_and_lowers_bad_ones(tiny, mixed, algo):
    """The sign of the whole thing: one small SGD step makes rewarded completions likelier, unrewarded ones
    less (PPO: with its critic at 0, the start of a run)."""
    model, _ = tiny
    rollout, rewards, adv = mixed
    cfg = resolved(algo=algo, max_new_tokens=12, max_grad_norm=1e9)
    if algo == "ppo":
        rlino.attach_value_head(model)

    def log_likelihood():
        logprobs = rlino.rollout_logprobs(model, rollout, micro_batch=12, temperature=cfg.temperature)
        return (logprobs * rollout.completion_mask).sum(-1)

    before = log_likelihood()
    targets, _ = rlino.step_targets(model, None, rollout, rewards, cfg)
    rlino.train_step(model, torch.optim.SGD(model.parameters(), lr=0.05), rollout, targets, cfg)
    change = log_likelihood() - before
    trained = targets.advantages.any(-1) | (algo == "ppo")
    assert (change[trained & (adv > 0)] > 0).all() and (change[trained & (adv < 0)] < 0).all(), change


def test_completion_logprobs_equal_a_full_forward(tiny, mixed):
    """The LM head only on the positions that predict completion tokens gives the log-probs of a plain forward
    over every position at the same temperature, and 0 after each completion's end."""
    model, _ = tiny
    rollout = mixed[0]
    for temperature in (1.0, 0.6):
        logprobs = rlino.completion_logprobs(model, rollout, temperature=temperature)        # (N, T)
        with torch.no_grad():
            torch.testing.assert_close(logprobs, full_forward_logprobs(model, rollout, temperature))
    assert (logprobs[rollout.completion_mask == 0] == 0).all() and (rollout.completion_mask == 0).any()


def test_the_lm_head_in_chunks_gives_the_same_logprobs_and_gradients(tiny, mixed, monkeypatch):
    """The LM head over chunks of 3 positions, each recomputed in the backward pass (checkpointed), gives the
    log-probs and the gradients of one chunk over every position; under bf16 autocast the head runs in
    fp32."""
    model, _ = tiny
    rollout, _, adv = mixed
    calls = []
    monkeypatch.setattr(rlino, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))

    def logprobs_and_gradients():
        model.zero_grad()
        logprobs = rlino.completion_logprobs(model, rollout, temperature=0.6)
        (logprobs * adv[:, None]).sum().backward()
        return logprobs.detach(), gradients(model)

    whole = logprobs_and_gradients()
    assert not calls  # one chunk: nothing to recompute
    monkeypatch.setattr(rlino, "HEAD_CHUNK", 3 * model.config.vocab_size)
    chunked = logprobs_and_gradients()
    assert len(calls) == math.ceil(rollout.completion_mask.sum().item() / 3)
    torch.testing.assert_close(chunked[0], whole[0], atol=1e-6, rtol=1e-6)
    # the head's weight gradient sums its positions in another order: fp32 rounding of entries up to ~10
    assert_same_gradients(chunked[1], whole[1], atol=1e-5, rtol=1e-4)
    hidden = torch.randn(5, model.config.hidden_size, device=model.device)
    targets = torch.arange(5, device=model.device)
    with torch.autocast(model.device.type, dtype=torch.bfloat16):
        autocast = rlino.head_logprobs(hidden, model.lm_head.weight, None, targets, 0.6)
    assert torch.equal(autocast, rlino.head_logprobs(hidden, model.lm_head.weight, None, targets, 0.6))


def test_micro_batching_does_not_change_the_gradient(tiny, mixed):
    """L is a sum over tokens: accumulating it over micro-batches of 1 or of 12 rows gives one gradient."""
    model, _ = tiny
    rollout, _, adv = mixed
    grads = [gradient_of_update(model, rollout, adv, resolved(max_new_tokens=12, micro_batch=size,
                                                              max_grad_norm=1e9))[0] for size in (1, 12)]
    assert_same_gradients(*grads, atol=1e-6, rtol=1e-4)


def test_gradient_checkpointing_gives_the_same_gradient(tiny, mixed):
    """--grad-ckpt recomputes activations in the backward pass: the same gradient."""
    model, _ = tiny
    rollout, _, adv = mixed
    cfg = resolved(max_new_tokens=12, micro_batch=6, max_grad_norm=1e9)
    model.train()
    plain, _ = gradient_of_update(model, rollout, adv, cfg)
    rlino.set_grad_ckpt(model, True)  # what --grad-ckpt turns on
    checkpointed, _ = gradient_of_update(model, rollout, adv, cfg)
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing  # 5.17
    assert_same_gradients(checkpointed, plain)
    rlino.set_grad_ckpt(model, False)


def test_the_sampler_and_the_update_run_on_the_gpu_machines_transformers(tiny, monkeypatch):
    """transformers 5.17 (the GPU machines') calls the forward's KV-cache argument past_key_values, not cache,
    slices logits_to_keep by an int or an index tensor only, and names gradient checkpointing
    gradient_checkpointing_*: through a forward of that signature, the greedy sampler still gives the rows of
    the real forward and the update the log-probs of a full forward. (Under 5.17 itself, on the GPU machine or
    in bench/rehearse_gpu_check.sh, the other tests run the real thing.)"""
    if rlino.cache_argument(tiny[0]) == "past_key_values":
        pytest.skip("transformers < 5.24: the real 5.17 forward runs in every other test")
    model, tokenizer = tiny
    model.eval()
    prompts = [tokenizer(t)["input_ids"] for t in ["What is 2+2?", "Hi"]]
    expected = rlino.sample(model, prompts, max_new_tokens=8, stop_ids=[2], group_size=2)
    real = model.forward

    def forward_of_5_17(input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                        use_cache=None, logits_to_keep=0, **kwargs):
        assert "cache" not in kwargs
        assert not (torch.is_tensor(logits_to_keep) and logits_to_keep.dtype == torch.bool)
        return real(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    cache=past_key_values, use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)

    monkeypatch.setattr(model, "forward", forward_of_5_17)
    assert rlino.cache_argument(model) == "past_key_values"
    rollout = rlino.sample(model, prompts, max_new_tokens=8, stop_ids=[2], group_size=2)
    assert torch.equal(rollout.completion_ids, expected.completion_ids)  # which equals generate's: see above
    rollout = random_rollout(vocab=model.config.vocab_size, device=model.device)
    with torch.no_grad():
        torch.testing.assert_close(rlino.completion_logprobs(model, rollout, temperature=0.6),
                                   full_forward_logprobs(model, rollout, 0.6))
    switched = []  # 5.17's name of gradient checkpointing, for a model that lacks 5.24's
    model_of_5_17 = types.SimpleNamespace(gradient_checkpointing_enable=lambda: switched.append("on"),
                                          gradient_checkpointing_disable=lambda: switched.append("off"))
    rlino.set_grad_ckpt(model_of_5_17, True)
    rlino.set_grad_ckpt(model_of_5_17, False)
    assert switched == ["on", "off"]


# --------------------------------------------------------------------------- (c) clipping and KL
@pytest.mark.parametrize("advantage,ratio,grad_flows", [
    (1.0, 1.5, False),   # A > 0, ratio above 1 + eps: clipped, no gradient
    (1.0, 0.5, True),    # A > 0, ratio below 1 - eps: the unclipped term is the minimum, gradient flows
    (-1.0, 0.5, False),  # A < 0, ratio below 1 - eps: clipped
    (-1.0, 1.5, True),   # A < 0, ratio above 1 + eps: gradient flows (pessimistic bound)
    (1.0, 1.1, True),    # inside the trust region
])
def test_clipping_stops_the_gradient_on_the_right_side(advantage, ratio, grad_flows, monkeypatch):
    """min(rho A, clip(rho, 1 - eps, 1 + eps_high) A): no gradient exactly where the clip is the minimum."""
    logprobs = torch.tensor([[math.log(ratio)]], requires_grad=True)
    monkeypatch.setattr(rlino, "completion_logprobs", lambda *args, **kwargs: logprobs)
    one_token = types.SimpleNamespace(completion_mask=torch.ones(1, 1), sampler_logprobs=torch.zeros(1, 1))
    targets = credit_targets(one_token, torch.tensor([advantage]), resolved(max_new_tokens=1),
                             old_logprobs=torch.zeros(1, 1))
    loss, sums = rlino.objective(None, one_token, targets, resolved(clip_eps=0.2, mu=2))
    loss.backward()
    assert (logprobs.grad.abs().item() > 0) == grad_flows
    assert bool(sums[2].item()) == (not grad_flows)  # the clipped tokens


def test_kl_k3_nonnegative_and_zero_at_reference():
    """k3 = exp(r) - r - 1 with r = log pi_ref - log pi: >= 0, and 0 where pi = pi_ref."""
    g = torch.Generator().manual_seed(0)
    logprobs, ref = -torch.rand(4, 7, generator=g) * 5, -torch.rand(4, 7, generator=g) * 5
    assert (rlino.kl_k3(logprobs, ref) >= 0).all()
    assert torch.equal(rlino.kl_k3(logprobs, logprobs), torch.zeros(4, 7))


def test_kl_term_pulls_towards_reference(tiny, mixed):
    """beta * k3: no gradient when the policy is the reference, a gradient when it is not."""
    model, _ = tiny
    rollout, zero = mixed[0], torch.zeros_like(mixed[2])
    cfg = resolved(max_new_tokens=12, micro_batch=12, max_grad_norm=1e9, beta=1.0)
    ref = rlino.rollout_logprobs(model, rollout, micro_batch=12, temperature=cfg.temperature)
    _, stats = gradient_of_update(model, rollout, zero, cfg, ref_logprobs=ref)
    assert abs(stats["kl"]) < 1e-6 and stats["grad_norm"] < 1e-5
    shifted = ref - 0.5 * rollout.completion_mask
    _, stats = gradient_of_update(model, rollout, zero, cfg, ref_logprobs=shifted)
    assert stats["kl"] > 0 and stats["grad_norm"] > 0


def test_clip_frac_and_kl_are_means_over_all_completion_tokens(tiny, device):
    """TRL's metric definitions: clipped tokens / all completion tokens of the step, and the mean k3 over
    them, also when the rows of an all-equal group are skipped."""
    model, _ = tiny
    rollout = random_rollout(device=device)
    mask = rollout.completion_mask
    rewards = torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 0, 1, 1, 1, 0], device=device)  # group 2: no signal
    adv = rlino.group_advantages(rewards, 4)
    cfg = resolved(max_new_tokens=12, micro_batch=5, max_grad_norm=1e9, clip_eps=0.1, mu=2)
    with torch.no_grad():
        now = full_forward_logprobs(model, rollout, cfg.temperature)
    old = now + noise(now, 0.3, seed=2) * mask
    _, stats = gradient_of_update(model, rollout, adv, cfg, old_logprobs=old)
    ratio = torch.exp(now - old)
    clipped = torch.clamp(ratio, 0.9, 1.1) * adv[:, None] < ratio * adv[:, None]
    assert stats["update_rows"] == 8 and stats["clip_frac"] > 0
    assert stats["clip_frac"] == pytest.approx(((clipped * mask).sum() / mask.sum()).item(), rel=1e-6)
    ref = now - 0.4 * mask
    _, stats = gradient_of_update(model, rollout, adv, resolved(max_new_tokens=12, beta=0.5),
                                  ref_logprobs=ref)
    expected_kl = (rlino.kl_k3(now, ref) * mask).sum() / mask.sum()
    assert stats["kl"] == pytest.approx(expected_kl.item(), rel=1e-5)


@pytest.mark.parametrize("algo, expected_calls", [("grpo", 1), ("fisft+-", 0)])
def test_old_logprobs_only_where_the_ratio_needs_them(tiny, mixed, monkeypatch, algo, expected_calls):
    """With mu = 2, pi_old's log-probs are computed for GRPO's ratio; F-ISFT has no ratio and skips them."""
    model, _ = tiny
    rollout, rewards, adv = mixed
    calls = []
    real = rlino.rollout_logprobs
    monkeypatch.setattr(rlino, "rollout_logprobs", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = resolved(algo=algo, mu=2, max_new_tokens=12, micro_batch=12)
    stats = one_step(model, torch.optim.SGD(model.parameters(), lr=1e-3), rollout, rewards, cfg)
    assert len(calls) == expected_calls and stats["finite"]


# --------------------------------------------------------------------------- (d) the sampler
def test_sampler_draws_from_exp_of_the_update_logprobs(tiny, monkeypatch):
    """The distribution each token is drawn from, softmax(logits / T), is exp of the update's log-probs at T;
    the entropy metric is that distribution's."""
    model, tokenizer = tiny
    drawn = []  # per decode step, for the live rows: the drawn token's log-prob and the entropy, both at T
    real = rlino.next_tokens

    def recording(logits, temperature, top_p, generator):
        token = real(logits, temperature, top_p, generator)
        logprobs = torch.log_softmax(logits / temperature, -1)
        drawn.append((logprobs.gather(-1, token[:, None])[:, 0], -(logprobs.exp() * logprobs).sum(-1)))
        return token

    monkeypatch.setattr(rlino, "next_tokens", recording)
    prompts = [tokenizer(t)["input_ids"] for t in ["What is 2+2?", "Hi"]]
    stop = tokenizer.convert_tokens_to_ids(list("aeiou0123456789"))  # rows stop at different steps
    rollout = rlino.sample(model, prompts, max_new_tokens=12, stop_ids=stop, group_size=3, temperature=0.6,
                           generator=rlino.sampler_generator(0, 0, 0, model.device))
    sampled, entropy = torch.zeros_like(rollout.completion_mask), torch.zeros_like(rollout.completion_mask)
    live = list(range(6))
    for t, (logprobs, entropies) in enumerate(drawn):
        sampled[live, t], entropy[live, t] = logprobs, entropies
        live = [row for row in live if rollout.completion_ids[row, t] not in stop]
    assert rollout.lengths.min() < rollout.lengths.max(), "the test needs rows that stop at different steps"
    update_logprobs = rlino.completion_logprobs(model, rollout, temperature=0.6).detach()
    torch.testing.assert_close(update_logprobs, sampled, atol=1e-5, rtol=1e-5)
    untempered = rlino.completion_logprobs(model, rollout, temperature=1.0).detach()
    assert (untempered - sampled).abs().max() > 0.01  # the temperature matters
    torch.testing.assert_close(rollout.entropy, entropy.sum(-1) / rollout.lengths)
    torch.testing.assert_close(rollout.sampler_logprobs, sampled)  # kept for the mismatch metrics


@pytest.fixture(params=[1, 4], ids=["look-every-token", "look-every-4"])
def sampler_mode(request, monkeypatch) -> int:
    """The sampler's modes: it looks for finished rows at every token (CPUs) or every 4 (as on GPUs, where
    each look waits for the device)."""
    monkeypatch.setattr(rlino, "CHECK_EVERY", {"cpu": request.param, "cuda": request.param})
    poison_new_empty(monkeypatch)
    return request.param


def poison_new_empty(monkeypatch) -> None:
    """Tensor.new_empty fills floating-point tensors with NaN: memory read before it is written shows."""
    real = torch.Tensor.new_empty

    def poisoned(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch.Tensor, "new_empty", poisoned)


HOST_READS = ("item", "tolist", "cpu", "__bool__", "__int__", "__float__", "__index__", "nonzero")


def test_the_sampler_reads_the_device_once_per_look(tiny, monkeypatch):
    """On CUDA each read of a device tensor on the host (item, tolist, bool, cpu, ...) waits for the device:
    after the prefill the sampler reads it once per look (every CHECK_EVERY tokens, --stop-text included) and
    once at the end. Counted here on the same calls; bench/gpu_check.py counts CUDA's syncs."""
    model, tokenizer = tiny
    monkeypatch.setattr(rlino, "CHECK_EVERY", {"cpu": 4, "cuda": 4})
    reads = []
    for name in HOST_READS:
        real = getattr(torch.Tensor, name)
        def counted(self, *args, real=real, name=name, **kwargs):
            reads.append(name)
            return real(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    real_prefill = rlino.prefill

    def prefill(*args, **kwargs):  # the count starts after it
        logits = real_prefill(*args, **kwargs)
        reads.clear()
        return logits
    monkeypatch.setattr(rlino, "prefill", prefill)
    prompts = [tokenizer(t)["input_ids"] for t in ["What is 2+2?", "Hi"]]
    rlino.sample(model, prompts, max_new_tokens=16, stop_ids=[tokenizer.eos_token_id], group_size=2,
                 temperature=1.0, generator=torch.Generator().manual_seed(0), stop_text="\nUser:",
                 tokenizer=tokenizer)
    assert len(reads) <= 16 // 4 + 1, reads


def test_rows_end_at_their_first_stop_and_what_follows_is_cut_off(tiny, sampler_mode):
    """Sampled rows end at their first stop token in every mode: no stop token before it, padding after it,
    and a log-prob of 0 there; each drawn token's log-prob under the sampler equals the update's full
    forward's (a cache written in the wrong place, or a mask that hides the wrong keys, shows here: the tiny
    model's greedy rows repeat one token and would not show it)."""
    model, tokenizer = tiny
    stop = tokenizer.convert_tokens_to_ids(list("aeiou0123456789"))
    prompts = [tokenizer(t)["input_ids"] for t in ["What is 2+2?", "Hi", "Say something.", "x"]]
    rollout = rlino.sample(model, prompts, max_new_tokens=12, stop_ids=stop, group_size=8, temperature=1.0,
                           generator=rlino.sampler_generator(0, 0, 0, model.device))
    assert rollout.lengths.min() < rollout.lengths.max(), "the test needs rows that stop at different steps"
    for row, n in enumerate(rollout.lengths.tolist()):
        ids = rollout.completion_ids[row].tolist()
        assert not set(ids[:n - 1]) & set(stop) and (ids[n - 1] in stop) == (not rollout.truncated[row])
        assert ids[n:] == [stop[0]] * (len(ids) - n) and (rollout.sampler_logprobs[row, n:] == 0).all()
    with torch.no_grad():
        full_forward = rlino.completion_logprobs(model, rollout, temperature=1.0)
    torch.testing.assert_close(rollout.sampler_logprobs, full_forward, atol=1e-5, rtol=1e-5)


def test_sampler_is_seeded_and_groups_share_their_prompt(tiny):
    """The same (seed, step, chunk) draws the same completions; another step draws others."""
    model, tokenizer = tiny
    prompts = [tokenizer(t)["input_ids"] for t in ["abc", "a longer one"]]

    def draw(step):
        return rlino.sample(model, prompts, max_new_tokens=10, stop_ids=[2], group_size=3, temperature=1.0,
                            top_p=0.9, generator=rlino.sampler_generator(0, step, 0, model.device))

    runs = [draw(1), draw(1)]
    assert torch.equal(runs[0].completion_ids, runs[1].completion_ids)
    assert not torch.equal(runs[0].completion_ids, draw(2).completion_ids)
    assert torch.equal(runs[0].prompt_ids[0], runs[0].prompt_ids[2]) and runs[0].prompt_ids.shape[0] == 6


def test_top_p_keeps_only_the_nucleus():
    """Nucleus sampling: only the smallest set of tokens holding top_p of the probability is ever drawn."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    drawn = {int(rlino.next_tokens(logits, 1.0, 0.7, g)) for _ in range(200)}
    assert drawn == {0, 1}


def test_next_tokens_follows_the_distribution_and_never_draws_a_zero():
    """The inverse-CDF draw follows softmax(logits / T): p at T = 1, p^2 renormalised at T = 0.5."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    logits = torch.log(probs).expand(20000, 5)                             # 20,000 rows, one draw each
    drawn = rlino.next_tokens(logits, 1.0, 1.0, torch.Generator().manual_seed(0))
    freq = torch.bincount(drawn, minlength=5).float() / len(drawn)
    assert freq[4] == 0                                                    # -inf logit: never drawn
    assert (freq - probs).abs().max() < 0.015, freq                        # 4-5 standard errors
    hot = rlino.next_tokens(logits, 0.5, 1.0, torch.Generator().manual_seed(0))
    expected = probs ** 2 / (probs ** 2).sum()
    assert (torch.bincount(hot, minlength=5).float() / len(hot) - expected).abs().max() < 0.015


def greedy_matches_generate(sampler, prompts, max_new_tokens=10, group_size=1) -> None:
    """Assert that rlino's greedy rows equal `generate`'s on `sampler` (stop token 2)."""
    ids, mask = (x.to(sampler.device) for x in rlino.left_pad(prompts, 2))
    expected = sampler.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                do_sample=False, eos_token_id=[2], pad_token_id=2)[:, ids.shape[1]:]
    rollout = rlino.sample(sampler, prompts, max_new_tokens=max_new_tokens, stop_ids=[2],
                           group_size=group_size)
    for row, n in enumerate(rollout.lengths.tolist()):
        assert rollout.completion_ids[row, :n].tolist() == expected[row // group_size, :n].tolist()


def test_sampler_keeps_sliding_window_attention(tiny, device):
    """A model with sliding-window layers keeps transformers' cache and masks: greedy still equals generate's
    with prompts longer than the window."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    _, tokenizer = tiny
    config = Qwen2Config(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         use_sliding_window=True, sliding_window=4, max_window_layers=1,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval().to(device)
    assert not rlino.full_attention_only(model)
    greedy_matches_generate(model, [tokenizer(t)["input_ids"] for t in ["What is 2+2, again?", "Hi there"]],
                            group_size=2)


def test_preallocated_cache_is_written_in_place(tiny):
    """PreallocatedLayer: one buffer, written in place, holding what transformers' DynamicCache holds."""
    model, tokenizer = tiny
    cache = rlino.kv_cache(model, 20)
    ids = torch.tensor([tokenizer("abcd")["input_ids"]], device=model.device)
    with torch.no_grad():
        model(input_ids=ids, **{rlino.cache_argument(model): cache}, use_cache=True)
        layer = cache.layers[0]
        buffer = layer.key_buffer.data_ptr()
        model(input_ids=ids[:, :1], **{rlino.cache_argument(model): cache}, use_cache=True)
    assert layer.key_buffer.data_ptr() == buffer and layer.key_buffer.shape[2] == 20
    assert layer.keys.shape[2] == ids.shape[1] + 1 == cache.get_seq_length()
    reference = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.cat([ids, ids[:, :1]], 1), **{rlino.cache_argument(model): reference},
              use_cache=True)
    torch.testing.assert_close(layer.keys, reference.layers[0].keys)
    torch.testing.assert_close(layer.values, reference.layers[0].values)


def test_sampler_model_is_a_bf16_copy_that_follows_the_policy(tiny):
    """--sampler-dtype bfloat16: a bf16 copy (fp32 buffers, tied head), refreshed to the policy, greedy equal
    to generate on the copy, also without padding (an all-ones decode mask)."""
    model, tokenizer = tiny
    assert rlino.sampler_model(model, "float32") is model
    sampler = rlino.sampler_model(model, "bfloat16")
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in sampler.parameters())
    # rotary frequencies: fp32
    assert all(b.dtype == c.dtype for b, c in zip(sampler.buffers(), model.buffers()))
    assert sampler.get_input_embeddings().weight is sampler.get_output_embeddings().weight  # still tied
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert not torch.equal(next(sampler.parameters()).float(), next(model.parameters()))
    rlino.refresh_sampler(sampler, model)
    for mine, policy in zip(sampler.parameters(), model.parameters()):
        assert torch.equal(mine, policy.to(torch.bfloat16))
    prompts = [tokenizer(t)["input_ids"] for t in ["What is 2+2?", "Hi"]]
    greedy_matches_generate(sampler, prompts)
    greedy_matches_generate(sampler, prompts[:1])


# --------------------------------------------------------------------------- (e) main() end to end
def toy_reward(completion: str, example: dict, format_reward: float = 0.0) -> float:
    """A reward a random tiny model can earn sometimes: an odd number of 'a's."""
    return float(completion.count("a") % 2)


def alternating_reward():
    """A reward that alternates 1, 0, 1, ... call by call: every group is mixed,
    every row has an advantage."""
    calls = iter(range(10**9))
    return lambda completion, example, format_reward=0.0: float(next(calls) % 2 == 0)


# The runs of these tests assert identities of fp32 arithmetic (1 rank = 2 ranks, a resumed run = a straight
# one, ...), so they pin fp32 for training and sampling: `--dtype auto` would be bf16 autocast on CPUs with
# AVX512-BF16 and fp32 on the others, and the suite must give one verdict on both. The bf16 path has tests of
# its own (a flag given later on the command line wins).
FP32 = ["--dtype", "float32", "--sampler-dtype", "float32"]
TINY_RUN = ["--task", "arith", "--steps", "2", "--prompts-per-step", "2", "--group-size", "4",
            "--max-new-tokens", "12", "--lr", "1e-2", "--eval-size", "4", "--micro-batch", "3", *FP32]
STEP_KEYS = {"step", "reward_mean", "loss", "grad_norm", "lr", "len_mean", "len_correct", "len_incorrect",
             "truncated_frac", "zero_std_frac", "kl", "clip_frac", "entropy", "time_sample", "time_update",
             "tokens_per_s", "len_correct_p50", "len_incorrect_p90", "truncated_frac_incorrect"}


def test_training_samples_from_the_updated_policy(tiny_dir, tmp_path, monkeypatch):
    """With --sampler-dtype bfloat16, each step's rollouts come from the policy as the previous update left it
    (rounded to bf16), and the evaluations from that same copy."""
    monkeypatch.setattr(tasks.get_task("arith"), "reward", alternating_reward())
    sampled_with, policy_after, evaluated_with = [], [], []
    real_collect, real_train_step, real_evaluate = rlino.collect_rollouts, rlino.train_step, rlino.evaluate

    def collect(model, *args, **kwargs):
        sampled_with.append(parameters(model))
        return real_collect(model, *args, **kwargs)

    def optimise(model, *args, **kwargs):
        stats = real_train_step(model, *args, **kwargs)
        policy_after.append(parameters(model))
        assert all(p.grad is None for p in model.parameters())  # freed, not kept through sampling
        return stats

    def evaluate(model, *args, **kwargs):
        evaluated_with.append(next(model.parameters()).dtype)
        return real_evaluate(model, *args, **kwargs)

    monkeypatch.setattr(rlino, "collect_rollouts", collect)
    monkeypatch.setattr(rlino, "train_step", optimise)
    monkeypatch.setattr(rlino, "evaluate", evaluate)
    rlino.main([*TINY_RUN, "--steps", "3", "--sampler-dtype", "bfloat16", "--model", str(tiny_dir),
                "--out", str(tmp_path / "run")])
    assert len(sampled_with) == 3 and len(policy_after) == 3 and evaluated_with == [torch.bfloat16] * 2
    for step in (1, 2):
        assert all(torch.equal(mine, policy.to(torch.bfloat16))
                   for mine, policy in zip(sampled_with[step], policy_after[step - 1]))
    assert not all(torch.equal(a, b) for a, b in zip(sampled_with[1], sampled_with[2]))


def test_the_train_inference_mismatch_is_measured(tiny_dir, tmp_path, monkeypatch):
    """sampler_logp_diff (mean |log pi_policy - log pi_sampler| over the update's tokens) and
    sampler_ratio_max: near 0 and 1 when the rollouts come from the fp32 policy itself, visibly above with
    its bf16 copy."""
    monkeypatch.setattr(tasks.get_task("arith"), "reward", alternating_reward())
    steps = {}
    for dtype in ("float32", "bfloat16"):
        rlino.main([*TINY_RUN, "--model", str(tiny_dir), "--out", str(tmp_path / dtype),
                    "--sampler-dtype", dtype])
        lines = [json.loads(x) for x in (tmp_path / dtype / "metrics.jsonl").read_text().splitlines()]
        steps[dtype] = [m for m in lines if "loss" in m]
        print(dtype, [(m["sampler_logp_diff"], m["sampler_ratio_max"]) for m in steps[dtype]])
    assert len(steps["float32"]) == 2 and all(m["update_rows"] > 0 for m in steps["float32"])
    assert all(m["sampler_logp_diff"] < 1e-5 and abs(m["sampler_ratio_max"] - 1) < 1e-4
               for m in steps["float32"])
    # measured 1.3e-7 and 8e-4 .. 1.1e-3 (the tiny model's logits are small: the embedded model's differ more)
    for a, b in zip(steps["float32"], steps["bfloat16"]):
        assert b["sampler_logp_diff"] > max(1e-4, 1000 * a["sampler_logp_diff"])
        assert b["sampler_ratio_max"] > 1


@pytest.mark.parametrize("algo", rlino.ALGOS)
def test_main_two_steps_writes_the_run_and_changes_parameters(tiny_dir, tmp_path, monkeypatch, algo):
    monkeypatch.setattr(tasks.get_task("arith"), "reward", toy_reward)
    out = tmp_path / "run"
    rlino.main([*TINY_RUN, "--algo", algo, "--model", str(tiny_dir), "--out", str(out)])
    config = json.loads((out / "config.json").read_text())
    assert config["algo"] == algo and config["group_size"] == 4
    assert "auto" not in (config["dtype"], config["sampler_dtype"])
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 1, 2]
    assert "eval_accuracy" in lines[0] and "eval_accuracy" in lines[-1]
    ppo_keys = {"value_loss", "explained_variance", "adv_std_within_seq"}
    for line in lines[1:]:
        assert STEP_KEYS <= line.keys(), STEP_KEYS - line.keys()
        assert (ppo_keys <= line.keys()) == (algo == "ppo")
    assert (out / "samples.jsonl").read_text().count("\n") == 4
    rollouts = [json.loads(x) for x in (out / "rollouts.jsonl").read_text().splitlines()]  # every rollout
    for line in lines[1:]:
        mine = [r for r in rollouts if r["step"] == line["step"]]
        assert len(mine) == 2 * 4  # prompts x G, each prompt's G rollouts together
        assert len({r["prompt"] for r in mine[:4]}) == len({r["prompt"] for r in mine[4:]}) == 1
        assert line["reward_mean"] == pytest.approx(np.mean([r["reward"] for r in mine]))
        assert line["len_mean"] == pytest.approx(np.mean([r["length"] for r in mine]))
        assert line["truncated_frac"] == pytest.approx(np.mean([r["truncated"] for r in mine]))
    evals = [json.loads(x) for x in (out / "evals.jsonl").read_text().splitlines()]  # each problem, each eval
    for line in (lines[0], lines[-1]):
        mine = [r for r in evals if r["step"] == line["step"]]
        assert [r["problem"] for r in mine] == list(range(line["eval_n"]))
        assert line["eval_accuracy"] == pytest.approx(np.mean([r["correct"] for r in mine]))
    from transformers import AutoModelForCausalLM
    before = AutoModelForCausalLM.from_pretrained(tiny_dir).state_dict()
    after = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()  # the plain policy, also for PPO
    assert after.keys() == before.keys()
    unchanged = [n for n in before if torch.equal(before[n], after[n])]
    assert not unchanged, f"{algo}: parameters that did not change: {unchanged}"
    assert (out / "model" / "value_head.pt").exists() == (algo == "ppo")
    if algo == "ppo":  # the critic, trained, saved beside the policy
        assert torch.load(out / "model" / "value_head.pt")["weight"].abs().sum() > 0


# --------------------------------------------------------------------------- (e2) where a completion ends
END_OF_TURN = {"smollm2": "<|im_end|>", "qwen2.5-base": "<|im_end|>", "llama3": "<|eot_id|>"}


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_stop_tokens_are_eos_and_the_templates_end_of_turn(flavour, tmp_path):
    """stop_token_ids: the tokenizer's EOS first (it pads), and with chat prompts the token the chat template
    ends a turn with, found from the template, also where it is not the EOS (Qwen2.5 base, Llama 3); plain
    prompts end a turn with --stop-text instead. Whitespace before the end of turn is skipped; a template that
    refuses the probe, or writes no special token after the message, gives none."""
    model, tokenizer = rlino.load_model(str(make_tiny_model(tmp_path / flavour, flavour=flavour)),
                                        torch.device("cpu"))
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN[flavour])
    chat, plain = (rlino.stop_token_ids(tokenizer, model, fmt) for fmt in ("chat", "plain"))
    assert chat[0] == plain[0] == tokenizer.eos_token_id and end_of_turn in chat
    assert (end_of_turn in plain) == (end_of_turn == tokenizer.eos_token_id)
    assert rlino.end_of_turn_ids(tokenizer) == [end_of_turn]
    whitespace_first = "{% for m in messages %}{{ m['content'] }}\n " + END_OF_TURN[flavour] + "{% endfor %}"
    tokenizer.chat_template = whitespace_first
    assert rlino.end_of_turn_ids(tokenizer) == [end_of_turn]
    for template in ("{{ raise_exception('the last message must be the user\\'s') }}",
                     "{% for m in messages %}{{ m['content'] }}\n\n{% endfor %}", None):
        tokenizer.chat_template = template
        assert rlino.end_of_turn_ids(tokenizer) == [], template


@pytest.mark.parametrize("flavour", ["qwen2.5-base", "llama3"])
def test_a_completion_ends_where_the_model_ends_its_turn(flavour, tmp_path, monkeypatch):
    """A model that ends its turn at once, its EOS another token (as Qwen2.5 base's and Llama 3's): evaluation
    and training see one-token completions, none truncated, where they ran to --max-new-tokens before."""
    model_dir = make_tiny_model(tmp_path / "model", flavour=flavour, always=END_OF_TURN[flavour])
    evaluation = ["--eval-only", "--model", str(model_dir), "--task", "arith", "--eval-size", "4",
                  "--max-new-tokens", "24", *FP32]
    result = rlino.main([*evaluation, "--out", str(tmp_path / "eval")])
    assert (result["eval_len_incorrect"], result["eval_truncated_frac"]) == (1.0, 0.0)
    with monkeypatch.context() as eos_only:  # the control: stop tokens without the end of turn, as before
        eos_only.setattr(rlino, "end_of_turn_ids", lambda tokenizer: [])
        result = rlino.main([*evaluation, "--out", str(tmp_path / "eos-only")])
    assert (result["eval_len_incorrect"], result["eval_truncated_frac"]) == (24.0, 1.0)
    monkeypatch.setattr(tasks.get_task("arith"), "reward", alternating_reward())
    rlino.main([*TINY_RUN, "--model", str(model_dir), "--out", str(tmp_path / "run"), "--steps", "1"])
    step = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][1]
    assert (step["len_mean"], step["truncated_frac"], step["update_rows"]) == (1.0, 0.0, 8)


def test_llama3_prompts_do_not_carry_todays_date(tmp_path):
    """Llama 3's template writes today's date unless told one: rlino tells it a fixed one, so that a run gives
    the same prompts on any day."""
    _, tokenizer = rlino.load_model(str(make_tiny_model(tmp_path / "m", flavour="llama3")),
                                    torch.device("cpu"))
    task = tasks.get_task("arith")
    prompt = tokenizer.decode(rlino.encode_prompts(task, task.load("test", limit=1), tokenizer, "auto")[0])
    assert prompt.startswith("<|begin_of_text|><|start_header_id|>system")
    assert f"Today Date: {rlino.TEMPLATE_DATE}" in prompt and rlino.TEMPLATE_DATE == "26 Jul 2024"


def test_plain_prompts_end_at_the_stop_text_and_what_follows_counts_for_nothing(tiny, sampler_mode):
    """--stop-text with plain prompts: a row ends at the token that completes the text (greedy rows equal
    generate's up to there), is not truncated, and its decoded answer stops before the text; chat prompts
    use the template's end of turn instead."""
    model, tokenizer = tiny
    prompts = [tokenizer(t)["input_ids"] for t in ["What is 2+2?", "Hi", "A longer prompt, of more tokens."]]
    ids, mask = rlino.left_pad(prompts, 2)
    free = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                          eos_token_id=None, pad_token_id=2)[:, ids.shape[1]:]
    text = tokenizer.decode(free[0])
    stop_text = text[5:8]
    end = text.index(stop_text) + len(stop_text)  # the character-level tokenizer: one token per character
    rollout = rlino.sample(model, prompts, max_new_tokens=16, stop_ids=[2], stop_text=stop_text,
                           tokenizer=tokenizer)
    assert int(rollout.lengths[0]) == end and not rollout.truncated[0]
    answers = rlino.decode_completions(tokenizer, rollout, stop_text=stop_text)
    assert answers[0] == text[:text.index(stop_text)]
    for row in range(3):
        n = int(rollout.lengths[row])
        assert rollout.completion_ids[row, :n].tolist() == free[row, :n].tolist()
        row_text = tokenizer.decode(free[row, :n])
        assert bool(rollout.truncated[row]) == (stop_text not in row_text)
        assert rollout.completion_mask[row].sum() == n
    assert rlino.completion_stop_text(tokenizer, resolved(prompt_format="plain")) == "\nUser:"
    assert rlino.completion_stop_text(tokenizer, resolved(prompt_format="auto")) == ""


# --------------------------------------------------------------------------- (f) the real embedded model
def test_embedded_smollm2_loads_samples_and_updates(tmp_path, monkeypatch):
    monkeypatch.setenv("RLINO_CACHE", str(tmp_path))  # a new user's first load: the GGUF file (accelerate)
    device = torch.device("cpu")
    model, tokenizer = rlino.load_model(rlino.EMBEDDED_MODEL, device)
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    task = tasks.get_task("arith")
    examples = task.load("test", limit=2)
    prompts = rlino.encode_prompts(task, examples, tokenizer, "auto")
    stop = rlino.stop_token_ids(tokenizer, model, "auto")
    assert tokenizer.decode(stop[0]) == "<|im_end|>"
    rollout = rlino.sample(model, prompts, max_new_tokens=8, stop_ids=stop, group_size=2, temperature=0.8,
                           generator=rlino.sampler_generator(0, 0, 0, device))
    assert rollout.completion_ids.shape[0] == 4 and 1 <= int(rollout.lengths.max()) <= 8
    cfg = resolved(max_new_tokens=8, micro_batch=4, max_grad_norm=1.0)
    before = model.model.layers[0].self_attn.q_proj.weight.clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    credit = torch.tensor([1.0, -1.0, -1.0, 1.0])
    stats = rlino.train_step(model, opt, rollout, credit_targets(rollout, credit, cfg), cfg)
    assert math.isfinite(stats["loss"]) and stats["grad_norm"] > 0
    assert not torch.equal(before, model.model.layers[0].self_attn.q_proj.weight)


SMOLLM2_TOKENIZER = HERE / "bench" / "smollm2-tokenizer"  # the embedded model's own, committed (3.5 MB)


@functools.cache
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's byte-level BPE tokenizer, without the GGUF wheel."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(SMOLLM2_TOKENIZER)


@pytest.mark.parametrize("text", ["The sum is 4.\nUser: and now?", "4\n\nUser: next",
                                  "Résumé: 4 €\nUser:x"])
def test_the_stop_text_is_found_where_real_bpe_tokens_complete_it(text):
    """The sampler looks for --stop-text in each row's last tokens (first_stop_text): on SmolLM2's byte-level
    BPE (where '\n', 'User' and ':' are tokens or merge with their neighbours, and a character can be several
    tokens) it first finds it at the token that completes it."""
    tokenizer = smollm2_tokenizer()
    ids = np.array([tokenizer(text, add_special_tokens=False)["input_ids"]])
    enders = rlino.stop_text_enders(tokenizer, "\nUser:", len(tokenizer))
    first = rlino.first_stop_text(tokenizer, ids, "\nUser:", since=0, enders=enders)[0]
    assert first >= 0
    assert rlino.first_stop_text(tokenizer, ids, "\nUser:", since=first, enders=enders) == [first]
    assert "\nUser:" in tokenizer.decode(ids[0, :first + 1])
    assert "\nUser:" not in tokenizer.decode(ids[0, :first])


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(["\n", "User", ":", " User:", "\nUser:", "Us", "er", "é", "€", "4", " the",
                                 "::", "\n\n", "Answer: 7", "<|im_end|>", "ü", "🙂"]), max_size=30),
       st.sampled_from(["\nUser:", "Answer:", "€", "🙂"]), st.integers(1, 8))
def test_the_stop_text_look_decodes_only_tokens_that_can_end_it_and_finds_the_same(pieces, text, every):
    """The looks decode only the windows that end at a token able to complete the text (stop_text_enders):
    on real BPE tokens, looking every `every` tokens from where the last look ended, they find what decoding
    every window of the whole row finds."""
    tokenizer = smollm2_tokenizer()
    ids = tokenizer("".join(pieces) + " end", add_special_tokens=False)["input_ids"]
    rows = np.array([ids, ids[::-1]])
    enders = rlino.stop_text_enders(tokenizer, text, len(tokenizer))
    assert not enders.all()
    expected = rlino.first_stop_text(tokenizer, rows, text, since=0, enders=np.ones(len(tokenizer), bool))
    found = [-1, -1]
    for looked in range(0, rows.shape[1], every):                           # the sampler's looks
        upto = min(looked + every, rows.shape[1])
        seen = rlino.first_stop_text(tokenizer, rows[:, :upto], text, since=looked, enders=enders)
        found = [f if f >= 0 else s for f, s in zip(found, seen)]
    assert found == expected


def test_wandb_logs_the_config_and_every_metrics_line_offline(tiny_dir, tmp_path, monkeypatch):
    """--wandb PROJECT in W&B's offline mode: a local W&B run inside the run folder, holding the config and
    the metrics lines; the run folder keeps its own files. W&B's service process (wandb-core) writes the log
    file out only once it handles finish()'s last message, which finish() does not wait for: on a busy machine
    the file was read with its header only. That message is delayed here as a busy machine delays it, so
    the test fails unless rlino waits for W&B to be done (close_wandb)."""
    from wandb.sdk.lib.service.service_connection import ServiceConnection
    monkeypatch.setattr(tasks.get_task("arith"), "reward", toy_reward)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    real_inform_finish = ServiceConnection.inform_finish

    def late(self, run_id):
        with contextlib.suppress(Exception):  # W&B refuses it when teardown() has already closed the run
            real_inform_finish(self, run_id)

    def busy_inform_finish(self, run_id):  # sent a second late, as by a busy wandb-core
        threading.Timer(1.0, late, (self, run_id)).start()

    monkeypatch.setattr(ServiceConnection, "inform_finish", busy_inform_finish)
    out = tmp_path / "run"
    rlino.main([*TINY_RUN, "--model", str(tiny_dir), "--out", str(out), "--wandb", "rlino-test"])
    logged = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logged) == 1 and (out / "metrics.jsonl").exists() and (out / "summary.json").exists()
    data = logged[0].read_bytes()
    for text in (b"rlino-test", b"reward_mean", b"eval_accuracy", b"clip_frac", b"loss_agg", b"summary/"):
        assert text in data, text


def test_wandb_missing_is_one_line(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(SystemExit) as exit_info:
        rlino.main([*TINY_RUN, "--model", str(tiny_dir), "--out", str(tmp_path / "run"), "--wandb", "p"])
    assert exit_info.value.code == 2 and "pip install wandb" in capsys.readouterr().err


# --------------------------------------------------------------------------- evaluation, pass@k, plots
def test_pass_at_k_unbiased_estimator():
    assert rlino.pass_at_k(4, 0, 1) == 0.0 and rlino.pass_at_k(4, 4, 4) == 1.0
    assert rlino.pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert rlino.pass_at_k(4, 1, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(4, 2))  # 0.5
    assert rlino.pass_at_k(10, 3, 5) == pytest.approx(1 - math.comb(7, 5) / math.comb(10, 5))


def test_eval_only_writes_accuracy_pass_at_k_and_lengths(tiny_dir, tmp_path, monkeypatch):
    """--eval-only: greedy accuracy, and pass@k from --eval-samples draws at --eval-temperature and
    --eval-top-p (the paper's authors sampled at 1.0 and 0.95), not at the training --temperature."""
    drawn_at, real_sample = [], rlino.sample

    def sample(*args, temperature=0.0, top_p=1.0, **kwargs):
        drawn_at.append((temperature, top_p))
        return real_sample(*args, temperature=temperature, top_p=top_p, **kwargs)

    monkeypatch.setattr(rlino, "sample", sample)
    out = tmp_path / "eval"
    result = rlino.main(["--eval-only", "--model", str(tiny_dir), "--task", "arith", "--eval-size", "6",
                         "--eval-samples", "4", "--max-new-tokens", "8", "--temperature", "0.5",
                         "--eval-temperature", "1.0", "--eval-top-p", "0.95", "--out", str(out)])
    assert drawn_at == [(0.0, 1.0), (1.0, 0.95)]  # one batch of 6: greedy, then the draws
    saved = json.loads((out / "eval.json").read_text())
    assert saved["eval_n"] == 6 and saved["eval_accuracy"] == result["eval_accuracy"]
    assert {"eval_pass@1", "eval_pass@2", "eval_pass@4", "eval_len_incorrect",
            "eval_len_incorrect_p90"} <= saved.keys()
    assert saved["eval_pass@1"] <= saved["eval_pass@2"] <= saved["eval_pass@4"]
    problems = saved["problems"]  # the per-problem records the figures come from
    assert [p["problem"] for p in problems] == list(range(6))
    assert saved["eval_accuracy"] == pytest.approx(np.mean([p["correct"] for p in problems]))
    assert saved["eval_pass@4"] == pytest.approx(np.mean([p["n_correct"] > 0 for p in problems]))


def write_run(folder: Path, algo: str, seed: int, steps: int = 5, wrong_slope: float = 3.0,
              no_signal: float = 0.5, beta: float = 0.0, task: str = "arith", model: str = "smollm2",
              truncated: float = 0.1) -> Path:
    """A fake run folder: eval accuracy 0.2 + 0.05 step at even steps (on 10 problems; sampled pass@1 0.1
    lower), incorrect answers 80 + wrong_slope * step tokens long, a share no_signal of all-equal groups at
    every step."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"algo": algo, "loss_agg": "seq", "seed": seed,
                                                    "beta": beta, "task": task, "model": model,
                                                    "prompts_per_step": 4}))
    train = {"truncated_frac": truncated, "zero_std_frac": no_signal}
    rows = [{"step": s, **({"reward_mean": 0.1 * s, "len_correct": 50 + s,
                            "len_incorrect": 80 + wrong_slope * s, **train} if s else {}),
             **({"eval_accuracy": 0.2 + 0.05 * s, "eval_pass@1": 0.1 + 0.05 * s, "eval_n": 10}
                if s % 2 == 0 else {})} for s in range(steps)]
    rows[1]["len_correct"] = None  # a step with no correct answer
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_plot_draws_a_png_from_run_folders(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is in requirements.txt; bench/plot.py needs it")
    runs = [str(write_run(tmp_path / name, algo, seed)) for name, algo, seed in
            [("a", "grpo", 0), ("b", "fisft+-", 1)]]
    png = tmp_path / "fig.png"
    bench_module("plot").main([*runs, "--out", str(png)])
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    from matplotlib import image
    pixels = image.imread(png)
    assert pixels.shape[1] > 1000 and pixels[..., :3].std() > 0.05  # four panels, with something drawn


def bench_module(name: str):
    """A script of bench/ imported as a module."""
    sys.path.insert(0, str(HERE / "bench"))
    return __import__(name)


def test_mean_ci_is_students_t_interval_and_the_sign_flip_p_is_exact():
    """mean ± t_{0.975, n-1} s / sqrt(n): for 1, 2, 3 that is 2 ± 4.303 / sqrt(3) = 2 ± 2.484."""
    table = bench_module("table")
    assert table.mean_ci([1.0, 2.0, 3.0]) == "2.000 ± 2.484"
    assert table.mean_ci([5.0, None]) == "5.000 (n = 1)" and table.mean_ci([None]) == "-"
    # the exact sign-flip p: 5 positive pairs reach only 2 / 32; 4 of 2^3 patterns reach (3, -1, 2)
    assert table.sign_flip_p([1.0, 2.0, 3.0, 4.0, 5.0]) == 2 / 32
    assert table.sign_flip_p([3.0, -1.0, 2.0]) == pytest.approx(4 / 8)
    assert table.sign_flip_p([0.0, 0.0]) == 1.0
    assert (rlino.slope([(1, 83.0), (2, 86.0), (3, 89.0)]) == pytest.approx(3.0)
            and rlino.slope([(1, 2.0)]) is None)


def test_results_table_gives_cis_and_paired_differences(tmp_path, capsys):
    """bench/table.py: per group mean ± 95 % CI over seeds, and the paired (by seed) difference to
    GRPO-seq."""
    runs = [str(write_run(tmp_path / f"{algo}{seed}", algo, seed, wrong_slope=slope))
            for algo, seed, slope in [("grpo", 0, 3.0), ("grpo", 1, 5.0),
                                      ("fisft+", 0, 2.0), ("fisft+", 1, 2.0)]]
    bench_module("table").main(runs)
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("| arith")]
    assert len(lines) == 4 and "on 10 test problems" in out
    grpo_acc, fisft_acc, grpo_len, fisft_len = ([c.strip() for c in line.split("|")[1:-1]] for line in
                                                 (lines[1], lines[0], lines[3], lines[2]))
    assert grpo_acc[2] == "grpo" and grpo_acc[6:9] == ["0.200 ± 0.000", "0.400 ± 0.000", "0.200 ± 0.000"]
    assert grpo_acc[9] == "(reference)" and fisft_acc[9] == "0.000 ± 0.000 [2 pairs]"
    assert grpo_len[6] == "4.000 ± 12.706"  # slopes 3 and 5: mean 4, s = sqrt(2), t_1 = 12.706
    assert fisft_len[6] == "2.000 ± 0.000" and fisft_len[11] == "-2.000 ± 12.706 [2 pairs]"  # 2 - 3, 2 - 5
    # 83, 85 -> 92, 100
    assert grpo_len[7] == "84.000 ± 12.706 → 96.000 ± 50.824" and grpo_len[10] == "0.500 ± 0.000"
    with pytest.raises(SystemExit):  # two runs of one seed cannot be paired
        bench_module("table").main([runs[0], str(write_run(tmp_path / "again", "grpo", 0))])


def test_results_table_puts_a_paper_row_in_the_papers_layout(tmp_path, capsys):
    """bench/table.py over a paper row's runs: the paper's columns (GRPO with KL, without, F-ISFT+,
    F-ISFT+−, F-ISFT−, and PPO, with or without KL), its figures, and ours, greedy and sampled, in %; GRPO
    with and without KL are separate groups."""
    row = dict(task="gsm8k-paper", model="Qwen/Qwen2.5-0.5B")
    runs = [str(write_run(tmp_path / name, algo, seed, beta=beta, **row)) for name, algo, seed, beta in
            [("kl0", "grpo", 0, 0.001), ("kl1", "grpo", 1, 0.001), ("nokl0", "grpo", 0, 0.0),
             ("plus0", "fisft+", 0, 0.0), ("ppo0", "ppo", 0, 0.001)]]
    bench_module("table").main(runs)
    out = capsys.readouterr().out
    header = ("| model | task | final accuracy, % | GRPO | GRPO w/o KL | F-ISFT+ | F-ISFT+− | F-ISFT− "
              "| PPO |")
    assert header in out
    paper, greedy, sampled = ([c.strip() for c in line.split("|")[1:-1]] for line in out.splitlines()
                              if line.startswith("| Qwen2.5-0.5B | gsm8k-paper |"))
    assert paper[2:] == ["the paper", "55.87", "55.19", "51.71", "55.72", "–", "–"]
    assert greedy[2:] == ["ours, greedy", "40.000 ± 0.000", "40.000 (n = 1)", "40.000 (n = 1)", "-", "-",
                          "40.000 (n = 1)"]
    assert sampled[3] == "30.000 ± 0.000"
    grpo_rows = [x for x in out.splitlines() if x.startswith("| gsm8k-paper | Qwen2.5-0.5B | grpo |")]
    assert len(grpo_rows) == 4 and "| 0.001 | 2 |" in grpo_rows[1]  # accuracy and length, beta 0 and 0.001


def test_paired_differences_of_two_arms_by_seed(tmp_path):
    """bench/paired.py (experiments 2 and 3): per seed each arm's slope of len wrong (also from a late step)
    and last accuracy, and the mean ± 95 % CI of A − B over the seeds both ran."""
    paired = bench_module("paired")
    a = [str(write_run(tmp_path / f"a{seed}", "fisft-", seed, wrong_slope=3.0 + seed)) for seed in (0, 1, 2)]
    b = [str(write_run(tmp_path / f"b{seed}", "grpo", seed, wrong_slope=1.0)) for seed in (0, 1)]
    table = paired.paired_table(a, b, late_from=2).splitlines()
    # seed 0: slopes 3 and 1 over all steps and from step 2; last accuracy 0.2 + 0.05 * 4 in both arms
    assert table[2] == "| 0 | +3.000 | +1.000 | +2.000 | +3.000 | +1.000 | +2.000 | 0.400 | 0.400 | +0.000 |"
    mean = "| mean ± 95 % CI |  |  | 2.500 ± 6.353 |  |  | 2.500 ± 6.353 |  |  | 0.000 ± 0.000 |"
    assert table[4] == mean
    assert table[5] == "| exact sign-flip p |  |  | 0.5000 |  |  | 0.5000 |  |  | 1.0000 |"
    assert "2 pairs (seeds 0, 1)" in table[-1]


def test_length_gap_reads_mixed_groups_and_the_verdict_follows_the_registered_rule():
    """bench/gap.py (experiment 4): per mixed group mean wrong - mean right length, over steps 25-48 only; the
    verdict: inside ±10 tokens 'no effect of practical size', else the CI's side with the sign-flip p."""
    gap = bench_module("gap")
    rows = [{"step": step, "prompt": 0, "length": length, "reward": reward, "truncated": length > 300}
            for step in (24, 30)
            for length, reward in ((50, 1.0), (70, 0.0), (90, 0.0), (400, 0.0))]   # step 24: outside
    rows += [{"step": 31, "prompt": 1, "length": 10, "reward": 0.0, "truncated": False}] * 4  # not mixed
    assert gap.length_gap(rows, 4) == pytest.approx((70 + 90 + 400) / 3 - 50)
    assert gap.length_gap(rows, 4, keep_truncated=False) == pytest.approx(80 - 50)
    assert gap.verdict([20.0, 25.0, 30.0, 22.0, 28.0, 26.0]).startswith("supports")
    assert gap.verdict([-20.0, -25.0, -30.0, -22.0, -28.0, -26.0]).startswith("contradicts")
    assert gap.verdict([1.0, -1.0, 2.0, 0.5, -0.5, 1.5]).startswith("no effect of practical size")
    assert gap.verdict([30.0, -25.0, 2.0, 40.0, -10.0, 5.0]) == "cannot tell"


def test_run_summary_says_when_most_groups_carry_no_signal(tmp_path):
    """The closing summary: accuracy start -> end, the share of groups with signal, lengths first -> last
    step, and one plain warning line when at least 80 % of the groups had all-equal rewards: the cap to raise
    when most completions were cut off (./run.sh demo: 81-94 % at 160 tokens), else the other ways out."""
    for no_signal, warned, truncated in ((0.5, False, 0.1), (0.75, False, 0.9), (0.85, True, 0.1),
                                         (0.85, "cap", 0.9)):
        run = write_run(tmp_path / f"r{no_signal}-{truncated}", "grpo", 0, no_signal=no_signal,
                        truncated=truncated)
        summary = rlino.run_record(run, rlino.read_run(run)[1])
        lines = rlino.summary_lines(summary, prompts_per_step=4, max_new_tokens=160)
        assert [summary["start"], summary["end"]] == [0.2, 0.4] and summary["steps"] == 4
        assert summary["right"] == [52, 54] and summary["wrong"] == [83, 92]
        assert summary["signal"] == pytest.approx(1 - no_signal)
        assert summary["slope_wrong"] == pytest.approx(3)
        assert lines[0] == "eval accuracy 0.200 -> 0.400 on 10 problems (step 0 -> 4)"
        assert lines[1].endswith(f"{1 - no_signal:.0%} of 16")
        assert any("--group-size" in line and "all-equal" in line for line in lines) == (warned is True)
        assert any("raise --max-new-tokens" in line and "90%" in line for line in lines) == (warned == "cap")


def test_the_experiments_figures_show_the_published_paired_differences(tmp_path):
    """bench/figures.py, on the committed records of experiments 2 and 3: the paired differences it draws are
    the published ones (bench/results/*/paired.md), with the exact sign-flip p (5 pairs of one sign: 2/32)."""
    figures = bench_module("figures")
    negative = figures.negative_figure(figures.RESULTS / "negative", tmp_path / "negative.png")
    primary = negative["seq − token (primary)"]
    assert (round(primary["mean"], 3), round(primary["half"], 3)) == (7.616, 4.309)
    assert primary["p"] == 2 / 32 and primary["positive"] == 5
    horizon = figures.horizon_figure(figures.RESULTS / "horizon", tmp_path / "horizon.png")
    ppo = next(s for label, s in horizon.items() if label.startswith("PPO − GRPO"))
    assert (round(ppo["mean"], 3), round(ppo["half"], 3), ppo["p"]) == (0.043, 0.029, 2 / 32)
    assert (tmp_path / "negative.png").stat().st_size > 10_000 and (tmp_path / "horizon.png").exists()


def write_gap_run(folder: Path, agg: str, seed: int, wrong_extra: float) -> None:
    """A fake finished run of experiment 4: each step's 4 groups of 4, one mixed (a right answer of 50
    tokens, three wrong ones of 50 + wrong_extra), three all wrong (100 tokens)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(
        {"task": "sum-chain", "model": "smollm2", "algo": "grpo", "loss_agg": agg, "seed": seed,
         "group_size": 4, "max_new_tokens": 320, "dtype": "bfloat16"}))
    rollouts = [{"step": step, "prompt": step * 4 + g, "length": length, "reward": reward, "truncated": False}
                for step in range(1, 49) for g in range(4)
                for length, reward in ([(50, 1.0)] + [(50 + wrong_extra, 0.0)] * 3 if g == 0
                                       else [(100, 0.0)] * 4)]
    write_jsonl(folder / "rollouts.jsonl", rollouts)
    write_jsonl(folder / "evals.jsonl", [{"step": step, "problem": i, "correct": i < 10, "length": 60,
                                          "truncated": False, "n_correct": 0}
                                         for step in (0, 48) for i in range(50)])
    metrics = [{"step": 0, "eval_accuracy": 0.2, "eval_n": 50}]
    metrics += [{"step": step, "reward_mean": 1 / 16, "len_correct": 50.0, "zero_std_frac": 0.75,
                 "len_incorrect": (3 * (50 + wrong_extra) + 12 * 100) / 15, "truncated_frac": 0.0}
                for step in range(1, 49)]
    metrics[-1].update(eval_accuracy=0.2, eval_n=50)
    write_jsonl(folder / "metrics.jsonl", metrics)
    (folder / "summary.json").write_text("{}")
    (folder / "cpu.txt").write_text("a CPU\n")


def test_experiment_4s_statistic_and_figure_from_rollouts(tmp_path, capsys):
    """bench/gap.py and figures.py on six fake pairs whose within-group gap is 40 + seed tokens under seq and
    10 under const: seq - const = 30 + seed in every pair, all positive (sign-flip p 2/64), verdict
    'supports'; the figure is drawn."""
    for seed in range(6):
        write_gap_run(tmp_path / f"grpo_seq_s{seed}", "seq", seed, 40 + seed)
        write_gap_run(tmp_path / f"grpo_const_s{seed}", "const", seed, 10)
    write_gap_run(tmp_path / "grpo_seq_s0.discarded-20261206-1200", "seq", 0, 400)  # set aside: not read
    bench_module("gap").pairs(tmp_path)
    out = capsys.readouterr().out
    assert "- gap, seq − const: +32.500 ± 1.964 (95 % t CI, 6 pairs), exact sign-flip p 0.0312" in out
    assert "verdict (primary, seq − const): supports the paper" in out
    shown = bench_module("figures").gap_figure(tmp_path, tmp_path / "gap.png")
    assert shown["gap, wrong − right\n(primary)"]["mean"] == pytest.approx(32.5)
    assert (tmp_path / "gap.png").stat().st_size > 10_000


def test_plot_without_matplotlib_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit) as exit_info:
        bench_module("plot").main([str(write_run(tmp_path / "a", "grpo", 0)), "--out",
                                   str(tmp_path / "f.png")])
    assert exit_info.value.code == 2 and "pip install matplotlib" in capsys.readouterr().err


# --------------------------------------------------------------------------- checkpoints and resume
def comparable(metrics_line: dict) -> dict:
    """A metrics line without the timings, which differ from run to run."""
    return {k: v for k, v in metrics_line.items() if not k.startswith("time_") and k != "tokens_per_s"}


def test_checkpoints_are_rotated_and_atomic(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(tasks.get_task("arith"), "reward", toy_reward)
    out = tmp_path / "run"
    rlino.main([*TINY_RUN, "--model", str(tiny_dir), "--out", str(out), "--steps", "3", "--save-every", "1",
                "--keep-checkpoints", "2", "--eval-size", "1"])
    assert [p.name for p in rlino.checkpoint_paths(out)] == ["step-2.pt", "step-3.pt"]
    assert not list((out / "checkpoints").glob("*.tmp"))
    state = torch.load(rlino.checkpoint_paths(out)[-1], weights_only=False)
    assert {"model", "optimizer", "scheduler", "stream", "rng", "step"} <= state.keys() and state["step"] == 3


def test_a_finished_run_without_its_final_checkpoint_keeps_model_only(tiny_dir, tmp_path, monkeypatch,
                                                                     capsys):
    """--no-final-checkpoint (the cuda preset's): the checkpoints go once model/ and summary.json are written
    (a paper row fits its disk); --resume --steps N then says in one line that the run cannot go on."""
    monkeypatch.setattr(tasks.get_task("arith"), "reward", toy_reward)
    sizes = {}
    for keep in ("--final-checkpoint", "--no-final-checkpoint"):
        out = tmp_path / keep
        rlino.main([*TINY_RUN, "--model", str(tiny_dir), "--out", str(out), "--eval-size", "1", keep])
        assert rlino.is_finished(out) and (out / "model" / "config.json").exists()
        assert len(rlino.checkpoint_paths(out)) == (keep == "--final-checkpoint")
        sizes[keep] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"run folder bytes: {sizes}")
    line = fails_with_one_line(["--resume", str(tmp_path / "--no-final-checkpoint"), "--steps", "3"], capsys)
    assert "kept no checkpoint" in line


def test_adamw_state_allocated_at_the_start_steps_as_allocated_by_its_first_step(tiny, mixed):
    """allocate_adamw_state: AdamW's state exists before the first update (8 bytes a parameter) and two steps
    give the same weights and state, bit for bit, as AdamW's own allocation in its first step."""
    model, _ = tiny
    rollout, rewards, _ = mixed
    cfg = resolved(algo="grpo", lr=1e-3)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    results = []
    for allocate in (True, False):
        model.load_state_dict(start)
        optimizer = rlino.make_optimizer(model, cfg)
        if allocate:
            rlino.allocate_adamw_state(optimizer)
            assert all(optimizer.state[p]["exp_avg_sq"].shape == p.shape for p in model.parameters())
        for _ in range(2):
            one_step(model, optimizer, rollout, rewards, cfg)
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        results.append((weights, optimizer.state_dict()["state"]))
    (weights, state), (lazy_weights, lazy_state) = results
    assert all(torch.equal(weights[k], lazy_weights[k]) for k in weights)
    assert all(torch.equal(state[i][k], lazy_state[i][k]) for i in state for k in state[i])
    assert not torch.equal(weights["lm_head.weight"], start["lm_head.weight"])


def test_cuda_memory_may_grow_in_place_unless_the_user_says_otherwise(tiny_dir, tmp_path, monkeypatch):
    """main sets PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True before any CUDA allocation, unless set."""
    monkeypatch.setattr(tasks.get_task("arith"), "reward", toy_reward)
    for before, after in ((None, "expandable_segments:True"), ("garbage_collection_threshold:0.9", None)):
        if before is None:
            monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
        else:
            monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", before)
        rlino.main([*TINY_RUN, "--model", str(tiny_dir), "--out", str(tmp_path / str(before)), "--eval-size",
                    "1", "--steps", "1"])
        assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == (after or before)


def test_nonfinite_updates_are_skipped_then_stop(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(tasks.get_task("arith"), "reward", alternating_reward())
    real = rlino.objective

    def nan_loss(*args, **kwargs):
        loss, sums = real(*args, **kwargs)
        return loss * float("nan"), torch.cat([sums[:1] * float("nan"), sums[1:]])  # sums[0]: the loss
    monkeypatch.setattr(rlino, "objective", nan_loss)
    run = [*TINY_RUN, "--algo", "fisft+-", "--model", str(tiny_dir), "--eval-size", "1"]
    rlino.main([*run, "--out", str(tmp_path / "a"), "--steps", "2", "--max-nonfinite", "3"])
    lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()][1:]
    # NaN -> null in JSON
    assert [x["skipped_nonfinite"] for x in lines] == [1, 1] and lines[0]["loss"] is None
    from transformers import AutoModelForCausalLM
    before = AutoModelForCausalLM.from_pretrained(tiny_dir).state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "model").state_dict()
    # every update skipped: no NaN in the weights
    assert all(torch.equal(before[n], after[n]) for n in before)
    with pytest.raises(SystemExit) as exit_info:
        rlino.main([*run, "--out", str(tmp_path / "b"), "--steps", "5", "--max-nonfinite", "2"])
    assert "2 updates in a row had a non-finite loss or gradient" in str(exit_info.value.code)
    # eval at 0, then steps 1 and 2
    assert len((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()) == 3


def test_cuda_out_of_memory_halves_the_batch_until_it_fits(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tasks.get_task("arith"), "reward", alternating_reward())
    real_logprobs, real_sample = rlino.completion_logprobs, rlino.sample

    def logprobs_fitting_two_rows(model, rows, **kwargs):
        if rows.completion_ids.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_logprobs(model, rows, **kwargs)

    def sample_fitting_one_prompt(model, prompts, *args, **kwargs):
        if len(prompts) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_sample(model, prompts, *args, **kwargs)

    monkeypatch.setattr(rlino, "completion_logprobs", logprobs_fitting_two_rows)
    monkeypatch.setattr(rlino, "sample", sample_fitting_one_prompt)
    out = tmp_path / "run"
    rlino.main([*TINY_RUN, "--model", str(tiny_dir), "--out", str(out), "--micro-batch", "8",
                "--sample-batch", "2", "--eval-size", "2", "--eval-batch", "2"])
    printed = capsys.readouterr().out
    assert "retrying with --sample-batch 1" in printed and "retrying with --eval-batch 1" in printed
    assert "retrying with --micro-batch 4" in printed and "retrying with --micro-batch 2" in printed
    assert (out / "model").exists()
    monkeypatch.setattr(rlino, "sample",
                        lambda *a, **k: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("x")))
    at_one = ["--sample-batch", "1", "--eval-size", "1", "--eval-batch", "1"]
    line = fails_with_one_line([*TINY_RUN, "--model", str(tiny_dir), "--out", str(tmp_path / "b"), *at_one],
                               capsys, code=1)
    assert "CUDA out of memory even at --eval-batch 1" in line


# ---------------------------------------------------------------------- faults: nothing lost, nothing crashes
def fails_with_one_line(argv: list[str], capsys, *, code: int = 2, main=rlino.main) -> str:
    """main(argv) (rlino's) ends with `code` and one line: 'rlino: error: ...' (exit 2, printed on stderr) or
    'rlino: stopped: ...' (exit 1: sys.exit's message); returns that line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    if code == 2:
        lines = [x for x in err.splitlines() if x.startswith("rlino: error:")]
        assert exit_info.value.code == 2 and len(lines) == 1, err
        return lines[0]
    assert str(exit_info.value.code).startswith("rlino: stopped:"), exit_info.value.code
    return str(exit_info.value.code)


@pytest.fixture()
def finished_run(tiny_dir, tmp_path, monkeypatch) -> Path:
    """A finished 2-step run of the tiny model with a checkpoint per step (toy reward: some groups mixed)."""
    monkeypatch.setattr(tasks.get_task("arith"), "reward", toy_reward)
    out = tmp_path / "run"
    rlino.main([*TINY_RUN, "--model", str(tiny_dir), "--out", str(out), "--save-every", "1",
                "--keep-checkpoints", "3", "--eval-size", "2"])
    return out


def logged_steps(run: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]


BAD_FLAGS = [(["--lr", "nan"], "--lr"), (["--lr", "-1"], "--lr"), (["--lr", "inf"], "--lr"),
             (["--weight-decay", "nan"], "--weight-decay"), (["--seed", "-1"], "--seed"),
             (["--seed", str(2**40)], "--seed"), (["--device", "foo"], "--device"),
             (["--warmup-steps", "-1"], "--warmup-steps"), (["--warmup-steps", "-3"], "--warmup-steps"),
             (["--eval-size", "-3"], "--eval-size"), (["--beta", "-1"], "--beta"),
             (["--max-grad-norm", "-1"], "--max-grad-norm"), (["--max-grad-norm", "nan"], "--max-grad-norm"),
             (["--keep-checkpoints", "0"], "--keep-checkpoints"),
             (["--keep-checkpoints", "-1"], "--keep-checkpoints"),
             (["--eval-samples", "-2"], "--eval-samples"), (["--max-nonfinite", "0"], "--max-nonfinite"),
             (["--temperature", "0"], "--temperature"), (["--temperature", "1e-30"], "--temperature"),
             (["--temperature", "nan"], "--temperature"), (["--clip-eps", "5"], "--clip-eps"),
             (["--format-reward", "1"], "--format-reward"),
             (["--max-new-tokens", "100000"], "--max-new-tokens"),
             (["--weight-decay", "-1"], "--weight-decay"), (["--lr", "abc"], "--lr"),
             (["--eval-temperature", "nan"], "--eval-temperature"), (["--eval-top-p", "0"], "--eval-top-p")]


BAD_INPUT = {  # what the user gives (in a tmp folder beside a tiny model), and what the one line names
    "--task chess": (lambda tmp, tiny: ["--task", "chess"], "chess"),
    "--algo dpo": (lambda tmp, tiny: ["--algo", "dpo"], "dpo"),
    "no such model": (lambda tmp, tiny: ["--model", str(tmp / "no-such-model")], "no-such-model"),
    "unreadable data": (lambda tmp, tiny: ["--task", "gsm8k", "--data-dir",
                                           str(gsm8k_data_dir(tmp / "d", ["{not json"]))], "valid fields"),
    "data without fields": (lambda tmp, tiny: ["--task", "gsm8k", "--data-dir",
                                               str(gsm8k_data_dir(tmp / "d", ['{"q": 1}', '{"x": 2}']))],
                            "valid fields"),
    "the run exists": (lambda tmp, tiny: ["--out", str(HERE)], "already exists"),
    "--steps 0": (lambda tmp, tiny: ["--steps", "0"], "--steps"),
    **{" ".join(flags): (lambda tmp, tiny, flags=flags: flags, named) for flags, named in BAD_FLAGS}}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_one_line_and_exit_2(case, tiny_dir, tmp_path, capsys):
    """Every flag and input is checked before anything runs (finite, in range, within the model's context,
    readable data, a new run folder): one line 'rlino: error: ...' naming it, exit code 2, no traceback."""
    given, named = BAD_INPUT[case]
    line = fails_with_one_line([*TINY_RUN, "--model", str(tiny_dir), "--out", str(tmp_path / "r"),
                                *given(tmp_path, tiny_dir)], capsys)
    assert named in line, line
    print(case, "->", line)


def test_an_out_that_cannot_be_a_folder_is_one_line(tiny_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for out, says in ((tmp_path / "file", "not a folder"), (tmp_path / "file" / "run", "cannot create")):
        assert says in fails_with_one_line([*TINY_RUN, "--model", str(tiny_dir), "--out", str(out)], capsys)


def test_resume_refuses_flags_it_would_ignore_and_records_new_steps(finished_run, capsys):
    """With --resume only --steps may change: other flags are refused, a new --steps is saved in config.json;
    an older rlino's settings are read: an unset one that this version no longer has, a renamed one
    (ppo_epochs, now mu), and a removed one at the value that means what rlino does now."""
    for flags, named in ((["--lr", "1"], "--lr"), (["--eval-only"], "--eval-only")):
        assert named in fails_with_one_line(["--resume", str(finished_run), *flags], capsys)
    assert "already ran 2 steps" in fails_with_one_line(["--resume", str(finished_run)], capsys)
    config = json.loads((finished_run / "config.json").read_text())
    older = {**{k: v for k, v in config.items() if k != "mu"}, "table": None, "ppo_epochs": 1,
             "sampler_decode": "dynamic"}
    (finished_run / "config.json").write_text(json.dumps(older))
    rlino.main(["--resume", str(finished_run), "--steps", "3"])
    assert json.loads((finished_run / "config.json").read_text())["steps"] == 3
    assert logged_steps(finished_run) == [0, 1, 2, 3]


@pytest.mark.parametrize("edit, says", [
    (lambda c: {**c, "task": "chess"}, "--task"), (lambda c: {**c, "loss_agg": "mean"}, "--loss-agg"),
    (lambda c: {**c, "colour": "red"}, "unknown setting colour"), (lambda c: {**c, "lr": "fast"}, "--lr"),
    (lambda c: {**c, "grad_ckpt": "yes"}, "grad_ckpt"), (lambda c: {**c, "clip_eps": 5}, "--clip-eps"),
    (lambda c: "{not json", "not a valid config")])
def test_a_saved_config_is_checked_like_the_command_line(finished_run, capsys, edit, says):
    """A hand-edited config.json meets the command line's checks: one line, exit 2."""
    config = json.loads((finished_run / "config.json").read_text())
    edited = edit(config)
    (finished_run / "config.json").write_text(edited if isinstance(edited, str) else json.dumps(edited))
    assert says in fails_with_one_line(["--resume", str(finished_run), "--steps", "3"], capsys)


class StopAlwaysRequested:
    """A StopSignal whose Ctrl-C has already come."""
    requested = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def test_a_stop_ends_with_a_checkpoint_and_exit_3_and_at_the_last_step_finishes(tiny_dir, tmp_path,
                                                                                monkeypatch):
    """Ctrl-C / SIGTERM: after the step, a checkpoint and exit code 3 (unfinished); during the last step the
    run is finished instead (model/, eval.json), so that no printed command has to train one step more."""
    monkeypatch.setattr(tasks.get_task("arith"), "reward", toy_reward)
    monkeypatch.setattr(rlino, "StopSignal", StopAlwaysRequested)
    args = [*TINY_RUN, "--model", str(tiny_dir), "--eval-size", "2"]
    with pytest.raises(SystemExit) as exit_info:
        rlino.main([*args, "--out", str(tmp_path / "a")])
    assert exit_info.value.code == rlino.EXIT_PAUSED == 3 and not (tmp_path / "a" / "model").exists()
    assert [p.name for p in rlino.checkpoint_paths(tmp_path / "a")] == ["step-1.pt"]
    rlino.main(["--resume", str(tmp_path / "a")])  # the last step: finished although a stop was asked for
    assert (tmp_path / "a" / "eval.json").exists() and logged_steps(tmp_path / "a") == [0, 1, 2]


def test_a_kill_while_the_model_is_written_is_finished_by_resume(finished_run):
    """kill -9 while model/ was written (model.tmp left, no eval.json, no summary.json): --resume writes
    model/ and eval.json from the logged evaluation, without training or logging a step again."""
    shutil.rmtree(finished_run / "model")
    (finished_run / "eval.json").unlink()
    (finished_run / "summary.json").unlink()
    (finished_run / "model.tmp").mkdir()
    (finished_run / "model.tmp" / "config.json").write_text('{"torn')
    before = (finished_run / "metrics.jsonl").read_text()
    rlino.main(["--resume", str(finished_run)])
    assert (finished_run / "model" / "config.json").exists() and not (finished_run / "model.tmp").exists()
    assert rlino.is_finished(finished_run)
    assert (finished_run / "metrics.jsonl").read_text() == before
    final = json.loads(before.splitlines()[-1])
    assert json.loads((finished_run / "eval.json").read_text())["eval_accuracy"] == final["eval_accuracy"]


def test_a_run_stopped_before_its_first_checkpoint_starts_again(finished_run, tiny_dir, capsys):
    """Stopped during its first evaluation (config.json, no checkpoint): a plain rerun says to use --resume,
    which starts the run again from step 0 with nothing deleted by hand."""
    shutil.rmtree(finished_run / "checkpoints")
    shutil.rmtree(finished_run / "model")
    (finished_run / "eval.json").unlink()
    (finished_run / "summary.json").unlink()
    line = fails_with_one_line([*TINY_RUN, "--model", str(tiny_dir), "--out", str(finished_run)], capsys)
    assert f"--resume {finished_run}" in line
    rlino.main(["--resume", str(finished_run)])
    assert logged_steps(finished_run) == [0, 1, 2] and (finished_run / "eval.json").exists()


def test_resume_falls_back_to_the_newest_checkpoint_that_loads(finished_run, capsys):
    """A truncated latest checkpoint and a stray file: resume names the bad one and goes on from the one
    before; the logs are cut back to it, so no step is logged twice."""
    latest = rlino.checkpoint_paths(finished_run)[-1]
    latest.write_bytes(latest.read_bytes()[:1000])
    (finished_run / "checkpoints" / "step-final.pt").write_text("not a checkpoint")
    with (finished_run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "reward_me')  # a torn line, as a kill mid-write leaves it
    rlino.main(["--resume", str(finished_run), "--steps", "3"])
    assert f"checkpoint {latest} does not load" in capsys.readouterr().err
    assert logged_steps(finished_run) == [0, 1, 2, 3]


def test_a_run_folder_in_use_is_refused_and_eval_only_never_overwrites(finished_run, tiny_dir, capsys):
    """The lock: a second process cannot train, resume or evaluate into a folder in use; --eval-only never
    writes over a run's eval.json."""
    with rlino.run_dir_lock(finished_run):
        assert "in use" in fails_with_one_line(["--resume", str(finished_run), "--steps", "3"], capsys)
    args = ["--eval-only", "--model", str(tiny_dir), "--task", "arith", "--eval-size", "2", "--out"]
    assert "never overwrites" in fails_with_one_line([*args, str(finished_run)], capsys)


def test_a_full_disk_while_saving_stops_with_one_line(tiny_dir, tmp_path, monkeypatch, capsys):
    """A write error during a checkpoint: the partial file removed, the previous checkpoint intact,
    one line."""
    real_save = torch.save

    def save_until_the_disk_is_full(state, path):
        if state["step"] == 2:
            Path(path).write_bytes(b"partial")
            raise OSError(28, "No space left on device")
        real_save(state, path)

    monkeypatch.setattr(torch, "save", save_until_the_disk_is_full)
    out = tmp_path / "run"
    line = fails_with_one_line([*TINY_RUN, "--model", str(tiny_dir), "--out", str(out), "--save-every", "1"],
                               capsys, code=1)
    assert f"cannot write {out / 'checkpoints' / 'step-2.pt'} (No space left" in line
    assert f"--resume {out} " in line
    assert not list((out / "checkpoints").glob("*.tmp"))
    assert torch.load(rlino.checkpoint_paths(out)[-1], weights_only=False)["step"] == 1


class DiskFullsUp:
    """A file opened for appending whose write puts part of a line on disk, then fails as a full disk does."""

    def __init__(self, file):
        self.file = file

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()

    def write(self, text: str):
        self.file.write(text[:len(text) // 2])
        self.file.flush()
        raise OSError(28, "No space left on device")


@pytest.mark.parametrize("log", ["metrics.jsonl", "samples.jsonl"])
def test_a_full_disk_while_logging_stops_with_one_line_and_resume_goes_on(log, tiny_dir, tmp_path,
                                                                         monkeypatch, capsys):
    """The disk fills up while step 2's line is appended to a log: one line `rlino: stopped: ...` (exit 1),
    the step-1 checkpoint intact; once there is space, --resume cuts the torn line and finishes the run,
    every step logged once."""
    monkeypatch.setattr(tasks.get_task("arith"), "reward", toy_reward)
    real_open, appends = Path.open, []

    def open_until_the_disk_is_full(self, mode="r", *args, **kwargs):
        file = real_open(self, mode, *args, **kwargs)
        if self.name == log and mode == "a":
            appends.append(self)
            if len(appends) == 3:  # metrics.jsonl: steps 0, 1, then 2; samples.jsonl: step 1 twice, then 2
                return DiskFullsUp(file)
        return file

    monkeypatch.setattr(Path, "open", open_until_the_disk_is_full)
    out = tmp_path / "run"
    line = fails_with_one_line([*TINY_RUN, "--model", str(tiny_dir), "--out", str(out), "--save-every", "1",
                                "--eval-size", "2"], capsys, code=1)
    assert f"cannot write {out / log} (No space left on device)" in line and f"--resume {out}" in line
    assert [p.name for p in rlino.checkpoint_paths(out)] == ["step-1.pt"]
    assert not (out / "eval.json").exists()
    monkeypatch.setattr(Path, "open", real_open)
    rlino.main(["--resume", str(out)])
    assert logged_steps(out) == [0, 1, 2] and rlino.is_finished(out)
    assert [json.loads(x)["step"] for x in (out / "samples.jsonl").read_text().splitlines()] == [1, 1, 2, 2]
    rollout_steps = [json.loads(x)["step"] for x in (out / "rollouts.jsonl").read_text().splitlines()]
    assert rollout_steps == [1] * 8 + [2] * 8  # cut back to step 1 by the resume, as the other logs


@pytest.mark.parametrize("breakage", ["summary.json missing", "summary.json torn"])
def test_a_kill_while_the_summary_is_written_is_finished_by_resume(breakage, finished_run):
    """kill -9 after model/ and eval.json, while summary.json was written (its .tmp left, or the file cut
    short): --resume writes the summary from the logs, without training or logging a step again."""
    summary = (finished_run / "summary.json").read_text()
    if breakage == "summary.json missing":
        (finished_run / "summary.json").rename(finished_run / "summary.json.tmp")
    else:
        (finished_run / "summary.json").write_text(summary[:len(summary) // 2])
    assert not rlino.is_finished(finished_run)
    before = (finished_run / "metrics.jsonl").read_text()
    rlino.main(["--resume", str(finished_run)])
    assert rlino.is_finished(finished_run) and (finished_run / "summary.json").read_text() == summary
    assert (finished_run / "metrics.jsonl").read_text() == before


def test_non_finite_weights_never_reach_the_sampler(tiny_dir, tmp_path, monkeypatch, capsys):
    """An update that leaves a non-finite weight stops the run with one line naming the step; the sampler
    itself refuses non-finite probabilities."""
    monkeypatch.setattr(tasks.get_task("arith"), "reward", alternating_reward())
    real = rlino.train_step

    def poisoned(model, *args, **kwargs):  # an update that overflows one weight
        stats = real(model, *args, **kwargs)
        next(model.parameters()).data.fill_(float("inf"))
        return stats

    monkeypatch.setattr(rlino, "train_step", poisoned)
    line = fails_with_one_line([*TINY_RUN, "--model", str(tiny_dir), "--out", str(tmp_path / "r")],
                               capsys, code=1)
    assert "non-finite in the update of step 1" in line
    model, _ = rlino.load_model(str(tiny_dir), torch.device("cpu"))
    model.lm_head.weight.data[3, 0] = float("nan")  # one logit NaN: its row's softmax, and so its CDF
    with pytest.raises(rlino.RunStopped, match="non-finite"):
        rlino.sample(model, [[5, 6, 7]], max_new_tokens=4, stop_ids=[2], temperature=1.0)


def test_readers_skip_a_torn_line_and_bad_outputs_are_one_line(tmp_path, capsys):
    """bench/table.py and bench/plot.py read a run with a torn last line (with a note); a bad --out or config
    is one line."""
    run = write_run(tmp_path / "a", "grpo", 0)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "rew')
    bench_module("table").main([str(run)])
    assert "skipped 1 line(s)" in capsys.readouterr().err
    plot = bench_module("plot").main
    for out in (tmp_path / "fig.txt", tmp_path / "no-such-folder" / "fig.png"):
        assert ".png" in fails_with_one_line([str(run), "--out", str(out)], capsys, main=plot)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "seed"}))
    png = str(tmp_path / "f.png")
    assert "lacks 'seed'" in fails_with_one_line([str(run), "--out", png], capsys, main=plot)


def test_a_second_ctrl_c_is_one_line(monkeypatch, capsys, tiny_dir, tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(rlino, "train", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        rlino.main([*TINY_RUN, "--model", str(tiny_dir), "--out", str(tmp_path / "r")])
    assert exit_info.value.code == 130 and capsys.readouterr().err.strip() == "rlino: interrupted"


@pytest.mark.parametrize("breakage", ["truncated weights", "wrong type in config.json"])
def test_a_model_folder_that_fails_to_load_is_one_line(breakage, tiny_dir, tmp_path, capsys):
    broken = tmp_path / "model"
    shutil.copytree(tiny_dir, broken)
    if breakage == "truncated weights":
        weights = broken / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        config = json.loads((broken / "config.json").read_text())
        (broken / "config.json").write_text(json.dumps({**config, "hidden_size": "big"}))
    line = fails_with_one_line([*TINY_RUN, "--model", str(broken), "--out", str(tmp_path / "r")], capsys)
    assert "cannot load model" in line


SLOW_SAVE_LAUNCHER = """
import sys, time, torch
sys.path.insert(0, {here!r})
import rlino, tasks, test_rlino
tasks.get_task("arith").reward = test_rlino.toy_reward
real_save = torch.save
def save(state, path):
    if state["step"] == 3 and {kill!r}:  # the kill comes while step 3's checkpoint is half written
        open(path, "wb").write(b"half a checkpoint")
        print("SAVING", flush=True)
        time.sleep(120)
    real_save(state, path)
torch.save = save
rlino.main(sys.argv[1:])
"""


def test_kill_9_during_a_checkpoint_write_then_resume(tiny_dir, tmp_path):
    """kill -9 while a checkpoint is written, then --resume: the previous checkpoint loads, no step is logged
    twice, and the final weights equal those of an uninterrupted run."""
    import signal
    args = [*TINY_RUN, "--model", str(tiny_dir), "--steps", "5", "--save-every", "1", "--eval-size", "2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for name, kill in (("straight", False), ("killed", True)):
        launcher = tmp_path / f"{name}.py"
        launcher.write_text(SLOW_SAVE_LAUNCHER.format(here=str(HERE), kill=kill))
        proc = subprocess.Popen([sys.executable, str(launcher), *args, "--out", str(tmp_path / name)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        if kill:
            for line in proc.stdout:
                if line.startswith("SAVING"):
                    proc.send_signal(signal.SIGKILL)
                    break
        output = proc.stdout.read()
        proc.wait(timeout=300)
    assert proc.returncode == -signal.SIGKILL, output
    resumed = subprocess.run([sys.executable, str(tmp_path / "straight.py"), "--resume",
                              str(tmp_path / "killed")],
                             capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert logged_steps(tmp_path / "killed") == [0, 1, 2, 3, 4, 5]
    from transformers import AutoModelForCausalLM
    straight = AutoModelForCausalLM.from_pretrained(tmp_path / "straight" / "model").state_dict()
    killed = AutoModelForCausalLM.from_pretrained(tmp_path / "killed" / "model").state_dict()
    assert all(torch.equal(straight[n], killed[n]) for n in straight)
    assert any(not torch.equal(straight[n], AutoModelForCausalLM.from_pretrained(tiny_dir).state_dict()[n])
               for n in straight), "the run must have updated the weights"


# --------------------------------------------------------------------------- the command line

def test_config_parser_exposes_every_field():
    helptext = rlino.build_parser().format_help()
    for f in rlino.dataclasses.fields(rlino.Config):
        assert "--" + f.name.replace("_", "-") in helptext
    args = rlino.build_parser().parse_args(["--group-size", "7", "--no-scale-adv", "--loss-agg", "token"])
    assert (args.group_size, args.scale_adv, args.loss_agg) == (7, False, "token")


def test_resolve_config_presets_and_overrides():
    cpu = rlino.resolve_config({"lr": 3e-4}, torch.device("cpu"))
    assert cpu.lr == 3e-4 and cpu.group_size == rlino.Config.group_size and cpu.preset == "cpu"
    cuda = rlino.resolve_config({}, torch.device("cuda"))
    assert (cuda.group_size, cuda.temperature, cuda.lr, cuda.prompts_per_step, cuda.max_new_tokens) == \
        (5, 0.6, 1e-6, 64, 1024)
    assert cuda.grad_ckpt and not cpu.grad_ckpt  # the paper's shape needs it on a GPU (README: "What fits")
    assert not rlino.resolve_config({"grad_ckpt": False}, torch.device("cuda")).grad_ckpt
    assert rlino.resolve_config({"preset": "cuda"}, torch.device("cpu")).max_new_tokens == 1024
    assert rlino.resolve_config({"preset": "cpu"}, torch.device("cuda")).max_new_tokens == 160
    with pytest.raises(rlino.UsageError):
        rlino.resolve_config({"group_size": 1}, torch.device("cpu"))


def run_cli(*args, cwd=None, timeout=300, env=None) -> subprocess.CompletedProcess:
    """python rlino.py ARGS in a subprocess (hub offline unless `env` says otherwise)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"} if env is None else env
    return subprocess.run([sys.executable, str(HERE / "rlino.py"), *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def gsm8k_data_dir(tmp_path: Path, lines: list[str]) -> Path:
    """A data folder whose GSM8K train and test splits hold these lines."""
    (tmp_path / "gsm8k").mkdir(parents=True)
    for split in ("train", "test"):
        (tmp_path / "gsm8k" / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_sigterm_saves_a_checkpoint_and_resume_goes_on(tiny_dir, tmp_path):
    import signal
    out = tmp_path / "run"
    args = ["--task", "arith", "--model", str(tiny_dir), "--steps", "200", "--prompts-per-step", "2",
            "--group-size", "2", "--max-new-tokens", "4", "--eval-size", "1", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, str(HERE / "rlino.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    for line in proc.stdout:
        if line.startswith("iter 2:"):
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stdout.read()
    assert proc.wait(timeout=120) == rlino.EXIT_PAUSED, rest  # stopped, unfinished
    assert "continue with: python rlino.py --resume" in rest
    stopped_at = rlino.checkpoint_paths(out)[-1]
    step = int(stopped_at.stem.split("-")[1])
    assert 2 <= step < 200
    result = run_cli("--resume", str(out), "--steps", str(step + 2))
    assert result.returncode == 0, result.stderr
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(step + 3)) and (out / "model" / "config.json").exists()


def test_run_sh_leaves_the_hub_reachable(tmp_path):
    """./run.sh demo runs rlino without setting HF_HUB_OFFLINE: with a network, data and models come from the
    hub (a stand-in python prints what run.sh hands it)."""
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text('#!/bin/sh\necho "HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-unset} $*"\n')
    python.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    done = subprocess.run([str(HERE / "run.sh"), "demo", "--steps", "1"],
                          env={**env, "VENV": str(tmp_path / "venv")},
                          capture_output=True, text=True, timeout=60)
    assert (done.stdout.strip()
            == "HF_HUB_OFFLINE=unset rlino.py --algo grpo --task gsm8k --steps 1"), done.stderr


def test_run_sh_paper_runs_the_papers_columns(tmp_path):
    """./run.sh paper ROW (a stand-in python prints what run.sh hands it): GRPO with the paper's KL, GRPO
    without, F-ISFT+, F-ISFT+− (and F-ISFT− on Countdown) on the row's model, task and bare prompts,
    evaluated greedily and as the authors sampled; PAPER_MODEL replaces the model; finished runs are kept,
    stopped ones resumed; then the table. PPO=1 adds a PPO arm."""
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text('#!/bin/sh\necho "$*"\n')
    python.chmod(0o755)

    def paper(row: str, **env) -> list[str]:
        done = subprocess.run([str(HERE / "run.sh"), "paper", row, "--steps", "1"], capture_output=True,
                              text=True, timeout=60, env={**os.environ, "VENV": str(tmp_path / "venv"),
                                                          "PAPER_DIR": str(tmp_path / "runs"), **env})
        assert done.returncode == 0, done.stderr
        return done.stdout.splitlines()

    lines = paper("qwen05-gsm8k")
    common = ("rlino.py --model Qwen/Qwen2.5-0.5B --task gsm8k-paper --prompt-format plain --eval-samples 1 "
              "--eval-temperature 1.0 --eval-top-p 0.95 --steps 1 ")
    runs = tmp_path / "runs" / "qwen05-gsm8k"
    assert lines == [common + f"--algo grpo --beta 0.001 --out {runs}-grpo",
                     common + f"--algo grpo --out {runs}-grpo-nokl",
                     common + f"--algo fisft+ --out {runs}-fisft+",
                     common + f"--algo fisft+- --out {runs}-fisft+-",
                     f"bench/table.py {runs}-grpo {runs}-grpo-nokl {runs}-fisft+ {runs}-fisft+-"]
    for arm, left in (("grpo", "summary.json"), ("grpo-nokl", "config.json"), ("fisft+", "lock")):
        (tmp_path / "runs" / f"qwen05-gsm8k-{arm}").mkdir(parents=True)
        (tmp_path / "runs" / f"qwen05-gsm8k-{arm}" / left).write_text("{}")  # finished, stopped, killed early
    again = paper("qwen05-gsm8k", PAPER_MODEL="tiny")
    assert again[0] == f"rlino.py --resume {runs}-grpo-nokl" and "--model tiny " in again[1]
    assert again[1].endswith(f"--algo fisft+ --out {runs}-fisft+") and not Path(f"{runs}-fisft+").exists()
    countdown = paper("qwen05-countdown")
    assert len(countdown) == 6 and "--task countdown" in countdown[0] and "--algo fisft- " in countdown[4]
    with_ppo = paper("llama1b-gsm8k", PPO="1")  # the optional PPO arm, last
    assert with_ppo[4].endswith(f"--algo ppo --out {tmp_path / 'runs'}/llama1b-gsm8k-ppo")
    assert len(with_ppo) == 6 and with_ppo[5].endswith("llama1b-gsm8k-ppo")


def test_gsm8k_comes_from_the_hub_without_a_data_folder(tiny_dir, tmp_path, monkeypatch):
    """Without a data folder GSM8K comes from datasets.load_dataset('openai/gsm8k', 'main') (stubbed: the hub
    is out of reach in tests) and trains as from a local folder."""
    calls = []

    def load_dataset(path, config, split):
        calls.append((path, config, split))
        return [{"question": f"What is {i} + 1?", "answer": f"... #### {i + 1}"} for i in range(8)]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.delenv("RLINO_DATA_DIR", raising=False)
    rlino.main([*TINY_RUN, "--task", "gsm8k", "--model", str(tiny_dir), "--out", str(tmp_path / "run"),
                "--steps", "1"])
    assert calls == [("openai/gsm8k", "main", "train"), ("openai/gsm8k", "main", "test")]
    assert (tmp_path / "run" / "model" / "config.json").exists()


def test_offline_local_data_and_model_train_and_missing_data_is_one_line(tiny_dir, tmp_path):
    """The hub made unreachable (HF_ENDPOINT at a closed local port, an empty HF_HOME, HF_HUB_OFFLINE unset):
    a local data folder and a local model train; without the data folder, one line names both ways."""
    rows = [json.dumps({"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"}) for i in range(8)]
    gsm8k_data_dir(tmp_path / "data", rows)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "RLINO_DATA"))}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))
    args = [*TINY_RUN, "--task", "gsm8k", "--model", str(tiny_dir), "--steps", "1"]
    trained = run_cli(*args, "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "a"), env=env)
    assert trained.returncode == 0 and (tmp_path / "a" / "eval.json").exists(), trained.stderr[-2000:]
    start = time.time()
    missing = run_cli(*args, "--out", str(tmp_path / "b"), env=env)
    errors = [x for x in missing.stderr.splitlines() if x.startswith("rlino: error:")]
    assert missing.returncode == 2 and len(errors) == 1 and "Traceback" not in missing.stderr, missing.stderr
    assert "--data-dir" in errors[0] and "RLINO_DATA_DIR" in errors[0] and "hub" in errors[0]
    print(f"offline, no data folder: {time.time() - start:.1f} s -> {errors[0]}")


def test_gpu_check_runs_at_tiny_size_on_the_cpu(tmp_path):
    """bench/gpu_check.py (./run.sh gpu-check) with --device cpu --size tiny, its tests phase left out (this
    suite is it): every measurement short of CUDA runs, every gate passes, and the JSON and markdown table
    are written, so that the GPU check cannot rot unseen. (bench/rehearse_gpu_check.sh runs it as a lease
    would, under transformers 5.17.)"""
    gpu_check = bench_module("gpu_check")
    results = gpu_check.main(["--device", "cpu", "--size", "tiny", "--no-tests", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    table = (tmp_path / "gpu_check.md").read_text()
    assert saved.keys() == results.keys() and not results["failed_gates"], results["failed_gates"]
    assert {"greedy", "logprobs", "finite", "memory", "syncs"} <= results["gates"].keys()
    print(table)


def test_the_length_score_weights_give_the_gradient_of_a_mean_length():
    """bench/incentive.py's estimator (./run.sh incentive), exactly: over K outcomes with probabilities
    softmax(theta) at theta = 0 (uniform, so that the K outcomes once each are the population), mean_k h_k
    grad log p_k is autograd's gradient of the mean length of the incorrect outcomes, of the correct ones and
    of all; and the leave-one-out baseline is G / (G - 1) times the group-mean one."""
    incentive = bench_module("incentive")
    lengths = torch.tensor([3.0, 10.0, 7.0, 40.0, 12.0, 25.0])
    correct = torch.tensor([True, False, False, True, False, False])
    theta = torch.zeros(6, requires_grad=True)
    p = theta.softmax(0)
    score = torch.eye(6) - p.detach()                                        # (K, K): row k = grad log p_k
    everything = torch.ones(6, dtype=torch.bool)
    for quantity, chosen in (("wrong", ~correct), ("right", correct), ("all", everything)):
        c = chosen.float()
        mean_length = (p * c * lengths).sum() / (p * c).sum()
        exact = torch.autograd.grad(mean_length, theta, retain_graph=True)[0]
        h = incentive.length_score_weights(lengths, correct, quantity)
        torch.testing.assert_close((h[:, None] * score).mean(0), exact, msg=quantity)
        assert exact.abs().max() > 0.1
    assert incentive.length_score_weights(lengths, torch.ones(6, dtype=torch.bool), "wrong") is None
    h = torch.tensor([1.0, 2.0, 6.0, 5.0, 5.0, 5.0])
    centred = h.view(2, 3) - h.view(2, 3).mean(1, keepdim=True)
    torch.testing.assert_close(incentive.leave_one_out_centred(h, 3), (1.5 * centred).view(-1))


def test_each_arms_step_is_dotted_with_the_probe_gradient_and_the_policy_is_put_back(tiny, mixed, device):
    """bench/incentive.py: an arm's step leaves the weights and AdamW's state as they were (the same step
    twice, every arm from the same point), and grad log pi(o_i) . delta_a is the first-order change of each
    probe completion's log-likelihood: (log pi_{theta + delta} - log pi_{theta - delta}) / 2."""
    incentive = bench_module("incentive")
    model, _ = tiny
    rollout, rewards, _ = mixed
    probe = random_rollout(n_prompts=2, group_size=2, seed=5, device=device)
    cfg = resolved(lr=1e-4, max_new_tokens=12, micro_batch=3)
    optimizer = rlino.make_optimizer(model, cfg)
    before = parameters(model)
    steps = [incentive.arm_step(model, optimizer, rollout, rewards, cfg, algo, agg, rlino.NO_AMP)
             for algo, agg in (("grpo", "seq"), ("fisft-", "seq"), ("grpo", "seq"))]
    assert all(torch.equal(a, b) for a, b in zip(parameters(model), before)) and not optimizer.state
    assert all(torch.equal(a, b) for a, b in zip(steps[0], steps[2]))
    assert not all(torch.equal(a, b) for a, b in zip(steps[0], steps[1]))
    directions = incentive.score_directions(model, probe, steps[:2], cfg, rlino.NO_AMP)   # (N, 2)

    def loglik(shift) -> torch.Tensor:
        with torch.no_grad():
            for p, b, d in zip(model.parameters(), before, shift):
                p.copy_(b + d)
            return rlino.completion_logprobs(model, probe, temperature=cfg.temperature).sum(-1)

    for a, step in enumerate(steps[:2]):
        central = (loglik(step) - loglik([-d for d in step])) / 2
        torch.testing.assert_close(directions[:, a].to(device), central, rtol=1e-3, atol=1e-5)
        assert directions[:, a].abs().max() > 1e-3


# --------------------------------------------------------------------------- data parallel (torchrun, gloo)
LAUNCHER = """
import os, signal, sys
sys.path.insert(0, {here!r})
import torch, rlino, tasks, test_rlino
tasks.get_task("arith").reward = test_rlino.alternating_reward()  # every group mixed, whatever the rank
rank, real_logprobs = os.environ.get("RANK", "0"), rlino.completion_logprobs
real_train_step = rlino.train_step


def logprobs(model, rows, **kwargs):  # with OOM_RANK: that rank runs out of memory above OOM_ROWS rows
    if rank == os.environ.get("OOM_RANK") and len(rows.lengths) > int(os.environ["OOM_ROWS"]):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
    return real_logprobs(model, rows, **kwargs)


def optimise(*args, **kwargs):  # with SIGTERM_RANK: that rank alone gets a SIGTERM in step 1
    if rank == os.environ.get("SIGTERM_RANK") and not os.environ.get("SIGNALLED"):
        os.environ["SIGNALLED"] = "1"
        os.kill(os.getpid(), signal.SIGTERM)
    return real_train_step(*args, **kwargs)


def gloo_threads() -> int:  # torch names them gloo_tcp_loop and pt_gloo_runloop; -1 without /proc
    tasks_dir = "/proc/self/task"
    if not os.path.isdir(tasks_dir):
        return -1
    return sum("gloo" in open(os.path.join(tasks_dir, t, "comm")).read() for t in os.listdir(tasks_dir))


def setup_distributed(device):  # counts gloo's threads once the group exists
    joined = real_setup_distributed(device)
    sys.stderr.write("gloo threads at start: %d\\n" % gloo_threads())  # one write: the ranks share stderr
    return joined


real_setup_distributed = rlino.setup_distributed
rlino.completion_logprobs, rlino.train_step, rlino.setup_distributed = logprobs, optimise, setup_distributed
try:
    rlino.main(sys.argv[1:])
finally:
    sys.stderr.write("gloo threads after main: %d\\n" % gloo_threads())  # one write: the ranks share stderr
"""


def launch(tmp_path, args: list[str], *, ranks: int, timeout: int = 300,
           **env) -> subprocess.CompletedProcess:
    """The tiny run through LAUNCHER, on one process or on `ranks` gloo ranks (torchrun). A rank that aborts
    prints its Python stacks (PYTHONFAULTHANDLER) into the stderr that the tests' assertions show."""
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER.format(here=str(HERE)))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    return subprocess.run([*(torchrun if ranks > 1 else [sys.executable]), str(launcher), *args],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                               "PYTHONFAULTHANDLER": "1", **env})


def two_rank_args(tiny_dir, args: list[str]) -> list[str]:
    # even eval counts keep the rewards aligned
    return [*TINY_RUN, "--model", str(tiny_dir), "--prompts-per-step", "4", "--sample-batch", "2",
            "--eval-size", "4", "--lr", "1e-3", *args]


def metrics_and_parameters(tmp_path, names: tuple[str, ...]) -> tuple[dict, dict]:
    """Each run folder's metrics lines and final parameters."""
    from transformers import AutoModelForCausalLM
    metrics = {n: [json.loads(x) for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
               for n in names}
    params = {n: AutoModelForCausalLM.from_pretrained(tmp_path / n / "model").state_dict() for n in names}
    return metrics, params


def one_and_two_processes(tiny_dir, tmp_path, args: list[str]) -> tuple[dict, dict]:
    """The tiny run on one process and on 2 gloo ranks: each one's metrics lines and last parameters."""
    for name, ranks in (("one", 1), ("two", 2)):
        done = launch(tmp_path, [*two_rank_args(tiny_dir, args), "--out", str(tmp_path / name)], ranks=ranks)
        assert done.returncode == 0, done.stderr[-3000:]
    # Each rank's group is freed by the time main returns, its gloo threads with it: a group kept alive (by
    # torch.distributed.nn imported after it) frees them during Python's exit, where one can abort the rank.
    started, left = (re.findall(rf"gloo threads {when}: (\d+)", done.stderr)
                     for when in ("at start", "after main"))
    if sys.platform == "linux":  # thread names come from /proc
        assert len(started) == 2 and all(int(n) > 0 for n in started), done.stderr[-3000:]
        assert left == ["0", "0"], done.stderr[-3000:]
    return metrics_and_parameters(tmp_path, ("one", "two"))


def test_two_processes_under_bf16_autocast_stay_near_one_process(tiny_dir, tmp_path):
    """DDP under bf16 autocast (--dtype auto on CUDA and AVX512-BF16 CPUs), one step, rollouts from the fp32
    policy so that both draw the same samples: one process and two ranks put the rows in other micro-batches
    and so round differently in bf16 (8 bits of mantissa, ~0.4 % a rounding), so they agree only to within a
    tolerance: 5 % on the loss terms and the gradient norm, as the in-process bf16 test allows, and the
    parameter step (Adam's, which amplifies the rounding of near-zero gradient entries) within 10 % in
    relative L2 norm."""
    tiny = make_tiny_model(tmp_path / "start")
    from transformers import AutoModelForCausalLM
    start = AutoModelForCausalLM.from_pretrained(tiny).state_dict()
    metrics, params = one_and_two_processes(tiny, tmp_path, ["--steps", "1", "--dtype", "bfloat16",
                                                             "--mu", "2", "--beta", "0.05"])
    for a, b in zip(metrics["one"], metrics["two"]):
        for key in ("reward_mean", "len_mean", "eval_n"):
            assert a.get(key) == b.get(key), key
        for key in ("loss", "kl", "grad_norm"):
            assert a.get(key, 0) == pytest.approx(b.get(key, 0), rel=0.05, abs=1e-6), key
    assert metrics["one"][1]["grad_norm"] > 0 and metrics["one"][1]["kl"] > 0
    steps = {n: torch.cat([(params[n][k] - start[k]).flatten() for k in sorted(start)]) for n in params}
    relative = ((steps["one"] - steps["two"]).norm() / steps["one"].norm()).item()
    print(f"bf16 autocast, 1 vs 2 ranks: parameter step relative L2 difference {relative:.2e}")
    assert relative < 0.10


def test_an_out_of_memory_error_on_one_rank_halves_every_rank_and_cannot_hang(tiny_dir, tmp_path):
    """Rank 1 alone runs out of memory on micro-batches of 4 rows: both ranks agree, halve to 2 and go on,
    and the run equals one started at 2; out of memory even at 1 row, every rank stops with one line. A hang
    would end in the subprocess timeout."""
    common = two_rank_args(tiny_dir, ["--steps", "1"])
    t0 = time.time()
    halved = launch(tmp_path, [*common, "--micro-batch", "4", "--out", str(tmp_path / "oom")], ranks=2,
                    timeout=180, OOM_RANK="1", OOM_ROWS="2")
    assert halved.returncode == 0, halved.stderr[-3000:]
    assert "retrying with --micro-batch 2" in halved.stdout
    print(f"2 ranks, one out of memory, halved: {time.time() - t0:.1f} s")
    started = launch(tmp_path, [*common, "--micro-batch", "2", "--out", str(tmp_path / "at2")], ranks=2)
    assert started.returncode == 0, started.stderr[-3000:]
    metrics, params = metrics_and_parameters(tmp_path, ("oom", "at2"))
    assert len(metrics["oom"]) == len(metrics["at2"]) == 2
    for a, b in zip(*(map(comparable, metrics[n]) for n in ("oom", "at2"))):
        assert a == b, {k: (v, b.get(k)) for k, v in a.items() if v != b.get(k)}
    for name in params["oom"]:
        assert torch.equal(params["oom"][name], params["at2"][name]), name
    t0 = time.time()
    stopped = launch(tmp_path, [*common, "--micro-batch", "1", "--out", str(tmp_path / "never")], ranks=2,
                     timeout=180, OOM_RANK="1", OOM_ROWS="0")
    assert stopped.returncode != 0
    assert stopped.stderr.count("rlino: stopped: CUDA out of memory even at --micro-batch 1") == 2, \
        stopped.stderr[-3000:]
    print(f"2 ranks, one out of memory at 1 row, stopped: {time.time() - t0:.1f} s")


def test_a_stop_signal_to_one_rank_stops_every_rank_after_the_step(tiny_dir, tmp_path):
    """SIGTERM reaches rank 1 alone in step 1: the ranks agree, step 1 is checkpointed, and both stop with
    exit code 3 (unfinished) instead of rank 0 going on alone into step 2."""
    run = tmp_path / "run"
    done = launch(tmp_path, [*two_rank_args(tiny_dir, ["--steps", "3"]), "--out", str(run)], ranks=2,
                  timeout=180, SIGTERM_RANK="1")
    assert done.returncode != 0 and "stopped at step 1" in done.stdout, done.stdout + done.stderr[-3000:]
    assert f"exitcode  : {rlino.EXIT_PAUSED}" in done.stderr  # torchrun's report of its failed ranks
    assert [p.name for p in rlino.checkpoint_paths(run)] == ["step-1.pt"] and logged_steps(run) == [0, 1]


# --------------------------------------------------------------------------- tasks: verifiers and data
DATA_DIR = os.environ.get("RLINO_DATA_DIR")
needs_data = pytest.mark.skipif(
    not (DATA_DIR and os.path.isdir(DATA_DIR)),
    reason="set RLINO_DATA_DIR to the data directory (e.g. ../shared/data) to run this")

GSM8K = {"question": "How much?", "answer": "She makes 9 * 2 = <<9*2=18>>18.\n#### 18"}
GSM8K_BIG = {"question": "How much?", "answer": "... #### 1,000"}
GSM8K_NEG = {"question": "Change?", "answer": "... #### -3"}
MATH = {"problem": "p", "solution": "s", "answer": "\\frac{1}{2}"}
MATH_TUPLE = {"problem": "p", "solution": "s", "answer": "\\left( 3, \\frac{\\pi}{2} \\right)"}
COUNTDOWN = {"nums": [79, 17, 60], "target": 36}


def timed_reward(task_name, completion, example, **kwargs):
    start = time.perf_counter()
    score = get_task(task_name).reward(completion, example, **kwargs)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"{task_name} took {elapsed:.2f} s on {completion[:60]!r}"
    return score


# -------------------------------------------------------------------------------------------- verifier tables
@pytest.mark.parametrize("completion, example, expected", [
    ("so she makes \\boxed{18} dollars.", GSM8K, 1.0),
    ("\\boxed{18.00}", GSM8K, 1.0),
    ("\\boxed{\\$18}", GSM8K, 1.0),
    ("\\boxed{18 \\text{ dollars}}", GSM8K, 1.0),
    ("work\n#### 18", GSM8K, 1.0),
    ("The answer is: $18.", GSM8K, 1.0),
    ("THE ANSWER IS 18", GSM8K, 1.0),
    ("16 - 3 - 4 = 9 eggs, 9 * 2 = 18", GSM8K, 1.0),  # last number
    ("\\boxed{17} (I first thought 18)", GSM8K, 0.0),  # boxed wins over later numbers
    ("\\boxed{18} then \\boxed{19}", GSM8K, 0.0),  # the last box counts
    ("\\boxed{-18}", GSM8K, 0.0),  # the sign is kept
    ("\\boxed{1,000}", GSM8K_BIG, 1.0),
    ("\\boxed{\\$1,000}", GSM8K_BIG, 1.0),
    ("\\boxed{1000.0}", GSM8K_BIG, 1.0),
    ("\\boxed{100}", GSM8K_BIG, 0.0),
    ("\\boxed{1,0001}", GSM8K_BIG, 0.0),  # not a thousands separator: reads as 1
    ("\\boxed{-3}", GSM8K_NEG, 1.0),
    ("\\boxed{3}", GSM8K_NEG, 0.0),
    ("\\boxed{١٨}", GSM8K, 0.0),  # unicode digits are not numbers
    ("no numbers here", GSM8K, 0.0),
    ("\\boxed{18", GSM8K, 1.0),  # unclosed box: falls back to the last number
    ("", GSM8K, 0.0),
])
def test_gsm8k_reward(completion, example, expected):
    assert timed_reward("gsm8k", completion, example) == expected


@pytest.mark.parametrize("given, expected", [
    ("\\frac{1}{2}", 1.0), ("\\dfrac{1}{2}", 1.0), ("\\tfrac12", 1.0), ("\\frac12", 1.0), ("\\frac 12", 1.0),
    ("0.5", 1.0), (".5", 1.0), ("1/2", 1.0), ("x = \\frac{1}{2}", 1.0), ("\\left(\\frac{1}{2}\\right)", 1.0),
    ("\\frac{2}{4}", 1.0), ("\\frac{\\sqrt{2}}{\\sqrt{8}}", 1.0),
    ("2", 0.0), ("-\\frac{1}{2}", 0.0), ("0.50001", 0.0), ("\\frac{1}{3}", 0.0), ("\\frac{1}{0}", 0.0),
    ("", 0.0), ("\\text{one half}", 0.0), ("\\frac{1}{2", 0.0),
])
def test_math_reward_fraction(given, expected):
    assert timed_reward("math", f"Thus the answer is $\\boxed{{{given}}}$.", MATH) == expected


@pytest.mark.parametrize("given, gold, expected", [
    ("(3, \\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("(3, \\pi/2)", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("(3, \\pi)", "\\left( 3, \\frac{\\pi}{2} \\right)", False),
    ("(3,4)", "(3,4]", False),
    ("90", "90^\\circ", True), ("90^{\\circ}", "90", True), ("50\\%", "50", True), ("18.9", "\\$18.90", True),
    ("10080", "10,\\!080", True), ("11111111100", "11,\\! 111,\\! 111,\\! 100", True),
    ("15", "15\\mbox{ cm}^2", True), ("5.4", "5.4 \\text{ cents}", True),
    ("\\frac{270}{7}", "\\frac{270}7\\text{ degrees}", True),
    ("\\text{(B)}", "\\text{(B)}", True), ("B", "\\text{(B)}", True), ("(C)", "\\text{(B)}", False),
    ("\\text{Evelyn}", "\\text{Evelyn}", True), ("Evelyn", "\\text{Navin}", False),
    ("x = 5", "5", True), ("y=2x+3", "y = 2x + 3", True), ("[-2,7]", "x \\in [-2,7]", True),
    ("\\sqrt{20}", "2\\sqrt{5}", True), ("2\\sqrt{6}", "2\\sqrt{5}", False),
    ("11\\sqrt{2}", "11\\sqrt2", True),
    ("-q + p", "p - q", True), ("(b+2)(a+5)", "(a+5)(b+2)", True),
    ("2(k+1)", "2k+2", True), ("2k+1", "2k+2", False),
    ("(x+1)^2", "x^2+2x+1", True), ("(x+1)^2", "x^2+2x+2", False),
    ("1-12i", "1 - 12i", True), ("\\sqrt{-4}", "2i", True),
    ("\\frac{1}{\\sqrt{3}}", "\\frac{\\sqrt{3}}{3}", True),
    ("6.72\\times10^{-5}", ".0000672", True), ("0.333333", "\\frac{1}{3}", False), ("3.14159", "\\pi", False),
    ("3, 5, 7", "3, 5, 7", True), ("7, 5, 3", "3, 5, 7", False), ("(-\\infty, 0]", "(-\\infty, 0]", True),
    ("\\begin{pmatrix} -1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}-1\\\\2\\end{pmatrix}", True),
    ("4210_{5}", "4210_5", True), ("4211_5", "4210_5", False),
    ("\\sqrt{2}\\sqrt{3}-\\sqrt{6}", "0", True), ("10^{-30}", "0", False),
    ("2^{90}", "1237940039285380274899124224", True),
])
def test_math_equal(given, gold, expected):
    assert timed_reward("math", f"\\boxed{{{given}}}", {"answer": gold}) == float(expected)


def test_math_boxed_forms():
    assert timed_reward("math", "so \\boxed 5$.", {"answer": "5"}) == 1.0
    assert timed_reward("math", "\\fbox{5}", {"answer": "5"}) == 1.0
    assert timed_reward("math", "\\boxed{4} no wait \\boxed{5}", {"answer": "5"}) == 1.0
    assert timed_reward("math", "\\boxed{5} no wait \\boxed{4}", {"answer": "5"}) == 0.0
    assert timed_reward("math", "the answer is 5", {"answer": "5"}) == 0.0  # MATH wants a box
    assert timed_reward("math", "\\boxed{\\{1,2\\}}", {"answer": "\\{1,2\\}"}) == 1.0  # escaped braces
    assert get_task("math").extract_answer("a \\boxed{\\frac{1}{2}} b") == "\\frac{1}{2}"
    assert get_task("math").extract_answer("\\boxed{5} \\boxed{") is None


@pytest.mark.parametrize("completion, expected", [
    ("<think>79+17=96, 96-60=36</think>\n<answer>(79 + 17) - 60</answer>", 1.0),
    ("<answer>79+17-60</answer>", 1.0),
    ("<answer> 17 - 60 + 79 </answer>", 1.0),
    ("<answer>60 - (79 - 17) + 34</answer>", 0.0),  # a number not given
    ("<answer>79 - 17 - 60</answer>", 0.0),  # wrong value
    ("<answer>96 - 60</answer>", 0.0),  # numbers not as given
    ("<answer>79 + 17 - 60 + 60 - 60</answer>", 0.0),  # a number used twice
    ("<answer>79 + 17 - 60 = 36</answer>", 0.0),
    ("<answer>(79 + 17) - 60</answer> then <answer>79 - 17 - 60</answer>", 0.0),  # the last answer counts
    ("<answer>79 - 17 - 60</answer> then <answer>79 + 17 - 60</answer>", 1.0),
    ("<answer>79.0 + 17 - 60</answer>", 0.0),
    ("<answer>79 + 17 - 60", 0.0),  # half-closed tag
    ("79 + 17 - 60 </answer>", 0.0),
    ("<answer>79 // 1 + 17 - 60</answer>", 0.0),
    ("<answer>0x4F + 17 - 60</answer>", 0.0),
    ("<answer>79 + 17 - 60 / 0</answer>", 0.0),
    ("<answer>__import__('os').system('true')</answer>", 0.0),
    ("<answer>9**9**9</answer>", 0.0),
    ("<answer>٧٩ + 17 - 60</answer>", 0.0),
    ("(79 + 17) - 60", 0.0),  # no tags
])
def test_countdown_reward(completion, expected):
    assert timed_reward("countdown", completion, COUNTDOWN) == expected


def test_countdown_division():
    assert timed_reward("countdown", "<answer>(8 / 3) * 3 + 1</answer>",
                        {"nums": [8, 3, 3, 1], "target": 9}) == 1.0
    assert timed_reward("countdown", "<answer>(1 + 2) / 3</answer>", {"nums": [1, 2, 3], "target": 1}) == 1.0


def test_format_reward():
    assert get_task("gsm8k").reward("\\boxed{17}", GSM8K, format_reward=0.1) == 0.1
    assert get_task("gsm8k").reward("17", GSM8K, format_reward=0.1) == 0.0  # not boxed
    assert get_task("gsm8k").reward("\\boxed{18}", GSM8K, format_reward=0.1) == 1.0
    assert get_task("math").reward("\\boxed{2}", MATH, format_reward=0.1) == 0.1
    assert get_task("countdown").reward("<answer>1 + 2</answer>", COUNTDOWN, format_reward=0.1) == 0.1
    assert get_task("countdown").reward("<answer>1 + 2", COUNTDOWN, format_reward=0.1) == 0.0
    assert get_task("countdown").reward("<answer>1 + 2</answer>", COUNTDOWN) == 0.0  # off by default


ADVERSARIAL = [
    "a" * 100_000, "1" * 100_000, "{" * 100_000,
    "\\boxed{" * 10_000, "<answer>" * 12_500, "</answer>" * 10_000,
    "\\boxed{" + "(" * 10_000 + "1" + ")" * 10_000 + "}",
    "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}",
    "<answer>" + "(" * 10_000 + "79+17-60" + ")" * 10_000 + "</answer>",
    "<answer>" + "-" * 251 + "(79+17-60)</answer>",
    "\\boxed{١٢}", "<answer>١٢</answer>", "\\boxed{", "<answer> 79+17-60", "<answer>9**9**9</answer>",
    "<answer>__import__('os').system('ls')</answer>", "\\boxed{__import__('os')}", "\\boxed{10^{10^{10}}}",
    "\\boxed{(10^{30})^{100}}", "\\boxed{((10^{30})^{100})^{100}}",
    "\\boxed{2^{2^{2^{2^{2}}}}}", "\\boxed{99^{99}^{99}}",
    "\\boxed{\\sqrt{99^{100}+1}}", "\\boxed{\\sqrt[10^{10}]{2}}",
    "\\boxed{\\frac{1}{0}}", "\\boxed{" + "(x+1)^{100}" * 8 + "}",
    "\\boxed{" + "\\sqrt{" * 40 + "2" + "}" * 40 + "}", "\\boxed{" + "9^{" * 30 + "9" + "}" * 30 + "}",
    "\\boxed{(\\sqrt{2}+1)^{100}-(\\sqrt{2}-1)^{-100}}",
    "\\boxed{" + "-" * 90 + "1}", "\\boxed{" + "1/" * 400 + "1}",
    "\\boxed{" + "\\text{ a}" * 5_000 + "}", "\\boxed{" + "a " * 49_000 + "}", "\\boxed " + "1" * 100_000,
    "The answer is " + "9" * 5_000, "#### " + "1," * 50_000, "\\fbox{" + "(" * 300 + ")" * 300 + "}",
    "<answer>" + "99*" * 60 + "1</answer>", "<answer>1/(1-1)</answer>", "\x00\ud800\uffff" * 1000,
    # sympy took 79 s to build this one
    "\\boxed{\\sqrt{(((y)^{7})^{99}+\\frac{i}{y}\\cdot \\sqrt[9]{x})^{33}}}",
    "\\boxed{" + "x^{" * 19 + "x" + "}" * 19 + "}", "\\boxed{" + "(10^{999})^{999}" * 6 + "}",
]


def run_adversarial():
    slowest = 0.0
    for completion in ADVERSARIAL:
        for name, example in (("gsm8k", GSM8K), ("math", MATH), ("countdown", COUNTDOWN)):
            start = time.perf_counter()
            score = get_task(name).reward(completion, example, format_reward=0.1)
            get_task(name).extract_answer(completion)
            slowest = max(slowest, time.perf_counter() - start)
            assert score in (0.0, 0.1), (name, completion[:60], score)
    return slowest


def test_adversarial_inputs_fail_closed_and_fast():
    assert run_adversarial() < 1.0


def test_adversarial_inputs_in_a_worker_thread():  # no SIGALRM there: the size guards alone must hold
    result = []
    worker = threading.Thread(target=lambda: result.append(run_adversarial()))
    worker.start()
    worker.join(timeout=60)
    assert result and result[0] < 1.0


def test_non_string_inputs_score_zero():
    for name, example in (("gsm8k", GSM8K), ("math", MATH), ("countdown", COUNTDOWN)):
        assert get_task(name).reward(None, example) == 0.0
        assert get_task(name).reward("\\boxed{18} <answer>1</answer>", {}) == 0.0


def test_no_eval_exec_compile_in_source():
    for module in (tasks, rlino):
        source = open(module.__file__, encoding="utf-8").read()
        for banned in ("eval(", "exec(", "compile("):
            assert not re.search(r"(?<![\w.])" + re.escape(banned), source), (module.__name__, banned)


def test_no_code_path_turns_model_text_into_code(monkeypatch):
    """Run every verifier with eval / exec / compile booby-trapped:
    only ast.parse's parse-only compile may run."""
    import ast
    import builtins
    real_compile = builtins.compile

    def parse_only(source, filename, mode, flags=0, *args, **kwargs):
        assert flags & ast.PyCF_ONLY_AST, "compile() to code was called on model text"
        return real_compile(source, filename, mode, flags, *args, **kwargs)

    def forbidden(*args, **kwargs):
        raise AssertionError("eval/exec was called on model text")

    monkeypatch.setattr(builtins, "compile", parse_only)
    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    for completion in ADVERSARIAL[:12] + ["<answer>__import__('os').system('touch /tmp/pwned')</answer>",
                                          "<answer>(79 + 17) - 60</answer>", "\\boxed{\\frac{1}{2}}"]:
        for name, example in (("gsm8k", GSM8K), ("math", MATH), ("countdown", COUNTDOWN)):
            assert get_task(name).reward(completion, example) in (0.0, 1.0)


# --------------------------------------------------------------------------------------------- fuzzing
FRAGMENTS = ["\\boxed{", "\\fbox{", "}", "{", "<answer>", "</answer>", "<think>", "####", "The answer is",
             "(", ")", "\\frac", "\\sqrt", "^", "_", "-", "+", "*", "/", "**", "=", ",", ".", "$", "%",
             "\\left(", "\\right)", "\\text{", "\\pi", "x", "i", "e", " ", "\n", "١٢", "٣", "²", "½",
             "∞", "9" * 40, "1e308", "nan", "inf", "__import__('os')", "lambda: 0", "\\dfrac{", "\\infty",
             "10^{10^{10}}"]
fuzz_text = st.one_of(
    st.text(max_size=300),                                                   # random unicode
    st.lists(st.sampled_from(FRAGMENTS), max_size=80).map("".join),          # near-miss formats
    st.tuples(st.sampled_from(FRAGMENTS), st.integers(1, 20_000)).map(lambda t: t[0] * t[1]),  # deep nesting
    # huge numbers
    st.integers(-10**60, 10**60).map(lambda n: f"\\boxed{{{n}}} <answer>{n}</answer> #### {n}"),
    # 100 kB
    st.builds(lambda a, b: a + "x" * 100_000 + b, st.sampled_from(FRAGMENTS), st.sampled_from(FRAGMENTS)),
)
FUZZ_STATS = {"examples": 0, "slowest": 0.0}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(completion=fuzz_text, nums=st.lists(st.integers(-5, 200), min_size=0, max_size=5),
       target=st.integers(-100, 10_000))
def test_fuzz_verifiers_never_raise_are_fast_and_binary(completion, nums, target):
    examples = {"gsm8k": GSM8K, "math": MATH, "countdown": {"nums": nums, "target": target}}
    for name, example in examples.items():
        start = time.perf_counter()
        score = get_task(name).reward(completion, example)
        elapsed = time.perf_counter() - start
        FUZZ_STATS["examples"] += 1
        FUZZ_STATS["slowest"] = max(FUZZ_STATS["slowest"], elapsed)
        assert score in (0.0, 1.0) and elapsed < 1.0, (name, completion[:80], score, elapsed)


def test_fuzz_report():
    """Prints what the fuzz test saw (run with -s); runs after it in file order."""
    print(f"fuzz: {FUZZ_STATS['examples']} verifier calls, slowest {FUZZ_STATS['slowest'] * 1000:.1f} ms")


# ------------------------------------------------------------------------------------ gold self-verification
@needs_data
def test_gsm8k_gold_answers_score_one():
    task = get_task("gsm8k")
    examples = task.load("test", DATA_DIR)
    assert len(examples) == 1319
    failures = []
    for ex in examples:
        gold = ex["answer"].split("####")[-1].strip()
        for completion in (f"...reasoning... The answer is \\boxed{{{gold}}}.",
                           f"...reasoning... The answer is \\boxed{{{gold.replace(',', '')}}}.",
                           f"...reasoning...\n#### {gold}", f"So the answer is {gold}."):
            if task.reward(completion, ex) != 1.0:
                failures.append(completion)
        wrong = int(gold.replace(",", "")) + 1
        if task.reward(f"\\boxed{{{wrong}}}", ex) != 0.0 or task.reward(f"The answer is {wrong}", ex) != 0.0:
            failures.append(wrong)
    assert not failures, failures[:10]


@needs_data
def test_math500_gold_answers_score_one():
    task = get_task("math")
    examples = task.load("test", DATA_DIR)
    assert len(examples) == 500
    failures = [ex["answer"] for ex in examples
                if task.reward(f"...reasoning... The answer is $\\boxed{{{ex['answer']}}}$.", ex) != 1.0]
    print(f"MATH-500 gold: {500 - len(failures)}/500")
    assert not failures, failures


@needs_data
def test_math500_gold_answers_rewritten_still_score_one():
    # The same answers written differently: \dfrac, no spaces, no \left/\right,
    # a leading "x = " is not needed.
    task = get_task("math")
    failures = []
    for ex in task.load("test", DATA_DIR):
        variant = re.sub(r"\\left|\\right", "", ex["answer"].replace("\\frac", "\\dfrac")).replace(" ", "")
        if task.reward(f"\\boxed{{{variant}}}", ex) != 1.0:
            failures.append((variant, ex["answer"]))
    assert not failures, failures


@needs_data
def test_math500_other_gold_answers_score_zero():
    answers = [ex["answer"] for ex in get_task("math").load("test", DATA_DIR)]
    accepted = [(a, b) for i, a in enumerate(answers) for b in answers[i + 1:i + 6]
                if a != b and math_equal(a, b)]
    assert accepted == [("5", "x=5")]  # the only pair in reach that really is the same answer


@needs_data
def test_countdown_solver_and_verifier_on_test_set():
    task = get_task("countdown")
    examples = task.load("test", DATA_DIR)
    assert len(examples) == 1024
    for ex in examples:
        expression = solve_countdown(ex["nums"], ex["target"])
        assert expression is not None, ex
        assert task.reward(f"<think>...</think>\n<answer>{expression}</answer>", ex) == 1.0, (ex, expression)
        assert task.reward(f"<answer>{expression}</answer>", {**ex, "target": ex["target"] + 1}) == 0.0
        assert task.reward(f"<answer>{expression} + 1</answer>", ex) == 0.0


# -------------------------------------------------------------------------------------------------- generator
def test_countdown_generator():
    problems = generate_countdown(300, seed=1)
    assert problems == generate_countdown(300, seed=1)
    assert problems != generate_countdown(300, seed=2)
    assert generate_countdown(100, seed=1) == problems[:100]
    assert {len(p["nums"]) for p in problems} == {3, 4}
    for p in problems:
        assert 10 <= p["target"] <= 100 and all(1 <= n <= 99 for n in p["nums"])
        assert solve_countdown(p["nums"], p["target"]) is not None


def test_countdown_generator_excludes():
    problems = generate_countdown(200, seed=3)
    banned = {(p["target"], tuple(sorted(p["nums"]))) for p in problems[:100]}
    kept = generate_countdown(200, seed=3, exclude=banned)
    assert not banned & {(p["target"], tuple(sorted(p["nums"]))) for p in kept}


@needs_data
def test_countdown_train_is_disjoint_from_test():
    task = get_task("countdown")
    test = {(p["target"], tuple(sorted(p["nums"]))) for p in task.load("test", DATA_DIR)}
    train = task.load("train", DATA_DIR, limit=500, seed=0)
    assert len(train) == 500 and not test & {(p["target"], tuple(sorted(p["nums"]))) for p in train}


def test_solve_countdown():
    assert solve_countdown([79, 17, 60], 36) is not None
    assert solve_countdown([1, 1], 5) is None
    assert solve_countdown([5], 5) == "5"
    assert solve_countdown([], 5) is None


def test_arith_reason_asks_for_reasoning_on_arith_problems():
    """arith-reason: arith's problems and splits, with GSM8K's step-by-step and \\boxed{} instruction."""
    reason, arith = get_task("arith-reason"), get_task("arith")
    assert (reason.load("test") == arith.load("test")
            and reason.load("train", seed=3) == arith.load("train", seed=3))
    example = reason.load("test")[0]
    assert reason.prompt_messages(example)[0]["content"].endswith("final answer within \\boxed{}.")
    assert reason.reward(f"... so \\boxed{{{example['answer']}}}.", example) == 1.0


def test_arith_is_synthetic_seeded_and_disjoint():
    task = get_task("arith")
    test, train = task.load("test"), task.load("train")
    assert len(test) == 200 and len(train) == 2 * 20 * 20 - 200
    assert not {p["question"] for p in test} & {p["question"] for p in train}
    assert (task.load("train", seed=5, limit=50) == task.load("train", seed=5, limit=50)
            != task.load("train", limit=50))
    for p in test[:50]:
        a, op, b = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", p["question"]).groups()
        assert int(p["answer"]) == (int(a) + int(b) if op == "+" else int(a) - int(b))
        assert task.reward(f"so \\boxed{{{p['answer']}}}", p) == 1.0
        assert task.reward(f"{a} {op} {b} = {p['answer']}", p) == 1.0  # the bare answer it asks for
    assert get_task("arith").prompt_messages(test[0])[0]["content"].endswith("Answer with just the number.")


def test_sum_chain_is_every_four_term_sum_split_once_and_read_like_gsm8k():
    """sum-chain (experiment 4): the 625 sums of four terms in 1..5, 125 test / 500 train, disjoint, the train
    order seeded; the last \\boxed{} is read, else the last number."""
    task = get_task("sum-chain")
    test, train = task.load("test"), task.load("train")
    assert len(test) == 125 and len(train) == 500
    assert len({p["question"] for p in test} | {p["question"] for p in train}) == 625
    assert task.load("train", seed=5) == task.load("train", seed=5) != train
    for p in test:
        terms = [int(t) for t in re.fullmatch(r"What is (\d) \+ (\d) \+ (\d) \+ (\d)\?",
                                              p["question"]).groups()]
        assert all(1 <= t <= 5 for t in terms) and int(p["answer"]) == sum(terms)
    example = test[0]
    assert task.prompt_messages(example)[0]["content"].startswith(example["question"] + " Please reason")
    assert task.reward(f"1 + 2 = 3 ... so \\boxed{{{example['answer']}}}.", example) == 1.0
    assert task.reward(f"the sum is {example['answer']}", example) == 1.0
    assert task.reward(f"\\boxed{{{int(example['answer']) + 1}}} or {example['answer']}", example) == 0.0


# ----------------------------------------------------------------------------------------------- data loading
def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


GOOD = {"gsm8k": {"question": "q", "answer": "#### 1"}, "math": {"problem": "p", "answer": "1"},
        "countdown": COUNTDOWN}


def load_one_good_one_bad(tmp_path, capsys, task, bad):
    """Load a test split of one good record and `bad`: the good one is kept, the bad one counted on stderr."""
    write_jsonl(tmp_path / task / "test.jsonl", [GOOD[task], bad])
    assert get_task(task).load("test", str(tmp_path)) == [GOOD[task]]
    assert "skipped 1 of 2 records with missing or bad fields" in capsys.readouterr().err


@pytest.mark.parametrize("line", [
    "[" * 100_000 + "]" * 100_000,                                # nested past the recursion limit
    '{"a": ' * 100_000 + "1" + "}" * 100_000,
    "[" * 100_000,                                                # ... and never closed
    '{"question": "q", "answer": ' + "9" * 5_000 + "}",           # past Python's 4,300-digit int limit
    '{"question": "q", "answer": "#### 1"',                       # not JSON
])
def test_load_skips_lines_that_do_not_parse(tmp_path, capsys, line):
    """A line json.loads refuses (too deep, huge integer, broken) is a skipped record, no traceback."""
    load_one_good_one_bad(tmp_path, capsys, "gsm8k", line)


@pytest.mark.parametrize("task, bad", [
    ("gsm8k", {"question": "x" * 10_000_000, "answer": "#### 1"}),     # a 10 MB question
    ("gsm8k", {"question": "q", "answer": "#### 1" + " " * tasks.MAX_TEXT_CHARS}),
    ("gsm8k", {"question": ["q"], "answer": "#### 1"}),
    ("gsm8k", {"question": "q", "answer": 1}),
    ("gsm8k", '{"question": "q \\ud800", "answer": "#### 1"}'),        # a lone surrogate: no UTF-8 form
    ("math", {"problem": "p" * (tasks.MAX_TEXT_CHARS + 1), "answer": "1"}),
    ("math", {"problem": "p", "answer": None}),
    ("math", {"problem": {"text": "p"}, "answer": "1"}),
])
def test_load_skips_text_fields_of_bad_type_or_size(tmp_path, capsys, task, bad):
    """Text fields must be strings of at most MAX_TEXT_CHARS characters that the tokenizer can encode."""
    load_one_good_one_bad(tmp_path, capsys, task, bad)


def test_load_keeps_text_of_the_maximum_length(tmp_path):
    """MAX_TEXT_CHARS itself is allowed."""
    record = {"problem": "p" * tasks.MAX_TEXT_CHARS, "answer": "1"}
    write_jsonl(tmp_path / "math" / "test.jsonl", [record])
    assert get_task("math").load("test", str(tmp_path)) == [record]


@pytest.mark.parametrize("bad", [
    {"target": 36, "nums": [[79], 17, 60]},                         # a list inside
    {"target": 36, "nums": [79, "17", 60.0]},                       # mixed types
    {"target": 36, "nums": ["79", "17", "60"]},                     # strings: every right answer scored 0
    {"target": 36, "nums": [True, 17, 60]},                         # bools are no numbers here
    {"target": 36, "nums": []},
    {"target": 36, "nums": [-79, 17, 60]},
    {"target": 36, "nums": [0, 17, 60]},
    {"target": 36, "nums": [tasks.MAX_COUNTDOWN_NUM + 1, 17, 60]},
    {"target": 36, "nums": [1] * (tasks.MAX_COUNTDOWN_NUMS + 1)},
    {"target": 36, "nums": "79 17 60"},
    {"target": 36},
    {"target": "36", "nums": [79, 17, 60]},
    {"target": 36.0, "nums": [79, 17, 60]},
    {"target": True, "nums": [79, 17, 60]},
    {"target": None, "nums": [79, 17, 60]},
    {"target": tasks.MAX_COUNTDOWN_TARGET + 1, "nums": [79, 17, 60]},
])
def test_load_skips_countdown_records_of_bad_type_or_size(tmp_path, capsys, bad):
    """nums: 1 to MAX_COUNTDOWN_NUMS ints (no bools) in 1..MAX_COUNTDOWN_NUM; target: an int within bounds."""
    load_one_good_one_bad(tmp_path, capsys, "countdown", bad)


def test_load_keeps_countdown_records_at_the_bounds(tmp_path):
    """The largest problem allowed loads and is scored."""
    record = {"target": -tasks.MAX_COUNTDOWN_TARGET,
              "nums": [tasks.MAX_COUNTDOWN_NUM] * tasks.MAX_COUNTDOWN_NUMS}
    write_jsonl(tmp_path / "countdown" / "test.jsonl", [record, {"target": 5, "nums": [5]}])
    rows = get_task("countdown").load("test", str(tmp_path))
    assert rows == [record, {"target": 5, "nums": [5]}]
    assert get_task("countdown").reward("<answer>5</answer>", rows[1]) == 1.0


def test_load_all_records_of_bad_type_is_one_line_error(tmp_path):
    """Only bad records (here nums as strings) is the usual one-line DataError."""
    write_jsonl(tmp_path / "countdown" / "test.jsonl", [{"target": 36, "nums": ["79", "17", "60"]}])
    with pytest.raises(DataError, match="none of the 1 records has valid fields nums, target") as err:
        get_task("countdown").load("test", str(tmp_path))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("task, bad", [
    ("gsm8k", {"question": "x" * 10_000_000, "answer": "#### 1"}),
    ("countdown", {"target": 36, "nums": ["79", "17", "60"]}),
])
def test_hub_records_are_validated_too(monkeypatch, capsys, task, bad):
    """Rows from the hub go through the same checks as local files."""
    monkeypatch.delenv("RLINO_DATA_DIR", raising=False)
    monkeypatch.setattr(tasks, "hub_rows", lambda path, config, split: [GOOD[task], bad])
    assert get_task(task).load("test") == [GOOD[task]]
    assert "skipped 1 of 2 records with missing or bad fields" in capsys.readouterr().err


def test_load_local_skips_bad_records(tmp_path, capsys):
    write_jsonl(tmp_path / "gsm8k" / "train.jsonl",
                [{"question": "q1", "answer": "#### 1"}, {"question": "q2"}, "not json",
                 {"question": "q3", "answer": 3}, {"question": "q4", "answer": "#### 4"}])
    rows = get_task("gsm8k").load("train", str(tmp_path))
    assert [r["question"] for r in rows] == ["q1", "q4"]
    assert "skipped 3 of 5" in capsys.readouterr().err
    assert get_task("gsm8k").load("train", str(tmp_path), limit=1) == rows[:1]


def test_load_all_bad_records_is_an_error(tmp_path):
    write_jsonl(tmp_path / "math" / "test.jsonl", [{"problem": "p"}, "]"])
    with pytest.raises(DataError):
        get_task("math").load("test", str(tmp_path))


def test_load_unreadable_file_is_an_error(tmp_path):
    (tmp_path / "countdown").mkdir()
    (tmp_path / "countdown" / "test.jsonl").write_bytes(b"\xff\xfe\x00 not utf-8")
    with pytest.raises(DataError):
        get_task("countdown").load("test", str(tmp_path))


def test_load_from_env_dir(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "countdown" / "test.jsonl", [{"target": 36, "nums": [79, 17, 60]}])
    monkeypatch.setenv("RLINO_DATA_DIR", str(tmp_path))
    assert tasks.resolve_data_dir(None) == str(tmp_path)
    assert tasks.resolve_data_dir("/elsewhere") == "/elsewhere"
    assert get_task("countdown").load("test") == [{"target": 36, "nums": [79, 17, 60]}]


def test_missing_local_file_names_both_ways(tmp_path):
    with pytest.raises(DataError) as error:
        get_task("gsm8k").load("test", str(tmp_path / "nowhere"))
    message = str(error.value)
    assert ("\n" not in message and "--data-dir" in message and "RLINO_DATA_DIR" in message
            and "hub" in message)


def test_bad_split_and_unknown_task():
    with pytest.raises(ValueError):
        get_task("gsm8k").load("validation")
    with pytest.raises(ValueError, match="unknown task 'x'; choose from gsm8k, math, countdown"):
        get_task("x")


def test_hub_offline_without_data_dir_is_a_data_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RLINO_DATA_DIR"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path))
    script = ("import tasks, time\nt = time.time()\ntry:\n    tasks.get_task('gsm8k').load('test')\n"
              "except tasks.DataError as e:\n    print('DataError', time.time() - t, e)\n")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=120, cwd=os.path.dirname(tasks.__file__))
    assert done.stdout.startswith("DataError"), done.stdout + done.stderr
    seconds, message = done.stdout.split(" ", 2)[1:]
    assert float(seconds) < 30 and "--data-dir" in message and "hub" in message


def test_countdown_train_without_test_set_still_generates(tmp_path, capsys):
    rows = get_task("countdown").load("train", str(tmp_path), limit=20)
    assert len(rows) == 20 and "cannot exclude" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- prompts
def test_prompts():
    countdown = get_task("countdown")
    text = countdown.prompt_text(COUNTDOWN)
    assert "Using the numbers [79, 17, 60], create an equation that equals 36." in text
    assert text.endswith("Assistant: Let me solve this step by step.\n<think>")
    messages = countdown.prompt_messages(COUNTDOWN)
    assert messages[-1]["role"] == "user" and "<answer> (1 + 2) / 3 </answer>" in messages[-1]["content"]
    for name, example, field in (("gsm8k", GSM8K, "question"), ("math", MATH, "problem")):
        content = get_task(name).prompt_messages(example)[-1]["content"]
        assert content.startswith(example[field]) and content.endswith("final answer within \\boxed{}.")
        assert get_task(name).prompt_text(example).rstrip().endswith(
            "Assistant: Let me solve this step by step.")


def test_paper_tasks_pose_the_bare_question_and_score_the_last_box():
    """gsm8k-paper and math-paper: the question, then the authors' sentence, as the whole prompt (no preamble,
    no template text), on the benchmark's own data; GSM8K scored on the last \\boxed{} alone."""
    paper = get_task("gsm8k-paper")
    bare = "How much? Let's think step by step and output the final answer within \\boxed{}."
    assert paper.prompt_text(GSM8K_BIG) == bare and paper.prompt_messages(GSM8K_BIG)[-1]["content"] == bare
    assert paper.reward("so \\boxed{1,000}", GSM8K_BIG) == 1.0
    assert paper.reward("\\boxed{100}", GSM8K_BIG) == 0.0
    for lenient in ("#### 1000", "The answer is 1000", "It is 1000."):
        assert paper.reward(lenient, GSM8K_BIG) == 0.0 and get_task("gsm8k").reward(lenient, GSM8K_BIG) == 1.0
    math_paper = get_task("math-paper")
    assert math_paper.prompt_text(MATH) == "p " + bare.removeprefix("How much? ")
    assert math_paper.reward("\\boxed{0.5}", MATH) == 1.0
    if DATA_DIR and os.path.isdir(DATA_DIR):
        for name in ("gsm8k", "math"):
            assert (get_task(f"{name}-paper").load("test", data_dir=DATA_DIR)
                    == get_task(name).load("test", data_dir=DATA_DIR))
