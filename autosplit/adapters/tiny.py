"""Tokenizers and text encoders for the tiny built-in pipelines, made on the spot (nothing is
downloaded): a CLIP BPE and a T5 Unigram tokenizer trained on a small corpus with `tokenizers`,
wrapped in the transformers classes the diffusers pipelines expect."""

from __future__ import annotations

import json
from typing import Any

CORPUS = [
    "a photo of a red cube on a blue table",
    "a green sphere beside a yellow cone in soft light",
    "stripes, checkerboard, gradient, circle, noise, sunset, ocean, forest, city at night",
    "a white purple orange black square moving right on a background",
]


def clip_tokenizer(max_length: int = 77) -> Any:
    """A CLIPTokenizer with a BPE vocabulary learned from `CORPUS` (byte-level, `</w>` suffix)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    specials = ["<|startoftext|>", "<|endoftext|>"]
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        show_progress=False,
        end_of_word_suffix="</w>",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(CORPUS * 4, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return CLIPTokenizer(
        vocab=model["vocab"],
        merges=merges,  # type: ignore[arg-type]  # (pairs, as it takes)
        model_max_length=max_length,
    )


def t5_tokenizer(max_length: int = 512) -> Any:
    """A T5 tokenizer (Unigram, `<pad>`=0, `</s>`=1, `<unk>`=2) learned from `CORPUS`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5Tokenizer

    unigram = Tokenizer(models.Unigram())
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=200, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    unigram.train_from_iterator(CORPUS * 4, trainer)
    vocab = [tuple(v) for v in json.loads(unigram.to_str())["model"]["vocab"]]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


def clip_text_encoder(tokenizer: Any, *, hidden_size: int = 32, with_projection: bool = False) -> Any:
    """A 2-layer random-init CLIP text encoder matching `tokenizer` (seed the global RNG first)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=hidden_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def t5_config(tokenizer: Any, *, d_model: int = 32) -> dict[str, Any]:
    """Keyword arguments of a 2-layer T5/UMT5 config matching `tokenizer`."""
    return dict(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_ff=37,
        d_kv=8,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
