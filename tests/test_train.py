"""train.py end to end: smoke runs in a subprocess, resume equality, kill-safe checkpoints, and LoRA
gradients after a rollout."""
import copy
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import loss
import train
from aepo import Config
from loss import policy_loss, token_logprobs
from rollout import rollout
from support import checkpoint, data, sft, tiny, world
from support.cli import parse_config, resolve
from support.policy import load_policy, make_tools

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def sft_start(tmp_path_factory) -> Path:
    """A short SFT, shared by the RL tests below (they start from it with --init_from)."""
    run = tmp_path_factory.mktemp("sft")
    train.main(["--preset", "smoke", "--stage", "sft", "--output_dir", str(run)])
    return run / "sft"


@pytest.mark.parametrize("algo", ["aepo", "grpo"])
def test_smoke_run_writes_everything(tmp_path, algo):
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "train.py", "--preset", "smoke", "--algo", algo,
                          "--output_dir", str(run)], cwd=ROOT, env=ENV, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step 2/2 | reward" in out.stdout and "after RL" in out.stdout
    assert out.stdout.splitlines()[-1] == f"run folder: {run} (curves.png, report.md)"
    for name in ("config.json", "metrics.jsonl", "curves.png", "samples.jsonl", "report.md",
                 "sft/model.safetensors", "checkpoint-1/adapter_model.safetensors",
                 "checkpoint-1/state.pt", "eval-sft/summary.json", "eval-rl/examples.jsonl"):
        assert (run / name).exists(), name
    assert json.loads((run / "config.json").read_text())["algo"] == algo
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1]
    assert all(math.isfinite(v) for r in rows for v in r.values() if not isinstance(v, list))
    assert all(len(d) == 4 for r in rows for d in r["decisions"])   # [call, Delta H, l, children]
    if algo == "grpo":
        assert all(r["branches_per_q"] == 0 for r in rows)
    # report.py redraws it from the log
    (run / "curves.png").unlink()
    out = subprocess.run([sys.executable, "-m", "support.report", str(run)], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and (run / "curves.png").stat().st_size > 0, out.stderr[-2000:]


def _adapter(run: Path, step: int) -> dict:
    return load_file(run / f"checkpoint-{step}" / "adapter_model.safetensors")


def test_resume_ends_with_the_same_adapter(tmp_path, sft_start):
    common = ["--preset", "smoke", "--stage", "rl", "--init_from", str(sft_start),
              "--save_every", "1"]
    a, b = tmp_path / "a", tmp_path / "b"
    train.main(common + ["--steps", "4", "--output_dir", str(a)])
    train.main(common + ["--steps", "2", "--output_dir", str(b)])                 # "interrupted"
    train.main(common + ["--steps", "4", "--output_dir", str(b), "--resume"])
    wa, wb = _adapter(a, 3), _adapter(b, 3)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    ra = [json.loads(l) for l in open(a / "metrics.jsonl")]
    rb = [json.loads(l) for l in open(b / "metrics.jsonl")]
    assert [r["step"] for r in rb] == [0, 1, 2, 3]
    assert [r["reward"] for r in ra] == [r["reward"] for r in rb]


def test_sigkill_during_save_leaves_only_loadable_checkpoints(tmp_path):
    """Kill a process in the middle of writing checkpoint-1: checkpoint-0 stays complete and
    loadable, the half-written one is invisible, and the next save succeeds."""
    run, marker = tmp_path / "run", tmp_path / "marker"
    script = textwrap.dedent(f"""
        import time, torch
        from pathlib import Path
        import train
        from support.policy import load_policy
        torch.manual_seed(0)
        model, tok = load_policy("tiny", lora_r=4)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        run = Path({str(run)!r}); run.mkdir()
        train.save_checkpoint(run, 0, model, opt)
        real_save = torch.save
        def slow_save(*args, **kwargs):          # the adapter is written; state.pt is half done
            Path({str(marker)!r}).touch()
            time.sleep(120)
        torch.save = slow_save
        train.save_checkpoint(run, 1, model, opt)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=ENV)
    deadline = time.time() + 120
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert marker.exists(), "the child never reached the save"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [p.name for p in checkpoint.checkpoints(run)] == ["checkpoint-0"]
    model, _ = load_policy("tiny", lora_r=4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    assert checkpoint.load_checkpoint(run / "checkpoint-0", model, opt) == 1
    train.save_checkpoint(run, 1, model, opt)
    assert [p.name for p in checkpoint.checkpoints(run)] == ["checkpoint-0", "checkpoint-1"]


def test_killed_run_resumes_without_losing_or_repeating_steps(tmp_path, sft_start):
    run = tmp_path / "run"
    args = [sys.executable, "train.py", "--preset", "smoke", "--stage", "rl",
            "--init_from", str(sft_start), "--steps", "6", "--save_every", "1",
            "--output_dir", str(run)]
    proc = subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not checkpoint.checkpoints(run) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = checkpoint.checkpoints(run)
    assert done, "no checkpoint before the kill"
    out = subprocess.run(args + ["--resume"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    steps = [json.loads(l)["step"] for l in open(run / "metrics.jsonl")]
    assert steps == list(range(6))


def test_every_lora_parameter_gets_a_correct_gradient_after_a_rollout():
    """A rollout runs the model in eval mode under no_grad; afterwards every LoRA parameter must get
    a finite, non-zero gradient equal to that of a copy that never ran a rollout."""
    torch.manual_seed(0)
    model, tok = load_policy("tiny", lora_r=4)
    with torch.no_grad():                       # fresh LoRA has B = 0, which zeroes A's gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    twin = copy.deepcopy(model)
    cfg = Config(k=2, branching=False, pre_monitor=False, max_response_tokens=48)
    model.eval()
    res = rollout(model, tok,
                  ["Where was Abrin Quell born?", "Which company does Mirel Brask work for?"],
                  make_tools(cfg), cfg, seed=0, system_prompt=data.SHORT_SYSTEM_PROMPT)
    t = train.trajectory_tensors(res.trajectories, tok.pad_token_id, torch.device("cpu"))
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])[:, None] * t["loss_mask"]
    grads = []
    for m in (model, twin):
        m.train()
        logp = token_logprobs(m, t["ids"], t["attn"])
        loss, _ = policy_loss(logp, t["old_logp"], adv, t["loss_mask"], clip_mode="aepo")
        loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if "lora_" in n})
    assert grads[0] and grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name
        torch.testing.assert_close(g, grads[1][name])


def test_demo_tensors_mask_tool_results():
    from tools import result_block
    tok = load_policy("tiny", lora_r=0)[1]
    response = ("<think> x </think> <search> Abrin Quell </search>" + result_block("Page 1: hi")
                + " <think> y </think> <answer> The final answer is \\boxed{ Vantor} </answer>")
    demo = world.Demo(question="Q?", response=response, golds=("Vantor",), kind="1hop",
                      quality="good")
    ids, mask = sft.demo_tensors(tok, demo, "sys")
    assert len(ids) == len(mask) and ids[-1] == tok.eos_token_id and mask[-1] == 1
    decoded_masked = tok.decode([i for i, m in zip(ids, mask) if m == 0], skip_special_tokens=False)
    assert result_block("Page 1: hi") in decoded_masked
    assert "<answer>" not in decoded_masked and "Abrin" not in decoded_masked.split("assistant")[-1]


def test_accelerate_two_cpu_processes(tmp_path, sft_start):
    """Data parallel under `accelerate launch`: each process rolls out half the questions, DDP
    averages the gradients, the main process writes the logs and checkpoints. (In accelerate 1.15,
    `launch --cpu --num_processes 2` starts a single process; `--multi_gpu` starts two through
    torchrun, and on a machine without CUDA the script's Accelerator runs them on the CPU with
    gloo.)"""
    run = tmp_path / "run"
    accelerate = Path(sys.executable).parent / "accelerate"   # this environment's, not PATH's
    out = subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no",
                          "--dynamo_backend", "no", "train.py", "--preset", "smoke",
                          "--stage", "rl", "--init_from", str(sft_start),
                          "--questions_per_step", "4", "--output_dir", str(run)],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1] and all(r["processes"] == 2 for r in rows)
    assert (run / "checkpoint-1" / "adapter_model.safetensors").exists()


def test_non_finite_loss_skips_the_update(monkeypatch, sft_start):
    """A NaN loss must not reach the adapter: the update is skipped and counted."""
    from accelerate import Accelerator

    cfg = parse_config(["--preset", "smoke", "--output_dir", "unused"])
    model, tok = load_policy(str(sft_start), lora_r=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    real = train.policy_loss
    monkeypatch.setattr(train, "policy_loss",
                        lambda *a, **k: (real(*a, **k)[0] * float("nan"), real(*a, **k)[1]))
    rewards = iter(range(1000))                 # rewards that differ: the update must run
    monkeypatch.setattr(train.data, "reward", lambda text, golds: float(next(rewards)))
    metrics, _ = train.rl_step(model, tok, opt, world.load_examples("world:train")[:8],
                               make_tools(cfg), cfg, 0, Accelerator(cpu=True))
    assert metrics["skipped"] == cfg.mini_batches
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, before[n]), n


def test_trimmed_micro_batches_give_the_same_loss_and_gradient():
    """micro_batches cuts each micro-batch to its longest row; with right padding that changes
    nothing."""
    model, tok = _tiny_with_lora()
    seqs = [[5 + i % 50 for i in range(n)] for n in (30, 9, 12, 7)]
    trajs = [_trajectory(s) for s in seqs]
    t = train.trajectory_tensors(trajs, tok.pad_token_id, torch.device("cpu"))
    # grpo: AEPO's entropy z-scores would magnify float rounding (this random model's entropies
    # hardly vary)
    cfg, adv = (resolve(Config(algo="grpo", output_dir="unused")),
                torch.tensor([1.0, -0.5, 0.3, -1.0]))
    micro, short = next(train.micro_batches(t, torch.tensor([1, 2, 3, 0]), 2))
    assert micro.tolist() == [1, 2]
    # rows 1 and 2: prompt 2 + their responses
    assert short["ids"].shape == (2, 12 + 2)
    results = []
    for tensors in (short, {k: v[[1, 2]] for k, v in t.items()}):       # trimmed vs full width 32
        model.zero_grad()
        tensors = {**tensors, "adv": adv[[1, 2], None] * tensors["loss_mask"]}
        loss, _ = train.micro_batch_loss(model, tensors, cfg, _NoAccelerator())
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                        if p.grad is not None}))
    torch.testing.assert_close(results[0][0], results[1][0])
    assert results[0][1].keys() == results[1][1].keys() and results[0][1]
    for name, g in results[0][1].items():
        torch.testing.assert_close(g, results[1][1][name], rtol=1e-5, atol=1e-7)


def _tiny_with_lora():
    """The tiny model with LoRA adapters whose B is not 0, so that they carry a gradient."""
    torch.manual_seed(0)
    model, tok = load_policy("tiny", lora_r=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model, tok


def _trajectory(response: list[int]):
    from aepo import Trajectory
    t = Trajectory(question_idx=0, prompt_ids=[3, 7], traj_id=0)
    t.response_ids, t.loss_mask = list(response), [1] * len(response)
    t.logp = [-1.0 - 0.01 * i for i in range(len(response))]
    return t


class _NoAccelerator:
    @staticmethod
    def unwrap_model(model):
        return model


def test_token_budget_stops_rl_and_tensorboard_gets_every_row(tmp_path, sft_start):
    """--token_budget ends RL after the step that spends it (with a checkpoint), a resume past it
    adds no step, and --report_to tensorboard holds the same rows as metrics.jsonl."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    common = ["--preset", "smoke", "--stage", "rl", "--init_from", str(sft_start), "--steps", "5",
              "--save_every", "10", "--output_dir", str(run), "--report_to", "tensorboard"]
    probe = tmp_path / "probe"               # how many tokens the first step samples
    train.main(["--preset", "smoke", "--stage", "rl", "--init_from", str(sft_start), "--steps", "1",
                "--output_dir", str(probe)])
    first = json.loads(open(probe / "metrics.jsonl").readline())["sampled_tokens"]
    assert first > 0
    # step 1 leaves 1 token: one more step
    train.main(common + ["--token_budget", str(first + 1)])
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1]
    assert rows[0]["sampled_tokens_total"] == first
    assert rows[1]["sampled_tokens_total"] == first + rows[1]["sampled_tokens"] > first + 1
    assert [p.name for p in checkpoint.checkpoints(run)] == ["checkpoint-1"]
    train.main(common + ["--token_budget", str(first + 1), "--resume"])
    assert len(open(run / "metrics.jsonl").readlines()) == 2
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    for key in ("reward", "entropy", "sampled_tokens_total", "branch_top1_share"):
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        assert logged == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in rows], key


