"""Load test of the gateway with locust: the three demo tiers, and a spike.

Why a separate process: locust monkey-patches the standard library with gevent, which breaks
trio, so nothing here imports the service; it talks HTTP to a `scheduler serve` already
running. It only ever targets loopback: a host that is not 127.0.0.0/8, ::1 or `localhost`
stops the run before a request is sent (exit status 2), and the web UI binds 127.0.0.1.

    scheduler serve                      # terminal 1: the demo (gateway on 127.0.0.1:8080)
    locust -f locustfile.py --headless -u 50 -r 10 --run-time 60s --host http://127.0.0.1:8080

Users: Free (weight 6, slow), Pro (3), Enterprise (1, fast), each with its demo key, asking
for chat completions with a small `max_tokens`, some streamed. The shape (`SpikeShape`) holds
`-u` users, multiplies them by `--spike-factor` (4) from `--spike-at` for `--spike-seconds`
(by default the middle third of `--run-time`, 60 s when not given), goes back down, and
stops. A 429 or 503 with `Retry-After` is the gateway refusing or shedding as designed; it is
counted as a failure named after the tier and the error code, so the table shows who was shed.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import time
from typing import Any
from urllib.parse import urlsplit

from locust import HttpUser, LoadTestShape, between, events, task
from locust.exception import StopUser

DEFAULT_HOST = "http://127.0.0.1:8080"
DEFAULT_RUN_TIME_S = 60
MESSAGES = [{"role": "user", "content": "Say hello in five words."}]


def loopback_only(host: str | None) -> str:
    """`host` if it is an http(s) URL on a loopback address, else ValueError."""
    url = urlsplit(host or DEFAULT_HOST)
    name = url.hostname or ""
    if url.scheme not in ("http", "https") or not name:
        raise ValueError(f"{host!r} is not an http(s) URL")
    try:
        addresses = {ipaddress.ip_address(name)}
    except ValueError:
        if name != "localhost":
            raise ValueError(f"{name!r} is not a loopback address") from None
        infos = socket.getaddrinfo(name, url.port or 80, proto=socket.IPPROTO_TCP)
        addresses = {ipaddress.ip_address(info[4][0]) for info in infos}
    if not all(a.is_loopback for a in addresses):
        raise ValueError(f"{name!r} is not a loopback address")
    return host or DEFAULT_HOST


def _options(parser: Any) -> None:
    parser.set_defaults(web_host="127.0.0.1")  # the web UI too: locust's default is every interface
    parser.add_argument("--spike-factor", type=float, default=4.0, help="users x this in the spike")
    parser.add_argument("--spike-at", type=float, default=-1, help="s (default: a third in)")
    parser.add_argument("--spike-seconds", type=float, default=-1, help="s (default: a third)")


def _refuse_remote_hosts(environment: Any, **_: Any) -> None:
    try:
        loopback_only(environment.host)
    except ValueError as exc:
        logging.error("refusing to run: %s (loopback only)", exc)
        environment.process_exit_code = 2
        if environment.runner is not None:
            environment.runner.quit()


events.init_command_line_parser.add_listener(_options)  # type: ignore[no-untyped-call]
events.test_start.add_listener(_refuse_remote_hosts)  # type: ignore[no-untyped-call]


class TierUser(HttpUser):
    """One tier's client: chat completions with its demo key, some streamed."""

    abstract = True
    host = DEFAULT_HOST
    tier = ""
    key = ""
    max_tokens = 16

    def on_start(self) -> None:
        try:
            loopback_only(self.host)
        except ValueError as exc:
            logging.error("user stopped: %s (loopback only)", exc)
            raise StopUser() from exc

    def _post(self, *, stream: bool) -> None:
        body = {"model": "demo-small", "messages": MESSAGES, "max_tokens": self.max_tokens}
        name = f"chat {'stream ' if stream else ''}[{self.tier}]"
        with self.client.post(
            "/v1/chat/completions",
            data=json.dumps({**body, "stream": stream}),
            headers={"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"},
            name=name,
            stream=stream,
            allow_redirects=False,
            catch_response=True,
        ) as response:
            if response.status_code == 200:
                if stream and b"data: [DONE]" not in b"\n".join(response.iter_lines()):
                    response.failure("stream ended without data: [DONE]")
                else:
                    response.success()
                return
            code = _error_code(response.text)
            if response.status_code in (429, 503) and "retry-after" in response.headers:
                response.failure(f"{self.tier}: {response.status_code} {code} (with Retry-After)")
            else:
                response.failure(f"{self.tier}: unexpected {response.status_code} {code}")

    @task(3)
    def chat(self) -> None:
        self._post(stream=False)

    @task(1)
    def chat_stream(self) -> None:
        self._post(stream=True)


def _error_code(text: str) -> str:
    try:
        error = json.loads(text)["error"]
    except (ValueError, KeyError, TypeError):
        return ""
    return str(error.get("code") or error.get("type") or "")


class FreeUser(TierUser):
    weight = 6
    wait_time = between(1.0, 3.0)
    tier = "free"
    key = "sk-demo-free"
    max_tokens = 8


class ProUser(TierUser):
    weight = 3
    wait_time = between(0.5, 1.5)
    tier = "pro"
    key = "sk-demo-pro"


class EnterpriseUser(TierUser):
    weight = 1
    wait_time = between(0.2, 0.6)
    tier = "enterprise"
    key = "sk-demo-enterprise"
    max_tokens = 32


class SpikeShape(LoadTestShape):
    """`-u` users, then `--spike-factor` times as many for `--spike-seconds`, then `-u` again;
    stops at `--run-time` (60 s when not given). Ramps up at `-r`; the spike's edges take ~2 s."""

    use_common_options = True

    def tick(self) -> tuple[int, float] | None:
        options = self.runner.environment.parsed_options if self.runner else None
        total_s = float(getattr(options, "run_time", 0) or DEFAULT_RUN_TIME_S)
        now = time.perf_counter() - self.start_time  # get_run_time(), which is untyped
        if now >= total_s:
            return None
        base = max(1, int(getattr(options, "num_users", 0) or 1))
        rate = float(getattr(options, "spawn_rate", 0) or 1)
        at = getattr(options, "spike_at", -1)
        at = total_s / 3 if at is None or at < 0 else at
        length = getattr(options, "spike_seconds", -1)
        length = total_s / 3 if length is None or length < 0 else length
        peak = max(base, round(base * getattr(options, "spike_factor", 4.0)))
        edge = max(rate, (peak - base) / 2)  # the spike comes and goes within ~2 s
        if now < at:
            return base, rate
        return (peak, edge) if now < at + length else (base, edge)
