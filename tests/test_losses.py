"""Losses and advantage estimators against numbers worked out by hand (math.log / math.exp)."""
import math

import pytest
import torch

from alignkit.losses import (
    bradley_terry_loss,
    dpo_loss,
    gae,
    group_advantages,
    kl_k3,
    masked_mean,
    masked_sum,
    masked_var,
    orpo_loss,
    ppo_clip_loss,
    sft_loss,
    simpo_loss,
    value_loss,
    whiten,
)

NAN, INF = float("nan"), float("inf")


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def close(actual, expected, tol=1e-5):
    expected = torch.as_tensor(expected, dtype=torch.float32)
    torch.testing.assert_close(actual.detach().float(), expected, rtol=tol, atol=tol)


# --------------------------------------------------------------------------------------------
# Masked reductions
# --------------------------------------------------------------------------------------------

def test_masked_reductions():
    x = torch.tensor([[1.0, 3.0, NAN], [5.0, INF, 2.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    close(masked_sum(x, mask), 9.0)
    close(masked_mean(x, mask), 3.0)
    close(masked_mean(x, mask, dim=1), [2.0, 5.0])
    close(masked_sum(x, mask, dim=1), [4.0, 5.0])
    # values 1, 3, 5: mean 3, squared deviations 4 + 0 + 4 = 8
    close(masked_var(x, mask, unbiased=True), 8.0 / 2)
    close(masked_var(x, mask, unbiased=False), 8.0 / 3)
    # empty mask: 0, not NaN
    close(masked_mean(x, torch.zeros_like(mask)), 0.0)
    close(masked_var(x[:, :1], torch.tensor([[1], [0]])), 0.0)


def test_masked_mean_gradient_is_finite_with_garbage_at_masked_positions():
    x = torch.tensor([1.0, NAN, -INF], requires_grad=True)
    masked_mean(x, torch.tensor([1, 0, 0])).backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 0.0, 0.0]))


def test_whiten():
    x = torch.tensor([1.0, 3.0, 5.0, 100.0])
    mask = torch.tensor([1, 1, 1, 0])
    # mean 3, unbiased variance (4 + 0 + 4) / 2 = 4, std 2
    close(whiten(x, mask), [-1.0, 0.0, 1.0, 0.0])
    close(whiten(x, mask, shift_mean=False), [2.0, 3.0, 4.0, 0.0])


# --------------------------------------------------------------------------------------------
# SFT and reward model
# --------------------------------------------------------------------------------------------

