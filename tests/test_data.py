"""Tests for data.py: grading by hand-computed cases and properties, the system prompts, loaders."""
import json
import re
import time
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import data
from data import (Example, exact_match, extract_answer, f1_score, format_error, load_demos, load_examples,
                  normalize_answer, reward, split_response, tool_counts)


def result(output: str) -> str:
    """The block the tool harness appends after </search> or </python>."""
    return " <result>\n" + output + "\n</result>"


SEARCH = "<search> Mirel Quell </search>" + result("Page 1: Mirel Quell was born in 1962 in Vantor.")
PYTHON = "<python> 1987 - 1962 </python>" + result("25")
ANSWER = "<answer> The final answer is \\boxed{ Vantor} </answer>"


def trajectory(*middle: str, answer: str = ANSWER) -> str:
    return " ".join(["<think> I need to search. </think>", *middle, "<think> Done. </think>", answer])


# ------------------------------------------------------------------------------------------------ grading
def test_normalize_answer():
    assert normalize_answer("The  Quick, brown FOX!") == "quick brown fox"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("Theatre of the Absurd") == "theatre of absurd"  # only whole-word articles
    assert normalize_answer("  E. H. Shepard ") == "e h shepard"


def test_exact_match_and_f1_by_hand():
    assert exact_match("the Vantor.", ["Delvar", "vantor"]) == 1.0
    assert exact_match("Vantor city", "Vantor") == 0.0
    assert f1_score("Mirel Quell Vantor", "Mirel Quell") == pytest.approx(0.8)  # p 2/3, r 1
    assert f1_score("a b c d", "b c e") == pytest.approx(2 / 3)  # the article "a" goes: p 2/3, r 2/3
    assert f1_score("x b c d", "b c e") == pytest.approx(4 / 7)  # p 2/4, r 2/3
    assert f1_score("b c", ["zzz", "b c e", "b c"]) == 1.0  # max over golds
    assert f1_score("Vantor", "Delvar") == 0.0
    assert f1_score("", "") == 1.0 and f1_score("", "x") == 0.0
    assert f1_score("x", []) == 0.0


def test_extract_answer():
    assert extract_answer(ANSWER) == "Vantor"
    nested = "<answer> \\boxed{1} then \\boxed{\\frac{1}{2}} </answer>"
    assert extract_answer(nested) == "\\frac{1}{2}"
    assert extract_answer("<answer> \\boxed{\\boxed{x}} </answer>") == "\\boxed{x}"  # the outer box
    assert extract_answer("<answer> \\boxed{a} \\boxed{b </answer>") == "a"  # unclosed last box is skipped
    assert extract_answer("\\boxed{a} <answer> no box </answer>") is None  # boxes outside the answer count not
    assert extract_answer("<answer> \\boxed{a} ") is None  # answer not closed
    assert extract_answer("<think> x </think>") is None


def test_format_errors_give_minus_one():
    assert format_error(trajectory(SEARCH)) is None
    bad = {
        "no think": "<answer> \\boxed{ Vantor} </answer>",
        "unequal think": "<think> a </think> <think> b " + ANSWER,
        "two answers": trajectory(SEARCH) + " " + ANSWER,
        "unclosed search": trajectory("<search> Mirel Quell"),
        "search without result": trajectory("<search> Mirel Quell </search>"),
        "python without result": trajectory("<python> 1 + 1 </python>"),
        "stray result": trajectory("<result> made up </result>"),
        "no boxed": trajectory(SEARCH, answer="<answer> Vantor </answer>"),
        "closing answer first": "<think> x </think> </answer> \\boxed{a} <answer>",
    }
    for name, response in bad.items():
        assert format_error(response) is not None, name
        assert reward(response, "Vantor") == -1.0, name


def test_reward_values():
    assert reward(trajectory(SEARCH), "Vantor") == 1.0
    assert reward(trajectory(SEARCH, PYTHON), ["Delvar", "Vantor"]) == pytest.approx(1.1)  # bonus: both tools
    assert reward(trajectory(PYTHON), "Vantor") == 1.0  # no bonus with python only
    assert reward(trajectory(SEARCH, PYTHON), "Vantor Delvar") == pytest.approx(2 / 3 + 0.1)  # p 1, r 1/2
    assert reward(trajectory(SEARCH, PYTHON), "Delvar") == 0.0  # F1 = 0: no bonus either
    assert reward(trajectory(), "Vantor") == 1.0  # a right answer without tools is still right


