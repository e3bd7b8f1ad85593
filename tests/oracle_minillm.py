"""MiniLLM reference code for tests, transcribed (not imported: TRL 1.16 no longer ships it, and LMOps
is not a package).  Only the arithmetic is kept; ``self`` attributes became arguments.

- TRL 1.0.0 ``trl/experimental/minillm/minillm_trainer.py`` (Apache-2.0): ``_compute_advantage``,
  ``_single_step_decomposition_loss``; the clipped per-token loss and ``dapo`` normalisation of
  ``trl/trainer/grpo_trainer.py`` ``GRPOTrainer._compute_loss`` (token-level importance sampling,
  epsilon_low = epsilon_high).
- microsoft/LMOps ``minillm/minillm/losses.py`` (MIT): ``_get_advantages_and_returns``, ``_pg_loss``,
  ``_reg_loss`` (via ``utils.get_x_entropy``/``get_entropy``), ``utils.whiten``; the rewards and the
  importance weight of ``sampler.py``.
"""

import torch
import torch.nn.functional as F


# ---- TRL 1.0.0 -------------------------------------------------------------------------------------
def trl_compute_advantage(student_log_probs_on_labels, teacher_log_probs_on_labels, mask=None, gamma=0.0,
                          length_normalization=True):
    response_length = student_log_probs_on_labels.size(1)
    if mask is None:
        mask = torch.ones_like(student_log_probs_on_labels)
    mask = mask.float()
    student_log_probs_on_labels = student_log_probs_on_labels * mask
    teacher_log_probs_on_labels = teacher_log_probs_on_labels * mask

    rewards = teacher_log_probs_on_labels - student_log_probs_on_labels  # (batch_size, sequence_length)

    if gamma > 0.0:
        gamma_pow = torch.pow(gamma, torch.arange(response_length, device=rewards.device))

        advantages = rewards * gamma_pow
        advantages = advantages.flip(1).cumsum(dim=1).flip(1)

        if length_normalization:
            mask = torch.where(mask < 0.5, 1e-4, mask)
            lengths = mask * gamma_pow
            lengths = lengths.flip(1).cumsum(dim=1).flip(1)
            advantages = advantages / lengths
    else:
        advantages = rewards

    return advantages


def trl_single_step_decomposition_loss(student_log_probs, teacher_log_probs, mask=None, reduction="batchmean"):
    reg_loss = F.kl_div(
        teacher_log_probs, student_log_probs, reduction="none", log_target=True
    )  # (batch_size, sequence_length)

    # Masking
    if mask is not None:
        reg_loss = reg_loss[mask]

    # Apply reduction
    if reduction == "batchmean":
        return reg_loss.sum() / mask.sum() if mask is not None else reg_loss.sum() / reg_loss.size(0)
    elif reduction == "sum":
        return reg_loss.sum()
    elif reduction == "mean":
        return reg_loss.mean()
    else:
        return reg_loss


def trl_grpo_clipped_loss(per_token_logps, old_per_token_logps, advantages, mask, epsilon=0.2):
    """GRPOTrainer._compute_loss, loss_type "dapo" (the default), token-level importance sampling."""
    log_ratio = per_token_logps - old_per_token_logps
    coef_1 = torch.exp(log_ratio)
    coef_2 = torch.clamp(coef_1, 1 - epsilon, 1 + epsilon)
    per_token_loss1 = coef_1 * advantages
    per_token_loss2 = coef_2 * advantages
    per_token_loss = -torch.min(per_token_loss1, per_token_loss2)
    return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)


# ---- microsoft/LMOps minillm ------------------------------------------------------------------------
def lmops_whiten(xs, shift_mean=True):
    var, mean = torch.var_mean(xs)
    whitened = (xs - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


def lmops_get_advantages_and_returns(rewards, response_length, mask, gamma, use_whitening=True):
    last_rw = 0
    rw_reversed = []

    rewards = rewards.float()
    mask = mask.float()
    lens = torch.cumsum(mask, dim=-1)      # faster way
    lens = mask - lens + lens[:, -1:None]  # faster way
    lens = torch.masked_fill(lens, lens == 0, 1)

    for t in reversed(range(response_length)):
        rw_delta = rewards[:, t]
        last_rw = rw_delta + gamma * last_rw
        rw_reversed.append(last_rw)

    rw = torch.stack(rw_reversed[::-1], dim=1)
    rw = rw / lens

    advantages = rw

    if use_whitening:
        advantages = lmops_whiten(advantages)

    return advantages.detach()


def lmops_pg_loss(logprobs, old_logprobs, advantages, mask, w, cliprange=0.2):
    n = mask.sum()

    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio.float())
    ratio = ratio * w

    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(
        ratio,
        1.0 - cliprange,
        1.0 + cliprange,
    )
    pg_loss = torch.sum(torch.max(pg_loss1, pg_loss2).float() * mask) / n

    return pg_loss


def lmops_reg_loss(logits, t_logits, mask):
    """_reg_loss: (x-entropy(q, p) - entropy(q)) averaged over the response tokens (no inf masks)."""
    full_probs = F.softmax(logits, dim=-1, dtype=torch.float32)
    xent = -torch.sum(full_probs * F.log_softmax(t_logits, dim=-1, dtype=torch.float32), dim=-1) * mask
    s_ent = -torch.sum(full_probs * F.log_softmax(logits, dim=-1, dtype=torch.float32), dim=-1) * mask
    return torch.sum((xent - s_ent) * mask) / mask.sum()


def lmops_rewards_and_weight(t_logprobs, rollout_logprobs, mask, alpha, reward_scaling, cliprange_reward):
    """sampler.py: rewards = (t_rewards + ent_rewards) / reward_scaling, clipped; importance weight w."""
    mix_probs = (1 - alpha) * torch.exp(rollout_logprobs.float()) + alpha * torch.exp(t_logprobs.float())
    w = torch.exp(rollout_logprobs - torch.log(mix_probs))
    rewards = (t_logprobs * mask) + (-rollout_logprobs * mask)
    rewards = rewards / reward_scaling
    rewards = torch.clip(rewards, -cliprange_reward, cliprange_reward)
    return rewards, w
