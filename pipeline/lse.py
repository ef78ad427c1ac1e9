"""LSE-D / LSE-C: the SyncNet evaluation protocol (joonson/syncnet_python ``calc_pdist`` / ``evaluate``).

Every 5-frame window of the face gets a video embedding and the 0.2 s of audio starting at the same frame
an audio embedding. For each video window i and each shift s in -vshift..vshift the Euclidean distance to
audio window i + s is taken (audio beyond the clip is a zero vector, as the reference pads); the mean over
windows gives one distance per shift. Then:

- LSE-D = the smallest mean distance (lower is better);
- LSE-C = median over shifts − LSE-D (higher is better: a clear minimum);
- AV offset = the shift of the minimum.

Sign: ``av_offset_frames`` follows DESIGN.md (> 0: the audio lags the video). The reference prints
``vshift - argmin``, the opposite sign: its ``offset`` is our ``-av_offset_frames``.

Two embedders produce the embeddings: our expert SyncNet checkpoint (``models.registry.SyncNet``, unit
embeddings of lower-half crops and Wav2Lip mels) and the original syncnet_v2 (``models.syncnet_v2``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from models.frames import SYNC_FRAMES, sync_faces
from models.syncnet import EMBEDDING_DIM
from pipeline.audio import mel_windows, melspectrogram
from pipeline.crops import crop_boxes, crop_faces

DEFAULT_VSHIFT = 15
_PAIRWISE_EPS = 1e-6  # torch.nn.functional.pairwise_distance adds it to the difference


@dataclass(frozen=True)
class LseResult:
    """One clip's SyncNet scores and the mean-distance curve over shifts -vshift..vshift."""

    lse_d: float
    lse_c: float
    av_offset_frames: int
    mean_distances: tuple[float, ...]
    n_windows: int

    def to_dict(self, prefix: str = "lse") -> dict[str, float | int]:
        return {
            f"{prefix}_d": round(self.lse_d, 5),
            f"{prefix}_c": round(self.lse_c, 5),
            f"{prefix}_offset_frames": self.av_offset_frames,
            f"{prefix}_windows": self.n_windows,
        }


def pairwise_distances(
    video_emb: np.ndarray, audio_emb: np.ndarray, vshift: int = DEFAULT_VSHIFT
) -> np.ndarray:
    """(N, 2 vshift + 1) distances of video window i to audio window i + s, zero-padded audio beyond the ends."""
    video = np.asarray(video_emb, np.float64)
    audio = np.asarray(audio_emb, np.float64)
    if video.ndim != 2 or audio.shape != video.shape:
        raise ValueError(
            f"embeddings must be two (N, D) arrays of one shape, got {video.shape} {audio.shape}"
        )
    padded = np.pad(audio, ((vshift, vshift), (0, 0)))
    n = len(video)
    columns = [
        np.linalg.norm(video - padded[j : j + n] + _PAIRWISE_EPS, axis=1) for j in range(2 * vshift + 1)
    ]
    return np.stack(columns, axis=1)


def lse_from_distances(distances: np.ndarray) -> LseResult:
    """LSE-D, LSE-C and the AV offset from the (N, 2 vshift + 1) distance matrix."""
    mean = distances.mean(axis=0)
    vshift = (len(mean) - 1) // 2
    best = int(np.argmin(mean))
    return LseResult(
        lse_d=float(mean[best]),
        lse_c=float(np.median(mean) - mean[best]),
        av_offset_frames=best - vshift,
        mean_distances=tuple(float(d) for d in mean),
        n_windows=int(distances.shape[0]),
    )


def lse_from_embeddings(
    video_emb: np.ndarray, audio_emb: np.ndarray, vshift: int = DEFAULT_VSHIFT
) -> LseResult:
    """The protocol on per-window embeddings (row i of both: the window starting at frame i)."""
    if len(video_emb) == 0:
        raise ValueError("no windows: the clip is shorter than 6 frames")
    return lse_from_distances(pairwise_distances(video_emb, audio_emb, vshift))


def window_count(n_frames: int, n_samples: int, sample_rate: int, fps: float) -> int:
    """Windows the reference evaluates: min(video frames, whole audio frames) − 5 (never negative)."""
    audio_frames = int(np.floor(n_samples * fps / sample_rate))
    return max(0, min(n_frames, audio_frames) - SYNC_FRAMES)


