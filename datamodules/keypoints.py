"""The keypoint layout of `KEY.kpts.npy`: 134 whole-body points in DWPose / OpenPose order.

This is the layout that DWPose produces once a neck point is inserted into COCO-WholeBody's 133
points (EchoMimicV2 `dwpose_detector.py`, see shared notes/metrics.md section 4), so the ground
truth written by the synthetic world and the keypoints that a pose detector returns on generated
video can be compared group by group (HKV, LBKV, LHKV, LFKV) without any re-mapping.

Coordinates are (x, y, confidence): x, y in pixels of the stored video, continuous, with the
top-left corner of the image at (0, 0) and the centre of pixel (row i, column j) at
(j + 0.5, i + 0.5); confidence in [0, 1], 0 for a point outside the image or not detected.
"Left" and "right" are the person's own sides, so the person's right hand appears on the image's
left when they face the camera.
"""

from __future__ import annotations

NUM_KEYPOINTS = 134
LAYOUT_NAME = "dwpose134"

# Groups as slices into the K axis.
BODY = slice(0, 18)  # OpenPose-18 body order
FEET = slice(18, 24)
FACE = slice(24, 92)  # iBUG-68 face order
LEFT_HAND = slice(92, 113)  # the person's left hand, 21 points
RIGHT_HAND = slice(113, 134)
HANDS = slice(92, 134)
MOUTH = slice(72, 92)  # the face group's lips, iBUG-68 points 48-67 (outer 48-59, inner 60-67)

GROUPS: dict[str, slice] = {
    "body": BODY,
    "feet": FEET,
    "face": FACE,
    "left_hand": LEFT_HAND,
    "right_hand": RIGHT_HAND,
    "hands": HANDS,
}

BODY_NAMES = (
    "nose",
    "neck",
    "right_shoulder",
    "right_elbow",
    "right_wrist",
    "left_shoulder",
    "left_elbow",
    "left_wrist",
    "right_hip",
    "right_knee",
    "right_ankle",
    "left_hip",
    "left_knee",
    "left_ankle",
    "right_eye",
    "left_eye",
    "right_ear",
    "left_ear",
)
FEET_NAMES = (
    "left_big_toe",
    "left_small_toe",
    "left_heel",
    "right_big_toe",
    "right_small_toe",
    "right_heel",
)
# iBUG-68 (0-based): jaw 0-16 from the person's right to left, brows 17-26, nose 27-35,
# eyes 36-47 (right eye first), outer lips 48-59, inner lips 60-67.
FACE_NAMES = (
    tuple(f"jaw_{i}" for i in range(17))
    + tuple(f"right_brow_{i}" for i in range(5))
    + tuple(f"left_brow_{i}" for i in range(5))
    + tuple(f"nose_bridge_{i}" for i in range(4))
    + tuple(f"nostril_{i}" for i in range(5))
    + tuple(f"right_eye_{i}" for i in range(6))
    + tuple(f"left_eye_{i}" for i in range(6))
    + tuple(f"outer_lip_{i}" for i in range(12))
    + tuple(f"inner_lip_{i}" for i in range(8))
)
HAND_NAMES = ("wrist",) + tuple(
    f"{finger}_{joint}"
    for finger in ("thumb", "index", "middle", "ring", "pinky")
    for joint in ("mcp", "pip", "dip", "tip")
)
NAMES: tuple[str, ...] = (
    BODY_NAMES
    + FEET_NAMES
    + tuple(f"face_{n}" for n in FACE_NAMES)
    + tuple(f"left_hand_{n}" for n in HAND_NAMES)
    + tuple(f"right_hand_{n}" for n in HAND_NAMES)
)
assert len(NAMES) == NUM_KEYPOINTS


def index(name: str) -> int:
    """Position of a named keypoint, e.g. `index("face_inner_lip_2")`."""
    try:
        return NAMES.index(name)
    except ValueError:
        raise KeyError(f"unknown keypoint name {name!r}; see dystream.datamodules.keypoints.NAMES") from None


# Inner lip top and bottom centre (iBUG 62 and 66): their distance is the mouth opening.
INNER_LIP_TOP = FACE.start + 62
INNER_LIP_BOTTOM = FACE.start + 66
