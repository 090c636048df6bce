"""The controller's gains have one owner: changes from the admin API, SIGHUP's reload and the
follower apply one at a time, in the order they were sent, each on the gains the one before
left; the latest one wins, here and in Redis (scheduler.service.gains).

The race the owner closes: a change still in flight (Redis slow) when the next one is sent.
Redis is paused (`CLIENT PAUSE`) to hold the first change in flight, deterministically."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import coredis
import httpx2
import pytest
import trio
import trio.testing

from scheduler.core import AIMDConfig, AIMDController
from scheduler.service.config import gains_from_dict, load_settings
from scheduler.service.gains import GainsOwner
from scheduler.service.metrics import GatewayMetrics
from scheduler.service.serve import with_demo_url
from tests.conftest import start_demo, start_gateway
from tests.service.test_admin import ADMIN, CONFIG, TOKEN, eventually

FILE_GAINS = AIMDConfig(increase_step=4.0, target_latency_s=2.0)  # what the config file says
PAUSE_MS = 300


@dataclasses.dataclass
class Rig:
    owner: GainsOwner
    redis: coredis.Redis[bytes]
    key: str

    async def document(self) -> tuple[int, AIMDConfig]:
        raw = await self.redis.get(self.key)
        assert raw is not None
        document = json.loads(raw)
        return int(document["version"]), gains_from_dict(document["gains"])

    async def hold_the_next_change(self) -> None:
        """Redis answers nobody for PAUSE_MS: what is sent now stays in flight that long."""
        await self.redis.client_pause(PAUSE_MS)


@pytest.fixture
async def rig(nursery: trio.Nursery, redis_url: str) -> AsyncIterator[Rig]:
    """An owner on the controller of one replica, on a real Redis, following it."""
    key = f"gains-{uuid.uuid4().hex}:control:gains"
    metrics = GatewayMetrics.from_settings(load_settings(None, env={}))
    async with coredis.Redis.from_url(redis_url) as redis:
        owner = GainsOwner(
            AIMDController(FILE_GAINS), key=key, shared=True, redis=lambda: redis, metrics=metrics
        )
        await nursery.start(owner.run)
        yield Rig(owner, redis, key)


def deadline() -> float:
    return trio.current_time() + 5


async def test_an_admin_change_sent_while_a_reload_is_in_flight_lands_on_the_reload(
    rig: Rig, nursery: trio.Nursery
) -> None:
    """Reload, then an admin change: the file's gains with the change on top. (Had the
    change been made on the gains it saw when sent, the reload's target would be lost.)"""
    with trio.fail_after(10):
        await rig.owner.change(
            {"increase_step": 5, "target_latency_s": 9.0}, deadline_at=deadline()
        )
        version, _ = await rig.document()
        await rig.hold_the_next_change()
        reloaded: list[AIMDConfig] = []

        async def reload() -> None:
            reloaded.append(await rig.owner.replace(FILE_GAINS, deadline_at=deadline()))

        nursery.start_soon(reload)
        await trio.testing.wait_all_tasks_blocked()  # the reload waits on the paused Redis
        assert rig.owner.config.target_latency_s == 9.0  # not applied yet: still in flight
        changed = await rig.owner.change({"increase_step": 6}, deadline_at=deadline())
        assert reloaded == [FILE_GAINS]
        assert changed == dataclasses.replace(FILE_GAINS, increase_step=6)
        assert rig.owner.config == changed
        assert await rig.document() == (version + 2, changed)


async def test_a_reload_sent_while_an_admin_change_is_in_flight_wins(
    rig: Rig, nursery: trio.Nursery
) -> None:
    """An admin change, then a reload of the unchanged file: the file's gains, everywhere."""
    with trio.fail_after(10):
        await rig.owner.change({"increase_step": 1}, deadline_at=deadline())
        version, _ = await rig.document()
        await rig.hold_the_next_change()
        changed: list[AIMDConfig] = []

        async def admin_change() -> None:
            changes = {"increase_step": 7, "target_latency_s": 9.0}
            changed.append(await rig.owner.change(changes, deadline_at=deadline()))

        nursery.start_soon(admin_change)
        await trio.testing.wait_all_tasks_blocked()
        reloaded = await rig.owner.replace(FILE_GAINS, deadline_at=deadline())
        assert changed == [dataclasses.replace(FILE_GAINS, increase_step=7, target_latency_s=9.0)]
        assert reloaded == FILE_GAINS == rig.owner.config
        assert await rig.document() == (version + 2, FILE_GAINS)


async def test_a_stale_document_from_the_follower_does_not_undo_a_change(rig: Rig) -> None:
    """What the follower read before a change was published is older than it: left alone."""
    with trio.fail_after(10):
        await rig.owner.change({"increase_step": 2}, deadline_at=deadline())
        stale = await rig.redis.get(rig.key)
        assert stale is not None
        changed = await rig.owner.change({"increase_step": 3}, deadline_at=deadline())
        rig.owner.document._take(stale)  # as the follower's read, arriving late
        assert rig.owner.config == changed


async def test_a_refused_change_changes_nothing_and_the_next_one_goes_through(rig: Rig) -> None:
    with trio.fail_after(10):
        before = rig.owner.config
        with pytest.raises(ValueError, match="decrease_factor"):
            await rig.owner.change({"decrease_factor": 2.0}, deadline_at=deadline())
        with pytest.raises(trio.TooSlowError):  # Redis cannot take it by its deadline
            await rig.owner.change({"increase_step": 9}, deadline_at=trio.current_time())
        assert rig.owner.config == before
        changed = await rig.owner.change({"increase_step": 8}, deadline_at=deadline())
        assert (await rig.document())[1] == changed == rig.owner.config


async def gains(client: httpx2.AsyncClient, url: str) -> dict[str, Any]:
    r = await client.get(url + "/admin/v1/controller", headers=ADMIN)
    assert r.status_code == 200, r.text
    return dict(r.json()["gains"])


async def test_sighup_after_an_admin_change_restores_the_files_gains_on_every_replica(
    nursery: trio.Nursery, redis_url: str, tmp_path: Path
) -> None:
    """The README's `kill -HUP` reloads the gains from the file: an admin change made since
    is replaced by the file's gains, on this replica and (through Redis) on the others."""
    demo = await start_demo(nursery)
    path = tmp_path / "gains.toml"
    controller = "[controller]\nincrease_step = 4\ntarget_latency_s = 2.0\n"
    path.write_text(CONFIG.replace("{prefix}", f"gains-{uuid.uuid4().hex}") + controller)
    settings = load_settings(path, env={"SCHEDULER_ADMIN_TOKEN": TOKEN}, overrides={"port": 0})
    settings = dataclasses.replace(with_demo_url(settings, demo), redis_url=redis_url)
    a = await start_gateway(nursery, settings)  # reloads its file on SIGHUP
    b = await start_gateway(nursery, dataclasses.replace(settings, source=None))  # follows
    async with httpx2.AsyncClient(timeout=10) as client:
        with trio.fail_after(20):
            change = {"increase_step": 7, "target_latency_s": 9.0}
            r = await client.put(a + "/admin/v1/controller", json=change, headers=ADMIN)
            assert r.status_code == 200, r.text

            async def b_changed() -> bool:
                return bool((await gains(client, b))["increase_step"] == 7)

            await eventually(b_changed, 5)
            os.kill(os.getpid(), signal.SIGHUP)

            async def reloaded_everywhere() -> bool:
                seen = [await gains(client, url) for url in (a, b)]
                return all((g["increase_step"], g["target_latency_s"]) == (4, 2.0) for g in seen)

            await eventually(reloaded_everywhere, 10)
