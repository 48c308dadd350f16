"""Face detection and alignment: photos -> boxes, scores, 5 landmarks -> aligned 48x48 gray crops.

The detector is MTCNN (P-, R- and O-Net) with the weights that ship inside the facenet-pytorch
wheel (MIT licence; nothing is downloaded), run here batched on any torch device: one pyramid of
P-Net passes over a batch of photos brought to a common size (zero-padded), and R-Net and O-Net
on every candidate of the batch at once (`roi_align` cuts them: no Python loop per box, which is
what makes facenet-pytorch's own `detect_face` slow on GPUs).

Photos are detected on a downscaled copy (long side `detect_size`, see decode.decode_photo) and
cropped from a larger gray copy. Alignment maps the five landmarks onto where FER2013's own crops
have them (TEMPLATE, measured with bench/fer_framing.py), eyes level, and cuts a 48x48 crop:
the framing the classifier was trained on. Faces are returned left to right (box centre x).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ray_fer.faces.options import INSTALL, DetectorError, weights_folder

log = logging.getLogger(__name__)

MIN_FACE = 20  # smallest face searched, in pixels of the detection copy (MTCNN's own default)
# P-, R-, O-Net score thresholds; the last is the least `face_score` reported. MTCNN's defaults
# are 0.6, 0.7, 0.7. Lower first two keep more candidates for O-Net, which then finds more faces
# rolled by up to 20 degrees; the high last one drops the false faces O-Net scores 0.7-0.95 in
# real photos (backgrounds, clothes). Measured on 175 FER2013 faces pasted into 60 synthetic
# photos: recall 96.6% -> 96.0% and false boxes 2 -> 1 against the defaults, at the same speed;
# on ../shared/data/photos five false faces fewer, none of the listed faces lost.
THRESHOLDS = (0.4, 0.5, 0.95)
PYRAMID_FACTOR = 0.709
# Pixels of each pyramid level, half P-Net's 12-pixel window, by which its windows may reach past
# an image's frame (the edge pixels repeated there): faces cut by the frame are found, at every
# scale. Windows inside the frame are computed as without it (an even reach keeps P-Net's stride-2
# grid). test-obama_partial_face2.jpg (../shared/data/photos) holds such a face.
EDGE_REACH = 6
CROP_SIZE = 48  # FER2013's side; the template below is in its pixels
# Samples per crop pixel along each side (crop_faces). On 562 FER2013 val faces pasted upright into
# synthetic photos and cut at their true boxes, 2 kept the packaged model's label of the original
# crop on 93.8% of them against 90.9% with one bilinear sample a pixel (4: 94.0%), and its
# accuracy at 67.6% against 65.5%: the mean of 2x2 samples undoes the photo's resampling much as
# an area resize does. No slower: 3 ms for 3 faces of a 1280x960 photo on one thread, either way.
SUPERSAMPLE = 2
# Where FER2013's crops have the five landmarks, in pixels of the 48x48 frame: the medians the
# detector finds on 776 FER2013 train crops (bench/fer_framing.py), the eyes' and the mouth corners'
# heights averaged so that the template itself is level. Its eyes are 18 px apart, 0.38 of the frame.
TEMPLATE = np.array([[15.3, 18.8], [33.4, 18.8], [24.2, 28.9], [17.0, 38.2], [31.9, 38.2]], dtype=np.float32)


# --------------------------------------------------------------------------------------------
# Detection


@dataclass
class Detections:
    """The faces found in one photo, left to right, in pixels of the image given to the detector
    (continuous coordinates: pixel (i, j) covers [i, i+1) x [j, j+1), the image 0..width)."""

    boxes: np.ndarray  # (n, 4) float32 x1, y1, x2, y2
    scores: np.ndarray  # (n,) float32, O-Net's face probability
    landmarks: np.ndarray  # (n, 5, 2) float32 x, y: left eye, right eye (as seen), nose, mouth left, right

    def __len__(self) -> int:
        return len(self.scores)

    def scaled(self, sx: float, sy: float, width: int, height: int) -> Detections:
        """The same faces in another image's pixels (x times sx, y times sy), boxes clipped to it."""
        boxes = self.boxes * np.array([sx, sy, sx, sy], dtype=np.float32)
        boxes = np.clip(boxes, 0, np.array([width, height, width, height], dtype=np.float32))
        return Detections(boxes, self.scores, self.landmarks * np.array([sx, sy], dtype=np.float32))


