"""A daemon a team shares: users.yaml roles and limits, who sees which runs, per-user folders (issue 16, part 1).

Real parts: a real daemon process with a users.yaml in its home, real clients naming their user the way the CLI,
the tab and the REST routes do, real tiny runs. A paused run (the owner's) holds the one CPU slot while the queue
is filled, so what is queued and what is refused does not depend on how fast anything trains.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import shutil
import textwrap
from pathlib import Path

import pytest

from daemon_fixtures import ROOT, daemon_factory, run_config, wait_until  # noqa: F401  (fixtures)
from lora_daemon.client import DaemonError
from lora_daemon.users import Refused, Role, UsersFileError, check_submit, parse_users

USERS_YAML = """\
roles:
  admin: {admin: true}
  member: {max_priority: 5, queued_runs: 3}
  guest:
    max_priority: 0
    queued_runs: 1
    max_steps: 20
    max_resolution: 64
    max_rank: 4
users:
  root: admin
  alice: member
  bob: guest
"""


def write_users(home: Path, text: str = USERS_YAML) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    path = home / "users.yaml"
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------- the file itself
def test_a_bad_users_file_is_refused_with_the_line_and_the_field(tmp_path):
    text = textwrap.dedent("""\
        roles:
          guest:
            queued_runs: -1
            max_rank: lots
            colour: blue
        users:
          bob: guest
          carol: boss
          ../evil: guest
        default_role: nobody
        publish: sideways
    """)
    with pytest.raises(UsersFileError) as e:
        parse_users(text, tmp_path / "users.yaml")
    message = str(e.value)
    assert f"{tmp_path / 'users.yaml'} line 3: roles.guest.queued_runs: must be a whole number ≥ 0, got -1" in message
    assert "line 4: roles.guest.max_rank: must be a whole number ≥ 1, got 'lots'" in message
    assert "line 5: roles.guest.colour: unknown limit" in message
    assert "line 8: users.carol: role 'boss' is not under roles: (one of guest)" in message
    assert "line 9: users.../evil: a user name is" in message
    assert "line 10: default_role: role 'nobody' is not under roles:" in message
    assert "line 11: publish: one of subfolder, prefix, got 'sideways'" in message
    with pytest.raises(UsersFileError, match=r"users.yaml line 3: not valid YAML: expected .,. or .\]."):
        parse_users("roles:\n  guest: {queued_runs: [1\n", tmp_path / "users.yaml")


def test_each_limit_refuses_by_name_and_an_admin_is_never_limited(tmp_path):
    users = parse_users(USERS_YAML, tmp_path / "users.yaml")
    guest = users.role_of("bob")
    cfg = {"training": {"max_train_steps": 10}, "data": {"resolution": 64}, "model": {"lora_rank": 4,
                                                                                          "base_model": "/m/a"}}
    check_submit(guest, "bob", cfg, 0, 0, 0.0)  # within every limit
    cases = [
        (dict(priority=1), "role 'guest': priority at most 0, got 1"),
        (dict(queued=1), "role 'guest': at most 1 queued run (bob has 1 waiting)"),
        (dict(cfg={**cfg, "training": {"max_train_steps": 21}}), "role 'guest': at most 20 steps, got "
                                                                 "training.max_train_steps=21"),
        (dict(cfg={**cfg, "training": {}}), "role 'guest': at most 20 steps: set training.max_train_steps"),
        (dict(cfg={**cfg, "data": {"resolution": 128}}), "role 'guest': resolution at most 64"),
        (dict(cfg={**cfg, "model": {"lora_rank": 8}}), "role 'guest': rank at most 4, got model.lora_rank=8"),
    ]
    for change, expected in cases:
        args = {"cfg": cfg, "priority": 0, "queued": 0, **change}
        with pytest.raises(Refused) as e:
            check_submit(guest, "bob", args["cfg"], args["priority"], args["queued"], 0.0)
        assert str(e.value).startswith(expected), (change, str(e.value))
    hours = Role("trial", gpu_hours_per_day=0.5, base_model_folders=(str(tmp_path / "shared"),))
    with pytest.raises(Refused, match=r"role 'trial': at most 0.5 GPU-hours per day \(bob used 0.50"):
        check_submit(hours, "bob", cfg, 0, 0, 1800.0)
    with pytest.raises(Refused, match=r"role 'trial': base models only from .*shared, got model.base_model=/m/a"):
        check_submit(hours, "bob", cfg, 0, 0, 0.0)
    check_submit(hours, "bob", {**cfg, "model": {"base_model": str(tmp_path / "shared" / "sd15.safetensors")}},
                 0, 0, 0.0)
    check_submit(users.role_of("root"), "root", {**cfg, "training": {"max_train_steps": 10**6}}, 99, 50, 1e9)
    with pytest.raises(Refused, match="user 'carol': not in .*users.yaml and it sets no default_role"):
        users.role_of("carol")


# ------------------------------------------------------------------------------------------- a real daemon
def hold_the_slot(owner, tiny_sd, tiny_data) -> str:
    """The owner's run, paused: it holds the one CPU slot, so everything queued after it stays queued."""
    blocker = owner.submit(run_config(tiny_sd, tiny_data, "blocker", steps=400), name="blocker")
    wait_until(lambda: owner.get(blocker["id"])["status"] == "running", 120, what="the blocker to start")
    owner.pause(blocker["id"])
    wait_until(lambda: owner.get(blocker["id"])["status"] == "paused", 120, what="the blocker to pause")
    return blocker["id"]


