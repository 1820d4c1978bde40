"""The agent's work folder: pruned by count and size, never a job in use; a full disk is a
one-line 507 the agent recovers from by itself.

The full disk is real: the agent runs in a user and mount namespace (`unshare -rm`, no root)
with its work folder on a small tmpfs, and the test fills that tmpfs through /proc/PID/root.
"""

from __future__ import annotations

import errno
import os
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import run_cli
from device_agent import TOKEN_ENV, Agent, profile_yaml, small_onnx
from test_device_security import profile_header

from pipeline.core.errors import MeasurementError
from pipeline.core.profile import RemoteDevice, TargetProfile
from pipeline.measure.device_client import DeviceClient
from pipeline.measure.device_protocol import PROFILE_HEADER

KIB, MIB = 2**10, 2**20
TMPFS_MB = 8


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_onnx(tmp_path_factory.mktemp("workdir-model") / "small.onnx")


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir())


def upload(agent: Agent, body: bytes, **headers: str) -> httpx.Response:
    sent = {**agent.auth, PROFILE_HEADER: profile_header(), **headers}
    return httpx.post(f"{agent.url}/models", content=body, headers=sent, timeout=60)


def test_job_folders_are_pruned_by_count_and_size_but_never_a_job_in_use(tmp_path: Path):
    from pipeline.device.workdir import JobFolders, WorkDirFull

    folders = JobFolders(tmp_path, keep_jobs=3, max_bytes=100 * KIB)
    in_use, first = folders.new_job()
    (first / "model.onnx").write_bytes(b"x" * 10 * KIB)
    made = []
    for _ in range(4):
        job_id, path = folders.new_job(30 * KIB)
        (path / "model.onnx").write_bytes(b"x" * 30 * KIB)
        folders.release(job_id)
        made.append(job_id)
    kept = {p.name for p in tmp_path.iterdir()}
    assert kept == {in_use, *made[-2:]}  # by count: the job in use stays, the oldest others go
    assert folders.job_dir(made[0]) is None
    # By size: 10 + 30 + 30 KiB kept; 65 KiB more fits only once the idle jobs are gone.
    job_id, path = folders.new_job(65 * KIB)
    (path / "model.onnx").write_bytes(b"x" * 65 * KIB)
    assert {p.name for p in tmp_path.iterdir()} == {in_use, job_id}
    # Only jobs in use left, and no room beside them: refused, nothing removed.
    with pytest.raises(WorkDirFull, match="--max-work-mb"):
        folders.new_job(30 * KIB)
    assert {p.name for p in tmp_path.iterdir()} == {in_use, job_id}
    folders.release(in_use)
    with folders.using(in_use) as used:  # in use again, and the most recently used
        assert used == first
        folders.release(job_id)
        fresh, _ = folders.new_job(85 * KIB)
    assert {p.name for p in tmp_path.iterdir()} == {in_use, fresh}


def test_uploads_never_prune_the_running_job(tmp_path: Path, model: Path):
    args = ("--max-upload-mb", "1", "--max-work-mb", "1", "--job-timeout-s", "3")
    with Agent(tmp_path, *args) as agent:
        records: list[httpx.Response] = []

        def measure_long() -> None:  # runs until the job timeout stops it
            headers = {PROFILE_HEADER: profile_header(repeats=1_000_000)}
            records.append(
                httpx.post(
                    f"{agent.url}/measure",
                    content=model.read_bytes(),
                    headers={**agent.auth, **headers},
                    timeout=120,
                )
            )

        thread = threading.Thread(target=measure_long)
        thread.start()
        deadline = time.monotonic() + 60
        while not agent.job_dirs():
            assert time.monotonic() < deadline, "the measurement's job never appeared"
            time.sleep(0.02)
        (running,) = agent.job_dirs()
        blob = os.urandom(300 * KIB)
        answers = [upload(agent, blob) for _ in range(6)]
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        assert running.is_dir()
        thread.join(timeout=120)
        (record,) = records
        # The running job kept its folder: it answered its timeout, and its record is saved.
        assert record.status_code == 504, record.text
        assert (running / "result.json").is_file()
        kept = agent.job_dirs()
        assert sum(folder_bytes(p) for p in kept) <= MIB
        assert answers[-1].json()["job_id"] in {p.name for p in kept}
        assert answers[0].json()["job_id"] not in {p.name for p in kept}


