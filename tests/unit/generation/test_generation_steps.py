"""`lipsync generate` with a random-weight checkpoint on generated clips, plus its post-processing parts.

One generation run (module fixture, through the CLI) covers: a 25 fps clip with longer mp3 audio
(ping-pong extension), a 30 fps clip with shorter 8 kHz audio (trim), a 720x1280 portrait clip whose
face is hidden by a black box for some frames, and three pairs that must fail with reasons."""

from __future__ import annotations

import gc
import os
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
from support.generation import psnr
from support.tools import ffmpeg_cli

from core.config import load_config
from core.errors import BadInput
from generation.blend import (
    MOUTH_POINTS,
    BlendConfig,
    blend_i420,
    color_match,
    i420_to_rgb,
    mask_support,
    mouth_mask,
    paste_mouth,
    skin_weights,
)
from generation.calibration import (
    Calibration,
    calibration_from_offsets,
    load_calibration,
    save_calibration,
)
from generation.config import GenerateConfig, PostprocessConfig
from generation.config import validate as validate_generate
from generation.correction import correct_offset
from generation.extension import reference_positions, source_indices
from generation.pairs import read_pairs
from pipeline.media import MediaError, iter_frames, probe
from pipeline.media.decoding import (
    SEEKABLE_FORMATS,
    FrameRangeReader,
    container_format,
    read_frame_range,
    remux_video,
)
from pipeline.media.encoding import mux_output, write_i420
from pipeline.offset import OffsetEstimate


def test_source_indices_pingpong_loop_freeze() -> None:
    assert source_indices(0, 10, 4).tolist() == [0, 1, 2, 3, 2, 1, 0, 1, 2, 3]
    assert source_indices(3, 4, 4, "loop").tolist() == [3, 0, 1, 2]
    assert source_indices(2, 4, 4, "freeze").tolist() == [2, 3, 3, 3]
    assert source_indices(0, 3, 1).tolist() == [0, 0, 0]
    with pytest.raises(ValueError):
        source_indices(0, 3, 4, "bounce")


def test_a_shifted_reference_is_another_frame_of_the_same_shot() -> None:
    """The generator's reference is never the frame it paints (in training it never is either), comes from
    the same shot, and moves on with the frames (no jumps but one wrap per run)."""
    frames = np.arange(100, 125)  # source frames of a chunk's face crops; a shot starts at 112
    same = reference_positions(frames, [0, 112], "same")
    assert same.tolist() == list(range(len(frames)))
    shifted = reference_positions(frames, [0, 112], "shifted")
    assert (shifted != same).all()
    shot = frames >= 112
    assert (shot[shifted] == shot).all()  # nothing crosses the cut
    for run in (np.flatnonzero(~shot), np.flatnonzero(shot)):
        gaps = np.abs(frames[shifted[run]] - frames[run])
        assert gaps.min() >= len(run) // 2 and (np.diff(shifted[run]) != 1).sum() == 1
    assert reference_positions(np.array([7]), [], "shifted").tolist() == [0]  # alone in its shot: itself
    pingpong = source_indices(0, 12, 5)  # 0 1 2 3 4 3 2 1 0 1 2 3
    assert (reference_positions(pingpong, [0], "shifted") != np.arange(12)).all()


@pytest.fixture(scope="module")
def lavfi_clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ranges")
    clips = {}
    for name, rate, ext in (("v25", 25, "mp4"), ("v30", 30, "mp4"), ("ts", 25, "ts")):
        clips[name] = d / f"{name}.{ext}"
        ffmpeg_cli(
            "-f",
            "lavfi",
            "-i",
            f"testsrc2=size=96x64:rate={rate}",
            "-t",
            "3",
            "-c:v",
            "libx264",
            "-pix_fmt",
            "yuv420p",
            str(clips[name]),
        )
    return clips


