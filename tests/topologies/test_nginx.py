"""The README's nginx upstream example, run for real in front of three gateways on one Redis:
the quota holds exactly through it and every request is answered by a replica (skipped when
nginx is not installed; `.ci/run` installs it)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import httpx2
import pytest
import trio

from backends.redis.embedded import free_port
from tests.service.test_admin import ADMIN, chat
from tests.test_readme import README
from tests.topologies.test_topologies import gateways

NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed")


def nginx_config(tmp_path: Path, listen: int, upstreams: list[int]) -> Path:
    """The README's example with these ports, inside the few lines a whole file needs."""
    match = re.search(r"### Scaling out.*?```nginx\n(.*?)```", README, re.S)
    assert match is not None
    example = match.group(1).replace("listen 8000;", f"listen 127.0.0.1:{listen};")
    for readme_port, port in zip((8001, 8002, 8003), upstreams, strict=True):
        example = example.replace(f"127.0.0.1:{readme_port}", f"127.0.0.1:{port}")
    assert all(f"127.0.0.1:{port}" in example for port in upstreams)
    temp = tmp_path / "nginx"
    temp.mkdir()
    path = tmp_path / "nginx.conf"
    path.write_text(
        f"daemon off;\npid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\n"
        "events {}\nhttp {\n"
        f"access_log off;\nclient_body_temp_path {temp}/body;\nproxy_temp_path {temp}/proxy;\n"
        f"fastcgi_temp_path {temp}/f;\nuwsgi_temp_path {temp}/u;\nscgi_temp_path {temp}/s;\n"
        f"{example}}}\n"
    )
    return path


async def test_the_readme_nginx_example_balances_three_gateways(
    nursery: trio.Nursery, redis_url: str, tmp_path: Path
) -> None:
    urls = await gateways(nursery, redis_url, tmp_path, 3)
    listen = free_port()
    config = nginx_config(tmp_path, listen, [int(u.rsplit(":", 1)[1]) for u in urls])
    assert NGINX is not None
    process = subprocess.Popen([NGINX, "-c", str(config), "-p", str(tmp_path)])
    front = f"http://127.0.0.1:{listen}"
    try:
        async with httpx2.AsyncClient(timeout=10) as client:
            with trio.fail_after(30):
                while True:
                    try:
                        await client.get(front + "/healthz")
                        break
                    except httpx2.HTTPError:
                        assert process.poll() is None, (tmp_path / "error.log").read_text()
                        await trio.sleep(0.05)
                r = await client.post(
                    front + "/admin/v1/keys", json={"tenant": "t", "tier": "pro"}, headers=ADMIN
                )
                kid, key = r.json()["key_id"], r.json()["key"]
                r = await client.put(
                    f"{front}/admin/v1/keys/{kid}/quota", json={"requests": 4}, headers=ADMIN
                )
                assert r.status_code == 200
                await trio.sleep(0.6)  # the registry's cache time
                codes: list[int] = []

                async def call() -> None:
                    codes.append((await chat(client, front, key)).status_code)

                async with trio.open_nursery() as calls:
                    for _ in range(12):
                        calls.start_soon(call)
    finally:
        process.terminate()
        process.wait(timeout=10)
    assert sorted(codes) == [200] * 4 + [429] * 8
