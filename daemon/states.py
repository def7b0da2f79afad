"""Run states and the transitions between them, written down once and enforced by the store.

::

    queued ──► running ──► finished
      │  ▲       │ │ └────► failed ──► queued (retry / resume)
      │  │       │ └──────► cancelling ──► cancelled ──► queued (retry / resume)
      │  └───────┘ (daemon stopped or restarted: back in the queue, resuming from its checkpoint)
      └──► cancelled (a queued run is cancelled without ever starting)

    running ──► pausing ──► paused ──► queued (resume: first in the queue, from its checkpoint)
                  │            └─────► cancelled
                  └──► finished / failed / cancelling (the child ended or was cancelled before it could pause)

``cancelling`` exists because a cancel is a request: the child saves a checkpoint first, which takes a moment, and
the request must survive a daemon crash in between (nothing is kept only in memory). ``pausing`` is the same kind of
request: the child saves a checkpoint and exits, and the run waits in ``paused`` (holding its device slot, so no other
queued run takes the card meanwhile) until `resume` puts it first in the queue; a paused run is a row like any other,
so it survives a daemon restart.
"""
from __future__ import annotations

QUEUED = "queued"
RUNNING = "running"
CANCELLING = "cancelling"
FINISHED = "finished"
FAILED = "failed"
CANCELLED = "cancelled"
PAUSING = "pausing"
PAUSED = "paused"

STATES = (QUEUED, RUNNING, CANCELLING, FINISHED, FAILED, CANCELLED, PAUSING, PAUSED)
ACTIVE = (RUNNING, CANCELLING, PAUSING)
TERMINAL = (FINISHED, FAILED, CANCELLED)

TRANSITIONS: dict[str, tuple[str, ...]] = {
    QUEUED: (RUNNING, CANCELLED),
    RUNNING: (FINISHED, FAILED, CANCELLING, CANCELLED, QUEUED, PAUSING),
    PAUSING: (PAUSED, FINISHED, FAILED, CANCELLING, CANCELLED),
    PAUSED: (QUEUED, CANCELLED),
    CANCELLING: (CANCELLED, FAILED, FINISHED),
    FINISHED: (),
    FAILED: (QUEUED,),
    CANCELLED: (QUEUED,),
}


# What `cancel` does from each state: a run without a child stops on the spot; one with a child is asked to save and
# stop (cancelling); one already cancelling stays so. Applied by `Store.move`, atomically with the read.
CANCEL: dict[str, str] = {QUEUED: CANCELLED, PAUSED: CANCELLED, RUNNING: CANCELLING, PAUSING: CANCELLING,
                          CANCELLING: CANCELLING}


class TransitionError(ValueError):
    """A state change the table above does not allow (e.g. retrying a finished run)."""


def check_transition(current: str, new: str) -> None:
    if new not in TRANSITIONS.get(current, ()):
        allowed = ", ".join(TRANSITIONS.get(current, ())) or "nothing (it is final)"
        raise TransitionError(f"a {current} run cannot become {new}; from {current} it can become {allowed}")
