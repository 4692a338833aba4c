"""The batch contract (DESIGN.md section 3): what a training step receives.

Shape letters: B batch, T window (history frames), C chunk (future actions per step),
A action dim (6 arm + 1 gripper), H/W image height/width. Arrays may be numpy arrays or
torch tensors; :meth:`Batch.validate` checks both alike.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

ROBOT_OBS_DIM = 15  # CALVIN robot_obs: tcp pos (3), tcp euler (3), gripper width, joints (7), gripper action


@dataclass
class Batch:
    """One training batch. Targets for step t are actions t .. t+C-1, current one first."""

    images: dict[str, Any]  # camera -> uint8 [B, T, H, W, 3]
    instruction: list[str]  # length B
    robot_obs: Any  # float32 [B, T, 15]
    actions: Any  # float32 [B, T, C, A], in the action space's normalized form
    action_mask: Any  # bool [B, T, C]; False where the chunk runs past the episode end
    frame_mask: Any  # bool [B, T]; False for padded frames

    def validate(self) -> Batch:
        """Check shapes and dtypes against each other; raise one ValueError listing all problems."""
        problems = []

        def need(name: str, x: Any, ndim: int, dtype: str, dims: dict[int, tuple[str, int]]) -> None:
            shape, kind = tuple(getattr(x, "shape", ())), str(getattr(x, "dtype", type(x).__name__))
            if len(shape) != ndim:
                problems.append(f"{name}: expected {ndim} dims, got shape {shape}")
                return
            if not kind.endswith(dtype):
                problems.append(f"{name}: expected dtype {dtype}, got {kind}")
            for axis, (letter, size) in dims.items():
                if shape[axis] != size:
                    problems.append(f"{name}: axis {axis} ({letter}) is {shape[axis]}, expected {size}")

        shape = tuple(getattr(self.actions, "shape", ()))
        if len(shape) != 4:
            raise ValueError(f"Batch.actions: expected [B, T, C, A], got shape {shape}")
        b, t, c, _ = shape
        need("actions", self.actions, 4, "float32", {})
        need("action_mask", self.action_mask, 3, "bool", {0: ("B", b), 1: ("T", t), 2: ("C", c)})
        need("frame_mask", self.frame_mask, 2, "bool", {0: ("B", b), 1: ("T", t)})
        need("robot_obs", self.robot_obs, 3, "float32", {0: ("B", b), 1: ("T", t), 2: ("obs", ROBOT_OBS_DIM)})
        for cam, img in self.images.items():
            need(f"images[{cam!r}]", img, 5, "uint8", {0: ("B", b), 1: ("T", t), 4: ("RGB", 3)})
        if not self.images:
            problems.append("images: no camera")
        if not (isinstance(self.instruction, list) and all(isinstance(i, str) for i in self.instruction)):
            problems.append(f"instruction: expected a list of B={b} strings, got {type(self.instruction).__name__}")
        elif len(self.instruction) != b:
            problems.append(f"instruction: {len(self.instruction)} strings for B={b}")
        if problems:
            raise ValueError("invalid Batch:\n  " + "\n  ".join(problems))
        return self

    def pin_memory(self) -> Batch:
        """The batch in pinned memory (DataLoader calls this with pin_memory=True)."""
        return self._map(lambda t: t.pin_memory())

    def to(self, device: Any) -> Batch:
        """The batch with every tensor moved to ``device`` (torch tensors only)."""
        return self._map(lambda t: t.to(device))

    def _map(self, fn: Any) -> Batch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        moved["images"] = {k: fn(v) for k, v in self.images.items()}
        for key in ("robot_obs", "actions", "action_mask", "frame_mask"):
            moved[key] = fn(moved[key])
        return Batch(**moved)
