"""Everything the daemon knows, in one SQLite file (``<home>/runs.db``, WAL): runs, their events and metrics.

Nothing lives only in memory: a queued run, a cancel request, the last checkpoint and the child's pid are rows here,
so a daemon killed at any moment finds its work again on restart. Every state change goes through `transition`,
which enforces `lora_daemon.states.TRANSITIONS`.

Each thread gets its own connection (sqlite3 connections are per-thread); writes are serialised by one lock, which
is all the coordination one daemon process needs (a second daemon on the same home is refused at start).
"""
from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

import sqlite_utils

from . import fair, states

log = logging.getLogger(__name__)

LAST = "last"  # the run reference that means the newest run
EVERYONE = object()  # no user filter (a single-user daemon, or an admin)
JSON_COLUMNS = ("config", "versions", "publish", "plan", "phase")

RUN_COLUMNS: dict[str, type] = {
    "id": str, "name": str, "kind": str, "status": str, "priority": int,
    "config": str, "config_hash": str, "dataset_fingerprint": str, "versions": str, "publish": str,
    "device": str, "created_at": float, "started_at": float, "finished_at": float,
    "step": int, "total_steps": int, "loss": float, "lr": float, "it_s": float, "eta_s": float, "peak_mem_mb": float,
    "checkpoint": str, "output_file": str, "published_file": str, "preview_file": str,
    "error": str, "advice": str, "attempts": int, "resume": int, "pid": int, "pid_create_time": float,
    "run_dir": str, "exit_code": int, "events_offset": int, "log_offset": int, "log_tail": str,
}


class StoreError(RuntimeError):
    """The database cannot be used as is (written by a newer daemon, or damaged)."""


