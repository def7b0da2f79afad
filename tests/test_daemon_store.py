"""The runs database on a real SQLite file: states enforced in one place, queue order, schema versions."""
from __future__ import annotations

import sqlite3
import time

import pytest

from lora_daemon import states
from lora_daemon.store import SCHEMA_VERSION, NotFound, Store, StoreError


def queued(store: Store, run_id: str, priority: int = 0) -> dict:
    return store.insert_run({"id": run_id, "name": run_id, "kind": "image", "status": states.QUEUED,
                             "priority": priority, "config": {"output": {"output_name": run_id}},
                             "created_at": time.time(), "run_dir": f"/tmp/{run_id}"})


def test_runs_are_claimed_by_priority_then_first_come_first_served(tmp_path):
    store = Store(tmp_path / "runs.db")
    for run_id, priority in (("a", 0), ("b", 0), ("c", 5), ("d", -1), ("e", 5)):
        queued(store, run_id, priority)
    order = [store.claim_next("cpu")["id"] for _ in range(5)]
    assert order == ["c", "e", "a", "b", "d"]
    assert store.claim_next("cpu") is None
    assert store.get_run("c")["attempts"] == 1 and store.get_run("c")["device"] == "cpu"


def test_a_finished_run_cannot_be_requeued_and_the_error_says_what_is_allowed(tmp_path):
    store = Store(tmp_path / "runs.db")
    queued(store, "r1")
    store.claim_next("cpu")
    store.transition("r1", states.FINISHED)
    with pytest.raises(states.TransitionError, match="a finished run cannot become queued"):
        store.transition("r1", states.QUEUED)
    with pytest.raises(ValueError, match="transition"):
        store.update_run("r1", status=states.QUEUED)
    assert store.get_run("r1")["status"] == states.FINISHED


def test_every_state_change_in_the_table_and_no_other_is_accepted():
    for current in states.STATES:
        for new in states.STATES:
            if new in states.TRANSITIONS[current]:
                states.check_transition(current, new)
            else:
                with pytest.raises(states.TransitionError):
                    states.check_transition(current, new)


def test_runs_survive_reopening_the_file(tmp_path):
    store = Store(tmp_path / "runs.db")
    queued(store, "keep-me", priority=3)
    store.close()
    again = Store(tmp_path / "runs.db")
    run = again.get_run("keep-me")
    assert run["status"] == states.QUEUED and run["priority"] == 3 and run["config"]["output"]["output_name"] == "keep-me"


def test_a_database_from_a_newer_daemon_is_refused_not_guessed_at(tmp_path):
    Store(tmp_path / "runs.db").close()
    with sqlite3.connect(tmp_path / "runs.db") as conn:
        conn.execute("insert into schema (version, applied_at) values (?, 0)", (SCHEMA_VERSION + 1,))
    with pytest.raises(StoreError, match="newer lora-daemon"):
        Store(tmp_path / "runs.db")


def test_run_ids_can_be_shortened_to_a_unique_prefix(tmp_path):
    store = Store(tmp_path / "runs.db")
    queued(store, "20250101-aaaa")
    queued(store, "20250101-aabb")
    assert store.find_run("20250101-aab")["id"] == "20250101-aabb"
    with pytest.raises(NotFound, match="more than one"):
        store.find_run("20250101-aa")
    with pytest.raises(NotFound, match="no run"):
        store.find_run("2024%")


def test_cancel_acts_on_the_state_the_run_is_in_when_it_changes_not_when_it_was_read(tmp_path):
    """The race CI hit: a client read 'queued', a worker claimed the run, then the cancel arrived."""
    store = Store(tmp_path / "runs.db")
    snapshot = queued(store, "r1")
    assert snapshot["status"] == states.QUEUED
    store.claim_next("cpu")  # the scheduler wins the race
    was, run = store.move(snapshot["id"], states.CANCEL, {states.CANCELLED: {"finished_at": 1.0}})
    assert (was, run["status"], run["finished_at"]) == (states.RUNNING, states.CANCELLING, None)
    was, run = store.move("r1", states.CANCEL)
    assert (was, run["status"]) == (states.CANCELLING, states.CANCELLING)  # a second cancel is a no-op
    queued(store, "r2")
    was, run = store.move("r2", states.CANCEL, {states.CANCELLED: {"finished_at": 1.0}})
    assert (was, run["status"], run["finished_at"]) == (states.QUEUED, states.CANCELLED, 1.0)
    with pytest.raises(states.TransitionError, match="r2 is already cancelled"):
        store.move("r2", states.CANCEL)
