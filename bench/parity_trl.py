"""Loss parity with TRL: the same per-token log-probabilities through alignkit's losses and TRL's.

    python bench/parity_trl.py            # needs the bench extra: pip install 'alignkit[bench]'

For every loss type both libraries have, random per-token log-probabilities of a batch of pairs
(policy and reference, with ragged response masks) are fed

* to alignkit: ``sequence_logprob_sums`` -> ``alignkit.methods.dpo.preference_objective`` (the DPO
  recipe's own objective, which calls the pure functions of ``alignkit.losses``), and
* to TRL: ``DPOTrainer._compute_loss`` run on a stand-in model that returns those per-token
  log-probabilities (with ``precompute_ref_log_probs`` semantics: reference sums given), and, for
  the reference-free variants, ``CPOTrainer.cpo_loss`` (SimPO) and ``ORPOTrainer.odds_ratio_loss``
  (ORPO) on the same average log-probabilities.

For KTO, random per-token log-probabilities of a batch of examples (their own completions and the
mismatched completions, policy and reference, with labels) go to alignkit's
``alignkit.methods.kto.kto_objective`` and to TRL's ``KTOTrainer._compute_loss`` on a stand-in model
(``precompute_ref_log_probs`` semantics), including a batch whose reference point clamps at 0.

It prints the largest absolute difference of the loss and of the logged implicit rewards, margins and
accuracies; they should be at float rounding (~1e-7 in float32, ~1e-15 in float64).
Not compared: TRL's ``sigmoid`` has no label smoothing (alignkit's cDPO ``label_smoothing`` on
``sigmoid`` has no TRL counterpart); TRL's ORPO returns ``beta * log sigmoid(log odds ratio)`` and
subtracts it from the NLL, alignkit returns the positive loss ``-beta * log sigmoid(...)``, so the two
are compared with the sign flipped. For ``ipo`` alignkit's logged implicit rewards (and so reward
accuracy and margin) are beta times the *average* per-token log-ratio, the quantity the IPO loss is
built on, while TRL logs beta times the *summed* log-ratio; the loss itself agrees.
"""
from __future__ import annotations

import argparse
import types
from collections import defaultdict

import torch


def random_batch(pairs: int, length: int, dtype: torch.dtype, seed: int):
    """Per-token log-probs [2B, T-1] of policy and reference, and a completion mask [2B, T]."""
    generator = torch.Generator().manual_seed(seed)
    policy = -torch.rand(2 * pairs, length - 1, generator=generator, dtype=torch.float64).mul(6.0).to(dtype)
    reference = policy + 0.3 * torch.randn(2 * pairs, length - 1, generator=generator, dtype=torch.float64).to(dtype)
    reference = reference.clamp(max=-1e-4)
    mask = torch.zeros(2 * pairs, length, dtype=torch.long)
    for row in range(2 * pairs):
        start = int(torch.randint(1, length // 2, (1,), generator=generator))
        end = int(torch.randint(start + 1, length + 1, (1,), generator=generator))
        mask[row, start:end] = 1
    return policy, reference, mask


class StandInModel(torch.nn.Module):
    """Returns given per-token log-probs the way TRL's fused LM head does (zero where label = -100)."""

    def __init__(self, token_logps: torch.Tensor):
        super().__init__()
        self.token_logps = token_logps

    def forward(self, input_ids=None, attention_mask=None, labels=None, fused_lm_head=False, **_):
        valid = labels[:, 1:] != -100
        zeros = torch.zeros_like(self.token_logps)
        return types.SimpleNamespace(
            log_probs=torch.where(valid, self.token_logps, zeros), entropy=zeros, mean_logits=zeros,
            is_top1=torch.zeros_like(valid), aux_loss=None, log_sum_sq_probs=zeros)


def trl_dpo(loss_type: str, beta: float, label_smoothing: float, policy, reference, mask):
    from trl import DPOTrainer

    sums = (reference * mask[:, 1:]).sum(1)
    half = sums.shape[0] // 2
    model = StandInModel(policy)
    identity = lambda x: x  # noqa: E731
    fake = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), ref_model=None, accelerator=types.SimpleNamespace(
            device=policy.device, gather_for_metrics=identity, gather=identity),
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing,
        f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, ld_alpha=None, precompute_ref_logps=True,
        aux_loss_enabled=False, use_weighting=False, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1, router_aux_loss_coef=0.0, args=types.SimpleNamespace())
    inputs = {"input_ids": torch.zeros_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask,
              "ref_chosen_logps": sums[:half], "ref_rejected_logps": sums[half:]}
    loss = DPOTrainer._compute_loss(fake, model, inputs, False)
    metrics = fake._metrics["train"]
    return float(loss), {"reward_chosen": metrics["rewards/chosen"][0], "reward_rejected": metrics["rewards/rejected"][0],
                         "reward_accuracy": metrics["rewards/accuracies"][0], "reward_margin": metrics["rewards/margins"][0],
                         "logp_chosen": metrics["logps/chosen"][0], "logp_rejected": metrics["logps/rejected"][0]}