@pytest.mark.parametrize("name", ["v25", "v30"])
def test_read_frame_range_equals_full_decode(lavfi_clips: dict[str, Path], name: str) -> None:
    path = str(lavfi_clips[name])
    fps = probe(path).fps
    full = np.concatenate(list(iter_frames(path, fps=fps)))
    for start in (0, 1, fps - 1, 2 * fps - 3, len(full) - 5):
        start = int(start)
        np.testing.assert_array_equal(read_frame_range(path, start, start + 5, fps), full[start : start + 5])
    yuv = read_frame_range(path, 10, 12, fps, pix_fmt="yuv420p")
    assert yuv.shape == (2, 64 * 3 // 2, 96)
    assert psnr(i420_to_rgb(yuv[0]), full[10]) > 35


@pytest.mark.parametrize("name", ["v25", "v30"])
def test_frame_range_reader_runs_on_between_consecutive_ranges(
    lavfi_clips: dict[str, Path], name: str
) -> None:
    """Consecutive ranges come from one ffmpeg; a jump back, another pixel format or the end restarts it;
    every range equals `read_frame_range`'s."""
    path = str(lavfi_clips[name])
    info = probe(path)
    fps = info.fps
    reader = FrameRangeReader()
    ranges = [(0, 10), (10, 27), (27, 40), (20, 30), (30, 33)]
    for i, (start, stop) in enumerate(ranges):
        got = reader.read(path, start, stop, fps, info, pix_fmt="yuv420p")
        np.testing.assert_array_equal(got, read_frame_range(path, start, stop, fps, pix_fmt="yuv420p"))
        assert reader.starts == (1 if i < 3 else 2), (start, stop)  # (20, 30) jumped back
    rgb = reader.read(path, 33, 35, fps, info, pix_fmt="rgb24")
    np.testing.assert_array_equal(rgb, read_frame_range(path, 33, 35, fps))
    assert reader.starts == 3
    n = len(np.concatenate(list(iter_frames(path, fps=fps))))
    with pytest.raises(MediaError) as err:
        reader.read(path, 35, n + 5, fps, info, pix_fmt="rgb24")
    assert err.value.reason == "truncated"
    np.testing.assert_array_equal(
        reader.read(path, n - 3, n, fps, info, pix_fmt="rgb24"), read_frame_range(path, n - 3, n, fps)
    )
    dropped = FrameRangeReader()
    dropped.read(path, 0, 2, fps, info, pix_fmt="rgb24")
    ffmpeg_pid = dropped._running[0].proc.pid  # the ffmpeg left running for the next range
    del dropped  # a reader dropped without close() (an actor's last pair) does not leave ffmpeg behind
    gc.collect()
    assert not Path(f"/proc/{ffmpeg_pid}").exists()


def test_mpegts_is_remuxed_to_a_seekable_container(lavfi_clips: dict[str, Path], tmp_path: Path) -> None:
    path = str(lavfi_clips["ts"])
    assert container_format(path) not in SEEKABLE_FORMATS
    remuxed = remux_video(path, probe(path), str(tmp_path / "v.mkv"))
    assert container_format(remuxed) in SEEKABLE_FORMATS
    full = np.concatenate(list(iter_frames(path, fps=25.0)))
    np.testing.assert_array_equal(read_frame_range(remuxed, 40, 45, 25.0), full[40:45])


def _mouth_points(size: int) -> np.ndarray:
    """MOUTH_POINTS-shaped points: a lip ellipse at 70 % height, nose at 55 %, chin at 90 %."""
    angles = np.linspace(0, 2 * np.pi, len(MOUTH_POINTS) - 2, endpoint=False)
    lips = np.stack([0.5 * size + 0.15 * size * np.cos(angles), 0.7 * size + 0.05 * size * np.sin(angles)], 1)
    return np.concatenate([lips, [[0.5 * size, 0.55 * size], [0.5 * size, 0.9 * size]]]).astype(np.float32)


def test_mouth_mask_is_feathered_inside_the_lower_half() -> None:
    mask = mouth_mask(_mouth_points(96), 96, BlendConfig())
    assert mask[:48].max() == 0.0 and mask.max() > 0.95
    assert mask[:, :3].max() == 0.0 and mask[:, -3:].max() == 0.0
    row = mask[int(0.7 * 96)]
    assert 0.0 < row[row > 0].min() < 0.2  # soft edge, no visible box


def test_jaw_region_reaches_below_the_chin_and_stays_in_the_lower_half() -> None:
    points = _mouth_points(96)
    points[-1, 1] = 0.8 * 96  # the chin, higher than the crop's bottom edge
    mouth, jaw = (mouth_mask(points, 96, BlendConfig(region=r)) for r in ("mouth", "jaw"))
    below_chin, cheek = (int(0.9 * 96), 48), (int(0.75 * 96), 14)
    assert mouth[below_chin] < 0.1 and jaw[below_chin] > 0.5  # the source's chin is replaced
    assert mouth[cheek] < 0.1 and jaw[cheek] > 0.5  # and its jaw line
    assert jaw[:48].max() == 0.0 and jaw[:, [0, -1]].max() < 0.05  # faded out at the crop's sides


def test_an_unknown_blend_region_or_reference_is_refused() -> None:
    cfg = replace(GenerateConfig(), blend=BlendConfig(region="face"))
    with pytest.raises(BadInput, match="blend.region"):
        validate_generate(cfg)
    with pytest.raises(BadInput, match="reference must be one of same, shifted"):
        validate_generate(replace(GenerateConfig(), reference="random"))


def test_blend_changes_only_masked_pixels_and_matches_colour() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(60, 200, (120, 160, 3), dtype=np.uint8)
    frame = cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420)
    original = frame.copy()
    box = np.array([40.0, 10.0, 136.0, 106.0])
    generated = np.full((96, 96, 3), (250, 20, 20), np.uint8)  # far off in colour
    mask = mouth_mask(_mouth_points(96), 96, BlendConfig())
    blend_i420(frame, generated, box, mask, BlendConfig())
    y_changed = frame[:120] != original[:120]
    assert y_changed.any()
    assert not y_changed[:58].any() and not y_changed[:, :40].any() and not y_changed[:, 138:].any()
    after = i420_to_rgb(frame)[75:95, 75:100].astype(float).mean(axis=(0, 1))
    assert np.abs(after - rgb[75:95, 75:100].mean(axis=(0, 1))).max() < 30  # colour-matched, not red


