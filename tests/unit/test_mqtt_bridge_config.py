"""``MqttBridgeConfig.from_url``: URL parsing, topic filters and bad options (no broker needed)."""

from __future__ import annotations

import socket

import pytest

from infeed.bridge.mqtt import (
    DEFAULT_INFLIGHT_V311,
    DEFAULT_PORT,
    DEFAULT_RECEIVE_MAXIMUM,
    MqttBridge,
    MqttBridgeConfig,
)
from infeed.brokers import connect
from infeed.errors import BrokerConnectionError, ConfigError


def test_host_port_and_filter_from_the_url() -> None:
    config = MqttBridgeConfig.from_url("mqtt://127.0.0.1:1884/sensors/+/temp")
    assert (config.host, config.port, config.filters) == ("127.0.0.1", 1884, ("sensors/+/temp",))
    assert config.qos == 1
    assert config.protocol == "5"
    assert config.clean_start is False
    assert config.window == DEFAULT_RECEIVE_MAXIMUM


def test_default_port() -> None:
    assert MqttBridgeConfig.from_url("mqtt://broker.local/a").port == DEFAULT_PORT


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://h/sensors/#", "sensors/#"),  # '#' is the wildcard here, not a URL fragment
        ("mqtt://h/sensors/%23", "sensors/#"),
        ("mqtt://h/sensors/%2B/temp", "sensors/+/temp"),
        ("mqtt://h/%23", "#"),
        ("mqtt://h/site%201/+/temp", "site 1/+/temp"),
        ("mqtt://h/$share/bridges/sensors/#", "$share/bridges/sensors/#"),
        ("mqtt://h//leading/empty/level", "/leading/empty/level"),
    ],
)
def test_filter_in_the_path(url: str, expected: str) -> None:
    assert MqttBridgeConfig.from_url(url).filters == (expected,)


def test_wildcard_filter_then_options() -> None:
    config = MqttBridgeConfig.from_url("mqtt://h:1/sensors/#?qos=0&max_batch=50")
    assert config.filters == ("sensors/#",)
    assert (config.qos, config.max_batch) == (0, 50)


def test_more_filters_are_added_and_deduplicated() -> None:
    config = MqttBridgeConfig.from_url("mqtt://h/a/+", filters=["b/#", "a/+", "c"])
    assert config.filters == ("a/+", "b/#", "c")


def test_filters_alone_without_a_path() -> None:
    assert MqttBridgeConfig.from_url("mqtt://h:1883", filters=["x/#"]).filters == ("x/#",)


def test_options_are_typed() -> None:
    config = MqttBridgeConfig.from_url(
        "mqtt://h/f?protocol=3.1.1&client_id=b1&clean_start=true&session_expiry_s=60"
        "&max_wait_s=0.5&keepalive_s=30&connect_timeout_s=2&retained=skip&key=none&receive_maximum=50"
    )
    assert config.protocol == "3.1.1"
    assert config.client_id == "b1"
    assert config.clean_start is True
    assert config.session_expiry_s == 60.0
    assert config.max_wait_s == 0.5
    assert config.keepalive_s == 30.0
    assert config.connect_timeout_s == 2.0
    assert config.retained == "skip"
    assert config.key == "none"
    assert config.window == 50


def test_window_under_mqtt_311_defaults_to_mosquittos_inflight_limit() -> None:
    assert MqttBridgeConfig.from_url("mqtt://h/f?protocol=3.1.1").window == DEFAULT_INFLIGHT_V311


def test_credentials_from_user_info_and_kept_out_of_repr() -> None:
    config = MqttBridgeConfig.from_url("mqtt://bridge:s%40cret@h/f")
    assert (config.username, config.password) == ("bridge", "s@cret")
    assert "s@cret" not in repr(config)


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("mqtt://h/f?bogus=1", "bogus"),
        ("mqtt://h/f?max_bath=1", "max_batch"),  # the nearest known option is suggested
        ("mqtt://h/f?qos=2", "qos"),
        ("mqtt://h/f?qos=one", "qos"),
        ("mqtt://h/f?protocol=4", "protocol"),
        ("mqtt://h/f?max_batch=0", "max_batch"),
        ("mqtt://h/f?max_wait_s=-1", "max_wait_s"),
        ("mqtt://h/f?receive_maximum=70000", "receive_maximum"),
        ("mqtt://h/f?session_expiry_s=-5", "session_expiry_s"),
        ("mqtt://h/f?keepalive_s=0", "keepalive_s"),
        ("mqtt://h/f?connect_timeout_s=0", "connect_timeout_s"),
        ("mqtt://h/f?retained=maybe", "retained"),
        ("mqtt://h/f?key=payload", "key"),
        ("mqtt://h/f?clean_start=perhaps", "clean_start"),
        ("mqtt://h/f?qos=1&qos=0", "qos"),
    ],
)
def test_bad_options_raise_config_error_naming_them(url: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        MqttBridgeConfig.from_url(url)


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("mqtts://h/f", "mqtt://"),
        ("http://h/f", "mqtt://"),
        ("mqtt:///f", "no host"),
        ("mqtt://h:99999/f", "port"),
        ("mqtt://h:abc/f", "port"),
        ("mqtt://h", "no topic filter"),
        ("mqtt://h/", "no topic filter"),
        ("mqtt://h/sensors/#/temp", "sensors/#/temp"),
        ("mqtt://h/sensors/te+mp", "sensors/te\\+mp"),
        ("mqtt://h/sensors/temp#", "sensors/temp#"),
        ("mqtt://h/$share/g", "\\$share/GROUP/FILTER"),
        ("mqtt://h/$share//x", "\\$share/GROUP/FILTER"),
    ],
)
def test_bad_urls_raise_config_error(url: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        MqttBridgeConfig.from_url(url)


def test_bad_extra_filter_is_named() -> None:
    with pytest.raises(ConfigError, match="a/#/b"):
        MqttBridgeConfig.from_url("mqtt://h/ok", filters=["a/#/b"])


def test_password_is_redacted_in_errors() -> None:
    with pytest.raises(ConfigError) as info:
        MqttBridgeConfig.from_url("mqtts://u:hunter2@h/f")
    assert "hunter2" not in str(info.value)


def test_direct_construction_validates() -> None:
    with pytest.raises(ValueError, match="qos"):
        MqttBridgeConfig(host="h", filters=("f",), qos=2)
    with pytest.raises(ValueError, match="filter"):
        MqttBridgeConfig(host="h", filters=())
    with pytest.raises(ValueError, match="client_id"):
        MqttBridgeConfig(host="h", filters=("f",), client_id="")


def test_bridge_names_its_session_after_the_target_topic() -> None:
    with connect("memory://") as broker:
        default = MqttBridge(MqttBridgeConfig.from_url("mqtt://h/f"), broker, "sensors")
        fixed = MqttBridge(MqttBridgeConfig.from_url("mqtt://h/f?client_id=edge-1"), broker, "sensors")
        assert default.client_id == "infeed-bridge-sensors"
        assert fixed.client_id == "edge-1"
        with pytest.raises(ValueError, match="topic"):
            MqttBridge(MqttBridgeConfig.from_url("mqtt://h/f"), broker, "bad topic!")


def test_start_against_a_closed_port_is_a_connection_error() -> None:
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with connect("memory://") as broker:
        bridge = MqttBridge(MqttBridgeConfig.from_url(f"mqtt://127.0.0.1:{port}/f"), broker, "t")
        with pytest.raises(BrokerConnectionError, match=f"127.0.0.1:{port}"):
            bridge.start()
