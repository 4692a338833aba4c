"""The policy server (robo-run serve) and its client: malformed requests of many kinds get a
4xx that says what is wrong and the server keeps serving; the npz messages are plain numpy
archives; concurrent clients keep separate histories; sessions reset and end; the command
line binds and stops. Waits are on events; their timeouts only bound a failure."""

import http.client
import io
import json
import queue
import re
import signal
import socket
import subprocess
import threading
import time
import zipfile

import numpy as np
import pytest

from robovla.client import PolicyClient, ServerError
from robovla.env import Observation
from robovla.policy import Policy
from robovla.server import ENDPOINTS, PolicyServer
from robovla.wire import (WireError, decode_action, decode_observation, encode_action, encode_observation,
                          observation_fields)

from helpers import ROBO_RUN, TINY_CNN_LSTM, clean_env, synth_split, train_tiny

BOUND = 120  # seconds: how long an event may take before the test fails (never a wait by itself)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    import robovla

    training = synth_split(tmp_path_factory.mktemp("synth"))
    run = train_tiny(tmp_path_factory.mktemp("runs"), "cnn", training, *TINY_CNN_LSTM)
    dataset = robovla.create("dataset", "calvin", {"path": str(training)})
    return run, dataset


def episode(dataset, i, n=6):
    """Episode i's first n frames as Observations, and its instruction."""
    segment = dataset.segments()[i]
    frames = dataset.load(segment.start, segment.start + n - 1)
    return [Observation({c: frames.images[c][k] for c in frames.images}, frames.robot_obs[k]) for k in range(n)], \
        segment.instruction


@pytest.fixture(scope="module")
def server(data):
    with PolicyServer(Policy.from_run(data[0]), port=0) as s:
        yield s


def request(server, method, path, body=None, headers=None):
    """A raw request: (status, parsed JSON or bytes)."""
    host, port = server.httpd.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=BOUND)
    conn.request(method, path, body=body, headers=headers or {})
    r = conn.getresponse()
    payload = r.read()
    conn.close()
    return r.status, (json.loads(payload) if r.getheader("Content-Type") == "application/json" else payload)


def savez(save=np.savez, **arrays):
    """An archive written with numpy alone, as any client of the format writes it."""
    buffer = io.BytesIO()
    save(buffer, **arrays)
    return buffer.getvalue()


def act_body(obs, text, **change):
    arrays = {"image.gripper": obs.images["gripper"], "image.static": obs.images["static"],
              "robot_obs": obs.robot_obs, "instruction": np.array(text)}
    arrays.update(change)
    return savez(**{k: v for k, v in arrays.items() if v is not None})


def test_health_and_metadata(server):
    assert request(server, "GET", "/health") == (200, {"status": "ok", "sessions": 0})
    status, meta = request(server, "GET", "/metadata")
    assert status == 200 and meta["cameras"] == ["gripper", "static"] and meta["image_size"] == 32
    assert (meta["chunk"], meta["window"], meta["action_dim"]) == (3, 4, 7)
    assert meta["action_space"]["name"] == "rel-world" and meta["encoding"] == "application/x-npz"
    assert meta["image_fields"] == ["image.gripper", "image.static"] and meta["protocol"] == "robovla-serve/1"


