"""Videos in, sampled frames out: probing, segments and streaming decode with PyAV (FFmpeg).

A video is labelled from frames sampled by timestamp: with `fps` F, the frames nearest the times
0, 1/F, 2/F, ... (`fps` 0: every frame). A long video is cut into segments of `segment_s`
seconds, each decoded by its own task: the task seeks to the keyframe at or before the segment's
start, decodes up to its end and hands on only the sampled frames, one at a time, so memory does
not grow with the video. The sample times are the video's, not the segment's, so the frames a
video gives do not depend on where it was cut.

Each sampled frame is handed on as the face stage wants a photo (`label/decode.decode_photo`): a
small RGB copy to search for faces and a gray copy to cut the faces from, scaled by FFmpeg.

A file that cannot be opened, holds no video stream or fails to decode raises `VideoError` with a
short reason; `decode_frames` raises it after the frames before the break, with the time of the
break, and treats a video that ends well before the duration its header gives as broken there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from ray_fer.schema import VIDEO_EXTENSIONS
from ray_fer.store import storage

DEFAULT_FPS = 2.0  # sampled frames per second: expressions change over seconds, not frames
SEGMENT_S = 60.0  # seconds of video per decode task: a 2-hour file spreads over 120 tasks
SKIP_PER_FRAME = ("h264", "hevc")  # decoders that honour skip_frame per frame (see _decoded)
SOURCE_FACTOR = 3  # the gray copy's long side is at most this many times the detection size (as for photos)


class VideoError(Exception):
    """A video that cannot be read: the message is the reason, short enough for an output row;
    `at_s` the time where decoding broke (None: the file could not be opened)."""

    def __init__(self, message: str, at_s: float | None = None) -> None:
        super().__init__(message)
        self.at_s = at_s


def is_video(path: str) -> bool:
    return path.lower().endswith(VIDEO_EXTENSIONS)


@dataclass(frozen=True)
class VideoInfo:
    duration_s: float
    fps: float  # the stream's average frame rate (0 where the container does not say)
    width: int
    height: int
    codec: str


@dataclass
class Frame:
    """One sampled frame, ready for the face stage."""

    index: int  # the frame's index in the stream: round(time_s x the average frame rate)
    time_s: float  # from the stream's start
    width: int
    height: int
    detect: np.ndarray  # (h, w, 3) uint8 RGB, long side <= detect_size
    gray: np.ndarray  # (H, W) uint8, long side <= SOURCE_FACTOR x detect_size


def _open(uri: str) -> Any:
    """An opened PyAV container of a local path or s3:// URI (read as a seekable stream, never whole)."""
    import av

    source: Any = uri
    if storage.is_remote(uri):
        fs, path = storage.filesystem(uri)
        source = fs.open_input_file(path)
    try:
        return av.open(source, mode="r", metadata_errors="ignore")
    except av.error.FileNotFoundError:
        raise FileNotFoundError(uri) from None
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as e:
        raise VideoError(f"cannot open video: {_reason(e)}") from None


def _reason(e: BaseException) -> str:
    text = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return text.split(": '", 1)[0][:160]


def _stream(container: Any) -> Any:
    if not container.streams.video:
        raise VideoError("no video stream in the file")
    return container.streams.video[0]


def probe(uri: str) -> VideoInfo:
    """Duration, frame rate, size and codec from the container's header (no frame is decoded)."""
    with _open(uri) as container:
        return _info(container, _stream(container))


def _info(container: Any, stream: Any) -> VideoInfo:
    if stream.duration:
        duration = float(stream.duration * stream.time_base)
    elif container.duration:
        duration = container.duration / 1_000_000  # AV_TIME_BASE
    else:
        duration = math.nan
    rate = stream.average_rate or stream.guessed_rate
    ctx = stream.codec_context
    return VideoInfo(duration_s=duration, fps=float(rate) if rate else 0.0, width=int(ctx.width),
                     height=int(ctx.height), codec=ctx.name)