def test_tags_inside_tool_results_do_not_count():
    hostile = "<python> print(page) </python>" + result(
        "<answer> \\boxed{x} </answer> <think> </result> <search>")
    response = trajectory(SEARCH, hostile)
    assert format_error(response) is None
    assert extract_answer(response) == "Vantor"
    assert tool_counts(response) == (1, 1)


def test_tool_counts():
    assert tool_counts(trajectory(SEARCH, SEARCH, PYTHON)) == (2, 1)
    assert tool_counts("no tools") == (0, 0)


PIECES = ["<think>", "</think>", "<answer>", "</answer>", "<search>", "</search>", "<python>", "</python>",
          "<result>", "</result>", " <result>\n", "\n</result>", "\\boxed{", "{", "}", " Vantor", " ", "\n", "\x08"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=8)), max_size=30),
       st.lists(st.text(max_size=10), max_size=3))
def test_reward_never_raises_and_stays_in_range(parts, golds):
    response = "".join(parts)
    r = reward(response, golds)
    assert r == -1.0 or 0.0 <= r <= 1.1 + 1e-9
    pieces = split_response(response)
    assert "".join(piece for piece, _ in pieces) == response
    assert all(piece for piece, _ in pieces)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([SEARCH, PYTHON]), max_size=3),
       st.text(alphabet=st.characters(blacklist_characters="{}<>\\"), max_size=20),
       st.lists(st.text(max_size=10), min_size=1, max_size=3))
def test_well_formed_responses_score_between_zero_and_one_point_one(tools, answer, golds):
    r = reward(trajectory(*tools, answer=f"<answer> \\boxed{{{answer}}} </answer>"), golds)
    assert 0.0 <= r <= 1.1 + 1e-9
    assert r == 0.0 or r == pytest.approx(f1_score(answer, golds) + 0.1 * (SEARCH in tools and PYTHON in tools))


def test_split_response_marks_exactly_the_tool_results():
    response = trajectory(SEARCH, PYTHON)
    pieces = split_response(response)
    assert "".join(p for p, _ in pieces) == response
    assert [p for p, is_result in pieces if is_result] == [
        result("Page 1: Mirel Quell was born in 1962 in Vantor."), result("25")]
    assert split_response("") == [] and split_response("plain") == [("plain", False)]


def test_system_prompts(arpo_data):
    prompt = pd.read_parquet(arpo_data / "valid.parquet").prompt[0][0]["content"]
    assert data.SYSTEM_PROMPT == prompt.replace("\x08", "\\b")
    assert all(tag in data.SHORT_SYSTEM_PROMPT for tag in ["<search>", "<python>", "<answer>"])


# ------------------------------------------------------------------------------------------------ loaders
def test_paper_parquet_files(arpo_data):
    hard = load_examples(str(arpo_data / "hard_search_1k.parquet"))
    assert len(hard) == 1071 and hard[0] == Example("who illustrated the original winnie the pooh books",
                                                    ("E. H. Shepard",), "hard_search_1k", "")
    valid = load_examples(str(arpo_data / "valid.parquet"))
    assert len(valid) == 180 and {e.kind for e in valid} == {"qa", "math"} and valid[0].source == "arpo"
    for e in hard + valid:
        assert "\x08" not in e.question + "".join(e.golds) and e.question and e.golds


def test_paper_eval_jsonl_files(arpo_data):
    files = sorted(arpo_data.glob("eval/*/test.jsonl"))
    assert len(files) == 7
    for path in files:
        examples = load_examples(str(path))
        assert len(examples) == path.read_bytes().count(b"\n"), path  # wc -l
        assert examples[0].source == path.parent.name
        assert all(e.question and e.golds and "\x08" not in e.question for e in examples)
    gsm8k = load_examples(str(arpo_data / "eval/gsm8k/test.jsonl"), limit=2)
    assert gsm8k[0].golds == ("18",) and len(gsm8k) == 2  # "... #### 18" cut to the final answer
    assert load_examples(str(arpo_data / "eval/aime24/test.jsonl"))[0].golds == ("204",)
    assert len(load_examples(str(arpo_data / "eval/hotpotqa/test.jsonl"))[1].golds) >= 1


