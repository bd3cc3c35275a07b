"""Loss functions and advantage estimators for alignment: pure functions on tensors.

Nothing here knows about models or tokenizers. Inputs are per-token log-probabilities (see
`alignkit.logprobs`), per-sequence sums or averages of them, rewards, values and masks. Every
function states its equation and the paper it comes from. Conventions:

* `B` = batch (sequences), `T` = tokens, masks are `[B, T]` bool or 0/1 and mark the tokens that
  count (response tokens; padding and prompt are 0). Values at masked-out positions may be
  garbage (even NaN/inf): they are selected away with `torch.where`, never multiplied by 0.
* Losses that a caller may want to aggregate differently are returned per example (`[B]`);
  losses whose aggregation is part of the method (PPO, value, SFT, reward model) are scalars.
* Metrics are returned as detached 0-dim tensors (no device sync here); call `float()` to log.
* `log σ(x)` is always `F.logsigmoid(x)` (stable for large |x|).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "masked_sum", "masked_mean", "masked_var", "whiten",
    "sft_loss", "bradley_terry_loss",
    "dpo_loss", "DPO_LOSS_TYPES", "simpo_loss", "orpo_loss",
    "ppo_clip_loss", "value_loss", "gae", "group_advantages", "kl_k3",
]


# --------------------------------------------------------------------------------------------
# Masked reductions
# --------------------------------------------------------------------------------------------

def _prepare_mask(x: Tensor, mask: Tensor) -> Tensor:
    mask = mask.to(device=x.device)
    if mask.shape != x.shape:
        mask = mask.expand_as(x)
    return mask


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """`sum_i mask_i * x_i` over all elements (`dim=None`, 0-dim result) or along `dim`.

    `mask` may be bool or float weights; positions with mask 0 contribute exactly 0.
    """
    mask = _prepare_mask(x, mask)
    weighted = torch.where(mask != 0, x * mask.to(x.dtype), torch.zeros_like(x))
    return weighted.sum() if dim is None else weighted.sum(dim)


def _safe_count(count: Tensor) -> Tensor:
    return torch.where(count > 0, count, torch.ones_like(count))


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """`sum_i mask_i x_i / sum_i mask_i` (all elements, or along `dim`); 0 where the mask is empty."""
    mask = _prepare_mask(x, mask)
    total = masked_sum(x, mask, dim)
    count = mask.to(x.dtype).sum() if dim is None else mask.to(x.dtype).sum(dim)
    return total / _safe_count(count)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True, dim: int | None = None) -> Tensor:
    """Masked variance `sum_i m_i (x_i - mean)^2 / n` with `n = sum_i m_i`.

    With `unbiased=True` the result is multiplied by `n / (n - 1)` (Bessel's correction); when
    `n < 2` the correction is skipped (a single element has variance 0, no NaN).
    """
    mask = _prepare_mask(x, mask)
    mean = masked_mean(x, mask, dim)
    centred = x - (mean if dim is None else mean.unsqueeze(dim))
    count = mask.to(x.dtype).sum() if dim is None else mask.to(x.dtype).sum(dim)
    var = masked_sum(centred.square(), mask, dim) / _safe_count(count)
    if unbiased:
        var = torch.where(count >= 2, var * count / _safe_count(count - 1), var)
    return var


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8,
           mean: Tensor | None = None, variance: Tensor | None = None) -> Tensor:
    """Normalise the masked entries of `x` to unit variance: `(x - mean) / sqrt(var + eps)`.

    Mean and (unbiased) variance are taken over all masked elements, unless given (e.g. over a batch
    shared out among processes). With `shift_mean=False` the
    mean is added back (`(x - mean) / std + mean`: only the scale changes), as usual for rewards.
    Masked-out positions are set to 0. Used for PPO advantages (Schulman et al. 2017, "Proximal
    Policy Optimization Algorithms"; the common "advantage normalisation" trick).
    """
    mask = _prepare_mask(x, mask)
    mean = masked_mean(x, mask) if mean is None else mean.to(x.dtype)
    var = masked_var(x, mask, unbiased=True) if variance is None else variance.to(x.dtype)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask != 0, out, torch.zeros_like(out))


# --------------------------------------------------------------------------------------------
# Supervised and reward-model losses
# --------------------------------------------------------------------------------------------

def sft_loss(token_logps: Tensor, mask: Tensor) -> Tensor:
    """Negative log-likelihood `-(sum_{b,t} m_{b,t} log p_{b,t}) / (sum_{b,t} m_{b,t})` (scalar).

    A token-level average over the whole batch (every supervised token weighs the same, long
    answers weigh more than short ones), as in standard causal-LM fine-tuning.
    """
    return -masked_mean(token_logps, mask)


def bradley_terry_loss(chosen_rewards: Tensor, rejected_rewards: Tensor,
                       margin: Tensor | float | None = None,
                       center_coefficient: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """Pairwise reward-model loss (Bradley & Terry 1952; used for RLHF reward models by Ouyang et
    al. 2022, "Training language models to follow instructions with human feedback").

        loss = mean_b[ -log σ(r_c - r_r - m) ] + center_coefficient * mean_b[ (r_c + r_r)^2 ]

    `m` is an optional per-pair margin `[B]` (Touvron et al. 2023, "Llama 2"; larger for pairs
    rated far apart). The centring term (Eisenstein et al. 2023, "Helping or Herding?") keeps the
    rewards' scale anchored at zero, since the pairwise loss only sees differences.

    Args: `chosen_rewards`, `rejected_rewards`: `[B]` scalar rewards of each pair.
    Returns: `(loss scalar, {"accuracy": fraction with r_c > r_r, "margin": mean(r_c - r_r)})`.
    """
    difference = chosen_rewards - rejected_rewards
    logits = difference if margin is None else difference - torch.as_tensor(
        margin, dtype=difference.dtype, device=difference.device)
    loss = -F.logsigmoid(logits).mean()
    if center_coefficient:
        loss = loss + center_coefficient * (chosen_rewards + rejected_rewards).square().mean()
    metrics = {
        "accuracy": (difference > 0).float().mean().detach(),
        "margin": difference.mean().detach(),
    }
    return loss, metrics


# --------------------------------------------------------------------------------------------
# Offline preference losses
# --------------------------------------------------------------------------------------------

DPO_LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
             reference_chosen_logps: Tensor, reference_rejected_logps: Tensor,
             beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Direct preference optimisation and its variants, per pair.

    With `h = (log π(y_c) - log π(y_r)) - (log π_ref(y_c) - log π_ref(y_r))` (all `[B]`):

    * `"sigmoid"`: DPO (Rafailov et al. 2023, "Direct Preference Optimization"), with conservative
      label smoothing ε (labels flipped with probability ε; "cDPO", Mitchell 2023):
      `-(1-ε) log σ(βh) - ε log σ(-βh)`; ε = 0 is plain DPO.
    * `"robust"`: provably robust DPO (Chowdhury et al. 2024, "Provably Robust DPO"), an unbiased
      loss under label-noise rate ε < 1/2: `(-(1-ε) log σ(βh) + ε log σ(-βh)) / (1 - 2ε)`.
    * `"hinge"`: SLiC (Zhao et al. 2023, "SLiC-HF"): `relu(1 - βh)`.
    * `"ipo"`: IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from
      Human Preferences"): `(h - 1/(2β))^2`. IPO is defined on *average* per-token log-probs: for
      `"ipo"` the caller passes each sequence's mean log-prob over its response tokens (sum / count),
      not the sum.

    Label smoothing only applies to `"sigmoid"` and `"robust"`; a non-zero ε with another type
    raises `ValueError`.

    Returns: `(losses [B], chosen_rewards [B], rejected_rewards [B])`, the implicit rewards
    `β (log π - log π_ref)` detached (for accuracy / margin logging). Average `losses` for the loss.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; valid types: {', '.join(DPO_LOSS_TYPES)}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    eps = float(label_smoothing)
    if eps and loss_type not in ("sigmoid", "robust"):
        raise ValueError(f"label_smoothing is only defined for loss_type 'sigmoid' or 'robust', not {loss_type!r}")
    if not 0.0 <= eps < 0.5 and not (loss_type == "sigmoid" and eps == 0.5):
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {eps}")

    chosen_log_ratio = policy_chosen_logps - reference_chosen_logps
    rejected_log_ratio = policy_rejected_logps - reference_rejected_logps
    h = chosen_log_ratio - rejected_log_ratio
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:  # ipo
        losses = (h - 1 / (2 * beta)).square()
    chosen_rewards = (beta * chosen_log_ratio).detach()
    rejected_rewards = (beta * rejected_log_ratio).detach()
    return losses, chosen_rewards, rejected_rewards


def simpo_loss(chosen_avg_logps: Tensor, rejected_avg_logps: Tensor, beta: float = 2.0,
               gamma_beta_ratio: float = 0.5,
               label_smoothing: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free
    Reward"), per pair. The implicit reward is the length-normalised log-prob `β/|y| log π(y)`
    (no reference model); with target margin γ = `gamma_beta_ratio` · β:

        x = β (avg log π(y_c) - avg log π(y_r)) - γ
        loss = -(1-ε) log σ(x) - ε log σ(-x)

    Args: `chosen_avg_logps`, `rejected_avg_logps`: `[B]` mean per-token log-probs of the responses.
    Returns: `(losses [B], chosen_rewards = β·avg_c [B], rejected_rewards = β·avg_r [B])`, rewards detached.
    """
    logits = beta * (chosen_avg_logps - rejected_avg_logps) - gamma_beta_ratio * beta
    eps = float(label_smoothing)
    losses = -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
    return losses, (beta * chosen_avg_logps).detach(), (beta * rejected_avg_logps).detach()


def _log1mexp(x: Tensor) -> Tensor:
    """`log(1 - exp(x))` for x < 0, stable at both ends (Mächler 2012, "Accurately computing log(1 - exp(-|a|))")."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(chosen_avg_logps: Tensor, rejected_avg_logps: Tensor,
              beta: float = 0.1) -> tuple[Tensor, Tensor, Tensor]:
    """The odds-ratio term of ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization
    without Reference Model"), per pair:

        log odds(y) = log p - log(1 - p),  with log p = average per-token log-prob of y
        losses = β · ( -log σ(log odds(y_c) - log odds(y_r)) )

    `β` is the paper's weight λ on this term (TRL's `beta`), so the full ORPO objective is
    `sft_loss(chosen tokens) + losses.mean()`: the caller adds the NLL term on the chosen responses.
    `log(1 - p)` is computed as a stable `log1mexp(log p)`; `log p` is clamped to <= -1e-6 so that a
    response with probability 1 gives a large finite log-odds instead of inf (and inf - inf = NaN).

    Returns: `(losses [B], chosen_rewards = β·avg_c [B], rejected_rewards = β·avg_r [B])`, rewards detached.
    """
    chosen = chosen_avg_logps.clamp(max=-1e-6)
    rejected = rejected_avg_logps.clamp(max=-1e-6)
    log_odds_ratio = (chosen - _log1mexp(chosen)) - (rejected - _log1mexp(rejected))
    losses = -beta * F.logsigmoid(log_odds_ratio)
    return losses, (beta * chosen_avg_logps).detach(), (beta * rejected_avg_logps).detach()


# --------------------------------------------------------------------------------------------
# Online RL: policy gradient, value, advantages, KL
# --------------------------------------------------------------------------------------------

PPO_AGGREGATIONS = ("token", "sequence")


def kto_loss(policy_logps: Tensor, reference_logps: Tensor, desirable: Tensor,
             policy_kl_logps: Tensor, reference_kl_logps: Tensor, beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """Kahneman-Tversky optimisation (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect
    Theoretic Optimization", eq. 7) on unpaired feedback, per example.

    With `r(x, y) = log π(y|x) - log π_ref(y|x)` (response log-probs summed, all `[B]`) and the
    reference point

        z_0 = max(0, mean_j [log π(y'_j|x_j) - log π_ref(y'_j|x_j)])       (detached)

    estimated on mismatched pairs (prompt x_j with another example's response y'_j: the paper's
    biased but cheap estimate of KL(π || π_ref)), the value of a response is

        v(x, y) = λ_D σ(β (r - z_0))   if y is desirable
                  λ_U σ(β (z_0 - r))   if y is undesirable

    and the loss `λ_y - v(x, y)`, i.e. `λ_D (1 - σ(β (r - z_0)))` or `λ_U (1 - σ(β (z_0 - r)))`.
    `desirable` is a bool `[B]`; `policy_kl_logps`/`reference_kl_logps` are the `[B']` log-probs of
    the mismatched pairs (the policy's computed without gradient: z_0 is a baseline, not a target).

    Returns `(losses [B], rewards [B], z_0 scalar)`: rewards are `β r` detached. Average `losses`
    over the batch for the loss (TRL averages desirable and undesirable examples together, too).
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    desirable = desirable.bool()
    reference_point = (policy_kl_logps.detach() - reference_kl_logps.detach()).mean().clamp(min=0)
    log_ratio = policy_logps - reference_logps
    losses = torch.where(desirable,
                         desirable_weight * (1 - torch.sigmoid(beta * (log_ratio - reference_point))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (reference_point - log_ratio))))
    return losses, (beta * log_ratio).detach(), reference_point


def ppo_clip_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor,
                  epsilon_low: float = 0.2, epsilon_high: float | None = None,
                  aggregation: str = "token") -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017, "Proximal Policy Optimization Algorithms"),
    as used by GRPO (Shao et al. 2024, "DeepSeekMath") and DAPO (Yu et al. 2025).

    Per token, with `r = exp(log π(a) - log π_old(a))`:

        objective = min(r A, clip(r, 1 - ε_low, 1 + ε_high) A),     loss = -objective

    `ε_high` defaults to `ε_low`; a larger `ε_high` is DAPO's "clip-higher". Example: r = 1.3,
    A = 0.5, ε = 0.2 gives min(0.65, 0.6) = 0.6 (no gradient: clipped); r = 1.2 gives 0.6.

    Args:
        logps, old_logps: `[B, T]` per-token log-probs under the current / sampling policy.
        advantages: `[B]` (one per sequence, broadcast over its tokens) or `[B, T]`.
        mask: `[B, T]` response tokens.
        aggregation: `"token"`: sum over all masked tokens / number of masked tokens (DAPO's
            token-level loss: every token weighs the same); `"sequence"`: mean over each
            sequence's tokens, then mean over sequences with at least one token (GRPO paper).

    Returns: `(loss scalar, metrics)`; metrics (detached, masked means over tokens):
        `clip_fraction` (tokens whose clipped term is active, i.e. zero gradient),
        `approx_kl` (k3 estimate of KL(π_old || π): `r - 1 - log r`), `ratio` (mean r).
    """
    if aggregation not in PPO_AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; valid: {', '.join(PPO_AGGREGATIONS)}")
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    mask = _prepare_mask(logps, mask) != 0
    if advantages.dim() == logps.dim() - 1:
        advantages = advantages.unsqueeze(-1)
    advantages = advantages.to(logps.dtype).expand_as(logps)
    log_ratio = torch.where(mask, logps - old_logps, torch.zeros_like(logps))
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + eps_high) * advantages
    per_token_loss = -torch.minimum(unclipped, clipped)
    if aggregation == "token":
        loss = masked_mean(per_token_loss, mask)
    else:
        per_sequence = masked_mean(per_token_loss, mask, dim=-1)
        loss = masked_mean(per_sequence, mask.any(-1))
    with torch.no_grad():
        is_clipped = ((ratio > 1 + eps_high) & (advantages > 0)) | ((ratio < 1 - epsilon_low) & (advantages < 0))
        metrics = {
            "clip_fraction": masked_mean(is_clipped.float(), mask),
            "approx_kl": masked_mean(ratio - 1 - log_ratio, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, metrics


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
               clip_range: float | None = 0.2) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss of PPO (Schulman et al. 2017; the clipping is from OpenAI baselines'
    `ppo2`, also in Ziegler et al. 2019 "Fine-Tuning Language Models from Human Preferences"):

        V_clip = V_old + clip(V - V_old, -c, c)
        loss = masked_mean( 0.5 * max((V - R)^2, (V_clip - R)^2) )

    `clip_range=None` disables clipping (`0.5 (V - R)^2`). All tensors `[B, T]`.
    Returns: `(loss scalar, {"clip_fraction": share of tokens where the clipped error is the larger,
    "value_error": masked mean of (V - R)^2})`.
    """
    mask = _prepare_mask(values, mask) != 0
    unclipped_error = (values - returns).square()
    if clip_range is None:
        error = unclipped_error
        clipped_share = torch.zeros_like(unclipped_error)
    else:
        clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
        clipped_error = (clipped_values - returns).square()
        error = torch.maximum(unclipped_error, clipped_error)
        clipped_share = (clipped_error > unclipped_error).float()
    loss = 0.5 * masked_mean(error, mask)
    with torch.no_grad():
        metrics = {
            "clip_fraction": masked_mean(clipped_share, mask),
            "value_error": masked_mean(unclipped_error, mask),
        }
    return loss, metrics


