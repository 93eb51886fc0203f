"""Hand-computed values and autograd checks for loss.py (arXiv 2510.14545, Entropy-Balanced Policy
Optimization). CPU, a few seconds."""
import copy
import math
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

from loss import (
    entropy_aware_advantages,
    group_advantages,
    kl_k3,
    policy_loss,
    reinforce_pp_advantages,
    token_logprobs,
    token_logprobs_reference,
)

torch.set_num_threads(1)
EPS = 1e-6

# --------------------------------------------------------------------------------------------------
# Group advantages


def test_group_of_four_by_hand():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.tensor([0, 0, 0, 0]))
    a = 0.5 / (math.sqrt(1 / 3) + EPS)  # mean .5, unbiased std sqrt(4 * .25 / 3)
    assert_close(adv, torch.tensor([a, -a, -a, a]))
    assert abs(a - 0.8660) < 1e-3


def test_two_interleaved_groups_any_labels():
    rewards = torch.tensor([1.0, 2.0, 0.0, 4.0, 2.0, 0.0])
    group_ids = torch.tensor([-7, 300, -7, 300, -7, 300])  # group -7: 1, 0, 2; group 300: 2, 4, 0
    expected = torch.tensor([0.0, 0.0, -1 / (1 + EPS), 2 / (2 + EPS), 1 / (1 + EPS),
                             -2 / (2 + EPS)])
    assert_close(group_advantages(rewards, group_ids), expected)


def test_equal_rewards_and_singletons_give_exact_zero():
    rewards = torch.tensor([0.1, 0.1, 0.1, 5.0, 0.7, 0.7, 0.7, 0.7, 0.7])
    group_ids = torch.tensor([0, 0, 0, 1, 2, 2, 2, 2, 2])
    assert torch.equal(group_advantages(rewards, group_ids), torch.zeros(9))
    assert torch.equal(reinforce_pp_advantages(rewards, group_ids), torch.zeros(9))


def test_eight_equal_rewards_with_an_inexact_float_mean_give_exact_zero():
    # float32 mean of eight 0.1 is off by 7e-9: / (0 + eps) would give -.0075
    rewards = torch.full((8,), 0.1)
    assert (rewards - rewards.mean()).abs().max() > 0  # the trap is real
    group_ids = torch.zeros(8, dtype=torch.long)
    assert torch.equal(group_advantages(rewards, group_ids), torch.zeros(8))
    assert torch.equal(reinforce_pp_advantages(torch.cat([rewards, torch.tensor([0.0, 1.0])]),
                                               torch.tensor([0] * 8 + [1, 1]))[:8], torch.zeros(8))


def test_eps_is_added_to_the_std():
    """A tiny std and a large eps make + eps and - eps differ by far more than any tolerance."""
    rewards, group_ids = torch.tensor([0.0, 1e-4]), torch.tensor([0, 0])
    std = 1e-4 / math.sqrt(2)  # unbiased std of two values 1e-4 apart
    for eps in (1e-6, 1e-4):
        want = torch.tensor([-5e-5, 5e-5]) / (std + eps)
        assert_close(group_advantages(rewards, group_ids, eps=eps), want, rtol=1e-5, atol=0)
        assert_close(reinforce_pp_advantages(rewards, group_ids, eps=eps), want, rtol=1e-5, atol=0)


def test_reinforce_pp_one_row_is_zero_not_nan():
    assert torch.equal(reinforce_pp_advantages(torch.tensor([3.0]), torch.tensor([0])),
                       torch.zeros(1))


def test_reinforce_pp_by_hand():
    rewards = torch.tensor([1.0, 0.0, 2.0, 2.0, 0.5])
    group_ids = torch.tensor([0, 0, 1, 1, 2])
    # centred: .5, -.5, 0, 0, 0; batch std (unbiased, over 5 rows) = sqrt(.5 / 4)
    expected = torch.tensor([0.5, -0.5, 0.0, 0.0, 0.0]) / (math.sqrt(0.125) + EPS)
    assert_close(reinforce_pp_advantages(rewards, group_ids), expected)


# --------------------------------------------------------------------------------------------------
# Entropy-aware advantage


