"""The flags of a vLLM server's command line that :func:`~tuner.telemetry.modelfacts.facts_for` needs:
``vllm serve MODEL [flags]`` or ``python -m vllm.entrypoints.openai.api_server --model MODEL [flags]``, and the
top-level keys of a ``--config`` YAML file (read capped, as foreign data: a bad file gives a reason in words).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from tuner.telemetry.foreign import printable
from tuner.telemetry.modelfacts import MAX_CONFIG_BYTES, ModelFacts, facts_for, read_capped

# vllm/engine/arg_utils.py and vllm/entrypoints/launchers/cli_args.py (their short spellings too).
_VALUE_FLAGS = {
    "--model": "model",
    "--dtype": "dtype",
    "--quantization": "quantization",
    "-q": "quantization",
    "--kv-cache-dtype": "kv_cache_dtype",
    "--tensor-parallel-size": "tensor_parallel",
    "-tp": "tensor_parallel",
    "--pipeline-parallel-size": "pipeline_parallel",
    "-pp": "pipeline_parallel",
    "--data-parallel-size": "data_parallel",
    "-dp": "data_parallel",
    "--data-parallel-size-local": "data_parallel_local",
    "-dpl": "data_parallel_local",
    "--data-parallel-rank": "data_parallel_rank",
    "-dpn": "data_parallel_rank",
    "--api-server-count": "api_servers",
    "-asc": "api_servers",
    "--config": "config",
}
_SWITCHES = {
    "--data-parallel-external-lb": "external_lb",
    "--data-parallel-multi-port-external-lb": "external_lb",
}
_COUNTS = ("tensor_parallel", "pipeline_parallel", "data_parallel", "data_parallel_local", "api_servers")


def _flags(args: Sequence[str]) -> dict[str, str]:
    """The flags the estimate needs, in both spellings (``--flag value``, ``--flag=value``; vLLM also takes
    underscores in long names); the last one given wins, as with argparse."""
    found: dict[str, str] = {}
    for i, arg in enumerate(args):
        name, eq, value = arg.partition("=")
        if name.startswith("--"):
            name = "--" + name[2:].replace("_", "-")
        if name in _SWITCHES:
            found[_SWITCHES[name]] = "true"
        key = _VALUE_FLAGS.get(name)
        if key is None:
            continue
        if eq:
            found[key] = value
        elif i + 1 < len(args):
            found[key] = args[i + 1]
    return found


def _yaml_flags(path: Path) -> dict[str, str] | str:
    """The top-level ``key: value`` lines of ``vllm serve --config FILE.yaml`` that name flags we read."""
    data = read_capped(path, MAX_CONFIG_BYTES)
    if isinstance(data, str):
        return data
    found: dict[str, str] = {}
    for line in data.decode("utf-8", errors="replace").splitlines():
        key, sep, value = line.partition(":")
        if not sep or not key or key[0].isspace() or key.startswith("#"):
            continue
        name = "--" + key.strip().replace("_", "-")
        value = value.split(" #")[0].strip().strip("'\"")
        if name in _SWITCHES and value.lower() == "true":
            found[_SWITCHES[name]] = "true"
        elif _VALUE_FLAGS.get(name, "config") != "config":
            found[_VALUE_FLAGS[name]] = value
    return found


def facts_from_argv(
    argv: Sequence[str], env: Mapping[str, str] | None = None, cwd: str | None = None
) -> ModelFacts | str:
    """:func:`facts_for` the server ``argv`` starts: ``vllm serve MODEL [flags]`` or ``python -m
    vllm.entrypoints.openai.api_server --model MODEL [flags]`` (a ``--config`` YAML's keys too, flags winning).
    ``cwd`` is the server's working directory (for a relative model path). A reason in words when the model or
    a flag cannot be read.

    Data parallelism: the engines behind this server are ``--data-parallel-size-local``, else one with an
    external load balancer (``--data-parallel-rank``), else ``--data-parallel-size``; its API servers are
    ``--api-server-count``, else as many as its engines (vLLM's default with its own load balancer).
    """
    args = list(argv)
    start = next((i + 1 for i, a in enumerate(args) if a == "vllm.entrypoints.openai.api_server"), None)
    positional = None
    if start is None:
        serve = next((i for i, a in enumerate(args) if a == "serve" and i > 0), None)
        if serve is None:
            return "not a vLLM server command line"
        start = serve + 1
        if start < len(args) and not args[start].startswith("-"):
            positional = args[start]
    flags = _flags(args[start:])
    if "config" in flags:
        path = Path(flags["config"])
        from_file = _yaml_flags(path if path.is_absolute() or not cwd else Path(cwd) / path)
        if isinstance(from_file, str):
            return f"--config not read ({from_file})"
        flags = {**from_file, **flags}
    model = flags.get("model") or positional
    if not model:
        return "no model in the server's command line"
    counts: dict[str, int] = {}
    for key in _COUNTS:
        text = flags.get(key)
        if text is None:
            continue
        if not text.isascii() or not text.isdecimal() or len(text) > 6:
            flag = next(f for f, k in _VALUE_FLAGS.items() if k == key)
            return f"{flag} {printable(text, 20)} is not a number"
        counts[key] = int(text)
    external = "external_lb" in flags or "data_parallel_rank" in flags
    engines = counts.get("data_parallel_local", 1 if external else counts.get("data_parallel", 1))
    return facts_for(
        model,
        dtype=flags.get("dtype"),
        quantization=flags.get("quantization"),
        kv_cache_dtype=flags.get("kv_cache_dtype"),
        tensor_parallel=counts.get("tensor_parallel", 1),
        pipeline_parallel=counts.get("pipeline_parallel", 1),
        data_parallel=engines,
        api_servers=counts.get("api_servers", 1 if external else engines),
        env=env,
        cwd=cwd,
    )