def test_malformed_requests_get_4xx_and_the_server_keeps_serving(server, data):
    (obs, *_), instruction = episode(data[1], 0, 1)
    status, made = request(server, "POST", "/sessions")
    assert status == 201
    act = f"/sessions/{made['session']}/act"
    npz = {"Content-Type": "application/x-npz"}
    pickled = io.BytesIO()
    np.savez(pickled, **{"image.gripper": obs.images["gripper"], "image.static": obs.images["static"],
                         "robot_obs": obs.robot_obs, "instruction": np.array([{"a": 1}], dtype=object)})
    one_array = io.BytesIO()
    np.save(one_array, obs.robot_obs)
    nan_obs = obs.robot_obs.copy()
    nan_obs[4] = np.nan
    cases = [  # (what, method, path, body, headers, status, message)
        ("unknown path", "GET", "/nope", None, {}, 404, "no endpoint '/nope'"),
        ("wrong method", "DELETE", "/health", None, {}, 405, "/health takes GET, not DELETE"),
        ("unknown session", "POST", "/sessions/abc/act", act_body(obs, instruction), npz, 404, "no session 'abc'"),
        ("wrong content type", "POST", act, b"{}", {"Content-Type": "application/json"}, 415, "is application/x-npz"),
        ("too large", "POST", act, b"x", {**npz, "Content-Length": str(10 ** 10)}, 413, "at most"),
        ("not an archive", "POST", act, b"garbage" * 10, npz, 400, "not a readable .npz archive"),
        ("a single .npy", "POST", act, one_array.getvalue(), npz, 400, "not a readable .npz archive"),
        ("pickled objects", "POST", act, pickled.getvalue(), npz, 400, "not a readable .npz archive"),
        ("missing field", "POST", act, act_body(obs, instruction, robot_obs=None), npz, 400,
         r"missing field\(s\) \['robot_obs'\]"),
        ("unknown field", "POST", act, act_body(obs, instruction, depth=np.zeros(3)), npz, 400,
         r"unknown field\(s\) \['depth'\]"),
        ("float image", "POST", act, act_body(obs, instruction, **{"image.static": obs.images["static"] / 255}), npz,
         400, "images are uint8"),
        ("grey image", "POST", act, act_body(obs, instruction, **{"image.gripper": obs.images["gripper"][..., 0]}),
         npz, 400, r"expected an RGB image \[H, W, 3\]"),
        ("short robot_obs", "POST", act, act_body(obs, instruction, robot_obs=obs.robot_obs[:9]), npz, 400,
         r"robot_obs must be a float array \[15\]"),
        ("NaN robot_obs", "POST", act, act_body(obs, instruction, robot_obs=nan_obs), npz, 400,
         r"non-finite values at indices \[4\]"),
        ("integer robot_obs", "POST", act, act_body(obs, instruction, robot_obs=np.zeros(15, np.int64)), npz, 400,
         "robot_obs must be floating point"),
        ("instruction not text", "POST", act, act_body(obs, instruction, instruction=np.array(3)), npz, 400,
         "instruction must be a 0-d unicode array"),
        ("bad seed", "POST", "/sessions", b'{"seed": "x"}', {}, 400, "seed must be an integer"),
        ("session body not JSON", "POST", "/sessions", b"\x00\x01", {}, 400, "must be JSON"),
        ("unsupported method", "PUT", "/sessions", b"{}", {}, 501,
         "no endpoint takes method PUT; endpoints: " + re.escape(ENDPOINTS)),
        ("unsupported method, no body", "PATCH", act, None, {}, 501, "no endpoint takes method PATCH"),
    ]
    for what, method, path, body, headers, want, message in cases:
        status, answer = request(server, method, path, body, headers)
        assert status == want, (what, status, answer)
        assert re.search(message, answer["error"]), (what, answer)
        # and the server still answers a valid request
        status, action = request(server, "POST", act, act_body(obs, instruction), npz)
        assert status == 200, (what, action)
    # a request without Content-Length (sent by hand: http.client always adds one)
    host, port = server.httpd.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=BOUND)
    conn.putrequest("POST", act)
    conn.putheader("Content-Type", "application/x-npz")
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 411 and "Content-Length" in json.loads(r.read())["error"]
    conn.close()
    # more headers than http.server reads (its limit is 100): its own refusal, in the same JSON shape
    with socket.create_connection(server.httpd.server_address[:2], timeout=BOUND) as raw:
        raw.sendall(b"GET /health HTTP/1.1\r\n" + b"X-Many: 1\r\n" * 101)
        answer = raw.makefile("rb").read()  # the server closes the connection after answering
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 ") and b"Content-Type: application/json" in head, head
    assert b"Connection: close" in head and json.loads(payload) == {"error": "Too many headers", "status": 431}
    with np.load(io.BytesIO(request(server, "POST", act, act_body(obs, instruction), npz)[1])) as answer:
        assert answer["action"].shape == (7,) and answer["action"][6] in (-1.0, 1.0)
    assert ENDPOINTS == ("GET /health, GET /metadata, POST /sessions, DELETE /sessions/ID, POST /sessions/ID/reset, "
                         "POST /sessions/ID/act")