def refused(call) -> str:
    with pytest.raises(DaemonError) as e:
        call()
    assert e.value.code == "forbidden", e.value.message
    return e.value.message


@pytest.mark.slow
def test_users_see_and_cancel_only_their_own_runs_limits_refuse_by_name_and_loras_go_to_their_folder(
        daemon_factory, tmp_path, tiny_sd, tiny_data):
    home = tmp_path / "home"
    write_users(home)
    daemon = daemon_factory()
    owner = daemon.client(timeout=30)  # no user: the token holder itself (the WebUI's hand-off, a script)
    alice, bob = daemon.client(timeout=30, user="alice"), daemon.client(timeout=30, user="bob")
    root, carol = daemon.client(timeout=30, user="root"), daemon.client(timeout=30, user="carol")
    blocker = hold_the_slot(owner, tiny_sd, tiny_data)

    a1 = alice.submit(run_config(tiny_sd, tiny_data, "alice_style", steps=4), priority=5)
    b1 = bob.submit(run_config(tiny_sd, tiny_data, "bob_style", steps=4))
    assert (a1["user"], b1["user"]) == ("alice", "bob")

    # limits, each refusal naming the role and the limit
    assert refused(lambda: bob.submit(run_config(tiny_sd, tiny_data, "b2", steps=4))) == \
        "role 'guest': at most 1 queued run (bob has 1 waiting)"
    assert refused(lambda: alice.submit(run_config(tiny_sd, tiny_data, "a2", steps=4), priority=6)) == \
        "role 'member': priority at most 5, got 6"
    bob.cancel(b1["id"])
    assert refused(lambda: bob.submit(run_config(tiny_sd, tiny_data, "b3", steps=21))) == \
        "role 'guest': at most 20 steps, got training.max_train_steps=21"
    assert refused(lambda: bob.submit(run_config(tiny_sd, tiny_data, "b4", steps=4, model__lora_rank=8))) == \
        "role 'guest': rank at most 4, got model.lora_rank=8"
    assert "user 'carol': not in" in refused(lambda: carol.list_runs())
    assert carol.status()["queue_length"] >= 1  # status answers anyone the token lets in
    assert bob.list_runs(all=True)[0]["id"] == b1["id"]  # the refused submits queued nothing

    # visibility: each user sees only their own runs; others' are "no run", even by id or name
    assert [r["id"] for r in alice.list_runs(all=True)] == [a1["id"]]
    assert [r["id"] for r in bob.list_runs(all=True)] == [b1["id"]]
    assert {r["id"] for r in root.list_runs(all=True)} == {blocker, a1["id"], b1["id"]}
    assert {r["id"] for r in owner.list_runs(all=True)} == {blocker, a1["id"], b1["id"]}
    for action in ("get", "cancel", "retry", "resume", "pause", "logs", "metrics", "run_events"):
        with pytest.raises(DaemonError) as e:
            getattr(bob, action)(a1["id"])
        assert e.value.code == "not_found", (action, e.value.message)
    with pytest.raises(DaemonError, match="no run 'alice_style'"):
        bob.get("alice_style")
    with pytest.raises(DaemonError, match=f"no run '{blocker}'"):
        bob.get(blocker)
    assert refused(lambda: bob.shutdown()) == "role 'guest': only an admin stops the daemon"
    assert bob.whoami()["role"] == "guest" and "queued_runs=1" in bob.whoami()["limits"]
    queue = bob.queue()["queue"]
    assert [row["name"] for row in queue] == ["(another user's run)"] and queue[0]["id"] is None

    # the CLI names the OS user, or --user
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cli = subprocess.run([sys.executable, "-m", "lora_daemon.cli", "--home", str(home), "--user", "alice", "list",
                          "--all", "--json"], capture_output=True, text=True, env=env, timeout=60)
    assert [r["id"] for r in json.loads(cli.stdout)] == [a1["id"]], cli.stderr

    # alice's run trains once the slot is free: its folder and its published LoRA are hers
    owner.cancel(blocker)
    wait_until(lambda: alice.get(a1["id"])["status"] in ("finished", "failed"), 300, what="alice's run")
    run = alice.get(a1["id"])
    assert run["status"] == "finished", run.get("error")
    assert Path(run["run_dir"]).parent == home / "runs" / "alice"
    assert Path(run["published_file"]) == daemon.lora_dir / "alice" / "alice_style.safetensors"
    assert Path(run["published_file"]).stat().st_size > 0


