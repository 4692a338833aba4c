"""A fake calvin_env for tests: PlayTableSimEnv's interface over a tiny kinematic world.

``get_env(path, obs_space=None, show_gui=True, use_egl=False)`` builds one. ``reset(robot_obs,
scene_obs)``, ``step(action) -> (obs, 0, False, info)``, ``get_obs()``, ``get_info()`` and
``close()`` behave like calvin_env's, with its dict layouts (:func:`make_info`). The world:

- the TCP goes exactly where a relative action sends it (0.02 m per unit);
- while the TCP is at the drawer's handle (the sliding door's), the drawer (door) follows the
  TCP along its axis: toward -y opens the drawer, toward -x moves the door to the left;
- pushing the button down toggles the LED;
- closing the gripper within 3 cm of a block grasps it; the block then follows the TCP and
  touches only the robot; opening the gripper drops it back onto the table top.

So open/close_drawer, move_slider_left/right, turn_on/off_led and lift_*_block_table/_slider
can be done with scripted commands; nothing rotates, pushes or stacks blocks. Like the calvin_env
that mees/calvin pins, step() scales a relative action array in place.
"""

from __future__ import annotations

from typing import Any

import numpy as np

ROBOT, TABLE = 1, 2
BLOCKS = {"block_red": 3, "block_blue": 4, "block_pink": 5}  # scene D's order in scene_obs
LINKS = {"button_link": 0, "switch_link": 1, "slide_link": 2, "drawer_link": 3, "led_link": 4, "light_link": 5,
         "plank_link": 6, "base_link": -1}  # the table's links in scene D
FINGER = 10  # a gripper finger link of the robot
NEUTRAL = np.array([0.02586889, -0.2313129, 0.5712808, 3.09045411, -0.02908596, 1.50013585, 0.07999963,
                    -1.21779124, 1.03987629, 2.11978254, -2.34205014, -0.87015899, 1.64119093, 0.55344928, 1.0])
DRAWER_HANDLE = np.array([0.18, -0.36, 0.37])  # with the drawer closed; it moves to -y as the drawer opens
SLIDE_HANDLE = np.array([0.05, 0.05, 0.55])  # with the door right; it moves to -x as the door opens left
BUTTON = np.array([-0.12, -0.12, 0.52])  # pressed when the TCP is this low within 3 cm of it in x, y
REACH = 0.03
TABLE_TOP = 0.46


def contact(other: int, link: int = -1) -> tuple:
    """A pybullet contact point (getContactPoints) of some body A with ``other``: c[2] is its
    uid and c[4] its link, the fields CALVIN's oracle reads."""
    return (0, 0, other, -1, link, (0.0, 0.0, 0.0), (0.0, 0.0, 0.0), (0.0, 0.0, 1.0), 0.0, 1.0, 0.0,
            (1.0, 0.0, 0.0), 0.0, (0.0, 1.0, 0.0))


def yaw_quaternion(yaw: float) -> tuple[float, float, float, float]:
    """(x, y, z, w) of a rotation by ``yaw`` about z."""
    return (0.0, 0.0, float(np.sin(yaw / 2)), float(np.cos(yaw / 2)))


def block(pos: Any, touching: Any = ((TABLE, -1),), orn: Any = (0.0, 0.0, 0.0, 1.0), vel: float = 0.0) -> dict:
    """One movable object's info: position, orientation (x, y, z, w), velocities, contacts
    given as (uid, link) pairs."""
    return {"current_pos": tuple(float(v) for v in pos), "current_orn": tuple(orn),
            "current_lin_vel": (vel, 0.0, 0.0), "current_ang_vel": (0.0, 0.0, 0.0),
            "contacts": tuple(contact(uid, link) for uid, link in touching)}


def make_info(blocks: dict[str, dict] | None = None, slide: float = 0.0, drawer: float = 0.0, lightbulb: int = 0,
              led: int = 0, robot_touching: Any = (), tcp: Any = NEUTRAL[:3], gripper: int = 1) -> dict:
    """calvin_env's get_info() dict. Blocks default to the table top, touching it."""
    blocks = blocks or {name: block((0.1 * i, -0.1, TABLE_TOP)) for i, name in enumerate(BLOCKS)}
    return {
        "robot_info": {"tcp_pos": tuple(tcp), "tcp_orn": tuple(NEUTRAL[3:6]), "gripper_opening_width": 0.08,
                       "arm_joint_states": list(NEUTRAL[7:14]), "gripper_action": gripper, "uid": ROBOT,
                       "contacts": tuple(contact(uid, link) for uid, link in robot_touching)},
        "scene_info": {
            "fixed_objects": {"table": {"uid": TABLE, "links": dict(LINKS), "contacts": ()}},
            "movable_objects": {name: {**info, "uid": BLOCKS[name]} for name, info in blocks.items()},
            "doors": {"base__slide": {"current_state": float(slide)}, "base__drawer": {"current_state": float(drawer)}},
            "buttons": {"base__button": {"joint_state": 0.0, "logical_state": led}},
            "switches": {"base__switch": {"joint_state": 0.088 * lightbulb, "logical_state": lightbulb}},
            "lights": {"lightbulb": {"logical_state": lightbulb}, "led": {"logical_state": led}},
        },
    }


