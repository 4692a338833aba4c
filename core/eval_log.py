"""The results of a closed-loop evaluation, written down one JSON line per chain (episode) as
each ends, so that an evaluation that is stopped, killed or crashes loses only the chains
under way: ``robo-run eval ... --resume`` runs the rest and writes the report an
uninterrupted evaluation would have written.

The file (``RUN/eval/<checkpoint>/long_horizon.jsonl``, ``episodes.jsonl``, a shard's
``long_horizon-shard-I-of-N.jsonl``) holds a header line, ``{"evaluation": {...}}``, with
what makes results comparable (the checkpoint, env and its config, protocol, seed, steps
per subtask, execution, shard), then one result per line, then ``{"finished": N}`` once the
report is written. One robo-run writes it at a time (an flock on the file).
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
from pathlib import Path
from typing import Any

from robovla.errors import ConfigError, RobovlaError

LINE_LIMIT = 1 << 20  # bytes; a chain's line is under 1 KB


class EvalLogError(RobovlaError, ValueError):
    """An evaluation's results file cannot be read or used; the message names the file and line."""


class EvalLog:
    """The results file of one evaluation; see the module docstring.

    ``resume``: continue from the file's results (their evaluation must match ``identity``);
    ``overwrite``: start over even when the file holds an unfinished evaluation. Without
    either, an unfinished evaluation there is refused, since starting over would lose it.
    """

    def __init__(self, path: Path, identity: dict[str, Any], resume: bool = False, overwrite: bool = False):
        self.path, self.identity = Path(path), json.loads(json.dumps(identity))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a+b")  # appends always go to the end
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.close()
            raise EvalLogError(f"{self.path}: another robo-run eval is writing this evaluation right now; wait for "
                               "it to end, or pass --out DIR to write elsewhere") from None
        try:
            self.done = self._open(resume, overwrite)
        except BaseException:
            self.file.close()
            raise

    def _open(self, resume: bool, overwrite: bool) -> dict[int, dict[str, Any]]:
        header, results, finished, good_bytes = self.read() if not overwrite else (None, {}, False, 0)
        if header is not None and not resume and results and not finished:
            raise EvalLogError(
                f"{self.path} holds {len(results)} finished results of an evaluation that did not end; continue it "
                "with --resume (the same flags), or start over with --overwrite")
        if header is not None and resume:
            differ = [f"{key}: {header.get(key)!r} there, {value!r} now" for key, value in self.identity.items()
                      if header.get(key) != value]
            if differ:
                raise ConfigError(differ + ["run the evaluation with the flags it was started with, or start over "
                                            "with --overwrite"], header=f"--resume: {self.path} is another evaluation")
            self.file.truncate(good_bytes)  # a line cut short by a kill, and the finished mark, go
            print(f"resuming {self.path}: {len(results)} results there", file=sys.stderr)
            return results
        if resume:
            print(f"--resume: {self.path} holds no evaluation yet; starting one", file=sys.stderr)
        self.file.truncate(0)
        self._write({"evaluation": self.identity})
        return {}

    def read(self) -> tuple[dict[str, Any] | None, dict[int, dict[str, Any]], bool, int]:
        """(header, results by index, whether it finished, bytes up to the last result) of the file."""
        self.file.seek(0)
        header, results, finished, good = None, {}, False, 0
        for number, raw in enumerate(iter(lambda: self.file.readline(LINE_LIMIT + 1), b""), start=1):
            if not raw.endswith(b"\n"):
                if len(raw) > LINE_LIMIT:
                    raise EvalLogError(f"{self.path}, line {number}: over {LINE_LIMIT} bytes; not robovla's results "
                                       "file: remove it, or pass --overwrite")
                break  # the last line, cut short by a kill: dropped, its chain runs again
            try:
                entry = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise EvalLogError(f"{self.path}, line {number}: not JSON ({exc}); remove the line or the file, or "
                                   "pass --overwrite to start over") from None
            if number == 1:
                if not isinstance(entry, dict) or not isinstance(entry.get("evaluation"), dict):
                    raise EvalLogError(f"{self.path}: line 1 is not an evaluation header ({{\"evaluation\": ...}}); "
                                       "not a robovla results file: remove it, or pass --overwrite")
                header, good = entry["evaluation"], self.file.tell()
            elif isinstance(entry, dict) and "finished" in entry:
                finished = True
            elif isinstance(entry, dict) and type(entry.get("index")) is int:
                results[entry["index"]] = entry
                finished, good = False, self.file.tell()
            else:
                raise EvalLogError(f"{self.path}, line {number}: not a result (a JSON object with an int index); "
                                   "remove the line, or pass --overwrite to start over")
        self.file.seek(0, os.SEEK_END)
        return header, results, finished, good

    def add(self, result: dict[str, Any]) -> None:
        """Write one finished result down (flushed and synced: it survives a kill and a crash)."""
        self._write(result)

    def finish(self, count: int) -> None:
        """Mark the evaluation finished (its report written)."""
        self._write({"finished": count})

    def close(self) -> None:
        self.file.close()  # releases the lock

    def __enter__(self) -> EvalLog:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _write(self, entry: dict[str, Any]) -> None:
        self.file.seek(0, os.SEEK_END)
        self.file.write((json.dumps(entry) + "\n").encode())
        self.file.flush()
        os.fsync(self.file.fileno())
