"""The course kit (course/): the reference passes every assignment's tests; the student version
imports, fails exactly the tests of its blanked functions and its planted bug, and passes the rest.
Three pytest subprocesses over ~60 selected tests (about a minute on 2 cores), plus the stub and bug
mechanics."""
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import course
from aepo import global_budget

ROOT = Path(__file__).resolve().parents[1]
# split so this file holds no marker itself
OPEN, CLOSE = "# >>> " + "solution", "# <<< " + "solution"
ALL_TESTS = [t for a in course.ASSIGNMENTS for t in a.tests]
RULES = "tests/test_rules.py::"


def outcomes_of(checkout: Path, selectors: list[str]) -> dict[str, set[str]]:
    return results_of(course.run_tests(checkout, selectors), selectors)


def results_of(outcomes: dict, selectors: list[str]) -> dict[str, set[str]]:
    assert outcomes, "pytest produced no report"
    return {s: {o.result for o in course.select(outcomes, s).values()} for s in selectors}


# --------------------------------------------------------------------------------------------------
# Mechanics


def test_stub_keeps_markers_and_indentation_and_names_the_function():
    src = (f"def f(x):\n    \"\"\"doc\"\"\"\n    {OPEN} A1\n    y = x + 1\n    return y\n"
           f"    {CLOSE}\n\n"
           f"class C:\n    def g(self):\n        if True:\n            {OPEN} A2\n"
           f"            return 2\n            {CLOSE}\n")
    out, blanked = course.stub_regions(src, "m.py")
    assert blanked == ["A1 m.py:f", "A2 m.py:g"]
    assert "y = x + 1" not in out and "return 2" not in out
    assert f'    {OPEN} A1\n    raise NotImplementedError("A1: implement f' in out
    assert '            raise NotImplementedError("A2: implement the marked block of g' in out
    namespace = {}
    exec(out, namespace)                                   # still valid Python
    with pytest.raises(NotImplementedError, match="A1: implement f"):
        namespace["f"](1)
    only, blanked = course.stub_regions(src, "m.py", only={"A2"})
    assert blanked == ["A2 m.py:g"] and "y = x + 1" in only


def test_an_open_region_and_a_stale_bug_stop_with_file_and_line():
    with pytest.raises(SystemExit, match=r"m.py:2: .* no '# <<< solution'"):
        course.stub_regions(f"def f():\n    {OPEN} A1\n    return 1\n", "m.py")
    with pytest.raises(SystemExit, match="occurs 0 times"):
        course.plant_bug("x = 1\n", "m.py", "x = 2\n", "x = 3\n")


def test_every_assignment_has_a_handout_and_code_to_write_or_a_bug():
    regions = {line.split()[-1] for f in ("aepo.py", "loss.py", "rollout.py")
               for line in (ROOT / f).read_text().splitlines() if line.strip().startswith(OPEN)}
    bugs = {key for key, *_ in course.BUGS}
    for a in course.ASSIGNMENTS:
        assert (ROOT / "course" / "assignments" / a.handout).is_file(), a.handout
        assert (a.key in regions) != (a.key in bugs), a.key
    for name in course.HANDOUTS_ONLY:
        assert (ROOT / "course" / "assignments" / name).is_file()
    assert regions | bugs == {a.key for a in course.ASSIGNMENTS}


def test_every_handout_gives_the_pytest_command_of_its_tests():
    for a in course.ASSIGNMENTS:
        handout = (ROOT / "course" / "assignments" / a.handout).read_text()
        assert textwrap.indent(course.pytest_command(a), "    ") in handout, a.handout


def test_grade_names_the_first_failure_of_each_unfinished_assignment(capsys):
    scores = {a.key: course.Score(len(a.tests), 0, 0) for a in course.ASSIGNMENTS}
    failure = "tests/test_loss.py::test_eps_is_added_to_the_std: AssertionError: assert 1.0 == 0.5"
    scores["A2"] = course.Score(8, 1, 0, failure)
    assert course.print_scores(scores) is False
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if "first failure" in line] == [f"    first failure: {failure}"]
    assert lines[lines.index(f"    first failure: {failure}") - 1].startswith("A2    8/9 ")
    assert course.first_line("AssertionError: assert 1 == 2\n +  where 1 = f()") == (
        "AssertionError: assert 1 == 2")
    assert len(course.first_line("x" * 500)) == 200


