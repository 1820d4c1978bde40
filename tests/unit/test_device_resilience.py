"""The agent under connections that strangers hold open, against a real agent on 127.0.0.1.

Half-sent requests, stalled uploads and connection floods: the agent answers 408 or closes,
caps what it holds, and keeps serving the clients that have the token.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from conftest import run_cli
from device_agent import Agent, small_onnx
from test_device_security import profile_header

from pipeline.measure.device_protocol import PROFILE_HEADER

# Below what 200 held connections need: without a cap the agent runs out of descriptors.
NOFILE = 128
STRANGERS = 200
DEFAULT_MAX_UNAUTHENTICATED = 16


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_onnx(tmp_path_factory.mktemp("resilience-model") / "small.onnx")


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    """An agent with one-second read deadlines."""
    args = ("--header-timeout-s", "1", "--body-timeout-s", "1")
    with Agent(tmp_path_factory.mktemp("agent-quick"), *args) as running:
        yield running


def connect(agent: Agent, first: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", agent.port), timeout=30)
    if first:
        sock.sendall(first)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the agent sends until it closes the connection (a reset counts as closed)."""
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def wait_for(condition: Callable[[], bool], what: str, limit_s: float = 30) -> None:
    """Poll until `condition` holds; the limit only stops a broken agent from hanging us."""
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def auth_request(agent: Agent, path: str = "/health") -> bytes:
    head = f"GET {path} HTTP/1.1\r\nHost: agent\r\nAuthorization: Bearer {agent.token}\r\n\r\n"
    return head.encode()


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def read_answer(sock: socket.socket) -> int:
    """Read one whole answer (head and Content-Length body) from a kept-alive connection; its
    status."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.lower().split(b"\r\n")
        if line.startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(4096)
    return status_of(head)


def test_half_sent_connections_cannot_stop_an_authenticated_measurement(
    tmp_path: Path, model: Path
):
    if shutil.which("prlimit") is None:
        pytest.skip("prlimit (util-linux) not installed")
    prefix = ("prlimit", f"--nofile={NOFILE}:{NOFILE}", "--")
    body = model.read_bytes()
    headers = {PROFILE_HEADER: profile_header()}
    with Agent(tmp_path, prefix=prefix) as agent, httpx.Client(headers=agent.auth) as client:
        # A first job, so the idle level counts whatever a job leaves open for the next one.
        assert client.post(f"{agent.url}/measure", content=body, headers=headers).status_code == 200
        client.close()
        idle = agent.open_fds()
        strangers = [connect(agent, b"POST /measure HTTP/1.1\r\nHost: agent\r\nContent-Le")]
        try:
            strangers += [connect(agent, b"GET /info HTTP/1.1\r\nHo") for _ in range(STRANGERS)]
            with httpx.Client(headers=agent.auth, timeout=60) as measuring:
                answer = measuring.post(f"{agent.url}/measure", content=body, headers=headers)
                held = agent.open_fds()
            assert answer.status_code == 200 and answer.json()["status"] == "ok", answer.text
            # The strangers beyond the cap were closed: the agent holds a bounded number.
            assert held <= idle + DEFAULT_MAX_UNAUTHENTICATED + 2, (idle, held)
        finally:
            for sock in strangers:
                sock.close()
        wait_for(lambda: agent.open_fds() <= idle, "the agent's descriptors back to idle")


def test_a_half_sent_request_is_answered_408_and_closed(quick: Agent):
    with connect(quick, b"GET /info HTTP/1.1\r\nHost: agent\r\n") as sock:
        answer = read_until_closed(sock)
    assert status_of(answer) == 408 and b"headers did not arrive within 1 s" in answer
    # A trickle of header bytes does not move the deadline: the agent closes mid-trickle.
    with connect(quick, b"GET /info HTTP/1.1\r\nX-Pad: ") as sock:
        sock.settimeout(0.1)
        answer = b""
        for _ in range(300):
            try:
                sock.sendall(b"a")
                answer = sock.recv(4096)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                pass
            break
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    # A connection that sends nothing is closed without a word.
    with connect(quick) as sock:
        assert read_until_closed(sock) == b""
    assert httpx.get(f"{quick.url}/info", headers=quick.auth).status_code == 200


def test_a_stalled_upload_is_answered_408_and_leaves_no_job(quick: Agent):
    before = quick.job_dirs()
    head = (
        f"POST /models HTTP/1.1\r\nHost: agent\r\nAuthorization: Bearer {quick.token}\r\n"
        f"{PROFILE_HEADER}: {profile_header()}\r\nContent-Length: 100000\r\n\r\n"
    )
    with connect(quick, head.encode() + b"\x08" * 1000) as sock:
        answer = read_until_closed(sock)
    assert status_of(answer) == 408 and b"no byte for 1 s" in answer
    assert len(answer.split(b"\r\n\r\n", 1)[1].splitlines()) == 1
    wait_for(lambda: quick.job_dirs() == before, "the partial upload removed")


def test_connections_beyond_the_cap_wait_for_one_to_close(tmp_path: Path):
    args = ("--max-connections", "4", "--max-unauthenticated", "2", "--keep-alive-s", "60")
    with Agent(tmp_path, *args) as agent:
        clients = []
        for _ in range(4):  # one at a time: a burst of new connections pushes out the oldest
            clients.append(connect(agent, auth_request(agent)))
            assert read_answer(clients[-1]) == 200
        # Every slot holds a client with the token: the next connection is refused, with 503.
        with connect(agent, auth_request(agent)) as extra:
            answer = read_until_closed(extra)
        assert status_of(answer) == 503 and b"no free connection" in answer
        # Strangers cannot push out a client with the token, only each other.
        clients.pop().close()
        strangers = [connect(agent) for _ in range(3)]
        wait_for(lambda: read_until_closed(strangers[0]) == b"", "the oldest stranger closed")
        for sock in clients:
            sock.sendall(auth_request(agent))
            assert read_answer(sock) == 200
        for sock in (*clients, *strangers):
            sock.close()
        # With the slots free again, a new client gets in.
        wait_for(lambda: answers_200(agent), "a free connection")


def answers_200(agent: Agent) -> bool:
    try:
        return httpx.get(f"{agent.url}/info", headers=agent.auth).status_code == 200
    except httpx.TransportError:  # refused while the agent sees the others close
        return False


def test_out_of_range_limits_stop_the_agent_in_one_line(tmp_path: Path):
    token = tmp_path / "token"
    token.write_text("t" * 32 + "\n")
    token.chmod(0o600)
    for args, fragment in (
        (("--max-connections", "8", "--max-unauthenticated", "8"), "must be below"),
        (("--header-timeout-s", "0"), "--header-timeout-s must be positive"),
        (("--max-upload-mb", "10", "--max-work-mb", "5"), "--max-work-mb (5) must be at least"),
    ):
        result = run_cli("device", "serve", "--token-file", str(token), *args, cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        err = result.stderr.strip()
        assert len(err.splitlines()) == 1 and fragment in err and "Traceback" not in err
