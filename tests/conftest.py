"""Shared fixtures.

- ``tiny_tokenizer``: a character-level fast tokenizer built offline (ids 0-2 are <unk>, <s>, </s>;
  printable ASCII, newline and tab follow; like Llama tokenizers it prepends <s> when
  ``add_special_tokens`` is on).
- ``tiny_llama``: ``(model, tokenizer)``, a tiny random Llama (vocab 128, 2 layers) in eval mode.
- ``tiny_llama_dir``: that pair saved as a Hugging Face directory (safetensors).
- ``quick_cli``: a function giving the CLI arguments of a seconds-long run on those two.
- ``word_corpus``: a small .txt corpus (40 paragraphs of seeded random words) for the text-file loader.
- ``embedded``: ``(model, tokenizer)`` of the real embedded SmolLM2, loaded once per session; for
  tests marked ``@pytest.mark.integration`` only. Do not modify it in place (prune a deep copy).
"""

from __future__ import annotations

import os

import pytest


def pytest_configure(config):
    # The sparse runtime's Triton kernels run here on the CPU, in Triton's interpreter
    # (tests/test_runtime_triton.py); triton reads this when imported, so it is set before any test runs. A
    # real accelerator (MIXSPARSE_TEST_DEVICE=cuda, the GPU check) compiles them instead.
    if not os.environ.get("MIXSPARSE_TEST_DEVICE", "").startswith("cuda"):
        os.environ.setdefault("TRITON_INTERPRET", "1")

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
    from .tiny import tiny_model

    return tiny_model("llama", bos_token_id=1, eos_token_id=2, pad_token_id=None, use_cache=False), _tiny_tokenizer()


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


@pytest.fixture
def quick_cli(tiny_llama_dir, word_corpus):
    """``quick_cli(sparsity=0.5, calib_samples=4, report=True)``: CLI arguments of a seconds-long uniform
    run on the tiny model and the word corpus (calibration, validation and test text alike)."""

    def args(sparsity: float = 0.5, calib_samples: int = 4, report: bool = True) -> list[str]:
        c = str(word_corpus)
        return ["--model", str(tiny_llama_dir), "--calibration", c, "--set", f"data.validation={c}",
                "--set", f"data.evaluation={c}", "--calib-samples", str(calib_samples), "--seqlen", "32",
                "--eval-tokens", "64", "--set", "eval.zeroshot=[]", "--sparsity", str(sparsity), "--quiet",
                "--device", "cpu", *([] if report else ["--set", "export.report=false"])]

    return args
