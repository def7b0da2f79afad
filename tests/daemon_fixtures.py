"""A real daemon for the daemon tests: its own process, state folder, sockets and SQLite file; no stand-ins."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import pytest

from lora_daemon.client import DaemonClient, DaemonError, DaemonNotRunning
from lora_daemon.home import read_info

ROOT = Path(__file__).resolve().parents[1]


class DaemonProcess:
    """``python -m daemon.cli start --foreground`` in a temp home; ``kill9`` and ``restart`` for crash tests."""

    def __init__(self, home: Path, lora_dir: Path, *extra: str):
        self.home = home
        self.lora_dir = lora_dir
        self.extra = list(extra)
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 30.0) -> "DaemonProcess":
        env = {**os.environ, "PYTHONPATH": str(ROOT), "LORA_DAEMON_HOME": str(self.home)}
        log = open(self.home / "daemon-test.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "lora_daemon.cli", "--home", str(self.home), "start",
                                      "--foreground", "--gpus", "cpu", "--lora-dir", str(self.lora_dir),
                                      "--grace", "60", *self.extra],
                                     stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_text()
            info = read_info(self.home)
            if info and info.get("pid") == self.proc.pid:
                try:
                    self.client().ping()
                    return self
                except (DaemonNotRunning, DaemonError):
                    pass
            time.sleep(0.05)
        raise TimeoutError(f"daemon did not start:\n{self.log_text()}")

    def client(self, **kwargs) -> DaemonClient:
        return DaemonClient(home=self.home, **kwargs)

    def log_text(self) -> str:
        path = self.home / "daemon-test.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 120.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        try:
            self.client().shutdown()
        except (DaemonNotRunning, DaemonError):
            self.proc.terminate()
        return self.proc.wait(timeout)


@pytest.fixture
def daemon_factory(tmp_path) -> Callable[..., DaemonProcess]:
    """Start daemons in `tmp_path/home`; every one started is stopped (or killed) at the end of the test."""
    started: list[DaemonProcess] = []

    def make(*extra: str) -> DaemonProcess:
        home = tmp_path / "home"
        home.mkdir(exist_ok=True)
        proc = DaemonProcess(home, tmp_path / "Lora", *extra).start()
        started.append(proc)
        return proc

    yield make
    for proc in started:
        if proc.proc and proc.proc.poll() is None:
            try:
                proc.stop(timeout=60)
            except subprocess.TimeoutExpired:
                proc.proc.kill()


@pytest.fixture
def daemon(daemon_factory) -> DaemonProcess:
    return daemon_factory()


def run_config(tiny_sd: Path, tiny_data: Path, name: str, steps: int = 6, save_steps: int = 0, **more) -> dict:
    """A sectioned config for the tiny model at 64 px, as the WebUI tab would send it."""
    config = {
        "model": {"base_model": str(tiny_sd), "lora_rank": 4},
        "data": {"train_data_dir": str(tiny_data), "resolution": 64, "trigger_word": f"{name} style"},
        "training": {"max_train_steps": steps, "learning_rate": 1e-3, "batch_size": 2},
        "output": {"output_name": name, "save_steps": save_steps, "save_precision": "float"},
    }
    for key, value in more.items():
        section, field = key.split("__")
        config.setdefault(section, {})[field] = value
    return config


def wait_until(predicate: Callable[[], object], timeout: float = 120.0, every: float = 0.1, what: str = "") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"timed out waiting for {what or predicate}")
