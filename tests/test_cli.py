"""support/cli.py: every bad command line of train.py and eval.py stops before any work, in a
subprocess as a user runs it: one line on stderr, exit status 1, no traceback, little CPU time, torch
never imported, and nothing written (neither in the working folder nor in the model cache)."""
import dataclasses
import json
import os
import subprocess
import sys
import time
import typing
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from aepo import ALGOS, PRESETS, Config
from support import cli
from support.cli import field_errors

ROOT = Path(__file__).resolve().parents[1]
ROW = json.dumps({"question": "q", "answer": "a"}) + "\n"
FILES = {  # prepared in every case's working folder
    "afile": "not a folder\n", "empty.jsonl": "", "ok.jsonl": ROW,
    "latin.jsonl": b'{"question": "caf\xe9", "answer": "a"}\n',
    "int_question.jsonl": json.dumps({"question": 7, "answer": "a"}) + "\n",
    "bool_answer.jsonl": json.dumps({"question": "q", "answer": True}) + "\n",
    "folder.jsonl/": None, "plain_folder/": None,
}
TRAIN, EVAL = "train.py", "eval.py"
# (script, arguments, what the one line must say): each runs as a user runs it, in a subprocess
CASES = [
    (TRAIN, ["--k", "0"], "error: --k 0: must be at least 1 ([k] trajectories per question"),
    (TRAIN, ["--k", "-3"], "error: --k -3: must be at least 1"),
    (TRAIN, ["--lr", "nan"], "error: --lr nan: must be a finite number (AdamW learning rate"),
    (TRAIN, ["--steps", "-1"], "error: --steps -1: must be at least 1"),
    (TRAIN, ["--stage", "bogus"], "error: argument --stage: invalid choice: 'bogus' (choose from"),
    (TRAIN, ["--search", "bogus"], "error: argument --search: invalid choice: 'bogus'"),
    (TRAIN, ["--bogus", "1"],
     "error: unknown arguments --bogus 1 (python train.py --help lists the flags)"),
    (TRAIN, ["--dataset", "missing.jsonl"], "error: --dataset: missing.jsonl: no such file"),
    (TRAIN, ["--eval_dataset", "empty.jsonl"],
     "error: --eval_dataset: empty.jsonl: no rows (the file is empty"),
    (TRAIN, ["--sft_dataset", "latin.jsonl"],
     "error: --sft_dataset: latin.jsonl line 1: not UTF-8 (byte 0xe9"),
    (TRAIN, ["--resume"],
     "error: --resume: run holds no checkpoint-<step>/ or sft/ to continue from"),
    (TRAIN, ["--output_dir", "afile"], "error: --output_dir afile is a file"),
    (TRAIN, ["--model", "./missing_folder"], "error: --model ./missing_folder: no such folder"),
    (EVAL, ["--dataset", "ok.jsonl", "--runs", "0"], "error: --runs 0: must be at least 1"),
    (EVAL, ["--dataset", "ok.jsonl", "--limit", "-1"], "error: --limit -1: must be at least 0"),
    (EVAL, ["--dataset", "ok.jsonl", "--temperature", "nan"],
     "error: --temperature nan: must be a finite number"),
    (EVAL, ["--dataset", "ok.jsonl", "--adapter", "missing_adapter"],
     "error: --adapter missing_adapter: no such folder"),
]
MORE = [  # the same checks, called in this process (a subprocess each would cost a second of CPU)
    (TRAIN, ["--k", "two"], "error: argument --k: invalid int value: 'two' ("),
    (TRAIN, ["--stpes", "3"], "error: unknown arguments --stpes 3"),
    (TRAIN, ["--dataset", "./missing_data"],
     "error: --dataset: ./missing_data: no such file or folder"),
    (TRAIN, ["--dataset", "folder.jsonl"],
     "error: --dataset: folder.jsonl is a directory, not a .jsonl file"),
    (TRAIN, ["--dataset", "plain_folder"], "error: --dataset: plain_folder is a directory"),
    (TRAIN, ["--dataset", "int_question.jsonl"],
     "int_question.jsonl line 1: the question ('question') is an int (7)"),
    (TRAIN, ["--dataset", "bool_answer.jsonl"],
     "bool_answer.jsonl line 1: the answer ('answer') is a boolean (True)"),
    (TRAIN, ["--init_from", "../nowhere"], "error: --init_from ../nowhere: no such folder"),
    (TRAIN, ["--search_corpus", "corpus.jsonl"],
     "error: --search_corpus corpus.jsonl: no such file"),
    (EVAL, ["--dataset", "ok.jsonl", "--adapter", "plain_folder"],
     "plain_folder: is not a PEFT adapter folder"),
    (EVAL, [], "error: give at least one --dataset"),
    (EVAL, ["--dataset", "ok.jsonl", "--top_p", "0"],
     "error: --top_p 0.0: must be above 0 (Nucleus sampling"),
    (EVAL, ["--dataset", "ok.jsonl", "--top_p", "1.5"], "error: --top_p 1.5: must be at most 1"),
    (EVAL, ["--dataset", "world:test"], "error: --dataset: unknown world split 'world:test'"),
    (EVAL, ["--dataset", "empty.jsonl"], "error: --dataset: empty.jsonl: no rows"),
    (EVAL, ["--dataset", "ok.jsonl", "--output_dir", "afile"],
     "error: --output_dir afile is a file"),
    (EVAL, ["--dataset", "ok.jsonl", "--judge_model", "./judge"],
     "error: --judge_model ./judge: no such folder"),
    (EVAL, ["--dataset", "ok.jsonl", "--bogus"], "error: unknown arguments --bogus"),
]