def test_cached_sft_is_built_once_and_renewed_when_its_code_changes(tmp_path, monkeypatch):
    built = []

    def fake_sft(cfg, run):
        built.append(run)
        (run / "sft").mkdir()
        (run / "sft" / "config.json").write_text("{}")
        return run / "sft"

    monkeypatch.setattr(tiny, "CACHE_DIR", tmp_path)
    monkeypatch.setattr(sft, "sft", fake_sft)
    cfg = Config(init_from="cached-sft")
    first = sft.cached_sft()
    assert train.rl_start(cfg, tmp_path / "run") == str(first) and len(built) == 1
    assert first.parent.name.startswith("sft-") and first.parent.parent == tmp_path
    # another recipe: another folder
    monkeypatch.setattr(sft, "Config", lambda: Config(sft_steps=7))
    assert sft.cached_sft() != first and len(built) == 2


def test_code_hash_ignores_layout_but_not_code():
    code = "def f(x):\n    # the rule\n    return x + 1\n"
    assert tiny.code_hash(code) == tiny.code_hash(
        "def f(x):  # reflowed\n    return (x\n            + 1)\n")
    assert tiny.code_hash(code) != tiny.code_hash(code.replace("+ 1", "- 1"))
    assert len(tiny.code_hash(code)) == 12


