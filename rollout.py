"""The entropy-guided tree sampler: k tool-using trajectories per question, as GRPO chains, with
ARPO's entropy branching, or with AEPO's dynamic entropy-balanced rollout (arXiv 2510.14545).

    from rollout import rollout
    result = rollout(model, tokenizer, questions, tools, cfg, seed=0, system_prompt=prompt)
    result.trajectories  # k per question, grouped in question order
    result.stats         # per question: m, H_root, H_tool, globals, branches, restarts, ...

Every active trajectory of every question is one row of one batch. Each round does five steps:
  1. Generate one segment for every row: until a tool's closing tag, EOS, or `segment_tokens`.
  2. Record its tokens (loss mask 1) with their log-probs and exact entropies. A segment that ended
     gets its entropy H over its first w sampled tokens; then classify how it ended.
  3. Entropy rules, each at one labelled site below:
       [branching]       ARPO/AEPO: a tool result is a node. Once the row has sampled the first w
                         tokens after it (the step entropy H_t, arXiv 2507.19849 sec. 3.1), it
                         decides with Delta H = H_t - H_init whether to spawn up to Z - 1 children,
                         which sample again from the node. Where such a decision can create a
                         child, step 1 stops the row right there (a per-row token limit) and ends
                         the generate call when all such rows have stopped; after the decisions a
                         second call finishes the round, the children included: they start in
                         their parent's decision round, w tokens after the result;
       [branch penalty]  AEPO: the probability falls with l, the path's streak of branching steps;
       [pre-monitoring]  AEPO: when a question's probe ends, its entropies set the global budget m.
  4. Run the tool calls in parallel threads; append each result (loss mask 0): a new node.
  5. Keep the live rows and the new children (each rewound to its node); start the globals the budget
     owes and the restarts.
At the end each question is padded to k (normally nothing to pad).

Deviations from the released code (also in the README): the step entropy is taken after the tool
result, as the paper defines it (`--step_entropy before_result`: the released order, the segment that
made the call); the streak l is per path; the probe is the first of the m globals (released: a
separate, discarded probe); entropy state resets at each call; `max_rounds` is a budget per
trajectory (a branch counts its parent's rounds), and restarts are allowed during the max_rounds
rounds after a question's budget is known, so an algorithm that starts trajectories later (AEPO after
its probe) loses none to it. The generate engine (engine.py, kvcache.py) is below this file: it only
sees token ids. What a call returns (RolloutResult, QuestionStats) comes first, below the imports.
"""
from __future__ import annotations

import copy
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from aepo import (Config, Tools, Trajectory, aepo_should_branch, arpo_should_branch, global_budget,
                  segment_entropy)
from engine import CLOSING_TAGS, ReencodeEngine, Sampling, Segment
from kvcache import CachedEngine
from support.policy import prompt_ids
from tools import parse_tool_call, result_block

# --------------------------------------------------------------------------------------------------
# What a call returns: the trajectories, per-question statistics of the entropy rules, the token and
# time counters; and how the results of consecutive chunks of questions become one


@dataclass
class QuestionStats:
    m: int = 0                    # global budget (AEPO: from pre-monitoring)
    h_root: float = 0.0           # segment entropy of the probe's first segment
    h_tool: float = 0.0           # mean segment entropy of the probe's segments after tool results
    n_global: int = 0             # global trajectories started (restarts included)
    n_branch: int = 0             # branch children created
    n_restart: int = 0
    n_duplicate: int = 0
    branches_after_first_call: int = 0  # branch events at a source's second or later tool call
    consecutive_branch_steps: int = 0   # branches made while the source's streak l > 0
    branches_per_source: dict[int, int] = field(default_factory=dict)
    # every branch decision: (source traj_id, the tool call it follows, Delta H, streak l, children)
    decisions: list[tuple[int, int, float, int, int]] = field(default_factory=list)


@dataclass
class RolloutResult:
    trajectories: list[Trajectory]      # k per question, in question order
    stats: list[QuestionStats]
    generated_tokens: int = 0           # tokens sampled by the policy
    sampled_tokens: int = 0             # of those, the ones kept in trajectories
    prefill_tokens: int = 0             # tokens the model encoded without sampling them
    rounds: int = 0                     # generate rounds (latency)
    generate_s: float = 0.0
    tools_s: float = 0.0
    slowest_tool_s: float = 0.0


