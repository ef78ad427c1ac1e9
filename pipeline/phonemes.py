"""Phoneme timelines from espeak-ng's own phoneme events, viseme maps and speech cadence.

espeak-ng is driven through its C API (ctypes, libespeak-ng.so.1) in synchronous mode with
`espeakINITIALIZE_PHONEME_EVENTS | espeakINITIALIZE_PHONEME_IPA`, so every phoneme comes with the
audio position espeak-ng itself gives it: the timings are the synthesiser's, never guessed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from dataclasses import asdict, dataclass, replace
from functools import lru_cache

import numpy as np

from core.errors import BadInput

# --- espeak-ng C API (speak_lib.h) -------------------------------------------------------------
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_PHONEME_EVENTS = 0x0001
_INITIALIZE_PHONEME_IPA = 0x0002
_INITIALIZE_DONT_EXIT = 0x8000
_CHARS_UTF8 = 1
_EVENT_LIST_TERMINATED, _EVENT_WORD, _EVENT_END, _EVENT_MSG_TERMINATED, _EVENT_PHONEME = 0, 1, 5, 6, 7
_PARAM_RATE, _PARAM_VOLUME, _PARAM_PITCH, _PARAM_RANGE = 1, 2, 3, 4


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    ]


class _Voice(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("languages", ctypes.c_void_p),  # <priority byte><name>\0 ... \0
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    ]


_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event)
)
_LOCK = threading.Lock()  # espeak-ng keeps global state: one synthesis at a time per process


class EspeakMissing(BadInput):
    """libespeak-ng is not installed."""


@dataclass(frozen=True)
class Phoneme:
    """One phoneme as espeak-ng spoke it: IPA symbol, times in ms from the start of the audio."""

    phoneme: str
    start_ms: float
    end_ms: float
    viseme: str = ""
    openness: float = 0.0


@dataclass
class Speech:
    """Synthesised speech: mono int16 PCM, its sample rate and the phoneme timeline that made it."""

    pcm: np.ndarray
    sample_rate: int
    phonemes: list[Phoneme]
    language: str
    text: str

    @property
    def duration_ms(self) -> float:
        return 1000.0 * len(self.pcm) / self.sample_rate


@dataclass(frozen=True)
class VoiceStyle:
    """Per-speaker voice: espeak-ng variant (e.g. 'm3', 'f2'), words per minute, pitch and range (0-100)."""

    variant: str = ""
    rate_wpm: int = 160
    pitch: int = 50
    pitch_range: int = 50


@lru_cache(maxsize=1)
def _library() -> tuple[ctypes.CDLL, int]:
    """Load and initialise libespeak-ng once per process; returns (lib, sample_rate)."""
    path = (
        os.environ.get("LIPSYNC_ESPEAK_LIB") or ctypes.util.find_library("espeak-ng") or "libespeak-ng.so.1"
    )
    try:
        lib = ctypes.CDLL(path)
    except OSError as exc:
        raise EspeakMissing(
            f"espeak-ng is not installed ({path} could not be loaded); install it with "
            "`apt-get install espeak-ng libespeak-ng1` or run `make venv`"
        ) from exc
    lib.espeak_Initialize.restype = ctypes.c_int
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_SetSynthCallback.argtypes = [_CALLBACK]
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_Synth.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_uint,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.c_uint,
        ctypes.POINTER(ctypes.c_uint),
        ctypes.c_void_p,
    ]
    lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_Voice))
    lib.espeak_ListVoices.argtypes = [ctypes.c_void_p]
    options = _INITIALIZE_PHONEME_EVENTS | _INITIALIZE_PHONEME_IPA | _INITIALIZE_DONT_EXIT
    rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, None, options)
    if rate <= 0:
        raise EspeakMissing("espeak-ng failed to initialise (espeak-ng-data missing?)")
    return lib, rate


@lru_cache(maxsize=1)
def list_voices() -> tuple[str, ...]:
    """Language codes of every voice espeak-ng has (e.g. 'en', 'en-us', 'es', 'hi', 'cmn')."""
    lib, _ = _library()
    voices = lib.espeak_ListVoices(None)
    codes: set[str] = set()
    i = 0
    while voices[i]:
        codes.update(_parse_languages(voices[i].contents))
        i += 1
    return tuple(sorted(codes))


def _parse_languages(voice_ptr: _Voice) -> list[str]:
    """Decode espeak_VOICE.languages: repeated <priority byte><name>\\0, terminated by an empty name."""
    base = voice_ptr.languages
    if not base:
        return []
    out: list[str] = []
    offset = 0
    while True:
        priority = ctypes.string_at(base + offset, 1)
        if priority == b"\x00":
            break
        name = ctypes.string_at(base + offset + 1).decode("utf-8", "replace")
        if not name:
            break
        out.append(name)
        offset += 1 + len(name) + 1
    return out


def check_language(language: str) -> str:
    """Return `language` if espeak-ng has a voice for it, else raise BadInput listing the voices."""
    voices = list_voices()
    if language in voices:
        return language
    raise BadInput(f"no espeak-ng voice for language {language!r}; available: {', '.join(voices)}")


def synthesize(text: str, language: str, style: VoiceStyle | None = None) -> Speech:
    """Speak `text` with espeak-ng; returns the PCM and the phoneme timeline from espeak-ng's events.

    Each call runs in a fresh copy of an initialised espeak-ng (pipeline.espeak_process), so the same
    arguments give the same speech however many other calls came before."""
    from pipeline.espeak_process import speak_fresh

    check_language(language)
    pcm, sample_rate, events = speak_fresh(text, language, style or VoiceStyle())
    duration_ms = 1000.0 * len(pcm) / sample_rate
    phonemes = _timeline_from_events(events, duration_ms, language)
    return Speech(
        pcm=pcm.astype(np.int16), sample_rate=sample_rate, phonemes=phonemes, language=language, text=text
    )


def speak_here(
    text: str, language: str, style: VoiceStyle
) -> tuple[np.ndarray, int, list[tuple[int, int, str]]]:
    """(PCM, sample rate, events as (type, audio position ms, IPA)) from this process's espeak-ng. Its
    wave generator carries state from call to call: `synthesize` calls this in a fresh process."""
    lib, sample_rate = _library()
    chunks: list[np.ndarray] = []
    events: list[tuple[int, int, str]] = []

    def on_synth(wav, numsamples, event_ptr):  # noqa: ANN001 - C callback
        if numsamples > 0 and wav:
            chunks.append(np.ctypeslib.as_array(wav, shape=(numsamples,)).copy())
        i = 0
        while event_ptr[i].type != _EVENT_LIST_TERMINATED:
            ev = event_ptr[i]
            name = ev.id.string.decode("utf-8", "replace") if ev.type == _EVENT_PHONEME else ""
            events.append((ev.type, ev.audio_position, name))
            i += 1
        return 0

    callback = _CALLBACK(on_synth)
    voice = language + (f"+{style.variant}" if style.variant else "")
    encoded = text.encode("utf-8") + b"\x00"
    with _LOCK:
        lib.espeak_SetSynthCallback(callback)
        if (
            lib.espeak_SetVoiceByName(voice.encode()) != 0
            and lib.espeak_SetVoiceByName(language.encode()) != 0
        ):
            raise BadInput(f"espeak-ng could not select voice {voice!r}")
        lib.espeak_SetParameter(_PARAM_RATE, int(style.rate_wpm), 0)
        lib.espeak_SetParameter(_PARAM_PITCH, int(style.pitch), 0)
        lib.espeak_SetParameter(_PARAM_RANGE, int(style.pitch_range), 0)
        err = lib.espeak_Synth(encoded, len(encoded), 0, 0, 0, _CHARS_UTF8, None, None)
        if err != 0:
            raise RuntimeError(f"espeak_Synth failed with error {err} for {language!r}")
    pcm = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
    return pcm.astype(np.int16), sample_rate, events


def _is_pause(name: str) -> bool:
    return not name.strip() or name.strip().startswith("_")


def _timeline_from_events(
    events: list[tuple[int, int, str]], duration_ms: float, language: str
) -> list[Phoneme]:
    """Phonemes start at their event's audio position and end where the next phoneme or pause starts."""
    marks = [(pos, name) for kind, pos, name in events if kind == _EVENT_PHONEME]
    end_marks = [pos for kind, pos, _ in events if kind in (_EVENT_END, _EVENT_MSG_TERMINATED)]
    final = float(max(end_marks)) if end_marks else duration_ms
    final = min(final, duration_ms) if duration_ms > 0 else final
    out: list[Phoneme] = []
    for i, (pos, name) in enumerate(marks):
        if _is_pause(name):
            continue
        end = float(marks[i + 1][0]) if i + 1 < len(marks) else final
        if end <= pos:
            continue
        viseme = viseme_of(name, language)
        out.append(Phoneme(name, float(pos), end, viseme, VISEME_OPENNESS[viseme]))
    return out