def test_class_preset_is_rl_from_the_cached_sft_with_a_token_budget():
    cfg = resolve(Config(preset="class", output_dir="x"), explicit={"preset"})
    assert (cfg.init_from, cfg.sft_dataset, cfg.stage) == ("cached-sft", "", "all")
    assert cfg.token_budget > 0 and cfg.eval_dataset == "world:heldout"


def test_report_to_a_missing_package_stops_in_one_line(monkeypatch, capsys):
    import importlib.util

    from support import cli
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(SystemExit, match=r"--report_to wandb: the wandb package is not installed "
                                         r"\(pip install wandb\); --report_to tensorboard works "
                                         r"offline"):
        cli.train_config(["--report_to", "wandb", "--output_dir", "x"])


def test_cached_sft_is_renewed_when_what_it_trains_on_changes(tmp_path, monkeypatch):
    """The start's key is what the SFT trains on (the demonstrations' ids and masks, the starting
    weights), the recipe and the SFT's code. A new version of the world's code that makes the same
    demonstrations keeps the start (its digest is computed again, once); one whose demonstrations
    differ builds a new start."""
    monkeypatch.setattr(tiny, "CACHE_DIR", tmp_path)
    monkeypatch.setattr(sft, "sft", lambda cfg, run: (run / "sft").mkdir() or
                        (run / "sft" / "config.json").write_text("{}"))
    rows = [([1, 2, 3], [0, 1, 1])]
    monkeypatch.setattr(sft, "sft_rows", lambda cfg, tok: rows)
    first = sft.cached_sft()
    edited = tmp_path / "world.py"                     # new code, the same demonstrations
    edited.write_text(Path(world.__file__).read_text() + "\nUNUSED = 1\n")
    monkeypatch.setattr(world, "__file__", str(edited))
    assert sft.cached_sft() == first
    assert len(json.loads((tmp_path / "sft-digests.json").read_text())) == 2
    edited.write_text(edited.read_text() + "UNUSED_TOO = 2\n")     # and demonstrations that differ
    rows[0] = ([1, 2, 4], [0, 1, 1])
    assert sft.cached_sft() != first