def test_colour_match_reads_the_skin_so_an_open_mouth_stays_dark() -> None:
    """The source frame's mouth is closed, the generated one open: matched on the skin around the mouth,
    the generated skin takes the source's tone and its mouth stays dark (whole-mask statistics brightened
    it towards the source's closed mouth)."""
    size = 96
    points = _mouth_points(size)
    skin_ref, skin_gen = (185, 140, 120), (150, 110, 95)
    reference = np.full((size, size, 3), skin_ref, np.uint8)
    cv2.line(reference, (36, 67), (60, 67), (60, 30, 30), 1)  # closed lips
    generated = np.full((size, size, 3), skin_gen, np.uint8)
    cv2.ellipse(generated, (48, 69), (12, 8), 0, 0, 360, (40, 20, 20), -1)  # an open mouth
    inside = np.zeros((size, size), np.uint8)
    cv2.ellipse(inside, (48, 69), (9, 5), 0, 0, 360, 1, -1)
    mask = mouth_mask(points, size, BlendConfig(region="jaw"))
    matched = color_match(generated, reference, mask, 1.5, skin_weights(mask, points))
    cheek = matched[58:62, 12:20].reshape(-1, 3).mean(axis=0)
    assert np.abs(cheek - skin_ref).max() < 4  # the skin matched
    assert matched[inside.astype(bool)].mean() < 70  # the mouth still open: dark (generated: 27)


def test_a_little_skin_is_still_what_the_colour_match_reads() -> None:
    """A strip of skin a few per cent of the mask (real faces leave 26 pixels and up) still sets the tone:
    switching to whole-mask statistics on frames with little skin would make the colour flicker."""
    skin_ref, skin_gen = np.array([185, 140, 120]), np.array([150, 110, 95])
    reference = np.full((96, 96, 3), skin_ref, np.uint8)
    generated = np.full((96, 96, 3), skin_gen, np.uint8)
    generated[60:90, 20:76] = (40, 20, 20)  # an open mouth filling most of the mask
    mask = np.zeros((96, 96), np.float32)
    mask[56:92, 16:80] = 1.0
    skin = np.zeros_like(mask)
    skin[56:58, 16:28] = 1.0  # 24 pixels: about 1 % of the mask
    matched = color_match(generated, reference, mask, 1.5, skin)
    assert np.abs(matched[56:58, 16:28].reshape(-1, 3).mean(axis=0) - skin_ref).max() < 4


