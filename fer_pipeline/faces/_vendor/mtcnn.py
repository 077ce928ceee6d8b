# MTCNN face detection (inference only), vendored from facenet-pytorch 2.6.0
# (https://github.com/timesler/facenet-pytorch: models/mtcnn.py and models/utils/detect_face.py),
# itself a port of davidsandberg/facenet's align/detect_face.py (MIT) and of Zhang et al.,
# "Joint Face Detection and Alignment using Multi-task Cascaded Convolutional Networks" (2016).
#
# MIT License
#
# Copyright (c) 2019 Timothy Esler
#
# Permission is hereby granted, free of charge, to any person obtaining a copy
# of this software and associated documentation files (the "Software"), to deal
# in the Software without restriction, including without limitation the rights
# to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
# copies of the Software, and to permit persons to whom the Software is
# furnished to do so, subject to the following conditions:
#
# The above copyright notice and this permission notice shall be included in all
# copies or substantial portions of the Software.
#
# THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
# IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
# FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
# AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
# LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
# OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
# SOFTWARE.
"""The three MTCNN networks and the cascade that runs them, for one RGB image.

Why vendored rather than ``from facenet_pytorch import MTCNN`` (issue #11):

* ``import facenet_pytorch`` also imports its face-recognition model, ``requests`` and ``tqdm``
  (download code; about 2.5 s), and installs a process-wide ``warnings`` filter;
* its cascade raises on images smaller than the smallest face searched (``torch.cat`` of an
  empty list) and its final NMS keeps indices in an ``int16`` array;
* its networks load their weights with ``torch.load`` and no integrity check.

Here the installed ``facenet-pytorch==2.6.0`` wheel (``pip install --no-deps``, see the Makefile)
is only a *weight carrier*: the three state dicts are read from its ``data/`` folder without
importing the package, checked against the SHA-256 below, and loaded with
``torch.load(weights_only=True)``. The numerics of the cascade are unchanged (same resampling,
thresholds, NMS and 1-based box arithmetic), so the evaluation in ``benchmarks/DETECTORS.md``
carries over.
"""

from __future__ import annotations

import hashlib
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.functional import interpolate
from torchvision.ops.boxes import batched_nms

WEIGHTS_DIST = "facenet-pytorch"
WEIGHTS_VERSION = "2.6.0"
WEIGHTS_SHA256 = {
    "pnet": "a2a71925e0b9996a42f63e47efc1ca19043e69558b5c523b978d611dfae49c8f",
    "rnet": "bbb937de72efc9ef83b186c49f5f558467a1d7e3453a8ece0d71a886633f6a86",
    "onet": "165bfbe42940416ccfb977545cf0e976d5bf321f67083ae2aaaa5c764280118d",
}
INSTALL_HINT = f"pip install --no-deps {WEIGHTS_DIST}=={WEIGHTS_VERSION}  (what `make setup` runs)"


class WeightsUnavailable(RuntimeError):
    """The MTCNN weights are not installed, or not the files this module was checked against."""


class PNet(nn.Module):
    """Proposal network: a fully convolutional 12x12 face/non-face scanner."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, kernel_size=3)
        self.prelu1 = nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(10, 16, kernel_size=3)
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, kernel_size=3)
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, kernel_size=1)
        self.softmax4_1 = nn.Softmax(dim=1)
        self.conv4_2 = nn.Conv2d(32, 4, kernel_size=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.prelu1(self.conv1(x))
        x = self.pool1(x)
        x = self.prelu2(self.conv2(x))
        x = self.prelu3(self.conv3(x))
        return self.conv4_2(x), self.softmax4_1(self.conv4_1(x))


class RNet(nn.Module):
    """Refinement network on 24x24 candidates."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, kernel_size=3)
        self.prelu1 = nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(28, 48, kernel_size=3)
        self.prelu2 = nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(48, 64, kernel_size=2)
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.softmax5_1 = nn.Softmax(dim=1)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        x = x.permute(0, 3, 2, 1).contiguous()
        x = self.prelu4(self.dense4(x.view(x.shape[0], -1)))
        return self.dense5_2(x), self.softmax5_1(self.dense5_1(x))


