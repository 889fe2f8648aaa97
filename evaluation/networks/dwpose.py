"""DWPose whole-body pose backend (ONNX, through onnxruntime): frames -> 133 COCO-WholeBody keypoints.

This is the pose estimator EchoMimicV2 uses for HKC/HKV (notes/metrics.md §4.1): a YOLOX-L person detector
(`yolox_l.onnx`) and the distilled RTMPose-l whole-body model (`dw-ll_ucoco_384.onnx`, SimCC heads), both from
HF yzd-v/DWPose. The pipeline, per frame (RGB uint8, as EchoMimicV2 feeds decoded video frames):

1. detector: letterbox-resize to 640x640 (scale r = min(640 / H, 640 / W), bilinear, pad value 114 at the bottom and
   right), raw 0-255 float input; decode YOLOX outputs on strides 8/16/32 (xy = (o + grid) * stride,
   wh = exp(o) * stride), score = objectness * class score, class-wise NMS (IoU 0.45, score > 0.1), keep persons
   (class 0) with score > 0.3;
2. one person per frame: the largest person box (an avatar video shows one person; DWPose keeps all, the metrics need
   the avatar's); no detection -> the whole frame, as DWPose does;
3. pose: box -> centre and size x 1.25, widened to the model's 288:384 aspect; the box is warped to 288x384
   (bilinear, zero border), normalised with the ImageNet mean/std in 0-255 units; SimCC argmax per axis / 2 (split
   ratio) -> input pixels -> frame pixels; confidence = min of the two axis maxima (raw, may exceed 1; DWPose's
   visibility threshold is 0.3); a non-positive confidence marks the point as missing (-1).

The output is in COCO-WholeBody order (`COCO_WHOLEBODY_133`) by default, or, with output_layout="dwpose134", in
DWPose's final order with the inserted neck (`DWPOSE_134`, the layout of the shards' ground-truth keypoints).
Resizing and warping use torch bilinear sampling, not OpenCV, so coordinates differ from DWPose's by sub-pixel
amounts; numbers are labelled with this backend. onnxruntime is imported lazily; if it is missing,
`MetricDependencyMissing` says so.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dystream.evaluation.keypoints import LAYOUTS, KeypointLayout, coco133_to_dwpose134
from dystream.evaluation.weights import MetricDependencyMissing, WeightsInfo, require_weights

__all__ = ["DWPoseBackend", "decode_simcc", "decode_yolox", "letterbox", "nms", "warp_box"]

DET_SIZE = 640
DET_STRIDES = (8, 16, 32)
POSE_MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
POSE_STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)


def letterbox(frame: np.ndarray, size: int = DET_SIZE) -> tuple[np.ndarray, float]:
    """uint8 [H, W, 3] -> (float32 [3, size, size] padded with 114, scale r)."""
    h, w = frame.shape[:2]
    r = min(size / h, size / w)
    nh, nw = int(h * r), int(w * r)
    x = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False)[0].round().clamp(0, 255)
    out = torch.full((3, size, size), 114.0)
    out[:, :nh, :nw] = x
    return out.numpy(), r


def nms(boxes: np.ndarray, scores: np.ndarray, iou_thr: float) -> list[int]:
    """Greedy NMS on xyxy boxes with YOLOX's +1 pixel area convention."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1]
    keep: list[int] = []
    while order.size > 0:
        i = int(order[0])
        keep.append(i)
        w = np.maximum(0.0, np.minimum(x2[i], x2[order[1:]]) - np.maximum(x1[i], x1[order[1:]]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[order[1:]]) - np.maximum(y1[i], y1[order[1:]]) + 1)
        inter = w * h
        iou = inter / (areas[i] + areas[order[1:]] - inter)
        order = order[1:][iou <= iou_thr]
    return keep


def decode_yolox(
    pred: np.ndarray,
    ratio: float,
    size: int = DET_SIZE,
    nms_thr: float = 0.45,
    score_thr: float = 0.1,
    person_thr: float = 0.3,
) -> np.ndarray:
    """YOLOX raw output [N_anchors, 5 + C] -> person boxes [M, 4] xyxy in frame pixels (score > person_thr)."""
    grids, strides = [], []
    for s in DET_STRIDES:
        n = size // s
        yv, xv = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        grids.append(np.stack([xv, yv], axis=-1).reshape(-1, 2))
        strides.append(np.full((n * n, 1), s))
    grid, stride = np.concatenate(grids), np.concatenate(strides)
    if pred.shape[0] != grid.shape[0]:
        raise ValueError(f"YOLOX output has {pred.shape[0]} anchors, expected {grid.shape[0]} for a {size} input")
    xy = (pred[:, :2] + grid) * stride
    wh = np.exp(np.clip(pred[:, 2:4], -10, 10)) * stride
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], axis=1) / ratio
    scores = pred[:, 4:5] * pred[:, 5:]  # [N, C]
    person: list[np.ndarray] = []
    for c in range(scores.shape[1]):  # class-aware NMS, then keep class 0 (person)
        sel = scores[:, c] > score_thr
        if not sel.any():
            continue
        keep = nms(boxes[sel], scores[sel, c], nms_thr)
        if c == 0:
            b, sc = boxes[sel][keep], scores[sel, c][keep]
            person.append(b[sc > person_thr])
    return np.concatenate(person) if person else np.zeros((0, 4))


