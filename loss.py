"""The policy-update math of AEPO (arXiv 2510.14545, "Entropy-Balanced Policy Optimization"):
advantages, surrogates, KL, token log-probs.

Every function is pure (tensors and numbers in, tensors out) and imports nothing from the project.
In: rewards and group ids per row (B,); per-token log-probs, advantages and `loss_mask` (B, T),
where `loss_mask[b, t] = 1` iff the policy sampled token t. Out: advantages, or `(loss, stats)` with
`stats` a dict of python floats. `token_logprobs` is the only place that shifts and gathers logits
(`token_logprobs_reference` shows the same in ten plain lines).

How this deviates from the textbook (and from the released verl code):
1. All surrogates are token means over every sampled token of the micro-batch.
2. The dual clip (c = 3) applies to ppo, gppo and aepo; CISPO has no min/max, so none there.
3. log r is clamped to [-20, 20] before exp (as verl does), so a wild ratio cannot overflow; the
   kept gradient of a clipped bound comes from r / sg(r) = exp(log pi - sg(log pi)), which the clamp
   does not touch.
4. REINFORCE++ normalises by the std over the rows of the batch; verl whitens over tokens.
5. Entropies from `token_logprobs` are exact (full vocabulary) and carry no gradient (no entropy
   bonus, as released).
6. The entropy-aware advantage's z_t is standardised over the whole step's sampled tokens, from the
   rollout's entropies (pi_old), once before the update; the released code standardises the current
   policy's entropies within each micro-batch, so its update changes with the memory setting.

Example: python -m pytest tests/test_loss.py -q
"""
import torch
from torch.utils.checkpoint import checkpoint

Tensor = torch.Tensor
CLIP_MODES = ("ppo", "gppo", "cispo", "aepo")  # DAPO is "ppo" with eps_high = 0.28

# --------------------------------------------------------------------------------------------------
# Group advantages (GRPO; REINFORCE++)


def _group_centred(rewards: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor]:
    """R_i - mean(R_group) and the group's unbiased std, per row (B,). Exactly 0 when a group is a
    singleton or all its rewards are equal (a float mean of equal values can be off by one ulp)."""
    # >>> solution A2
    labels, g = torch.unique(group_ids, return_inverse=True)  # (B,) any labels -> 0..G-1
    zeros = rewards.new_zeros(labels.numel())  # (G,)
    n = zeros.index_add(0, g, torch.ones_like(rewards))  # (G,) group sizes
    mean = zeros.index_add(0, g, rewards) / n  # (G,)
    centred = rewards - mean[g]  # (B,)
    var = zeros.index_add(0, g, centred**2) / (n - 1).clamp(min=1)  # (G,) unbiased
    r_max = zeros.scatter_reduce(0, g, rewards, "amax", include_self=False)  # (G,)
    r_min = zeros.scatter_reduce(0, g, rewards, "amin", include_self=False)  # (G,)
    flat = (r_max == r_min)[g]  # (B,) nothing to learn from this group
    return torch.where(flat, 0.0, centred), var.sqrt()[g]
    # <<< solution


def group_advantages(rewards: Tensor, group_ids: Tensor, eps: float = 1e-6) -> Tensor:
    """GRPO: A_i = (R_i - mean(R_group)) / (std(R_group) + eps), unbiased std.

    rewards (B,) float; group_ids (B,) integer labels, one per question. Returns A (B,); singleton
    groups and groups of equal rewards give 0. The caller broadcasts A to the tokens of row i."""
    # >>> solution A2
    centred, std = _group_centred(rewards, group_ids)  # (B,), (B,)
    return centred / (std + eps)  # (B,)
    # <<< solution


def reinforce_pp_advantages(rewards: Tensor, group_ids: Tensor, eps: float = 1e-6) -> Tensor:
    """REINFORCE++ baseline: A_i = (R_i - mean(R_group)) / (std_batch + eps), where
    std_batch is the unbiased std of the centred rewards over all B rows.
    rewards, group_ids (B,)."""
    # >>> solution A2
    centred, _ = _group_centred(rewards, group_ids)  # (B,)
    std = centred.std() if centred.numel() > 1 else centred.new_zeros(())  # ()
    return centred / (std + eps)  # (B,)
    # <<< solution


# --------------------------------------------------------------------------------------------------
# Entropy-aware advantage (arXiv 2510.14545, Entropy-Balanced Policy Optimization)


