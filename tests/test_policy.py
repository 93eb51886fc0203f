"""aepo.py and support/cli.py: the config and its presets, the tiny policy, hub-model errors, and
the 4-bit LoRA trap."""
import json
import time
import warnings

import pytest
import torch

import aepo
from aepo import Config
from engine import Sampling
from support import policy, tiny
from support.cli import parse_config
from support.data import AGENT_TAGS
from support.policy import load_policy, prompt_ids


def test_presets_algos_and_explicit_flags():
    cfg = parse_config(["--preset", "smoke", "--algo", "grpo", "--output_dir", "x"])
    assert (cfg.sft_steps, cfg.k, cfg.branching, cfg.clip_mode) == (30, 4, False, "ppo")
    cfg = parse_config(["--algo", "dapo", "--eps_high", "0.3", "--output_dir", "x"])
    assert cfg.eps_high == 0.3  # an explicit flag beats the preset
    cfg = parse_config(["--algo", "aepo", "--output_dir", "x"])
    assert ((cfg.pre_monitor, cfg.branch_penalty, cfg.entropy_adv_alpha, cfg.clip_mode)
            == (True, True, 0.2, "aepo"))
    # a switched-off boolean is explicit too: the algorithm preset does not switch it back on
    cfg = parse_config(["--algo", "aepo", "--no_branching", "--output_dir", "x"])
    assert (cfg.branching, cfg.pre_monitor) == (False, True)
    assert parse_config(["--algo", "grpo", "--branching", "true", "--output_dir", "x"]).branching
    assert parse_config([]).output_dir.startswith("runs/")
    with pytest.raises(SystemExit, match="--algo 'ppo2' is unknown"):
        parse_config(["--algo", "ppo2"])


def test_every_algo_preset_names_real_fields():
    fields = set(Config.__dataclass_fields__)
    for overrides in list(aepo.ALGOS.values()) + list(aepo.PRESETS.values()):
        assert set(overrides) <= fields


def test_save_config_round_trips(tmp_path):
    cfg = parse_config(["--preset", "smoke", "--output_dir", str(tmp_path)])
    aepo.save_config(cfg, tmp_path / "config.json")
    assert Config(**json.loads((tmp_path / "config.json").read_text())) == cfg


def test_tiny_policy_reloads_and_tags_are_single_tokens():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tiny.build_tiny()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.vocab_size == len(tok)
    for tag in AGENT_TAGS:
        assert len(tok.encode(tag, add_special_tokens=False)) == 1, tag
    for word in (" Vantor", " 1987", " 25"):  # lexicon words and years: one token
        assert len(tok.encode(word, add_special_tokens=False)) == 1, word
    assert set(Sampling.make(tok).tag_ids) == {tok.convert_tokens_to_ids("</search>"),
                                               tok.convert_tokens_to_ids("</python>")}
    ids = prompt_ids(tok, "Where was Abrin Quell born?", "sys")
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")


def test_load_policy_wraps_lora_on_all_linear_layers():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, _ = load_policy("tiny", lora_r=4)
    # peft's read of a deprecated transformers attribute is silenced at our call
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert any("mlp.down_proj" in n for n in names) and any("self_attn.q_proj" in n for n in names)
    bare, _ = load_policy("tiny", lora_r=0)
    assert all(p.requires_grad for p in bare.parameters())


def test_uncached_hub_model_offline_fails_fast_with_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    with pytest.raises(SystemExit, match="HF_HUB_OFFLINE=1"):
        load_policy("some-owner/not-a-cached-model")
    with pytest.raises(SystemExit, match="no such folder"):
        load_policy("not-a-folder-or-alias")
    assert time.time() - t0 < 5


def test_4bit_lora_gradients_survive_an_eval_forward():
    """The AVX512-BF16 trap: an eval-mode no_grad forward may repack Linear4bit weights on CPU and
    break later LoRA gradients. With the loader's fix, gradients after such a forward equal those of
    an identical model that never ran one."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    def make():
        torch.manual_seed(0)
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_compute_dtype=torch.float32)
        base = AutoModelForCausalLM.from_pretrained(tiny.build_tiny(), quantization_config=q,
                                                    device_map={"": "cpu"})
        model = policy._add_lora(base, "", r=4, alpha=8, trainable=True, kbit=True)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
        return model

    ids = torch.randint(20, 1000, (2, 24))
    grads = []
    for warm in (True, False):
        model = make()
        if warm:
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if "lora_" in n})
    for name, g in grads[0].items():
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name
        torch.testing.assert_close(g, grads[1][name])
