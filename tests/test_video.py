"""Videos: frames sampled by timestamp (PyAV), segments that give the same frames as one pass,
tracks, and `ray-fer infer` over a folder of synthetic videos with a known truth (FER2013 faces
pasted at known, moving positions, expressions changing at known times, people entering and
leaving; H.264, HEVC and VP9), the real walking.mp4, and videos that are empty, corrupt or cut off."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from ray_fer.labels import CLASSES
from ray_fer.video.decode import VideoError, decode_frames, probe, segments
from ray_fer.video.synthetic import Person, make_video
from ray_fer.video.track import assign_tracks, identity_switches, iou

FPS = 2.0


def _crop_labels(paths: list[Path]) -> list[tuple[str, float]]:
    """The default packaged model's label and confidence of each FER2013 face as it is (48x48, whole)."""
    import torch

    from ray_fer.label.decode import decode_image
    from ray_fer.label.predictor import predict_probs
    from ray_fer.model import load_bundle
    from ray_fer.model_ref import DEFAULT_MODEL, resolve_model

    bundle, _ = load_bundle(resolve_model(DEFAULT_MODEL))
    x = torch.from_numpy(np.stack([decode_image(p.read_bytes(), 48)[0] for p in paths]))
    with torch.inference_mode():
        probs = predict_probs(bundle.build_model(), bundle.eval_preset(channels_last=False), x)
    return [(CLASSES[int(q.argmax())], float(q.max())) for q in probs]


@pytest.fixture(scope="module")
def clear_faces(fer_root) -> dict[str, str]:
    """Per class, the first FER2013 val face (sorted by name) that the packaged model labels as its
    class with confidence >= 0.7 on the crop itself. Where the model hesitates on the crop (about a
    third of val faces), any reframing flips its label: that measures the model, not the video path."""
    chosen = {}
    for label in ("happy", "surprise", "neutral", "angry"):
        paths = sorted((fer_root / "val" / label).glob("*.jpg"))[:40]
        chosen[label] = next(str(p) for p, (got, conf) in zip(paths, _crop_labels(paths))
                             if got == label and conf >= 0.7)
    return chosen


def _people(faces: dict[str, str]) -> list[Person]:
    """Three people: one whose expression changes at 4 s, one who crosses the frame between 2 s
    and 6 s, one who appears at 5 s (a cut)."""
    return [
        Person([faces["happy"], faces["surprise"]], [0.0, 4.0], 0.0, 8.0, (40, 60), (300, 80)),
        Person([faces["neutral"]], [2.0], 2.0, 6.0, (500, 220), (260, 200), side=110),
        Person([faces["angry"]], [5.0], 5.0, 8.0, (480, 30), (470, 40), side=100),
    ]


# --------------------------------------------------------------------------------------------
# Decoding


@pytest.fixture(scope="module")
def clip(tmp_path_factory, clear_faces) -> Path:
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    make_video(path, _people(clear_faces), duration_s=8.0, fps=10, gop=25)
    return path


def test_frames_are_sampled_by_timestamp(clip):
    info = probe(str(clip))
    assert info.duration_s == pytest.approx(8.0) and info.fps == 10 and (info.width, info.height) == (640, 360)
    frames = list(decode_frames(str(clip), fps=FPS))
    assert [f.index for f in frames] == list(range(0, 80, 5))
    assert [f.time_s for f in frames] == pytest.approx([i / FPS for i in range(16)])
    assert frames[0].detect.shape == (360, 640, 3) and frames[0].gray.shape == (360, 640)
    small = list(decode_frames(str(clip), fps=FPS, detect_size=320))[0]
    assert small.detect.shape == (180, 320, 3) and small.gray.shape == (360, 640)  # gray: 3x the detect size, capped
    assert len(list(decode_frames(str(clip), fps=0))) == 80  # every frame
    assert [f.index for f in decode_frames(str(clip), fps=0.5)] == [0, 20, 40, 60]


@pytest.mark.parametrize("segment_s", [1.0, 2.5, 3.0])
def test_segments_give_the_frames_one_pass_gives(clip, segment_s):
    whole = [f.index for f in decode_frames(str(clip), fps=FPS)]
    parts = segments(probe(str(clip)).duration_s, segment_s)
    assert parts[0][0] == 0 and math.isinf(parts[-1][1]) and len(parts) == math.ceil(8.0 / segment_s)
    cut = [f.index for start, end in parts for f in decode_frames(str(clip), start_s=start, end_s=end, fps=FPS)]
    assert cut == whole