def test_entropy_aware_by_hand_and_no_gradient_into_entropy():
    adv = torch.tensor([1.0, -2.0], requires_grad=True)
    entropy = torch.tensor([[0.5, 1.0, 1.5], [2.0, 0.3, 9.0]], requires_grad=True)
    loss_mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    out = entropy_aware_advantages(adv, entropy, loss_mask, alpha=0.2)
    # valid entropies .5 1 1.5 2 .3: mean 1.06, unbiased var
    # (.3136+.0036+.1936+.8836+.5776)/4 = .493
    z = (torch.tensor([[0.5, 1.0, 1.5], [2.0, 0.3, 0.0]]) - 1.06) / math.sqrt(0.493)
    expected = torch.tensor([[1.0], [-2.0]]) * (1 + 0.2 * z) * loss_mask
    assert_close(out, expected)
    out.sum().backward()
    assert entropy.grad is None
    assert_close(adv.grad, ((1 + 0.2 * z) * loss_mask).sum(1))


def test_entropy_aware_std_zero_and_per_token_adv():
    adv = torch.tensor([[1.0, 2.0, 3.0], [-1.0, -1.0, 4.0]])
    entropy = torch.tensor([[0.7, 0.7, 5.0], [0.7, 0.7, 0.7]])
    loss_mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    out = entropy_aware_advantages(adv, entropy, loss_mask)
    assert torch.equal(out, adv * loss_mask)  # all valid entropies equal: std 0 -> z = 0


# --------------------------------------------------------------------------------------------------
# Surrogates: one row covering every case of the table, plus a masked token

#            inside  A>0,r>hi  A<0,r<lo  dual   A<0,hi<r<c  A>0,r<lo  masked
R = torch.tensor([1.1, 1.5, 0.5, 4.0, 1.5, 0.5, 2.0])
A = torch.tensor([1.0, 1.0, -1.0, -2.0, -1.0, 1.0, 5.0])
MASK = torch.tensor([1, 1, 1, 1, 1, 1, 0])
N = 6
# Per-token loss and gradient weight F (d L_t = -A_t F_t d log pi_t) with eps = .2, c = 3.
L_PPO = [-1.1, -1.2, 0.8, 6.0, 1.5, -0.5]
F_TABLE = {
    "ppo": [1.1, 0.0, 0.0, 0.0, 1.5, 0.5],
    "aepo": [1.1, 1.2, 0.0, 0.0, 1.5, 0.5],
    "gppo": [1.1, 1.2, 0.8, 0.0, 1.5, 0.5],
    "cispo": [1.1, 1.2, 0.8, 1.2, 1.2, 0.8],  # sg(clip(r)) everywhere, no dual clip
}


def run(clip_mode, ratio=R, adv=A, mask=MASK, **kw):
    old_logp = torch.linspace(-3.0, -0.5, ratio.numel())[None]  # (1, T)
    logp = (old_logp + ratio.log()).requires_grad_()  # (1, T)
    loss, stats = policy_loss(logp, old_logp, adv[None], mask[None], clip_mode=clip_mode, **kw)
    loss.backward()
    return loss, stats, logp.grad[0], logp.detach()[0]


def expected_grad(F, adv=A, n=N):
    return -adv * torch.tensor(F + [0.0]) / n  # the masked token gets exactly 0


@pytest.mark.parametrize("clip_mode", ["ppo", "aepo", "gppo", "cispo"])
def test_table_values_and_gradient_weights(clip_mode):
    loss, stats, grad, logp = run(clip_mode)
    if clip_mode == "cispo":
        w = torch.tensor(F_TABLE["cispo"])
        assert_close(loss, (-w * A[:N] * logp[:N]).sum() / N)
    else:  # value is the same for all three: only gradients differ
        assert_close(loss, torch.tensor(sum(L_PPO) / N))
    assert_close(grad, expected_grad(F_TABLE[clip_mode]))
    assert grad[-1].item() == 0.0


def test_dapo_is_ppo_with_clip_higher():
    loss, _, grad, _ = run("ppo", eps_high=0.28)  # token 2: r = 1.5 > 1.28 -> L = -1.28
    assert_close(loss, torch.tensor((sum(L_PPO) + 1.2 - 1.28) / N))
    assert_close(grad, expected_grad(F_TABLE["ppo"]))


def test_dual_clip_off():
    loss, _, grad, _ = run("aepo", dual_clip=None)  # token 4 keeps -A r = 8 and weight r = 4
    assert_close(loss, torch.tensor((sum(L_PPO) - 6.0 + 8.0) / N))
    assert_close(grad, expected_grad([1.1, 1.2, 0.0, 4.0, 1.5, 0.5]))


