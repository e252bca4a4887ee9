"""Settings: defaults < TOML file < INFERTOP_* environment < CLI flags, with errors that name the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuner.settings import Settings, SettingsError, load_settings


def test_defaults_when_nothing_is_set(tmp_path: Path) -> None:
    assert load_settings(env={}, path=tmp_path / "missing.toml") == Settings()


def test_precedence_file_then_env_then_flags(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text('interval_s = 0.5\nhistory_len = 100\nvllm_urls = ["http://a:1"]\n')
    env = {"INFERTOP_INTERVAL_S": "1.0", "INFERTOP_DISCOVER_VLLM": "false"}
    s = load_settings({"interval_s": 2.0, "history_len": None}, env=env, path=cfg)
    assert s.interval_s == 2.0  # flag beats env beats file
    assert s.history_len == 100  # from the file; a flag left as None does not override
    assert s.discover_vllm is False  # from the environment
    assert s.vllm_urls == ("http://a:1",)


def test_config_path_from_environment(tmp_path: Path) -> None:
    cfg = tmp_path / "x.toml"
    cfg.write_text("slow_every = 8\n")
    assert load_settings(env={"INFERTOP_CONFIG": str(cfg)}).slow_every == 8


def test_env_list_is_comma_separated(tmp_path: Path) -> None:
    s = load_settings(env={"INFERTOP_VLLM_URLS": "http://a:1, http://b:2"}, path=tmp_path / "none")
    assert s.vllm_urls == ("http://a:1", "http://b:2")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("interval_s = 0\n", "interval_s must be between"),
        ("colour = 'red'\n", "unknown setting 'colour'"),
        ("interval_s = 'fast'\n", "setting interval_s"),
        ("interval_s = \n", "config file"),
    ],
)
def test_bad_values_name_the_setting(tmp_path: Path, text: str, message: str) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(text)
    with pytest.raises(SettingsError, match=message):
        load_settings(env={}, path=cfg)


def test_bad_boolean_in_environment(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="discover_vllm"):
        load_settings(env={"INFERTOP_DISCOVER_VLLM": "maybe"}, path=tmp_path / "none")