def segments(duration_s: float, segment_s: float = SEGMENT_S) -> list[tuple[float, float]]:
    """[start, end) times covering the video; one (0, inf) where the duration is unknown."""
    if not math.isfinite(duration_s) or duration_s <= 0:
        return [(0.0, math.inf)]
    n = max(1, math.ceil(duration_s / segment_s - 1e-9))
    return [(i * segment_s, math.inf if i == n - 1 else (i + 1) * segment_s) for i in range(n)]


def decode_frames(uri: str, *, start_s: float = 0.0, end_s: float = math.inf, fps: float = DEFAULT_FPS,
                  detect_size: int = 640) -> Iterator[Frame]:
    """The sampled frames with start_s <= time < end_s, in order (see the module's docstring).

    Raises VideoError where decoding breaks (after yielding the frames before it), and where the
    video ends more than a second before its header's duration; FileNotFoundError if it is missing.
    """
    import av

    with _open(uri) as container:
        stream = _stream(container)
        info = _info(container, stream)
        stream.thread_count = 1  # a decode task holds one CPU
        origin = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        native = info.fps or 30.0
        tol = 0.5 / native  # a frame within half a frame interval of a sample time is that sample
        if start_s > 0:
            container.seek(int((start_s + origin) / stream.time_base), stream=stream, backward=True, any_frame=False)
        next_k = math.ceil(start_s * fps - 1e-9) if fps else 0
        last = None
        # a frame before this time can no longer be sampled (the sample times only grow)
        frames = _decoded(container, stream, origin,
                          not_before=lambda: (next_k / fps if fps else start_s) - tol)
        while True:
            try:
                frame = next(frames)
            except StopIteration:
                break
            except av.error.FFmpegError as e:
                at = last if last is not None else start_s
                raise VideoError(f"decoding broke after {at:.2f} s: {_reason(e)}", at_s=at) from None
            if frame.time is None:
                continue
            t = float(frame.time) - origin
            if t < start_s - tol:
                continue
            if t >= end_s - tol:
                return
            last = t
            if fps:
                if t < next_k / fps - tol:
                    continue
                next_k = math.floor((t + tol) * fps) + 1
            yield _frame(frame, t, native, detect_size)
        if math.isfinite(info.duration_s) and end_s > info.duration_s - 1.0:
            reached = last if last is not None else start_s
            if reached < info.duration_s - 1.0:
                raise VideoError(f"the video breaks off at {reached:.2f} s of the {info.duration_s:.2f} s its header "
                                 "gives (truncated or damaged)", at_s=reached)


def _decoded(container: Any, stream: Any, origin: float, *, not_before: Any) -> Iterator[Any]:
    """The stream's decoded frames in order, as `container.decode` gives them, except that a
    packet whose time is before `not_before()` is decoded with FFmpeg's `skip_frame` NONREF: a
    frame that no other frame refers to (most B-frames) is not decoded at all, since it would not
    be sampled. On an H.264 High clip with B-frames at 25 frames/s (walking.mp4) that skips half
    the frames between samples at --fps 2, and decoding is most of a decode task's work there.
    Only for the decoders that read `skip_frame` frame by frame (SKIP_PER_FRAME): FFmpeg's
    libdav1d (AV1) reads it once, when the decoder opens, and would then skip for good."""
    ctx = stream.codec_context
    per_frame = ctx.name in SKIP_PER_FRAME
    for packet in container.demux(stream):
        if per_frame:
            skip = packet.pts is not None and float(packet.pts * stream.time_base) - origin < not_before()
            ctx.skip_frame = "NONREF" if skip else "DEFAULT"
        yield from packet.decode()


def _frame(frame: Any, t: float, native_fps: float, detect_size: int) -> Frame:
    w, h = frame.width, frame.height
    scale = min(1.0, detect_size / max(w, h))
    source = min(1.0, SOURCE_FACTOR * detect_size / max(w, h))
    dw, dh = max(1, round(w * scale)), max(1, round(h * scale))
    gw, gh = max(1, round(w * source)), max(1, round(h * source))
    detect = frame.reformat(width=dw, height=dh, format="rgb24").to_ndarray()
    gray = frame.reformat(width=gw, height=gh, format="gray").to_ndarray()
    return Frame(index=round(t * native_fps), time_s=t, width=w, height=h,
                 detect=np.ascontiguousarray(detect), gray=np.ascontiguousarray(gray))
