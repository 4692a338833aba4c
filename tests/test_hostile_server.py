"""robo-run serve under attack and careless use, each case planted for real: zip bombs refused
before they inflate (the server's peak memory measured), idle and silent connections that
cannot lock out /health, a descriptor limit, one failing session in a batch, sessions that
expire, a bearer token, nested JSON, HEAD, a client leaving mid-answer, SIGTERM draining.
Waits are on events; their timeouts only bound a failure."""

import http.client
import io
import json
import re
import resource
import signal
import socket
import struct
import subprocess
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from robovla.client import PolicyClient, ServerError
from robovla.policy import Policy
from robovla.server import PolicyServer
from robovla.wire import Field, WireError, WireTooLarge, decode_npz

from helpers import ROBO_RUN, TINY_CNN_LSTM, clean_env, synth_split, train_tiny
from test_serve import BOUND, act_body, episode, request

NPZ = {"Content-Type": "application/x-npz"}
MB = 1 << 20


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    import robovla

    training = synth_split(tmp_path_factory.mktemp("synth"))
    run = train_tiny(tmp_path_factory.mktemp("runs"), "cnn", training, *TINY_CNN_LSTM)
    return run, robovla.create("dataset", "calvin", {"path": str(training)})


@pytest.fixture(scope="module")
def frame(data):
    (obs, *_), instruction = episode(data[1], 0, 1)
    return obs, instruction


