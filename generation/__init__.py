"""Generation (inference): lip-synced videos for (video, audio) pairs.

One file per step: `prepare` (decode, track, crop, mels) → `infer` (the generator) → `composite`
(paste back, encode chunks) → `finalize` (mux with the audio, AV-offset `correction`); `run` drives
them on Ray Data. Beside them: `config`, `pairs`, `rows` (what travels between steps), `extension`
(audio longer than the video), `blend` (the mouth mask and paste-back) and `calibration` (per-language
offsets applied before generation).
"""
