"""Run states and the transitions between them, written down once and enforced by the store.

::

    queued ──► running ──► finished
      │  ▲       │ │ └────► failed ──► queued (retry / resume)
      │  │       │ └──────► cancelling ──► cancelled ──► queued (retry / resume)
      │  └───────┘ (daemon stopped or restarted: back in the queue, resuming from its checkpoint)
      └──► cancelled (a queued run is cancelled without ever starting)

``cancelling`` exists because a cancel is a request: the child saves a checkpoint first, which takes a moment, and
the request must survive a daemon crash in between (nothing is kept only in memory).
"""
from __future__ import annotations

QUEUED = "queued"
RUNNING = "running"
CANCELLING = "cancelling"
FINISHED = "finished"
FAILED = "failed"
CANCELLED = "cancelled"

STATES = (QUEUED, RUNNING, CANCELLING, FINISHED, FAILED, CANCELLED)
ACTIVE = (RUNNING, CANCELLING)
TERMINAL = (FINISHED, FAILED, CANCELLED)

TRANSITIONS: dict[str, tuple[str, ...]] = {
    QUEUED: (RUNNING, CANCELLED),
    RUNNING: (FINISHED, FAILED, CANCELLING, CANCELLED, QUEUED),
    CANCELLING: (CANCELLED, FAILED, FINISHED),
    FINISHED: (),
    FAILED: (QUEUED,),
    CANCELLED: (QUEUED,),
}


class TransitionError(ValueError):
    """A state change the table above does not allow (e.g. retrying a finished run)."""


def check_transition(current: str, new: str) -> None:
    if new not in TRANSITIONS.get(current, ()):
        allowed = ", ".join(TRANSITIONS.get(current, ())) or "nothing (it is final)"
        raise TransitionError(f"a {current} run cannot become {new}; from {current} it can become {allowed}")
