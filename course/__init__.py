"""The course kit: the student version of this repository and its autograder.
Its handouts are course/assignments/.

    python -m course student OUT_DIR            # solution regions -> NotImplementedError stubs,
                                                # bugs planted
    python -m course student OUT_DIR --only A2  # blank one assignment only
    python -m course grade [CHECKOUT]           # run each assignment's tests there, print a score
                                                # per assignment and its first failing test
                                                # (exit status 0 iff every assignment passes)

A solution region is the lines between `# >>> solution An` and `# <<< solution` (aepo.py, loss.py,
rollout.py); the student version keeps both marker lines and puts one `raise NotImplementedError`
between them, at the indentation of the opening marker. "Find the bug" assignments plant a bug
instead: a snippet of the reference replaced by a wrong one (the table lives in an instructor-only
block of this file, dropped from the student copy). The autograder is the project's own tests,
selected per assignment by the table ASSIGNMENTS below (node ids; a name without [params] selects
every parametrisation).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
HANDOUTS = "course/assignments"


@dataclass(frozen=True)
class Assignment:
    key: str                      # A1 ... : the tag of its solution regions or planted bug
    handout: str                  # course/assignments/<handout>
    title: str
    tests: tuple[str, ...]        # pytest node ids: the autograder of this assignment
    needs: tuple[str, ...] = ()   # assignments whose code these tests also run


SAMPLER = "tests/test_sampler.py::"
RULES, LOSS = "tests/test_rules.py::", "tests/test_loss.py::"
ASSIGNMENTS = (
    Assignment("A1", "01-entropy-and-branching.md",
               "entropy, branching rules and the budget m (aepo.py)", (
        RULES + "test_segment_entropy_window_and_normaliser", RULES + "test_arpo_probability",
        RULES + "test_aepo_probability", RULES + "test_single_draws_match_closed_forms_everywhere",
        RULES + "test_the_penalty_at_c_zero_forbids_branching_even_at_tau_zero",
        RULES + "test_global_budget_released_formula")),
    Assignment("A2", "02-advantages.md", "group and entropy-aware advantages (loss.py)", (
        LOSS + "test_group_of_four_by_hand", LOSS + "test_two_interleaved_groups_any_labels",
        LOSS + "test_equal_rewards_and_singletons_give_exact_zero",
        LOSS + "test_eight_equal_rewards_with_an_inexact_float_mean_give_exact_zero",
        LOSS + "test_eps_is_added_to_the_std", LOSS + "test_reinforce_pp_one_row_is_zero_not_nan",
        LOSS + "test_reinforce_pp_by_hand",
        LOSS + "test_entropy_aware_by_hand_and_no_gradient_into_entropy",
        LOSS + "test_entropy_aware_std_zero_and_per_token_adv")),
    Assignment("A3", "03-aepo-surrogate.md",
               "the clipped surrogates and AEPO's stop-gradient bound (loss.py)", (
        LOSS + "test_table_values_and_gradient_weights[ppo]",
        LOSS + "test_table_values_and_gradient_weights[aepo]",
        LOSS + "test_table_values_and_gradient_weights[gppo]",
        LOSS + "test_dapo_is_ppo_with_clip_higher", LOSS + "test_dual_clip_off",
        LOSS + "test_stats[ppo]", LOSS + "test_stats[aepo]", LOSS + "test_stats[gppo]",
        LOSS + "test_on_policy_is_plain_policy_gradient[aepo]",
        LOSS + "test_empty_mask_and_bad_mode")),
    Assignment("A4", "04-sampler.md", "the sampler's branch-and-restart step (rollout.py)", (
        SAMPLER + "test_n_children_respects_z_minus_one_and_the_room_under_k",
        SAMPLER + "test_budget_from_probe_excludes_the_root_segment_from_h_tool",
        SAMPLER + "test_next_streak_and_restart_rule",
        SAMPLER + "test_restarts_leave_l_alone_and_start_within_max_rounds_of_the_budget",
        SAMPLER + "test_segment_entropies_and_the_budget_m_are_hand_computed[toy]",
        SAMPLER + "test_the_streak_l_counts_tool_steps_whatever_the_round_size[toy]",
        SAMPLER + "test_branching_follows_the_entropy_after_the_tool_result[toy-after_result]"),
        needs=("A1",)),
    Assignment("A5", "05-find-the-bug.md", "find the bug: what the update is trained on", (
        "tests/test_rollout.py::test_masks_results_and_text",), needs=("A1", "A4")),
)
HANDOUTS_ONLY = ("06-experiment.md",)     # graded by hand: no tests
CONTROLS = (  # tests that touch no solution region: the student version must pass them
    "tests/test_rules.py::test_token_entropy_uniform_and_onehot",
    LOSS + "test_table_values_and_gradient_weights[cispo]",
    LOSS + "test_kl_k3", LOSS + "test_entropy_with_minus_inf_logits",
    "tests/test_data.py::test_reward_values", "tests/test_data.py::test_extract_answer")
MODULES = ("aepo", "loss", "rollout", "engine", "kvcache", "tools", "train", "eval", "support.data",
           "support.world", "support.policy", "support.report")

OPEN = re.compile(r"^(\s*)# >>> solution (A\d+)\s*$")
CLOSE = re.compile(r"^\s*# <<< solution\s*$")
SKIP_DIRS = {".git", "runs", ".cache", "__pycache__", ".pytest_cache", ".hypothesis"}
# the kit's own CI check: it fails in a student version by design
INSTRUCTOR_ONLY = {"tests/test_course.py"}

# (assignment, file, reference snippet, buggy snippet), set in the instructor-only block:
BUGS: tuple = ()
# >>> instructor
BUGS = (
    ("A5", "rollout.py", "        t.loss_mask += [0] * len(ids)\n",
     "        t.loss_mask += [1] * len(ids)\n"),
)
# <<< instructor

# --------------------------------------------------------------------------------------------------
# The student version


def stub_regions(text: str, where: str, only: set[str] | None = None) -> tuple[str, list[str]]:
    """Replace the body of every solution region (of the assignments in `only`, default all) with a
    raise. Returns (new text, ["A1 aepo.py:segment_entropy", ...]). A region left open stops with
    the file and line of its opening marker."""
    out, blanked, lines, i = [], [], text.splitlines(keepends=True), 0
    while i < len(lines):
        match = OPEN.match(lines[i])
        out.append(lines[i])
        i += 1
        if not match:
            continue
        indent, key, start = match.group(1), match.group(2), i
        while i < len(lines) and not CLOSE.match(lines[i]):
            i += 1
        if i == len(lines):
            raise SystemExit(f"{where}:{start}: '# >>> solution {key}' has no '# <<< solution' "
                             "below it; add one")
        if only is not None and key not in only:
            out += lines[start:i]
            continue
        func, def_indent = _enclosing_def(lines, start - 1, len(indent))
        what = func if len(indent) <= def_indent + 4 else f"the marked block of {func}"
        handout = next((a.handout for a in ASSIGNMENTS if a.key == key), "")
        out.append(f'{indent}raise NotImplementedError("{key}: implement {what} '
                   f'({HANDOUTS}/{handout})")\n')
        blanked.append(f"{key} {where}:{func}")
    return "".join(out), blanked


def _enclosing_def(lines: list[str], i: int, indent: int) -> tuple[str, int]:
    """(name, indentation) of the def that holds line i."""
    for line in reversed(lines[:i]):
        m = re.match(r"^(\s*)(?:async\s+)?def (\w+)", line)
        if m and len(m.group(1)) < indent:
            return m.group(2), len(m.group(1))
    return "<module>", -4


def plant_bug(text: str, where: str, reference: str, buggy: str) -> str:
    n = text.count(reference)
    if n != 1:
        raise SystemExit(f"{where}: the planted bug's reference snippet occurs {n} times (want 1); "
                         "update BUGS in course/__init__.py to the current code: "
                         f"{reference.strip()!r}")
    return text.replace(reference, buggy)


def drop_instructor_block(text: str) -> str:
    return re.sub(r"# >>> instructor\n.*?# <<< instructor\n", "", text, flags=re.S)


def source_files(root: Path) -> list[Path]:
    """The repository's files: git's tracked and untracked-but-not-ignored files, or (no git) every
    file outside runs, caches and .git."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=root, capture_output=True, check=True).stdout
        return [root / p for p in listed.decode().split("\0") if p and (root / p).is_file()]
    except (subprocess.CalledProcessError, FileNotFoundError):
        return [p for p in sorted(root.rglob("*")) if p.is_file()
                and not SKIP_DIRS & set(p.relative_to(root).parts)]