def alignkit_objective(job_keys: dict, policy, reference, mask):
    from alignkit.methods import build_job
    from alignkit.losses import masked_sum
    from alignkit.methods.dpo import preference_objective

    job = build_job("dpo", job_keys)
    response = mask[:, 1:].bool()  # token t+1 is predicted at position t
    sums, reference_sums = masked_sum(policy, response, dim=1), masked_sum(reference, response, dim=1)
    counts = response.sum(1).to(policy.dtype)
    loss, rewards, metrics = preference_objective(job, sums, counts, reference_sums)
    return float(loss), metrics, rewards, sums, counts


def compare(dtype: torch.dtype, pairs: int, length: int, seed: int) -> list[tuple[str, float, float]]:
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    policy, reference, mask = random_batch(pairs, length, dtype, seed)
    rows = []
    for loss_type, beta, smoothing in (("sigmoid", 0.1, 0.0), ("hinge", 0.3, 0.0), ("ipo", 0.2, 0.0),
                                       ("robust", 0.1, 0.2)):
        ours, our_metrics, *_ = alignkit_objective(
            {"loss_type": loss_type, "beta": beta, "label_smoothing": smoothing}, policy, reference, mask)
        theirs, their_metrics = trl_dpo(loss_type, beta, smoothing, policy, reference, mask)
        # IPO: alignkit logs its implicit rewards on the average log-ratios the IPO loss uses; TRL logs them
        # on the summed log-ratios. Only the log-probs are comparable there.
        keys = [k for k in their_metrics if loss_type != "ipo" or k.startswith("logp")]
        metric_gap = max(abs(our_metrics[k] - their_metrics[k]) for k in keys)
        note = " (rewards: see note)" if loss_type == "ipo" else ""
        rows.append((f"{loss_type} (beta {beta}{f', label_smoothing {smoothing}' if smoothing else ''}){note}",
                     abs(ours - theirs), metric_gap))

    # SimPO: TRL's CPOTrainer.cpo_loss on average log-probs (reference-free).
    beta, gamma, smoothing = 2.0, 0.8, 0.1
    ours, our_metrics, (reward_c, reward_r), sums, counts = alignkit_objective(
        {"loss_type": "simpo", "beta": beta, "simpo_gamma": gamma, "label_smoothing": smoothing}, policy, reference, mask)
    half = sums.shape[0] // 2
    average = sums / counts.clamp(min=1)
    fake = types.SimpleNamespace(alpha=0.0, loss_type="simpo", beta=beta, simpo_gamma=gamma, label_smoothing=smoothing,
                                 accelerator=types.SimpleNamespace(device=policy.device))
    losses, chosen, rejected = CPOTrainer.cpo_loss(fake, average[:half], average[half:])
    rows.append((f"simpo (beta {beta}, gamma {gamma}, label_smoothing {smoothing})", abs(ours - float(losses.mean())),
                 max(float((chosen - reward_c).abs().max()), float((rejected - reward_r).abs().max()))))

    # ORPO: the odds-ratio term (TRL returns beta * log sigmoid(.), alignkit the loss -beta * log sigmoid(.)).
    from alignkit.losses import orpo_loss

    beta = 0.1
    fake = types.SimpleNamespace(beta=beta, accelerator=types.SimpleNamespace(device=policy.device))
    their_terms, chosen, rejected, *_ = ORPOTrainer.odds_ratio_loss(fake, average[:half], average[half:])
    our_terms, our_chosen, our_rejected = orpo_loss(average[:half], average[half:], beta=beta)
    rows.append((f"orpo odds-ratio term (beta {beta})", float((our_terms + their_terms.to(our_terms.dtype)).abs().max()),
                 max(float((chosen - our_chosen).abs().max()), float((rejected - our_rejected).abs().max()))))
    return rows


