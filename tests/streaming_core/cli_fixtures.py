"""A tiny random Llama with a tiny trained tokenizer, saved as a transformers directory, and a short text."""

from __future__ import annotations

import random
from pathlib import Path

from .helpers import tiny_llama

WORDS = [
    "the",
    "sink",
    "keeps",
    "first",
    "tokens",
    "while",
    "window",
    "slides",
    "over",
    "recent",
    "text",
    "and",
    "model",
    "reads",
    "stream",
]


def make_text(n_words: int = 400, seed: int = 0) -> str:
    rng = random.Random(seed)
    sentences = []
    while sum(len(s.split()) for s in sentences) < n_words:
        sentences.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + ".")
    return " ".join(sentences)


def make_model_dir(root: Path, text: str, vocab_size: int = 128) -> Path:
    """save_pretrained of tiny_llama plus a BPE tokenizer trained on `text` with at most `vocab_size` ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator([text], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    out = root / "tiny-llama"
    tiny_llama(seed=3, vocab_size=vocab_size).save_pretrained(out)
    fast.save_pretrained(out)
    return out