def write_student(out: Path, only: set[str] | None = None, root: Path = ROOT) -> list[str]:
    """Copy the repository to `out` (which must not exist or be empty), blank the solution regions,
    plant the bugs, strip the instructor block. Returns what was blanked or planted, one line
    each."""
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty; give a new folder")
    done = []
    bugs = {}
    for key, file, ref, buggy in BUGS:
        if only is None or key in only:
            bugs.setdefault(file, []).append((key, ref, buggy))
    for src in source_files(root):
        rel = src.relative_to(root).as_posix()
        if rel in INSTRUCTOR_ONLY:
            continue
        dst = out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.suffix != ".py":
            shutil.copy2(src, dst)
            continue
        text = src.read_text()
        if rel == "course/__init__.py":
            text = drop_instructor_block(text)
        elif "# >>> solution" in text:
            text, blanked = stub_regions(text, rel, only)
            done += blanked
        for key, ref, buggy in bugs.pop(rel, []):
            text = plant_bug(text, rel, ref, buggy)
            done.append(f"{key} {rel}: bug planted")
        dst.write_text(text)
    if bugs:
        raise SystemExit(f"course BUGS names files not in the repository: {sorted(bugs)}")
    return done


# --------------------------------------------------------------------------------------------------
# The autograder


class Outcome(NamedTuple):
    result: str           # passed | failed | skipped
    reason: str = ""      # a failure's exception and message, its first line


