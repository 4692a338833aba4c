"""Throughput and latency of ``robo-run serve`` under concurrent clients, for variants measured
side by side in one invocation.

    python bench/server_load.py [--clients 32] [--requests 40] [--rounds 4] [--run RUN]
                                [--against PATH] [--json]

The policy is a demo run (``robo-run --preset demo``: cnn-pool on the gripper camera, LSTM
head) trained for ``--train-steps`` steps into a temporary folder by this tree, or the run
folder ``--run`` names; every variant serves that same run on the CPU. Each round starts a
fresh server per variant (``robo-run serve --port 0``, its robovla imported from a folder on
PYTHONPATH) and drives it from ``--clients`` threads, each with its own session and kept-alive
connection: a few warm-up steps, then, from a common start, ``--requests`` act requests of an
84 px RGB image per camera (random, encoded once) with a robot state and an instruction. The
client is this script's own (numpy.savez and http.client), the same for every variant.
Reported per variant: requests per second over the timed phase, and the 50th and 99th
percentile of the request latencies, each the median of the rounds, with its ratio to this
tree. Variants alternate round by round, each round starting with the next (A B, B A, ...),
so that machine noise and order effects hit all alike (an even number of rounds puts each
of two variants first equally often).

Variants:
  this tree        the robovla this script belongs to
  --against PATH   another robovla checkout (its core/ and plugins/ imported instead),
                   e.g. a worktree of an earlier commit; repeatable
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from demo_run import CLI, train_demo

ROOT = Path(__file__).resolve().parent.parent
WARMUP = 3  # act requests per client before the timed phase


def shim(folder: Path, checkout: Path) -> Path:
    """A folder that imports ``checkout``'s core/ as robovla and plugins/ as robovla_plugins."""
    folder.mkdir()
    (folder / "robovla").symlink_to(checkout.resolve() / "core")
    (folder / "robovla_plugins").symlink_to(checkout.resolve() / "plugins")
    return folder


class Server:
    """``robo-run serve --port 0`` of one variant, in a subprocess; stops on SIGINT."""

    def __init__(self, run: Path, env: dict[str, str]):
        self.stderr = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen([sys.executable, "-c", CLI, "serve", "--run", str(run), "--port", "0"],
                                     env=env, stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        line = self.proc.stdout.readline()
        found = re.search(r"at http://([^:]+):(\d+)", line)
        if not found:
            self.proc.kill()
            self.proc.wait()
            self.stderr.seek(0)
            raise SystemExit(f"the server did not start: {line}{self.stderr.read()[-3000:]}")
        self.address = (found.group(1), int(found.group(2)))

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()


def body_for(cameras: list[str], seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    arrays = {f"image.{cam}": rng.integers(0, 256, (84, 84, 3), dtype=np.uint8) for cam in cameras}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays, robot_obs=rng.normal(size=15), instruction=np.array("reach the red target"))
    return buffer.getvalue()


def call(conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None,
         kind: str = "application/json") -> bytes:
    conn.request(method, path, body=body, headers={"Content-Type": kind} if body is not None else {})
    response = conn.getresponse()
    data = response.read()
    if response.status >= 400:
        raise RuntimeError(f"{method} {path}: {response.status} {data[:300]!r}")
    return data


def load(address: tuple[str, int], clients: int, requests: int) -> tuple[float, list[float]]:
    """(requests per second over the timed phase, every timed request's latency in seconds)."""
    conn = http.client.HTTPConnection(*address, timeout=120)
    cameras = json.loads(call(conn, "GET", "/metadata"))["cameras"]
    conn.close()
    bodies = [body_for(cameras, seed) for seed in range(8)]
    ready, start = threading.Barrier(clients + 1), threading.Event()
    latencies: list[list[float]] = [[] for _ in range(clients)]
    finished = [0.0] * clients
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            c = http.client.HTTPConnection(*address, timeout=120)
            act = f"/sessions/{json.loads(call(c, 'POST', '/sessions'))['session']}/act"
            for k in range(WARMUP):
                call(c, "POST", act, bodies[(i + k) % len(bodies)], "application/x-npz")
        except BaseException as exc:  # noqa: BLE001 - reported after the round
            errors.append(exc)
            ready.abort()
            return
        ready.wait()
        start.wait()
        for k in range(requests):
            began = time.perf_counter()
            call(c, "POST", act, bodies[(i + k) % len(bodies)], "application/x-npz")
            latencies[i].append(time.perf_counter() - began)
        finished[i] = time.perf_counter()
        c.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    try:
        ready.wait()
    except threading.BrokenBarrierError:
        raise SystemExit(f"a client failed before the timed phase: {errors}") from None
    began = time.perf_counter()
    start.set()
    for t in threads:
        t.join()
    if any(len(x) != requests for x in latencies):
        raise SystemExit("a client failed during the timed phase")
    return clients * requests / (max(finished) - began), [s for x in latencies for s in x]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients, one session each (default 32)")
    parser.add_argument("--requests", type=int, default=40, help="timed act requests per client (default 40)")
    parser.add_argument("--rounds", type=int, default=4, help="servers started per variant (default 4)")
    parser.add_argument("--run", type=Path, default=None, help="a run folder to serve (default: train a demo run)")
    parser.add_argument("--train-steps", type=int, default=20, help="steps of the demo run (default 20)")
    parser.add_argument("--against", type=Path, action="append", default=[],
                        help="another robovla checkout to compare with (repeatable)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mine = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(shim(Path(tmp) / "this", ROOT))}
        variants = {"this tree": mine}
        for k, other in enumerate(args.against):
            variants[str(other)] = {**mine, "PYTHONPATH": str(shim(Path(tmp) / f"other{k}", other))}
        run = args.run or train_demo(Path(tmp) / "runs", args.train_steps, mine)
        results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in variants}
        names = list(variants)
        for r in range(args.rounds):
            for i in range(len(names)):  # each round starts with the next variant
                name = names[(r + i) % len(names)]
                server = Server(run, variants[name])
                try:
                    rate, seconds = load(server.address, args.clients, args.requests)
                finally:
                    server.stop()
                p50, p99 = np.percentile(seconds, [50, 99])
                results[name].append((rate, 1000 * p50, 1000 * p99))
                print(f"round {r + 1}/{args.rounds} {name}: {rate:.1f} req/s, p50 {1000 * p50:.1f} ms, "
                      f"p99 {1000 * p99:.1f} ms", file=sys.stderr)
    median = {name: tuple(statistics.median(x[k] for x in rows) for k in range(3)) for name, rows in results.items()}
    base = median["this tree"]
    if args.json:
        print(json.dumps({name: {"requests_per_s": m[0], "p50_ms": m[1], "p99_ms": m[2],
                                 "ratios": [m[k] / base[k] for k in range(3)], "rounds": results[name]}
                          for name, m in median.items()}, indent=2))
        return
    print(f"robo-run serve, demo run, {args.clients} clients x {args.requests} requests, median of {args.rounds} "
          "rounds (ratios: to this tree)")
    print(f"  {'variant':<30} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}   {'x req/s':>7} {'x p50':>6} {'x p99':>6}")
    for name, m in median.items():
        print(f"  {name:<30} {m[0]:8.1f} {m[1]:8.1f} {m[2]:8.1f}   {m[0] / base[0]:7.3f} {m[1] / base[1]:6.3f} "
              f"{m[2] / base[2]:6.3f}")


if __name__ == "__main__":
    main()
