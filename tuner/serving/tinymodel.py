"""Write a model directory for vLLM's ``--load-format dummy``: a config and a tokenizer, no weights.

With dummy (random) weights vLLM needs only ``config.json`` and tokenizer files, and runs as fast as with
real weights of the same shape. This module writes both from the standard library alone, so nothing is
downloaded from a model hub:

- ``write_tiny_model(dir)`` makes a tiny Llama that the CPU build of vLLM starts in about a minute, for tests;
- ``write_tiny_model(dir, **LLAMA_3_1_8B)`` makes a directory with a real model's shape, for tuning on a GPU.

The tokenizer is a byte-level BPE (GPT-2 style) written as a ``tokenizer.json``. Its vocabulary always has
exactly ``vocab_size`` entries, so every token id the model can emit decodes to text: three special tokens,
the 256 byte tokens, then filler words (" aa", " ab", ...). It has no merges, so text encodes one byte per
token; load tests send token-id prompts anyway (``"prompt": [12, 873, ...]``) to fix input lengths exactly.

Command line: ``python -m tuner.serving.tinymodel DIR [--preset llama-3.1-8b]``.
"""

from __future__ import annotations

import argparse
import json
import string
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

UNK_TOKEN = "<unk>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
SPECIAL_TOKENS = (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN)  # ids 0, 1, 2
BOS_TOKEN_ID = 1
EOS_TOKEN_ID = 2
_N_BYTE_TOKENS = 256
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + _N_BYTE_TOKENS

# Real shapes (from the models' published config.json files). Keys are write_tiny_model's keyword arguments:
# ``write_tiny_model(dir, **LLAMA_3_1_8B)`` gives a directory vLLM serves with that model's speed and memory.
LLAMA_3_1_8B: dict[str, Any] = {
    "hidden_size": 4096,
    "num_layers": 32,
    "num_heads": 32,
    "num_kv_heads": 8,
    "intermediate_size": 14336,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "tie_word_embeddings": False,
}
LLAMA_3_2_1B: dict[str, Any] = {
    "hidden_size": 2048,
    "num_layers": 16,
    "num_heads": 32,
    "num_kv_heads": 8,
    "intermediate_size": 8192,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "tie_word_embeddings": True,
}
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {},
    "llama-3.1-8b": LLAMA_3_1_8B,
    "llama-3.2-1b": LLAMA_3_2_1B,
}


def write_tiny_model(
    directory: str | Path,
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 256,
    vocab_size: int = 1024,
    max_position_embeddings: int = 2048,
    rope_theta: float = 10000.0,
    rope_scaling: Mapping[str, Any] | None = None,
    tie_word_embeddings: bool = False,
    dtype: str = "bfloat16",
) -> Path:
    """Write ``config.json`` and tokenizer files of a Llama-shaped model into ``directory``; return its path.

    The directory is created if needed; existing files of the same names are overwritten. Serve it with
    ``--load-format dummy``: there are no weight files. The defaults give a head dimension of 32, the
    smallest that vLLM's CPU attention accepts (32, 64, 80, 96, 112, 128, ...; 16 fails at the first request).

    Raises:
        ValueError: the shape is inconsistent (heads that do not divide the hidden size, a vocabulary smaller
            than the 259 tokens the byte-level tokenizer itself needs, ...).
    """
    _check_shape(hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size, vocab_size)
    if max_position_embeddings < 1:
        raise ValueError(f"max_position_embeddings must be positive, got {max_position_embeddings}")
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": hidden_size // num_heads,
        "hidden_act": "silu",
        "vocab_size": vocab_size,
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": rope_theta,
        "rope_scaling": dict(rope_scaling) if rope_scaling is not None else None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": BOS_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID,
        "torch_dtype": dtype,
        "use_cache": True,
        # Without a version, transformers 5 takes a local tokenizer for a Mistral one and warns about its regex.
        "transformers_version": "4.45.0",
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": UNK_TOKEN,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_position_embeddings,
    }
    special_tokens_map = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": UNK_TOKEN}
    generation_config = {"bos_token_id": BOS_TOKEN_ID, "eos_token_id": EOS_TOKEN_ID}
    _write_json(path / "config.json", config)
    _write_json(path / "generation_config.json", generation_config)
    _write_json(path / "tokenizer.json", tokenizer_json(vocab_size))
    _write_json(path / "tokenizer_config.json", tokenizer_config)
    _write_json(path / "special_tokens_map.json", special_tokens_map)
    return path


