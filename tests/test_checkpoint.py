"""Tests of support/checkpoint.py: what --resume keeps of a run's logs, and the line Ctrl-C
prints."""
import json

from support import checkpoint


def write_log(run, steps):
    for name in ("metrics.jsonl", "samples.jsonl"):
        (run / name).write_text("".join(json.dumps({"step": s}) + "\n" for s in steps))


def logged_steps(run, name="metrics.jsonl"):
    return [json.loads(line)["step"] for line in (run / name).read_text().splitlines()]


def test_resume_before_the_first_checkpoint_starts_the_log_again(tmp_path):
    """A run killed in RL step 1, before any checkpoint, then resumed: its log once read
    [0, 0, 1, ...]."""
    write_log(tmp_path, [0])
    assert checkpoint.resume(tmp_path, model=None, opt=None) == 0
    assert logged_steps(tmp_path) == [] and logged_steps(tmp_path, "samples.jsonl") == []


def test_resume_keeps_the_steps_up_to_the_checkpoint(tmp_path, monkeypatch):
    write_log(tmp_path, range(7))
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "state.pt").write_bytes(b"")
    monkeypatch.setattr(checkpoint, "load_checkpoint", lambda ckpt, model, opt: 5)
    assert checkpoint.resume(tmp_path, model=None, opt=None) == 5
    assert logged_steps(tmp_path) == [0, 1, 2, 3, 4]


def test_interrupted_says_in_one_line_what_was_kept(tmp_path):
    line = checkpoint.interrupted(tmp_path)
    assert "no checkpoint and no SFT" in line and "\n" not in line
    (tmp_path / "sft").mkdir()
    assert checkpoint.interrupted(tmp_path).endswith(
        "keeps the SFT (sft/); RL starts again at step 1; rerun the same command with --resume to "
        "continue")
    (tmp_path / "checkpoint-9").mkdir()
    (tmp_path / "checkpoint-9" / "state.pt").write_bytes(b"")
    assert "keeps checkpoint-9 (RL goes on at step 11)" in checkpoint.interrupted(tmp_path)
