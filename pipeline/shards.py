"""The shard row format (one row per clip) and its encoders/decoders, shared by preprocessing, training,
generation and scoring.

Columns: `clip_id`, `crops` (list of JPEG bytes, one per 25 fps frame), `landmarks` (float32 (T,468,2)
in crop pixels, as bytes), `pcm` (int16 16 kHz mono, bytes), `mel` (float32 (80, M), bytes), `n_frames`,
`mel_frames`, `crop_size`, `fps`, plus the clip's metadata columns (language, speaker, offsets, ...).
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from pipeline.landmarks import N_LANDMARKS

JPEG_QUALITY = 95


def encode_jpegs(crops: np.ndarray, quality: int = JPEG_QUALITY) -> list[bytes]:
    """RGB (T,S,S,3) uint8 → JPEG bytes per frame."""
    params = [cv2.IMWRITE_JPEG_QUALITY, quality]
    out = []
    for frame in crops:
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), params)
        if not ok:
            raise ValueError("JPEG encoding failed")
        out.append(buf.tobytes())
    return out


def decode_jpegs(jpegs: list[bytes] | np.ndarray, start: int = 0, stop: int | None = None) -> np.ndarray:
    """JPEG bytes → RGB (T,S,S,3) uint8 (only frames start:stop are decoded)."""
    frames = [
        cv2.cvtColor(cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        for b in list(jpegs)[start:stop]
    ]
    return np.stack(frames) if frames else np.zeros((0, 0, 0, 3), np.uint8)


def encode_row(
    clip_id: str,
    crops: np.ndarray,
    landmarks: np.ndarray,
    pcm: np.ndarray,
    mel: np.ndarray,
    fps: float,
    metadata: dict[str, Any],
) -> dict[str, Any]:
    """One shard row: arrays as bytes, metadata as plain columns."""
    pcm16 = np.clip(np.round(np.asarray(pcm, np.float32) * 32767), -32768, 32767).astype("<i2")
    return {
        "clip_id": clip_id,
        "crops": encode_jpegs(crops),
        "landmarks": np.asarray(landmarks[..., :2], "<f4").tobytes(),
        "pcm": pcm16.tobytes(),
        "mel": np.asarray(mel, "<f4").tobytes(),
        "n_frames": int(len(crops)),
        "mel_frames": int(mel.shape[1]),
        "crop_size": int(crops.shape[1]),
        "fps": float(fps),
        **metadata,
    }


def decode_landmarks(row: dict[str, Any]) -> np.ndarray:
    """(T,468,2) float32 landmarks in crop pixels."""
    return np.frombuffer(row["landmarks"], "<f4").reshape(int(row["n_frames"]), N_LANDMARKS, 2)


def decode_pcm(row: dict[str, Any]) -> np.ndarray:
    """16 kHz mono float32 PCM in [-1, 1]."""
    return np.frombuffer(row["pcm"], "<i2").astype(np.float32) / 32767.0


def decode_mel(row: dict[str, Any]) -> np.ndarray:
    """(80, M) float32 Wav2Lip mel."""
    return np.frombuffer(row["mel"], "<f4").reshape(80, int(row["mel_frames"]))


def decode_crops(row: dict[str, Any], start: int = 0, stop: int | None = None) -> np.ndarray:
    """RGB crops (T,S,S,3) of a shard row (or frames start:stop)."""
    return decode_jpegs(row["crops"], start, stop)
