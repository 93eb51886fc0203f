"""Follow one question through one AEPO rollout and one loss computation, printing every number the
walkthrough (docs/walkthrough.md) talks about: the probe, H_root and H_tool, the budget m, each
branch decision with its Delta H and streak l, the rewards, the group and entropy-aware advantages,
and the per-token gradient weight of the AEPO surrogate (from loss.py with autograd).

    python docs/walkthrough.py                       # the SFT start of the class preset if it is
                                                       built (.cache/sft-*), else the demo's, else tiny
    python docs/walkthrough.py --model tiny --question 3 --seed 1

Without --question it takes the first of the first 20 training questions whose rollout has rewards
that differ (an all-equal group has zero advantages, and every later section would print zeros).

The sampler is not changed: its pure rules (rollout.budget_from_probe, rollout.n_children) are
wrapped for the duration of the call, so we see their inputs and outputs exactly as the sampler used
them.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import aepo  # noqa: E402
import rollout  # noqa: E402
import train  # noqa: E402
from loss import group_advantages, policy_loss, token_logprobs  # noqa: E402
from support import cli, data, tiny, world  # noqa: E402
from support.policy import load_policy, make_tools, system_prompt_for  # noqa: E402

DEMO_SFT = ROOT / "runs" / "demo" / "seed-0" / "sft"


def default_model() -> str:
    """The newest built SFT start (the class preset's cache, then the demo's), else tiny."""
    built = sorted(tiny.CACHE_DIR.glob("sft-*/sft/config.json"), key=lambda p: p.stat().st_mtime)
    if built:
        return str(built[-1].parent)
    return str(DEMO_SFT) if DEMO_SFT.is_dir() else "tiny"


def watch(trace: list[dict]):
    """Wrap the sampler's two entropy rules so each call is recorded in `trace`; returns an undo."""
    budget, children = rollout.budget_from_probe, rollout.n_children

    def budget_from_probe(seg_entropies, k, beta):
        m, h_root, h_tool = budget(seg_entropies, k, beta)
        trace.append(dict(rule="pre-monitoring", seg=list(seg_entropies), h_root=h_root,
                          h_tool=h_tool, m=m))
        return m, h_root, h_tool

    def n_children(delta_h, l, room, cfg, rng):
        n = children(delta_h, l, room, cfg, rng)
        p = aepo.aepo_branch_probability(delta_h, cfg.tau, cfg.gamma, l, cfg.branch_penalty_rate)
        trace.append(dict(rule="branching", delta_h=delta_h, l=l, room=room, p=p, n=n))
        return n

    rollout.budget_from_probe, rollout.n_children = budget_from_probe, n_children

    def undo():
        rollout.budget_from_probe, rollout.n_children = budget, children
    return undo