def _embed_batches(
    forward: Callable[[torch.Tensor], torch.Tensor],
    build: Callable[[np.ndarray], np.ndarray],
    n: int,
    batch: int,
    dim: int,
) -> np.ndarray:
    """forward(tensor) over inputs built batch by batch (build(starts) -> array), so memory stays bounded."""
    out = []
    with torch.inference_mode():
        for i in range(0, n, batch):
            inputs = build(np.arange(i, min(i + batch, n)))
            out.append(forward(torch.from_numpy(inputs)).float().numpy())
    return _stack(out, dim)


def face_windows(frames_bgr: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """(N, 15, H/2, W) float32 inputs of our SyncNet, built exactly as training builds them, scaled to [0, 1]."""
    windows = np.stack([sync_faces(frames_bgr[s : s + SYNC_FRAMES]) for s in starts])
    return windows.astype(np.float32) / 255.0


class SyncNetEmbedder:
    """Our expert SyncNet checkpoint (``models.checkpoint``): crops at its img_size, Wav2Lip mel windows.

    Face windows come from ``training.data`` (BGR, lower halves, frame-major channels) so scoring feeds the
    model what it was trained on; the crop is the preprocessing one (forehead to chin plus 10 %).
    """

    name = "lse"
    pad_bottom = 0.1  # the preprocessing crop: forehead to chin plus 10 %

    def __init__(self, checkpoint: str, batch: int = 64) -> None:
        from models.checkpoint import load_model

        loaded = load_model(checkpoint, expected_kind="syncnet")
        self.model = loaded.model
        self.img_size = loaded.img_size
        self.uri = loaded.uri
        self.batch = batch

    def embed(
        self, frames: np.ndarray, landmarks: np.ndarray, pcm: np.ndarray, sample_rate: int, fps: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """(video, audio) embeddings of every window of a clip (frames RGB, smoothed landmarks)."""
        n = window_count(len(frames), len(pcm), sample_rate, fps)
        from models.frames import to_model_frames

        crops = crop_faces(frames, crop_boxes(landmarks, frames.shape, self.pad_bottom), self.img_size)
        crops = to_model_frames(crops, self.img_size)  # BGR, as the model was trained
        mels = mel_windows(melspectrogram(pcm), len(frames), fps)[:n, None]
        audio, video = [], []
        with torch.inference_mode():
            for i in range(0, n, self.batch):
                starts = np.arange(i, min(i + self.batch, n))
                faces = torch.from_numpy(face_windows(crops, starts))
                a, v = self.model(torch.from_numpy(mels[starts]), faces)
                audio.append(a.float().numpy())
                video.append(v.float().numpy())
        return _stack(video, EMBEDDING_DIM), _stack(audio, EMBEDDING_DIM)


class SyncNetV2Embedder:
    """The original syncnet_v2 weights: 224×224 BGR crops (syncnet_python's crop scale) and MFCC windows."""

    name = "lse_v2"
    pad_bottom = 0.4  # syncnet_python crops 0.4 × the face box below the chin (crop_scale 0.4)

    def __init__(self, weights: str, batch: int = 32) -> None:
        from models.syncnet_v2 import load_syncnet_v2

        self.model = load_syncnet_v2(weights)
        self.uri = weights
        self.batch = batch

    def embed(
        self, frames: np.ndarray, landmarks: np.ndarray, pcm: np.ndarray, sample_rate: int, fps: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """(video, audio) features of every window of a clip (frames RGB, smoothed landmarks)."""
        from models.syncnet_v2 import INPUT_SIZE, lip_windows, mfcc_windows

        n = window_count(len(frames), len(pcm), sample_rate, fps)
        crops = crop_faces(frames, crop_boxes(landmarks, frames.shape, self.pad_bottom), INPUT_SIZE)
        dim = self.model.netfclip[-1].out_features
        mfccs = mfcc_windows(pcm, n, sample_rate, fps)
        video = _embed_batches(self.model.forward_lip, lambda s: lip_windows(crops, s), n, self.batch, dim)
        audio = _embed_batches(self.model.forward_aud, lambda s: mfccs[s], n, self.batch, dim)
        return video, audio


def _stack(parts: list[np.ndarray], dim: int) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)


def lse_of_clip(
    embedder: SyncNetEmbedder | SyncNetV2Embedder,
    frames: np.ndarray,
    landmarks: np.ndarray,
    pcm: np.ndarray,
    sample_rate: int = 16000,
    fps: float = 25.0,
    vshift: int = DEFAULT_VSHIFT,
) -> LseResult:
    """LSE-D / LSE-C / AV offset of one clip (RGB frames, smoothed landmarks, mono PCM)."""
    video, audio = embedder.embed(frames, landmarks, pcm, sample_rate, fps)
    return lse_from_embeddings(video, audio, vshift)