def tokenizer_json(vocab_size: int) -> dict[str, Any]:
    """The ``tokenizer.json`` document (``tokenizers`` format) of a byte-level BPE with ``vocab_size`` tokens.

    Id 0..2 are ``<unk>``, ``<s>``, ``</s>``; 3..258 the 256 bytes; the rest filler words, so that any id
    below ``vocab_size`` decodes to text. Encoding prepends ``<s>`` as Llama's tokenizer does.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be at least {MIN_VOCAB_SIZE} for a byte-level tokenizer, got {vocab_size}"
        )
    byte_alphabet = _bytes_to_unicode()
    vocab: dict[str, int] = {token: token_id for token_id, token in enumerate(SPECIAL_TOKENS)}
    for byte in range(_N_BYTE_TOKENS):
        vocab[byte_alphabet[byte]] = len(vocab)
    # "Ġ" is the byte-level form of a space: fillers decode to " ab", " ac", ... and read as words.
    space = byte_alphabet[ord(" ")]
    fillers = _filler_words()
    while len(vocab) < vocab_size:
        vocab[space + next(fillers)] = len(vocab)
    added_tokens = [
        {
            "id": token_id,
            "content": token,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for token_id, token in enumerate(SPECIAL_TOKENS)
    ]
    byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added_tokens,
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", **byte_level},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": BOS_TOKEN, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
            ],
            "pair": [
                {"SpecialToken": {"id": BOS_TOKEN, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": BOS_TOKEN, "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {BOS_TOKEN: {"id": BOS_TOKEN, "ids": [BOS_TOKEN_ID], "tokens": [BOS_TOKEN]}},
        },
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [],
        },
    }


def _check_shape(
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int,
    vocab_size: int,
) -> None:
    for name, value in (
        ("hidden_size", hidden_size),
        ("num_layers", num_layers),
        ("num_heads", num_heads),
        ("num_kv_heads", num_kv_heads),
        ("intermediate_size", intermediate_size),
    ):
        if value < 1:
            raise ValueError(f"{name} must be positive, got {value}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be at least {MIN_VOCAB_SIZE} for a byte-level tokenizer, got {vocab_size}"
        )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character: byte-level BPE vocabularies are written in it."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {byte: chr(byte) for byte in printable}
    shifted = 0
    for byte in range(_N_BYTE_TOKENS):
        if byte not in mapping:
            mapping[byte] = chr(_N_BYTE_TOKENS + shifted)
            shifted += 1
    return mapping


def _filler_words() -> Iterator[str]:
    """Endless distinct words: "aa", "ab", ..., "zz", "aaa", ... (single letters are byte tokens already)."""
    letters = string.ascii_lowercase
    length = 2
    while True:
        for index in range(len(letters) ** length):
            word, rest = "", index
            for _ in range(length):
                rest, digit = divmod(rest, len(letters))
                word = letters[digit] + word
            yield word
        length += 1


def _write_json(path: Path, document: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """``python -m tuner.serving.tinymodel DIR [--preset NAME]``: write a dummy-weight model directory."""
    parser = argparse.ArgumentParser(
        prog="python -m tuner.serving.tinymodel",
        description="Write config.json and tokenizer files of a Llama-shaped model for --load-format dummy.",
    )
    parser.add_argument("directory", type=Path, help="where to write the files (created if missing)")
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="tiny",
        help="model shape: tiny (for tests on a CPU) or a real model's shape (default: tiny)",
    )
    args = parser.parse_args(argv)
    try:
        path = write_tiny_model(args.directory, **PRESETS[args.preset])
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