class FakeCalvinEnv:
    """The fake simulator; ``built_with`` holds get_env's arguments, ``resets`` every reset's
    (robot_obs, scene_obs) and ``received`` every action array."""

    def __init__(self, dataset_path: Any, obs_space: dict | None, show_gui: bool, use_egl: bool):
        self.built_with = {"path": dataset_path, "obs_space": obs_space, "show_gui": show_gui, "use_egl": use_egl}
        self.cameras = [k.split("_", 1)[1] for k in obs_space["rgb_obs"]] if obs_space else ["static", "gripper"]
        self.received: list[np.ndarray] = []
        self.resets: list[tuple[Any, Any]] = []
        self.closed = False
        self.reset()

    def reset(self, robot_obs: np.ndarray | None = None, scene_obs: np.ndarray | None = None) -> dict:
        self.resets.append((robot_obs, scene_obs))
        robot_obs = NEUTRAL if robot_obs is None else np.asarray(robot_obs, dtype=np.float64)
        if scene_obs is None:
            scene_obs = np.zeros(24)
            scene_obs[6:24:6], scene_obs[7:24:6], scene_obs[8:24:6] = (0.0, 0.1, 0.2), -0.1, TABLE_TOP
        self.tcp, self.width, self.gripper = robot_obs[:3].copy(), float(robot_obs[6]), int(robot_obs[14])
        self.slide, self.drawer, self.button, self.switch, self.lightbulb, self.led = (float(v) for v in scene_obs[:6])
        self.blocks = {name: np.array(scene_obs[6 + 6 * i: 12 + 6 * i], dtype=np.float64)
                       for i, name in enumerate(BLOCKS)}
        self.held: str | None = None
        self.steps = 0  # since this reset; the images show it
        return self.get_obs()

    def step(self, action: np.ndarray) -> tuple[dict, int, bool, dict]:
        assert len(action) == 7 and action[6] in (-1, 1), action
        action[:3] *= 0.02  # in place, as calvin_env 1431a46 does
        action[3:6] *= 0.05
        self.received.append(action)
        self.steps += 1
        move = action[:3]
        if np.linalg.norm(self.tcp - (DRAWER_HANDLE - [0, self.drawer, 0])) < REACH:
            self.drawer = float(np.clip(self.drawer - move[1], 0.0, 0.22))
        if np.linalg.norm(self.tcp - (SLIDE_HANDLE - [self.slide, 0, 0])) < REACH:
            self.slide = float(np.clip(self.slide - move[0], 0.0, 0.28))
        was_down = self._button_down()
        self.tcp = self.tcp + move
        if self._button_down() and not was_down:
            self.led = 1.0 - self.led
        self.button = 0.034 * self._button_down()
        self.gripper = int(action[6])
        self.width = 0.08 if self.gripper > 0 else 0.05
        if self.gripper < 0 and self.held is None:
            near = [n for n, b in self.blocks.items() if np.linalg.norm(b[:3] - self.tcp) < REACH]
            self.held = near[0] if near else None
        if self.gripper > 0 and self.held is not None:
            self.blocks[self.held][2], self.held = TABLE_TOP, None
        if self.held is not None:
            self.blocks[self.held][:3] = self.tcp
        return self.get_obs(), 0, False, self.get_info()

    def _button_down(self) -> bool:
        return bool(np.linalg.norm(self.tcp[:2] - BUTTON[:2]) < REACH and self.tcp[2] <= BUTTON[2])

    def get_obs(self) -> dict:
        sizes = {"static": 200, "gripper": 84}
        rgb = {f"rgb_{c}": np.full((sizes[c], sizes[c], 3), self.steps % 256, np.uint8) for c in self.cameras}
        depth = {f"depth_{c}": np.zeros((sizes[c], sizes[c]), np.float32) for c in self.cameras}
        robot_obs = np.concatenate([self.tcp, NEUTRAL[3:6], [self.width], NEUTRAL[7:14], [self.gripper]])
        scene_obs = np.concatenate([[self.slide, self.drawer, self.button, self.switch, self.lightbulb, self.led],
                                    *self.blocks.values()])
        return {"rgb_obs": rgb, "depth_obs": depth, "robot_obs": robot_obs, "scene_obs": scene_obs}

    def get_info(self) -> dict:
        blocks = {}
        for name, b in self.blocks.items():
            touching = ((ROBOT, FINGER),) if name == self.held else \
                ((TABLE, LINKS["plank_link"] if b[1] > 0.05 else -1),)  # the slider's shelf is at y > 0.05
            blocks[name] = block(b[:3], touching, yaw_quaternion(b[5]))
        robot_touching = ((BLOCKS[self.held], -1),) if self.held else ()
        return make_info(blocks, self.slide, self.drawer, int(self.lightbulb), int(self.led), robot_touching,
                         self.tcp, self.gripper)

    def close(self) -> None:
        self.closed = True


def get_env(dataset_path: Any, obs_space: dict | None = None, show_gui: bool = True, use_egl: bool = False,
            **kwargs: Any) -> FakeCalvinEnv:
    """Like calvin_env.envs.play_table_env.get_env, plus use_egl (see calvin.sim.make_calvin_env)."""
    return FakeCalvinEnv(dataset_path, obs_space, show_gui, use_egl)