@pytest.mark.parametrize("clip_mode", ["ppo", "aepo", "gppo", "cispo"])
def test_stats(clip_mode):
    entropy = torch.tensor([[1.0, 2, 3, 4, 5, 6, 100]])
    _, stats, _, _ = run(clip_mode, entropy=entropy, high_entropy=entropy >= 5)   # tokens 4, 5
    low, high = (2 / N, 3 / N) if clip_mode == "cispo" else (1 / N, 1 / N)
    kept = {"ppo": 0.0, "aepo": 0.5, "gppo": 1.0, "cispo": 1.0}[clip_mode]
    r = R[:N].double()
    expected = {
        "clip_frac_low": low,
        "clip_frac_high": high,
        "clip_kept_frac": kept,
        "dual_clip_frac": 0.0 if clip_mode == "cispo" else 1 / N,
        "ratio_mean": r.mean().item(),
        "approx_kl": (r - 1 - r.log()).mean().item(),
        "entropy_mean": 3.5,
        # sum |A| F over clipped tokens / over all (F_TABLE; cispo clips tokens 1-5)
        "clip_grad_share": {"ppo": 0.0, "aepo": 1.2 / 4.3, "gppo": 2.0 / 5.1,
                            "cispo": 6.4 / 7.5}[clip_mode],
        "clip_frac_top20": 1.0 if clip_mode == "cispo" else 0.0,     # tokens 4, 5
        "clip_frac_rest": 0.75 if clip_mode == "cispo" else 0.5,     # tokens 0-3
    }
    assert stats.keys() == expected.keys()
    for key, value in expected.items():
        assert stats[key] == pytest.approx(value, abs=1e-6), key


@pytest.mark.parametrize("clip_mode", ["ppo", "aepo", "gppo", "cispo"])
def test_on_policy_is_plain_policy_gradient(clip_mode):
    gen = torch.Generator().manual_seed(0)
    old_logp = -torch.rand(3, 5, generator=gen) * 4  # (B, T)
    logp = old_logp.clone().requires_grad_()  # r = 1
    adv = torch.randn(3, 5, generator=gen)  # (B, T)
    mask = (torch.rand(3, 5, generator=gen) > 0.3).long()
    old_logp[mask == 0] = -float("inf")  # garbage under the mask must not reach the gradient
    loss, stats = policy_loss(logp, old_logp, adv, mask, clip_mode=clip_mode)
    loss.backward()
    assert_close(logp.grad, -adv * mask / mask.sum())
    assert stats["ratio_mean"] == pytest.approx(1.0) and stats["approx_kl"] == 0.0


def test_empty_mask_and_bad_mode():
    logp = torch.zeros(2, 3, requires_grad=True)
    loss, _ = policy_loss(logp, logp.detach(), torch.ones(2, 3), torch.zeros(2, 3),
                          clip_mode="aepo")
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logp.grad, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="clip_mode"):
        policy_loss(logp, logp, logp, logp, clip_mode="grpo")


def test_kl_k3():
    logp = torch.tensor([[math.log(0.5), -1.0, -2.0]], requires_grad=True)
    ref_logp = torch.tensor([[math.log(0.25), -1.0, 9.0]])
    mask = torch.tensor([[1, 1, 0]])
    kl = kl_k3(logp, ref_logp, mask)  # token 0: .5 + log 2 - 1; token 1: 0
    assert_close(kl, torch.tensor((math.log(2) - 0.5) / 2))
    kl.backward()
    assert_close(logp.grad, torch.tensor([[(1 - 0.5) / 2, 0.0, 0.0]]))  # d/dlogp = 1 - exp(d)
    assert kl_k3(ref_logp, ref_logp, torch.ones(1, 3)).item() == 0.0
    assert kl_k3(ref_logp + 0.3, ref_logp, torch.ones(1, 3)).item() > 0


def test_kl_k3_empty_mask_and_wild_log_ratios():
    logp = torch.tensor([[0.0, -1.0]], requires_grad=True)
    kl = kl_k3(logp, torch.tensor([[-90.0, 90.0]]), torch.zeros(1, 2))
    kl.backward()
    assert kl.item() == 0.0 and torch.equal(logp.grad, torch.zeros(1, 2))  # no 0 / 0, no inf * 0
    # d = log pi_ref - log pi beyond +-20 is clamped to +-20 (as log r in policy_loss):
    # finite, no gradient
    logp = torch.tensor([[0.0, -1.0, -2.0]], requires_grad=True)
    kl = kl_k3(logp, torch.tensor([[-25.0, 99.0, -1.0]]), torch.ones(1, 3))
    want = (math.exp(-20) + 20 - 1) + (math.exp(20) - 20 - 1) + (math.e - 1 - 1)
    assert kl.item() == pytest.approx(want / 3, rel=1e-6)
    kl.backward()
    assert_close(logp.grad, torch.tensor([[0.0, 0.0, (1 - math.e) / 3]]))