# --- visemes ------------------------------------------------------------------------------------
# Mouth shapes with a target openness (0 closed .. 1 wide open), after the usual Preston-Blair /
# MPEG-4 groupings: bilabial closure, labiodental, rounded, open/mid/close vowels, and the rest.
VISEME_OPENNESS: dict[str, float] = {
    "bilabial": 0.0,  # p b m
    "labiodental": 0.15,  # f v
    "dental": 0.3,  # th, dh
    "alveolar": 0.3,  # t d n s z l r
    "postalveolar": 0.35,  # sh zh ch j
    "velar": 0.35,  # k g ng h
    "rounded": 0.45,  # u o w (lips rounded, moderate opening)
    "close_vowel": 0.4,  # i e
    "mid_vowel": 0.65,  # e o schwa
    "open_vowel": 1.0,  # a
    "other": 0.3,
}

_BASE_MAP: dict[str, str] = {}
for _chars, _vis in [
    ("pbmɓ", "bilabial"),
    ("fvʋɱ", "labiodental"),
    ("θð", "dental"),
    ("tdnszlrɾɹɬʈɖɳɽʂʐɭ", "alveolar"),
    ("ʃʒɕʑçʝj", "postalveolar"),
    ("kgŋɡqɢxɣχʁhɦʔ", "velar"),
    ("uʊoɔwʉɵɒyʏøœ", "rounded"),
    ("iɪɨ", "close_vowel"),
    ("eɛəɘɜɞʌɤæɐ", "mid_vowel"),
    ("aɑɶä", "open_vowel"),
]:
    for _c in _chars:
        _BASE_MAP[_c] = _vis