def _namespaces_work() -> bool:
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    return probe.returncode == 0


def tmpfs_prefix(mount_point: Path) -> tuple[str, ...]:
    """Run the agent in its own user and mount namespace with `mount_point` on a small tmpfs."""
    script = f'mount -t tmpfs -o size={TMPFS_MB}m tmpfs "$0" && exec "$@"'
    return ("unshare", "-rm", "sh", "-c", script, str(mount_point))


def fill(path: Path) -> None:
    """Write to `path` until the disk is full."""
    block = b"\0" * MIB
    with open(path, "wb") as fh:
        try:
            while True:
                fh.write(block)
                fh.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc


def test_a_full_disk_is_a_one_line_507_and_the_agent_recovers_by_itself(
    tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch
):
    if not _namespaces_work():
        pytest.skip("unprivileged user namespaces are not available (unshare -rm)")
    root = tmp_path / "agent"
    (root / "jobs").mkdir(parents=True)
    with Agent(root, "--max-upload-mb", "1", prefix=tmpfs_prefix(root / "jobs")) as agent:
        # The agent's own view of its work folder: the tmpfs, seen from outside its namespace.
        seen = Path(f"/proc/{agent.proc.pid}/root") / str(agent.work_dir).lstrip("/")
        monkeypatch.setenv(TOKEN_ENV, agent.token)
        device = RemoteDevice(url=agent.url, token_env=TOKEN_ENV, retries=0)
        profile = TargetProfile.model_validate({**_tiny_profile(), "device": device.model_dump()})
        fill(seen / "filler")
        with DeviceClient(device) as client, pytest.raises(MeasurementError) as full:
            client.measure(model, profile)
        message = str(full.value)
        assert "(507)" in message and "no space left" in message and "\n" not in message
        from pipeline.measure.device_client import DeviceFull

        assert isinstance(full.value, DeviceFull)
        # The command line shows the same, in one line.
        (tmp_path / "remote.yaml").write_text(profile_yaml(agent))
        result = run_cli("bench", "--target", "remote.yaml", str(model), cwd=tmp_path)
        assert result.returncode == 1, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "(507)" in result.stderr
        assert list(seen.glob("*/model.onnx")) == []  # nothing half-written was left

        (seen / "filler").unlink()  # space is free again: the next job simply works
        with DeviceClient(device) as client:
            assert client.measure(model, profile)["status"] == "ok"
            # A disk filled up by the agent's own old jobs: they are pruned to make room.
            blobs = [client.upload(_blob(tmp_path, i), profile) for i in range(2 * TMPFS_MB)]
            assert len(set(blobs)) == 2 * TMPFS_MB
            fill(seen / "filler")
            assert client.measure(model, profile)["status"] == "ok"
        assert blobs[0] not in {p.name for p in seen.iterdir()}


def _tiny_profile() -> dict:
    return {
        "name": "tiny",
        "runtime": "onnxruntime-cpu",
        "input": {"shape": [3, 32, 32], "batch": 1},
        "measure": {"warmup": 2, "repeats": 30},
        "peaks": {"gflops": 1000, "bandwidth_gbs": 100},
    }


def _blob(tmp_path: Path, index: int) -> Path:
    """An upload of just under 1 MiB (an upload is stored, not run, until inference)."""
    path = tmp_path / f"blob{index}.onnx"
    path.write_bytes(os.urandom(MIB - 64 * KIB))
    return path
