"""How many token ids a served model accepts, so that token-id prompts stay inside its vocabulary.

The load generator sends prompts as token ids drawn below ``LoadSpec.vocab_size``; an id the server does not
know fails the request (vLLM: HTTP 400 "Token id 899 is out of vocabulary"). The size comes from the model's
files when they are at hand (:func:`vocab_size_from_dir`), else from the server (:func:`vocab_size_from_server`).

Both answer a *safe* size rather than the exact one: every id below it is valid. vLLM 0.32 accepts an id up to
the larger of the tokenizer's largest id and the model's ``vocab_size - 1``; older versions checked the
tokenizer alone, and embedding rows past the tokenizer's ids are often padding, so the smaller of the two is
taken.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx

from tuner.loadgen.control import AskError, LoadgenError, Target, get_json, pick_model

# Text for /tokenize: many scripts, digits, code and punctuation, so that even a large vocabulary answers with
# some high ids (merged words, CJK, emoji sit far up the table). Under 512 bytes, so that a byte-level
# tokenizer without merges stays inside a short --max-model-len (older vLLM checked the length on /tokenize).
_SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog; 0123456789 + 3.14159 = π? "
    "def tokenize(text: str) -> list[int]: return [ord(c) for c in text]  # {}<>|~^`@$%&* "
    "Größenänderung, façade, naïve, smørrebrød, Ærø. Привет, мир! Γειά σου κόσμε. "
    "こんにちは世界。你好，世界！안녕하세요 세계. مرحبا بالعالم. שלום עולם. नमस्ते दुनिया। "
    "🙂🚀🔥✨ — «quotes» “curly” ‘single’ … ©®™ ¿¡"
)


def vocab_size_from_dir(path: str | Path) -> int | None:
    """The safe vocabulary size of a local model directory; None when neither file can be read.

    ``config.json``'s ``vocab_size`` (or its ``text_config``'s, for multimodal models) and, when a
    ``tokenizer.json`` is there, the tokenizer's size (largest id in its vocabulary and added tokens, plus
    one): the smaller of the two when both are known.
    """
    size, _source = _vocab_size_in_dir(Path(path))
    return size


def vocab_size_from_server(
    base_url: str, model: str | None = None, *, timeout_s: float = 10.0
) -> tuple[int | None, str]:
    """The safe vocabulary size of ``model`` (default: the first listed) on a running vLLM server, and how.

    When ``GET /v1/models`` names a ``root`` that is a directory on this machine, its files decide (as
    :func:`vocab_size_from_dir`). Otherwise ``POST /tokenize`` of a varied sample text gives the largest id the
    tokenizer used; every id up to it is in the vocabulary, so that id + 1 is a safe (if low) bound. The
    second element is one short phrase for people: where the size came from, or why there is none. Never
    raises on network, HTTP or JSON errors.
    """
    try:
        target = Target.parse(base_url)
    except LoadgenError as exc:
        return None, str(exc)
    try:
        with httpx.Client(base_url=target.base_url, timeout=timeout_s) as client:
            listed = get_json(client, "/v1/models")
            name, root = pick_model(listed, model)
            if root is not None and Path(root).is_dir():
                size, source = _vocab_size_in_dir(Path(root))
                if size is not None:
                    return size, source
            return _tokenize_bound(client, name or model)
    except AskError as exc:
        return None, str(exc)


def _vocab_size_in_dir(directory: Path) -> tuple[int | None, str]:
    from_config = _config_vocab_size(directory / "config.json")
    from_tokenizer = _tokenizer_size(directory / "tokenizer.json")
    if from_config is None and from_tokenizer is None:
        return None, f"no readable config.json or tokenizer.json in {directory}"
    if from_tokenizer is not None and (from_config is None or from_tokenizer < from_config):
        return from_tokenizer, f"tokenizer.json of {directory}"
    return from_config, f"config.json of {directory}"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _positive_int(value: Any) -> int | None:
    # bool is an int subclass: `"vocab_size": true` is not a size.
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _config_vocab_size(path: Path) -> int | None:
    config = _read_json(path)
    if not isinstance(config, dict):
        return None
    size = _positive_int(config.get("vocab_size"))
    text_config = config.get("text_config")
    if size is None and isinstance(text_config, dict):
        size = _positive_int(text_config.get("vocab_size"))
    return size


def _tokenizer_size(path: Path) -> int | None:
    """Largest id in ``model.vocab`` and ``added_tokens``, plus one (what vLLM's ``max_token_id`` counts)."""
    document = _read_json(path)
    if not isinstance(document, dict):
        return None
    ids: list[int] = []
    model = document.get("model")
    vocab = model.get("vocab") if isinstance(model, dict) else None
    if isinstance(vocab, dict):  # BPE, WordPiece, WordLevel: token -> id
        ids.extend(v for v in vocab.values() if isinstance(v, int) and not isinstance(v, bool))
    elif isinstance(vocab, list) and vocab:  # Unigram: [token, score] pairs, the id is the position
        ids.append(len(vocab) - 1)
    added = document.get("added_tokens")
    if isinstance(added, list):
        ids.extend(
            t["id"]
            for t in added
            if isinstance(t, dict) and isinstance(t.get("id"), int) and not isinstance(t["id"], bool)
        )
    ids = [i for i in ids if i >= 0]
    return max(ids) + 1 if ids else None


def _tokenize_bound(client: httpx.Client, model: str | None) -> tuple[int, str]:
    """Largest id of the sample text's tokens, plus one, from vLLM's ``POST /tokenize``."""
    body: dict[str, Any] = {"prompt": _SAMPLE_TEXT}
    if model:
        body["model"] = model
    answer = get_json(client, "/tokenize", body)
    tokens = answer.get("tokens") if isinstance(answer, dict) else None
    ids = [t for t in tokens if isinstance(t, int) and not isinstance(t, bool)] if tokens else []
    if not ids:
        raise AskError("the server's /tokenize answered no token ids")
    return max(ids) + 1, "the server's /tokenize"
