"""benchmarks/gpu.py runs where no GPU is lent to check it: its offline Qwen tokenizer must give the hub
tokenizer's ids, and its whole pipeline must run on CPU at toy size (`--small`)."""
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
    assert tok.encode("Hello, how are you?") == [9707, 11, 1246, 525, 498, 30]   # the hub tokenizer's ids
    assert [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>",
                                                   "</think>")] == [151643, 151644, 151645, 151667, 151668]
    assert (tok.eos_token_id, tok.pad_token_id) == (151645, 151643)
    assert tok.encode("12") == [16, 17]                  # Qwen splits digits one by one
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_gpu_benchmark_runs_at_toy_size_on_cpu(tmp_path):
    out = subprocess.run([sys.executable, "benchmarks/gpu.py", "--small", "--folder", str(tmp_path / "model"),
                          "--out", str(tmp_path / "gpu.md")], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = (tmp_path / "gpu.md").read_text()
    assert "| rollout generated tokens | 128 |" in report     # 2 questions x k=2 x the 32-token budget
    assert "RL step (train.rl_step)" in report and report.strip().endswith("peak_gib=0.00")
