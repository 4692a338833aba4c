"""The npz wire format of ``robo-run serve``: observations and actions as numpy archives.

An act request (``POST /sessions/ID/act``, content type ``application/x-npz``) carries an
.npz archive, the output of ``numpy.savez``, holding exactly these arrays:

    image.CAMERA   uint8 [H, W, 3]   one per camera the policy reads (``/metadata`` lists
                                     them as ``image_fields``), RGB
    robot_obs      float [15]        the robot state
    instruction    0-d unicode       the task in words: ``numpy.array("open the drawer")``

The answer is an .npz archive holding one array:

    action         float64 [A]       the command for the environment, gripper exactly -1 or +1

npz is numpy's own container: a zip file of .npy members, typed and shaped, written
uncompressed (``numpy.savez_compressed`` archives are read as well). Readers never unpickle
(``allow_pickle=False``), so object arrays are refused. A reader inflates nothing it has not
checked: the member names come first (an unknown or missing field is refused), then each
member's size in the zip directory and its .npy header (dtype and shape), against the most
bytes its field can need (:class:`Field`); a member is read only once it is known to fit,
so a small compressed body cannot make the reader allocate more than the fields allow.
Any language that writes zip and .npy files can speak the format. This module needs only
numpy and the standard library: the client imports it without torch.
"""

from __future__ import annotations

import io
import math
import threading
import zipfile
from dataclasses import dataclass
from typing import IO, Any, Mapping

import numpy as np

NPZ = "application/x-npz"
IMAGE_PREFIX = "image."
HEADER_BYTES = 1 << 16  # room for a member's .npy header on top of its array (numpy writes 128 bytes)
MAX_SKIPPED = 16  # e.g. image.CAMERA of cameras the policy does not read, ignored unread
STRAY_SIGNATURES = 64  # zip directory signatures tolerated beyond one per field (image bytes can hold one)
ACTION_BYTES = 1 << 20  # the most bytes an act answer's action may hold (float64 [A], A at most 131072)
CHUNK = 1 << 20  # bytes read from a member at a time
# numpy parses .npy headers with ast.literal_eval, which CPython 3.11 can break when threads run
# it at once (SystemError: AST constructor recursion depth mismatch): one header at a time
_HEADERS = threading.Lock()


class WireError(ValueError):
    """Bytes or arrays that are not a valid message of this format; the message says what to fix.
    ``status`` is the HTTP code a server answers it with."""

    status = 400


class WireTooLarge(WireError):
    """A member that would inflate to more than its field can need; refused before it is read."""

    status = 413


@dataclass(frozen=True)
class Field:
    """One array a message may hold: the most bytes it can need, and what it holds (for messages)."""

    bytes: int
    holds: str


def observation_fields(cameras: tuple[str, ...], max_image_side: int, robot_obs_dim: int,
                       max_instruction: int) -> dict[str, Field]:
    """The fields of an act request for a policy reading ``cameras``, with their size bounds."""
    side = f"uint8 [H, W, 3], sides up to {max_image_side} px"
    return {**{f"{IMAGE_PREFIX}{cam}": Field(max_image_side ** 2 * 3, side) for cam in cameras},
            # a float of any width numpy has (longdouble: 16 bytes)
            "robot_obs": Field(robot_obs_dim * 16, f"float [{robot_obs_dim}]"),
            "instruction": Field(max_instruction * 4, f"0-d unicode, up to {max_instruction} characters")}


