"""The project's one exception root, and its whole tree.

Failures are exceptions, split by who is to blame (the caller, the operator's config, or an
upstream: Redis, a backend, a probe); rejections (over quota, shed) are values, not errors.
Foreign exceptions (coredis, h11, OSError, `trio.TooSlowError`) are translated once, in the
adapter that meets them, with `raise ... from exc`; the service catches only these.

    SchedulerError
    ├── ConfigError (ValueError)        the operator's config: scheduler/service/config.py
    ├── ListenError                     the listen address cannot be bound: service/serve.py
    ├── KeysUnavailable                 a key not checkable now (503, not 401): service/tenancy.py
    ├── OpenAIError                     a wire-format error: scheduler/openai/errors.py
    │   ├── ApiError                    an answer with a status (the caller's or ours)
    │   └── DemoError                   the demo server's answers: backends/demo/openai.py
    ├── EngineStopped                   the demo engine is shut: backends/demo/engine.py
    ├── RedisUnavailable                Redis gone, late or refusing: backends/redis/errors.py
    ├── QuotaStoreError                 Redis refused a quota command: backends/redis/quota.py
    │   ├── QuotaStoreUnavailable       Redis gone or late
    │   │   └── QuotaStoreTimeout       late: slow or gone, it may still run the script
    │   └── QuotaStoreBusy              the key's slot is moving (routing, not health)
    ├── CacheError                      Redis refused a cache command: backends/redis/cache.py
    │   └── CacheUnavailable            Redis gone or late
    ├── BackendError                    an HTTP backend failed: backends/http/client.py
    │   ├── BackendUnavailable          refused or unreachable (nothing was sent)
    │   ├── BackendTimeout              no answer in time
    │   │   ├── BackendDeadline         a read outlasted the response's `deadline_at`
    │   │   └── DeadlinePassed          the request's own bound ran out: service/upstream.py
    │   └── BackendBroken               the answer broke off or made no sense
    │       └── BackendTooLarge         past `BackendLimits.max_response_bytes`
    ├── ScrapeError                     a metrics scrape failed: backends/probes/metrics.py
    ├── NvmlUnavailable                 no NVML here: backends/probes/nvml.py
    ├── ScenarioError (ValueError)      a bad scenario file: sim/scenario_schema.py
    └── SweepError (ValueError)         a bad sweep: sim/sweep.py

This module is pure (stdlib only), so every part, pure or not, may import it.
"""

from __future__ import annotations


class SchedulerError(Exception):
    """The root of every exception the project raises on purpose."""