def merge_chunks(parts: list[tuple[int, RolloutResult]]) -> RolloutResult:
    """One result from (index of its first question, result) of consecutive chunks of questions:
    question and trajectory ids are offset so that they stay unique; counters add up."""
    out, next_id = RolloutResult([], []), 0
    for first, res in parts:
        for t in res.trajectories:
            t.question_idx += first
            t.traj_id += next_id
            t.parent_id = None if t.parent_id is None else t.parent_id + next_id
        for s in res.stats:
            s.branches_per_source = {i + next_id: n for i, n in s.branches_per_source.items()}
            s.decisions = [(i + next_id, *rest) for i, *rest in s.decisions]
        next_id = 1 + max(t.traj_id for t in res.trajectories)
        out.trajectories += res.trajectories
        out.stats += res.stats
        for key in ("generated_tokens", "sampled_tokens", "prefill_tokens", "rounds", "generate_s",
                    "tools_s"):
            setattr(out, key, getattr(out, key) + getattr(res, key))
        out.slowest_tool_s = max(out.slowest_tool_s, res.slowest_tool_s)
    return out


# --------------------------------------------------------------------------------------------------
# The engines and the per-question state

ENGINES = {"cached": CachedEngine, "reencode": ReencodeEngine,
           "naive": lambda model, sampling: ReencodeEngine(model, sampling, rows_per_call=1)}


@dataclass
class Question:
    """Per-question state of one rollout call."""
    prompt: list[int]
    m: int | None                 # global budget; None until the probe has ended (AEPO)
    started: int = 0              # trajectories started: globals and branches
    globals_due: int = 0          # globals to start next round
    opened: int = 0               # the round in which its budget m became known
    active: int = 0               # rows in flight
    finished: list[Trajectory] = field(default_factory=list)


@dataclass
class Node:
    """A point right after a tool result, where a branch decision is due: the trajectory's lengths
    there, so that a child can start from it whatever its parent did since."""
    at: int                       # response tokens up to the end of the result
    calls: int                    # tool calls made (this node follows call number `calls`)
    segments: int                 # segment entropies recorded
    rounds: int


@dataclass
class Row:
    """One trajectory in flight."""
    traj: Trajectory
    seg_start: int = 0            # response index of the current segment's first sampled token
    h_init: float | None = None   # entropy of the trajectory's first segment
    call: tuple[str, str] | None = None   # (tool, input) waiting to run
    done: bool = False
    node: Node | None = None      # the last tool result, while its branch decision is pending
    in_engine: int = 0            # response tokens the engine's row holds
    l: int = 0                    # consecutive tool steps of its path that branched (penalty)


# --------------------------------------------------------------------------------------------------
# Pure rules on the question state


def up_to_last_tag(text: str) -> str:
    """A segment's text up to the end of its last closing tag: the tag that stopped it, which may
    end inside a token (then what the token adds after it is cut off)."""
    return text[:max(text.rfind(tag) + len(tag) for tag in CLOSING_TAGS if tag in text)]


def initial_globals(cfg: Config) -> tuple[int | None, int]:
    """(m, globals to start now): GRPO m = k, ARPO m = global_rollouts, AEPO 1 probe (m unknown)."""
    if cfg.pre_monitor:
        return None, 1
    m = cfg.global_rollouts if cfg.branching else cfg.k
    return m, m


def budget_from_probe(seg_entropies: list[float], k: int,
                      beta: float) -> tuple[int, float, float]:
    """[pre-monitoring] (m, H_root, H_tool) from the probe's segment entropies: H_root is its first
    segment, H_tool the mean of the segments after tool results (H_root when it used no tool)."""
    # >>> solution A4
    h_root = seg_entropies[0] if seg_entropies else 0.0
    after = seg_entropies[1:]
    h_tool = sum(after) / len(after) if after else h_root
    return global_budget(k, h_root, h_tool, beta), h_root, h_tool
    # <<< solution


def n_children(delta_h: float, l: int, room: int, cfg: Config, rng: random.Random) -> int:
    """[branching] How many of the Z - 1 child slots of one source branch, given Delta H, the streak
    l and the room left under k. One uniform draw per slot while there is room."""
    # >>> solution A4
    n = 0
    for _ in range(cfg.branch_z - 1):
        if n >= room:
            break
        u = rng.random()
        n += (aepo_should_branch(u, delta_h, cfg.tau, cfg.gamma, l, cfg.branch_penalty_rate)
              if cfg.branch_penalty else arpo_should_branch(u, delta_h, cfg.tau, cfg.gamma))
    return n
    # <<< solution