def test_npz_messages_are_plain_numpy_archives():
    """The client's act request is an uncompressed numpy.savez archive with the documented
    fields; the server reads archives numpy alone writes, compressed or not; the answer is one
    float64 array, read the same way."""
    rng = np.random.default_rng(0)
    images = {"gripper": rng.integers(0, 256, (8, 8, 3), np.uint8),
              "static": rng.integers(0, 256, (16, 16, 3), np.uint8)}
    robot_obs = rng.normal(size=15).astype(np.float32)
    sent = encode_observation(images, robot_obs, "open the drawer")
    assert {m.compress_type for m in zipfile.ZipFile(io.BytesIO(sent)).infolist()} == {zipfile.ZIP_STORED}
    with np.load(io.BytesIO(sent), allow_pickle=False) as arrays:
        assert sorted(arrays.files) == ["image.gripper", "image.static", "instruction", "robot_obs"]
        assert arrays["image.static"].dtype == np.uint8 and np.array_equal(arrays["image.static"], images["static"])
        assert arrays["instruction"].shape == () and str(arrays["instruction"]) == "open the drawer"
        assert arrays["robot_obs"].dtype == np.float32 and np.array_equal(arrays["robot_obs"], robot_obs)
    for save in (np.savez, np.savez_compressed):
        body = savez(save, **{f"image.{c}": img for c, img in images.items()}, robot_obs=robot_obs,
                     instruction=np.array("push the button"))
        read, read_obs, text = decode_observation(body, observation_fields(("gripper", "static"), 64, 15, 100))
        assert text == "push the button" and np.array_equal(read_obs, robot_obs)
        assert sorted(read) == ["gripper", "static"] and all(np.array_equal(read[c], images[c]) for c in images)
    with pytest.raises(WireError, match=r"missing field\(s\) \['image.wrist'\]"):
        decode_observation(sent, observation_fields(("gripper", "static", "wrist"), 64, 15, 100))
    with np.load(io.BytesIO(encode_action([0.5, -1])), allow_pickle=False) as answer:
        assert answer.files == ["action"] and answer["action"].dtype == np.float64
        assert answer["action"].tolist() == [0.5, -1.0]
    assert decode_action(savez(action=np.array([0.25, 1.0]))).tolist() == [0.25, 1.0]
    with pytest.raises(WireError, match=r"unknown field\(s\) \['command'\]; the answer has \['action'\]"):
        decode_action(savez(command=np.zeros(7)))
    with pytest.raises(WireError, match="the answer is not a readable .npz archive"):
        decode_action(b"<html>busy</html>")


