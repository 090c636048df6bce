"""The config file: defaults run the demo, and every mistake names its field."""

from __future__ import annotations

from pathlib import Path

import pytest

from scheduler.service.config import (
    DEMO_BACKEND,
    ConfigError,
    key_id,
    load_settings,
    startup_lines,
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "scheduler.toml"
    path.write_text(text)
    return path


def test_no_config_is_the_demo() -> None:
    settings = load_settings(None, env={})
    assert [t.core.name for t in settings.tiers] == ["enterprise", "pro", "free"]
    assert {k.tier for k in settings.keys} == {"free", "pro", "enterprise"}
    assert settings.models[0].backends == (DEMO_BACKEND,)
    assert settings.server.port == 8080 and settings.server.host == "127.0.0.1"
    assert all("sk-demo" not in k.key_id for k in settings.keys)


def test_a_full_config(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [server]
        port = 9000
        [tiers.gold]
        weight = 5
        max_wait_s = 20
        max_depth = 10
        ladder = ["fallback"]
        [tiers.bronze]
        weight = 1
        max_wait_s = 2
        max_depth = 10
        shed_on_overload = true
        [[keys]]
        key_env = "GOLD_KEY"
        tenant = "acme"
        tier = "gold"
        [models.big]
        backends = ["http://127.0.0.1:9001", "http://127.0.0.1:9002"]
        fallback = "small"
        [models.small]
        backends = ["http://127.0.0.1:9003"]
        [controller]
        mode = "rate"
        initial_limit = 20
        target_latency_s = 3
        """,
    )
    env = {"GOLD_KEY": "sk-gold", "SCHEDULER_KEY_SECRET": "s3cret"}
    settings = load_settings(path, env=env, overrides={"port": 9100})
    assert settings.server.port == 9100
    assert settings.keys[0].key_id == key_id("sk-gold", b"s3cret")
    assert settings.model("big") is not None
    assert settings.controller.initial_limit == 20.0
    assert settings.gate.mode.value == "rate"
    assert settings.tier("bronze").core.shed_on_overload


def test_priority_bands_are_read_into_the_core_tiers(tmp_path: Path) -> None:
    text = """
    [tiers.gold]
    priority = 1
    protect_latency_s = 2.5
    [tiers.free]
    floor = 0.1
    """
    settings = load_settings(write(tmp_path, text), env={})
    gold, free = settings.tier("gold").core, settings.tier("free").core
    assert (gold.priority, gold.protect_latency_s, gold.floor) == (1, 2.5, 0.0)
    assert (free.priority, free.protect_latency_s, free.floor) == (0, 0.0, 0.1)


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("[tiers.free]\nweight = -1\n", "tiers.free.weight"),
        ("[tiers.free]\nweight = 'heavy'\n", "tiers.free.weight"),
        ("[tiers.free]\nmax_depth = 0\n", "tiers.free.max_depth"),
        ("[tiers.free]\nfloor = 1.5\n", "tiers.free.floor"),
        ("[tiers.free]\npriority = 'high'\n", "tiers.free.priority"),
        ("[tiers.free]\nprotect_latency_s = -1\n", "tiers.free.protect_latency_s"),
        ("[tiers.free]\nladder = ['cache', 'pray']\n", "tiers.free.ladder"),
        ("[[keys]]\nkey = 'k'\ntenant = 't'\ntier = 'gold'\n", "keys[0].tier"),
        ("[[keys]]\nkey_env = 'NOPE'\ntenant = 't'\ntier = 'free'\n", "keys[0].key_env"),
        ("[models.m]\nbackends = []\n", "models.m.backends"),
        ("[models.m]\nbackends = ['ftp://x']\n", "models.m.backends"),
        ("[models.m]\nbackends = ['http://127.0.0.1:8000/v1']\n", "models.m.backends.*without /v1"),
        (
            "[models.m]\nbackends = ['http://127.0.0.1:8000/v1/']\n",
            "models.m.backends.*without /v1",
        ),
        ("[models.m]\nbackends = ['demo']\nfallback = 'n'\n", "models.m.fallback"),
        ("[models.m]\nbackends = ['demo']\napi_key_env = 'NOPE'\n", "models.m.api_key_env"),
        ("[controller]\nmin_limit = 0\n", "controller.min_limit"),
        ("[controller]\ndecrease_factor = 2\n", "controller.decrease_factor"),
        ("[controller]\nmode = 'turbo'\n", "controller.mode"),
        ("[controller]\ngain = 1\n", "controller.gain"),
        ("[server]\nport = 70000\n", "server.port"),
        ("[sever]\nport = 1\n", "sever"),
        ("[demo_backend]\nmax_batch = 0\n", "demo_backend.max_batch"),
        ("[backend_limits]\nmax_connections = 0\n", "backend_limits.max_connections"),
        ("[backend_limits]\nread_timeout_s = -1.0\n", "backend_limits.read_timeout_s"),
        ("[backend_limits]\nretry_window_s = nan\n", "backend_limits.retry_window_s"),
    ],
)
def test_mistakes_name_the_field(tmp_path: Path, text: str, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        load_settings(write(tmp_path, text), env={})


def test_toml_syntax_errors_give_the_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="line 2"):
        load_settings(write(tmp_path, "[server]\nport = = 1\n"), env={})


def test_a_config_file_without_keys_has_none(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = 9000\n[models.x]\nbackends = ['http://127.0.0.1:9']\n")
    settings = load_settings(path, env={"SCHEDULER_KEY_SECRET": "s3cret"})
    assert settings.keys == ()
    assert any("no API keys configured" in line for line in startup_lines(settings))


def test_own_tiers_without_keys_name_nothing_the_user_did_not_write(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, "[tiers.gold]\nweight = 2\n"), env={})
    assert [t.core.name for t in settings.tiers] == ["gold"] and settings.keys == ()


def test_the_demo_tiers_have_quotas_and_say_so() -> None:
    settings = load_settings(None, env={})
    free = settings.tier("free").quotas
    assert (free.requests, free.period_s) == (10, 60.0) and free.tokens > 0
    for name in ("pro", "enterprise"):
        quotas = settings.tier(name).quotas
        assert quotas.requests > free.requests and quotas.tokens > free.tokens
    lines = startup_lines(settings)
    assert f"tier free: 10 requests and {free.tokens} tokens per 60 s per key" in lines[2]
    assert not any("no API keys" in line for line in lines)


@pytest.mark.parametrize(
    "url",
    [
        "redis://h1:7000,h2:7001/0",
        "redis://127.0.0.1:six/0",
        "http://127.0.0.1:6379",
        "redis://127.0.0.1:6379/zero",
        "redis://:6379",
    ],
)
def test_a_redis_url_is_checked_at_start(tmp_path: Path, url: str) -> None:
    with pytest.raises(ConfigError, match=r"^redis\.url: "):
        load_settings(write(tmp_path, f"[redis]\nurl = '{url}'\n"), env={})
    with pytest.raises(ConfigError, match=r"^SCHEDULER_REDIS_URL \(--redis-url\): "):
        load_settings(None, env={"SCHEDULER_REDIS_URL": url})


def test_good_redis_urls_pass() -> None:
    for url in ("redis://127.0.0.1:6379/0", "rediss://u:p@cache.local/2", "unix:///tmp/r.sock"):
        assert load_settings(None, env={"SCHEDULER_REDIS_URL": url}).redis_url == url
