"""Write the small synthetic assets of the example manifests (deterministic; run from anywhere).

image.png: 208x120 (the 832x480 aspect) sky/ground gradient with a sun and a house; poses.npy: [41, 4, 4]
camera-to-world matrices (OpenCV axes) of a camera gliding forward while it sways left and right;
intrinsics.npy: [41, 4] (fx, fy, cx, cy) calibrated at 832x480; actions.npy: [41, 4] multi-hot (w, a, s, d)
that matches the sway.
"""

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ASSETS = Path(__file__).resolve().parent / "assets"
NUM_FRAMES = 41
WIDTH, HEIGHT, HORIZON = 208, 120, 70


def make_image() -> Image.Image:
    rows = np.arange(HEIGHT, dtype=np.float64)[:, None]
    sky = np.array([70, 130, 220]) + (rows / HORIZON) * np.array([150, 100, 30])
    ground = np.array([60, 150, 60]) - ((rows - HORIZON) / (HEIGHT - HORIZON)) * np.array([30, 70, 30])
    column = np.where(rows < HORIZON, sky, ground).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(np.repeat(column[:, None, :], WIDTH, axis=1))
    draw = ImageDraw.Draw(image)
    draw.ellipse((150, 12, 174, 36), fill=(250, 220, 60))
    draw.rectangle((60, 52, 100, 82), fill=(190, 50, 40))
    draw.polygon([(54, 52), (80, 32), (106, 52)], fill=(110, 60, 30))
    draw.rectangle((75, 66, 85, 82), fill=(70, 40, 20))
    return image


def make_poses() -> np.ndarray:
    t = np.linspace(0.0, 1.0, NUM_FRAMES)
    yaw = 0.3 * np.sin(2 * np.pi * t)  # about the camera's y (down) axis
    pitch = 0.05 * np.sin(np.pi * t)
    cy, sy, cp, sp = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch)
    zeros, ones = np.zeros_like(t), np.ones_like(t)
    rot_y = np.stack([cy, zeros, sy, zeros, ones, zeros, -sy, zeros, cy], -1).reshape(-1, 3, 3)
    rot_x = np.stack([ones, zeros, zeros, zeros, cp, -sp, zeros, sp, cp], -1).reshape(-1, 3, 3)
    poses = np.tile(np.eye(4), (NUM_FRAMES, 1, 1))
    poses[:, :3, :3] = rot_y @ rot_x
    heading = poses[:, :3, 2]  # the camera looks along its z axis
    poses[:, :3, 3] = np.cumsum(0.1 * heading, axis=0) - 0.1 * heading[0]
    return poses.astype(np.float32)


def make_actions() -> np.ndarray:
    yaw_rate = np.gradient(0.3 * np.sin(2 * np.pi * np.linspace(0.0, 1.0, NUM_FRAMES)))
    w = np.ones(NUM_FRAMES)
    return np.stack([w, yaw_rate < -0.01, np.zeros(NUM_FRAMES), yaw_rate > 0.01], -1).astype(np.float32)


if __name__ == "__main__":
    ASSETS.mkdir(exist_ok=True)
    make_image().save(ASSETS / "image.png", optimize=True)
    np.save(ASSETS / "poses.npy", make_poses())
    intrinsics = np.tile(np.array([480.0, 480.0, 416.0, 240.0], dtype=np.float32), (NUM_FRAMES, 1))
    np.save(ASSETS / "intrinsics.npy", intrinsics)
    np.save(ASSETS / "actions.npy", make_actions())