def _prepare(folder: Path) -> dict[str, tuple]:
    """The case's working folder with FILES and a torch that fails on import; returns its
    snapshot."""
    for name, content in FILES.items():
        if content is None:
            (folder / name).mkdir(parents=True)
        elif isinstance(content, bytes):
            (folder / name).write_bytes(content)
        else:
            (folder / name).write_text(content)
    (folder / "poison" / "torch").mkdir(parents=True)
    (folder / "poison" / "torch" / "__init__.py").write_text(
        "raise ImportError('torch was imported before the command line was checked')\n")
    return _snapshot(folder)


def _snapshot(folder: Path) -> dict[str, tuple]:
    return {str(p.relative_to(folder)): (p.is_dir(), p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if "__pycache__" not in p.parts}


def _run(case: int, folder: Path) -> dict:
    script, args, _ = CASES[case]
    argv = ([sys.executable, str(ROOT / script), *args]
            + (["--output_dir", "run"] if "--output_dir" not in args else []))
    env = {**os.environ, "PYTHONPATH": str(folder / "poison"), "AEPO_CACHE": str(folder / "cache"),
           "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=folder, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    out, err = proc.stdout.read(), proc.stderr.read()   # a line or two: no pipe fills up
    _, status, usage = os.wait4(proc.pid, 0)            # this child's own CPU time
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc.stdout.close(), proc.stderr.close()
    return dict(rc=proc.returncode, out=out, err=err, wall=time.perf_counter() - start,
                cpu=usage.ru_utime + usage.ru_stime)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every case at once (each in its own folder), four at a time: the table costs about a minute
    of CPU, not of waiting."""
    folders = [tmp_path_factory.mktemp(f"case{i}") for i in range(len(CASES))]
    before = [_prepare(folder) for folder in folders]
    with ThreadPoolExecutor(max_workers=4) as pool:
        runs = list(pool.map(_run, range(len(CASES)), folders))
    for run, folder, snapshot in zip(runs, folders, before):
        run["written"] = sorted(set(_snapshot(folder).items()) ^ set(snapshot.items()))
    return runs


@pytest.mark.parametrize("case", range(len(CASES)),
                         ids=[f"{s[:-3]} {' '.join(a)}" for s, a, _ in CASES])
def test_bad_input_stops_at_once_with_one_line(results, case):
    run, expected = results[case], CASES[case][2]
    lines = run["err"].splitlines()
    assert len(lines) == 1 and expected in lines[0], run["err"][-2000:]
    assert lines[0].startswith("error: ") and "Traceback" not in run["err"] + run["out"]
    assert run["rc"] == 1
    assert run["written"] == []                  # no run folder, no config.json, no model cache
    assert run["cpu"] < 5.0                      # measured ~1 s: the parser and the data, no torch


@pytest.mark.parametrize("script, args, expected", MORE,
                         ids=[f"{s[:-3]} {' '.join(a)}" for s, a, _ in MORE])
def test_more_bad_input_in_process(tmp_path, monkeypatch, capsys, script, args, expected):
    monkeypatch.chdir(tmp_path)
    before = _prepare(tmp_path)
    check = cli.train_config if script == TRAIN else lambda argv: cli.eval_config(argv)
    with pytest.raises(SystemExit) as stop:
        check(args + (["--output_dir", "run"] if "--output_dir" not in args else []))
    assert expected in str(stop.value.code) and len(str(stop.value.code).splitlines()) == 1
    assert capsys.readouterr().err == "" and _snapshot(tmp_path) == before


def test_the_table_is_fast_in_wall_time_too(results):
    """A loose bound: the cases ran four at a time on a shared machine."""
    assert max(r["wall"] for r in results) < 30.0, [round(r["wall"], 1) for r in results]


def test_a_good_command_line_passes_the_checks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ok.jsonl").write_text(ROW)
    cfg = cli.train_config(["--dataset", "ok.jsonl", "--eval_limit", "3", "--output_dir", "run"])
    assert ((cfg.dataset, cfg.eval_limit, cfg.stage) == ("ok.jsonl", 3, "all")
            and not Path("run").exists())
    (tmp_path / "run" / "sft").mkdir(parents=True)
    # after SFT, before a checkpoint
    assert cli.train_config(["--output_dir", "run", "--resume"]).resume
    args, cfg, examples = cli.eval_config(["--dataset", "ok.jsonl", "--dataset", "world:heldout",
                                           "--limit", "2", "--runs", "3"])
    assert (args.runs == 3
            and [e.source for e in examples] == ["ok", "world:heldout", "world:heldout"])


def test_every_preset_and_algorithm_is_a_valid_config():
    assert field_errors(Config()) == []
    for preset in PRESETS:
        for algo in ALGOS:
            assert (field_errors(dataclasses.replace(Config(), **PRESETS[preset], **ALGOS[algo]))
                    == []), (preset, algo)


def test_field_errors_name_every_bad_field_at_once():
    bad = Config(k=0, lr=float("inf"), tau=1.5, eval_top_p=0.0, clip_mode="ppo2", call_limit=-1)
    assert sorted(field_errors(bad)) == sorted([
        "--k 0: must be at least 1 ([k] trajectories per question (group size))",
        "--call_limit -1: must be at least 0 (Tool calls per trajectory (then forced EOS))",
        "--tau 1.5: must be at most 1 ([tau] branch threshold)",
        "--clip_mode ppo2: must be one of ppo | gppo | cispo | aepo",
        "--lr inf: must be a finite number (AdamW learning rate on LoRA parameters)",
        "--eval_top_p 0.0: must be above 0 (Eval nucleus sampling)"])


def test_a_bound_declared_on_a_field_is_enforced_and_shown_in_help():
    """Every bound in a field's metadata is checked, a preset cannot slip past it, and --help
    shows it: the field is the one place a flag is declared."""
    bounded = [f for f in dataclasses.fields(Config) if {"min", "max", "positive"} & set(f.metadata)]
    assert len(bounded) > 30
    for f in bounded:
        edge = (f.metadata["min"] - 1 if "min" in f.metadata
                else f.metadata["max"] + 1 if "max" in f.metadata else 0)
        bad = dataclasses.replace(Config(), **{f.name: f.type == "int" and int(edge) or edge})
        assert [e.split(":")[0] for e in field_errors(bad)] == [f"--{f.name} {getattr(bad, f.name)}"]

    @dataclasses.dataclass
    class Flags:
        n: int = dataclasses.field(default=2, metadata={"help": "Things.", "min": 2, "max": 5})
        mode: typing.Literal["a", "b"] = "a"

    assert field_errors(Flags(n=1)) == ["--n 1: must be at least 2 (Things)"]
    assert field_errors(Flags(n=6, mode="c")) == ["--n 6: must be at most 5 (Things)",
                                                  "--mode c: must be one of a | b"]
    assert "Things. (at least 2, at most 5)" in " ".join(cli.FlagParser(Flags).format_help().split())
    with pytest.raises(SystemExit, match="--mode: invalid choice: 'c'"):
        cli.FlagParser(Flags).parse_args_into_dataclasses(args=["--mode", "c"])
    (flags,) = cli.FlagParser(Flags).parse_args_into_dataclasses(args=["--mode", "b", "--n", "9"])
    assert (flags.mode, field_errors(flags)) == ("b", ["--n 9: must be at most 5 (Things)"])


def test_a_choice_parses_and_a_preset_is_checked_against_it(monkeypatch):
    cfg = cli.parse_config(["--clip_mode", "cispo", "--output_dir", "x"])
    assert cfg.clip_mode == "cispo"
    monkeypatch.setitem(PRESETS, "broken", {"step_entropy": "middle", "k": 0})
    with pytest.raises(SystemExit) as stop:
        cli.parse_config(["--preset", "broken", "--output_dir", "x"])
    assert str(stop.value.code) == ("error: --k 0: must be at least 1 ([k] trajectories per "
                                    "question (group size)); --step_entropy middle: must be one "
                                    "of after_result | before_result")


def test_smollm2_gets_its_cpu_recipe_and_explicit_flags_win(capsys):
    cfg = cli.parse_config(["--model", "smollm2-135m", "--output_dir", "x"])
    assert (cfg.preset, cfg.load_in_4bit, cfg.top_k, cfg.eval_limit, cfg.eval_runs) == (
        "smollm2-135m", False, 1, 64, 4)
    assert capsys.readouterr().out.splitlines()[0] == (
        "recipe: smollm2-135m (--model smollm2-135m is a smollm2 model and no --preset was given)")
    assert cli.parse_config(["--model", "smollm2-135m", "--lr", "1e-4", "--output_dir", "x"]).lr == 1e-4