class ONet(nn.Module):
    """Output network on 48x48 candidates: score, box regression and five landmarks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3)
        self.prelu1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.prelu2 = nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3)
        self.prelu3 = nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4 = nn.Conv2d(64, 128, kernel_size=2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.softmax6_1 = nn.Softmax(dim=1)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = x.permute(0, 3, 2, 1).contiguous()
        x = self.prelu5(self.dense5(x.view(x.shape[0], -1)))
        return self.dense6_2(x), self.dense6_3(x), self.softmax6_1(self.dense6_1(x))


def weights_path(name: str) -> Path:
    """Path of ``{name}.pt`` inside the installed facenet-pytorch wheel (the package is not imported)."""
    try:
        dist = metadata.distribution(WEIGHTS_DIST)
    except metadata.PackageNotFoundError:
        raise WeightsUnavailable(f"the MTCNN weights come from {WEIGHTS_DIST}, which is not installed: "
                                 f"{INSTALL_HINT}") from None
    path = Path(str(dist.locate_file(f"facenet_pytorch/data/{name}.pt")))
    if not path.is_file():
        raise WeightsUnavailable(f"{path} is missing ({WEIGHTS_DIST} {dist.version} installed): {INSTALL_HINT}")
    return path


def load_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The checked state dict of one network (``pnet``, ``rnet`` or ``onet``)."""
    path = weights_path(name)
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != WEIGHTS_SHA256[name]:
        raise WeightsUnavailable(f"{path} has SHA-256 {digest}, expected {WEIGHTS_SHA256[name]} "
                                 f"({WEIGHTS_DIST}=={WEIGHTS_VERSION}): {INSTALL_HINT}")
    import io

    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def load_networks(device: torch.device | str = "cpu") -> tuple[PNet, RNet, ONet]:
    """The three networks with their checked weights, in eval mode, on ``device``."""
    nets = (PNet(), RNet(), ONet())
    for net, name in zip(nets, ("pnet", "rnet", "onet")):
        net.load_state_dict(load_state_dict(name))
        net.eval().requires_grad_(False).to(device)
    return nets  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# the cascade (one image)
# --------------------------------------------------------------------------------------------

def _batched(model: nn.Module, data: torch.Tensor, batch_size: int = 512) -> tuple[torch.Tensor, ...]:
    out = [model(data[i:i + batch_size]) for i in range(0, len(data), batch_size)]
    return tuple(torch.cat(v, dim=0) for v in zip(*out))


