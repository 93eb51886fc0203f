"""The tiny policy of the offline demo: a 1.9M-parameter Qwen3 with random weights and a byte-level
BPE tokenizer trained on the built-in world's text (world.tokenizer_corpus), whose agent tags are
single tokens. Built once per machine into the cache folder (`.cache/`, or $AEPO_CACHE), named
after a hash of the code that makes it; `policy.load_policy("tiny")` loads it.

    python -m support.tiny      # build (or find) it and print its folder
"""
import ast
import hashlib
import os
import textwrap
from pathlib import Path

from support import data, world
from support.data import AGENT_TAGS


CACHE_DIR = Path(os.environ.get("AEPO_CACHE", Path(__file__).resolve().parents[1] / ".cache"))
TINY_VOCAB = 3072
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def code_hash(*sources: str) -> str:
    """12 hex digits naming what the sources compute: their syntax trees are hashed, so re-wrapping
    lines or editing comments keeps a cached artefact, while any change to the code renews it."""
    trees = "".join(ast.dump(ast.parse(textwrap.dedent(source))) for source in sources)
    return hashlib.sha256(trees.encode()).hexdigest()[:12]


def build_tiny(folder: str | Path | None = None, seed: int = 0) -> Path:
    """Build (once) and return the folder of the tiny policy: random Qwen3 weights + world
    tokenizer. The cached folder is named after a hash of the code that makes it (this file,
    world.py and data.py, whose texts are the tokenizer's corpus), so an edited world never meets a
    stale tokenizer."""
    recipe = code_hash(*(Path(f).read_text() for f in (__file__, world.__file__, data.__file__)))
    folder = Path(folder or CACHE_DIR / f"tiny-{recipe}-seed{seed}")
    if (folder / "config.json").exists() and (folder / "tokenizer.json").exists():
        return folder
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + AGENT_TAGS
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=specials, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(world.tokenizer_corpus(seed=seed), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", bos_token=None)
    tokenizer.chat_template = TINY_CHAT_TEMPLATE

    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=192, intermediate_size=512,
                         num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2,
                         head_dim=32, max_position_embeddings=1024, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None)
    return save_model_folder(folder, Qwen3ForCausalLM(config), tokenizer)


def save_model_folder(folder: Path, model, tokenizer) -> Path:
    """Save a model and its tokenizer to a temporary folder, then rename it: a folder under its
    final name is always complete, whichever of several processes building the same one finishes
    first."""
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, folder)
    except OSError:                          # another process finished the same build first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return folder


if __name__ == "__main__":
    print(build_tiny())