@pytest.fixture(scope="module")
def hevc_clip(tmp_path_factory, clear_faces) -> Path:
    path = tmp_path_factory.mktemp("hevc") / "clip.mkv"
    make_video(path, _people(clear_faces)[:2], duration_s=4.0, codec="hevc", seed=3)
    return path


@pytest.mark.parametrize("video", ["walking", "hevc"])
@pytest.mark.parametrize("fps, start_s, end_s", [(2.0, 0.0, math.inf), (7.3, 0.0, math.inf), (2.0, 1.0, 3.0)])
def test_frames_skipped_between_samples_change_no_sampled_frame(fer_root, hevc_clip, video, fps, start_s, end_s):
    """walking.mp4 is H.264 High with B-frames, the generated clip HEVC with B-frames: between
    samples their non-reference frames are not decoded (decode._decoded). The sampled frames must
    be the very frames, pixel for pixel, that decoding every frame (fps 0, where nothing is
    skipped) gives at the sample times, from the start and from a segment's start."""
    path = str(fer_root.parent / "videos" / "walking.mp4") if video == "walking" else str(hevc_clip)
    every = [f for f in decode_frames(path, fps=0) if start_s - 0.02 <= f.time_s < end_s - 0.02]
    sampled = list(decode_frames(path, fps=fps, start_s=start_s, end_s=end_s))
    tol = 0.5 / probe(path).fps
    expected, k = [], math.ceil(start_s * fps - 1e-9)
    for f in every:  # the first frame at or after each sample time, as decode_frames defines it
        if f.time_s >= k / fps - tol:
            expected.append(f)
            k = math.floor((f.time_s + tol) * fps) + 1
    assert len(sampled) == len(expected) >= 3
    for got, want in zip(sampled, expected):
        assert (got.index, got.time_s) == (want.index, want.time_s)
        assert np.array_equal(got.gray, want.gray) and np.array_equal(got.detect, want.detect)


def test_unreadable_videos_say_why(tmp_path, clip):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(VideoError, match="cannot open video") as e:
        list(decode_frames(str(junk)))
    assert e.value.at_s is None
    with pytest.raises(FileNotFoundError):
        probe(str(tmp_path / "missing.mp4"))


def test_a_video_cut_off_keeps_its_frames_before_the_break(tmp_path, clear_faces):
    full = tmp_path / "full.mp4"
    make_video(full, _people(clear_faces)[:1], duration_s=8.0, faststart=True)  # the index first: readable when cut
    data = full.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) * 6 // 10])
    got = []
    with pytest.raises(VideoError, match=r"(broke after|breaks off at) \d+\.\d\d s") as e:
        for frame in decode_frames(str(cut), fps=FPS):
            got.append(frame.time_s)
    assert 2.0 <= len(got) / FPS < 8.0 and e.value.at_s == pytest.approx(got[-1], abs=0.6)


# --------------------------------------------------------------------------------------------
# Tracks


def test_tracks_follow_people_who_cross_and_come_and_go():
    rng = np.random.default_rng(1)
    times, boxes, truth = [], [], []
    for k in range(40):  # 20 s at 2 fps
        t = k / FPS
        for who, (x0, x1, y, on, off) in enumerate([(0, 600, 100, 0, 20), (600, 0, 140, 0, 20), (300, 300, 400, 5, 12)]):
            if on <= t < off:
                x = x0 + (x1 - x0) * t / 20 + rng.normal(0, 3)
                times.append(t)
                boxes.append([x, y + rng.normal(0, 3), 100, 100])
                truth.append(who)
    times, boxes = np.array(times), np.array(boxes)
    points = np.repeat(boxes[:, None, :2] + 50, 5, axis=1).reshape(-1, 10)  # landmarks at the centre
    tracks = assign_tracks(times, boxes, points)
    assert len(set(tracks)) == 3
    assert identity_switches(np.array(truth), tracks, times) == 0
    # a person who is gone longer than the gap starts a new track when back
    late = np.concatenate([times, [30.0]])
    again = assign_tracks(late, np.vstack([boxes, [[300, 400, 100, 100]]]), np.vstack([points, points[:1]]))
    assert again[-1] == 3


