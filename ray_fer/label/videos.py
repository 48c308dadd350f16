"""Videos in the labelling chain: segments, frames as photos, and each video's rows finished.

A video takes three steps the images do not:

1. `expand_videos` (a light task after the listing): each video's header is read and the video
   becomes one row per segment (`video_start`, `video_end`; `video.decode.segments`), each its own
   block, so that the decode tasks spread one long video over the cluster. Images pass through
   (their `video_start` NaN).
2. the decode task (`datasets.decode_photos`) decodes a segment's sampled frames
   (`video.decode.decode_frames`) into rows that look like photos to the face stage, with their
   `frame` and `time_s`: the predictor actors label a video's frames and photos in the same batches.
3. once every frame is labelled, `finish_video` sees all of one video's rows together (`track_videos`:
   in the driver for a run's few videos, else a Ray Data groupby on the path over the video rows
   only) and gives the person behind each
   face a `track` (`video.track.assign_tracks`, across segment borders), numbers the video's faces
   in time order (`face` 0 is its first, so a video has one first row as an image has), drops the
   rows of frames without a face, keeps one no-face row for a video without any face and one
   error row, the first, where decoding broke.
"""

from __future__ import annotations

import io
import math
import os
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ray_fer.schema import KIND_COLUMN, to_output, video_mask
from ray_fer.store import storage
from ray_fer.video.decode import VideoError, probe, segments

EXPAND_CPUS = 0.25  # a header read per video: light, and not the decode stage's share (see decoded_dataset)


# staged video rows up to this much Parquet are tracked in the driver (_track_here): about 280,000
# face rows (30 bytes a row in Parquet, ~180 in memory), some 18 hours of video with two faces in
# view at --fps 2; a bigger pass runs over the cluster
TRACK_HERE_BYTES = 8 * 1024**2
SEGMENT_COLUMNS = ("video_start", "video_end", "video_pad")  # what expand_videos adds and the decode task takes off
_MAX_PAD = 8 * 1024**2  # the most bytes a segment's row is padded with (see expand_videos)


def expand_videos(batch: pa.Table, *, segment_s: float) -> Iterator[pa.Table]:
    """Ray Data batch function: one block per segment of each video (`video_start`, `video_end`
    in seconds), then the images of the block as one block (their bounds NaN). A video whose
    header cannot be read becomes one segment (0, inf): its decode task finds the same reason and
    writes the error row.

    Ray Data joins what a task yields into blocks of up to DataContext.target_max_block_size
    bytes, and a segment's row is a few bytes: joined, one decode task would decode every segment
    of a block in turn (measured: a 5-minute video's five segments in one 28 s task). So each
    segment's row carries `video_pad`, zero bytes as many as that limit, which makes it a block
    of its own, and so a decode task of its own; the decode task drops it."""
    import ray.data

    is_video = video_mask(batch["path"]).to_numpy(zero_copy_only=False)
    target = ray.data.DataContext.get_current().target_max_block_size
    pad = b"\0" * (target + 1) if target is not None and target < _MAX_PAD else b""
    for i in np.flatnonzero(is_video):
        row = batch.slice(int(i), 1)
        try:
            duration = probe(str(row["path"][0])).duration_s
        except (VideoError, FileNotFoundError, OSError):
            duration = math.nan
        for start, end in segments(duration, segment_s):
            yield (row.append_column("video_start", pa.array([start])).append_column("video_end", pa.array([end]))
                   .append_column("video_pad", pa.array([pad], pa.binary())))
    if not is_video.all():  # last: a block joined to a segment's would join their decode tasks
        images = batch.filter(pa.array(~is_video))
        nan = pa.array(np.full(images.num_rows, np.nan))
        yield (images.append_column("video_start", nan).append_column("video_end", nan)
               .append_column("video_pad", pa.nulls(images.num_rows, pa.binary())))