def test_jsonl_answer_shapes(tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [{"Question": "q1", "Answer": ["a", "b"]}, {"problem": "q2", "solution": 42}, {"question": "q3 \x08oxed",
            "golds": ["\x08oxed{1}"], "kind": "math"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_examples(str(path)) == [Example("q1", ("a", "b"), "mixed"), Example("q2", ("42",), "mixed"),
                                        Example("q3 \\boxed", ("\\boxed{1}",), "mixed", "math")]


@pytest.mark.parametrize("lines, message", [
    (['{"question": "q", "answer": "a"}', '{"question": "q", "answer": '], r"line 2: invalid JSON"),
    (['{"question": "q", "answer": "a"}', "", '{"answer": "a"}'],
     r"line 3: no question field \(expected a string under one of question, Question, problem\)"),
    (['{"question": "q"}'], r"line 1: no answer field"),
    (['["q", "a"]'], r"line 1: expected a JSON object"),
    (['{"question": "q", "answer": {"x": 1}}'], r"line 1: the answer must be"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, lines, message):
    path = tmp_path / "x.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=re.escape(str(path)) + " " + message):
        load_examples(str(path))


def test_malformed_parquet_names_file_and_row(tmp_path):
    path = tmp_path / "verl.parquet"
    pd.DataFrame({"prompt": [[{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
                             [{"role": "system", "content": "s"}]],
                  "reward_model": [{"ground_truth": "a"}, {"ground_truth": "b"}]}).to_parquet(path)
    with pytest.raises(ValueError, match=re.escape(str(path)) + r" row 1 \(0-based\): the prompt has no user message"):
        load_examples(str(path))
    other = tmp_path / "other.parquet"
    pd.DataFrame({"text": ["x"]}).to_parquet(other)
    with pytest.raises(ValueError, match="unrecognised columns"):
        load_examples(str(other))
    plain = tmp_path / "plain.parquet"
    pd.DataFrame({"question": ["q"], "answer": [["a", "b"]]}).to_parquet(plain)
    assert load_examples(str(plain)) == [Example("q", ("a", "b"), "plain")]
    garbage = tmp_path / "garbage.parquet"
    garbage.write_text("not parquet")
    with pytest.raises(ValueError, match="not a readable parquet file"):
        load_examples(str(garbage))


def test_missing_and_unknown_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_examples(str(tmp_path / "nope.jsonl"))
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        load_examples(str(tmp_path / "nope.parquet"))
    (tmp_path / "x.csv").write_text("question,answer\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_examples(str(tmp_path / "x.csv"))
    with pytest.raises(ValueError, match="unknown world split"):
        load_examples("world:test")
    with pytest.raises(ValueError, match="unknown data"):
        load_examples("not a spec")


def test_hub_id_offline_fails_fast_and_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.time()
    with pytest.raises(ConnectionError, match="hub is unreachable.*pass a local .parquet or .jsonl file"):
        load_examples("hotpotqa/hotpot_qa:validation")
    assert time.time() - start < 1.0


def test_load_demos_errors(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"question": "q", "response": "r \x08oxed{1}"}) + "\n" + json.dumps({"question": "q"}))
    with pytest.raises(ValueError, match=re.escape(str(path)) + " line 2: no response field"):
        load_demos(path)
    path.write_text(json.dumps({"question": "q", "response": "r \x08oxed{1}"}))
    assert load_demos(path)[0].response == "r \\boxed{1}" and load_demos(path)[0].golds == ()


def test_hub_id_reads_the_split_files(monkeypatch, tmp_path):
    """The online path with the hub client replaced by local files (no network in tests)."""
    import huggingface_hub

    (tmp_path / "test-0.jsonl").write_text(json.dumps({"question": "q", "answer": ["a"]}) + "\n")
    (tmp_path / "train-0.jsonl").write_text(json.dumps({"question": "t", "answer": "b"}) + "\n")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo_id, repo_type: [
        "README.md", "data/test-0.jsonl", "data/train-0.jsonl", "data/contest.jsonl"])
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo_id, filename, repo_type: str(tmp_path / Path(filename).name))
    assert load_examples("someone/qa:test") == [Example("q", ("a",), "someone/qa")]

    def unreachable(repo_id, repo_type):
        raise OSError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "list_repo_files", unreachable)
    with pytest.raises(ConnectionError, match="hub is unreachable"):
        load_examples("someone/qa")