# --------------------------------------------------------------------------------------------------
# token_logprobs on a tiny random Qwen3


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
    )
    return Qwen3ForCausalLM(config).float().eval()


def padded_batch():
    """Rows: left padding; no padding; right padding (train.py's layout)."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 64, (3, 9), generator=gen)  # (B, T)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 9, [1, 1, 1, 1, 1, 1, 0, 0, 0]])
    return ids.masked_fill(mask == 0, 0), mask


def naive(model, ids, mask):
    """Each row alone without its padding: log_softmax, shift, gather; full-softmax entropy."""
    logp, entropy = torch.zeros(ids.shape), torch.zeros(ids.shape)
    for b in range(ids.shape[0]):
        pos = mask[b].nonzero().squeeze(1)  # real positions
        seq = ids[b, pos][None]  # (1, L)
        lsm = model(input_ids=seq).logits[0].log_softmax(-1)  # (L, V)
        logp[b, pos[1:]] = lsm[:-1].gather(-1, seq[0, 1:, None]).squeeze(-1)
        entropy[b, pos[1:]] = -(lsm[:-1].exp() * lsm[:-1]).sum(-1)
    return logp, entropy


def test_token_logprobs_match_naive_with_left_and_right_padding(tiny_model):
    ids, mask = padded_batch()
    with torch.no_grad():
        want_logp, want_entropy = naive(tiny_model, ids, mask)
        for chunk_size in (1, 4, 128):
            logp, entropy = token_logprobs(tiny_model, ids, mask, with_entropy=True,
                                           chunk_size=chunk_size)
            assert_close(logp, want_logp, atol=1e-5, rtol=1e-5)
            assert_close(entropy, want_entropy, atol=1e-5, rtol=1e-5)
        assert_close(token_logprobs(tiny_model, ids, mask), want_logp, atol=1e-5, rtol=1e-5)
    assert (logp[mask == 0] == 0).all() and (logp[:, 0] == 0).all()


def test_token_logprobs_from_first_skip_the_prompt_logits(tiny_model):
    """first = k: the same values from token k on, 0 before, and the LM head sees only the positions
    from the one predicting token k (k - 1; 0 for k = 0, where row 0's first scored token is 3 but
    row 1's is 1), in chunks of at most chunk_size positions."""
    ids, mask = padded_batch()
    seen = []
    hook = tiny_model.lm_head.register_forward_hook(
        lambda mod, inp, out: seen.append(inp[0].shape[:-1]))
    with torch.no_grad():
        want_logp, want_entropy = token_logprobs(tiny_model, ids, mask, with_entropy=True)
        for first, kept in [(0, 9), (1, 9), (3, 7), (6, 4), (8, 2)]:
            seen.clear()
            logp, entropy = token_logprobs(tiny_model, ids, mask, with_entropy=True, chunk_size=2,
                                           first=first)
            widths = [s[1] for s in seen]  # (B, c) chunk calls
            assert sum(widths) == kept and max(widths) <= 2, (first, seen)
            assert_close(logp[:, first:], want_logp[:, first:], atol=1e-6, rtol=1e-6)
            assert_close(entropy[:, first:], want_entropy[:, first:], atol=1e-6, rtol=1e-6)
            assert (logp[:, :first] == 0).all() and (entropy[:, :first] == 0).all()
    hook.remove()


def test_token_logprobs_gradients_do_not_depend_on_chunking(tiny_model):
    ids, mask = padded_batch()
    grads = []
    for chunk_size in (3, 128):
        tiny_model.zero_grad()
        logp = token_logprobs(tiny_model, ids, mask, chunk_size=chunk_size)
        (logp * torch.arange(9.0)).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in tiny_model.parameters()]))
    assert grads[0].abs().sum() > 0
    assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def full_logits_reference(model, ids, mask, first=0):
    """loss.token_logprobs_reference (the whole (B, T, V) logits), 0 before `first`."""
    logp, entropy = token_logprobs_reference(model, ids, mask)  # (B, T), (B, T)
    kept = torch.arange(ids.shape[1]) >= first  # (T,)
    return logp * kept, entropy * kept


