"""Which queued run goes next, and why the others wait: fair share within a priority, limits, and GPU memory.

The policy — fair share by device time, not plain round-robin: within one priority (a resumed paused run still goes
first, then higher priority), the next run is the oldest queued run of the user who used the least device time in
the last 24 hours (running runs counted up to now); ties go to the user with fewer runs going, then to the older
run. Why not round-robin: turns are not equal when one user's runs take hours and another's minutes, and the time
on the card is what the team shares; it is also what ``gpu_hours_per_day`` counts, so one number drives both. One
user's 20 queued runs therefore never starve another's one, and someone who just trained for hours waits behind
someone who has not trained today. The queue display lists the later turns round-robin in that order: what runs
after the next depends on how long the next runs take, so it is a forecast, not a promise.

A device may run several runs at once (``--max-per-device``, 2–4 on a big card) when their memory plans fit together
with a margin (`PACK_MARGIN`): each run's plan is recorded before it starts (the daemon plans queued runs ahead when
packing is on), and a running run counts the larger of its plan and its measured peak. A run without a plan, a
caption or toolbox job, and a run that ran out of memory beside others (``solo``) only start on an idle device.

Pure functions over run records: `Store.claim_next` takes the first runnable run from `order`, and ``lora-daemon
queue`` shows `order`'s reasons, so what the queue says is what the scheduler does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from .users import Role

PACK_MARGIN = 0.10  # of a card's memory kept free beside packed runs: plans are estimates, allocators fragment
MB = float
ACTIVE = ("running", "cancelling", "pausing")


@dataclass
class Device:
    """One device slot as the scheduler sees it: how many runs it may take and how much memory it has."""

    slot: str
    max_jobs: int = 1
    memory_mb: Optional[MB] = None  # None: unknown, so no packing (one run at a time)


@dataclass
class Decision:
    run: dict
    position: int
    why: str
    runnable: bool = True


@dataclass
class QueueState:
    """What the policy needs to know besides the queued runs themselves."""

    active: list[dict] = field(default_factory=list)  # runs holding a device: running, pausing, paused
    used_s: dict[str, float] = field(default_factory=dict)  # device seconds per user (`users.gpu_seconds`)
    role_of: Callable[[Optional[str]], Optional[Role]] = lambda user: None


def memory_of(run: dict) -> Optional[MB]:
    """The memory a run needs: its plan's estimate, or its measured peak when larger; None when unknown."""
    plan = run.get("plan") or {}
    estimate = plan.get("estimate_mb") if isinstance(plan, dict) and not plan.get("error") else None
    peak = run.get("peak_mem_mb")
    known = [v for v in (estimate, peak) if isinstance(v, (int, float))]
    return max(known) if known else None


def _user(run: dict) -> str:
    return run.get("user") or "(owner)"


def fits_beside(run: dict, device: Device, on_device: list[dict]) -> tuple[bool, str]:
    """May `run` start on `device` now, beside the runs already there? (yes/no, and why not)."""
    if not on_device:
        return True, ""
    if any(r["status"] == "paused" for r in on_device):
        return False, f"device {device.slot} is held by a paused run"
    if len(on_device) >= device.max_jobs:
        return False, f"device {device.slot} runs {len(on_device)} of {device.max_jobs} at once"
    if run.get("solo"):
        return False, "needs a device of its own (it ran out of memory beside other runs)"
    if run["kind"] in ("caption", "tools"):
        return False, f"a {run['kind']} job runs on an idle device"
    need = memory_of(run)
    if need is None:
        return False, "no memory plan yet: starts on an idle device"
    if device.memory_mb is None:
        return False, f"device {device.slot}: memory size unknown (--device-memory-mb)"
    if any(r.get("solo") for r in on_device):
        return False, f"device {device.slot} runs a run that needs it alone"
    taken = [memory_of(r) for r in on_device]
    if any(t is None for t in taken):
        return False, f"device {device.slot} runs a run without a memory plan"
    usable = device.memory_mb * (1 - PACK_MARGIN)
    free = usable - sum(taken)
    if need > free:
        return False, f"needs ~{need:,.0f} MB; {max(free, 0):,.0f} MB free on device {device.slot}"
    return True, ""


