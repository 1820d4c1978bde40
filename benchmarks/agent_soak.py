"""The device agent under load while strangers hold half-sent requests open.

A real agent (`pipeline device serve`, its default connection limits) runs on 127.0.0.1.

1. Hold: `--strangers` unauthenticated connections each send half a request and are held for
   `--hold-s` seconds while one client with the token measures in a loop; then they close, and
   the agent's open file descriptors must come back to their idle level.
2. Soak: for `--minutes`, `--clients` clients with the token send a mix of measurements,
   uploads and inferences (each a real `DeviceClient` with no retries, so every failure counts),
   while the strangers keep their half-sent requests open: each one the agent closes is opened
   again `--reconnect-s` later.

The agent's open file descriptors and memory (RSS) are sampled throughout. The JSON goes to
`benchmarks/results/agent_soak.json`.

    python benchmarks/agent_soak.py [--minutes 10] [--clients 4] [--strangers 200] [--hold-s 30]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import selectors
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the device agent helper the tests use
TOKEN_ENV = "PIPELINE_SOAK_DEVICE_TOKEN"
HALF_SENT = b"POST /measure HTTP/1.1\r\nHost: agent\r\nContent-Le"
KINDS = ("measure", "infer", "upload")
WEIGHTS = (4, 3, 3)
BLOB_BYTES = 256 * 1024
MAX_WORK_MB = 16  # small, so that uploads keep the agent pruning job folders by size


class Strangers:
    """Unauthenticated half-sent requests, held open from one thread.

    Each connection the agent closes (it made room for a newcomer, or the header deadline
    passed) is opened again `reconnect_s` later; with None it stays closed.
    """

    def __init__(self, port: int, count: int, reconnect_s: float | None) -> None:
        self.port, self.count, self.reconnect_s = port, count, reconnect_s
        self.selector = selectors.DefaultSelector()
        self.reopen_at: list[float] = []
        self.tally: Counter[str] = Counter()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Strangers:
        for _ in range(self.count):
            self._open()
        self.thread.start()
        return self

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        for key in list(self.selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self.selector.close()

    def _run(self) -> None:
        while not self.stop.is_set():
            for key, _ in self.selector.select(timeout=0.1):
                self._closed_by_agent(key.fileobj)  # type: ignore[arg-type]
            now = time.monotonic()
            due = [t for t in self.reopen_at if t <= now]
            self.reopen_at = [t for t in self.reopen_at if t > now]
            for _ in due:
                self._open()

    def _open(self) -> None:
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            sock.sendall(HALF_SENT)
        except OSError:
            self.tally["refused"] += 1
            self._later()
            return
        sock.setblocking(False)
        self.selector.register(sock, selectors.EVENT_READ)
        self.tally["opened"] += 1

    def _closed_by_agent(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self.tally["answered 408" if data.startswith(b"HTTP/1.1 408") else "closed"] += 1
        self.selector.unregister(sock)
        sock.close()
        self._later()

    def _later(self) -> None:
        if self.reconnect_s is not None:
            self.reopen_at.append(time.monotonic() + self.reconnect_s)


class Tally:
    """Requests and errors of the clients with the token, by kind (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seconds: dict[str, list[float]] = defaultdict(list)
        self.errors: Counter[str] = Counter()
        self.examples: dict[str, str] = {}

    def ok(self, kind: str, seconds: float) -> None:
        with self.lock:
            self.seconds[kind].append(seconds)

    def error(self, kind: str, exc: BaseException) -> None:
        key = f"{kind}: {type(exc).__name__}"
        with self.lock:
            self.errors[key] += 1
            self.examples.setdefault(key, str(exc).splitlines()[0] if str(exc) else "")

    def summary(self) -> dict[str, Any]:
        by_kind = {}
        for kind, values in sorted(self.seconds.items()):
            ordered = sorted(values)
            by_kind[kind] = {
                "answered": len(values),
                "median_ms": round(1000 * statistics.median(ordered), 2),
                "p99_ms": round(1000 * ordered[int(0.99 * (len(ordered) - 1))], 2),
                "max_ms": round(1000 * ordered[-1], 2),
            }
        answered = sum(len(v) for v in self.seconds.values())
        errors = sum(self.errors.values())
        return {
            "requests": answered + errors,
            "answered": answered,
            "errors": errors,
            "by_kind": by_kind,
            "errors_by_kind": dict(self.errors),
            "error_examples": self.examples,
        }


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def snapshot(agent: Any, job_pid: int, started: float) -> dict[str, Any]:
    return {
        "t_s": round(time.monotonic() - started, 1),
        "agent_fds": agent.open_fds(),
        "agent_rss_mib": round(rss_kib(agent.proc.pid) / 1024, 1),
        "job_process_rss_mib": round(rss_kib(job_pid) / 1024, 1) if job_pid else None,
    }


def client_loop(index: int, job: dict[str, Any], tally: Tally, deadline: float) -> None:
    """One client with the token: a seeded mix of measure / infer / upload until `deadline`."""
    from pipeline.measure.device_client import DeviceClient

    rng = random.Random(index)
    feed = np.random.default_rng(index).standard_normal((1, 3, 32, 32), dtype=np.float32)
    job_id: str | None = None
    with DeviceClient(job["profile"].device) as client:
        while time.monotonic() < deadline:
            kind = rng.choices(*job["mix"])[0]
            started = time.perf_counter()
            try:
                if kind == "measure":
                    if client.measure(job["model"], job["profile"])["status"] != "ok":
                        raise RuntimeError("measurement not ok")
                elif kind == "upload":
                    client.upload(job["blob"], job["profile"])
                else:
                    job_id = job_id or client.upload(job["model"], job["profile"])
                    client.infer(job_id, feed)
            except Exception as exc:  # every failure is a figure of the soak
                tally.error(kind, exc)
                job_id = None
            else:
                tally.ok(kind, time.perf_counter() - started)
            time.sleep(job["pause_s"])


def run_clients(count: int, job: dict[str, Any], seconds: float) -> Tally:
    tally = Tally()
    deadline = time.monotonic() + seconds
    threads = [
        threading.Thread(target=client_loop, args=(i, job, tally, deadline)) for i in range(count)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return tally


def wait_for_idle(agent: Any, idle: int, limit_s: float = 120) -> float | None:
    """Seconds until the agent's descriptors are back at `idle` (None: not within the limit)."""
    started = time.monotonic()
    while time.monotonic() - started < limit_s:
        if agent.open_fds() <= idle:
            return round(time.monotonic() - started, 2)
        time.sleep(0.1)
    return None


class Sampler:
    """The agent's descriptors and memory every `every_s` seconds, from a thread."""

    def __init__(self, agent: Any, job_pid: int, every_s: float) -> None:
        self.agent, self.job_pid, self.every_s = agent, job_pid, every_s
        self.started = time.monotonic()
        self.samples: list[dict[str, Any]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self.take()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=30)

    def take(self) -> dict[str, Any]:
        sample = snapshot(self.agent, self.job_pid, self.started)
        self.samples.append(sample)
        return sample

    def _run(self) -> None:
        while not self.stop.wait(self.every_s):
            self.take()

    def max_fds(self) -> int:
        return max(sample["agent_fds"] for sample in self.samples)


def hold_phase(agent: Any, job: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Strangers hold half-sent requests for `hold_s` while one client measures."""
    idle = agent.open_fds()
    with Sampler(agent, 0, 0.5) as sampler:
        strangers = Strangers(agent.port, args.strangers, reconnect_s=None).start()
        tally = run_clients(1, {**job, "mix": (("measure",), (1,)), "pause_s": 0.0}, args.hold_s)
        held_fds = sampler.take()["agent_fds"]
        strangers.close()
    return {
        "strangers": args.strangers,
        "held_s": args.hold_s,
        "agent_fds_idle": idle,
        "agent_fds_max_while_held": sampler.max_fds(),
        "agent_fds_at_end_of_hold": held_fds,
        "fds_back_to_idle_after_s": wait_for_idle(agent, idle),
        "strangers_tally": dict(strangers.tally),
        "client": tally.summary(),
        "fds_every_half_second": [sample["agent_fds"] for sample in sampler.samples],
    }


def soak_phase(agent: Any, job: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """`clients` clients with the token for `minutes`, beside strangers that keep reconnecting."""
    from pipeline.measure.device_client import device_info

    job_pid = int(device_info(job["profile"]).get("job_pid") or 0)
    with Sampler(agent, job_pid, args.sample_s) as sampler:
        start = sampler.samples[0]
        strangers = Strangers(agent.port, args.strangers, args.reconnect_s).start()
        tally = run_clients(args.clients, job, 60 * args.minutes)
        last = sampler.take()
        strangers.close()
    back = wait_for_idle(agent, start["agent_fds"])
    end = snapshot(agent, job_pid, sampler.started)
    work = [p for p in agent.work_dir.iterdir() if p.is_dir()]
    return {
        "minutes": args.minutes,
        "clients": args.clients,
        "strangers": args.strangers,
        "reconnect_s": args.reconnect_s,
        "start": start,
        "under_load_first": sampler.samples[1],
        "under_load_last": last,
        "end": end,
        "agent_fds_max_sampled": sampler.max_fds(),
        "fds_back_to_idle_after_s": back,
        "work_dir_mib_at_end": round(
            sum(f.stat().st_size for p in work for f in p.iterdir()) / 2**20, 1
        ),
        "work_dir_jobs_at_end": len(work),
        "strangers_tally": dict(strangers.tally),
        **tally.summary(),
        "samples": [*sampler.samples, end],
    }


def make_job(root: Path, agent: Any, pause_s: float) -> dict[str, Any]:
    """What the clients send: a small model, an upload-only blob and a profile on the agent."""
    from device_agent import small_onnx

    from pipeline.core.profile import TargetProfile

    blob = root / "blob.onnx"
    blob.write_bytes(os.urandom(BLOB_BYTES))
    profile = TargetProfile.model_validate(
        {
            "name": "soak",
            "runtime": "onnxruntime-cpu",
            "device": {"url": agent.url, "token_env": TOKEN_ENV, "timeout_s": 120, "retries": 0},
            "input": {"shape": [3, 32, 32], "batch": 1},
            "threads": 1,
            "measure": {"warmup": 2, "repeats": 30},
            "peaks": {"gflops": 1000, "bandwidth_gbs": 100},  # no peak measurement per job
        }
    )
    model = small_onnx(root / "small.onnx")
    return {
        "model": model,
        "blob": blob,
        "profile": profile,
        "pause_s": pause_s,
        "mix": (KINDS, WEIGHTS),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--strangers", type=int, default=200)
    parser.add_argument("--hold-s", type=float, default=30)
    parser.add_argument("--reconnect-s", type=float, default=1.0)
    parser.add_argument("--pause-s", type=float, default=0.1, help="each client, between requests")
    parser.add_argument("--sample-s", type=float, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/agent_soak.json")
    args = parser.parse_args()
    from device_agent import Agent

    with tempfile.TemporaryDirectory(prefix="agent-soak-") as tmp:
        root = Path(tmp)
        limits = ("--max-work-mb", str(MAX_WORK_MB), "--max-upload-mb", "4")
        with Agent(root / "agent", *limits) as agent:
            os.environ[TOKEN_ENV] = agent.token
            job = make_job(root, agent, args.pause_s)
            run_clients(1, {**job, "pause_s": 0.0}, 2)  # warm: the first job of each kind
            report = {
                "machine": {"cpus": os.cpu_count()},
                "agent": {
                    "options": list(limits),
                    "connection_limits": "the defaults of device serve",
                },
                "hold": hold_phase(agent, job, args),
                "soak": soak_phase(agent, job, args),
            }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    hold, soak = report["hold"], report["soak"]
    print(
        f"hold: {hold['client']['answered']} measurements, {hold['client']['errors']} errors; "
        f"fds idle {hold['agent_fds_idle']}, at most {hold['agent_fds_max_while_held']} held"
    )
    print(
        f"soak: {soak['requests']} requests, {soak['errors']} errors; fds "
        f"{soak['start']['agent_fds']} -> {soak['end']['agent_fds']}, RSS "
        f"{soak['start']['agent_rss_mib']} -> {soak['end']['agent_rss_mib']} MiB; {args.out}"
    )


if __name__ == "__main__":
    main()