class KTOStandIn(torch.nn.Module):
    """TRL's fused-head output for KTO: the own completions' or the mismatched ones' per-token log-probs,
    told apart by which input_ids tensor TRL passes."""

    def __init__(self, own: torch.Tensor, mismatched: torch.Tensor, mismatched_ids: torch.Tensor):
        super().__init__()
        self.own, self.mismatched, self.mismatched_ids = own, mismatched, mismatched_ids

    def forward(self, input_ids=None, labels=None, **_):
        logps = self.mismatched if input_ids is self.mismatched_ids else self.own
        valid = labels[:, 1:] != -100
        zeros = torch.zeros_like(logps)
        return types.SimpleNamespace(log_probs=torch.where(valid, logps, zeros), entropy=zeros, mean_logits=zeros,
                                     aux_loss=None)


def trl_kto(beta, desirable_weight, undesirable_weight, own, mismatched, reference, reference_mismatched,
            mask, mismatched_mask, labels):
    from trl import KTOTrainer

    identity = lambda x: x  # noqa: E731
    kl_ids = torch.zeros_like(mismatched_mask)
    model = KTOStandIn(own, mismatched, kl_ids)
    fake = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), calculate_KL=True, precompute_ref_logps=True, loss_type="kto",
        beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
        aux_loss_enabled=False, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1,
        accelerator=types.SimpleNamespace(device=own.device, gather_for_metrics=identity, gather=identity))
    fake._compute_kl_logps = lambda m, batch: KTOTrainer._compute_kl_logps(fake, m, batch)
    inputs = {"input_ids": torch.zeros_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask,
              "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones_like(mismatched_mask),
              "KL_completion_mask": mismatched_mask, "label": labels,
              "ref_logps": (reference * mask[:, 1:]).sum(1),
              "ref_KL_logps": (reference_mismatched * mismatched_mask[:, 1:]).sum(1)}
    loss = KTOTrainer._compute_loss(fake, model, inputs, False)
    metrics = fake._metrics["train"]
    return float(loss), {"kl": metrics["kl"][0], "reward_desirable": metrics["rewards/chosen"][0],
                         "reward_undesirable": metrics["rewards/rejected"][0],
                         "logp_desirable": metrics["logps/chosen"][0], "logp_undesirable": metrics["logps/rejected"][0]}


def compare_kto(dtype: torch.dtype, examples: int, length: int, seed: int) -> list[tuple[str, float, float]]:
    from alignkit.losses import masked_sum
    from alignkit.methods import build_job
    from alignkit.methods.kto import kto_objective

    rows = []
    for beta, desirable_weight, undesirable_weight, drift in ((0.1, 1.0, 1.0, 0.3), (0.5, 1.33, 0.8, 0.3),
                                                              (0.2, 1.0, 1.0, -0.5)):
        # own completions first, then the mismatched ones: the layout of a KTO batch in alignkit
        policy, reference, mask = random_batch(examples, length, dtype, seed)
        reference = policy - drift + 0.3 * (reference - policy)  # drift < 0: the reference point clamps at 0
        labels = torch.rand(examples, generator=torch.Generator().manual_seed(seed + 1)) < 0.6
        response = mask[:, 1:].bool()
        sums, reference_sums = masked_sum(policy, response, dim=1), masked_sum(reference, response, dim=1)
        job = build_job("kto", {"beta": beta, "desirable_weight": desirable_weight,
                                "undesirable_weight": undesirable_weight})
        ours, our_metrics = kto_objective(job, sums, reference_sums, labels)
        half = examples
        theirs, their_metrics = trl_kto(beta, desirable_weight, undesirable_weight, policy[:half], policy[half:],
                                        reference[:half], reference[half:], mask[:half], mask[half:], labels)
        metric_gap = max(abs(our_metrics[k] - their_metrics[k]) for k in their_metrics)
        clamp = " (z0 clamped at 0)" if drift < 0 else ""
        rows.append((f"kto (beta {beta}, weights {desirable_weight}/{undesirable_weight}){clamp}",
                     abs(float(ours) - theirs), metric_gap))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--length", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import trl

    print(f"alignkit vs TRL {trl.__version__}: {args.pairs} pairs, {args.length} tokens, random per-token log-probs\n")
    print("| loss type | dtype | max abs diff, loss | max abs diff, rewards/metrics |")
    print("| --- | --- | --- | --- |")
    worst = {}
    for dtype in (torch.float32, torch.float64):
        for name, loss_gap, metric_gap in (compare(dtype, args.pairs, args.length, args.seed)
                                           + compare_kto(dtype, args.pairs, args.length, args.seed)):
            print(f"| {name} | {str(dtype).replace('torch.', '')} | {loss_gap:.3g} | {metric_gap:.3g} |")
            worst[dtype] = max(worst.get(dtype, 0.0), loss_gap)
    print()
    for dtype, gap in worst.items():
        print(f"largest loss difference in {str(dtype).replace('torch.', '')}: {gap:.3g}")


if __name__ == "__main__":
    main()
