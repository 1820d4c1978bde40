"""A real device agent for tests: `pipeline device serve` in a subprocess on 127.0.0.1."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch
from torch import nn

TESTS_DIR = Path(__file__).resolve().parent
TOKEN_ENV = "PIPELINE_TEST_DEVICE_TOKEN"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Agent:
    """One agent process; `start()` waits for /health, `kill()` is SIGKILL (a crash).

    `prefix` runs the agent under another command that execs it (`prlimit`, `unshare`), so the
    agent keeps the process id `proc.pid`.
    """

    def __init__(
        self,
        root: Path,
        *args: str,
        port: int | None = None,
        token: str | None = None,
        prefix: tuple[str, ...] = (),
    ):
        self.root = Path(root)
        self.prefix = list(prefix)
        self.root.mkdir(parents=True, exist_ok=True)
        self.args = list(args)
        self.port = port or free_port()
        self.token = token or secrets.token_hex(24)
        self.token_file = self.root / "token"
        self.token_file.write_text(self.token + "\n")
        self.token_file.chmod(0o600)
        self.work_dir = self.root / "jobs"
        self.log = self.root / "agent.log"
        self.proc: subprocess.Popen | None = None
        self.scheme = "https" if "--tls-cert" in self.args else "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def command(self) -> list[str]:
        return [
            *self.prefix,
            sys.executable,
            "-m",
            "pipeline.cli",
            "device",
            "serve",
            "--token-file",
            str(self.token_file),
            "--port",
            str(self.port),
            "--work-dir",
            str(self.work_dir),
            *self.args,
        ]

    def start(self, timeout: float = 120, verify: object = True) -> Agent:
        env = {**os.environ, "PYTHONPATH": str(TESTS_DIR)}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=log, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited {self.proc.returncode}: {self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2, verify=verify).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"agent did not answer /health in {timeout} s: {self.log.read_text()}")

    def kill(self) -> None:
        """SIGKILL: the agent dies at once, as in a power cut or a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.kill()

    def open_fds(self) -> int:
        """How many file descriptors the agent process holds open now."""
        assert self.proc is not None
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def job_dirs(self) -> list[Path]:
        return sorted(p for p in self.work_dir.glob("*") if p.is_dir())

    def __enter__(self) -> Agent:
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def small_onnx(path: Path) -> Path:
    """A few-KB classifier on 3x32x32 inputs: conv, pool, linear (10 classes)."""
    from exporters import export_onnx

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 10),
        ).eval()
    return export_onnx(model, (3, 32, 32), path)


def profile_yaml(agent: Agent, retries: int = 1, repeats: int = 30, timeout_s: float = 120) -> str:
    """A tiny CPU profile whose device is `agent` (token in $PIPELINE_TEST_DEVICE_TOKEN)."""
    return f"""
name: tiny-remote
description: tiny CPU target behind a device agent, for tests
runtime: onnxruntime-cpu
device: {{url: "{agent.url}", token_env: {TOKEN_ENV}, timeout_s: {timeout_s}, retries: {retries}}}
precisions: [int8, fp32]
input: {{shape: [3, 32, 32], batch: 1}}
threads: 1
channel_multiple: 8
min_keep_ratio: 0.1
max_accuracy_drop: 0.05
measure: {{warmup: 3, repeats: {repeats}}}
"""
