"""The entropy-guided tree sampler: k tool-using trajectories per question, with GRPO chains, ARPO
branching or AEPO's dynamic entropy-balanced rollout (AEPO.md sections 1, 2 and 4).

    from rollout import rollout
    result = rollout(model, tokenizer, questions, tools, cfg, seed=0)
    result.trajectories  # k per question, grouped in question order
    result.stats         # per-question counts: globals, branches, restarts, duplicates, m, ...

How one rollout call runs (all active trajectories of all questions share one batch):
  1. Each question starts with its global trajectories: m = k for GRPO, m = global_rollouts for ARPO,
     and for AEPO one probe whose entropies set m (section 4.4); the probe counts as the first global.
  2. Each round, one `generate` call continues every active row until a tool closing tag, EOS or the
     segment budget. A logits processor records, from the raw temperature-1 logits, the exact entropy
     and the log-prob of each sampled token.
  3. Tool calls run in parallel threads; each result is appended as tokens with loss mask 0.
  4. Rows that just received a tool result may branch (sections 4.3 and 4.5). The result is encoded
     once, then a child copies its parent's row, KV cache included.
  5. Finished rows leave the batch; an idle question with fewer than k trajectories restarts one global
     trajectory; at the end short questions are padded by duplicating their last trajectory.

The batch keeps one KV cache across rounds (kvcache.py: its layout and operations). Each question's
prompt is encoded once per call, and every global it starts (round 0 or later) copies that cache, so
what the model encodes besides sampled tokens is each prompt once, each tool result once, and one token
per new row or continued segment.
"""
from __future__ import annotations

import copy
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

import kvcache as kv
from aepo import (Config, Tools, Trajectory, aepo_should_branch, arpo_should_branch, global_budget,
                  segment_entropy)
from policy import prompt_ids, stop_token_ids
from tools import parse_tool_call, result_block


@dataclass
class QuestionStats:
    m: int = 0                    # global budget (AEPO: from pre-monitoring)
    h_root: float = 0.0           # segment entropy of the first segment from the question
    h_tool: float = 0.0           # mean segment entropy after tool results (probe)
    n_global: int = 0             # global trajectories started (restarts included)
    n_branch: int = 0             # branch children created
    n_restart: int = 0
    n_duplicate: int = 0
    consecutive_branch_steps: int = 0   # branch events while l > 0 (a streak of branching rounds)
    branches_per_source: dict[int, int] = field(default_factory=dict)


@dataclass
class RolloutResult:
    trajectories: list[Trajectory]      # k per question, in question order
    stats: list[QuestionStats]
    generated_tokens: int = 0           # tokens sampled by the policy
    prefill_tokens: int = 0             # tokens the model encoded without sampling them


@dataclass
class _Row:
    traj: Trajectory
    pending: list[int]            # tokens to feed before the next sample (prompt or tool result)
    h_init: float | None = None   # entropy of this trajectory's first (post-branch) segment
    seg_start: int = 0            # index in response_ids where the current segment began
    call: tuple[str, str] | None = None   # (tool, input) waiting to run
    done: bool = False


# ----------------------------------------------------------------------------------------------------
# The rollout loop


def rollout(model, tokenizer, questions: list[str], tools: Tools, cfg: Config, seed: int,
            system_prompt: str, *, greedy: bool = False, top_p: float = 1.0,
            temperature: float | None = None, cache_mode: str = "tree") -> RolloutResult:
    """Sample cfg.k trajectories for each question. Same seed and inputs -> the same trajectories.

    cache_mode: "tree" (one batch, KV cache kept across rounds and copied to branches), or the
    baselines "batched" (one batch, full re-encode each round) and "naive" (one row at a time).
    """
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        sampler = _TreeSampler(model, tokenizer, tools, cfg, random.Random(seed), greedy, top_p,
                               cfg.temperature if temperature is None else temperature, cache_mode)
        return sampler.run(questions, system_prompt)