def _limit_block(run: dict, state: QueueState) -> Optional[str]:
    """A user's limit that keeps this run waiting (concurrent runs, GPU hours), as the queue shows it."""
    role = state.role_of(run.get("user"))
    if role is None or role.admin:
        return None
    user = _user(run)
    if role.concurrent_runs is not None:
        going = sum(1 for r in state.active if r.get("user") == run.get("user") and r["status"] in ACTIVE)
        if going >= role.concurrent_runs:
            return (f"{user} has {going} running (role {role.name!r}: at most {role.concurrent_runs} at once)")
    if role.gpu_hours_per_day is not None and state.used_s.get(run.get("user") or "", 0) >= \
            role.gpu_hours_per_day * 3600:
        return f"{user} used {role.gpu_hours_per_day:g} GPU-hours today (role {role.name!r})"
    return None


def order(queued: list[dict], state: QueueState) -> list[Decision]:
    """The queue in the order the policy takes it (see the module docstring), each with why it is where it is.
    `queued` in any order; blocked runs (a limit) are listed last with their reason."""
    blocked, ready = [], []
    for run in queued:
        why = _limit_block(run, state)
        (blocked if why else ready).append((run, why))
    going: dict[str, int] = {}
    for r in state.active:
        if r["status"] in ACTIVE:
            going[_user(r)] = going.get(_user(r), 0) + 1

    groups: dict[tuple, list[dict]] = {}
    for run, _ in ready:
        groups.setdefault((-(run.get("first") or 0), -(run.get("priority") or 0)), []).append(run)
    decisions: list[Decision] = []
    for key in sorted(groups):
        runs = sorted(groups[key], key=lambda r: (r["created_at"], r["id"]))
        by_user: dict[str, list[dict]] = {}
        for run in runs:
            by_user.setdefault(_user(run), []).append(run)
        # users in fair-share order: least device time, then fewest runs going, then whose oldest run is oldest
        users = sorted(by_user, key=lambda u: (state.used_s.get("" if u == "(owner)" else u, 0.0), going.get(u, 0),
                                               by_user[u][0]["created_at"]))
        turn = 0
        while any(by_user[u] for u in users):
            for user in users:
                if not by_user[user]:
                    continue
                run = by_user[user].pop(0)
                used_h = state.used_s.get("" if user == "(owner)" else user, 0.0) / 3600
                if run.get("first"):
                    why = "resumed after a pause: it goes first"
                elif len(users) == 1:
                    why = f"priority {run.get('priority') or 0}, first come first served"
                else:
                    why = (f"priority {run.get('priority') or 0}; fair share: {user} used {used_h:.2f} GPU-h"
                           + (f", has {going[user]} running" if going.get(user) else "")
                           + (f"; turn {turn + 1}" if turn else ""))
                decisions.append(Decision(run, 0, why))
            turn += 1
    for run, why in sorted(blocked, key=lambda b: (b[0]["created_at"], b[0]["id"])):
        decisions.append(Decision(run, 0, "waiting: " + why, runnable=False))
    for i, decision in enumerate(decisions, 1):
        decision.position = i
    return decisions


def pick(queued: list[dict], state: QueueState, device: Device) -> Optional[dict]:
    """The run `device` should start now: the first runnable one in `order` that fits beside the device's runs.

    A run that fits nowhere yet does not let later runs overtake it on an idle device (it would wait forever behind
    small ones); beside running runs, a later small run may fill the space (that is what packing is for)."""
    on_device = [r for r in state.active if r.get("device") == device.slot]
    for decision in order(queued, state):
        if not decision.runnable:
            continue
        ok, _ = fits_beside(decision.run, device, on_device)
        if ok:
            return decision.run
        if not on_device:
            return None
    return None


def explain(queued: list[dict], state: QueueState, devices: list[Device]) -> list[dict]:
    """`order` for people (``lora-daemon queue``): position, run, user, priority and why it is where it is."""
    rows = []
    for d in order(queued, state):
        why = d.why
        if d.runnable:
            reasons = []
            for device in devices:
                ok, reason = fits_beside(d.run, device, [r for r in state.active if r.get("device") == device.slot])
                if ok:
                    reasons = []
                    break
                reasons.append(reason)
            if reasons:
                why = f"waiting: {'; '.join(reasons)}; {why}"
            elif d.position == 1:
                why = f"next: {why}"
        rows.append({"position": d.position, "id": d.run["id"], "name": d.run["name"], "user": d.run.get("user"),
                     "priority": d.run.get("priority") or 0, "memory_mb": memory_of(d.run), "why": why,
                     "runnable": d.runnable})
    return rows