def encode_npz(**arrays: Any) -> bytes:
    """Arrays -> the bytes of an uncompressed .npz archive."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def decode_npz(body: bytes, fields: Mapping[str, Field], what: str = "body", skip: str | None = None,
               ) -> dict[str, np.ndarray]:
    """The bytes of an .npz archive holding exactly ``fields`` -> its arrays, never unpickling and
    inflating no member before its size and header fit its field (module docstring); WireError
    (WireTooLarge for a member too large) otherwise. Members named ``skip``... that are not fields
    (up to :data:`MAX_SKIPPED`; e.g. cameras the policy does not read) are left unread."""
    if body[:6] == b"\x93NUMPY":
        raise _unreadable(what, "a single .npy array, not an .npz archive")
    # every entry the zip reader lists starts with this signature: counting them bounds its work
    most = len(fields) + (MAX_SKIPPED if skip else 0)
    if body.count(b"PK\x01\x02") > most + STRAY_SIGNATURES:
        ignored = f" and at most {MAX_SKIPPED} ignored {skip}* fields" if skip else ""
        raise WireError(f"the {what} has more zip entries than its {len(fields)} fields{ignored}; send numpy.savez "
                        "output")
    try:
        archive = zipfile.ZipFile(io.BytesIO(body))
    except Exception as exc:  # noqa: BLE001 - zipfile's refusals (BadZipFile, ValueError, OSError, ...)
        raise _unreadable(what, f"{type(exc).__name__}: {exc}") from None
    with archive:
        members = {}
        for info in archive.infolist():
            name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            if name in members:
                raise WireError(f"the {what} holds field {name!r} twice; each field is one member")
            members[name] = info
        skipped = [n for n in members if skip and n.startswith(skip) and n not in fields]
        if len(skipped) > MAX_SKIPPED:
            raise WireError(f"the {what} holds {len(skipped)} fields {skip}* that are not read; at most {MAX_SKIPPED} "
                            "are ignored, so send only what /metadata lists")
        members = {n: info for n, info in members.items() if n not in skipped}
        _check_names(sorted(members), fields, what)
        return {name: _member(archive, info, name, fields[name], what) for name, info in members.items()}


def _check_names(names: list[str], fields: Mapping[str, Field], what: str) -> None:
    unknown = [n for n in names if n not in fields]
    if unknown:
        raise WireError(f"unknown field(s) {unknown}; the {what} has {sorted(fields)}")
    missing = sorted(set(fields) - set(names))
    if missing:
        raise WireError(f"missing field(s) {missing}; the {what} has {sorted(fields)}")


def _member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, name: str, field: Field, what: str) -> np.ndarray:
    """One member's array, once its zip entry and .npy header show that it fits ``field``."""
    member = f"{what} member {info.filename!r} (field {name!r}: {field.holds}, at most {field.bytes} bytes)"
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        # zipfile inflates bzip2 and lzma members without a bound per read: refuse them unread
        raise WireError(f"{member} is compressed with method {info.compress_type}; numpy.savez writes stored members "
                        "and numpy.savez_compressed deflated ones")
    if info.file_size > field.bytes + HEADER_BYTES:
        raise WireTooLarge(f"{member} inflates to {info.file_size} bytes; refused before inflating it")
    try:
        with archive.open(info) as fp:
            dtype, shape, fortran = _header(fp)
            if dtype.hasobject:
                raise ValueError(f"dtype {dtype} holds Python objects, which would need unpickling")
            size = math.prod(shape) * dtype.itemsize
            if size > field.bytes:
                raise WireTooLarge(f"{member} is {dtype} {list(shape)}, {size} bytes; refused before inflating it")
            data, got = bytearray(size), 0
            while got < size:  # a zip member inflates no more than each read asks for
                chunk = fp.read(min(CHUNK, size - got))
                if not chunk:
                    raise ValueError(f"the array stops after {got} of its {size} bytes")
                data[got:got + len(chunk)] = chunk
                got += len(chunk)
        return np.frombuffer(data, dtype).reshape(shape, order="F" if fortran else "C")
    except WireError:
        raise
    except Exception as exc:  # noqa: BLE001 - zipfile and numpy format refusals all mean: not a valid archive
        raise _unreadable(what, f"member {info.filename!r}: {type(exc).__name__}: {exc}") from None


def _header(fp: IO[bytes]) -> tuple[np.dtype, tuple[int, ...], bool]:
    """An .npy member's dtype, shape and Fortran order, read from its header alone."""
    version = np.lib.format.read_magic(fp)
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f".npy format version {version[0]}.{version[1]}; numpy.savez writes 1.0 (or 2.0)")
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    with _HEADERS:
        shape, fortran, dtype = read(fp)
    return dtype, shape, fortran


def _unreadable(what: str, why: str) -> WireError:
    return WireError(f"the {what} is not a readable .npz archive ({why}); messages are numpy.savez output, "
                     f"content type {NPZ}")


def encode_observation(images: Mapping[str, Any], robot_obs: Any, instruction: str) -> bytes:
    """One control step's camera images, robot state and instruction -> an act request's body."""
    return encode_npz(**{f"{IMAGE_PREFIX}{cam}": np.asarray(img) for cam, img in images.items()},
                      robot_obs=np.asarray(robot_obs), instruction=np.array(instruction))


def decode_observation(body: bytes, fields: Mapping[str, Field]) -> tuple[dict[str, np.ndarray], np.ndarray, str]:
    """An act request's body -> (images by camera, robot_obs, instruction); ``fields`` from
    :func:`observation_fields`.

    Checks the fields (exactly one image per camera the policy reads, robot_obs, a text
    instruction) and their sizes, not the values: the policy checks image sizes, dtypes and
    finiteness. Images of other cameras (a robot stack sends all it has) are ignored unread.
    """
    arrays = decode_npz(body, fields, "act request", skip=IMAGE_PREFIX)
    instruction = arrays["instruction"]
    if instruction.dtype.kind != "U" or instruction.shape != ():
        raise WireError(f"instruction must be a 0-d unicode array (numpy.array('...')), got dtype "
                        f"{instruction.dtype} shape {list(instruction.shape)}")
    images = {name[len(IMAGE_PREFIX):]: arrays[name] for name in fields if name.startswith(IMAGE_PREFIX)}
    return images, arrays["robot_obs"], str(instruction)


def encode_action(action: Any) -> bytes:
    """A command -> an act answer's body (``action`` as float64)."""
    return encode_npz(action=np.asarray(action, dtype=np.float64))


def decode_action(body: bytes) -> np.ndarray:
    """An act answer's body -> the command float64 [A]; WireError if it holds anything but ``action``."""
    return decode_npz(body, {"action": Field(ACTION_BYTES, "float64 [A]")}, "answer")["action"]
