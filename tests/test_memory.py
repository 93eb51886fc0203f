"""The GPU recipe and its memory plan: which recipe a model gets, the CPU stop, the micro-batched
old log-prob recompute, and support/memory.py's accounting against a real model's parameters and
saved tensors."""
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

import train
from aepo import Config, Trajectory
from loss import token_logprobs
from support import memory
from support.cli import parse_config, resolve

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9

# --------------------------------------------------------------------------------------------------
# Recipe selection


@pytest.fixture
def cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


@pytest.mark.parametrize("model", ["Qwen3-1.7B", "Qwen/Qwen3-4B", "qwen3-0.6b"])
def test_a_qwen3_model_picks_the_gpu_recipe(cuda, capsys, model):
    cfg = parse_config(["--model", model, "--output_dir", "x"])
    assert (cfg.preset, cfg.model, cfg.load_in_4bit, cfg.system_prompt, cfg.search) == (
        "qwen3-1.7b", model, True, "paper", "web")
    line = capsys.readouterr().out.strip().splitlines()[0]
    assert line == (f"recipe: qwen3-1.7b (--model {model} is a {model.split('/')[-1][:5]} model "
                    "and no --preset was given)")


def test_an_explicit_preset_or_another_model_keeps_its_recipe(cuda, capsys):
    cfg = parse_config(["--model", "Qwen3-1.7B", "--preset", "tiny", "--output_dir", "x"])
    assert (cfg.preset, cfg.load_in_4bit, cfg.system_prompt) == ("tiny", False, "short")
    assert capsys.readouterr().out.startswith("recipe: tiny (--preset given)")
    assert parse_config(["--output_dir", "x"]).preset == "tiny"
    assert parse_config(["--model", "Qwen2.5-3B-Instruct", "--output_dir", "x"]).preset == "tiny"
    assert resolve(Config(preset="smoke", output_dir="x")).steps == 2  # a preset set in code stays


def test_train_and_eval_pick_the_same_recipe_and_prompt(cuda):
    import eval as ev
    from support.policy import system_prompt_for

    _, ecfg = ev.parse_args(["--dataset", "world:heldout", "--model", "Qwen3-1.7B"])
    tcfg = parse_config(["--model", "Qwen3-1.7B", "--output_dir", "x"])
    assert ecfg.preset == tcfg.preset == "qwen3-1.7b"
    assert system_prompt_for(ecfg) == system_prompt_for(tcfg)
    # not a Qwen3
    _, ecfg = ev.parse_args(["--dataset", "world:heldout", "--model", "smollm2-135m"])
    tcfg = parse_config(["--model", "smollm2-135m", "--output_dir", "x"])
    assert (ecfg.preset, ecfg.system_prompt) == (tcfg.preset, tcfg.system_prompt)