def test_the_plain_reference_is_the_naive_per_row_computation(tiny_model):
    ids, mask = padded_batch()
    with torch.no_grad():
        for got, want in zip(token_logprobs_reference(tiny_model, ids, mask),
                             naive(tiny_model, ids, mask)):
            assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_gap_of_padding_inside_a_row_stops_with_the_fix(tiny_model):
    ids, mask = padded_batch()
    mask[2] = torch.tensor([0, 1, 1, 1, 0, 0, 1, 1, 1])
    with pytest.raises(ValueError, match="padding between real tokens"):
        token_logprobs(tiny_model, ids, mask)


def lora_model(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(2)
    peft_model = get_peft_model(copy.deepcopy(model),
                                LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, p in peft_model.named_parameters():  # LoRA B starts at 0: make the adapters matter
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    return peft_model


@pytest.mark.parametrize("wrap", ["bare", "lora", "lora+checkpointing"])
@pytest.mark.parametrize("first", [0, 6])
def test_chunked_head_equals_full_logits_in_value_and_gradient(tiny_model, wrap, first):
    """The backbone + chunked LM head path against the full-logits reference: the same log-probs,
    entropies and parameter gradients, through LoRA and gradient checkpointing; and the LM head
    never produces more than chunk_size positions at once, in forward or in the backward
    recomputation."""
    model = tiny_model if wrap == "bare" else lora_model(tiny_model)
    if wrap.endswith("checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # checkpointing acts in train mode only; dropout is 0
    ids, mask = padded_batch()
    weight = torch.randn(ids.shape, generator=torch.Generator().manual_seed(3))  # (B, T)
    results = []
    for fn in (full_logits_reference,
               lambda m, i, a, first: token_logprobs(m, i, a, with_entropy=True, chunk_size=2,
                                                     first=first)):
        model.zero_grad()
        widths = []
        head = model.get_output_embeddings()
        hook = head.register_forward_hook(lambda mod, inp, out: widths.append(out.shape[-2]))
        logp, entropy = fn(model, ids, mask, first=first)
        n_forward = len(widths)
        (logp * weight).sum().backward()
        hook.remove()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((logp.detach(), entropy, grads, widths, n_forward))
    (ref_logp, ref_ent, ref_grads, *_), (logp, ent, grads, widths, n_forward) = results
    assert_close(logp, ref_logp, atol=1e-5, rtol=1e-5)
    assert_close(ent, ref_ent, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    if wrap != "bare":
        assert all("lora_" in n for n in grads)
    for name in grads:
        assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    # chunks of <= 2, each run again in backward: autograd kept no logits
    assert max(widths) <= 2 and len(widths) == 2 * n_forward


def test_bf16_logits_are_upcast_to_float32():
    """bf16 logits: log-probs and entropies come out in float32, computed from the float32 upcast (a
    bf16 log-softmax would be off by up to ~0.03 nats here)."""
    logits = (torch.randn(1, 4, 96, generator=torch.Generator().manual_seed(4))
              * 8).to(torch.bfloat16)
    ids = torch.tensor([[0, 5, 17, 95]])

    def model(**kwargs):
        return SimpleNamespace(logits=logits)

    logp, entropy = token_logprobs(model, ids, torch.ones(1, 4), with_entropy=True)
    lsm = logits.float().log_softmax(-1)[0, :-1]  # (3, V)
    assert logp.dtype == entropy.dtype == torch.float32
    assert_close(logp[0, 1:], lsm.gather(-1, ids[0, 1:, None]).squeeze(-1), rtol=0, atol=1e-6)
    assert_close(entropy[0, 1:], -(lsm.exp() * lsm).sum(-1), rtol=0, atol=1e-5)


def test_entropy_with_minus_inf_logits():
    logits = torch.tensor([[[0.0, 0.0, -float("inf"), -float("inf")]] * 3])  # (1, 3, 4)

    def model(**kwargs):
        return SimpleNamespace(logits=logits)

    logp, entropy = token_logprobs(model, torch.tensor([[0, 1, 0]]), torch.ones(1, 3),
                                   with_entropy=True)
    assert_close(logp, torch.tensor([[0.0, -math.log(2), -math.log(2)]]))
    assert_close(entropy, torch.tensor([[0.0, math.log(2), math.log(2)]]))
