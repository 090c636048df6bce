"""`scheduler calibrate` for real, against llama.cpp's `llama-server` (built once, cached)."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

from backends.redis.embedded import free_port
from scheduler.cli import main
from sim.calibration import running_from_metrics
from sim.scenario import parse_scenario
from tests.sim.test_calibration import TIER  # a tier to complete a scenario around a fit
from tests.support.llama_server import (
    MODEL_ALIAS,
    LlamaServer,
    ServerOptions,
    ensure_llama_server,
    ensure_model,
)

ENGINE_KEY = "CALIBRATE_TEST_ENGINE_KEY"  # the variable `--api-key-env` names


@pytest.fixture(scope="module")
def llama() -> Iterator[LlamaServer]:
    """An engine behind `--api-key`: its /v1 and /metrics want the key."""
    build = ensure_llama_server(log=print)
    key = f"engine-{uuid.uuid4().hex}"
    options = ServerOptions(parallel=2, ctx_size=2 * 2048, extra_args=("--api-key", key))
    with (
        LlamaServer(build, ensure_model(build), options) as server,
        pytest.MonkeyPatch.context() as env,
    ):
        env.setenv(ENGINE_KEY, key)
        yield server


def test_calibrate_writes_a_backends_section_and_prints_its_error(
    llama: LlamaServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "backends.toml"
    started = time.monotonic()
    argv = ["calibrate", "--url", llama.url, "--model", MODEL_ALIAS, "--out", str(out)]
    argv += ["--api-key-env", ENGINE_KEY]
    bounds = ["--prompts", "16,96", "--output-tokens", "8", "--max-concurrency", "4"]
    assert (
        main([*argv, *bounds, "--rounds", "1", "--max-requests", "40", "--time-limit", "30"]) == 0
    )
    assert time.monotonic() - started < 45
    printed = capsys.readouterr()
    assert "calibrate: concurrency   1, prompt" in printed.err  # progress, point by point
    header, _, *rows = printed.out.splitlines()
    assert header.split()[:5] == ["conc", "prompt", "ttft", "ms", "model"]
    table = [r.split() for r in rows if r[:1].isdigit()]
    bursts = [r for r in table if r[0].isdigit()]
    assert {r[0] for r in bursts} >= {"1", "2"} and len(bursts) >= 4
    assert all(r[4].endswith("%") and r[7].endswith("%") for r in bursts)
    # then a join per prompt length: 1 decoding (a batch of 2, one short), one joining
    joins = [r for r in table if r[0] == "1+1"]
    assert len(joins) == 2 and all(r[4].endswith("%") and r[5] == "-" for r in joins)
    assert "prefill_join_s = " in out.read_text(encoding="utf-8")
    gpu = parse_scenario(TIER + out.read_text(encoding="utf-8")).backends.gpu
    # the engine's own slots, from its requests_processing while a burst of 4 ran (a
    # throughput knee, the fallback, moves with the machine's noise)
    assert gpu.max_batch == 2
    assert "; batch 2; " in printed.out
    auth = {"authorization": f"Bearer {os.environ[ENGINE_KEY]}"}
    idle = httpx2.get(llama.url + "/metrics", headers=auth, timeout=5).text
    assert running_from_metrics(idle) == 0  # the metric, as this engine names it
    assert 0 < gpu.step_s(1) < 0.5  # a random 8-layer model: milliseconds per token


def test_calibrate_against_nothing_says_so_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["calibrate", "--url", url, "--model", "m", "--time-limit", "5"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("scheduler calibrate: ")


def test_calibrate_without_the_engines_key_says_so_in_one_line(
    llama: LlamaServer, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["calibrate", "--url", llama.url, "--model", MODEL_ALIAS, "--time-limit", "5"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "401" in err[0], err
    assert main([*argv, "--api-key-env", "NO_SUCH_VARIABLE_SET"]) == 2
    assert "NO_SUCH_VARIABLE_SET is not set" in capsys.readouterr().err