def next_streak(l: int, created: bool) -> int:
    """[branch penalty] l counts the consecutive tool steps of a path (its branch decisions, its
    ancestors' included) that created a branch; a decision without one resets it."""
    # >>> solution A4
    return l + 1 if created else 0
    # <<< solution


def wants_restart(q: Question, k: int, round_: int, max_rounds: int) -> bool:
    """Restart rule: an idle question with a known budget and fewer than k trajectories starts one
    more global, during the max_rounds rounds after its budget became known (later, duplicates pad
    what is short); so AEPO, whose budget waits for its probe, gets as many as GRPO."""
    # >>> solution A4
    return (q.m is not None and q.active == 0 and q.globals_due == 0 and q.started < k
            and round_ - q.opened < max_rounds)
    # <<< solution


# --------------------------------------------------------------------------------------------------
# The rollout


def rollout(model, tokenizer, questions: list[str], tools: Tools, cfg: Config, seed: int,
            system_prompt: str, *, greedy: bool = False, top_p: float = 1.0,
            temperature: float | None = None, engine: str = "cached") -> RolloutResult:
    """Sample cfg.k trajectories for each question. Same seed and inputs -> the same trajectories.
    `engine`: "cached" (one KV cache across rounds), or the baselines "reencode" and "naive"."""
    sampling = Sampling.make(tokenizer, greedy=greedy, top_p=top_p,
                             temperature=cfg.temperature if temperature is None else temperature)
    prompts = [prompt_ids(tokenizer, q, system_prompt)[-cfg.max_prompt_tokens:] for q in questions]
    if not prompts:
        return RolloutResult([], [])
    chunk = cfg.rollout_questions or len(prompts)                 # bounds the KV cache (memory)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        rng, parts = random.Random(seed), []
        for i in range(0, len(prompts), chunk):
            sampler = _Sampler(ENGINES[engine](model, sampling), tokenizer, tools, cfg, rng,
                               model.config.vocab_size)
            parts.append((i, sampler.run(prompts[i:i + chunk])))
    return merge_chunks(parts) if len(parts) > 1 else parts[0][1]