def test_sft_loss_is_token_level_mean():
    logps = torch.tensor([[-1.0, -2.0, NAN], [-3.0, -INF, -INF]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    close(sft_loss(logps, mask), (1.0 + 2.0 + 3.0) / 3)  # not the mean of per-row means (1.5 + 3) / 2


def test_bradley_terry_loss():
    chosen = torch.tensor([2.0, 0.5])
    rejected = torch.tensor([1.0, 1.0])
    loss, metrics = bradley_terry_loss(chosen, rejected)
    expected = (-math.log(sigmoid(1.0)) - math.log(sigmoid(-0.5))) / 2
    close(loss, expected)
    close(metrics["accuracy"], 0.5)
    close(metrics["margin"], (1.0 - 0.5) / 2)

    loss, _ = bradley_terry_loss(chosen, rejected, margin=torch.tensor([0.5, 0.0]), center_coefficient=0.1)
    expected = (-math.log(sigmoid(1.0 - 0.5)) - math.log(sigmoid(-0.5))) / 2 + 0.1 * (3.0 ** 2 + 1.5 ** 2) / 2
    close(loss, expected)


# --------------------------------------------------------------------------------------------
# DPO family
# --------------------------------------------------------------------------------------------

# h = (pi_c - pi_r) - (ref_c - ref_r): row 0: (-1 + 1.5) - (-1.2 + 1.2) = 0.5; row 1: (-2 + 1) - (-2 + 1.5) = -0.5
POLICY_CHOSEN = torch.tensor([-1.0, -2.0])
POLICY_REJECTED = torch.tensor([-1.5, -1.0])
REFERENCE_CHOSEN = torch.tensor([-1.2, -2.0])
REFERENCE_REJECTED = torch.tensor([-1.2, -1.5])
H = [0.5, -0.5]
BETA = 0.5


def run_dpo(**kwargs):
    return dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED, beta=BETA, **kwargs)


def test_dpo_sigmoid_and_rewards():
    losses, chosen_rewards, rejected_rewards = run_dpo()
    close(losses, [-math.log(sigmoid(BETA * h)) for h in H])
    close(chosen_rewards, [BETA * (-1.0 + 1.2), BETA * (-2.0 + 2.0)])
    close(rejected_rewards, [BETA * (-1.5 + 1.2), BETA * (-1.0 + 1.5)])
    assert not chosen_rewards.requires_grad


def test_dpo_label_smoothing():
    eps = 0.1
    losses, _, _ = run_dpo(label_smoothing=eps)
    close(losses, [-(1 - eps) * math.log(sigmoid(BETA * h)) - eps * math.log(sigmoid(-BETA * h)) for h in H])
    plain, _, _ = run_dpo(loss_type="sigmoid")
    zero, _, _ = run_dpo(loss_type="sigmoid", label_smoothing=0.0)
    assert torch.equal(plain, zero)


def test_dpo_robust():
    eps = 0.1
    losses, _, _ = run_dpo(loss_type="robust", label_smoothing=eps)
    expected = [(-(1 - eps) * math.log(sigmoid(BETA * h)) + eps * math.log(sigmoid(-BETA * h))) / (1 - 2 * eps)
                for h in H]
    close(losses, expected)


def test_dpo_hinge_and_ipo():
    losses, _, _ = run_dpo(loss_type="hinge")
    close(losses, [1 - 0.25, 1 + 0.25])  # relu(1 - beta * h)
    losses, _, _ = run_dpo(loss_type="ipo")
    close(losses, [(0.5 - 1.0) ** 2, (-0.5 - 1.0) ** 2])  # 1 / (2 beta) = 1


def test_dpo_gradient_direction_and_errors():
    chosen = POLICY_CHOSEN.clone().requires_grad_()
    losses, _, _ = dpo_loss(chosen, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED, beta=BETA)
    losses.sum().backward()
    # d/dpi_c of -log sigmoid(beta h) = -beta * (1 - sigmoid(beta h))
    close(chosen.grad, [-BETA * (1 - sigmoid(BETA * h)) for h in H])
    with pytest.raises(ValueError, match="sigmoid.*robust.*hinge.*ipo"):
        run_dpo(loss_type="kto")
    with pytest.raises(ValueError):
        run_dpo(loss_type="hinge", label_smoothing=0.1)


def test_simpo():
    chosen, rejected = torch.tensor([-1.0, -0.5]), torch.tensor([-1.5, -2.0])
    losses, chosen_rewards, rejected_rewards = simpo_loss(chosen, rejected, beta=2.0, gamma_beta_ratio=0.5)
    # x = beta (c - r) - gamma, gamma = 0.5 * 2 = 1: row 0: 2 * 0.5 - 1 = 0; row 1: 2 * 1.5 - 1 = 2
    close(losses, [math.log(2.0), -math.log(sigmoid(2.0))])
    close(chosen_rewards, [-2.0, -1.0])
    close(rejected_rewards, [-3.0, -4.0])
    smoothed, _, _ = simpo_loss(chosen, rejected, beta=2.0, gamma_beta_ratio=0.5, label_smoothing=0.2)
    close(smoothed[1], -0.8 * math.log(sigmoid(2.0)) - 0.2 * math.log(sigmoid(-2.0)))


def test_orpo():
    chosen = torch.tensor([math.log(0.5), math.log(0.9)])
    rejected = torch.tensor([math.log(0.25), math.log(0.6)])
    losses, chosen_rewards, rejected_rewards = orpo_loss(chosen, rejected, beta=0.1)
    # row 0: odds 1 vs 1/3 -> log odds ratio log 3, -log sigmoid(log 3) = -log(3/4)
    # row 1: odds 9 vs 1.5 -> ratio 6, -log(6/7)
    close(losses, [0.1 * math.log(4 / 3), 0.1 * math.log(7 / 6)])
    close(chosen_rewards, [0.1 * math.log(0.5), 0.1 * math.log(0.9)])
    close(rejected_rewards, [0.1 * math.log(0.25), 0.1 * math.log(0.6)])
    # Extreme log-probs stay finite (probability ~1 and ~0).
    losses, _, _ = orpo_loss(torch.tensor([0.0, -1e-9, -80.0]), torch.tensor([-80.0, -1e-9, 0.0]))
    assert torch.isfinite(losses).all()


# --------------------------------------------------------------------------------------------
# PPO / GRPO
# --------------------------------------------------------------------------------------------

def test_ppo_worked_example():
    old = torch.zeros(1, 2)
    logps = torch.log(torch.tensor([[1.3, 1.2]]))
    loss, metrics = ppo_clip_loss(logps, old, torch.tensor([0.5]), torch.ones(1, 2), epsilon_low=0.2)
    # ratio 1.3: min(0.65, 1.2 * 0.5) = 0.6; ratio 1.2: min(0.6, 0.6) = 0.6
    close(loss, -0.6)
    close(metrics["clip_fraction"], 0.5)
    close(metrics["ratio"], 1.25)
    close(metrics["approx_kl"], ((0.3 - math.log(1.3)) + (0.2 - math.log(1.2))) / 2)


def test_ppo_clipping_cases_and_gradients():
    ratios = torch.tensor([[1.3, 0.7, 0.7, 1.1]])
    advantages = torch.tensor([[0.5, 0.5, -1.0, -1.0]])
    logps = torch.log(ratios).requires_grad_()
    loss, metrics = ppo_clip_loss(logps, torch.zeros(1, 4), advantages, torch.ones(1, 4), epsilon_low=0.2)
    # objectives: min(.65,.6)=.6 ; min(.35,.4)=.35 ; min(-.7,-.8)=-.8 ; min(-1.1,-1.1)=-1.1
    close(loss, -(0.6 + 0.35 - 0.8 - 1.1) / 4)
    close(metrics["clip_fraction"], 2 / 4)
    loss.backward()
    # gradient of -r A / 4 w.r.t. log r is -r A / 4 where unclipped, 0 where clipped
    close(logps.grad, [[0.0, -0.7 * 0.5 / 4, 0.0, 1.1 / 4]])


def test_ppo_epsilon_high():
    logps = torch.log(torch.tensor([[1.3]]))
    loss, metrics = ppo_clip_loss(logps, torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1),
                                  epsilon_low=0.2, epsilon_high=0.28)
    close(loss, -1.28)
    close(metrics["clip_fraction"], 1.0)