class NotFound(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; users should read plain text
        return str(self.args[0])


def _migrate_v1(db: sqlite_utils.Database) -> None:
    db["runs"].create(RUN_COLUMNS, pk="id", not_null={"status", "kind", "created_at"},
                      defaults={"priority": 0, "step": 0, "attempts": 0, "resume": 0, "events_offset": 0,
                                "log_offset": 0})
    db["runs"].create_index(["status", "priority", "created_at"])
    db["events"].create({"id": int, "run_id": str, "type": str, "time": float, "data": str}, pk="id")
    db["events"].create_index(["run_id", "id"])
    db["metrics"].create({"run_id": str, "step": int, "loss": float, "lr": float, "time": float},
                         pk=("run_id", "step"))


def _migrate_v2(db: sqlite_utils.Database) -> None:
    """The memory plan the run worked out as its first phase, and what a running run does besides steps (e.g.
    rendering samples: prompt i of n, denoising step), both JSON and shown in the run's row."""
    db["runs"].add_column("plan", str)
    db["runs"].add_column("phase", str)


def _migrate_v3(db: sqlite_utils.Database) -> None:
    """Pausing: why a run was paused (``generation`` when the WebUI wants the card, ``user``), when, and
    ``first`` — a resumed run goes before every other queued run, since it held the card when it was paused."""
    db["runs"].add_column("pause_reason", str)
    db["runs"].add_column("paused_at", float)
    db["runs"].add_column("first", int, not_null_default=0)


def _migrate_v4(db: sqlite_utils.Database) -> None:
    """A shared daemon (users.yaml): who queued each run (``user``; null on a single-user daemon and for older
    runs), and ``solo`` — a run that ran out of memory beside other runs starts again only on an idle device."""
    db["runs"].add_column("user", str)
    db["runs"].add_column("solo", int, not_null_default=0)
    db["runs"].create_index(["user", "status"])


def _migrate_v5(db: sqlite_utils.Database) -> None:
    """The user's 👍/👎 on a run (``rating``: up, down or null), which `recommend` learns from."""
    db["runs"].add_column("rating", str)


# One function per schema version, applied in order; a released entry is never edited, only appended to.
MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [_migrate_v1, _migrate_v2, _migrate_v3, _migrate_v4,
                                                             _migrate_v5]
SCHEMA_VERSION = len(MIGRATIONS)


def schema_version(db: sqlite_utils.Database) -> int:
    if "schema" not in db.table_names():
        return 0
    row = db.execute("select max(version) from schema").fetchone()
    return int(row[0] or 0)


def migrate(db: sqlite_utils.Database) -> int:
    """Bring the file up to `SCHEMA_VERSION`, refusing one written by a newer daemon rather than guessing."""
    current = schema_version(db)
    if current > SCHEMA_VERSION:
        raise StoreError(f"{db.conn.execute('pragma database_list').fetchone()[2]}: written by a newer lora-daemon "
                         f"(schema {current}); this one understands up to schema {SCHEMA_VERSION}")
    for version in range(current + 1, SCHEMA_VERSION + 1):
        with db.conn:
            MIGRATIONS[version - 1](db)
            db["schema"].insert({"version": version, "applied_at": time.time()}, pk="version")
        log.info("runs.db migrated to schema %d", version)
    return SCHEMA_VERSION


def _row_to_record(row: dict) -> dict:
    rec = dict(row)
    for col in JSON_COLUMNS:
        if rec.get(col):
            rec[col] = json.loads(rec[col])
    return rec


class Store:
    """The runs database. Methods return plain dicts (JSON-ready run records)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._lock = threading.RLock()
        db = self.db
        db.execute("pragma journal_mode=wal")
        with self._lock:
            migrate(db)

    @property
    def db(self) -> sqlite_utils.Database:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite_utils.Database(self.path)
            db.execute("pragma busy_timeout=10000")
            db.execute("pragma synchronous=normal")
            self._local.db = db
        return db

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    # --- runs -----------------------------------------------------------------------------------------------
    def insert_run(self, record: dict) -> dict:
        row = {k: (json.dumps(v) if k in JSON_COLUMNS and v is not None else v) for k, v in record.items()}
        with self._lock, self.db.conn:
            self.db["runs"].insert(row)
        return self.get_run(record["id"])

    def get_run(self, run_id: str) -> dict:
        rows = list(self.db.query("select * from runs where id = ?", [run_id]))
        if not rows:
            raise NotFound(f"no run {run_id!r}")
        return _row_to_record(rows[0])

    def find_run(self, ref: str, user: Any = EVERYONE) -> dict:
        """A run as people name it after `lora-daemon show`: its id, ``last`` (the newest run), its name (the newest
        run of that name), or any part of the id that only one run has (ids are timestamps, so the distinctive part
        is the random tail: ``cancel 4ef``). With `user` (a shared daemon), only that user's runs exist: another
        user's run is "no run", not "not yours", so ids and names of others' runs are not revealed."""
        if not isinstance(ref, str) or not ref:
            raise NotFound("run: give a run id")
        scope, scoped = ("", []) if user is EVERYONE else (" and user is ?", [user])
        rows = list(self.db.query(f"select * from runs where id = ?{scope}", [ref, *scoped]))
        if not rows and ref == LAST:
            rows = list(self.db.query(f"select * from runs where 1{scope} order by created_at desc, rowid desc "
                                      f"limit 1", scoped))
            if not rows:
                raise NotFound("no runs yet, so no 'last' run")
        if not rows:
            rows = list(self.db.query(f"select * from runs where name = ?{scope} order by created_at desc, "
                                      f"rowid desc limit 1", [ref, *scoped]))
        if not rows:
            escaped = ref.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            rows = list(self.db.query(f"select * from runs where id like ? escape '\\'{scope} order by created_at "
                                      f"limit 6", [f"%{escaped}%", *scoped]))
            prefixed = [r for r in rows if r["id"].startswith(ref)]
            rows = prefixed if len(prefixed) == 1 else rows
        if len(rows) != 1:
            if not rows:
                raise NotFound(f"no run {ref!r} (give its id, any part of the id only one run has, its name, or 'last')")
            shown = ", ".join(r["id"] for r in rows[:5]) + (", …" if len(rows) > 5 else "")
            raise NotFound(f"{ref!r} matches more than one run ({shown}); give more of the id")
        return _row_to_record(rows[0])

    def list_runs(self, include_all: bool = False, recent: int = 20, user: Any = EVERYONE) -> list[dict]:
        """Active and queued runs (in the order they will run) plus the most recent others; `--all` gives all.
        With `user`, only that user's runs (a shared daemon's non-admin)."""
        order = "order by case status when 'running' then 0 when 'cancelling' then 0 when 'pausing' then 0 " \
                "when 'paused' then 0 when 'queued' then 1 else 2 end," \
                " case when status = 'queued' then -first else 0 end, " \
                " case when status = 'queued' then -priority else 0 end, " \
                " case when status = 'queued' then created_at else -created_at end"
        scope, scoped = ("", []) if user is EVERYONE else ("where user is ? ", [user])
        rows = list(self.db.query(f"select * from runs {scope}{order}", scoped))
        if not include_all:
            keep = [r for r in rows if r["status"] not in states.TERMINAL]
            rows = keep + [r for r in rows if r["status"] in states.TERMINAL][:recent]
        records = [_row_to_record(r) for r in rows]
        queued = [r for r in records if r["status"] == states.QUEUED]
        if user is EVERYONE and len({r.get("user") for r in queued}) > 1:  # several users: their turns, as claimed
            fair_order = iter([d.run for d in fair.order(queued, self.queue_state())])
            records = [next(fair_order) if r["status"] == states.QUEUED else r for r in records]
        return records

    def shared_device(self, run: dict) -> bool:
        """Did another run use `run`'s device while it ran (since its latest start)? An OOM then may be the
        neighbour's doing, so the run gets another try with the device to itself."""
        return bool(self.db.execute(
            "select count(*) from runs where id != ? and device = ? and started_at is not null and "
            "(finished_at is null or finished_at > ?) and started_at < ? and "
            "(status in ('running', 'cancelling', 'pausing', 'paused') or finished_at is not null)",
            [run["id"], run.get("device"), run.get("started_at") or 0, time.time()]).fetchone()[0])

    def count_user(self, user: Optional[str], status: str) -> int:
        return self.db.execute("select count(*) from runs where user is ? and status = ?", [user, status]).fetchone()[0]

    def runs_in(self, statuses: Iterable[str]) -> list[dict]:
        statuses = list(statuses)
        marks = ",".join("?" * len(statuses))
        return [_row_to_record(r) for r in
                self.db.query(f"select * from runs where status in ({marks}) order by created_at", statuses)]

    def count(self, status: str) -> int:
        return self.db.execute("select count(*) from runs where status = ?", [status]).fetchone()[0]

    def update_run(self, run_id: str, **fields: Any) -> None:
        """Progress fields only; a status change must go through `transition`."""
        if "status" in fields:
            raise ValueError("use transition() to change a run's status")
        self._update(run_id, fields)

    def _update(self, run_id: str, fields: dict) -> None:
        row = {k: (json.dumps(v) if k in JSON_COLUMNS and v is not None else v) for k, v in fields.items()}
        with self._lock, self.db.conn:
            self.db["runs"].update(run_id, row)

    def transition(self, run_id: str, new: str, expect: Optional[Iterable[str]] = None, **fields: Any) -> dict:
        """Move a run to `new` if the table allows it (and, with `expect`, only from one of those states)."""
        with self._lock:
            current = self.get_run(run_id)["status"]
            if expect is not None and current not in expect:
                raise states.TransitionError(f"run {run_id} is {current}, not {' or '.join(expect)}")
            states.check_transition(current, new)
            self._update(run_id, {**fields, "status": new})
        return self.get_run(run_id)

    def move(self, run_id: str, targets: Mapping[str, str],
             fields: Optional[Mapping[str, dict]] = None) -> tuple[str, dict]:
        """Move a run by the state it is in *now*: `targets` maps each state it may be in to the state it goes to
        (the same state: left as it is), `fields` the extra columns to write per new state. Read and write happen
        under one lock, so a command acting on an older snapshot cannot lose a race with the scheduler (a cancel
        right after submit once failed with "is running, not queued" when a worker claimed the run in between).
        Returns the state it was in and the run as it is now."""
        with self._lock:
            current = self.get_run(run_id)["status"]
            if current not in targets:
                raise states.TransitionError(f"run {run_id} is already {current}")
            new = targets[current]
            if new != current:
                states.check_transition(current, new)
                self._update(run_id, {**(fields or {}).get(new, {}), "status": new})
        return current, self.get_run(run_id)

    def claim_next(self, device: "str | fair.Device",
                   role_of: Optional[Callable[[Optional[str]], Any]] = None) -> Optional[dict]:
        """Take the next queued run for `device`: a resumed paused run first, then highest priority, then within a
        priority fair share between users by device time (`lora_daemon.fair`; one user: first come, first served).
        Nothing while a run paused on `device` holds it: the card was freed for the WebUI (or the user), and another
        run starting there would take it back. With a `fair.Device` (the workers), a run starts beside others on
        the device only when their memory plans fit together; a plain slot name claims regardless (one caller per
        slot). `role_of` gives a user's role, for limits that keep runs waiting (concurrent runs, GPU hours)."""
        slot = device if isinstance(device, str) else device.slot
        with self._lock:
            if self.db.execute("select count(*) from runs where status = 'paused' and device = ?",
                               [slot]).fetchone()[0]:
                return None
            queued = [_row_to_record(r) for r in self.db.query("select * from runs where status = 'queued'")]
            if not queued:
                return None
            state = self.queue_state(role_of)
            if isinstance(device, str):
                state.active = [r for r in state.active if r.get("device") != slot]  # no occupancy check
                target = fair.Device(slot, max_jobs=1)
            else:
                target = device
            run = fair.pick(queued, state, target)
            if run is None:
                return None
            return self.transition(run["id"], states.RUNNING, device=slot, started_at=time.time(),
                                   attempts=(run["attempts"] or 0) + 1, finished_at=None, first=0)

    def queue_state(self, role_of: Optional[Callable[[Optional[str]], Any]] = None) -> "fair.QueueState":
        """What the scheduler weighs besides the queue: runs holding a device and each user's device time today."""
        from .users import DAY_S, gpu_seconds

        now = time.time()
        active = [_row_to_record(r) for r in self.db.query(
            "select * from runs where status in ('running', 'cancelling', 'pausing', 'paused')")]
        recent = [dict(r) for r in self.db.query(
            "select user, status, started_at, finished_at, paused_at from runs where started_at is not null and "
            "(finished_at is null or finished_at > ?)", [now - DAY_S])]
        return fair.QueueState(active=active, used_s=gpu_seconds(recent, now),
                               role_of=role_of or (lambda user: None))

    # --- events and metrics ---------------------------------------------------------------------------------
    def add_event(self, event: dict) -> None:
        data = {k: v for k, v in event.items() if k not in ("type", "time", "run_id")}
        with self._lock, self.db.conn:
            self.db["events"].insert({"run_id": event.get("run_id"), "type": event["type"],
                                      "time": event.get("time", time.time()), "data": json.dumps(data)})

    def events(self, run_id: str, types: Optional[Iterable[str]] = None, last: Optional[int] = None) -> list[dict]:
        """A run's stored events, oldest first (only `types`, when given; only the `last` N, when given)."""
        wanted = list(types) if types else []
        where = "run_id = ?" + (f" and type in ({','.join('?' * len(wanted))})" if wanted else "")
        sql = f"select * from events where {where} order by id desc" + (" limit ?" if last else "")
        rows = list(self.db.query(sql, [run_id, *wanted] + ([int(last)] if last else [])))
        return [{"type": r["type"], "time": r["time"], "run_id": r["run_id"], **json.loads(r["data"])}
                for r in reversed(rows)]

    def pending_publications(self) -> list[tuple[str, dict]]:
        """(run id, publication) of every publish in progress: names chosen and stored but not yet finished."""
        rows = self.db.query("select id, publish from runs where published_file is null and publish like ?",
                             ['%"pending"%'])
        found = []
        for row in rows:
            pending = (json.loads(row["publish"] or "{}") or {}).get("pending")
            if isinstance(pending, dict):
                found.append((row["id"], pending))
        return found

    def add_metric(self, run_id: str, step: int, loss: Optional[float], lr: Optional[float], when: float) -> None:
        with self._lock, self.db.conn:
            self.db["metrics"].upsert({"run_id": run_id, "step": step, "loss": loss, "lr": lr, "time": when},
                                      pk=("run_id", "step"))

    def metrics(self, run_id: str, since_step: int = 0) -> list[dict]:
        return list(self.db.query("select step, loss, lr, time from metrics where run_id = ? and step > ? "
                                  "order by step", [run_id, since_step]))
