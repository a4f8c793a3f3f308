"""Settings precedence: overrides > INFEED_* environment > infeed.toml > defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from infeed.config import DEFAULT_BROKER_URL, Settings
from infeed.errors import ConfigError


def test_defaults_without_sources(tmp_path: Path) -> None:
    settings = Settings.load(environ={}, config_file=None) if not Path("infeed.toml").exists() else None
    assert settings is None or settings.broker == DEFAULT_BROKER_URL


def test_precedence(tmp_path: Path) -> None:
    toml = tmp_path / "infeed.toml"
    toml.write_text('[infeed]\nbroker = "redis://from-file"\ncodec = "json"\n')
    from_file = Settings.load(environ={}, config_file=toml)
    assert (from_file.broker, from_file.codec) == ("redis://from-file", "json")
    from_env = Settings.load(environ={"INFEED_BROKER": "kafka://from-env"}, config_file=toml)
    assert (from_env.broker, from_env.codec) == ("kafka://from-env", "json")
    from_flag = Settings.load(
        {"broker": "nats://from-flag", "codec": None},
        environ={"INFEED_BROKER": "kafka://from-env"},
        config_file=toml,
    )
    assert (from_flag.broker, from_flag.codec) == ("nats://from-flag", "json")


def test_config_env_variable_names_the_file(tmp_path: Path) -> None:
    toml = tmp_path / "other.toml"
    toml.write_text('[infeed]\nlog_level = "DEBUG"\n')
    assert Settings.load(environ={"INFEED_CONFIG": str(toml)}).log_level == "DEBUG"


def test_bad_sources_are_named(tmp_path: Path) -> None:
    toml = tmp_path / "infeed.toml"
    toml.write_text('[infeed]\nbrokr = "x"\n')
    with pytest.raises(ConfigError, match="did you mean 'broker'"):
        Settings.load(environ={}, config_file=toml)
    toml.write_text("[infeed\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        Settings.load(environ={}, config_file=toml)
    with pytest.raises(ConfigError, match="cannot read"):
        Settings.load(environ={}, config_file=tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="unknown setting"):
        Settings.load({"nope": 1}, environ={})
