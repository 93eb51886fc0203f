"""benchmarks/gpu.py runs where no GPU is lent to check it: its offline Qwen tokenizer must give the
hub tokenizer's ids, and its whole pipeline must run on CPU at toy size (`--small`)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu  # noqa: E402


def test_offline_qwen_tokenizer_gives_the_hub_ids():
    tok = gpu.qwen_tokenizer()
    assert len(tok) == 151669
    # the hub tokenizer's ids
    assert tok.encode("Hello, how are you?") == [9707, 11, 1246, 525, 498, 30]
    assert [tok.convert_tokens_to_ids(t)
            for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
            ] == [151643, 151644, 151645, 151667, 151668]
    assert (tok.eos_token_id, tok.pad_token_id) == (151645, 151643)
    assert tok.encode("12") == [16, 17]                  # Qwen splits digits one by one
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_gpu_script_runs_every_phase_at_toy_size_on_cpu(tmp_path):
    """bash benchmarks/gpu.sh --small: the GPU script end to end on CPU (no wheels installed), every
    phase in the report, written to $OUT; the forced tool calls run and AEPO branches."""
    out = subprocess.run(["bash", "benchmarks/gpu.sh", "--small", "--folder", str(tmp_path / "m")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
                              "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    report = (tmp_path / "gpu.md").read_text()
    rows = {line.split(" | ")[0].strip("| ") for line in report.splitlines()
            if line.startswith("| ")}
    assert {"load", "rollout_questions", "probe", "plan", "rollout", "rollout memory",
            "engines (1 question x k)", "old log-probs", "old log-probs memory", "update",
            "update memory"} <= rows
    rollout = next(line for line in report.splitlines() if line.startswith("| rollout |"))
    calls, branches = (int(rollout.split(f" {w}")[0].split()[-1]) for w in ("tool calls",
                                                                            "branches"))
    assert calls > 0 and branches > 0
    assert "skipped" not in report and report.strip().endswith("peak_gib=0.00")


def _finished_run(folder: Path, algo: str, pass1: float, entropies: list[float],
                  branches: float = 2.0) -> None:
    """A run folder as train.py --preset class leaves it (only the files reproduce.py reads)."""
    import json

    (folder / "eval-sft").mkdir(parents=True)
    (folder / "eval-rl").mkdir()
    (folder / "config.json").write_text(json.dumps({"algo": algo}))
    for name, p in (("eval-sft", 0.25), ("eval-rl", pass1)):
        (folder / name / "summary.json").write_text(json.dumps(
            {"pass1": p, "runs": 4, "pass_at_k": {"4": p + 0.3}, "search_calls": 1.0,
             "python_calls": 0.5}))
    rows = [{"step": i, "entropy": h, "clip_frac_low": 0.0, "clip_frac_high": 0.02,
             "branches_per_q": branches, "globals_per_q": 8.0 - branches,
             "branch_top1_share": 0.6, "branch_top3_share": 1.0, "consecutive_branch_share": 0.1,
             "reward": 0.3, "acc": 0.3, "search_calls": 1.0, "sampled_tokens_total": 1000 * (i + 1),
             "clip_frac_top20": 0.08, "clip_frac_rest": 0.005, "clip_grad_share": 0.01,
             "h_call0": 0.1, "h_call1": 0.2, "h_call2": 0.3, "dh_zero_share": 0.0,
             "l_positive_share": 0.25, "m": 4.5, "distinct_paths": 3.0,
             "decisions": [[1, 0.5, 0, 1], [2, -0.25, 1, 0]] if branches else []}
            for i, h in enumerate(entropies)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_reproduce_summarises_finished_runs_without_training_again(tmp_path):
    runs, results = tmp_path / "runs", tmp_path / "results"
    _finished_run(runs / "grpo-seed0", "grpo", 0.30, [0.2] * 6, branches=0.0)
    _finished_run(runs / "grpo-seed1", "grpo", 0.50, [0.4] * 6, branches=0.0)
    _finished_run(runs / "aepo-seed0", "aepo", 0.45, [1.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    out = subprocess.run([sys.executable, "benchmarks/reproduce.py", "--seeds", "2",
                          "--algos", "grpo", "--ablations", "aepo", "--ablation_seeds", "1",
                          "--out", str(runs), "--results", str(results)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "train.py" not in out.stdout.split("# GRPO")[0]           # nothing was trained
    table = (results / "reproduce.md").read_text()
    # grpo: Pass@1 after RL 30 and 50 -> 40.0 ± 10.0; Pass@4 70.0 ± 10.0; 6 steps, 6k tokens
    # entropy 0.2 and 0.4 -> 0.300 ± 0.100; nothing branched, so no branch shares ("-")
    # clip 0.02 (top-20% 0.08, rest 0.005, gradient share 0.01), step entropies 0.1 / 0.2 / 0.3,
    # m 4.5, 3 distinct paths; no branch decision shares ("-")
    rules = ("| 0.0200 ± 0.0000 | 0.0800 ± 0.0000 | 0.0050 ± 0.0000 | 0.0100 ± 0.0000 "
             "| 0.100 ± 0.000 | 0.200 ± 0.000 | 0.300 ± 0.000 | - | - | 4.50 ± 0.00 | 3.00 ± 0.00 ")
    assert ("| grpo (2) | 25.0 ± 0.0 | 40.0 ± 10.0 | 70.0 ± 10.0 | 1.50 ± 0.00 | 1.50 ± 0.00 "
            "| 6.0 ± 0.0 | 6.0 ± 0.0 | 0.300 ± 0.100 | 0.300 ± 0.100 " + rules
            + "| 8.00 ± 0.00 | 0.00 ± 0.00 | - | - | - |") in table
    # aepo, one seed: entropy of the first 5 steps 1.0, of the last 5 steps 0.8
    assert ("| aepo (1) | 25.0 | 45.0 | 75.0 | 1.50 | 1.50 | 6.0 | 6.0 | 1.000 | 0.800 | 0.0200 "
            "| 0.0800 | 0.0050 | 0.0100 | 0.100 | 0.200 | 0.300 | 0.00 | 0.25 | 4.50 | 3.00 "
            "| 6.00 | 2.00 | 0.60 | 1.00 | 0.10 |") in table
    # the seeds paired: grpo seed 0 (30) - aepo seed 0 (45)
    assert "- grpo - aepo: -15.0 points (per seed: -15.0)" in table
    assert out.stdout.strip().splitlines()[-7:] == [
        f"aepo_{k}={v:.4f}" for k, v in (("pass1", 0.45), ("clip", 0.02), ("clip_top20", 0.08),
                                          ("dh_zero", 0.0), ("l_pos", 0.25), ("h0", 0.1),
                                          ("h1", 0.2))]
    for name in ("reproduce.png", "reproduce-tokens.png", "reproduce-rules.png"):
        assert (results / name).stat().st_size > 0, name


def test_decode_benchmark_runs_at_toy_size(tmp_path):
    """benchmarks/decode.py end to end at toy size: its tables, and one host read per step in the
    stop check."""
    out = subprocess.run([sys.executable, "benchmarks/decode.py", "--tokens", "16", "--rows", "2",
                          "--layers", "1", "--out", str(tmp_path / "decode.md")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    report = (tmp_path / "decode.md").read_text()
    assert "| in place, reserved up front" in report and "| concatenated |" in report
    assert "- in the stop check: 1.00 " in report and report.strip().split("\n")[-1].startswith(
        "write_us_per_token=")


def test_runs_of_one_seed_share_the_sft_start_evaluation(tmp_path):
    """The SFT start's held-out records of a finished run of the same seed are copied (train.py's
    evaluation resumes from them); a seed with no finished run gets nothing."""
    import reproduce

    donor, other_seed = tmp_path / "grpo-seed0", tmp_path / "grpo-seed1"
    _finished_run(donor, "grpo", 0.3, [0.2])
    (donor / "eval-sft" / "examples.jsonl").write_text('{"idx": 0}\n')
    unfinished = tmp_path / "arpo-seed0"                       # eval-sft not done yet: no donor
    (unfinished / "eval-sft").mkdir(parents=True)
    (unfinished / "eval-sft" / "examples.jsonl").write_text('{"idx": 9}\n')
    new, lone = tmp_path / "aepo-seed0", tmp_path / "aepo-seed1"
    new.mkdir(), lone.mkdir(), other_seed.mkdir()
    reproduce.share_sft_eval(new, 0, [unfinished, donor])
    assert (new / "eval-sft" / "examples.jsonl").read_text() == '{"idx": 0}\n'
    reproduce.share_sft_eval(lone, 1, [other_seed])
    assert not (lone / "eval-sft").exists()
