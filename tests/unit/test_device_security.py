"""The device agent's defences, against a real agent process on 127.0.0.1.

Token on every request but /health, upload limits (declared and actual), server-chosen file
names, a job timeout that kills the job process, one measurement at a time, and refusing to
start without a token.
"""

from __future__ import annotations

import itertools
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import run_cli
from device_agent import Agent, free_port, small_onnx

from pipeline.core.profile import TargetProfile
from pipeline.measure.device_protocol import (
    PROFILE_HEADER,
    SHA256_HEADER,
    array_to_npy,
    encode_profile,
    npy_to_array,
)

LIMIT_MB = 1
JOB_TIMEOUT_S = 3
JOB_FILES = {"model.onnx", "profile.json", "result.json"}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("agent-security")


@pytest.fixture(scope="module")
def agent(root: Path):
    args = ("--max-upload-mb", str(LIMIT_MB), "--job-timeout-s", str(JOB_TIMEOUT_S))
    with Agent(root / "agent", *args) as running:
        yield running


@pytest.fixture(scope="module")
def model(root: Path) -> Path:
    return small_onnx(root / "small.onnx")


def profile_header(repeats: int = 30, name: str = "tiny") -> str:
    profile = TargetProfile.model_validate(
        {
            "name": name,
            "runtime": "onnxruntime-cpu",
            "input": {"shape": [3, 32, 32], "batch": 1},
            "measure": {"warmup": 2, "repeats": repeats},
            # Given peaks: the floor needs no peak measurement inside the short job timeout.
            "peaks": {"gflops": 1000, "bandwidth_gbs": 100},
        }
    )
    return encode_profile(profile)


def post_model(agent: Agent, path: str, body: bytes, **headers: str) -> httpx.Response:
    sent = {**agent.auth, PROFILE_HEADER: profile_header(), **headers}
    return httpx.post(f"{agent.url}{path}", content=body, headers=sent, timeout=120)


def test_health_is_open_and_every_other_request_needs_the_token(agent: Agent, model: Path):
    assert httpx.get(f"{agent.url}/health").json() == {"status": "ok"}
    wrong = [
        {},
        {"Authorization": "Bearer " + secrets.token_hex(24)},
        {"Authorization": f"Bearer {agent.token}x"},
        {"Authorization": f"Bearer {agent.token[:-1]}"},
        {"Authorization": f"Basic {agent.token}"},
        {"Authorization": agent.token},
    ]
    for headers in wrong:
        for method, path in (("GET", "/info"), ("GET", "/nowhere"), ("GET", "/artifacts/x")):
            response = httpx.request(method, f"{agent.url}{path}", headers=headers)
            assert response.status_code == 401, (headers, path)
            assert response.headers["www-authenticate"] == "Bearer"
        sent = {**headers, PROFILE_HEADER: profile_header()}
        response = httpx.post(f"{agent.url}/measure", content=model.read_bytes(), headers=sent)
        assert response.status_code == 401
    assert agent.job_dirs() == []  # nothing unauthenticated reached the disk

    info = httpx.get(f"{agent.url}/info", headers=agent.auth).json()
    assert info["runtimes"]["onnxruntime-cpu"] is None  # usable here
    assert info["versions"]["onnxruntime"] and info["python"] and info["os"]
    # Probed safely: no GPU tool or Jetson tool here means None, not an error.
    if shutil.which("nvidia-smi") is None and not Path("/proc/device-tree/model").exists():
        assert info["gpu"] is None
    if shutil.which("nvpmodel") is None:
        assert info["jetson"] is None


def test_an_upload_over_the_limit_is_refused_with_413(agent: Agent):
    before = agent.job_dirs()
    # Declared too large: refused on the headers, before any byte of the body is read.
    with socket.create_connection(("127.0.0.1", agent.port), timeout=30) as sock:
        request = (
            f"POST /measure HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {agent.token}\r\n{PROFILE_HEADER}: {profile_header()}\r\n"
            f"Content-Length: {50 * 2**30}\r\n\r\n"
        )
        sock.sendall(request.encode())
        assert sock.recv(4096).split(b"\r\n")[0].startswith(b"HTTP/1.1 413 ")
    # No Content-Length (chunked): the bytes actually read are counted.
    big = os.urandom(LIMIT_MB * 2**20 + 4096)

    def chunks():
        for start in range(0, len(big), 64 * 1024):
            yield big[start : start + 64 * 1024]

    response = post_model(agent, "/measure", chunks())
    assert response.status_code == 413 and "limit" in response.json()["detail"]
    response = httpx.post(
        f"{agent.url}/infer/{'0' * 32}", content=big, headers=agent.auth, timeout=60
    )
    assert response.status_code in (404, 413)  # no such job, or too big: never accepted
    assert agent.job_dirs() == before  # the partial upload was removed


def test_client_supplied_names_cannot_write_outside_the_job_folder(
    agent: Agent, model: Path, root: Path
):
    crafted = "../../evil"
    response = post_model(
        agent,
        "/measure",
        model.read_bytes(),
        **{
            "Content-Disposition": f'attachment; filename="{crafted}.onnx"',
            "X-Filename": crafted,
            PROFILE_HEADER: profile_header(name=crafted),
        },
    )
    assert response.status_code == 200, response.text
    job = response.json()["job_id"]
    assert {p.name for p in (agent.work_dir / job).iterdir()} == JOB_FILES
    # Nothing named by the client anywhere it could have aimed at.
    assert not list(root.parent.rglob("*evil*"))
    assert not [p for p in (Path.cwd().parents[1], Path("/")) if list(p.glob("evil*"))]
    for bad in ("..%2F..%2Ftoken", "..", "../token", job.upper(), job + "0", job[:-1] + "/"):
        got = httpx.get(f"{agent.url}/artifacts/{bad}", headers=agent.auth)
        assert got.status_code == 404, bad
        assert agent.token not in got.text
    feed = array_to_npy(np.zeros((1, 3, 32, 32), np.float32))
    got = httpx.post(f"{agent.url}/infer/..%2F{job}", content=feed, headers=agent.auth)
    assert got.status_code == 404