def _reinhard_over_whole_crop(generated: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The colour match written plainly: LAB mean/std under the mask, every pixel of the crop moved."""
    lab_g = cv2.cvtColor(generated.astype(np.float32) / 255, cv2.COLOR_RGB2LAB)
    lab_r = cv2.cvtColor(reference.astype(np.float32) / 255, cv2.COLOR_RGB2LAB)
    w = mask.astype(np.float64)[..., None] / mask.sum()
    stats = [
        ((lab * w).sum((0, 1)), np.sqrt((np.square(lab - (lab * w).sum((0, 1))) * w).sum((0, 1))) + 1e-3)
        for lab in (lab_g.astype(np.float64), lab_r.astype(np.float64))
    ]
    (mean_g, std_g), (mean_r, std_r) = stats
    gain = np.clip(std_r / std_g, 1 / 1.5, 1.5)
    rgb = cv2.cvtColor(((lab_g - mean_g) * gain + mean_r).astype(np.float32), cv2.COLOR_LAB2RGB)
    return np.clip(rgb * 255 + 0.5, 0, 255).astype(np.uint8)


def test_colour_match_on_the_mask_support_pastes_as_over_the_whole_crop() -> None:
    """Converting only the mask's support (plus the warp's one-pixel reach) matches the whole crop's colour
    match there, and the pixels left unconverted outside it cannot reach the pasted frame."""
    rng = np.random.default_rng(3)
    generated = cv2.GaussianBlur(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8), (0, 0), 2)
    reference = cv2.GaussianBlur(rng.integers(40, 220, (96, 96, 3), dtype=np.uint8), (0, 0), 2)
    hard_edged = np.zeros((96, 96), np.float32)
    hard_edged[60:80, 30:70] = 1.0  # no feather: a leak at the support's edge would show at full weight
    for mask in (mouth_mask(_mouth_points(96), 96, BlendConfig()), hard_edged):
        matched = color_match(generated, reference, mask, 1.5)
        rows, cols = mask_support(mask)
        outside = np.ones(mask.shape, bool)
        outside[rows, cols] = False
        assert outside.any() and (matched[outside] == generated[outside]).all()
        whole = _reinhard_over_whole_crop(generated, reference, mask)
        assert np.abs(matched[rows, cols].astype(int) - whole[rows, cols]).max() <= 1
        inverted_outside = np.where(outside[..., None], 255 - generated, matched)
        for box in ([40.0, 10.0, 136.0, 106.0], [33.3, 7.6, 180.9, 155.2], [52.5, 20.2, 110.7, 78.4]):
            pasted = [np.full((200, 220, 3), 128, np.uint8) for _ in range(2)]
            paste_mouth(pasted[0], matched, np.array(box), mask)
            paste_mouth(pasted[1], inverted_outside, np.array(box), mask)
            assert (pasted[0] != 128).any(), box
            np.testing.assert_array_equal(pasted[0], pasted[1], err_msg=f"outside the support leaks: {box}")


def _reading(offset: int, confident: bool = True) -> OffsetEstimate:
    return OffsetEstimate(offset, 5.0 if confident else 1.0, reason="" if confident else "low_confidence")


def test_offset_correction_is_applied_only_when_confident_and_toward_zero() -> None:
    """The decision: shift by the confident reading; never on an abstention, a short output, or when the
    re-measured offset would not be closer to 0 than before."""
    cfg = PostprocessConfig(min_seconds=4.0)

    def meter(true_offset: int, confident: bool = True):  # noqa: ANN202 - reads true_offset - shift
        return lambda shift: _reading(true_offset - shift, confident)

    fix = correct_offset(meter(4), 250, 25.0, cfg)
    assert (fix.before.offset_frames, fix.shift_frames, fix.after.offset_frames) == (4, 4, 0)
    assert correct_offset(meter(4, confident=False), 250, 25.0, cfg).shift_frames == 0
    assert correct_offset(meter(4), 50, 25.0, cfg).shift_frames == 0  # 2 s < min_seconds
    assert correct_offset(meter(1), 250, 25.0, cfg).shift_frames == 0  # below min_abs_offset
    assert correct_offset(meter(12), 250, 25.0, cfg).shift_frames == 0  # beyond max_abs_offset
    unfixed = correct_offset(meter(4), 250, 25.0, replace(cfg, correct_offset=False))
    assert unfixed.shift_frames == 0 and unfixed.after == unfixed.before
    worse = correct_offset(lambda shift: _reading(5 if shift else 4), 250, 25.0, cfg)
    assert worse.shift_frames == 0 and worse.after.offset_frames == 5


@pytest.mark.parametrize("stabilise", ["off", "deshake", "auto"])
def test_mux_joins_parts_with_audio_at_exact_length(tmp_path: Path, stabilise: str) -> None:
    rng = np.random.default_rng(0)
    frames = np.stack(
        [cv2.cvtColor(f, cv2.COLOR_RGB2YUV_I420) for f in rng.integers(0, 255, (23, 64, 96, 3), np.uint8)]
    )
    spans = [(0, 2), (2, 12), (12, 23)]  # a 2-frame chunk too: chunks of any length join on the frame grid
    parts = [
        write_i420(str(tmp_path / f"{a}.mp4"), frames[a:b], 30.0, crf=16, preset="veryfast") for a, b in spans
    ]
    ffmpeg_cli(
        "-f", "lavfi", "-i", "sine=frequency=200:sample_rate=48000", "-t", "2", str(tmp_path / "a.wav")
    )
    out = mux_output(
        parts,
        [b - a for a, b in spans],
        str(tmp_path / "a.wav"),
        30.0,
        str(tmp_path / "out.mp4"),
        crf=16,
        preset="veryfast",
        audio_bitrate="192k",
        stabilise=stabilise,
        advance_seconds=0.1,
    )
    info = probe(out)
    assert (info.fps, info.n_frames, info.width, info.height) == (30.0, 23, 96, 64)
    assert abs(info.duration_s - 23 / 30) < 1 / 30


def test_read_pairs_resolves_paths_and_ids(tmp_path: Path) -> None:
    (tmp_path / "p.jsonl").write_text(
        '{"video": "a/v.mp4", "audio": "s.wav", "language": "es", "transcript": "Hola", "timeline": "t.json",'
        ' "system": "mine"}\n{"video": "/abs/w.mp4", "id": "x y"}\n'
    )
    pairs = read_pairs(str(tmp_path / "p.jsonl"))
    assert pairs[0]["video"] == str(tmp_path / "a/v.mp4") and pairs[0]["audio"] == str(tmp_path / "s.wav")
    assert pairs[0]["id"].startswith("v-") and pairs[0]["language"] == "es"
    assert (pairs[0]["transcript"], pairs[0]["system"]) == ("Hola", "mine")
    assert pairs[0]["timeline"] == str(tmp_path / "t.json")
    empty = {"speaker": "", "system": "", "transcript": "", "timeline": ""}
    assert pairs[1] == {"id": "x_y", "video": "/abs/w.mp4", "audio": "", "language": "und"} | empty
    (tmp_path / "dup.csv").write_text("video,id\na.mp4,x\nb.mp4,x\n")
    with pytest.raises(BadInput, match="duplicate"):
        read_pairs(str(tmp_path / "dup.csv"))
    with pytest.raises(BadInput, match="does not exist"):
        read_pairs(str(tmp_path / "none.csv"))


def test_calibration_round_trip_lookup_and_sign(tmp_path: Path) -> None:
    cal = Calibration(
        languages={"en": {"offset_frames": 1}},
        speakers={"s1": {"offset_frames": -2}},
        default_offset_frames=0,
    )
    uri = save_calibration(str(tmp_path / "c.json"), cal)
    loaded = load_calibration(uri)
    assert (
        loaded.offset_for("en-US") == 1
        and loaded.offset_for("en", "s1") == -2
        and loaded.offset_for("fr") == 0
    )
    fitted = calibration_from_offsets({"en": [2, 2, 3]}, used=loaded)
    assert fitted.offset_for("en") == 1 - 2 and fitted.languages["en"]["clips"] == 3
    (tmp_path / "bad.json").write_text('{"languages": {"en": {"offset_frames": "one"}}}')
    with pytest.raises(BadInput, match="offset_frames"):
        load_calibration(str(tmp_path / "bad.json"))
    assert load_calibration(None).offset_for("en") == 0


def test_cpu_threads_split_the_node_among_the_actors(monkeypatch: pytest.MonkeyPatch) -> None:
    from generation.config import ModelConfig
    from generation.infer import cpu_threads

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert cpu_threads(ModelConfig(actors=1)) == 8
    assert cpu_threads(ModelConfig(actors=2)) == 4
    assert cpu_threads(ModelConfig(actors=16)) == 1
    assert cpu_threads(ModelConfig(actors=2, threads=3)) == 3


def test_configs_generate_yaml_lists_the_defaults() -> None:
    path = Path(__file__).resolve().parents[3] / "configs" / "generate.yaml"
    assert load_config(GenerateConfig, path) == GenerateConfig()