# Language-specific adjustments on top of the shared IPA map.
_LANGUAGE_OVERRIDES: dict[str, dict[str, str]] = {
    # English: /ʌ/ (cup) and /æ/ (cat) are open; /ɜ/ (bird) is mid.
    "en": {"ʌ": "open_vowel", "æ": "open_vowel", "ɑ": "open_vowel", "ɒ": "rounded"},
    # Spanish has five vowels; /e/ and /o/ are mid-open, /β/ /ð/ approximants keep their place.
    "es": {"e": "mid_vowel", "o": "rounded", "β": "bilabial", "ʝ": "postalveolar"},
    # Hindi: schwa-like /ə/ is the inherent vowel (mid), /ɑ/ long open; aspirated stops map by place.
    "hi": {"ə": "mid_vowel", "ɑ": "open_vowel", "ʌ": "mid_vowel", "ʋ": "labiodental"},
}


def viseme_map(language: str) -> dict[str, str]:
    """IPA base symbol → viseme for a language (shared map plus the language's overrides)."""
    base = language.split("-")[0]
    merged = dict(_BASE_MAP)
    merged.update(_LANGUAGE_OVERRIDES.get(base, {}))
    return merged


def viseme_of(ipa: str, language: str) -> str:
    """Viseme of one espeak-ng IPA phoneme; the first base letter decides (diacritics and stress ignored)."""
    mapping = viseme_map(language)
    for ch in ipa:
        if ch in mapping:
            return mapping[ch]
    return "other"