def load_mtcnn() -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """P-, R- and O-Net with facenet-pytorch's packaged weights (nothing is downloaded);
    DetectorError naming the fix where they are not installed."""
    try:
        import facenet_pytorch
    except ImportError as e:
        raise DetectorError(f"face detection needs facenet-pytorch ({e}); {INSTALL}") from None
    weights_folder(facenet_pytorch.__file__)
    from facenet_pytorch.models.mtcnn import ONet, PNet, RNet

    return PNet().eval(), RNet().eval(), ONet().eval()


class FaceDetector:
    """MTCNN on a batch of photos, on `device` (CPU threads or a GPU)."""

    def __init__(self, device: str | torch.device = "cpu", *, min_face: int = MIN_FACE,
                 thresholds: tuple[float, float, float] = THRESHOLDS) -> None:
        self.device = torch.device(device)
        # channels_last: 1.5x faster convolutions and 2.4x faster max-pooling on CPU (measured)
        self.pnet, self.rnet, self.onet = (net.to(self.device, memory_format=torch.channels_last)
                                           for net in load_mtcnn())
        self.min_face = min_face
        self.thresholds = thresholds

    @torch.inference_mode()
    def detect(self, images: list[np.ndarray], chunk: int | None = None) -> list[Detections]:
        """Faces in each of `images` (uint8 (h, w, 3) RGB, any sizes), left to right, in each
        image's own pixels, boxes clipped to it; at most `chunk` images (default: all) per pass.

        Each image is searched as if it were alone: its own pyramid, its own edge pixels repeated
        past its frame (EDGE_REACH), and nothing found in the padding that brings a pass's images
        to one size. So a photo's faces do not depend on which photos share its pass (Ray Data's
        batches differ from run to run, and `ray-fer predict` detects one photo alone), and one
        pass may hold photos of any sizes (on a GPU, one pass per batch)."""
        found: dict[int, Detections] = {}
        order = sorted(range(len(images)), key=lambda i: images[i].shape[:2])  # alike sizes: less padding
        step = chunk or max(1, len(images))
        for start in range(0, len(order), step):
            part = order[start:start + step]
            found.update(zip(part, self._detect([images[i] for i in part])))
        return [found[i] for i in range(len(images))]

    def _detect(self, images: list[np.ndarray]) -> list[Detections]:
        """One pass: MTCNN's three stages on all of `images` at once (see `detect`)."""
        sizes = [im.shape[:2] for im in images]
        # what R-Net and O-Net cut from: each image at offset `margin` of one canvas, its edge
        # pixels repeated to the canvas' edges (the same pixels whatever the canvas' size)
        overhang = [min(h, w) // 4 for h, w in sizes]  # how far past its frame a cut may see its image
        margin = max(overhang)
        height = max(h for h, _ in sizes) + 2 * margin
        width = max(w for _, w in sizes) + 2 * margin
        canvas = np.empty((len(images), height, width, 3), dtype=np.uint8)
        for i, im in enumerate(images):
            h, w = im.shape[:2]
            canvas[i] = np.pad(im, ((margin, height - h - margin), (margin, width - w - margin), (0, 0)), mode="edge")
        # NCHW for the resizing (2x faster there), channels_last for the networks (measured on CPU)
        x = torch.from_numpy(canvas).to(self.device).permute(0, 3, 1, 2).float().contiguous()
        x = (x - 127.5) * 0.0078125  # MTCNN's input scaling
        frames = torch.tensor([[w, h, o] for (h, w), o in zip(sizes, overhang)], dtype=x.dtype, device=x.device)
        boxes, index = self._propose(x, margin, sizes)
        boxes, index = self._refine(x, margin, frames, boxes, index)
        boxes, points, index = self._output(x, margin, frames, boxes, index)
        boxes, points, index = boxes.cpu().numpy(), points.cpu().numpy(), index.cpu().numpy()
        # MTCNN counts whole pixels (x2 is the last pixel's index, a point its pixel's index)
        boxes[:, 2:4] += 1
        points += 0.5
        out = []
        for i, (h, w) in enumerate(sizes):
            b, p = boxes[index == i], points[index == i]
            cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
            inside = (cx >= 0) & (cx < w) & (cy >= 0) & (cy < h)  # a face cut by the frame: its centre in it
            b, p = b[inside], p[inside]
            order = np.lexsort(((b[:, 1] + b[:, 3]) / 2, (b[:, 0] + b[:, 2]) / 2))  # left to right
            out.append(Detections(b[order, :4].astype(np.float32), b[order, 4].astype(np.float32),
                                  p[order].astype(np.float32)).scaled(1.0, 1.0, w, h))
        return out

    def _propose(self, x: torch.Tensor, margin: int, sizes: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """P-Net over each image's pyramid: candidate boxes (k, 5: x1 y1 x2 y2 score), in the
        image's pixels, and their image. Each level is resized from the image alone, its edge
        repeated EDGE_REACH pixels past it, then padded to the pass' largest level; windows that
        reach further into that padding are not looked at."""
        from torchvision.ops import batched_nms

        reach = EDGE_REACH
        scale = 12.0 / self.min_face
        firsts: list[torch.Tensor | None] = [None] * len(sizes)
        found, images = [], []
        while True:
            alive = [i for i, (h, w) in enumerate(sizes) if min(h, w) * scale >= 12]
            if not alive:
                break
            levels = []
            for i in alive:
                h, w = sizes[i]
                source = firsts[i] if firsts[i] is not None else x[i:i + 1, :, margin:margin + h, margin:margin + w]
                # each level from the first, not the full image: a third of the cost, the same pixels
                level = F.interpolate(source, size=(int(h * scale + 1), int(w * scale + 1)), mode="area")
                firsts[i] = level if firsts[i] is None else firsts[i]
                levels.append(level)
            lh = torch.tensor([lv.shape[2] for lv in levels], device=x.device)
            lw = torch.tensor([lv.shape[3] for lv in levels], device=x.device)
            top, right = int(lh.max()) + reach, int(lw.max()) + reach
            batch = torch.cat([F.pad(lv, (reach, right - lv.shape[3], reach, top - lv.shape[2]), mode="replicate")
                               for lv in levels])
            reg, prob = self.pnet(batch.contiguous(memory_format=torch.channels_last))
            b, yy, xx = torch.nonzero(prob[:, 1] >= self.thresholds[0], as_tuple=True)
            mine = (2 * xx + 12 <= lw[b] + 2 * reach) & (2 * yy + 12 <= lh[b] + 2 * reach)  # not past the reach
            b, yy, xx = b[mine], yy[mine], xx[mine]
            score = prob[b, 1, yy, xx]
            cell = torch.stack([xx, yy], dim=1).to(x.dtype)
            q1 = torch.floor((2 * cell + 1 - reach) / scale)
            q2 = torch.floor((2 * cell + 12 - reach) / scale)
            boxes = torch.cat([q1, q2, score[:, None], reg[b, :, yy, xx]], dim=1)
            keep = batched_nms(boxes[:, :4], score, b, 0.5)
            found.append(boxes[keep])
            images.append(torch.tensor(alive, device=x.device)[b[keep]])
            scale *= PYRAMID_FACTOR
        if not found:  # smaller than P-Net's 12-pixel window at the smallest face size
            return torch.zeros(0, 5, device=x.device), torch.zeros(0, dtype=torch.long, device=x.device)
        boxes, index = torch.cat(found), torch.cat(images)
        keep = batched_nms(boxes[:, :4], boxes[:, 4], index, 0.7)
        boxes, index = boxes[keep], index[keep]
        size = boxes[:, 2:4] - boxes[:, 0:2]
        corners = boxes[:, :4] + boxes[:, 5:9] * size.repeat(1, 2)  # P-Net's box regression
        return _square(torch.cat([corners, boxes[:, 4:5]], dim=1)), index

    def _refine(self, x: torch.Tensor, margin: int, frames: torch.Tensor, boxes: torch.Tensor,
                index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """R-Net on every candidate: rejects most, regresses the rest."""
        from torchvision.ops import batched_nms

        if not len(boxes):
            return boxes, index
        reg, prob = self.rnet(_cut(x, margin, frames, boxes, index, 24))
        keep = prob[:, 1] > self.thresholds[1]
        boxes = torch.cat([boxes[keep, :4], prob[keep, 1:2]], dim=1)
        reg, index = reg[keep], index[keep]
        keep = batched_nms(boxes[:, :4], boxes[:, 4], index, 0.7)
        return _square(_regress(boxes[keep], reg[keep])), index[keep]

    def _output(self, x: torch.Tensor, margin: int, frames: torch.Tensor, boxes: torch.Tensor, index: torch.Tensor):
        """O-Net: the final boxes, scores and five landmarks."""
        if not len(boxes):
            return torch.zeros(0, 5, device=x.device), torch.zeros(0, 5, 2, device=x.device), index
        reg, pts, prob = self.onet(_cut(x, margin, frames, boxes, index, 48))
        keep = prob[:, 1] > self.thresholds[2]
        boxes = torch.cat([boxes[keep, :4], prob[keep, 1:2]], dim=1)
        reg, pts, index = reg[keep], pts[keep], index[keep]
        size = boxes[:, 2:4] - boxes[:, 0:2] + 1
        points = torch.stack([size[:, 0:1] * pts[:, :5] + boxes[:, 0:1] - 1,
                              size[:, 1:2] * pts[:, 5:] + boxes[:, 1:2] - 1], dim=2)
        boxes = _regress(boxes, reg)
        keep = _nms_min(boxes, index, 0.7)
        return boxes[keep], points[keep], index[keep]


def _square(boxes: torch.Tensor) -> torch.Tensor:
    """Boxes made square about their centre (side: the longer one), as MTCNN's stages expect."""
    size = boxes[:, 2:4] - boxes[:, 0:2]
    side = size.max(dim=1).values[:, None]
    start = boxes[:, 0:2] + size / 2 - side / 2
    return torch.cat([start, start + side, boxes[:, 4:]], dim=1)


def _regress(boxes: torch.Tensor, reg: torch.Tensor) -> torch.Tensor:
    size = boxes[:, 2:4] - boxes[:, 0:2] + 1
    return torch.cat([boxes[:, :4] + reg * size.repeat(1, 2), boxes[:, 4:]], dim=1)


def _cut(x: torch.Tensor, margin: int, frames: torch.Tensor, boxes: torch.Tensor, index: torch.Tensor,
         size: int) -> torch.Tensor:
    """Each box's pixels resized to size x size, in one call. As facenet-pytorch, a box is
    truncated to whole pixels; it is clipped to its image's frame widened by the image's overhang
    (`frames`: width, height, overhang per image; the image at offset `margin` of `x`), where the
    image's edge pixels repeat, and what is left is stretched."""
    from torchvision.ops import roi_align

    b = boxes[:, :4].trunc()
    w, h, overhang = frames[index, 0], frames[index, 1], frames[index, 2]
    x1 = torch.maximum(b[:, 0], 1 - overhang) - 1
    y1 = torch.maximum(b[:, 1], 1 - overhang) - 1
    x2 = torch.minimum(b[:, 2], w + overhang)
    y2 = torch.minimum(b[:, 3], h + overhang)
    rois = torch.stack([index.to(x.dtype), x1 + margin, y1 + margin, torch.maximum(x2, x1 + 1) + margin,
                        torch.maximum(y2, y1 + 1) + margin], dim=1)
    crops = roi_align(x, rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    return crops.contiguous(memory_format=torch.channels_last)


def _nms_min(boxes: torch.Tensor, index: torch.Tensor, threshold: float) -> torch.Tensor:
    """Greedy NMS per image where overlap is intersection over the smaller box (MTCNN's last step)."""
    if not len(boxes):
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = torch.argsort(boxes[:, 4], descending=True)
    b, idx = boxes[order].cpu(), index[order].cpu()
    area = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    lo = torch.maximum(b[:, None, :2], b[None, :, :2])
    hi = torch.minimum(b[:, None, 2:4], b[None, :, 2:4])
    inter = (hi - lo + 1).clamp(min=0).prod(dim=2)
    overlap = inter / torch.minimum(area[:, None], area[None, :])
    suppress = (overlap > threshold) & (idx[:, None] == idx[None, :])
    keep = torch.ones(len(b), dtype=torch.bool)
    for i in range(len(b)):
        if keep[i]:
            keep[i + 1:] &= ~suppress[i, i + 1:]
    return order[keep.to(order.device)]


# --------------------------------------------------------------------------------------------
# Alignment


def align_matrices(landmarks: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """(n, 2, 3) similarity transforms, image pixels -> crop pixels, that level the eyes and
    put the five landmarks (n, 5, 2) as near as they fit (least squares) to TEMPLATE (scaled to
    `size`)."""
    pts = np.asarray(landmarks, dtype=np.float64).reshape(-1, 5, 2)
    target = TEMPLATE.astype(np.float64) * (size / CROP_SIZE)
    eye = pts[:, 1] - pts[:, 0]
    angle = -np.arctan2(eye[:, 1], eye[:, 0])  # rotate the eye line to horizontal
    cos, sin = np.cos(angle), np.sin(angle)
    rot = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)  # (n, 2, 2)
    centred = pts - pts.mean(axis=1, keepdims=True)
    turned = np.einsum("nij,nkj->nki", rot, centred)
    target_c = target - target.mean(axis=0)
    scale = (turned * target_c).sum(axis=(1, 2)) / np.maximum((centred ** 2).sum(axis=(1, 2)), 1e-6)
    linear = rot * scale[:, None, None]
    shift = target.mean(axis=0) - np.einsum("nij,nj->ni", linear, pts.mean(axis=1))
    return np.concatenate([linear, shift[:, :, None]], axis=2).astype(np.float32)


def crop_faces(gray: torch.Tensor, matrices: np.ndarray, size: int = CROP_SIZE) -> torch.Tensor:
    """Aligned uint8 crops (n, size, size) from a uint8 (H, W) image, on its device.

    `matrices` map image pixels to crop pixels (align_matrices). Each crop is sampled at
    SUPERSAMPLE times its side from the level of a 2x pyramid where the face spans at most twice
    that, so big faces do not alias, then each crop pixel is the mean of its SUPERSAMPLE^2
    samples (a box filter, as an area resize); outside the image, the edge pixels repeat."""
    n = len(matrices)
    if n == 0:
        return torch.zeros((0, size, size), dtype=torch.uint8, device=gray.device)
    fine = size * SUPERSAMPLE  # image -> fine crop pixels: the matrices scaled by SUPERSAMPLE
    full = np.concatenate([np.asarray(matrices, dtype=np.float64) * SUPERSAMPLE,
                           np.tile([[[0.0, 0.0, 1.0]]], (n, 1, 1))], axis=1)
    inverse = np.linalg.inv(full)  # fine crop pixels -> image pixels
    px_per_sample = np.sqrt(np.abs(np.linalg.det(inverse[:, :2, :2])))
    deepest = max(0, int(math.log2(max(1, min(gray.shape)))) - 1)  # the smallest level keeps >= 2 pixels
    levels = np.clip(np.floor(np.log2(np.maximum(px_per_sample, 1.0))), 0, deepest).astype(int)
    pyramid = [gray[None, None].float()]
    while len(pyramid) <= levels.max():
        pyramid.append(F.avg_pool2d(pyramid[-1], 2))
    out = torch.empty((n, 1, fine, fine), dtype=torch.float32, device=gray.device)
    from_unit = np.array([[fine / 2, 0, fine / 2], [0, fine / 2, fine / 2], [0, 0, 1]])  # grid -> fine crop pixels
    for level in np.unique(levels):
        img = pyramid[level]
        h, w = img.shape[-2:]
        f = 2.0 ** level
        to_unit = np.array([[2 / (w * f), 0, -1], [0, 2 / (h * f), -1], [0, 0, 1]])  # image pixels -> grid
        chosen = np.flatnonzero(levels == level)
        theta = torch.as_tensor(np.stack([(to_unit @ inverse[i] @ from_unit)[:2] for i in chosen]),
                                dtype=torch.float32, device=gray.device)
        grid = F.affine_grid(theta, [len(chosen), 1, fine, fine], align_corners=False)
        out[torch.as_tensor(chosen, device=gray.device)] = F.grid_sample(
            img.expand(len(chosen), -1, -1, -1), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return F.avg_pool2d(out, SUPERSAMPLE)[:, 0].round_().clamp_(0, 255).to(torch.uint8)


def crop_box(matrix: np.ndarray, size: int = CROP_SIZE) -> tuple[float, float, float]:
    """Centre x, centre y and side, in image pixels, of the (rotated) square an aligned crop covers."""
    linear = matrix[:, :2].astype(np.float64)
    inverse = np.linalg.inv(linear)
    centre = inverse @ (np.array([size / 2, size / 2]) - matrix[:, 2])
    return float(centre[0]), float(centre[1]), float(size * math.sqrt(abs(np.linalg.det(inverse))))
