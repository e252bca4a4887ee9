"""One typed settings model: defaults < TOML file < environment (INFERTOP_*) < command-line flags.

The file is ``$INFERTOP_CONFIG`` or ``~/.config/infertop/config.toml``; keys are the field names below, at the
top level, e.g. ``interval_s = 0.5`` and ``vllm_urls = ["http://127.0.0.1:8000"]``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import tomllib


class SettingsError(ValueError):
    """A setting has the wrong type or an impossible value; the message names it."""


@dataclass(frozen=True)
class Settings:
    interval_s: float = 0.25
    """Seconds between readings of the cheap GPU metrics (0.25 = 4 Hz)."""

    redraw_interval_s: float = 0.5
    """Seconds between screen redraws (the monitor's main CPU cost). Sampling and history keep interval_s."""

    slow_every: int = 4
    """Read the expensive metrics (energy counter ~4 ms, process list) every N-th tick."""

    history_len: int = 480
    """Readings kept per metric for sparklines (480 at 4 Hz = 2 minutes)."""

    vllm_urls: tuple[str, ...] = ()
    """vLLM servers to watch, besides those found running on this machine."""

    discover_vllm: bool = True
    """Look for vLLM servers running on this machine."""

    record_dir: str = "."
    """Where the `R` key writes recordings."""

    dcgm: str = "auto"
    """Where DCGM's profiling counters are read (DRAM bandwidth on GPUs without GPM): "auto" (a local
    nv-hostengine or dcgm-exporter), "off", a dcgm-exporter /metrics URL, or "hostengine[:HOST:PORT]"."""

    dcgm_watch: bool = False
    """Ask DCGM to watch the profiling fields it does not watch yet (this changes DCGM's sampling for every tool
    reading those fields: off unless asked)."""

    def validate(self) -> Settings:
        if not 0.01 <= self.interval_s <= 60:
            raise SettingsError(f"interval_s must be between 0.01 and 60 seconds, not {self.interval_s}")
        if not 0.05 <= self.redraw_interval_s <= 60:
            raise SettingsError(
                f"redraw_interval_s must be between 0.05 and 60 seconds, not {self.redraw_interval_s}"
            )
        if self.slow_every < 1:
            raise SettingsError(f"slow_every must be at least 1, not {self.slow_every}")
        if not 10 <= self.history_len <= 100_000:
            raise SettingsError(f"history_len must be between 10 and 100000, not {self.history_len}")
        from tuner.telemetry.dcgm import parse_dcgm_spec

        try:
            parse_dcgm_spec(self.dcgm)
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
        return self


def default_config_path(env: Mapping[str, str]) -> Path:
    if env.get("INFERTOP_CONFIG"):
        return Path(env["INFERTOP_CONFIG"])
    base = Path(env.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "infertop" / "config.toml"


def _coerce(name: str, kind: Any, value: Any) -> Any:
    text = isinstance(value, str)
    try:
        if kind in ("float", float):
            return float(value)
        if kind in ("int", int):
            return int(value)
        if kind in ("bool", bool):
            if text:
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if "tuple" in str(kind):
            if text:
                return tuple(v.strip() for v in value.split(",") if v.strip())
            return tuple(str(v) for v in value)
        return str(value)
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"setting {name}: cannot use {value!r} ({exc})") from None


def load_settings(
    overrides: Mapping[str, Any] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    path: Path | None = None,
) -> Settings:
    """Build the settings from the file, the environment and ``overrides`` (CLI flags; None = not given)."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    kinds = {f.name: f.type for f in fields(Settings)}
    path = path or default_config_path(env)
    if path.is_file():
        try:
            data = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, OSError) as exc:
            raise SettingsError(f"config file {path}: {exc}") from None
        for key, value in data.items():
            if key not in kinds:
                raise SettingsError(f"config file {path}: unknown setting {key!r}")
            values[key] = _coerce(key, kinds[key], value)
    for key, kind in kinds.items():
        env_value = env.get(f"INFERTOP_{key.upper()}")
        if env_value is not None:
            values[key] = _coerce(key, kind, env_value)
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = _coerce(key, kinds[key], value)
    return dataclasses.replace(Settings(), **values).validate()
