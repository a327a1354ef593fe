"""A tiny random Llama (2 layers, hidden 16) with a character-level tokenizer, written to a folder at test time.

Same architecture and file layout as SmolLM2 (``LlamaForCausalLM``, tied embeddings, ``<|im_end|>`` as end
of text and padding), so every CausalLM path runs in CI in a second without downloading anything.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHARS = string.ascii_letters + string.digits + string.punctuation + " \n"


def build_tiny_llama(folder: Path, seed: int = 0) -> Path:
    """Write the tiny model and its tokenizer to ``folder`` (``save_pretrained`` files) and return it."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>")
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=1,
        eos_token_id=2, pad_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger random weights than the 0.02 init, so logits differ visibly between tokens
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.3)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    fast.save_pretrained(str(folder))
    return folder