@torch.no_grad()
def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, "High-Dimensional Continuous Control
    Using Generalized Advantage Estimation"), per token, without gradient:

        δ_t = r_t + γ V_{t+1} - V_t,      A_t = δ_t + γ λ A_{t+1},      returns_t = A_t + V_t

    Args: `rewards`, `values`: `[B, T]`; `mask`: `[B, T]` valid response tokens (right padded).
    `V_{t+1}` and `A_{t+1}` beyond a row's last valid token are 0 (the episode ends there).
    Masked-out positions are skipped (the recursion links each valid token to the next *valid*
    one), so left padding or holes in the mask also work; their outputs are 0.

    Returns: `(advantages [B, T], returns [B, T])`, both 0 at masked positions.
    """
    mask = _prepare_mask(values, mask) != 0
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[..., 0])
    next_advantage = torch.zeros_like(values[..., 0])
    for t in reversed(range(values.shape[-1])):
        valid = mask[..., t]
        delta = rewards[..., t] + gamma * next_value - values[..., t]
        advantage = delta + gamma * lam * next_advantage
        advantages[..., t] = torch.where(valid, advantage, torch.zeros_like(advantage))
        next_value = torch.where(valid, values[..., t], next_value)
        next_advantage = torch.where(valid, advantage, next_advantage)
    returns = torch.where(mask, advantages + values, torch.zeros_like(values))
    return advantages, returns


@torch.no_grad()
def group_advantages(rewards: Tensor, group_size: int, scale_by_std: bool = True,
                     eps: float = 1e-4) -> tuple[Tensor, Tensor]:
    """Group-relative advantages of GRPO (Shao et al. 2024, "DeepSeekMath"):

        A_i = (r_i - mean_g(r)) / (std_g(r) + eps)      (scale_by_std=True)
        A_i =  r_i - mean_g(r)                            (scale_by_std=False; Liu et al. 2025, "Dr. GRPO")

    `std_g` is the *sample* standard deviation (Bessel-corrected, divide by G-1) like the GRPO
    reference implementations (`torch.std` default); a group of size 1 has std 0.

    Args: `rewards`: `[N]`, laid out group after group (`N = num_groups * group_size`).
    Returns: `(advantages [N] float32, zero_spread [N // group_size] bool)`; `zero_spread` marks
    groups whose rewards are all equal (their advantages are all 0: no learning signal; DAPO's
    dynamic sampling filters them out).
    """
    if group_size < 1 or rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be [N] with N a multiple of group_size={group_size}, "
                         f"got shape {tuple(rewards.shape)}")
    grouped = rewards.float().view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_by_std:
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped[:, :1])
        centred = centred / (std + eps)
    zero_spread = (grouped == grouped[:, :1]).all(dim=1)
    return centred.reshape(-1), zero_spread


def kl_k3(logps: Tensor, reference_logps: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(π || π_ref) for tokens sampled from π (Schulman 2020,
    "Approximating KL Divergence"), as used in GRPO:

        d = log π_ref(a) - log π(a),     k3 = exp(d) - d - 1  (>= 0, unbiased, low variance)

    Computed as `expm1(d) - d` for accuracy near d = 0. Shape follows the inputs; mask afterwards.
    """
    d = reference_logps - logps
    return torch.expm1(d) - d


# ----------------------------------------------------------------------------- preference metrics

def tied_pairs(chosen: torch.Tensor, rejected: torch.Tensor, relative_tie: float = 1e-6) -> torch.Tensor:
    """Pairs whose rewards are equal up to rounding: ``|r_c - r_r| <= relative_tie * max(1, max |r|)``."""
    if chosen.numel() == 0:
        return torch.zeros(0, dtype=torch.bool)
    scale = max(1.0, float(torch.cat([chosen, rejected]).detach().abs().max()))
    return (chosen - rejected).detach().float().abs() <= relative_tie * scale


def preference_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """Share of pairs whose reward favours the chosen response, a tie (`tied_pairs`) counting one half.

    At the start of DPO every implicit reward is 0 up to float rounding: this reads 50% (chance)
    instead of whatever the rounding gives.
    """
    if chosen.numel() == 0:
        return float("nan")
    tied = tied_pairs(chosen, rejected)
    wins = (chosen - rejected).detach() > 0
    return float((wins & ~tied).float().mean() + 0.5 * tied.float().mean())