def gradient_weights(old_logp: torch.Tensor, adv: torch.Tensor, ratios: list[float],
                     clip_mode: str) -> list[float]:
    """F_t in d L = -(1/N) sum_t A_t F_t d log pi_t, by autograd through loss.policy_loss, for
    tokens whose ratio r = pi_theta / pi_old is set to `ratios`. old_logp, adv (N,)."""
    r = torch.tensor(ratios)                                            # (N,)
    logp = (old_logp + r.log()).requires_grad_()                        # (N,)
    loss, _ = policy_loss(logp[None], old_logp[None], adv[None], torch.ones(1, len(ratios)),
                            clip_mode=clip_mode)
    loss.backward()
    return [w + 0.0 for w in (-logp.grad * len(ratios) / adv).tolist()]  # (N,) + 0.0: no -0.00


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None,
                   help="a model folder or 'tiny' (default: the class preset's SFT start if built, "
                        "else the demo's, else the untrained tiny)")
    p.add_argument("--question", type=int, default=None,
                   help="index into world:train (default: the first with rewards that differ)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k", type=int, default=8, help="[k] group size")
    args = p.parse_args(argv)
    args.model = args.model or default_model()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)

    cfg = dataclasses.replace(
        cli.resolve(aepo.Config(algo="aepo", model=args.model, output_dir="-")), k=args.k)
    model, tok = load_policy(args.model, lora_r=0, device=torch.device("cpu"), trainable=False)
    model.eval()
    examples = world.load_examples("world:train")
    print(f"preset aepo: k={cfg.k} Z={cfg.branch_z} tau={cfg.tau} gamma={cfg.gamma} "
          f"beta={cfg.beta} penalty={cfg.branch_penalty_rate} w={cfg.entropy_window} "
          f"alpha={cfg.entropy_adv_alpha} clip_mode={cfg.clip_mode}")

    # ---- 1. the rollout: pre-monitoring, then branching with the consecutive-branch penalty
    for q in [args.question] if args.question is not None else range(20):   # 20 tries at most
        example, trace = examples[q], []
        undo = watch(trace)
        try:
            res = rollout.rollout(model, tok, [example.question], make_tools(cfg), cfg,
                                  seed=args.seed, system_prompt=system_prompt_for(cfg))
        finally:
            undo()
        if len({data.reward(t.text, example.golds) for t in res.trajectories}) > 1:
            break                                            # rewards differ: advantages are not 0
    print(f"model: {args.model}\nquestion {q}: {example.question}\ngold: {example.golds[0]}")
    trajs = res.trajectories
    probe = min((t for t in trajs if t.is_global), key=lambda t: t.traj_id)
    print("\n== 1. Entropy Pre-Monitoring: the probe (first global rollout)")
    print(f"probe: {len(probe.tool_calls)} tool calls, finish={probe.finish}, segment entropies "
          f"{[round(h, 4) for h in probe.seg_entropy]}")
    for e in (e for e in trace if e["rule"] == "pre-monitoring"):
        paper = cfg.k / (1 + math.exp(-cfg.beta * (e["h_root"] - e["h_tool"])))
        print(f"H_root = {e['h_root']:.4f}  H_tool = {e['h_tool']:.4f}  ->  "
              f"m = floor(k * sigmoid(beta * (H_root - H_tool))) + 1 = {e['m']} (released "
              f"rounding; the paper's k * sigmoid(...) = {paper:.2f}, {cfg.k // 2} at equal "
              f"entropies)")
    print("\n== 2. Entropy-Balanced Adaptive Rollout: one line per branch decision "
          "(after the first w tokens that follow a tool result)")
    decisions = [e for e in trace if e["rule"] == "branching"]
    for e, (source, call, *_) in zip(decisions, res.stats[0].decisions):
        print(f"trajectory {source} after result {call}: Delta H = {e['delta_h']:+.4f}  "
              f"l = {e['l']}  room = {e['room']}  P(branch) = {e['p']:.3f}  children = {e['n']}")
    if not decisions:
        print("(no row reached a tool result after the budget was known: nothing to branch)")
    s = res.stats[0]
    print(f"globals {s.n_global}, branches {s.n_branch}, restarts {s.n_restart}, "
          f"duplicates {s.n_duplicate}")

    # ---- 2. rewards and group advantages
    rewards = torch.tensor([data.reward(t.text, example.golds) for t in trajs])              # (G,)
    adv = group_advantages(rewards, torch.zeros(len(trajs), dtype=torch.long))               # (G,)
    print("\n== 3. Rewards and GRPO group advantages")
    print("id  parent  kind    calls  finish      reward   A")
    for t, r, a in zip(trajs, rewards, adv):
        kind = "dup" if t.is_duplicate else "global" if t.is_global else "branch"
        print(f"{t.traj_id:2d}  {str(t.parent_id):6s}  {kind:6s}  {len(t.tool_calls):5d}  "
              f"{t.finish:10s}  {r.item():+.3f}  {a.item():+.3f}")

    # ---- 3. entropy-aware advantages, from the rollout's entropies (train.token_advantages)
    tensors = train.trajectory_tensors(trajs, tok.pad_token_id, torch.device("cpu"))
    entropy = tensors["entropy"]                                                            # (G, T)
    adv_t = train.token_advantages(adv, tensors, cfg)                                       # (G, T)
    with torch.no_grad():
        logp = token_logprobs(model, tensors["ids"], tensors["attn"])                       # (G, T)
    b = int(adv.abs().argmax())
    sampled = tensors["loss_mask"][b].nonzero().squeeze(1)                                    # (n,)
    h = entropy[tensors["loss_mask"] > 0]
    print(f"\n== 4. Entropy-aware advantage: A~_t = A (1 + alpha z_t), z over the batch's "
          f"{h.numel()} sampled tokens (mean H {h.mean():.3f}, std {h.std():.3f}); "
          f"trajectory {trajs[b].traj_id}, A = {adv[b]:+.3f}")
    print("t    token              H_t     z_t     A~_t")
    picks = (sampled[entropy[b, sampled].argsort(descending=True)[:3]].tolist()
             + sampled[:3].tolist())
    for t in sorted(set(picks)):
        z = (entropy[b, t] - h.mean()) / h.std()
        print(f"{t:<4d} {tok.decode([int(tensors['ids'][b, t])])!r:18.18s} "
              f"{entropy[b, t]:.3f}  {z:+.3f}  {adv_t[b, t]:+.3f}")
    gap = (logp - tensors["old_logp"])[tensors["loss_mask"] > 0].abs().max()
    print(f"recomputed log pi vs the rollout's: max |difference| {gap:.2e} "
          "(r = 1 at the first update)")

    # ---- 4. the per-token gradient weight of the clipped surrogates
    print("\n== 5. Entropy-Balanced Policy Optimization: gradient weight F_t "
          "(dL = -A_t F_t d log pi_t / N)")
    print("   ratios r set by hand on tokens of this batch "
          "(at the first update every r = 1, so F = 1)")
    old = tensors["old_logp"][b, picks[:1] * 4]  # (4,) log pi_old of one real token
    # (r, A): inside, inside, above, below
    cases = [(1.0, 1.0), (1.1, 1.0), (1.5, 1.0), (0.5, -1.0)]
    for mode in ("ppo", "aepo"):
        weights = gradient_weights(old, torch.tensor([a for _, a in cases]), [r for r, _ in cases],
                                   mode)
        print(f"{mode:5s} " + "  ".join(f"(r={r}, A={a:+.0f}) F={w:.2f}"
                                        for (r, a), w in zip(cases, weights)))

if __name__ == "__main__":
    main()