def _imresample(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return interpolate(img, size=size, mode="area")


def _generate_boxes(reg: torch.Tensor, probs: torch.Tensor, scale: float, thresh: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    stride, cellsize = 2, 12
    reg = reg.permute(1, 0, 2, 3)
    mask = probs >= thresh
    mask_inds = mask.nonzero()
    image_inds = mask_inds[:, 0]
    score = probs[mask]
    reg = reg[:, mask].permute(1, 0)
    bb = mask_inds[:, 1:].type(reg.dtype).flip(1)
    q1 = ((stride * bb + 1) / scale).floor()
    q2 = ((stride * bb + cellsize - 1 + 1) / scale).floor()
    return torch.cat([q1, q2, score.unsqueeze(1), reg], dim=1), image_inds


def _bbreg(boxes: torch.Tensor, reg: torch.Tensor) -> torch.Tensor:
    if reg.shape[1] == 1:
        reg = torch.reshape(reg, (reg.shape[2], reg.shape[3]))
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    b1 = boxes[:, 0] + reg[:, 0] * w
    b2 = boxes[:, 1] + reg[:, 1] * h
    b3 = boxes[:, 2] + reg[:, 2] * w
    b4 = boxes[:, 3] + reg[:, 3] * h
    boxes[:, :4] = torch.stack([b1, b2, b3, b4]).permute(1, 0)
    return boxes


def _rerec(boxes: torch.Tensor) -> torch.Tensor:
    """Square boxes on their centres (side = the longer side)."""
    h = boxes[:, 3] - boxes[:, 1]
    w = boxes[:, 2] - boxes[:, 0]
    side = torch.max(w, h)
    boxes[:, 0] = boxes[:, 0] + w * 0.5 - side * 0.5
    boxes[:, 1] = boxes[:, 1] + h * 0.5 - side * 0.5
    boxes[:, 2:4] = boxes[:, :2] + side.repeat(2, 1).permute(1, 0)
    return boxes


def _pad(boxes: torch.Tensor, w: int, h: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    b = boxes.trunc().int().cpu().numpy()
    x, y, ex, ey = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    x[x < 1] = 1
    y[y < 1] = 1
    ex[ex > w] = w
    ey[ey > h] = h
    return y, ey, x, ex


def _crops(imgs: torch.Tensor, boxes: torch.Tensor, image_inds: torch.Tensor, size: int, w: int, h: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Resampled candidate patches, normalised; and which candidates had a non-empty patch."""
    y, ey, x, ex = _pad(boxes, w, h)
    keep = (ey > y - 1) & (ex > x - 1)
    patches = [_imresample(imgs[image_inds[k], :, (y[k] - 1):ey[k], (x[k] - 1):ex[k]].unsqueeze(0), (size, size))
               for k in np.flatnonzero(keep)]
    if not patches:
        return imgs.new_zeros((0, 3, size, size)), torch.as_tensor(keep, device=boxes.device)
    return (torch.cat(patches, dim=0) - 127.5) * 0.0078125, torch.as_tensor(keep, device=boxes.device)


def _nms_min(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """Greedy NMS with the "Min" overlap (intersection over the smaller box), as in the original."""
    if boxes.size == 0:
        return np.empty(0, np.int64)
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(scores, kind="stable")
    pick = []
    while order.size > 0:
        i = order[-1]
        pick.append(i)
        rest = order[:-1]
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        overlap = (w * h) / np.minimum(area[i], area[rest])
        order = rest[overlap <= threshold]
    return np.asarray(pick, np.int64)


def detect_faces(
    image: np.ndarray,
    nets: tuple[PNet, RNet, ONet],
    min_face_size: float = 20.0,
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
    factor: float = 0.709,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Run the cascade on one uint8 RGB image (H, W, 3).

    Returns ``boxes`` (N, 5: x0, y0, x1, y1, probability) and ``points`` (N, 5, 2: x, y of the
    image-left eye, image-right eye, nose, left and right mouth corner), float32, in the
    image's pixel coordinates. Empty arrays when nothing is found or the image is smaller than
    ``min_face_size`` (the original raised there)."""
    pnet, rnet, onet = nets
    empty = np.zeros((0, 5), np.float32), np.zeros((0, 5, 2), np.float32)
    if not image.flags.writeable or not image.flags.c_contiguous:
        image = np.array(image)  # torch wants a writable array (np.asarray of a PIL image is read-only)
    imgs = torch.as_tensor(image, device=device).unsqueeze(0)
    dtype = next(pnet.parameters()).dtype
    imgs = imgs.permute(0, 3, 1, 2).type(dtype)
    h, w = imgs.shape[2:4]

    m = 12.0 / min_face_size
    minl = min(h, w) * m
    scales, scale = [], m
    while minl >= 12:
        scales.append(scale)
        scale *= factor
        minl *= factor
    if not scales:
        return empty

    # stage 1: PNet over the image pyramid
    boxes_l, inds_l, picks, offset = [], [], [], 0
    for scale in scales:
        data = (_imresample(imgs, (int(h * scale + 1), int(w * scale + 1))) - 127.5) * 0.0078125
        reg, probs = pnet(data)
        boxes_s, inds_s = _generate_boxes(reg, probs[:, 1], scale, thresholds[0])
        boxes_l.append(boxes_s)
        inds_l.append(inds_s)
        picks.append(batched_nms(boxes_s[:, :4], boxes_s[:, 4], inds_s, 0.5) + offset)
        offset += boxes_s.shape[0]
    boxes = torch.cat(boxes_l, dim=0)
    image_inds = torch.cat(inds_l, dim=0)
    pick = torch.cat(picks, dim=0)
    boxes, image_inds = boxes[pick], image_inds[pick]
    pick = batched_nms(boxes[:, :4], boxes[:, 4], image_inds, 0.7)
    boxes, image_inds = boxes[pick], image_inds[pick]
    if len(boxes) == 0:
        return empty
    regw = boxes[:, 2] - boxes[:, 0]
    regh = boxes[:, 3] - boxes[:, 1]
    boxes = torch.stack([boxes[:, 0] + boxes[:, 5] * regw, boxes[:, 1] + boxes[:, 6] * regh,
                         boxes[:, 2] + boxes[:, 7] * regw, boxes[:, 3] + boxes[:, 8] * regh,
                         boxes[:, 4]]).permute(1, 0)
    boxes = _rerec(boxes)

    # stage 2: RNet on 24x24 candidates
    data, keep = _crops(imgs, boxes, image_inds, 24, w, h)
    boxes, image_inds = boxes[keep], image_inds[keep]
    if len(boxes) == 0:
        return empty
    out = _batched(rnet, data)
    score = out[1][:, 1]
    ipass = score > thresholds[1]
    boxes = torch.cat((boxes[ipass, :4], score[ipass].unsqueeze(1)), dim=1)
    image_inds = image_inds[ipass]
    mv = out[0][ipass]
    pick = batched_nms(boxes[:, :4], boxes[:, 4], image_inds, 0.7)
    boxes, image_inds, mv = boxes[pick], image_inds[pick], mv[pick]
    boxes = _rerec(_bbreg(boxes, mv))
    if len(boxes) == 0:
        return empty

    # stage 3: ONet on 48x48 candidates: final score, box and landmarks
    data, keep = _crops(imgs, boxes, image_inds, 48, w, h)
    boxes, image_inds = boxes[keep], image_inds[keep]
    if len(boxes) == 0:
        return empty
    out = _batched(onet, data)
    score = out[2][:, 1]
    ipass = score > thresholds[2]
    points = out[1][ipass].permute(1, 0)
    boxes = torch.cat((boxes[ipass, :4], score[ipass].unsqueeze(1)), dim=1)
    mv = out[0][ipass]
    w_i = boxes[:, 2] - boxes[:, 0] + 1
    h_i = boxes[:, 3] - boxes[:, 1] + 1
    points_x = w_i.repeat(5, 1) * points[:5, :] + boxes[:, 0].repeat(5, 1) - 1
    points_y = h_i.repeat(5, 1) * points[5:10, :] + boxes[:, 1].repeat(5, 1) - 1
    points = torch.stack((points_x, points_y)).permute(2, 1, 0)
    boxes = _bbreg(boxes, mv)
    boxes_np = boxes.cpu().numpy().astype(np.float32)
    points_np = points.cpu().numpy().astype(np.float32)
    pick = _nms_min(boxes_np[:, :4], boxes_np[:, 4], 0.7)
    return boxes_np[pick], points_np[pick]
