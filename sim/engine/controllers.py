"""Build the core's controller and gate from a `ControllerSpec`, and the four standard variants
that the comparison runs side by side."""

from __future__ import annotations

from dataclasses import replace

from scheduler.core import (
    AIMDController,
    Controller,
    FixedController,
    GateConfig,
    GateMode,
    GradientController,
)
from sim.engine.model import BackendPool, ControllerKind, ControllerSpec


def build_controller(spec: ControllerSpec) -> tuple[Controller, GateConfig]:
    gate = GateConfig(mode=spec.mode, burst_s=spec.burst_s)
    if spec.kind is ControllerKind.FIXED:
        return FixedController(spec.fixed_limit), gate
    if spec.kind is ControllerKind.GRADIENT:
        return GradientController(spec.gradient), gate
    return AIMDController(spec.aimd), gate


def pool_slots(pool: BackendPool) -> int:
    """Sequences the pool can run at once: the provisioned concurrency."""
    return pool.count * pool.gpu.max_batch


def standard_variants(
    base: ControllerSpec, pool: BackendPool, *, request_s: float, replicas: int = 1
) -> tuple[ControllerSpec, ...]:
    """AIMD in rate mode, AIMD in window mode, a fixed window, and Gradient2, all from `base`.

    The window variants keep `base`'s gains. The rate variant speaks requests per second, so
    its limits are the window's divided by `request_s`, the typical backend time of one
    request at a full batch (Little's law), unless `base.rate_aimd` gives them; the fixed
    window is the pool's batch slots, shared out among the `replicas`.
    """
    slots = pool_slots(pool) / replicas
    aimd = base.aimd
    per_s = 1.0 / max(request_s, pool.gpu.step_s(pool.gpu.max_batch))
    rate_aimd = base.rate_aimd or replace(
        aimd,
        initial_limit=max(1.0, aimd.initial_limit * per_s),
        min_limit=max(0.1, aimd.min_limit * per_s),
        max_limit=max(1.0, aimd.max_limit * per_s),
        increase_step=max(0.1, aimd.increase_step * per_s),
    )
    return (
        replace(base, kind=ControllerKind.AIMD, mode=GateMode.RATE, aimd=rate_aimd),
        replace(base, kind=ControllerKind.AIMD, mode=GateMode.WINDOW),
        replace(base, kind=ControllerKind.FIXED, mode=GateMode.WINDOW, fixed_limit=slots),
        replace(base, kind=ControllerKind.GRADIENT, mode=GateMode.WINDOW),
    )