def bomb(obs, instruction, field, inflated):
    """A valid act body but for ``field``: a uint8 array of ``inflated`` zero bytes, deflated
    (zeros deflate about 1000:1), streamed so that the test itself never holds it inflated."""
    valid = {"image.gripper": obs.images["gripper"], "image.static": obs.images["static"],
             "robot_obs": obs.robot_obs, "instruction": np.array(instruction)}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, array in valid.items():
            if name != field:
                with archive.open(f"{name}.npy", "w") as member:
                    np.lib.format.write_array(member, array)
        with archive.open(f"{field}.npy", "w", force_zip64=True) as member:
            header = {"descr": "|u1", "fortran_order": False, "shape": (inflated,)}
            np.lib.format.write_array_header_1_0(member, header)
            zeros = bytes(MB)
            for _ in range(inflated // MB):
                member.write(zeros)
    return buffer.getvalue()


def vm(pid, key):
    """A /proc/PID/status figure in bytes (VmRSS, VmHWM: the peak resident memory)."""
    found = re.search(rf"^{key}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    return int(found.group(1)) * 1024


def peak_growth(pid, send):
    """(how far ``send()`` raised process ``pid``'s peak resident memory above its memory before, send's result)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak restarts from the memory in use now
    before = vm(pid, "VmHWM")
    result = send()
    return vm(pid, "VmHWM") - before, result


class Served:
    """``robo-run serve`` in a subprocess: its port, read from the line it prints once it listens."""

    def __init__(self, args, env, tmp_path, preexec_fn=None):
        self.stderr = tmp_path / "stderr.txt"
        with self.stderr.open("w") as sink:
            self.proc = subprocess.Popen([str(ROBO_RUN), "serve", *args], stdout=subprocess.PIPE, stderr=sink,
                                         text=True, env=env, preexec_fn=preexec_fn)
        self.first_line = self.proc.stdout.readline()  # printed once it listens, or nothing if it exits
        found = re.search(r"at http://[^:]+:(\d+)", self.first_line)
        if not found:
            self.proc.wait(timeout=BOUND)
            self.port = None
        else:
            self.port = int(found.group(1))

    def request(self, method, path, body=None, headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=BOUND)
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        payload = r.read()
        conn.close()
        return r.status, (json.loads(payload) if r.getheader("Content-Type") == "application/json" else payload)

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def test_zip_bombs_are_refused_before_inflating(data, frame, tmp_path):
    """A ~400 KB body inflating to 400 MB, in an unknown member and in an image member: refused
    with the member named, the server's peak memory up by less than 50 MB. The meter is real:
    a valid compressed 24 MB image raises that peak by more than 20 MB."""
    obs, instruction = frame
    served = Served(["--run", str(data[0]), "--port", "0"], clean_env(), tmp_path)
    try:
        assert served.port, (served.first_line, served.stderr.read_text())
        status, made = served.request("POST", "/sessions")
        act = f"/sessions/{made['session']}/act"
        cases = [("depth", 400, r"unknown field\(s\) \['depth'\]"),
                 ("image.static", 413, r"act request member 'image.static.npy' \(field 'image.static': uint8 "
                                       r"\[H, W, 3\], sides up to 4096 px, at most 50331648 bytes\) inflates to "
                                       r"419430\d+ bytes; refused before inflating it")]
        for field, want, message in cases:
            body = bomb(obs, instruction, field, 400 * MB)
            assert len(body) < 500_000, len(body)
            growth, (status, answer) = peak_growth(served.proc.pid, lambda: served.request("POST", act, body, NPZ))
            assert (status, answer["status"]) == (want, want) and re.search(message, answer["error"]), answer
            assert growth < 50 * MB, f"{field}: the peak grew by {growth / MB:.0f} MB"
        big = np.zeros((4096, 2048, 3), np.uint8)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **{"image.static": big, "image.gripper": obs.images["gripper"]},
                            robot_obs=obs.robot_obs, instruction=np.array(instruction))
        growth, (status, answer) = peak_growth(served.proc.pid,
                                               lambda: served.request("POST", act, buffer.getvalue(), NPZ))
        assert status == 200 and growth > 20 * MB, (status, growth / MB)
        assert "Traceback" not in served.stderr.read_text()
    finally:
        served.close()


def test_wire_checks_names_sizes_and_headers_before_reading():
    """The reader's refusals one by one, on archives small enough to build in memory."""
    fields = {"a": Field(100, "uint8 [100]"), "b": Field(8, "float64 [1]")}

    def archive(members, compression=zipfile.ZIP_STORED):
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", compression) as z:
            for name, payload in members.items():
                z.writestr(name, payload)
        return buffer.getvalue()

    def npy(array):
        buffer = io.BytesIO()
        np.lib.format.write_array(buffer, array)
        return buffer.getvalue()

    good = {"a.npy": npy(np.arange(100, dtype=np.uint8)), "b.npy": npy(np.ones(1))}
    read = decode_npz(archive(good, zipfile.ZIP_DEFLATED), fields)
    assert read["a"].tolist() == list(range(100)) and read["b"].tolist() == [1.0]
    with pytest.raises(WireTooLarge, match=r"member 'a.npy' \(field 'a': uint8 \[100\], at most 100 bytes\) is "
                                           r"uint8 \[101\], 101 bytes; refused before inflating it"):
        decode_npz(archive({**good, "a.npy": npy(np.zeros(101, np.uint8))}), fields)
    with pytest.raises(WireTooLarge, match=r"member 'b.npy' .* inflates to 70000 bytes"):
        decode_npz(archive({**good, "b.npy": bytes(70000)}, zipfile.ZIP_DEFLATED), fields)
    with pytest.raises(WireError, match=r"unknown field\(s\) \['c'\]; the body has \['a', 'b'\]"):
        decode_npz(archive({**good, "c.npy": b""}), fields)
    with pytest.raises(WireError, match=r"missing field\(s\) \['b'\]"):
        decode_npz(archive({"a.npy": good["a.npy"]}), fields)
    with pytest.raises(WireError, match="Python objects, which would need unpickling"):
        decode_npz(archive({**good, "a.npy": npy(np.array([None], dtype=object))}), fields)
    with pytest.raises(WireError, match=r"member 'a.npy' .* is compressed with method 12; numpy.savez writes"):
        decode_npz(archive(good, zipfile.ZIP_BZIP2), fields)
    many = archive({f"x{i}.npy": b"" for i in range(200)})
    with pytest.raises(WireError, match="more zip entries than its 2 fields"):
        decode_npz(many, fields)
    twice = archive(good)
    twice = twice.replace(b"b.npy", b"a.npy")  # the second member's name, in its local and directory entries
    with pytest.raises(WireError, match="holds field 'a' twice"):
        decode_npz(twice, fields)


@pytest.fixture
def make_server(data):
    servers = []

    def make(**options):
        server = PolicyServer(Policy.from_run(data[0]), port=0, **options).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop(drain=BOUND)


def wait_for(server, condition):
    """Block until ``condition(server.httpd)`` holds (checked on every change of its connections)."""
    with server.httpd.changed:
        assert server.httpd.changed.wait_for(lambda: condition(server.httpd), BOUND), "condition never held"


def test_idle_connections_cannot_lock_out_health(make_server):
    """Four idle sockets fill a cap of four: /health still answers 200, and the longest-idle
    socket is the one closed to make room."""
    server = make_server(max_connections=4)
    idle = [socket.create_connection(server.httpd.server_address[:2], timeout=BOUND) for _ in range(4)]
    try:
        wait_for(server, lambda h: len(h.connections) == 4)
        assert request(server, "GET", "/health") == (200, {"status": "ok", "sessions": 0})
        assert idle[0].recv(1) == b""  # closed by the server
        assert request(server, "GET", "/health")[0] == 200 and server.httpd.refused == 0
    finally:
        for s in idle:
            s.close()


def test_busy_connections_past_the_cap_get_503_then_200(make_server, frame):
    """Two act requests hold a cap of two connections (the policy blocked): /health gets a
    prompt 503 in JSON; once they finish it gets 200."""
    server = make_server(max_connections=2)
    release, act_batch = threading.Event(), server.policy.act_batch

    def blocked(*args, **kwargs):
        assert release.wait(BOUND)
        return act_batch(*args, **kwargs)

    server.policy.act_batch = blocked
    obs, instruction = frame
    sessions = [request(server, "POST", "/sessions")[1]["session"] for _ in range(2)]
    answers = []
    threads = [threading.Thread(target=lambda s=s: answers.append(
        request(server, "POST", f"/sessions/{s}/act", act_body(obs, instruction), NPZ)[0])) for s in sessions]
    for t in threads:
        t.start()
    wait_for(server, lambda h: h.busy() == 2)
    status, answer = request(server, "GET", "/health")
    assert status == 503 and "all 2 connections are busy (--max-connections)" in answer["error"]
    release.set()
    for t in threads:
        t.join(BOUND)
    assert answers == [200, 200] and request(server, "GET", "/health")[0] == 200


def test_a_silent_connection_is_closed_after_the_read_timeout(make_server):
    server = make_server(read_timeout=0.2)
    with socket.create_connection(server.httpd.server_address[:2], timeout=BOUND) as s:
        s.sendall(b"GET /hea")  # a request line that never ends
        assert s.recv(1) == b""  # the server closed it
    wait_for(server, lambda h: not h.connections)


def test_a_descriptor_limit_is_fitted_and_65_idle_sockets_leave_health_open(data, tmp_path):
    """Under a limit of 64 open files: the default cap (128) is refused before the model
    loads, naming the flag and the fix; with --max-connections 8, 65 idle sockets still leave
    /health at 200."""
    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    refused = Served(["--run", str(data[0]), "--port", "0"], clean_env(), tmp_path, limit)
    assert refused.port is None and refused.proc.returncode != 0
    message = refused.stderr.read_text()
    assert re.search(r"--max-connections 128 needs about \d+ open files, but this process may open 64 \(ulimit -n\)"
                     r".*lower --max-connections to \d+", message) and "Traceback" not in message, message
    served = Served(["--run", str(data[0]), "--port", "0", "--max-connections", "8"], clean_env(), tmp_path, limit)
    idle = []
    try:
        assert served.port, served.stderr.read_text()
        idle = [socket.create_connection(("127.0.0.1", served.port), timeout=BOUND) for _ in range(65)]
        assert served.request("GET", "/health") == (200, {"status": "ok", "sessions": 0})
        assert "Traceback" not in served.stderr.read_text()
    finally:
        for s in idle:
            s.close()
        served.close()


def test_one_failing_session_leaves_the_others_at_200(make_server, data):
    """Five sessions stepped in one batch, one of whose requests makes the policy raise: the
    four others get 200 with the commands of a policy stepping them alone, the fifth a 500
    naming the failure; its episode is left as before, so its next step is its first."""
    run, dataset = data
    server = make_server()
    episodes = [episode(dataset, i % 4, 3) for i in range(4)]
    alone = []
    for frames, instruction in episodes:
        policy = Policy.from_run(run)
        alone.append(np.stack([policy.act(o, instruction) for o in frames]))
    decode = server.policy.action_space.decode

    def poisoned_decode(action, robot_obs):
        if robot_obs[0] == 123.0:
            raise FloatingPointError("robot_obs[0] is 123")
        return decode(action, robot_obs)

    server.policy.action_space.decode = poisoned_decode
    (bad_obs, *_), bad_text = episodes[0]
    poison = bad_obs.robot_obs.copy()
    poison[0] = 123.0
    queued, put, get_nowait, gathered = threading.Semaphore(0), server.jobs.put, server.jobs.get_nowait, []

    def counting_put(job):
        put(job)
        queued.release()

    def gather_first_five():
        if not gathered:
            gathered.append(all(queued.acquire(timeout=BOUND) for _ in range(5)))
        return get_nowait()

    server.jobs.put, server.jobs.get_nowait = counting_put, gather_first_five
    results, failed = [None] * 4, []

    def drive(i):
        with PolicyClient(server.url) as client:
            frames, instruction = episodes[i]
            results[i] = np.stack([client.act(o.images, o.robot_obs, instruction) for o in frames])

    def drive_poisoned():
        client = PolicyClient(server.url)
        try:
            client.act(bad_obs.images, poison, bad_text)
        except ServerError as exc:
            failed.append(exc)
        failed.append(client.act(bad_obs.images, bad_obs.robot_obs, bad_text))  # its first step, really
        client.close()

    threads = [threading.Thread(target=drive, args=(i,)) for i in range(4)] + [threading.Thread(target=drive_poisoned)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(BOUND)
    # the batch of five failed, and its four healthy requests were stepped one by one
    assert gathered == [True] and server.retried == 1 and server.batches[:4] == [1, 1, 1, 1]
    for i in range(4):
        np.testing.assert_allclose(results[i], alone[i], atol=1e-5, err_msg=f"session {i}")
    assert failed[0].status == 500 and "FloatingPointError: robot_obs[0] is 123" in str(failed[0])
    np.testing.assert_allclose(failed[1], alone[0][0], atol=1e-5)


def test_idle_sessions_expire(make_server, frame):
    """Sessions idle past --session-timeout expire (a controllable clock stands for time) and
    free their places; a request keeps a session alive; /metadata says the timeout."""
    now = [0.0]
    server = make_server(max_sessions=2, session_timeout=5, clock=lambda: now[0])
    obs, instruction = frame
    assert request(server, "GET", "/metadata")[1]["session_timeout"] == 5
    first, second = (request(server, "POST", "/sessions")[1]["session"] for _ in range(2))
    status, answer = request(server, "POST", "/sessions")
    assert status == 429 and "or one expires after 5 s without a request" in answer["error"]
    now[0] = 4.0
    assert request(server, "POST", f"/sessions/{second}/act", act_body(obs, instruction), NPZ)[0] == 200
    now[0] = 8.0  # first: idle 8 s, expired; second: idle 4 s since its request
    status, third = request(server, "POST", "/sessions")
    assert status == 201 and sorted(server.sessions) == sorted([second, third["session"]])
    status, answer = request(server, "POST", f"/sessions/{first}/act", act_body(obs, instruction), NPZ)
    assert status == 404 and answer["error"] == (f"session {first!r} expired after 5 s without a request; open a new "
                                                 "one with POST /sessions")
    assert first not in server.policy.episodes  # its state is freed too
    now[0] = 100.0
    server.expire()  # what the accept loop runs between polls
    assert server.sessions == {} and request(server, "GET", "/health")[1]["sessions"] == 0


def test_a_token_guards_every_endpoint_but_health(make_server, frame, monkeypatch):
    server = make_server(token="s3cret-token")
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        status, answer = request(server, "GET", "/metadata", headers=headers)
        assert status == 401 and "'Authorization: Bearer TOKEN'" in answer["error"], answer
        assert request(server, "POST", "/sessions", b"{}", headers)[0] == 401
    assert request(server, "GET", "/health")[0] == 200
    status, meta = request(server, "GET", "/metadata", headers={"Authorization": "Bearer s3cret-token"})
    assert status == 200 and meta["auth"] == "bearer"
    with pytest.raises(ServerError, match="401: no token"):
        PolicyClient(server.url)
    obs, instruction = frame
    with PolicyClient(server.url, token="s3cret-token") as client:
        assert client.act(obs.images, obs.robot_obs, instruction).shape == (7,)
    monkeypatch.setenv("ROBOVLA_SERVE_TOKEN", "s3cret-token")
    with PolicyClient(server.url) as client:
        assert client.health()["sessions"] == 1
    assert server.sessions == {}


def test_nested_json_head_and_metadata_without_paths(make_server, data):
    server = make_server()
    for body in (b"[" * 100_000, b'{"seed": ' + b"[" * 5000 + b"]" * 5000 + b"}", b'{"seed": 1' + b"0" * 5000 + b"}"):
        status, answer = request(server, "POST", "/sessions", body)
        assert status in (400, 413) and answer["status"] == status, answer
    assert request(server, "POST", "/sessions", b"[" * 60_000)[1]["error"].startswith("the body must be JSON")
    for path in ("/health", "/metadata"):
        host, port = server.httpd.server_address[:2]
        conn = http.client.HTTPConnection(host, port, timeout=BOUND)
        conn.request("GET", path)
        got = conn.getresponse()
        body = got.read()
        conn.request("HEAD", path)
        head = conn.getresponse()
        assert head.status == 200 and head.read() == b"" and head.getheader("Content-Length") == str(len(body))
        conn.close()
    text = json.dumps(request(server, "GET", "/metadata")[1])
    assert json.loads(text)["run"] == data[0].name and str(data[0].parent) not in text


def test_a_client_leaving_mid_answer_prints_no_traceback(make_server, frame, capfd):
    server = make_server()
    release, act_batch = threading.Event(), server.policy.act_batch
    server.policy.act_batch = lambda *a, **k: (release.wait(BOUND), act_batch(*a, **k))[1]
    session = request(server, "POST", "/sessions")[1]["session"]
    obs, instruction = frame
    body = act_body(obs, instruction)
    s = socket.create_connection(server.httpd.server_address[:2], timeout=BOUND)
    s.sendall(f"POST /sessions/{session}/act HTTP/1.1\r\nContent-Type: application/x-npz\r\n"
              f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    wait_for(server, lambda h: h.busy() == 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
    s.close()
    release.set()
    wait_for(server, lambda h: not h.connections)
    assert request(server, "GET", "/health")[0] == 200
    err = capfd.readouterr().err
    assert "Traceback" not in err and "BrokenPipe" not in err and "ConnectionReset" not in err, err


def test_sigterm_drains_requests_in_flight(data, frame, tmp_path):
    """Bound beyond loopback with a token from the environment: the warning says requests need
    it. SIGTERM while an act request is half sent: new connections are refused, the request
    finishes with 200, the server exits 0 without a traceback."""
    obs, instruction = frame
    served = Served(["--run", str(data[0]), "--port", "0", "--host", "0.0.0.0"],
                    clean_env(ROBOVLA_SERVE_TOKEN="tok-123"), tmp_path)
    try:
        assert served.port, served.stderr.read_text()
        assert "listening on 0.0.0.0: requests need the token" in served.stderr.read_text()
        auth = {"Authorization": "Bearer tok-123"}
        assert served.request("GET", "/metadata")[0] == 401
        session = served.request("POST", "/sessions", b"", auth)[1]["session"]
        body = act_body(obs, instruction)
        s = socket.create_connection(("127.0.0.1", served.port), timeout=BOUND)
        s.sendall(f"POST /sessions/{session}/act HTTP/1.1\r\nContent-Type: application/x-npz\r\nAuthorization: "
                  f"Bearer tok-123\r\nExpect: 100-continue\r\nContent-Length: {len(body)}\r\n\r\n".encode())
        reader = s.makefile("rb")
        assert reader.readline().startswith(b"HTTP/1.1 100")  # the headers are read: the request is in flight
        reader.readline()
        s.sendall(body[:100])
        served.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + BOUND
        while time.monotonic() < deadline:  # until the listening socket closes
            try:
                socket.create_connection(("127.0.0.1", served.port), timeout=BOUND).close()
            except (ConnectionRefusedError, ConnectionResetError):  # closed, or closed with this one queued
                break
            time.sleep(0.01)  # a pause between probes, not a wait for the answer
        s.sendall(body[100:])
        head = reader.readline()
        assert head.startswith(b"HTTP/1.1 200"), head
        headers = {}
        while (line := reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.lower()] = value.strip()
        answer = np.load(io.BytesIO(reader.read(int(headers["content-length"]))))
        assert answer["action"].shape == (7,) and headers["connection"] == "close"
        s.close()
        assert served.proc.wait(timeout=BOUND) == 0
        assert "Traceback" not in served.stderr.read_text(), served.stderr.read_text()
    finally:
        served.close()


def test_token_flag_is_checked(data, tmp_path):
    served = Served(["--run", str(data[0]), "--port", "0", "--token", "has space"], clean_env(), tmp_path)
    message = served.stderr.read_text()
    assert served.port is None and served.proc.returncode != 0 and "Traceback" not in message
    assert "--token: a token is printable ASCII without spaces" in message, message


def test_a_taken_port_and_a_bad_port_are_clear_errors(data, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        served = Served(["--run", str(data[0]), "--port", str(port)], clean_env(), tmp_path)
        message = served.stderr.read_text()
        assert served.port is None and served.proc.returncode != 0 and "Traceback" not in message
        assert f"--host 127.0.0.1 --port {port}: cannot listen there (Address already in use)" in message, message
    served = Served(["--run", str(data[0]), "--port", "70000"], clean_env(), tmp_path)
    assert served.proc.returncode == 2 and "--port must be 0..65535" in served.stderr.read_text()


def test_a_body_trickled_a_byte_at_a_time_gets_408_within_the_read_timeout(make_server):
    """Each byte comes well within the read timeout, but the body as a whole must arrive
    within it: the server answers 408 long before the client has sent its last byte."""
    server = make_server(read_timeout=0.5)
    body = b"{" + b" " * 998 + b"}"
    sent, answered = [], threading.Event()
    with socket.create_connection(server.httpd.server_address[:2], timeout=BOUND) as s:
        s.sendall(b"POST /sessions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body))

        def trickle():
            for byte in body:
                if answered.wait(0.05):
                    return
                try:
                    s.sendall(bytes([byte]))
                except OSError:  # closed by the server
                    return
                sent.append(byte)

        sender = threading.Thread(target=trickle)
        sender.start()
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            part = s.recv(4096)
            if not part:
                break
            reply += part
        answered.set()
        sender.join(BOUND)
    assert reply.startswith(b"HTTP/1.0 408") or reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"the body came too slowly" in reply and b"of 1000 bytes in 0.5 s (--read-timeout)" in reply
    assert len(sent) < len(body)  # answered while the client was still sending
    assert request(server, "GET", "/health")[0] == 200


def exchange(server, raw):
    """Send ``raw`` on one connection and read until the server closes it: the bytes answered."""
    with socket.create_connection(server.httpd.server_address[:2], timeout=BOUND) as s:
        s.sendall(raw)
        reply = b""
        while part := s.recv(65536):
            reply += part
    return reply


SMUGGLED = b"POST /sessions HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
FRAMINGS = {  # headers of a POST /sessions whose body is SMUGGLED (or part of it) -> the error
    "chunked after a zero length": (b"Content-Length: 0\r\nTransfer-Encoding: chunked\r\n",
                                    b"%x\r\n" % len(SMUGGLED) + SMUGGLED + b"\r\n0\r\n\r\n",
                                    b"Transfer-Encoding is not accepted; send the body with one Content-Length"),
    "chunked alone": (b"Transfer-Encoding: chunked\r\n", b"0\r\n\r\n" + SMUGGLED, b"Transfer-Encoding is not"),
    "two lengths": (b"Content-Length: 0\r\nContent-Length: 2\r\n", b"{}" + SMUGGLED,
                    b"2 Content-Length headers ('0', '2'); send one"),
    "plus sign": (b"Content-Length: +2\r\n", b"{}" + SMUGGLED, b"Content-Length '+2' is not a byte count"),
    "underscore": (b"Content-Length: 1_0\r\n", b"{\"seed\": 1}" + SMUGGLED, b"Content-Length '1_0' is not"),
    "negative": (b"Content-Length: -1\r\n", SMUGGLED, b"Content-Length '-1' is not a byte count"),
    "superscript two": (b"Content-Length: \xb22\r\n", b"{}" + SMUGGLED,
                        b"Content-Length '\\u00b22' is not a byte count (ASCII digits only)"),  # JSON escapes it
}


@pytest.mark.parametrize("case", sorted(FRAMINGS))
def test_ambiguous_framing_gets_400_and_the_connection_closes(make_server, case):
    """Framing a proxy in front could read otherwise (request smuggling) is refused: one 400,
    the connection closed, and nothing after the headers taken for a request (no session opens)."""
    server = make_server()
    headers, body, error = FRAMINGS[case]
    reply = exchange(server, b"POST /sessions HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n" + body)
    assert reply.startswith(b"HTTP/1.1 400 "), reply[:300]
    assert reply.count(b"HTTP/1.1 ") == 1 and b"Connection: close" in reply, reply
    assert error in reply, reply
    assert not server.sessions  # neither the request nor the smuggled one opened a session
    assert request(server, "GET", "/health")[0] == 200


def test_a_length_of_ascii_digits_is_served_and_a_get_body_closes_the_connection(make_server):
    server = make_server()
    reply = exchange(server, b"POST /sessions HTTP/1.1\r\nHost: x\r\nContent-Length: 002\r\n\r\n{}"
                             b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 201 ") and reply.count(b"HTTP/1.1 200 ") == 1, reply  # both answered
    assert len(server.sessions) == 1
    # a GET's body is not read: the server closes rather than read it as the next request
    reply = exchange(server, b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(SMUGGLED)
                     + SMUGGLED)
    assert reply.startswith(b"HTTP/1.1 200 ") and reply.count(b"HTTP/1.1 ") == 1 and b"Connection: close" in reply
    assert len(server.sessions) == 1