def test_infer_and_artifacts_round_trip_without_pickle(agent: Agent, model: Path):
    import onnxruntime as ort

    job = post_model(agent, "/models", model.read_bytes()).json()["job_id"]
    feed = np.random.default_rng(0).standard_normal((1, 3, 32, 32), dtype=np.float32)
    response = httpx.post(
        f"{agent.url}/infer/{job}", content=array_to_npy(feed), headers=agent.auth
    )
    assert response.status_code == 200, response.text
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    (expected,) = session.run(None, {session.get_inputs()[0].name: feed})
    np.testing.assert_allclose(npy_to_array(response.content), expected, rtol=1e-5, atol=1e-6)

    pickled = np.empty(1, dtype=object)
    pickled[0] = {"not": "an array"}
    buffer_path = agent.root / "pickled.npy"
    np.save(buffer_path, pickled, allow_pickle=True)
    for body in (buffer_path.read_bytes(), b"junk", array_to_npy(feed.astype(np.float64))):
        response = httpx.post(f"{agent.url}/infer/{job}", content=body, headers=agent.auth)
        assert response.status_code == 422

    download = httpx.get(f"{agent.url}/artifacts/{job}", headers=agent.auth)
    assert download.status_code == 200 and download.content == model.read_bytes()
    assert (
        download.headers[SHA256_HEADER]
        == post_model(agent, "/models", model.read_bytes()).json()["sha256"]
    )


def test_a_job_over_its_timeout_is_killed_and_reported(agent: Agent, model: Path):
    pid = httpx.get(f"{agent.url}/info", headers=agent.auth).json()["job_pid"]
    # Millions of timed runs: a real measurement far longer than the agent's job timeout.
    headers = {PROFILE_HEADER: profile_header(repeats=1_000_000)}
    response = post_model(agent, "/measure", model.read_bytes(), **headers)
    assert response.status_code == 504
    record = response.json()
    assert record["status"] == "timeout" and "job timeout" in record["error"]
    assert record["health"]["before"] and record["health"]["after"]
    assert not Path(f"/proc/{pid}").exists()  # the job process was killed (and reaped)
    # The next job gets a fresh job process and runs normally.
    again = post_model(agent, "/measure", model.read_bytes())
    assert again.status_code == 200 and again.json()["stats"]["repeats"] == 30
    assert httpx.get(f"{agent.url}/info", headers=agent.auth).json()["job_pid"] != pid


def test_concurrent_submissions_are_serialised(agent: Agent, model: Path):
    records: list[dict] = []
    body = model.read_bytes()

    def submit() -> None:
        headers = {PROFILE_HEADER: profile_header(repeats=300)}
        records.append(post_model(agent, "/measure", body, **headers).json())

    threads = [threading.Thread(target=submit) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert len(records) == 4 and all(r["status"] == "ok" for r in records), records
    spans = sorted((r["started"], r["finished"]) for r in records)
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end <= start  # no two measurements shared the device
    for record in records:
        assert record["health"]["before"]["time"] <= record["started"]
        assert record["health"]["after"]["time"] >= record["finished"]
        assert record["health"]["after"]["mem_available_mb"] > 0


def test_the_agent_refuses_to_start_without_a_token(tmp_path: Path):
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "short").write_text("abc\n")
    for args, fragment in (
        ((), "needs a token"),
        (("--token-file", "missing"), "cannot read token file"),
        (("--token-file", "empty"), "no token of at least"),
        (("--token-file", "short"), "no token of at least"),
    ):
        result = run_cli("device", "serve", *args, "--port", str(free_port()), cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        err = result.stderr.strip()
        assert len(err.splitlines()) == 1 and fragment in err and "Traceback" not in err


def test_binding_beyond_loopback_without_tls_warns(tmp_path: Path):
    with Agent(tmp_path, "--host", "0.0.0.0") as agent:
        assert httpx.get(f"{agent.url}/health").status_code == 200
    assert "without TLS" in agent.log.read_text()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_tls_with_a_self_signed_certificate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from pipeline.core.profile import RemoteDevice
    from pipeline.measure.device_client import DeviceClient

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    args = ("--tls-cert", str(cert), "--tls-key", str(key))
    trust = ssl.create_default_context(cafile=str(cert))
    with Agent(tmp_path / "agent", *args).start(verify=trust) as agent:
        assert agent.url.startswith("https://")
        monkeypatch.setenv("DEVICE_TOKEN", agent.token)
        monkeypatch.setenv("PIPELINE_DEVICE_CA", str(cert))
        device = RemoteDevice(url=agent.url, token_env="DEVICE_TOKEN", retries=0)
        with DeviceClient(device) as client:
            assert client.info()["versions"]["onnxruntime"]
        with pytest.raises(httpx.HTTPError):  # plain HTTP is not served
            httpx.get(f"http://127.0.0.1:{agent.port}/health", timeout=5)