class _TreeSampler:
    def __init__(self, model, tokenizer, tools, cfg, rng, greedy, top_p, temperature, cache_mode):
        assert cache_mode in ("tree", "batched", "naive"), cache_mode
        self.model, self.tok, self.tools, self.cfg, self.rng = model, tokenizer, tools, cfg, rng
        self.cache_mode = cache_mode
        self.device = next(model.parameters()).device
        self.pad = tokenizer.pad_token_id
        self.stop_ids = set(stop_token_ids(tokenizer)) | {self.pad}
        stop_strings = [t for t in ("</search>", "</python>")          # tags that are not single tokens
                        if tokenizer.convert_tokens_to_ids(t) not in self.stop_ids]
        self.sampling = dict(                # model.generate's arguments, the same every round
            do_sample=not greedy, temperature=None if greedy else temperature, top_k=None if greedy else 0,
            top_p=None if greedy else top_p, eos_token_id=sorted(self.stop_ids), pad_token_id=self.pad,
            **(dict(stop_strings=stop_strings, tokenizer=tokenizer) if stop_strings else {}))
        self.vocab = model.config.vocab_size if hasattr(model, "config") else len(tokenizer)
        self.next_id = 0
        self.generated = self.prefilled = 0

    # -- bookkeeping helpers ------------------------------------------------------------------------
    def _new_global(self, q: int) -> _Row:
        traj = Trajectory(question_idx=q, prompt_ids=list(self.prompts[q]), traj_id=self.next_id)
        self.next_id += 1
        self.stats[q].n_global += 1
        self.started[q] += 1
        return _Row(traj=traj, pending=list(self.prompts[q]))

    def _branch(self, row: _Row, l: int) -> _Row:
        q = row.traj.question_idx
        child = copy.deepcopy(row)
        child.traj.traj_id, child.traj.parent_id, child.traj.is_global = self.next_id, row.traj.traj_id, False
        child.h_init, child.seg_start = None, len(child.traj.response_ids)
        self.next_id += 1
        self.started[q] += 1
        s = self.stats[q]
        s.n_branch += 1
        s.branches_per_source[row.traj.traj_id] = s.branches_per_source.get(row.traj.traj_id, 0) + 1
        s.consecutive_branch_steps += int(l > 0)
        return child

    # -- main loop ---------------------------------------------------------------------------------
    def run(self, questions: list[str], system_prompt: str) -> RolloutResult:
        cfg = self.cfg
        self.prompts = [prompt_ids(self.tok, q, system_prompt)[-cfg.max_prompt_tokens:] for q in questions]
        nq = len(questions)
        self.m: list[int | None] = [None if cfg.pre_monitor else      # m per question; None while an
                                    (cfg.global_rollouts if cfg.branching else cfg.k)] * nq   # AEPO probe decides it
        self.stats = [QuestionStats(m=m or 0) for m in self.m]
        self.started = [0] * nq
        self.finished: list[list[Trajectory]] = [[] for _ in range(nq)]
        rows = [self._new_global(q) for q in range(nq) for _ in range(self.m[q] or 1)]
        self.l = [0] * nq              # consecutive rounds with a new trajectory (AEPO penalty)
        self.owed: list[int] = []      # questions owed a global start (after an AEPO probe)
        self.prompt_kv: dict[int, list] = {}   # question -> per-layer (keys, values) of prompt[:-1]
        batch = None                   # kvcache.Batch: the active rows' tokens and KV cache
        for round_ in range(cfg.max_rounds):
            if not rows:
                break
            if self.cache_mode == "tree":
                batch = self._append_pending(rows, batch)
                batch, new_tokens = self._generate(rows, batch)
            else:
                new_tokens = self._generate_from_scratch(rows)
            tool_rows = self._absorb(rows, new_tokens)
            self._run_tools(tool_rows)
            children = self._branch_all(tool_rows)
            if self.cache_mode == "tree":
                rows, batch = self._select(rows, children, batch)
            else:
                rows = [r for r in rows if not r.done] + [c for _, c in children]
            if round_ < cfg.max_rounds - 1:                  # a row started now could not generate
                rows += self._start_new(rows, children)
        for row in rows:                                    # out of rounds: truncated
            self._finish(row, "rounds")
        return RolloutResult(self._pad_groups(), self.stats, self.generated, self.prefilled)

    # -- 1. append each row's pending tokens (kvcache.py: the layout) ------------------------------
    def _append_pending(self, rows, batch):
        if batch is None:                                   # a fresh batch: every row is a new global
            batch = self._prompt_history(rows)
        else:
            B = batch.ids.shape[0]
            for b, row in enumerate(rows[:B]):              # continuing a segment: feed its last token
                row.pending = row.pending or [kv.pop_last(batch, b)]
            batch = kv.add_rows(batch, len(rows) - B, self.pad)
            for b in range(B, len(rows)):                   # globals joining mid-rollout
                batch = self._place_prompt(rows[b], b, batch)
        self.prefilled += sum(len(row.pending) for row in rows)
        batch = kv.append(batch, [row.pending for row in rows], self.pad, self.device)
        for row in rows:
            row.pending = []
        for q in [q for q in self.prompt_kv if self.started[q] >= self.cfg.k]:
            del self.prompt_kv[q]                           # no later global of q can need it
        return batch

    # Each question's prompt is encoded once per rollout: the KV cache of prompt[:-1] is kept, and every
    # global the question starts (all k at once for GRPO, AEPO's probe and its m - 1 later globals,
    # restarts) gets a copy as its history, so only the prompt's last token is fed with the new row.

    def _prompt_history(self, rows) -> kv.Batch | None:
        """A fresh batch of new globals whose history is their prompt[:-1], from the kept caches; None
        when no prompt is longer than one token."""
        todo = sorted({r.traj.question_idx for r in rows} - self.prompt_kv.keys())
        todo = [q for q in todo if len(self.prompts[q]) > 1]
        if todo:
            heads = [self.prompts[q][:-1] for q in todo]
            self.prompt_kv |= dict(zip(todo, kv.encode_prefixes(self.model, heads, self.pad, self.device)))
            self.prefilled += sum(map(len, heads))
        kept = [self.prompt_kv[r.traj.question_idx] for r in rows if r.traj.question_idx in self.prompt_kv]
        if not kept:
            return None
        width = max(len(self.prompts[r.traj.question_idx]) - 1 for r in rows)
        batch = kv.blank(self.model, len(rows), width, kept[0], self.pad, self.device)
        for b, row in enumerate(rows):
            batch = self._place_prompt(row, b, batch)
        return batch

    def _place_prompt(self, row, b, batch):
        """Row b, a new global with its whole prompt pending, gets the kept prompt[:-1] as its history."""
        q = row.traj.question_idx
        if row.pending != self.prompts[q] or q not in self.prompt_kv:
            return batch
        row.pending = self.prompts[q][-1:]
        return kv.place(batch, b, self.prompts[q][:-1], self.prompt_kv[q], self.pad)

    # -- 2. one batched generate call ---------------------------------------------------------------
    def _generate(self, rows, batch):
        budget = max(self.cfg.max_response_tokens - len(r.traj.response_ids) for r in rows)
        batch, segments = kv.generate_segment(self.model, batch, max(1, min(self.cfg.segment_tokens, budget)),
                                              self.stop_ids, **self.sampling)
        self.generated += sum(len(toks) for toks, _, _ in segments)
        return batch, segments

    def _generate_from_scratch(self, rows):
        """The baselines of benchmarks/rollout.py: re-encode every full sequence each round, all rows in
        one batch ("batched") or one row at a time ("naive")."""
        groups = [rows] if self.cache_mode == "batched" else [[r] for r in rows]
        segments = []
        for group in groups:
            seqs = [r.traj.prompt_ids + r.traj.response_ids for r in group]
            self.prefilled += sum(map(len, seqs))
            segments += self._generate(group, kv.append(None, seqs, self.pad, self.device))[1]
        for r in rows:
            r.pending = []
        return segments

    # -- 3. record tokens, classify how each segment ended ------------------------------------------
    def _absorb(self, rows, new_tokens) -> list[_Row]:
        cfg, tool_rows = self.cfg, []
        for row, (toks, logp, ent) in zip(rows, new_tokens):
            t = row.traj
            room = cfg.max_response_tokens - len(t.response_ids)
            cut = len(toks) > room
            toks, logp, ent = toks[:room], logp[:room], ent[:room]
            t.response_ids += toks
            t.loss_mask += [1] * len(toks)
            t.logp += logp
            t.entropy += ent
            last = toks[-1] if toks else None
            if cut:
                self._end_segment(row)
                self._finish(row, "length")
                continue
            segment = self.tok.decode(t.response_ids[row.seg_start:], skip_special_tokens=False)
            if last in (self.tok.eos_token_id, self.pad):
                self._end_segment(row)
                self._finish(row, "eos")
            elif segment.rstrip().endswith(("</search>", "</python>")):
                self._end_segment(row)
                call = parse_tool_call(segment)
                if call is None:            # a closing tag without its opening tag: nothing to run
                    self._finish(row, "malformed")
                elif len(t.tool_calls) >= cfg.call_limit:        # released behaviour: force EOS
                    self._append(row, [self.tok.eos_token_id])
                    self._finish(row, "call_limit")
                else:
                    row.call = call
                    tool_rows.append(row)
            elif len(t.response_ids) >= cfg.max_response_tokens:
                self._end_segment(row)
                self._finish(row, "length")
        return tool_rows

    def _end_segment(self, row: _Row) -> None:
        t = row.traj
        h = segment_entropy(t.entropy[row.seg_start:], self.cfg.entropy_window, self.vocab)
        t.seg_entropy.append(h)
        if row.h_init is None:
            row.h_init = h
        row.seg_start = len(t.response_ids)

    def _append(self, row: _Row, ids: list[int]) -> None:
        """Forced tokens (tool results, a forced EOS): they condition later tokens but mask 0."""
        t = row.traj
        t.response_ids += ids
        t.loss_mask += [0] * len(ids)
        t.logp += [0.0] * len(ids)
        t.entropy += [0.0] * len(ids)

    def _finish(self, row: _Row, how: str) -> None:
        t, q = row.traj, row.traj.question_idx
        ids = [i for i in t.response_ids if i not in (self.pad, self.tok.eos_token_id)]
        t.text, t.finish, row.done = self.tok.decode(ids, skip_special_tokens=False), how, True
        self.finished[q].append(t)
        if self.m[q] is None and t.parent_id is None:   # the AEPO probe ended: split the budget now
            self._set_budget(q, t)

    # -- 4. tools, in parallel ----------------------------------------------------------------------
    def _run_tools(self, tool_rows: list[_Row]) -> None:
        calls = [row.call for row in tool_rows]
        with ThreadPoolExecutor(max_workers=max(1, min(8, len(calls)))) as pool:   # threads start on demand
            outputs = list(pool.map(lambda c: self.tools[c[0]](c[1]), calls))
        for row, (tool, arg), output in zip(tool_rows, calls, outputs):
            block = self.tok.encode(result_block(output), add_special_tokens=False)
            room = self.cfg.max_response_tokens - len(row.traj.response_ids)
            row.traj.tool_calls.append((tool, arg, output))
            row.call = None
            self._append(row, block[:room])
            row.pending = block[:room]
            if len(block) >= room:
                self._finish(row, "length")

    # -- 5. branching (ARPO section 4.3, AEPO section 4.5) -------------------------------------------
    def _branch_all(self, tool_rows: list[_Row]) -> list[tuple[_Row, _Row]]:
        """(parent, child) pairs for the rows that just received a tool result. Each source spawns at
        most Z - 1 children, and a question never exceeds k trajectories."""
        cfg, children = self.cfg, []
        if not cfg.branching:
            return children
        for row in tool_rows:
            q = row.traj.question_idx
            if row.done or self.m[q] is None:            # no branching before the budget is known
                continue
            delta_h = row.traj.seg_entropy[-1] - row.h_init
            for _ in range(cfg.branch_z - 1):
                if self.started[q] >= cfg.k:
                    break
                u = self.rng.random()
                go = (aepo_should_branch(u, delta_h, cfg.tau, cfg.gamma, self.l[q], cfg.penalty) if cfg.branch_penalty
                      else arpo_should_branch(u, delta_h, cfg.tau, cfg.gamma))
                if go:
                    children.append((row, self._branch(row, self.l[q])))
        return children

    def _set_budget(self, q: int, probe: Trajectory) -> None:
        s = self.stats[q]
        s.h_root = probe.seg_entropy[0] if probe.seg_entropy else 0.0
        after_tools = probe.seg_entropy[1:]
        s.h_tool = sum(after_tools) / len(after_tools) if after_tools else s.h_root
        self.m[q] = s.m = global_budget(self.cfg.k, s.h_root, s.h_tool, self.cfg.beta)
        self.owed += [q] * (self.m[q] - 1)                  # the other globals start next round

    # -- 6. keep live rows and their children in the batch; start new globals -------------------------
    def _select(self, rows, children, batch):
        """Keep the live rows, encode their tool results, then copy each parent's row (KV cache
        included, result encoded) to its children, so a result is encoded once however many branches."""
        live = [b for b, row in enumerate(rows) if not row.done]
        if not live:
            return [], None
        rows = [rows[b] for b in live]
        batch = self._encode_results(rows, kv.take(batch, live))
        if not children:
            return rows, batch
        kids: dict[int, list[_Row]] = {}
        for parent, child in children:
            child.pending = list(parent.pending)
            kids.setdefault(id(parent), []).append(child)
        index = [b for b, row in enumerate(rows) for _ in range(1 + len(kids.get(id(row), [])))]
        rows = [r for row in rows for r in [row, *kids.get(id(row), [])]]
        return rows, kv.take(batch, index)

    def _encode_results(self, rows, batch):
        """Encode each row's pending tool result but its last token (generate needs one uncached)."""
        heads = [row.pending[:-1] for row in rows]
        if not any(heads):
            return batch
        for row, head in zip(rows, heads):
            row.pending = row.pending[len(head):]
            self.prefilled += len(head)
        return kv.encode(self.model, batch, heads, self.pad)

    def _start_new(self, rows: list[_Row], children) -> list[_Row]:
        """Globals owed by a fresh AEPO budget, then the restart rule (section 4.1); updates l."""
        cfg, new = self.cfg, [self._new_global(q) for q in self.owed]
        self.owed = []
        active = {r.traj.question_idx for r in rows + new}
        restarted = set()
        for q in range(len(self.prompts)):
            if q not in active and self.m[q] is not None and self.started[q] < cfg.k:
                new.append(self._new_global(q))
                self.stats[q].n_restart += 1
                restarted.add(q)
        created = restarted | {child.traj.question_idx for _, child in children}
        self.l = [l + 1 if q in created else 0 for q, l in enumerate(self.l)]
        return new

    # -- 7. exactly k per question ------------------------------------------------------------------
    def _pad_groups(self) -> list[Trajectory]:
        out = []
        for q, group in enumerate(self.finished):
            group = sorted(group, key=lambda t: t.traj_id)[: self.cfg.k]
            while len(group) < self.cfg.k:
                group.append(dup := copy.deepcopy(group[-1]))
                dup.is_duplicate, dup.traj_id = True, self.next_id
                self.next_id += 1
                self.stats[q].n_duplicate += 1
            out += group
        return out