def finish_video(rows: pa.Table) -> pa.Table:
    """All rows of one video (one group of the groupby) -> its output rows (see the module)."""
    from ray_fer.video.track import assign_tracks

    if KIND_COLUMN in rows.column_names:
        rows = rows.drop_columns([KIND_COLUMN])
    has_face = pc.is_valid(rows["face"]).to_numpy(zero_copy_only=False)
    has_error = pc.is_valid(rows["error"]).to_numpy(zero_copy_only=False)
    faces = rows.filter(pa.array(has_face & ~has_error))
    errors = rows.filter(pa.array(has_error))
    if errors.num_rows:  # the earliest break (a file that would not open first); later segments break again
        at = pc.fill_null(errors["time_s"], -1.0).to_numpy(zero_copy_only=False)
        errors = errors.slice(int(np.argmin(at)), 1)
    if faces.num_rows == 0:
        if errors.num_rows:
            return errors.set_column(errors.schema.get_field_index("face"), "face", pa.nulls(1, pa.int32()))
        first = rows.filter(pa.array(~has_face & ~has_error)).slice(0, 1)  # the video as a whole: no frame
        for name, kind in (("face", pa.int32()), ("frame", pa.int32()), ("time_s", pa.float64())):
            first = first.set_column(first.schema.get_field_index(name), name, pa.nulls(first.num_rows, kind))
        return _with_video_columns(first, None, None)
    faces = faces.take(pc.sort_indices(faces, sort_keys=[("time_s", "ascending"), ("box_x", "ascending")]))
    times = faces["time_s"].to_numpy(zero_copy_only=False)
    boxes = np.stack([faces[c].to_numpy(zero_copy_only=False) for c in ("box_x", "box_y", "box_w", "box_h")], axis=1)
    points = np.stack([pc.fill_null(faces[c], np.nan).to_numpy(zero_copy_only=False)
                       for c in faces.column_names if c.endswith(("_x", "_y")) and not c.startswith("box_")], axis=1)
    tracks = assign_tracks(times, boxes, points)
    numbered = _with_video_columns(faces, np.arange(faces.num_rows), tracks)
    if errors.num_rows:  # after the faces, numbered on: the video's first row stays its face 0
        errors = errors.set_column(errors.schema.get_field_index("face"), "face",
                                   pa.array([faces.num_rows], pa.int32()))
        return pa.concat_tables([numbered, _with_video_columns(errors, None, None)])
    return numbered


def _with_video_columns(table: pa.Table, face: np.ndarray | None, track: np.ndarray | None) -> pa.Table:
    if face is not None:
        table = table.set_column(table.schema.get_field_index("face"), "face", pa.array(face, pa.int32()))
    track_col = pa.array(track, pa.int32()) if track is not None else pa.nulls(table.num_rows, pa.int32())
    if "track" in table.column_names:
        return table.set_column(table.schema.get_field_index("track"), "track", track_col)
    return table.append_column("track", track_col)


def track_videos(frames_dir: str, tracked_dir: str, *, schema: pa.Schema, counter: Any = None,
                 partitions: int = 8) -> None:
    """Pass two of a labelling run with videos: read the video rows staged in `frames_dir`, finish
    each video (`finish_video`), write them to `tracked_dir`. Staged rows of at most TRACK_HERE_BYTES
    of Parquet are finished in this process (`_track_here`), more by a
    Ray Data groupby on the path over the cluster."""
    import ray.data

    from ray_fer.store.output import ROWS_PER_FILE

    if not storage.exists(frames_dir):
        return
    staged = storage.file_sizes(frames_dir, (".parquet",))
    if sum(size for _, size in staged) <= TRACK_HERE_BYTES:
        _track_here([file for file, _ in staged], tracked_dir, schema=schema, counter=counter)
        return
    ds = ray.data.read_parquet(frames_dir, partitioning=None)
    # each partition is an aggregator actor, a process of its own: no more than the cluster's CPUs
    # (on 2 cores, 8 took 6.3-8.4 s to finish one 5-minute video's rows)
    partitions = max(1, min(partitions, int(ray.cluster_resources().get("CPU", 1))))
    ds = ds.groupby("path", num_partitions=partitions).map_groups(finish_video, batch_format="pyarrow")
    ds = ds.map_batches(to_output, fn_kwargs={"schema": schema, "counter": counter}, batch_format="pyarrow",
                        batch_size=None, num_cpus=0.25)
    ds.write_parquet(tracked_dir, min_rows_per_file=ROWS_PER_FILE, ray_remote_args={"num_cpus": 0.2})