def test_eight_concurrent_clients_keep_separate_histories(server, data, monkeypatch):
    """Each client drives its own episode; its commands equal those of a policy stepping that
    episode alone, although the server steps the sessions together in batches. The worker
    gathers its first batch only once all eight clients have sent a request, so that batch
    holds all eight whatever the machine's speed."""
    run, dataset = data
    episodes = [episode(dataset, i % 4, 6) for i in range(8)]
    alone = []
    for frames, instruction in episodes:
        policy = Policy.from_run(run)
        alone.append(np.stack([policy.act(o, instruction) for o in frames]))
    queued, gathered, all_sent = threading.Semaphore(0), threading.Event(), []
    put, get_nowait = server.jobs.put, server.jobs.get_nowait

    def counting_put(job):
        put(job)
        queued.release()

    def gather_once_all_eight_sent():
        if not gathered.is_set():  # the worker's first look for more requests; never raise in it
            all_sent.append(all(queued.acquire(timeout=BOUND) for _ in range(8)))
            gathered.set()
        return get_nowait()

    monkeypatch.setattr(server.jobs, "put", counting_put)
    monkeypatch.setattr(server.jobs, "get_nowait", gather_once_all_eight_sent)
    before, open_before = len(server.batches), len(server.sessions)
    results, errors = [None] * 8, []

    def drive(i):
        try:
            with PolicyClient(server.url) as client:
                frames, instruction = episodes[i]
                results[i] = np.stack([client.act(o.images, o.robot_obs, instruction) for o in frames])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=drive, args=(i,), daemon=True) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=BOUND)  # a bound: the clients finish long before
    assert not any(t.is_alive() for t in threads), f"clients still running after {BOUND} s"
    assert not errors, errors
    for i in range(8):
        np.testing.assert_allclose(results[i], alone[i], atol=1e-5, err_msg=f"client {i}")
    assert not np.allclose(alone[0], alone[1])  # the episodes differ, so a mix-up would show
    batches = server.batches[before:]
    assert all_sent == [True] and batches[0] == 8 and sum(batches) == 8 * 6  # stepped together
    assert request(server, "GET", "/health")[1]["sessions"] == open_before  # every client ended its session


def test_sessions_reset_and_end(server, data):
    frames, instruction = episode(data[1], 1, 6)
    open_before = len(server.sessions)
    with PolicyClient(server.url) as client:
        first = [client.act(o.images, o.robot_obs, instruction) for o in frames]
        client.reset()
        again = [client.act(o.images, o.robot_obs, instruction) for o in frames]
        np.testing.assert_array_equal(np.stack(first), np.stack(again))
        assert client.health()["sessions"] == open_before + 1
        ended = client.session
    assert client.session is None and len(server.sessions) == open_before
    with PolicyClient(server.url) as other:  # a live session of its own, pointed at the ended one
        own, other.session = other.session, ended
        try:
            with pytest.raises(ServerError, match=f"404: session {ended!r} was ended; open a new one") as refused:
                other.act(frames[0].images, frames[0].robot_obs, instruction)
            assert refused.value.status == 404
        finally:
            other.session = own
    limit = server.max_sessions
    server.max_sessions = open_before + 1
    try:
        with PolicyClient(server.url):
            with pytest.raises(ServerError, match="429: .* sessions are open") as refused:
                PolicyClient(server.url)
            assert refused.value.status == 429
    finally:
        server.max_sessions = limit
    assert len(server.sessions) == open_before  # every client, the refused one too, left nothing open


def served_url(proc, stderr):
    """The address ``robo-run serve`` prints once it listens, read line by line as it comes;
    fails if the process exits first or prints none within BOUND seconds."""
    lines = queue.Queue()

    def read():
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    printed, deadline = [], time.monotonic() + BOUND
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            pytest.fail(f"no address within {BOUND} s; stdout {printed}, stderr {stderr.read_text()!r}")
        if line is None:
            pytest.fail(f"exited ({proc.wait()}) before printing an address; stdout {printed}, "
                        f"stderr {stderr.read_text()!r}")
        found = re.search(r"at (http://127\.0\.0\.1:\d+)", line)
        if found:
            return found.group(1)
        printed.append(line)


def test_robo_run_serve_binds_loopback_and_stops_on_ctrl_c(data, tmp_path):
    stderr = tmp_path / "stderr.txt"
    with stderr.open("w") as sink:
        proc = subprocess.Popen([str(ROBO_RUN), "serve", "--run", str(data[0]), "--port", "0"],
                                stdout=subprocess.PIPE, stderr=sink, text=True, env=clean_env())
    try:
        with PolicyClient(served_url(proc, stderr)) as client:
            assert client.health()["status"] == "ok" and client.metadata["step"] == 2
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=BOUND) == 0, stderr.read_text()
        assert "Traceback" not in stderr.read_text(), stderr.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