# --------------------------------------------------------------------------------------------
# ray-fer infer over videos


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory, fer_root, photos_root, clear_faces) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("videos")
    people = _people(clear_faces)
    truth = {
        "people.mp4": make_video(root / "people.mp4", people, duration_s=8.0, codec="h264"),
        "sub/people-hevc.mkv": None,
        "people-vp9.webm": make_video(root / "people-vp9.webm", people[:2], duration_s=6.0, codec="vp9", seed=2),
    }
    (root / "sub").mkdir()
    truth["sub/people-hevc.mkv"] = make_video(root / "sub" / "people-hevc.mkv", people, duration_s=8.0,
                                             codec="hevc", seed=1)
    make_video(root / "nobody.mp4", [], duration_s=3.0)
    (root / "junk.mov").write_bytes(np.random.default_rng(0).bytes(5000))
    full = root.parent / "full.mp4"
    make_video(full, people[:1], duration_s=8.0, faststart=True)
    data = full.read_bytes()
    (root / "cut.mp4").write_bytes(data[: len(data) * 6 // 10])
    (root / "walking.mp4").symlink_to(fer_root.parent / "videos" / "walking.mp4")
    photo = sorted(p for p in photos_root.iterdir() if p.suffix.lower() == ".jpg")[0]
    (root / photo.name).symlink_to(photo)
    return root, truth


@pytest.fixture(scope="module")
def labelled(video_folder, tmp_path_factory, ray_local):
    from ray_fer.config import InferConfig
    from ray_fer.label.infer import label_images

    root, _ = video_folder
    out = tmp_path_factory.mktemp("video-out") / "labels"
    summary = label_images(InferConfig(input=str(root), output=str(out), segment_s=3.0))
    return summary, pq.read_table(out).to_pylist(), out


def _rows(rows: list[dict], name: str) -> list[dict]:
    return [r for r in rows if r["path"].endswith("/" + name)]


@pytest.mark.integration
def test_synthetic_videos_give_their_faces_tracks_and_labels(labelled, video_folder, clear_faces):
    summary, rows, _ = labelled
    _, truth = video_folder
    crop_label = dict(zip(clear_faces.values(), (label for label, _ in _crop_labels([Path(f) for f in clear_faces.values()]))))

    found = total = agree = labelled_faces = switches = face_frames = 0
    for name, gt in truth.items():
        got = _rows(rows, name.split("/")[-1])
        assert got and all(r["error"] is None for r in got), name
        assert sorted(r["face"] for r in got) == list(range(len(got)))  # numbered over the video
        sampled = [g for g in gt if math.isclose(g.time_s * FPS, round(g.time_s * FPS))]
        ids, tracks, times = [], [], []
        for g in sampled:
            here = [r for r in got if r["time_s"] == pytest.approx(g.time_s)]
            total += 1
            if not here:
                continue
            boxes = np.array([[r["box_x"], r["box_y"], r["box_w"], r["box_h"]] for r in here])
            overlap = iou(np.array([g.box], float), boxes)[0]
            best = int(overlap.argmax())
            if overlap[best] >= 0.5:
                found += 1
                row = here[best]
                assert row["frame"] == round(g.time_s * 10)
                ids.append(g.person), tracks.append(row["track"]), times.append(g.time_s)
                labelled_faces += 1
                agree += row["label"] == crop_label[g.face]
        switches += identity_switches(np.array(ids), np.array(tracks), np.array(times))
        face_frames += len(ids)
        assert len({r["track"] for r in got}) >= 2
    print(f"faces found {found}/{total}, identity switches {switches}/{face_frames}, labels agreeing {agree}/{labelled_faces}")
    assert found / total >= 0.95, (found, total)
    assert switches / face_frames <= 0.02, (switches, face_frames)
    assert agree / labelled_faces >= 0.90, (agree, labelled_faces)


@pytest.mark.integration
def test_every_video_gets_a_row_and_broken_ones_say_where(labelled, video_folder):
    summary, rows, _ = labelled
    assert summary["images"] == 8 and summary["errors"] == 2  # junk.mov, cut.mp4
    assert summary["videos"] == 7 and summary["no_face"] == 1  # all but the photo; nobody.mp4
    nobody = _rows(rows, "nobody.mp4")
    assert len(nobody) == 1 and nobody[0]["error"] is None and nobody[0]["label"] is None
    assert nobody[0]["face"] is None and nobody[0]["frame"] is None and nobody[0]["time_s"] is None
    junk = _rows(rows, "junk.mov")
    assert len(junk) == 1 and junk[0]["error"].startswith("cannot open video") and junk[0]["time_s"] is None
    cut = _rows(rows, "cut.mp4")
    broken = [r for r in cut if r["error"] is not None]
    assert len(broken) == 1 and "s" in broken[0]["error"] and broken[0]["face"] == len(cut) - 1
    before = [r for r in cut if r["error"] is None]
    assert len(before) >= 4 and all(r["time_s"] < broken[0]["time_s"] + 0.6 for r in before)
    photo = [r for r in rows if r["path"].endswith(".jpg")]
    assert photo and all(r["frame"] is None and r["track"] is None for r in photo)


@pytest.mark.integration
def test_the_clusters_track_pass_gives_the_rows_the_drivers_gives(labelled, video_folder, tmp_path, monkeypatch):
    """A run's few videos are tracked in the driver (`videos._track_here`, as in `labelled`); a
    bigger pass goes through a Ray Data groupby over the cluster. With the threshold at 0 these
    videos take the cluster's path: every row must be the same (segments of 3 s, as `labelled`)."""
    from ray_fer.config import InferConfig
    from ray_fer.label import videos
    from ray_fer.label.infer import label_images

    root, _ = video_folder
    names = ["people.mp4", "nobody.mp4", "cut.mp4"]  # faces over segments, no face, a break
    for name in names:
        (tmp_path / "in").mkdir(exist_ok=True)
        (tmp_path / "in" / name).symlink_to(root / name)
    monkeypatch.setattr(videos, "TRACK_HERE_BYTES", 0)
    label_images(InferConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), segment_s=3.0))
    keys = ("frame", "time_s", "face", "track", "box_x", "box_y", "label", "confidence", "error")

    def table(rows: list[dict]) -> list[tuple]:
        picked = [(r["path"].rsplit("/", 1)[-1], *(r[k] for k in keys)) for r in rows
                  if r["path"].rsplit("/", 1)[-1] in names]
        return sorted(picked, key=lambda row: [(v is None, 0 if v is None else v) for v in row])

    cluster = table(pq.read_table(tmp_path / "out").to_pylist())
    driver = table(labelled[1])
    assert len(cluster) == len(driver) >= 20 and cluster == driver


