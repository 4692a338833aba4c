"""The policy server (robo-run serve) and its client: malformed requests of many kinds get a
4xx that says what is wrong and the server keeps serving; concurrent clients keep separate
histories; sessions reset and end; the command line binds and stops."""

import http.client
import io
import json
import re
import signal
import subprocess
import threading

import numpy as np
import pytest

from robovla.client import PolicyClient, ServerError
from robovla.env import Observation
from robovla.policy import Policy
from robovla.server import PolicyServer, encode_npz

from helpers import ROBO_RUN, TINY_CNN_LSTM, clean_env, synth_split, train_tiny


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
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    r = conn.getresponse()
    payload = r.read()
    conn.close()
    return r.status, (json.loads(payload) if r.getheader("Content-Type") == "application/json" else payload)


def act_body(obs, text, **change):
    arrays = {"image.gripper": obs.images["gripper"], "image.static": obs.images["static"],
              "robot_obs": obs.robot_obs, "instruction": np.array(text)}
    arrays.update(change)
    return encode_npz(**{k: v for k, v in arrays.items() if v is not None})


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
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.putrequest("POST", act)
    conn.putheader("Content-Type", "application/x-npz")
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 411 and "Content-Length" in json.loads(r.read())["error"]
    conn.close()
    with np.load(io.BytesIO(request(server, "POST", act, act_body(obs, instruction), npz)[1])) as answer:
        assert answer["action"].shape == (7,) and answer["action"][6] in (-1.0, 1.0)
    assert len(cases) + 1 >= 10


def test_eight_concurrent_clients_keep_separate_histories(server, data):
    """Each client drives its own episode; its commands equal those of a policy stepping that
    episode alone, although the server steps the sessions together in batches."""
    run, dataset = data
    episodes = [episode(dataset, i % 4, 6) for i in range(8)]
    alone = []
    for frames, instruction in episodes:
        policy = Policy.from_run(run)
        alone.append(np.stack([policy.act(o, instruction) for o in frames]))
    before, open_before = len(server.batches), len(server.sessions)
    results, errors = [None] * 8, []
    start = threading.Barrier(8)

    def drive(i):
        try:
            with PolicyClient(server.url) as client:
                frames, instruction = episodes[i]
                start.wait()
                results[i] = np.stack([client.act(o.images, o.robot_obs, instruction) for o in frames])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=drive, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for i in range(8):
        np.testing.assert_allclose(results[i], alone[i], atol=1e-5, err_msg=f"client {i}")
    assert not np.allclose(alone[0], alone[1])  # the episodes differ, so a mix-up would show
    batches = server.batches[before:]
    assert sum(batches) == 8 * 6 and max(batches) > 1  # stepped together
    assert request(server, "GET", "/health")[1]["sessions"] == open_before  # every client ended its session


def test_sessions_reset_and_end(server, data):
    frames, instruction = episode(data[1], 1, 6)
    with PolicyClient(server.url) as client:
        first = [client.act(o.images, o.robot_obs, instruction) for o in frames]
        client.reset()
        again = [client.act(o.images, o.robot_obs, instruction) for o in frames]
        np.testing.assert_array_equal(np.stack(first), np.stack(again))
        assert client.health()["sessions"] >= 1
        session = client.session
    with pytest.raises(ServerError, match="404: no session"):
        request_client = PolicyClient(server.url)
        request_client.session = session
        try:
            request_client.act(frames[0].images, frames[0].robot_obs, instruction)
        finally:
            request_client.session = None
    server_sessions = server.max_sessions
    server.max_sessions = len(server.sessions) + 1
    try:
        extra = PolicyClient(server.url)
        with pytest.raises(ServerError, match="429: .* sessions are open"):
            PolicyClient(server.url)
        extra.close()
    finally:
        server.max_sessions = server_sessions


def test_robo_run_serve_binds_loopback_and_stops_on_ctrl_c(data):
    proc = subprocess.Popen([str(ROBO_RUN), "serve", "--run", str(data[0]), "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=clean_env())
    try:
        line = proc.stdout.readline()
        url = re.search(r"at (http://127\.0\.0\.1:\d+)", line)
        assert url, (line, proc.stderr.read() if proc.poll() is not None else "")
        with PolicyClient(url.group(1)) as client:
            assert client.health()["status"] == "ok" and client.metadata["step"] == 2
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