def test_ppo_aggregation():
    # Per-token objective = A when ratio = 1. Row 0: 3 tokens with A = 1; row 1: 1 token with A = 3.
    logps = torch.zeros(2, 3)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    advantages = torch.tensor([1.0, 3.0])
    token, _ = ppo_clip_loss(logps, logps, advantages, mask, aggregation="token")
    sequence, _ = ppo_clip_loss(logps, logps, advantages, mask, aggregation="sequence")
    close(token, -(1 + 1 + 1 + 3) / 4)
    close(sequence, -(1 + 3) / 2)
    # an empty row does not count as a sequence
    empty, _ = ppo_clip_loss(torch.zeros(3, 3), torch.zeros(3, 3), torch.tensor([1.0, 3.0, 5.0]),
                             torch.cat([mask, torch.zeros(1, 3, dtype=mask.dtype)]), aggregation="sequence")
    close(empty, -(1 + 3) / 2)
    with pytest.raises(ValueError, match="token"):
        ppo_clip_loss(logps, logps, advantages, mask, aggregation="batch")


def test_value_loss():
    values = torch.tensor([[1.0, 2.0, 3.0, 50.0]])
    old_values = torch.tensor([[0.5, 2.0, 2.0, 0.0]])
    returns = torch.tensor([[0.0, 2.5, 3.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, metrics = value_loss(values, old_values, returns, mask, clip_range=0.2)
    # token 0: max((1-0)^2, (0.7-0)^2) = 1; token 1: max(.25, .25) = .25; token 2: max(0, (2.2-3)^2) = .64
    close(loss, 0.5 * (1.0 + 0.25 + 0.64) / 3)
    close(metrics["clip_fraction"], 1 / 3)
    unclipped, _ = value_loss(values, old_values, returns, mask, clip_range=None)
    close(unclipped, 0.5 * (1.0 + 0.25 + 0.0) / 3)


def test_gae_by_hand():
    gamma, lam = 0.9, 0.8
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 1.0, 9.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [0.2, 0.4, 5.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # row 1 right padded: position 2 is garbage
    advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)

    a2 = 1.0 + gamma * 0.0 - 0.7                       # 0.3
    a1 = (0.0 + gamma * 0.7 - 0.6) + gamma * lam * a2  # 0.03 + 0.216
    a0 = (0.0 + gamma * 0.6 - 0.5) + gamma * lam * a1  # 0.04 + 0.72 * 0.246
    b1 = 1.0 + gamma * 0.0 - 0.4                       # V after the last valid token is 0
    b0 = (0.5 + gamma * 0.4 - 0.2) + gamma * lam * b1
    close(advantages, [[a0, a1, a2], [b0, b1, 0.0]])
    close(returns, [[a0 + 0.5, a1 + 0.6, a2 + 0.7], [b0 + 0.2, b1 + 0.4, 0.0]])
    close(advantages[0], [0.21712, 0.246, 0.3])  # the same numbers, written out


def test_gae_left_padding_equals_right_padding():
    rewards = torch.tensor([[0.5, 1.0, 0.0], [0.0, 0.5, 1.0]])
    values = torch.tensor([[0.2, 0.4, 0.0], [0.0, 0.2, 0.4]])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    advantages, _ = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    close(advantages[1, 1:], advantages[0, :2])


def test_group_advantages():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    advantages, zero_spread = group_advantages(rewards, group_size=4)
    sample_std = math.sqrt((4 * 0.5 ** 2) / 3)
    a = 0.5 / (sample_std + 1e-4)
    close(advantages, [a, -a, -a, a, 0.0, 0.0, 0.0, 0.0])
    assert zero_spread.tolist() == [False, True]
    centred, _ = group_advantages(rewards, group_size=4, scale_by_std=False)
    close(centred, [0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0])
    singles, spread = group_advantages(torch.tensor([3.0, 1.0]), group_size=1)
    close(singles, [0.0, 0.0])
    assert spread.tolist() == [True, True]
    with pytest.raises(ValueError):
        group_advantages(rewards, group_size=3)


def test_kl_k3():
    logps = torch.tensor([-1.0, -2.0, -0.3, -4.0])
    reference = torch.tensor([-1.5, -1.0, -0.3, -0.5])
    kl = kl_k3(logps, reference)
    close(kl, [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1, 0.0, math.exp(3.5) - 3.5 - 1])
    random_kl = kl_k3(torch.randn(1000), torch.randn(1000))
    assert (random_kl >= 0).all()