class Score(NamedTuple):
    passed: int
    failed: int
    skipped: int
    first_failure: str = ""   # "node id: reason" of the assignment's first failing test


def run_tests(checkout: Path, node_ids: list[str], timeout_s: float = 900) -> dict[str, Outcome]:
    """Run the node ids in one pytest process in `checkout`. Returns node id -> its Outcome (an id
    that did not run, e.g. a test file missing from the checkout, counts as failed: `select`)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        f"--junitxml={report}", *node_ids],
                       cwd=checkout, env=env, capture_output=True, timeout=timeout_s)
        if not report.exists():
            return {}
        outcomes = {}
        for case in ET.parse(report).iter("testcase"):
            node = case.get("classname", "").replace(".", "/") + ".py::" + case.get("name", "")
            failure = next((c for c in case if c.tag in ("failure", "error")), None)
            outcomes[node] = (Outcome("failed", first_line(failure.get("message", "")))
                              if failure is not None else
                              Outcome("skipped" if case.find("skipped") is not None else "passed"))
        return outcomes


def first_line(message: str, cap: int = 200) -> str:
    """A failure's message as one line: pytest's assertion messages go on with the values."""
    line = next((line.strip() for line in message.splitlines() if line.strip()), "no message")
    return line if len(line) <= cap else line[:cap - 3] + "..."


def select(outcomes: dict[str, Outcome], selector: str) -> dict[str, Outcome]:
    """The outcomes of one selector: the node itself, or every parametrisation of a test
    function."""
    picked = {n: o for n, o in outcomes.items() if n == selector or n.startswith(selector + "[")}
    return picked or {selector: Outcome("failed", "did not run (not in this checkout?)")}


def grade(checkout: Path) -> dict[str, Score]:
    """Assignment key -> its Score over its tests, all run in one pytest process."""
    outcomes = run_tests(checkout, [t for a in ASSIGNMENTS for t in a.tests])
    scores = {}
    for a in ASSIGNMENTS:
        picked = {n: o for t in a.tests for n, o in select(outcomes, t).items()}
        results = [o.result for o in picked.values()]
        failed = [f"{n}: {o.reason}" for n, o in picked.items() if o.result == "failed"]
        scores[a.key] = Score(results.count("passed"), len(failed), results.count("skipped"),
                              failed[0] if failed else "")
    return scores


def print_scores(scores: dict[str, Score]) -> bool:
    """One line per assignment, and under an unfinished one its first failing test and why."""
    complete = True
    for a in ASSIGNMENTS:
        passed, failed, skipped, first_failure = scores[a.key]
        total = passed + failed
        complete &= failed == 0
        unfinished = [n for n in a.needs if scores[n].failed]
        needs = (f"  (its tests also run your unfinished {', '.join(unfinished)})"
                 if unfinished and failed else "")
        skip = f", {skipped} skipped" if skipped else ""
        print(f"{a.key}  {passed:3d}/{total:<3d} {100 * passed / max(total, 1):5.0f}%  "
              f"{a.title}{skip}{needs}")
        if first_failure:
            print(f"    first failure: {first_failure}")
    for name in HANDOUTS_ONLY:
        print(f"--  {HANDOUTS}/{name}: a written report, graded by hand")
    return complete


def pytest_command(a: Assignment) -> str:
    """The command that runs one assignment's tests alone, as its handout gives it."""
    ids = [f'"{t}"' if "[" in t else t for t in a.tests]
    return " \\\n    ".join(["python -m pytest -q", *ids])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m course", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("student", help="write the student version of the repository")
    s.add_argument("out_dir", type=Path)
    s.add_argument("--only", default="", help="comma-separated assignments to blank (default: all)")
    g = sub.add_parser("grade", help="run each assignment's tests and print a score per assignment")
    g.add_argument("checkout", type=Path, nargs="?", default=Path("."))
    args = parser.parse_args(argv)
    if args.command == "student":
        only = {k.strip().upper() for k in args.only.split(",") if k.strip()} or None
        unknown = (only or set()) - {a.key for a in ASSIGNMENTS}
        if unknown:
            raise SystemExit(f"--only {args.only}: unknown {sorted(unknown)}; choose from "
                             f"{', '.join(a.key for a in ASSIGNMENTS)}")
        for line in write_student(args.out_dir, only):
            print(line)
        print(f"student version written to {args.out_dir} (handouts: {HANDOUTS}/; grade: "
              f"python -m course grade {args.out_dir})")
        return 0
    if not (args.checkout / "tests").is_dir():
        raise SystemExit(f"{args.checkout} has no tests/ folder; give the root of a checkout of "
                         "this repository")
    return 0 if print_scores(grade(args.checkout.resolve())) else 1