def entropy_aware_advantages(adv: Tensor, entropy: Tensor, loss_mask: Tensor,
                             alpha: float = 0.2) -> Tensor:
    """AEPO: A~_t = A * (1 + alpha * sg(z_t)), z_t = (H_t - mean H) / std H (arXiv 2510.14545).

    adv (B,) or (B, T); entropy (B, T), token entropies; loss_mask (B, T). Mean and unbiased std
    run over the mask-1 tokens of all B rows; std 0 (or one token) -> z = 0. (train.py passes the
    step's whole batch with the rollout's entropies, so no mini- or micro-batch split changes z.)
    Returns A~ (B, T), 0 at masked positions. No gradient reaches `entropy`."""
    # >>> solution A2
    valid = loss_mask > 0  # (B, T)
    H = entropy.detach()  # (B, T) stop-gradient: z only reweights the signal
    h = H[valid]  # (N,) entropies of sampled tokens
    if h.numel() > 1 and h.max() > h.min():
        z = (H - h.mean()) / h.std()  # (B, T)
    else:
        z = torch.zeros_like(H)  # (B, T) std 0 -> 1, and H - mean = 0
    adv = adv[:, None] if adv.dim() == 1 else adv  # (B, 1) or (B, T)
    return torch.where(valid, adv * (1 + alpha * z), 0.0)  # (B, T)
    # <<< solution


