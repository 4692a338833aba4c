"""A client for ``robo-run serve`` (robovla.server): one session, one robot.

    from robovla.client import PolicyClient

    with PolicyClient("http://127.0.0.1:8000") as policy:   # opens a session
        policy.reset()                                      # a new episode
        command = policy.act({"static": rgb_static, "gripper": rgb_gripper}, robot_obs, "open the drawer")

Images are uint8 [H, W, 3] per camera (``policy.metadata["cameras"]``), robot_obs float
[15]; the command is float64 [A] with the gripper exactly -1 or +1 (the messages:
:mod:`robovla.wire`). It loads no torch: besides robovla's light top level it needs only
numpy and the standard library. One client per thread (it keeps one HTTP connection open;
if the server closed it while it was idle, the request is sent again on a new one). A server
started with a token needs it: ``PolicyClient(url, token=...)``, or the environment variable
ROBOVLA_SERVE_TOKEN.
"""

from __future__ import annotations

import http.client
import json
import os
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from robovla.wire import NPZ, decode_action, encode_observation


class ServerError(Exception):
    """The server answered a request with an error: ``status`` is the HTTP code, the message its explanation."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status


class PolicyClient:
    """A session with a policy server: :meth:`reset`, :meth:`act`, :meth:`close`."""

    def __init__(self, url: str = "http://127.0.0.1:8000", seed: int = 0, timeout: float = 60.0,
                 token: str | None = None):
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"url {url!r}: expected http://HOST:PORT")
        token = token if token is not None else os.environ.get("ROBOVLA_SERVE_TOKEN") or None
        self._auth = {"Authorization": f"Bearer {token}"} if token else {}
        self._conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
        self._used = False  # whether the connection has carried a request (a closed one is then retried)
        self.session: str | None = None
        try:
            self.metadata: dict[str, Any] = self._request("GET", "/metadata")
            self.session = self._request("POST", "/sessions", json.dumps({"seed": seed}).encode())["session"]
        except BaseException:
            self._conn.close()
            raise

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/health")

    def reset(self, seed: int = 0) -> None:
        """Start a new episode: the server's policy forgets this session's history."""
        self._request("POST", f"/sessions/{self.session}/reset", json.dumps({"seed": seed}).encode())

    def act(self, images: dict[str, np.ndarray], robot_obs: np.ndarray, instruction: str) -> np.ndarray:
        """One control step: the command float64 [A] for these camera images and robot state."""
        wanted = self.metadata.get("cameras")  # only what the policy reads travels
        body = encode_observation({c: v for c, v in images.items() if wanted is None or c in wanted}, robot_obs,
                                  instruction)
        return decode_action(self._request("POST", f"/sessions/{self.session}/act", body, NPZ))

    def close(self) -> None:
        """End the session on the server (if it is still open) and close the connection."""
        try:
            if self.session is not None:
                self._request("DELETE", f"/sessions/{self.session}")
        finally:
            self.session = None
            self._conn.close()

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _request(self, method: str, path: str, body: bytes | None = None, kind: str = "application/json") -> Any:
        headers = {**self._auth, **({"Content-Type": kind} if body is not None else {})}
        try:
            self._conn.request(method, path, body=body, headers=headers)
            response = self._conn.getresponse()
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            if not self._used:
                raise
            # the server closed the kept-alive connection while it was idle, before reading this
            # request: send it again on a new connection
            self._conn.close()
            self._conn.request(method, path, body=body, headers=headers)
            response = self._conn.getresponse()
        self._used = True
        data = response.read()
        if response.status >= 400:
            try:
                message = json.loads(data)["error"]
            except (ValueError, KeyError, TypeError):
                message = data.decode(errors="replace")[:500]
            raise ServerError(response.status, message)
        if response.getheader("Content-Type", "").startswith("application/json"):
            return json.loads(data)
        return data