VOWEL_VISEMES = frozenset({"rounded", "close_vowel", "mid_vowel", "open_vowel"})
_VOWEL_LETTERS = set("aeiouyæɑɒɐɔəɘɛɜɞɤɨɪʉʊʌʏøœɶɵ")


def is_vowel(ipa: str) -> bool:
    """True for a vowel phoneme (its first base letter is an IPA vowel)."""
    return any(ch in _VOWEL_LETTERS for ch in ipa)


# --- cadence and openness tracks ----------------------------------------------------------------
def cadence(phonemes: list[Phoneme]) -> dict[str, float]:
    """Phonemes and syllables (vowel nuclei) per second of speech (first start to last end)."""
    if not phonemes:
        return {"phonemes_per_second": 0.0, "syllables_per_second": 0.0, "speech_seconds": 0.0}
    seconds = (phonemes[-1].end_ms - phonemes[0].start_ms) / 1000.0
    syllables = sum(1 for p in phonemes if is_vowel(p.phoneme))
    return {
        "phonemes_per_second": len(phonemes) / seconds if seconds > 0 else 0.0,
        "syllables_per_second": syllables / seconds if seconds > 0 else 0.0,
        "speech_seconds": seconds,
    }


# Mouths shape a phoneme this long before it sounds: the AV-sync meter, fitted on real in-sync clips,
# reads a mouth that moves exactly with the phonemes as 2 frames (80 ms) late. The synth corpus renders
# its mouths this far ahead, and viseme scoring looks for each phoneme's shape this far ahead.
MOUTH_LEAD_MS = 80.0


def openness_curve(
    phonemes: list[Phoneme], duration_ms: float, step_ms: float = 1.0, smooth_ms: float = 25.0
) -> np.ndarray:
    """Target mouth openness every `step_ms`, co-articulated by Gaussian smoothing of the viseme targets.

    Silence is closed (0). The smoothing makes the mouth glide between shapes rather than jump.
    """
    n = max(1, int(np.ceil(duration_ms / step_ms)))
    target = np.zeros(n, dtype=np.float64)
    for p in phonemes:
        a, b = int(p.start_ms / step_ms), int(np.ceil(p.end_ms / step_ms))
        target[max(a, 0) : min(b, n)] = p.openness
    sigma = smooth_ms / step_ms
    radius = int(3 * sigma)
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    return np.convolve(np.pad(target, radius, mode="edge"), kernel, mode="valid")[:n]


def openness_per_frame(
    phonemes: list[Phoneme], n_frames: int, fps: float = 25.0, shift_ms: float = 0.0
) -> np.ndarray:
    """Timeline openness sampled at each video frame's centre (optionally shifted by `shift_ms`)."""
    duration_ms = 1000.0 * n_frames / fps + abs(shift_ms) + 100.0
    curve = openness_curve(phonemes, duration_ms)
    centres = (np.arange(n_frames) + 0.5) * 1000.0 / fps - shift_ms
    idx = np.clip(np.round(centres).astype(int), 0, len(curve) - 1)
    return curve[idx]


def shift_timeline(phonemes: list[Phoneme], ms: float) -> list[Phoneme]:
    """The timeline moved by `ms` (negative: earlier), e.g. to where the mouth shapes each phoneme."""
    return [replace(p, start_ms=p.start_ms + ms, end_ms=p.end_ms + ms) for p in phonemes]


def timeline_to_json(phonemes: list[Phoneme]) -> list[dict]:
    """JSON-able list of phoneme dicts."""
    return [asdict(p) for p in phonemes]


def timeline_from_json(rows: list[dict]) -> list[Phoneme]:
    """Inverse of `timeline_to_json`."""
    return [Phoneme(**r) for r in rows]


def phoneme_timeline(text: str, language: str, style: VoiceStyle | None = None) -> list[Phoneme]:
    """Phoneme timeline (IPA, start/end ms, viseme, openness) of `text` spoken in `language`."""
    return synthesize(text, language, style).phonemes
