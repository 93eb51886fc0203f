"""eval.py: Pass@k by hand, math equivalence, known scores from a scripted policy, the resume path,
the LLM judge's verdict parsing, and the untrained tiny model on every file of the paper's eval
data."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aepo import Config
from eval import evaluate, make_judge, math_equal, pass_at_k
from fakes import ScriptedPolicy, ids, toy_tokenizer
from support import data, loaders
from support.data import Example
from support.policy import load_policy

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
TOOLS = {"search": lambda q: f"Page 1: {q} was born in Vantor.", "python": lambda c: "25"}
SEARCH = "<think> a </think> <search> Mira Quell </search>"
ANSWER = " <think> b </think> <answer> The final answer is \\boxed{ Vantor } </answer>"


def test_pass_at_k_by_hand():
    # 1 - C(3,k)/C(5,k)
    assert [round(pass_at_k(5, 2, k), 10) for k in (1, 2, 5)] == [0.4, 0.7, 1.0]
    assert pass_at_k(5, 0, 1) == pass_at_k(5, 0, 5) == 0.0
    assert pass_at_k(2, 1, 1) == 0.5 and pass_at_k(2, 1, 2) == 1.0


@pytest.mark.parametrize("pred, gold", [
    (r"\frac{1}{2}", "0.5"), ("1,000", "1000"), (r"5\text{ cm}", "5"), ("$5$", "5"), ("2.0", "2"),
    (r"\dfrac{3}{4}", "3/4"), (r"\text{Evelyn}", "Evelyn"), (r"90^\circ", "90"), ("x=5", "5"),
    (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})"), ("-1/2", r"-\frac{1}{2}"),
    ("18.", "18")])
def test_math_equal_accepts(pred, gold):
    assert math_equal(pred, gold) and math_equal(pred, ["7", gold])


@pytest.mark.parametrize("pred, gold",
                         [("3", "4"), ("1/3", "0.33"), ("1,-2", "1-2"), (r"\frac{1}{0}", "0")])
def test_math_equal_rejects(pred, gold):
    assert not math_equal(pred, gold)


@pytest.fixture(scope="module")
def tok():
    return toy_tokenizer()


def scripted_eval(tok, examples, out_dir=None, runs=2):
    model = ScriptedPolicy(tok, [ids(tok, SEARCH), ids(tok, ANSWER)])
    summary = evaluate(model, tok, examples, TOOLS, Config(), runs=runs, temperature=0.6,
                       top_p=0.95, seed=0, system_prompt="sys", out_dir=out_dir, batch_questions=1)
    return model, summary


def test_scripted_policy_known_scores(tok, tmp_path):
    for text in (SEARCH, ANSWER):
        assert tok.decode(ids(tok, text)) == text   # the toy tokenizer round-trips the script
    examples = [Example("Where was Mira Quell born?", ("Vantor",), "toy"),
                Example("Q2?", ("Other",), "toy"),
                # math rule: \text{} unwrapped; EM says no
                Example("Q3?", ("\\text{Vantor}",), "gsm8k")]
    _, s = scripted_eval(tok, examples, tmp_path)
    assert (s["n"], s["runs"]) == (3, 2)
    assert s["pass1"] == pytest.approx(2 / 3) and s["pass1_std"] == 0.0
    assert s["pass_at_k"] == {1: pytest.approx(2 / 3), 2: pytest.approx(2 / 3)}
    # SQuAD: "textvantor"
    assert s["em"] == pytest.approx(1 / 3) and s["f1"] == pytest.approx(1 / 3)
    assert s["mean_reward"] == pytest.approx(1 / 3)        # F1 1 with search only (no +0.1), else 0
    assert (s["format_fail"], s["search_calls"], s["python_calls"]) == (0.0, 1.0, 0.0)
    assert s["by_source"]["toy"]["pass1"] == 0.5 and s["by_source"]["gsm8k"]["pass1"] == 1.0
    lines = [json.loads(l) for l in (tmp_path / "examples.jsonl").read_text().splitlines()]
    run = lines[0]["runs"][0]
    assert (run["answer"], run["correct"], run["finish"], run["tool_calls"]) == (
        "Vantor", True, "eos", [["search", "Mira Quell"]])
    assert "<result>\nPage 1: Mira Quell was born in Vantor.\n</result>" in run["text"]
    assert (json.loads((tmp_path / "summary.json").read_text())["pass_at_k"]["2"]
            == pytest.approx(2 / 3))


def test_resume_skips_done_examples(tok, tmp_path):
    examples = [Example("Where was Mira Quell born?", ("Vantor",), "toy"),
                Example("Q2?", ("Other",), "toy")]
    scripted_eval(tok, examples[:1], tmp_path)
    with open(tmp_path / "examples.jsonl", "a") as f:
        f.write('{"idx": 1, "question": "Q2?", "go')           # a crash in the middle of a line
    model, s = scripted_eval(tok, examples, tmp_path)          # only Q2 is new
    assert len((tmp_path / "examples.jsonl").read_text().splitlines()) == 2 and s["pass1"] == 0.5
    model, again = scripted_eval(tok, examples, tmp_path)      # nothing new: no forward pass at all
    assert model.calls == 0 and again == s
    with pytest.raises(SystemExit, match="examples.jsonl line 1"):
        scripted_eval(tok, examples, tmp_path, runs=3)


@pytest.mark.parametrize("reply, verdict",
                         [(" Correct", True), (" Incorrect", False), (" maybe", False)])
def test_judge_reads_the_verdict(tok, reply, verdict):
    judge = make_judge(ScriptedPolicy(tok, [ids(tok, reply)]), tok)
    assert judge("Where was Mira Quell born?", ("Vantor",), "Vantor city") is verdict


def test_tiny_model_on_every_eval_file(arpo_data, tmp_path):
    files = sorted((arpo_data / "eval").glob("*/test.jsonl")) + sorted(arpo_data.glob("*.parquet"))
    examples = [ex for f in files for ex in loaders.load_examples(str(f), limit=2)]
    assert len(examples) == 2 * len(files) >= 18
    model, tokenizer = load_policy("tiny", lora_r=0, trainable=False)
    cfg = Config(max_response_tokens=32, segment_tokens=32, max_rounds=3)
    run = lambda: evaluate(model, tokenizer, examples, TOOLS, cfg, runs=2, temperature=0.6,
                           top_p=0.95, seed=0, system_prompt=data.SHORT_SYSTEM_PROMPT,
                           out_dir=tmp_path, batch_questions=32)
    s = run()
    lines = (tmp_path / "examples.jsonl").read_text().splitlines()
    assert s["n"] == len(lines) == len(examples) and (tmp_path / "summary.json").exists()
    assert all(len(json.loads(l)["runs"]) == 2 for l in lines)
    assert set(s["by_source"]) == {ex.source for ex in examples}
    assert 0 <= s["pass1"] <= 1 and 0 < s["response_tokens"] <= 32
    assert run() == s and len((tmp_path / "examples.jsonl").read_text().splitlines()) == len(lines)


def test_cli_prints_a_table(arpo_data, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "eval.py", "--model", "tiny",
           "--dataset", str(arpo_data / "eval/bamboogle/test.jsonl"),
           "--limit", "2", "--runs", "2", "--output_dir", str(tmp_path),
           "--max_response_tokens", "32", "--threads", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| dataset | n | Pass@1 | Pass@2 |" in proc.stdout and "| bamboogle | 2 |" in proc.stdout
    assert len((tmp_path / "examples.jsonl").read_text().splitlines()) == 2