def _track_here(files: list[str], tracked_dir: str, *, schema: pa.Schema, counter: Any = None) -> None:
    """`track_videos` in this process, for a run's few videos: the same `finish_video` per video and
    `to_output`, written in files of at most ROWS_PER_FILE rows. It spares a small run Ray Data's
    shuffle, whose aggregator actors took 5.5-8.4 s on 2 cores for one 5-minute video's 1,260 rows
    (this: a fraction of a second)."""
    import uuid

    from ray_fer.store.output import ROWS_PER_FILE

    tables = [pq.read_table(io.BytesIO(storage.read_with_retries(f))) for f in files]
    rows = pa.concat_tables(tables, promote_options="default") if tables else None
    if rows is None or rows.num_rows == 0:
        return
    rows = rows.take(pc.sort_indices(rows, sort_keys=[("path", "ascending")]))
    paths = rows["path"].to_numpy(zero_copy_only=False)
    starts = np.concatenate([[0], np.flatnonzero(paths[1:] != paths[:-1]) + 1, [len(paths)]])
    done = pa.concat_tables([finish_video(rows.slice(a, b - a)) for a, b in zip(starts[:-1], starts[1:])],
                            promote_options="default")
    done = to_output(done, schema=schema, counter=counter)
    run = uuid.uuid4().hex  # the names of another run's files in the same output never clash
    for i in range(0, done.num_rows, ROWS_PER_FILE):
        buf = io.BytesIO()
        pq.write_table(done.slice(i, ROWS_PER_FILE), buf)
        storage.write_bytes(storage.join(tracked_dir, f"{run}_{i // ROWS_PER_FILE:06d}.parquet"), buf.getvalue())


def report_videos(labels: str, output: str | None = None) -> dict[str, Any]:
    """`ray-fer report LABELS` on a labelled output with videos: tracks.parquet and tracks.csv (one
    row per video and track: `video.summary.track_summary`) and timelines/<video>.png (one band per
    track) into `output` (default ./tracks/<output's name>); prints the tracks. Reads only the
    columns it needs of the video rows."""
    import pyarrow.dataset as pads

    from ray_fer.config import UserError
    from ray_fer.labels import CLASSES
    from ray_fer.report import plot_timeline, unique_name
    from ray_fer.store.journal import SUCCESS_FILE
    from ray_fer.video.summary import format_tracks, to_csv, track_summary

    if not storage.exists(storage.join(labels, SUCCESS_FILE)):
        raise UserError(f"{labels!r} holds no {SUCCESS_FILE}: pass an output that `ray-fer infer` completed")
    fs, path = storage.filesystem(labels)
    columns = ["path", "time_s", "track", "label", *(f"prob_{c}" for c in CLASSES)]
    dataset = pads.dataset(path, filesystem=fs, format="parquet", exclude_invalid_files=False)
    if "track" not in dataset.schema.names:
        raise UserError(f"{labels!r} was labelled without faces (--faces whole): it has no videos or tracks")
    rows = dataset.to_table(columns=columns, filter=pads.field("track").is_valid())
    if rows.num_rows == 0:
        raise UserError(f"{labels!r} holds no tracked faces: no video in it had a face found")
    output = output or storage.join(os.path.abspath("tracks"), storage.basename(labels.rstrip("/")))
    summary = track_summary(rows)
    buf = io.BytesIO()
    pq.write_table(summary, buf)
    storage.write_bytes(storage.join(output, "tracks.parquet"), buf.getvalue())
    storage.write_bytes(storage.join(output, "tracks.csv"), to_csv(summary))
    names: set[str] = set()
    timelines = []
    for video in sorted(set(rows["path"].to_pylist())):
        uri = storage.join(output, "timelines", unique_name(video, "png", names, default="video"))
        storage.write_bytes(uri, plot_timeline(rows.filter(pc.equal(rows["path"], video)), title=video))
        timelines.append(uri)
    print(format_tracks(summary.to_pylist()), flush=True)
    return {"labels": labels, "videos": len(timelines), "tracks": summary.num_rows,
            "tracks_parquet": storage.join(output, "tracks.parquet"), "tracks_csv": storage.join(output, "tracks.csv"),
            "timelines": storage.join(output, "timelines")}
