"""Secrets never leave the process: command lines and URLs are masked here, at the source.

A GPU process's command line is the one piece of foreign text infertop reads that routinely carries
credentials (``vllm serve --api-key sk-…``, ``HF_TOKEN=hf_… python serve.py``, a ``--vllm
http://user:token@host`` URL). Everything that leaves the process — a snapshot, a recording, an exporter
series, ``/snapshot.json``, a report, a log line, a screenshot — is built from the masked form, so no
writer has to remember to mask.

What is masked (the value only; the flag's name stays, so the command line still reads):

- the value of a flag whose name says secret: a word that is or ends in ``key`` or ``token``
  (``--api-key``, ``--hf-token``, ``--apikey``), or any name containing ``password``, ``passwd``,
  ``secret``, ``credential``, ``auth`` or ``cookie``. ``--max-num-batched-tokens`` and ``--tokenizer`` are
  not secrets and stay;
- ``KEY=VALUE`` environment-style arguments (an upper-case name), whatever the name;
- the user and password of any URL (``scheme://user:pass@host``), and URL query values with secret names;
- named values in free text (``'api_key': 'sk-…'``, as vLLM logs its arguments; ``password=…``);
- ``Authorization:``/``Bearer`` header values, and tokens with well-known prefixes (``sk-``, ``hf_``,
  ``ghp_``, ``xoxb-``…) wherever they stand.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"

_SUBSTRING_SECRETS = ("password", "passwd", "secret", "credential", "auth", "cookie")
_WORD_SUFFIX_SECRETS = ("key", "token")
_ENV_ASSIGNMENT = re.compile(r"^([A-Z_][A-Z0-9_]*)=(.*)$", re.DOTALL)
# The lookbehind anchors a scheme at the start of its word: without it a long run of letters is tried from
# every position (quadratic on hostile text).
_URL_USERINFO = re.compile(
    r"(?<![A-Za-z0-9+.-])(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s]*)@"
)
_HEADER = re.compile(
    r"(?i)^(\s*(?:proxy-)?authorization\s*:\s*|\s*(?:x-)?api-key\s*:\s*|\s*cookie\s*:\s*)(.+)$"
)
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+")
# Prefixes of tokens that announce themselves: OpenAI, Hugging Face, GitHub, Slack, AWS access keys, JWTs.
# A named value in free text: ``'api_key': 'sk-…'`` (vLLM logs its non-default arguments as a dict),
# ``"token": "…"``, ``password=…``. Masked when the name says secret (``max_num_batched_tokens`` does not).
_NAMED_VALUE = re.compile(
    r"""(?<![A-Za-z0-9_.-])(?P<q>['"]?)(?P<name>[A-Za-z_][A-Za-z0-9_.-]*)(?P=q)(?P<sep>\s*[:=]\s*)"""
    r"""(?P<vq>['"]?)(?P<value>[^'"\s,}\])]+)(?P=vq)"""
)
_KNOWN_TOKEN = re.compile(
    r"\b(?:sk-[A-Za-z0-9_-]{8,}|hf_[A-Za-z0-9]{8,}|gh[pousr]_[A-Za-z0-9]{8,}|github_pat_[A-Za-z0-9_]{8,}"
    r"|xox[abprs]-[A-Za-z0-9-]{8,}|AKIA[0-9A-Z]{16}|eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*)"
)


def is_secret_name(name: str) -> bool:
    """True when a flag, parameter or variable name says it holds a secret (``--api-key``, ``HF_TOKEN``)."""
    lowered = name.lower().lstrip("-")
    if any(part in lowered for part in _SUBSTRING_SECRETS):
        return True
    words = [w for w in re.split(r"[-_.\s]+", lowered) if w]
    return any(word.endswith(suffix) for word in words for suffix in _WORD_SUFFIX_SECRETS)


def redact_text(text: str) -> str:
    """Mask what announces itself as a secret anywhere in free text: URL credentials, headers, known tokens."""
    text = _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}{MASK}@", text)
    header = _HEADER.match(text)
    if header:
        return header.group(1) + MASK
    text = _BEARER.sub(lambda m: f"{m.group(1)} {MASK}", text)
    text = _NAMED_VALUE.sub(_mask_named_value, text)
    return _KNOWN_TOKEN.sub(MASK, text)


def _mask_named_value(match: re.Match[str]) -> str:
    if not is_secret_name(match.group("name")) or match.group("value") in ("None", "null"):
        return match.group(0)
    quote, value_quote = match.group("q"), match.group("vq")
    return f"{quote}{match.group('name')}{quote}{match.group('sep')}{value_quote}{MASK}{value_quote}"


def redact_argv(argv: Sequence[str]) -> list[str]:
    """A command line with every secret value masked; the flags and everything else unchanged."""
    out: list[str] = []
    mask_next = False
    for arg in argv:
        if mask_next:
            mask_next = False
            if not (arg.startswith("--") and len(arg) > 2):  # a flag with no value: the next one is a flag
                out.append(MASK)
                continue
        if arg.startswith("-") and len(arg) > 1 and not arg.startswith("---"):
            name, eq, _value = arg.partition("=")
            if is_secret_name(name):
                if eq:
                    out.append(f"{name}={MASK}")
                else:
                    out.append(arg)
                    mask_next = True
                continue
            out.append(redact_text(arg))
            continue
        env = _ENV_ASSIGNMENT.match(arg)
        if env:
            out.append(f"{env.group(1)}={MASK}")
            continue
        out.append(redact_text(arg))
    return out


def redact_command(command: str) -> str:
    """:func:`redact_argv` for a command line already joined with spaces (as ``/proc/PID/cmdline`` reads)."""
    return " ".join(redact_argv(command.split(" ")))


def redact_url(url: str) -> str:
    """A URL without its user and password, and with secret-named query values masked.

    ``http://user:token@host:8000/v1?api_key=x`` reads ``http://host:8000/v1?api_key=***``: the credentials
    are not replaced by a mask in the authority, so the result still names the server and nothing else.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact_text(url)
    netloc = parts.netloc.rpartition("@")[2]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(is_secret_name(k) for k, _ in pairs):
            query = urlencode([(k, MASK if is_secret_name(k) else v) for k, v in pairs], safe="*")
    return redact_text(urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment)))