@pytest.mark.integration
def test_walking_gives_faces_in_most_frames_and_several_tracks(labelled):
    _, rows, _ = labelled
    walking = _rows(rows, "walking.mp4")
    times = {r["time_s"] for r in walking if r["label"] is not None}
    assert len(times) >= 0.6 * math.ceil(4.2 * FPS), sorted(times)
    assert len({r["track"] for r in walking}) >= 2
    assert all(r["width"] == 1920 and r["height"] == 1080 for r in walking)


@pytest.mark.integration
def test_report_gives_each_track_its_emotions_and_a_timeline(labelled, tmp_path, capsys):
    from conftest import _png_size
    from ray_fer.label.videos import report_videos

    _, rows, out = labelled
    result = report_videos(str(out), str(tmp_path / "tracks"))
    printed = capsys.readouterr().out
    tracks = pq.read_table(result["tracks_parquet"]).to_pylist()
    assert result["tracks"] == len(tracks) == len({(r["path"], r["track"]) for r in rows if r["track"] is not None})
    for t in tracks:  # shares are the track's rows' labels
        mine = [r for r in rows if r["path"] == t["path"] and r["track"] == t["track"]]
        assert t["faces"] == len(mine)
        assert t[f"share_{t['dominant']}"] == max(t[f"share_{c}"] for c in CLASSES)
        assert sum(t[f"share_{c}"] for c in CLASSES) == pytest.approx(1.0)
        assert t["first_s"] == min(r["time_s"] for r in mine) and t["last_s"] == max(r["time_s"] for r in mine)
    # people.mp4's first person shows one face for 4 s, another for the next 4 s: half and half
    first = next(t for t in tracks if t["path"].endswith("/people.mp4") and t["first_s"] == 0.0)
    assert 15 <= first["faces"] <= 16
    top = sorted(first[f"share_{c}"] for c in CLASSES)[-2:]
    assert sum(top) >= 0.9 and min(top) >= 0.35
    assert "people.mp4 track" in printed and "mostly" in printed
    assert (tmp_path / "tracks" / "tracks.csv").read_text().startswith("\"path\",\"track\"")
    w, h = _png_size((tmp_path / "tracks" / "timelines" / "people.png").read_bytes())
    assert w >= 800 and h >= 300