def test_the_gpu_recipe_stops_in_one_line_without_cuda(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "train.py", "--model", "Qwen3-1.7B",
                           "--output_dir", str(run)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1
    assert "recipe: qwen3-1.7b (--model Qwen3-1.7B is a Qwen3 model" in proc.stdout
    message = [l for l in proc.stderr.splitlines() if "recipe qwen3-1.7b" in l]
    assert len(message) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert ("needs a CUDA GPU" in message[0] and "--preset tiny" in message[0]
            and "smollm2-135m" in message[0])
    assert not run.exists()


# --------------------------------------------------------------------------------------------------
# The old log-prob recompute, micro-batched


def tiny_qwen3(layers=2, vocab=96):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    return Qwen3ForCausalLM(Qwen3Config(vocab_size=vocab, hidden_size=64, intermediate_size=192,
                                        num_hidden_layers=layers, num_attention_heads=4,
                                        num_key_value_heads=2, head_dim=32)).eval()


def test_recompute_old_logp_runs_in_micro_batches_and_equals_one_forward():
    model = tiny_qwen3()
    gen = torch.Generator().manual_seed(0)
    trajs = []
    for i, n in enumerate([5, 17, 9, 30, 12, 3]):
        t = Trajectory(question_idx=i // 2,
                       prompt_ids=torch.randint(1, 96, (4 + i,), generator=gen).tolist())
        t.response_ids = torch.randint(1, 96, (n,), generator=gen).tolist()
        t.loss_mask, t.logp = [1] * n, [-9.0] * n
        trajs.append(t)
    tensors = train.trajectory_tensors(trajs, 0, torch.device("cpu"))
    rows = []
    hook = model.model.register_forward_pre_hook(
        lambda m, a, kw: rows.append(kw["input_ids"].shape), with_kwargs=True)
    old = train.recompute_old_logp(model, tensors, n=3)                                    # (B, T)
    hook.remove()
    assert [r[0] for r in rows] == [2, 2, 2]
    # rows by length (9, 12 | 15, 20 | 22, 37), each cut to its longest
    assert [r[1] for r in rows] == [12, 20, 37]
    with torch.no_grad():
        want = token_logprobs(model, tensors["ids"], tensors["attn"])
    mask = tensors["loss_mask"] > 0
    assert_close(old[mask], want[mask], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# support/memory.py's accounting


SMALL = memory.Shape(layers=2, hidden=64, intermediate=192, heads=4, kv_heads=2, head_dim=32,
                     vocab=96)


def test_param_counts_match_a_real_qwen3_with_lora():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_qwen3(), LoraConfig(r=8, target_modules="all-linear"))
    linear, embedding, lora = memory.param_counts(SMALL, 8)
    named = dict(model.named_parameters())
    assert lora == sum(p.numel() for n, p in named.items() if "lora_" in n)
    assert linear == sum(p.numel() for n, p in named.items() if "base_layer" in n)
    assert embedding == model.get_input_embeddings().weight.numel()
    # KV B/token
    assert memory.SHAPES["qwen3-1.7b"].layers * 2 * memory.SHAPES["qwen3-1.7b"].kv * 2 == 114688


def saved_bytes(layers: int, dtype: torch.dtype, T: int = 64) -> int:
    """Bytes of the distinct tensors autograd saves in the backbone's forward (parameters
    excluded)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_qwen3(layers).to(dtype),
                           LoraConfig(r=8, target_modules="all-linear")).train()
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.get_base_model().model(input_ids=torch.randint(0, 96, (1, T)))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in params)


@pytest.mark.parametrize("dtype,d", [(torch.float32, 4), (torch.bfloat16, 2)])
def test_layer_bytes_are_what_autograd_saves_per_layer(dtype, d):
    per_layer = (saved_bytes(2, dtype) - saved_bytes(1, dtype)) / 64                     # per token
    assert per_layer == pytest.approx(memory.layer_bytes(SMALL, d, 8), rel=0.02)


def qwen3_recipe():
    """The Qwen3 recipe as a 24-39 GB GPU runs it: rollout_questions 0 picks 1 question there."""
    cfg = resolve(Config(model="Qwen3-1.7B", output_dir="x"), {"model"}, device_check=False)
    assert cfg.rollout_questions == 0
    n = memory.rollout_questions_for(cfg, 24 * GB)
    assert n == 1
    return dataclasses.replace(cfg, rollout_questions=n)


def test_the_gpu_recipe_fits_24gb_by_the_upper_bound_and_the_knobs_matter():
    cfg = qwen3_recipe()
    shape = memory.model_shape(cfg.model)
    e = memory.estimate(shape, cfg)
    assert e["peak"] < e["bound"] <= 24 * GB                  # the README's claim: 24 GB, not 12
    assert e["bound"] > 16 * GB
    assert cfg.recompute_old_logp and e["peak_recompute"] > 0
    whole = Config(**{**cfg.__dict__, "rollout_questions": 0})  # all 4 questions at once
    assert memory.estimate(shape, whole)["peak"] > 24 * GB
    no_gc = Config(**{**cfg.__dict__, "gradient_checkpointing": False})
    assert memory.estimate(shape, no_gc)["peak_update"] > 24 * GB


def test_the_upper_bound_adds_filler_reserve_prefill_allocator_and_context():
    """Hand-computed on a small shape: 2 questions x k=2 rows of 100 + 60 tokens, segments of 32,
    tool results of 2 x 40 / 4 = 20 tokens (fed at once: the 100-token prompt)."""
    cfg = Config(model="x", output_dir="x", k=2, questions_per_step=2, rollout_questions=2,
                 max_prompt_tokens=100, max_response_tokens=60, segment_tokens=32, top_k=2,
                 snippet_chars=40, lora_r=8, recompute_old_logp=False)
    e = memory.estimate(SMALL, cfg, cuda_overhead_gb=0)   # the typical figure's allowance off
    rows, width = 4, 256 + 32 + 256                     # ceil(160 x 1.6) = 256 columns, + reserve
    kv = rows * width * 2 * 2 * 64 * 2                  # layers x (K, V) x kv width x bf16
    assert e["kv_cache_bound"] == kv
    prefill = rows * (2 * 4 * width * 32 * 2 + 100 * width * 3)   # repeated K, V; mask bool + bf16
    assert e["prefill_transient_bound"] == prefill
    forward = (rows * 100 * memory.forward_bytes(SMALL, 2) + rows * width * 2 * 64 * 2
               + rows * 96 * 3 * 4 + prefill)
    state = e["weights"] + e["lora"] + e["adamw"]
    assert e["bound_rollout"] == pytest.approx((state + kv + forward) * 1.3 + 0.5 * GB)
    assert e["bound_recompute"] == 0.0
    assert e["bound"] == max(e["bound_rollout"], e["bound_update"])
    with_allowance = memory.estimate(SMALL, cfg)               # 1 GB allowance: over the bound's
    assert with_allowance["bound"] == with_allowance["peak"] > e["bound"]


def test_rollout_questions_is_the_most_that_fit_the_free_memory():
    cfg = qwen3_recipe()
    shape = memory.model_shape(cfg.model)
    bounds = [memory.estimate(shape, Config(**{**cfg.__dict__, "rollout_questions": n}))["bound"]
              for n in (1, 2, 3, 4)]
    assert bounds == sorted(bounds)
    assert memory.rollout_questions_for(cfg, 139 * GB) == 4                  # an H200: one batch
    assert memory.rollout_questions_for(cfg, 24 * GB) == 1
    assert memory.rollout_questions_for(cfg, (bounds[1] + bounds[2]) / 2) == 2
    assert memory.rollout_questions_for(cfg, 8 * GB) == 1                    # never 0
    line = memory.rollout_questions_line(cfg, 8 * GB)
    assert line.startswith("rollout_questions: 1 of 4") and "does NOT fit" in line
    assert "does NOT fit" not in memory.rollout_questions_line(cfg, 139 * GB)


def test_memory_cli_prints_the_table(capsys):
    memory.main(["--gpu_gb", "24", "12"])
    out = capsys.readouterr().out
    assert "recipe: qwen3-1.7b" in out and "| fits 24 GB | yes" in out
    assert "| fits 12 GB | NO" in out
    assert "| **bound (upper bound)** |" in out
    assert "| fits 16 GB |" not in out