def test_a_new_run_does_not_write_into_an_old_runs_log(tmp_path):
    from support import cli

    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n')
    with pytest.raises(SystemExit, match="already holds an RL run .* pass --resume to continue it"):
        cli.train_config(["--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="--init_from cached-sft is the tiny policy's SFT start"):
        cli.train_config(["--preset", "class", "--model", "smollm2-135m", "--output_dir",
                          str(tmp_path / "new")])


def test_cached_sft_survives_edits_to_the_rl_losses(tmp_path, monkeypatch):
    """Students implement advantages and surrogates in loss.py: that must not rebuild the SFT
    start."""
    monkeypatch.setattr(tiny, "CACHE_DIR", tmp_path)
    monkeypatch.setattr(sft, "sft", lambda cfg, run: (run / "sft").mkdir() or
                        (run / "sft" / "config.json").write_text("{}"))
    first = sft.cached_sft()
    edited = tmp_path / "loss.py"                      # loss.py with an RL loss rewritten
    edited.write_text(Path(loss.__file__).read_text().replace("return centred / (std + eps)",
                                                           "return centred"))
    monkeypatch.setattr(loss, "__file__", str(edited))
    assert sft.cached_sft() == first


@pytest.mark.parametrize("algo", ["aepo", "grpo"])
def test_grad_accum_does_not_change_the_update(algo):
    """The entropy-aware advantage is fixed over the step's batch before the update, so splitting a
    mini-batch into 4 micro-batches gives the same LoRA gradient as 1 (arXiv 2510.14545, eq. 12;
    standardising z within each micro-batch would not: a confident and an uncertain row with the
    same A would get the same weights)."""
    model, tok = _tiny_with_lora()
    gen = torch.Generator().manual_seed(1)
    trajs = []
    for n, scale in zip((12, 9, 14, 7), (0.1, 2.0, 0.5, 1.5)):     # rows of different entropy
        t = _trajectory([5 + (3 * i) % 50 for i in range(n)])
        t.entropy = (scale * torch.rand(n, generator=gen)).tolist()
        trajs.append(t)
    tensors = train.trajectory_tensors(trajs, tok.pad_token_id, torch.device("cpu"))
    cfg = resolve(Config(algo=algo, output_dir="unused"))
    tensors["adv"] = train.token_advantages(torch.tensor([1.0, 1.0, -0.5, 0.3]), tensors, cfg)
    grads = []
    for accum in (1, 4):
        model.zero_grad()
        train.accumulate(model, tensors, torch.arange(4), dataclasses.replace(cfg, grad_accum=accum),
                         _Accelerator())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], rtol=1e-4, atol=1e-7)


class _Accelerator(_NoAccelerator):
    @staticmethod
    def backward(loss):
        loss.backward()


def test_a_step_whose_advantages_are_all_zero_runs_no_update(monkeypatch, sft_start):
    """Equal rewards in every group: nothing to learn, so no forward or backward pass runs; the step
    is counted (zero_adv_step) and the adapter is unchanged."""
    from accelerate import Accelerator

    cfg = parse_config(["--preset", "smoke", "--output_dir", "unused"])
    model, tok = load_policy(str(sft_start), lora_r=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    monkeypatch.setattr(train.data, "reward", lambda text, golds: 0.5)
    monkeypatch.setattr(train, "micro_batch_loss", lambda *a, **k: pytest.fail("an update ran"))
    metrics, _ = train.rl_step(model, tok, opt, world.load_examples("world:train")[:8],
                               make_tools(cfg), cfg, 0, Accelerator(cpu=True))
    assert metrics["zero_adv_step"] == 1 and metrics["reward"] == 0.5
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, before[n]), n