class _Sampler:
    """One rollout call's mutable state: the engine's rows (in `rows` order), questions, counts."""

    def __init__(self, engine, tokenizer, tools: Tools, cfg: Config, rng: random.Random,
                 vocab: int):
        self.engine, self.tok, self.tools, self.cfg = engine, tokenizer, tools, cfg
        self.rng, self.vocab, self.next_id = rng, vocab, 0
        self.after_result = cfg.step_entropy == "after_result"
        self.res = RolloutResult([], [])

    def run(self, prompts: list[list[int]]) -> RolloutResult:
        cfg, res = self.cfg, self.res
        m, n_start = initial_globals(cfg)
        self.questions = [Question(prompt, m) for prompt in prompts]
        res.stats = [QuestionStats(m=m or 0) for _ in prompts]
        rows = self._start([q for q in range(len(prompts)) for _ in range(n_start)])
        while rows:
            res.rounds += 1
            # 1-3. every row samples one segment, recorded as it comes; the branch decisions due
            #      are made after the first w tokens past the node, and children join at once
            rows, children = self._sample_round(rows)
            # 4. run the tools in parallel; each result joins its trajectory with loss mask 0
            self._run_tools([row for row in rows if row.call])
            if not self.after_result:          # released order: decide as the result arrives
                children = {b: self._branch(row) for b, row in enumerate(rows)
                            if row.node and not row.done}
            for row in rows:
                if not row.done and row.traj.rounds >= cfg.max_rounds:
                    self._finish(row, "rounds")                 # the per-trajectory round budget
            #    [pre-monitoring] a question whose probe has ended gets its global budget m
            for q, question in enumerate(self.questions):
                if question.m is None and question.finished:
                    self._pre_monitor(q)
            # 5. keep the live rows, each followed by its children; start new globals
            rows = self._keep(rows, children)
            rows += self._start(self._new_globals())
        res.trajectories = self._pad_groups()
        res.prefill_tokens = self.engine.prefill_tokens
        res.generated_tokens = self.engine.generated_tokens
        return res

    def _sample_round(self, rows: list[Row]) -> tuple[list[Row], dict[int, list[Row]]]:
        """Steps 1-3: every row samples a segment of up to n tokens (fewer where it stops).
        [branching] Under the paper's rule a decision at a node is due once the row has the first
        w tokens after it. When a due decision can create children, the round is cut there: each
        row at a node stops after those w tokens (or sooner, at its segment's end), and the call
        ends when all of them have stopped, cutting the other rows there; the decisions are made
        and the children join from their node; a second generate call samples the rest of the
        round, each row up to its n tokens (a child: a whole segment). So a child starts in its
        parent's decision round, not the round after. No row's tokens change, only the call they
        come from. Returns the rows and the children of decisions made at the round's end."""
        n = max(1, min(self.cfg.segment_tokens,
                       max(self.cfg.max_response_tokens - len(r.traj.response_ids) for r in rows)))
        for row in rows:
            row.traj.rounds += 1
        stops = [min(n, self._to_window(row)) for row in rows]          # n for a row at no node
        cut = max((s for s, row in zip(stops, rows) if row.node), default=n)
        used = {}                                       # id(row) -> tokens sampled this round
        if self.after_result and cut < n and any(map(self._may_branch, rows)):
            used = self._generate(rows, stops, until=[row.node is not None for row in rows])
            children = self._decide(rows)
            rows = self._keep(rows, children)
            for child in (c for cs in children.values() for c in cs):
                child.traj.rounds += 1                  # its first segment is in this round
        left = [0 if row.call else n - used.get(id(row), 0) for row in rows]
        if not any(left):
            return rows, {}
        self._generate(rows, left)
        return rows, self._decide(rows)

    def _generate(self, rows: list[Row], limits: list[int],
                  until: list[bool] | None = None) -> dict[int, int]:
        """1. One generate call: row b samples up to limits[b] tokens (0: none); the call ends once
        the rows marked in `until` have stopped. 2. Record the tokens; finish the row or queue its
        tool call. Returns the tokens each row sampled, by id(row)."""
        t0 = time.perf_counter()
        segments = self.engine.generate(max(limits), limits=limits, until=until,
                                        tails=[r.traj.response_ids[r.seg_start:] for r in rows])
        self.res.generate_s += time.perf_counter() - t0
        for row, segment, limit in zip(rows, segments, limits):
            row.in_engine += len(segment.tokens)
            if limit:
                self._record(row, segment)
        return {id(row): len(segment.tokens) for row, segment in zip(rows, segments)}

    def _decide(self, rows: list[Row]) -> dict[int, list[Row]]:
        """3. [branching] Under the paper's rule, a row whose first w tokens after its last tool
        result are in decides there; its children start again from right after that result."""
        if not self.after_result:
            return {}
        return {b: self._branch(row) for b, row in enumerate(rows) if self._ready(row)}

    def _keep(self, rows: list[Row], children: dict[int, list[Row]]) -> list[Row]:
        """The engine keeps the live rows, each followed by its children (copies of its engine
        row); then each engine row is brought to its trajectory: a tool result is appended, a child
        forgets what its parent sampled after the node."""
        for b, row in enumerate(rows):      # results first, so that copies share their encoding
            if not row.done and len(row.traj.response_ids) > row.in_engine:
                self.engine.append(b, row.traj.response_ids[row.in_engine:])
                row.in_engine = len(row.traj.response_ids)
        kept = [(b, r) for b, row in enumerate(rows)
                for r in ([] if row.done else [row]) + children.get(b, [])]
        self.engine.select([b for b, _ in kept])
        for i, (b, row) in enumerate(kept):
            if row is not rows[b]:         # a child holds its parent's row: rewind it to the node
                self.engine.rewind(i, rows[b].in_engine - len(row.traj.response_ids))
                row.in_engine = len(row.traj.response_ids)
        return [row for _, row in kept]

    # -- 2. recording a segment --------------------------------------------------------------------
    def _record(self, row: Row, seg: Segment) -> None:
        cfg, t = self.cfg, row.traj
        room = cfg.max_response_tokens - len(t.response_ids)
        cut = len(seg.tokens) > room
        n = min(room, len(seg.tokens))
        self.res.sampled_tokens += n                # what is kept (the budget may cut a segment)
        t.response_ids += seg.tokens[:n]
        t.loss_mask += [1] * n
        t.logp += seg.logp[:n]
        t.entropy += seg.entropy[:n]
        if cut or (seg.stop is None and len(t.response_ids) >= cfg.max_response_tokens):
            self._end_segment(row)
            self._finish(row, "length")
        elif seg.stop == "eos":
            self._end_segment(row)
            self._finish(row, "eos")
        elif seg.stop == "tag":
            self._end_segment(row)
            text = self.tok.decode(t.response_ids[row.seg_start:], skip_special_tokens=False)
            call = parse_tool_call(up_to_last_tag(text))
            if call is None:                    # a closing tag without its opening tag
                self._finish(row, "malformed")
            elif len(t.tool_calls) >= cfg.call_limit:   # released behaviour: force EOS
                self._append(row, [self.tok.eos_token_id])
                self._finish(row, "call_limit")
            else:
                row.call = call
        # otherwise the segment goes on next round

    def _end_segment(self, row: Row) -> None:
        """The segment's entropy H: its first w sampled tokens from seg_start (never a result)."""
        t = row.traj
        h = segment_entropy(t.entropy[row.seg_start:], self.cfg.entropy_window, self.vocab)
        t.seg_entropy.append(h)
        if row.h_init is None:
            row.h_init = h

    def _append(self, row: Row, ids: list[int]) -> None:
        """Forced tokens (tool results, a forced EOS): they condition later tokens but mask 0."""
        t = row.traj
        t.response_ids += ids
        t.loss_mask += [0] * len(ids)
        t.logp += [0.0] * len(ids)
        t.entropy += [0.0] * len(ids)

    def _finish(self, row: Row, how: str) -> None:
        t, q = row.traj, self.questions[row.traj.question_idx]
        ids = [i for i in t.response_ids if i not in (self.tok.pad_token_id, self.tok.eos_token_id)]
        t.text, t.finish, row.done = self.tok.decode(ids, skip_special_tokens=False), how, True
        q.finished.append(t)
        q.active -= 1

    # -- 3. tools ----------------------------------------------------------------------------------
    def _run_tools(self, rows: list[Row]) -> None:
        """Run the queued calls in parallel threads; append each result to its trajectory, which
        then holds a node where a branch decision is due."""
        def timed(call):
            t0 = time.perf_counter()
            output = self.tools[call[0]](call[1])
            return output, time.perf_counter() - t0

        if not rows:
            return
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=min(8, len(rows))) as pool:
            outputs = list(pool.map(timed, [row.call for row in rows]))
        self.res.tools_s += time.perf_counter() - t0
        for row, (output, seconds) in zip(rows, outputs):
            self.res.slowest_tool_s = max(self.res.slowest_tool_s, seconds)
            (tool, arg), row.call = row.call, None
            row.traj.tool_calls.append((tool, arg, output))
            block = self.tok.encode(result_block(output), add_special_tokens=False)
            room = self.cfg.max_response_tokens - len(row.traj.response_ids)
            self._append(row, block[:room])
            row.seg_start = len(row.traj.response_ids)    # the next segment starts after it
            if len(block) >= room:
                self._finish(row, "length")
            else:                                         # a branch point
                t = row.traj
                row.node = Node(len(t.response_ids), len(t.tool_calls), len(t.seg_entropy),
                                t.rounds)

    # -- 4. the entropy rules ----------------------------------------------------------------------
    def _pre_monitor(self, q: int) -> None:
        """[pre-monitoring] The probe (the question's first global) has ended: set m from its
        segment entropies; the other m - 1 globals start next round."""
        question, s = self.questions[q], self.res.stats[q]
        s.m, s.h_root, s.h_tool = budget_from_probe(question.finished[0].seg_entropy, self.cfg.k,
                                                    self.cfg.beta)
        question.m, question.globals_due = s.m, s.m - 1
        question.opened = self.res.rounds

    def _may_branch(self, row: Row) -> bool:
        """Can the decision at the row's node create a child: branching, the budget known, room
        under k?"""
        q = self.questions[row.traj.question_idx]
        return (row.node is not None and self.cfg.branching and self.cfg.branch_z > 1
                and q.m is not None and q.started < self.cfg.k)

    def _to_window(self, row: Row) -> float:
        """Tokens the row samples before the decision at its node is due (inf: no node)."""
        if row.node is None:
            return float("inf")
        return self.cfg.entropy_window - (len(row.traj.response_ids) - row.node.at)

    def _ready(self, row: Row) -> bool:
        """Is the decision at row.node due? The paper's rule (ARPO sec. 3.1): once the first w
        tokens after the result are sampled, or the segment ended sooner."""
        if row.node is None:
            return False
        sampled = len(row.traj.response_ids) - row.node.at
        return sampled >= self.cfg.entropy_window or (sampled > 0 and (row.done or bool(row.call)))

    def _branch(self, row: Row) -> list[Row]:
        """[branching] Delta H = H_t - H_init, with H_t the step entropy at the node: the first w
        tokens sampled after the result (paper), or the segment that made the call (released
        order). Up to Z - 1 children, at most k trajectories per question. [branch penalty] The
        AEPO rule takes the question's streak l."""
        node, row.node = row.node, None
        t, q = row.traj, row.traj.question_idx
        question, s = self.questions[q], self.res.stats[q]
        if not self.cfg.branching or question.m is None:     # not before the budget is known
            return []
        h_t = (segment_entropy(t.entropy[node.at:], self.cfg.entropy_window, self.vocab)
               if self.after_result else t.seg_entropy[-1])
        delta_h = h_t - row.h_init
        n = n_children(delta_h, row.l, self.cfg.k - question.started, self.cfg, self.rng)
        s.decisions.append((t.traj_id, node.calls, delta_h, row.l, n))
        s.n_branch += n
        if n:
            s.branches_per_source[t.traj_id] = s.branches_per_source.get(t.traj_id, 0) + n
        s.consecutive_branch_steps += n * (row.l > 0)
        s.branches_after_first_call += n * (node.calls > 1)
        row.l = next_streak(row.l, n > 0)            # [branch penalty] once per tool step
        return [self._child(row, node) for _ in range(n)]

    # -- 5. new trajectories -----------------------------------------------------------------------
    def _new_globals(self) -> list[int]:
        """Questions to start a global for: the rest of a fresh AEPO budget, then the restart
        rule."""
        new = []
        for q, question in enumerate(self.questions):
            if wants_restart(question, self.cfg.k, self.res.rounds, self.cfg.max_rounds):
                new.append(q)
                self.res.stats[q].n_restart += 1
            new += [q] * question.globals_due
            question.globals_due = 0
        return new

    def _start(self, question_ids: list[int]) -> list[Row]:
        """A new global trajectory for each question index (one per occurrence)."""
        rows = [Row(Trajectory(question_idx=q, prompt_ids=list(self.questions[q].prompt),
                               traj_id=self._new_id())) for q in question_ids]
        self.engine.add([self.questions[q].prompt for q in question_ids])
        for q in question_ids:
            self.res.stats[q].n_global += 1
            self._count_start(q)
        return rows

    def _child(self, row: Row, node: Node) -> Row:
        """The trajectory as it was at the node, right after the tool result: it samples again
        from there (the parent keeps what it sampled since). Under the paper's rule it shares its
        parent's H_init (the same root); under the released order its first segment sets its own."""
        t, n = row.traj, node.at
        traj = Trajectory(question_idx=t.question_idx, prompt_ids=list(t.prompt_ids),
                          response_ids=t.response_ids[:n], loss_mask=t.loss_mask[:n],
                          logp=t.logp[:n], entropy=t.entropy[:n],
                          tool_calls=list(t.tool_calls[:node.calls]), traj_id=self._new_id(),
                          parent_id=t.traj_id, is_global=False,
                          seg_entropy=t.seg_entropy[:node.segments], rounds=node.rounds)
        self._count_start(t.question_idx)
        return Row(traj, seg_start=n, h_init=row.h_init if self.after_result else None, l=row.l)

    def _count_start(self, q: int) -> None:
        question = self.questions[q]
        question.started += 1
        question.active += 1
        assert question.started <= self.cfg.k, "a question never starts more than k trajectories"
        if question.started >= self.cfg.k:
            self.engine.release(question.prompt)    # no later global of q needs its prompt cache

    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def _pad_groups(self) -> list[Trajectory]:
        """Exactly k per question: duplicate the last trajectory of a question that ended short."""
        out = []
        for q, question in enumerate(self.questions):
            group = sorted(question.finished, key=lambda t: t.traj_id)[: self.cfg.k]
            while len(group) < self.cfg.k:
                group.append(dup := copy.deepcopy(group[-1]))
                dup.is_duplicate, dup.traj_id = True, self._new_id()
                self.res.stats[q].n_duplicate += 1
            out += group
        return out
