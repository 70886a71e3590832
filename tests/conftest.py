"""Shared fixtures.

- ``tiny_tokenizer``: a character-level fast tokenizer built offline (ids 0-2 are <unk>, <s>, </s>;
  printable ASCII, newline and tab follow; like Llama tokenizers it prepends <s> when
  ``add_special_tokens`` is on).
- ``tiny_llama``: ``(model, tokenizer)``, a tiny random Llama (vocab 128, 2 layers) in eval mode.
- ``tiny_llama_dir``: that pair saved as a Hugging Face directory (safetensors).
- ``word_corpus``: a small .txt corpus (40 paragraphs of seeded random words) for the text-file loader.
- ``embedded``: ``(model, tokenizer)`` of the real embedded SmolLM2, loaded once per session; for
  tests marked ``@pytest.mark.integration`` only. Do not modify it in place (prune a deep copy).
"""

from __future__ import annotations

import pytest
import torch

TINY_CHARS = [chr(i) for i in range(32, 127)] + ["\n", "\t"]


def _tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<unk>", "<s>", "</s>", *TINY_CHARS])}
    # BPE without merges and without a pre-tokenizer = one token per character, spaces included.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture
def tiny_tokenizer():
    return _tiny_tokenizer()


@pytest.fixture
def tiny_llama():
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                         pad_token_id=None, use_cache=False)
    model = AutoModelForCausalLM.from_config(config).eval()
    return model, _tiny_tokenizer()


@pytest.fixture
def tiny_llama_dir(tiny_llama, tmp_path):
    model, tokenizer = tiny_llama
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def word_corpus(tmp_path):
    import random

    rng = random.Random(0)
    words = ["the", "river", "model", "quiet", "stone", "light", "paper", "north", "green", "seven"]
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(60)) for _ in range(40)))
    return path


@pytest.fixture(scope="session")
def embedded():
    from mixsparse.loading import load_model

    return load_model("embedded")