# --------------------------------------------------------------------------------------------------
# Surrogates: PPO/GRPO, DAPO, GPPO, CISPO and AEPO's stop-gradient clipping


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    adv: Tensor,
    loss_mask: Tensor,
    *,
    clip_mode: str,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = 3.0,
    entropy: Tensor | None = None,
    high_entropy: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped surrogate L = mean_t max(-A_t r_t, -A_t clip_r_t), r = pi_theta / pi_old;
    dual clip for A < 0: L_t = min(L_t, -A_t c) with c = `dual_clip` (None turns it off).

    clip_r per `clip_mode` (sg = stop-gradient; a bound written b * r / sg(r) has value b and
    gradient b * d log pi, so the clipped token keeps its gradient):
      ppo    clip(r, 1 - eps_low, 1 + eps_high)                     (DAPO: eps_high = 0.28)
      gppo   both bounds as b * r / sg(r)
      aepo   lower bound 1 - eps_low; upper bound (1 + eps_high) * r / sg(r)
      cispo  no max: L_t = -sg(clip(r, 1 - eps_low, 1 + eps_high)) * A_t * log pi_t, no dual clip
    Per-token weight F in d L_t = -A_t F d log pi_t: r inside the trust region; 0 for ppo where aepo
    gives 1 + eps_high (A > 0, r > 1 + eps_high); 0 for both when A < 0 and r < 1 - eps_low (gppo:
    1 - eps_low) and under the dual clip; cispo: sg(clip(r)) everywhere.

    logp (B, T) with gradient; old_logp, adv (per token), loss_mask (B, T); entropy (B, T) and
    high_entropy (B, T) bool (the step's 20% highest-entropy tokens) optional, for stats only.
    Returns (loss, stats): loss = sum of L_t over mask-1 tokens / their count; stats: what the
    clipping did (surrogate_stats)."""
    if clip_mode not in CLIP_MODES:
        raise ValueError(f"clip_mode={clip_mode!r}; choose one of {CLIP_MODES}")
    keeps_low = clip_mode in ("gppo", "cispo")  # a token clipped below keeps its gradient
    keeps_high = clip_mode in ("gppo", "aepo", "cispo")  # a token clipped above keeps its gradient
    valid = loss_mask > 0  # (B, T)
    n_tokens = valid.sum().clamp(min=1)  # ()
    # masked tokens leave the graph: -inf there is harmless
    logp = torch.where(valid, logp, 0.0)  # (B, T)
    old_logp = torch.where(valid, old_logp.detach(), 0.0)  # (B, T)
    adv = adv.detach()  # (B, T)
    log_ratio = (logp - old_logp).clamp(-20.0, 20.0)  # (B, T) log r
    ratio = log_ratio.exp()  # (B, T) r
    r_over_sg_r = torch.exp(logp - logp.detach())  # (B, T) value 1, gradient d log pi
    lo, hi = 1 - eps_low, 1 + eps_high
    dual = torch.zeros_like(valid)  # (B, T) tokens under the dual clip

    if clip_mode == "cispo":
        clipped_low, clipped_high = valid & (ratio < lo), valid & (ratio > hi)  # (B, T)
        loss_t = -ratio.detach().clamp(lo, hi) * adv * logp  # (B, T)
    else:
        # >>> solution A3
        # The clipped branch wins the max exactly when A > 0, r > hi or A < 0, r < lo.
        clipped_low = valid & (adv < 0) & (ratio < lo)  # (B, T)
        clipped_high = valid & (adv > 0) & (ratio > hi)  # (B, T)
        low = lo * r_over_sg_r if keeps_low else lo
        high = hi * r_over_sg_r if keeps_high else hi
        clip_r = torch.where(ratio > hi, high, torch.where(ratio < lo, low, ratio))  # (B, T)
        loss_t = torch.maximum(-adv * ratio, -adv * clip_r)  # (B, T)
        if dual_clip is not None:
            dual = valid & (adv < 0) & (loss_t > -adv * dual_clip)  # (B, T)
            loss_t = torch.where(dual, -adv * dual_clip, loss_t)  # (B, T) constant: no gradient
        # <<< solution
    loss = torch.where(valid, loss_t, 0.0).sum() / n_tokens  # ()
    stats = surrogate_stats(valid, adv, ratio, log_ratio, clipped_low, clipped_high, dual, lo=lo,
                            hi=hi, keeps_low=keeps_low, keeps_high=keeps_high, entropy=entropy,
                            high_entropy=high_entropy)
    return loss, stats


@torch.no_grad()
def surrogate_stats(
    valid: Tensor,
    adv: Tensor,
    ratio: Tensor,
    log_ratio: Tensor,
    clipped_low: Tensor,
    clipped_high: Tensor,
    dual: Tensor,
    *,
    lo: float,
    hi: float,
    keeps_low: bool,
    keeps_high: bool,
    entropy: Tensor | None = None,
    high_entropy: Tensor | None = None,
) -> dict[str, float]:
    """What policy_loss's clipping did to the sampled tokens (`valid`); each tensor is the (B, T)
    one of the same name there, lo / hi the clip range, keeps_low / keeps_high whether a token
    clipped below / above keeps its gradient.

    clip_frac_low, clip_frac_high (share of sampled tokens whose clipped branch is active; cispo:
    whose weight is clipped), clip_kept_frac (share of clipped tokens that keep a gradient),
    clip_grad_share (share of the gradient's weight sum_t |A_t| F_t that sits on clipped tokens:
    0 for ppo, what stop-gradient clipping keeps for aepo), dual_clip_frac, ratio_mean, approx_kl
    (k3 estimate of KL(pi_old || pi_theta) on tokens sampled from pi_old: (r - 1) - log r),
    entropy_mean (if entropy is given), clip_frac_top20 and clip_frac_rest (if high_entropy is
    given: the clipped share among the high-entropy tokens and among the others)."""
    clipped = clipped_low | clipped_high  # (B, T)
    kept = (clipped_low & keeps_low) | (clipped_high & keeps_high)  # (B, T)
    n = valid.sum().clamp(min=1).float()  # ()
    # F_t, the per-token gradient weight (the table in policy_loss's docstring); for cispo, which
    # keeps every token's gradient and clips r outside [lo, hi], it is sg(clip(r, lo, hi))
    weight = torch.where(clipped_high, hi if keeps_high else 0.0,
                         torch.where(clipped_low, lo if keeps_low else 0.0, ratio))  # (B, T)
    weight = torch.where(dual, 0.0, weight)  # (B, T)
    mass = torch.where(valid, adv.abs() * weight, 0.0)  # (B, T)
    stats = {
        "clip_frac_low": (clipped_low.sum() / n).item(),
        "clip_frac_high": (clipped_high.sum() / n).item(),
        "clip_kept_frac": (kept.sum() / clipped.sum().clamp(min=1)).item(),
        "clip_grad_share": (mass[clipped].sum() / mass.sum().clamp(min=1e-12)).item(),
        "dual_clip_frac": (dual.sum() / n).item(),
        "ratio_mean": (torch.where(valid, ratio, 0.0).sum() / n).item(),
        "approx_kl": (torch.where(valid, ratio - 1 - log_ratio, 0.0).sum() / n).item(),
    }
    if entropy is not None:
        stats["entropy_mean"] = (torch.where(valid, entropy, 0.0).sum() / n).item()
    if high_entropy is not None:
        top, rest = valid & high_entropy, valid & ~high_entropy  # (B, T) each
        stats["clip_frac_top20"] = ((clipped & top).sum() / top.sum().clamp(min=1)).item()
        stats["clip_frac_rest"] = ((clipped & rest).sum() / rest.sum().clamp(min=1)).item()
    return stats


def kl_k3(logp: Tensor, ref_logp: Tensor, loss_mask: Tensor) -> Tensor:
    """k3 estimate of KL(pi_theta || pi_ref) on tokens sampled from pi_theta, token mean:
    mean_t exp(d_t) - d_t - 1 with d_t = log pi_ref - log pi_theta (>= 0; the released recipe sets
    its coefficient to 0). d is clamped to [-20, 20] like log r in policy_loss (verl does the same),
    so one wild token cannot overflow the loss. logp (B, T) with gradient; ref_logp, loss_mask
    (B, T). Returns (); 0 when no token is sampled."""
    valid = loss_mask > 0  # (B, T)
    # masked -> k3 = 0
    d = torch.where(valid, ref_logp.detach() - logp, 0.0).clamp(-20.0, 20.0)  # (B, T)
    return (d.exp() - d - 1).sum() / valid.sum().clamp(min=1)  # ()


# --------------------------------------------------------------------------------------------------
# Token log-probs and exact entropy from a causal LM


def entropy_of_logp(logp: Tensor) -> Tensor:
    """Exact entropy H = -sum_v p_v log p_v from log-probabilities (..., V) float32 (-inf where
    p = 0). Returns (...), in nats. The one entropy function of the project: the rollout records it
    per sampled token, the update recomputes it for the entropy-aware advantage (arXiv 2510.14545,
    eq. 7 and 12)."""
    plogp = torch.where(logp > -torch.inf, logp.exp() * logp, 0.0)  # (..., V) 0 * log 0 = 0
    return -plogp.sum(-1)  # (...)


def token_entropy(logits: Tensor) -> Tensor:
    """The same exact H from logits (..., V) of any float dtype (upcast to float32), -inf
    allowed."""
    return entropy_of_logp(torch.log_softmax(logits.float(), dim=-1))  # (...)


def _head_logp(head, states: Tensor, target: Tensor,
               with_entropy: bool) -> tuple[Tensor, Tensor | None]:
    """log pi(target) and (no gradient) the exact entropy, in float32, from the last hidden states
    of a few positions. states (..., H) -> logits (..., V) = head(states); target (...). Returns
    (...), (...)."""
    # the only vocabulary-sized tensors live here, one chunk at a time
    logits = head(states).float()  # (..., V)
    log_z = logits.logsumexp(-1)  # (...)
    logp = logits.gather(-1, target[..., None]).squeeze(-1) - log_z  # (...)
    if not with_entropy:
        return logp, None
    with torch.no_grad():
        return logp, entropy_of_logp(logits - log_z[..., None])  # (...), (...)


def _chunk_logp(head, states: Tensor, target: Tensor,
                with_entropy: bool) -> tuple[Tensor, Tensor | None]:
    """_head_logp, recomputed in backward when a gradient is needed: autograd keeps only `states`
    (the chunk's hidden states), never its float32 logits."""
    if torch.is_grad_enabled() and states.requires_grad:
        return checkpoint(_head_logp, head, states, target, with_entropy, use_reentrant=False)
    return _head_logp(head, states, target, with_entropy)


def _final_states(model, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                  keep: int):
    """(states, head) with head(states) = the logits at positions keep .. T - 1, states
    (B, T - keep, .). A transformers causal LM (or a peft model around one) gives its backbone's
    last hidden states and its LM head, so no (B, T, V) tensor is ever built. Anything else
    (a DDP wrapper, a test double, a model that soft-caps its logits) is called whole: states are
    then its logits and head the identity."""
    # peft -> transformers
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    backbone = getattr(base, getattr(base, "base_model_prefix", ""), None)
    softcap = getattr(getattr(base, "config", None), "final_logit_softcapping", None)
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                  use_cache=False)
    if head is None or not isinstance(backbone, torch.nn.Module) or softcap:
        return model(**kwargs, logits_to_keep=input_ids.shape[1] - keep).logits, torch.nn.Identity()
    return backbone(**kwargs).last_hidden_state[:, keep:], head  # (B, T - keep, H)


def token_logprobs_reference(model, input_ids: Tensor,
                             attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """token_logprobs the plain way (with_entropy=True, first=0): one forward, the whole (B, T, V)
    float32 log-softmax, shift, gather. Reads in ten lines and is what the tests hold the chunked
    one to; training would keep B x T x V floats for the backward, which is why it is not used."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=False).logits  # (B, T, V)
    lsm = logits.float().log_softmax(-1)[:, :-1]  # (B, T - 1, V) position t predicts token t + 1
    logp = lsm.gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (B, T - 1)
    entropy = entropy_of_logp(lsm.detach())  # (B, T - 1)
    scored = (attention_mask[:, 1:] > 0) & (attention_mask[:, :-1] > 0)  # (B, T - 1)
    logp, entropy = torch.where(scored, logp, 0.0), torch.where(scored, entropy, 0.0)
    return (torch.nn.functional.pad(logp, (1, 0)),
            torch.nn.functional.pad(entropy, (1, 0)))  # (B, T), (B, T) token 0 has no context


def token_logprobs(
    model, input_ids: Tensor, attention_mask: Tensor, *, with_entropy: bool = False,
    chunk_size: int = 128, first: int = 0,
) -> Tensor | tuple[Tensor, Tensor]:
    """logp[b, t] = log pi(ids[b, t] | ids[b, :t]), aligned with `loss_mask` on the same (B, T)
    ids; and, if `with_entropy`, the exact entropy H[b, t] of the distribution that predicted token
    t. Both are 0 at padding, at each row's first real token, and before `first`. The same values
    as token_logprobs_reference, in a fraction of its memory.

    input_ids, attention_mask (B, T): each row's real tokens in one run, right-padded (as
    train.py builds them) or left-padded; a gap of padding inside a row stops with a ValueError.
    Positions follow the mask: position_ids = cumsum(mask) - 1, so real tokens keep their positions.
    Memory: the backbone runs once; the LM head and all float32 work run over chunks of `chunk_size`
    positions (B x chunk_size x V floats at a time), each recomputed in backward, so neither the
    forward nor the backward ever holds a (B, T, V) tensor. Only positions from the one that
    predicts token `first` on reach the LM head, so a long prompt (first = where responses start)
    costs no vocabulary work. Entropy carries no gradient."""
    B, T = input_ids.shape
    real = attention_mask > 0  # (B, T)
    if ((real[:, 1:] & ~real[:, :-1]).sum(1) + real[:, 0] > 1).any():
        raise ValueError("token_logprobs: a row has padding between real tokens; pad on the "
                         "right (or the left) only")
    scored = real & torch.nn.functional.pad(real[:, :-1], (1, 0), value=False)  # (B, T)
    scored[:, :first] = False  # a real token after a real one, from `first` on
    columns = scored.any(0).nonzero()  # (n, 1)
    keep = int(columns[0]) - 1 if len(columns) else T - 1  # the first state whose logits count

    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    states, head = _final_states(model, input_ids, attention_mask, position_ids,
                                 keep)  # (B, T - keep, .)

    # The state at position t predicts token t + 1; split's backward is one concat.
    next_ids = torch.nn.functional.pad(input_ids[:, 1:], (0, 1))[:, keep:]  # (B, T - keep)
    chunks = [_chunk_logp(head, s, y, with_entropy)
              for s, y in zip(states.split(chunk_size, dim=1), next_ids.split(chunk_size, dim=1))]
    logp = torch.cat([lp for lp, _ in chunks], dim=1)  # (B, T - keep) log pi(ids[t + 1])
    logp = torch.nn.functional.pad(logp[:, :-1], (keep + 1, 0))  # (B, T) log pi(ids[t])
    logp = torch.where(scored, logp, 0.0)  # (B, T)
    if not with_entropy:
        return logp
    entropy = torch.cat([h for _, h in chunks], dim=1)  # (B, T - keep)
    entropy = torch.nn.functional.pad(entropy[:, :-1], (keep + 1, 0))  # (B, T)
    return logp, torch.where(scored, entropy, 0.0)  # (B, T), (B, T)


# What token_logprobs runs: support/sft.py's cached_sft hashes their source (an edit to them renews
# the SFT start; an edit to the RL losses above does not)
TOKEN_LOGPROBS_CODE = (token_logprobs, _chunk_logp, _head_logp, _final_states, entropy_of_logp)