def test_predict_tracks_a_clip_and_draws_its_faces(clip, tmp_path):
    import av

    from ray_fer.label.predict import format_predictions, predict_files

    result = predict_files("fer-photos", [str(clip)], annotate=str(tmp_path / "annotated"))
    rows = [r for r in result["predictions"] if r.get("track") is not None]
    assert {r["time_s"] for r in rows} == {k / FPS for k in range(16)}  # the first person is on screen throughout
    assert len({r["track"] for r in rows}) == 3 and len(result["tracks"]) == 3
    assert "track 0:" in format_predictions(result)
    out = tmp_path / "annotated" / "clip.mp4"
    assert result["annotated"] == [str(out)]
    with av.open(str(out)) as annotated, av.open(str(clip)) as source:
        drawn = [f.to_ndarray(format="rgb24").astype(int) for f in annotated.decode(annotated.streams.video[0])]
        plain = [f.to_ndarray(format="rgb24").astype(int) for i, f in enumerate(source.decode(source.streams.video[0]))
                 if i % 5 == 0]
    assert len(drawn) == len(plain) == 16
    for k in (0, 7, 15):  # each face's box is drawn on its frame: the box's edge changed, the frame's far corner did not
        for r in (r for r in rows if r["time_s"] == k / FPS):
            x, y, w, h = (round(v) for v in r["box"])
            edge = max(np.abs(drawn[k][row, x + 2:x + w - 2] - plain[k][row, x + 2:x + w - 2]).mean()
                       for row in range(y + h - 2, min(y + h + 2, 360)))
            assert edge > 15, (k, r["box"], edge)  # a mean over the edge: grey (neutral) on a grey backdrop is ~25
        assert np.abs(drawn[k][-20:, :20] - plain[k][-20:, :20]).mean() < 8


@pytest.mark.integration
def test_each_segment_of_a_video_is_a_decode_task_of_its_own(clip, video_folder, ray_local):
    """Ray Data joins the small tables a task yields into blocks of DataContext.target_max_block_size
    bytes; a segment's row must stay a block of its own, or one decode task decodes them all in turn."""
    import pyarrow as pa
    import ray.data

    from ray_fer.label.inputs import blocks_of
    from ray_fer.label.videos import expand_videos

    root, _ = video_folder
    photo = next(p for p in root.iterdir() if p.suffix.lower() == ".jpg")
    paths = [str(clip), str(photo), str(root / "people.mp4"), str(photo)]  # 8 s each: 3 segments of 3 s

    def rows_per_block(block: pa.Table) -> pa.Table:  # what each decode task would be given
        return pa.table({"rows": [block.num_rows], "videos": [int(np.isfinite(block["video_start"].to_numpy()).sum())]})

    with blocks_of(2048):  # as a listing's blocks are made: one block of the four paths
        ds = ray.data.from_arrow(pa.table({"path": paths}))
    seen = (ds.map_batches(expand_videos, fn_kwargs={"segment_s": 3.0}, batch_size=None, batch_format="pyarrow",
                           num_cpus=0.2)
            .map_batches(rows_per_block, batch_size=None, batch_format="pyarrow", num_cpus=0.25).take_all())
    assert sorted((r["rows"], r["videos"]) for r in seen) == [(1, 1)] * 6 + [(2, 0)], seen


@pytest.mark.integration
def test_no_decode_task_runs_in_the_worker_that_imported_torch_to_open_the_model(ray_local, tmp_path, monkeypatch):
    """open_model's task imports torch (~260 MB) in its worker; Ray hands an idle worker any task
    of the job, so unless that worker exits, decode tasks ran in it and their memory measured 2.5x
    on a 30-minute video what it was on a 1-minute one (docs/labelling.md#figures)."""
    import os
    import sys
    import time

    from ray_fer.label.pipeline import open_model
    from ray_fer.model_ref import CACHE_ENV, OPEN_CPUS, ModelFile

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))  # a bundle never opened here: its task runs

    @ray_local.remote(num_cpus=OPEN_CPUS)
    def has_torch() -> tuple[int, bool]:
        time.sleep(0.3)  # held a moment, so that the tasks spread over every idle worker
        return os.getpid(), "torch" in sys.modules

    def with_torch() -> set[int]:  # the workers that hold torch now (the session's other tests may leave some)
        seen = ray_local.get([has_torch.remote() for _ in range(16)])
        assert len({pid for pid, _ in seen}) > 1
        return {pid for pid, torch_in in seen if torch_in}

    before = with_torch()
    model = open_model(ModelFile.read("fer-photos"))
    assert model.classes == tuple(CLASSES)
    assert with_torch() <= before