@pytest.mark.slow
def test_prefix_publishing_and_a_default_role_for_users_the_file_does_not_list(daemon_factory, tmp_path, tiny_sd,
                                                                               tiny_data):
    write_users(tmp_path / "home", "roles:\n  guest: {queued_runs: 2}\ndefault_role: guest\npublish: prefix\n")
    daemon = daemon_factory()
    dora = daemon.client(timeout=30, user="dora")
    run = dora.submit(run_config(tiny_sd, tiny_data, "shapes", steps=2))
    assert dora.whoami()["role"] == "guest"
    wait_until(lambda: dora.get(run["id"])["status"] in ("finished", "failed"), 300, what="dora's run")
    run = dora.get(run["id"])
    assert run["status"] == "finished", run.get("error")
    assert Path(run["published_file"]) == daemon.lora_dir / "dora_shapes.safetensors"


def test_dataset_folders_keep_each_user_to_their_own_datasets(daemon_factory, tmp_path, tiny_sd, tiny_data):
    """`dataset_folders` with {user}: bob's run may read <home>/datasets/bob only (where the tab uploads his
    images), refused by name before it is queued; an admin reads anywhere."""
    home = tmp_path / "home"
    write_users(home, "roles:\n  admin: {admin: true}\n  member:\n    dataset_folders: ['" + str(home) +
                "/datasets/{user}']\nusers:\n  root: admin\n  bob: member\n")
    mine = home / "datasets" / "bob" / "shapes"
    shutil.copytree(tiny_data, mine)
    role = parse_users((home / "users.yaml").read_text(), home / "users.yaml").role_of("bob")
    check_submit(role, "bob", {"data": {"train_data_dir": str(mine)}}, 0, 0, 0.0)
    for key, path in (("train_data_dir", tiny_data), ("train_data_dir", home / "datasets" / "bob" / ".." / "alice"),
                      ("reg_data_dir", tmp_path)):
        with pytest.raises(Refused, match=rf"role 'member': datasets only from {home}/datasets/bob, got data.{key}="):
            check_submit(role, "bob", {"data": {"train_data_dir": str(mine), key: str(path)}}, 0, 0, 0.0)
    with pytest.raises(UsersFileError, match=r"line 4: roles.member.dataset_folders: must be a list of folders"):
        parse_users("roles:\n  member:\n    queued_runs: 1\n    dataset_folders: /x\n", home / "users.yaml")

    daemon = daemon_factory()
    bob, root = daemon.client(timeout=30, user="bob"), daemon.client(timeout=30, user="root")
    with pytest.raises(DaemonError) as refused:
        bob.submit(run_config(tiny_sd, tiny_data, "elsewhere", steps=2))
    assert refused.value.code == "forbidden" and "datasets only from" in refused.value.message
    assert bob.list_runs(all=True) == []
    run = bob.submit(run_config(tiny_sd, mine, "own", steps=2))
    assert run["user"] == "bob"
    root.cancel(root.submit(run_config(tiny_sd, tiny_data, "anywhere", steps=2))["id"])
    bob.cancel(run["id"])
