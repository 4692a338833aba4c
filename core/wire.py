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
(``allow_pickle=False``), so object arrays are refused. Any language that writes zip and
.npy files can speak the format. This module needs only numpy and the standard library:
the client imports it without torch.
"""

from __future__ import annotations

import io
from typing import Any, Mapping

import numpy as np

NPZ = "application/x-npz"
IMAGE_PREFIX = "image."


class WireError(ValueError):
    """Bytes or arrays that are not a valid message of this format; the message says what to fix."""


def encode_npz(**arrays: Any) -> bytes:
    """Arrays -> the bytes of an uncompressed .npz archive."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def decode_npz(body: bytes, what: str = "body") -> dict[str, np.ndarray]:
    """The bytes of an .npz archive -> its arrays (never unpickling); WireError otherwise."""
    try:
        with np.load(io.BytesIO(body), allow_pickle=False) as archive:
            if not hasattr(archive, "files"):
                raise ValueError("a single .npy array, not an .npz archive")
            return {name: archive[name] for name in archive.files}
    except Exception as exc:  # zipfile, numpy format and pickle refusals all mean: not a valid archive
        raise WireError(f"the {what} is not a readable .npz archive ({type(exc).__name__}: {exc}); messages are "
                        f"numpy.savez output, content type {NPZ}") from None


def encode_observation(images: Mapping[str, Any], robot_obs: Any, instruction: str) -> bytes:
    """One control step's camera images, robot state and instruction -> an act request's body."""
    return encode_npz(**{f"{IMAGE_PREFIX}{cam}": np.asarray(img) for cam, img in images.items()},
                      robot_obs=np.asarray(robot_obs), instruction=np.array(instruction))


def decode_observation(body: bytes, cameras: tuple[str, ...]) -> tuple[dict[str, np.ndarray], np.ndarray, str]:
    """An act request's body -> (images by camera, robot_obs, instruction).

    Checks the fields (exactly one image per camera in ``cameras``, robot_obs, a text
    instruction), not the values: the policy checks image sizes, dtypes and finiteness.
    """
    arrays = decode_npz(body)
    allowed = {f"{IMAGE_PREFIX}{cam}" for cam in cameras} | {"robot_obs", "instruction"}
    unknown = sorted(set(arrays) - allowed)
    if unknown:
        raise WireError(f"unknown field(s) {unknown}; an act request has {sorted(allowed)}")
    missing = sorted(allowed - set(arrays))
    if missing:
        raise WireError(f"missing field(s) {missing}; an act request has {sorted(allowed)}")
    instruction = arrays["instruction"]
    if instruction.dtype.kind != "U" or instruction.shape != ():
        raise WireError(f"instruction must be a 0-d unicode array (numpy.array('...')), got dtype "
                        f"{instruction.dtype} shape {list(instruction.shape)}")
    images = {cam: arrays[f"{IMAGE_PREFIX}{cam}"] for cam in cameras}
    return images, arrays["robot_obs"], str(instruction)


def encode_action(action: Any) -> bytes:
    """A command -> an act answer's body (``action`` as float64)."""
    return encode_npz(action=np.asarray(action, dtype=np.float64))


def decode_action(body: bytes) -> np.ndarray:
    """An act answer's body -> the command float64 [A]; WireError if it holds no ``action`` array."""
    arrays = decode_npz(body, "answer")
    if "action" not in arrays:
        raise WireError(f"an act answer holds an array 'action'; this one holds {sorted(arrays)}")
    return arrays["action"]