def warp_box(frame: np.ndarray, box: np.ndarray, out_wh: tuple[int, int], padding: float = 1.25):
    """Crop the box (enlarged by `padding`, widened to the output aspect) to out_wh by an axis-aligned affine warp.

    Returns (float32 [H_out, W_out, 3], centre [2], scale [2] = the box size in frame pixels after the aspect fix).
    Output pixel (u, v) samples the frame at centre + ((u, v) - out / 2) * scale / out, as cv2.warpAffine does with
    DWPose's rotation-free matrix.
    """
    w_out, h_out = out_wh
    x1, y1, x2, y2 = (float(v) for v in box)
    centre = np.array([(x1 + x2) / 2, (y1 + y2) / 2])
    bw, bh = (x2 - x1) * padding, (y2 - y1) * padding
    aspect = w_out / h_out
    scale = np.array([bw, bw / aspect]) if bw > bh * aspect else np.array([bh * aspect, bh])
    h, w = frame.shape[:2]
    u = centre[0] + (np.arange(w_out) - w_out / 2) * scale[0] / w_out  # source x per output column
    v = centre[1] + (np.arange(h_out) - h_out / 2) * scale[1] / h_out
    gx = torch.from_numpy(2 * u / max(w - 1, 1) - 1).float()
    gy = torch.from_numpy(2 * v / max(h - 1, 1) - 1).float()
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)[None]  # [1, H_out, W_out, (x, y)]
    img = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)[None].float()
    out = F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[0].permute(1, 2, 0).numpy(), centre, scale


def decode_simcc(
    simcc_x: np.ndarray,
    simcc_y: np.ndarray,
    centre: np.ndarray,
    scale: np.ndarray,
    in_wh: tuple[int, int],
    split_ratio: float = 2.0,
) -> np.ndarray:
    """SimCC logits [K, Wx], [K, Wy] -> keypoints [K, 3] (x, y in frame pixels, confidence)."""
    locs = np.stack([simcc_x.argmax(axis=1), simcc_y.argmax(axis=1)], axis=-1).astype(np.float64) / split_ratio
    conf = np.minimum(simcc_x.max(axis=1), simcc_y.max(axis=1))
    xy = locs / np.asarray(in_wh, dtype=np.float64) * scale + centre - scale / 2
    xy[conf <= 0] = -1.0
    return np.concatenate([xy, conf[:, None]], axis=1)


class DWPoseBackend:
    """PoseBackend with DWPose's ONNX files: uint8 RGB frames [T, H, W, 3] -> float32 [T, 133 or 134, 3].

    `session_factory(path) -> session` (an onnxruntime.InferenceSession-like object with get_inputs() and run())
    exists for tests; by default onnxruntime is imported here and a CPU (or given providers) session is created.
    """

    def __init__(
        self,
        det_path: str | os.PathLike | None,
        pose_path: str | os.PathLike | None,
        providers: Sequence[str] | None = None,
        session_factory: Callable[[str], Any] | None = None,
        output_layout: str = "coco_wholebody_133",
    ):
        if output_layout not in LAYOUTS:
            raise ValueError(f"DWPoseBackend: output_layout must be one of {sorted(LAYOUTS)}, got {output_layout!r}")
        self.layout: KeypointLayout = LAYOUTS[output_layout]
        self.det_info: WeightsInfo = require_weights("dwpose_det", det_path)
        self.pose_info: WeightsInfo = require_weights("dwpose_pose", pose_path)
        if session_factory is None:
            try:
                import onnxruntime as ort
            except ImportError as e:
                raise MetricDependencyMissing("onnxruntime", "the DWPose pose backend") from e
            prov = list(providers or ["CPUExecutionProvider"])

            def session_factory(path: str) -> Any:
                return ort.InferenceSession(path, providers=prov)

        self.det = session_factory(self.det_info.path)
        self.pose = session_factory(self.pose_info.path)
        h, w = self.pose.get_inputs()[0].shape[2:]
        self.pose_wh = (int(w), int(h))  # (288, 384) for dw-ll_ucoco_384

    def person_box(self, frame: np.ndarray) -> np.ndarray:
        img, r = letterbox(frame)
        pred = self.det.run(None, {self.det.get_inputs()[0].name: img[None]})[0][0]
        boxes = decode_yolox(pred, r)
        if len(boxes) == 0:
            h, w = frame.shape[:2]
            return np.array([0.0, 0.0, float(w), float(h)])
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        return boxes[int(np.argmax(areas))]

    def keypoints(self, frame: np.ndarray) -> np.ndarray:
        crop, centre, scale = warp_box(frame, self.person_box(frame), self.pose_wh)
        x = ((crop - POSE_MEAN) / POSE_STD).transpose(2, 0, 1)[None].astype(np.float32)
        simcc_x, simcc_y = self.pose.run(None, {self.pose.get_inputs()[0].name: x})[:2]
        return decode_simcc(simcc_x[0], simcc_y[0], centre, scale, self.pose_wh)

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"DWPoseBackend expects uint8 RGB frames [T, H, W, 3], got {frames.dtype} {frames.shape}")
        kpts = np.stack([self.keypoints(f) for f in frames])
        if self.layout.name == "dwpose134":
            kpts = coco133_to_dwpose134(kpts)
        return kpts.astype(np.float32)