def test_the_student_copy_of_the_kit_holds_no_bug_table(tmp_path):
    text = course.drop_instructor_block((ROOT / "course" / "__init__.py").read_text())
    assert "BUGS = (" not in text
    for *_, buggy in course.BUGS:
        assert buggy not in text
    (tmp_path / "course").mkdir()
    (tmp_path / "course" / "__init__.py").write_text(text)
    check = subprocess.run([sys.executable, "-c",
                            "import course; assert course.BUGS == (), course.BUGS"],
                           cwd=tmp_path, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


# --------------------------------------------------------------------------------------------------
# The reference and the student version, through pytest


def test_the_reference_passes_every_assignment_and_control():
    results = outcomes_of(ROOT, ALL_TESTS + list(course.CONTROLS))
    assert {s: o for s, o in results.items() if o != {"passed"}} == {}


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    out = tmp_path_factory.mktemp("student")
    done = course.write_student(out)
    return out, done


def test_the_student_version_imports_and_fails_exactly_the_blanked_tests(student):
    out, done = student
    assert ("A5 rollout.py: bug planted" in done
            and any(d.startswith("A3 loss.py:policy_loss") for d in done))
    assert not (out / "tests" / "test_course.py").exists()
    for handout in (ROOT / "course" / "assignments").glob("*.md"):
        assert (out / "course" / "assignments" / handout.name).is_file()
    imports = subprocess.run([sys.executable, "-c", "import " + ", ".join(course.MODULES)], cwd=out,
                             capture_output=True, text=True)
    assert imports.returncode == 0, imports.stderr[-2000:]
    outcomes = course.run_tests(out, ALL_TESTS + list(course.CONTROLS))
    results = results_of(outcomes, ALL_TESTS + list(course.CONTROLS))
    assert {s: o for s, o in results.items() if s in ALL_TESTS and o != {"failed"}} == {}
    # what grade shows under A1: the test, then the stub's line naming the function and handout
    assert outcomes[RULES + "test_global_budget_released_formula"].reason == (
        "NotImplementedError: A1: implement global_budget "
        "(course/assignments/01-entropy-and-branching.md)")
    assert {s: o for s, o in results.items() if s in course.CONTROLS and o != {"passed"}} == {}


def test_the_planted_bug_alone_fails_only_its_assignment(tmp_path):
    """Only A5: its test fails, and the tests of the assignments it runs (A1, A4) still pass."""
    assert course.write_student(tmp_path, only={"A5"}) == ["A5 rollout.py: bug planted"]
    by_key = {a.key: a.tests for a in course.ASSIGNMENTS}
    results = outcomes_of(tmp_path, list(by_key["A5"] + by_key["A1"] + by_key["A4"]))
    assert all(results[s] == {"failed"} for s in by_key["A5"])
    assert {s: o for s, o in results.items() if s not in by_key["A5"] and o != {"passed"}} == {}


# --------------------------------------------------------------------------------------------------
# The walkthrough's script, on the untrained tiny model


def test_the_walkthrough_script_prints_every_number_it_talks_about():
    run = subprocess.run([sys.executable, "docs/walkthrough.py", "--model", "tiny", "--k", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    for heading in ("Entropy Pre-Monitoring", "Entropy-Balanced Adaptive Rollout",
                    "group advantages", "Entropy-aware advantage", "gradient weight"):
        assert heading in out, heading
    h_root, h_tool, m = re.search(r"H_root = ([\d.]+)\s+H_tool = ([\d.]+) .*\) \+ 1 = (\d+)",
                                  out).groups()
    assert int(m) == global_budget(2, float(h_root), float(h_tool), beta=0.5)
    weights = {line.split()[0]: re.findall(r"F=([\d.]+)", line) for line in out.splitlines()
               if line.startswith(("ppo ", "aepo "))}
    assert weights == {"ppo": ["1.00", "1.10", "0.00", "0.00"],
                       "aepo": ["1.00", "1.10", "1.20", "0.00"]}


def test_every_function_and_test_the_walkthrough_names_exists():
    text = (ROOT / "docs" / "walkthrough.md").read_text()
    named = re.findall(r"`(tests/test_\w+\.py)::(\w+)`", text)
    assert len(named) >= 15
    for file, name in named:
        assert f"def {name}(" in (ROOT / file).read_text(), f"{file}::{name}"
    for file, name in re.findall(r"`((?:\w+/)?\w+\.py):(\w+)`", text):  # a function or a table
        assert re.search(rf"^\s*(def {name}\(|{name}\b.*=)",
                         (ROOT / file).read_text(), re.M), f"{file}:{name}"
