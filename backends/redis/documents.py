"""Shared documents in Redis: one key each, `{"version": n, "<field>": {...}}`.

What replicas share live, and change through the admin API (the controller's gains, the
SRE's levers), is one such document; each replica follows it (`scheduler.service.shared`).

Why Redis checks a deadline: the admin API answers within the Redis timeout, and a 503 must
mean "not applied anywhere". A write that reaches a paused Redis after the API gave up would
otherwise be applied later, behind the operator's back (every replica follows the document).
So a publish first reads Redis's clock, and the script refuses to write once Redis's clock is
past the caller's deadline. The version lives in the document itself: one key, one slot
(Redis Cluster), and the read-increment-write is one script. The clock is read on that key's
node too: on a cluster another node's clock may differ from the one that checks the deadline.

What a document means is its owner's; this module only stores it. Redis's failures are raised
as `RedisUnavailable`, translated here.
"""

from __future__ import annotations

from typing import Any

import coredis
import trio

from backends.redis.errors import translated_redis_errors

# ARGV: the body's JSON, the latest time (Redis's clock, s) it may be written, the lowest
# version, the body's field name
PUBLISH_SCRIPT = """
local t = redis.call('TIME')
if tonumber(t[1]) + tonumber(t[2]) / 1000000 > tonumber(ARGV[2]) then return 0 end
local version = tonumber(ARGV[3])
local old = redis.call('GET', KEYS[1])
if old then
  local ok, doc = pcall(cjson.decode, old)
  if ok and type(doc) == 'table' and type(doc.version) == 'number' then
    version = math.max(version, math.floor(doc.version) + 1)
  end
end
redis.call('SET', KEYS[1], '{"version": ' .. string.format('%d', version) ..
  ', "' .. ARGV[4] .. '": ' .. ARGV[1] .. '}')
return version
"""
CLOCK_SCRIPT = "return redis.call('TIME')"


async def publish_document(
    redis: coredis.Redis[Any],
    key: str,
    field: str,
    body_json: str,
    *,
    after: int,
    deadline_at: float,
) -> int:
    """Write `body_json` as the `field` of the document at `key`, with a version above `after`
    and the document's; return that version. Raises trio.TooSlowError (nothing written) when
    the write cannot happen by `deadline_at` (trio time), or RedisUnavailable."""
    with trio.fail_at(deadline_at), translated_redis_errors():
        # keyed: on a Redis Cluster, the clock of the node that checks the deadline
        clock: Any = await redis.eval(CLOCK_SCRIPT, keys=[key])
        redis_now = int(clock[0]) + int(clock[1]) / 1e6
        # Redis's clock read before now: its deadline is at or before ours
        not_after = redis_now + (deadline_at - trio.current_time())
        args: list[str | int] = [body_json, repr(not_after), after + 1, field]
        written: Any = await redis.eval(PUBLISH_SCRIPT, keys=[key], args=args)
        version = int(written)
    if not version:
        raise trio.TooSlowError(f"Redis took the {field} past their deadline; not written")
    return version


async def read_document(redis: coredis.Redis[bytes], key: str, *, timeout_s: float) -> bytes | None:
    """The document at `key` as stored (None: none); raises RedisUnavailable, a timeout
    included."""
    with translated_redis_errors(), trio.fail_after(timeout_s):
        return await redis.get(key)
