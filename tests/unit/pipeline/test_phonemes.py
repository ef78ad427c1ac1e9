"""Phoneme timelines come from espeak-ng's own events and cover the speech they describe."""

from __future__ import annotations

import numpy as np
import pytest

from core.errors import BadInput
from pipeline import phonemes as ph
from pipeline.sentences import SENTENCES


def speech_bounds_ms(pcm: np.ndarray, sample_rate: int, frame_ms: float = 10.0) -> tuple[float, float]:
    """First and last 10 ms frame whose RMS exceeds 5% of the loudest frame, measured on the waveform."""
    hop = int(sample_rate * frame_ms / 1000)
    x = pcm.astype(np.float64) / 32768.0
    n = len(x) // hop
    rms = np.sqrt((x[: n * hop].reshape(n, hop) ** 2).mean(axis=1))
    active = np.flatnonzero(rms > 0.05 * rms.max())
    return active[0] * frame_ms, (active[-1] + 1) * frame_ms


@pytest.mark.parametrize("language", ["en", "es", "hi"])
def test_timeline_covers_the_audio(language: str) -> None:
    speech = ph.synthesize(SENTENCES[language][0], language)
    onset, offset = speech_bounds_ms(speech.pcm, speech.sample_rate)
    assert len(speech.phonemes) > 10
    assert abs(speech.phonemes[0].start_ms - onset) <= 300, (speech.phonemes[0], onset)
    assert abs(speech.phonemes[-1].end_ms - offset) <= 300, (speech.phonemes[-1], offset)
    starts = [p.start_ms for p in speech.phonemes]
    assert starts == sorted(starts)
    assert all(p.end_ms > p.start_ms for p in speech.phonemes)


def test_the_same_words_give_the_same_speech_whatever_was_spoken_before() -> None:
    """espeak-ng's wave generator carries state between calls in one process; every call starts fresh."""
    text = SENTENCES["en"][0]
    first = ph.synthesize(text, "en", ph.VoiceStyle("m3"))
    for language, other in (("es", SENTENCES["es"][0]), ("en", text), ("hi", SENTENCES["hi"][0])):
        ph.synthesize(other, language, ph.VoiceStyle("f2", rate_wpm=190, pitch=70))
    again = ph.synthesize(text, "en", ph.VoiceStyle("m3"))
    assert np.array_equal(first.pcm, again.pcm)
    assert first.phonemes == again.phonemes


def test_a_killed_espeak_helper_is_replaced() -> None:
    from pipeline import espeak_process

    before = ph.synthesize("papa", "es")
    espeak_process._helper.kill()
    espeak_process._helper.wait()
    assert np.array_equal(ph.synthesize("papa", "es").pcm, before.pcm)


def test_a_synthesis_past_its_time_limit_is_killed_and_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hung espeak-ng call must fail with a message, never leave its caller waiting."""
    from pipeline import espeak_process

    ph.synthesize("papa", "es")
    espeak_process._stop_helper()  # the next call starts a helper that reads the limit below
    monkeypatch.setenv("LIPSYNC_ESPEAK_TIMEOUT_S", "0.000001")
    with pytest.raises(
        RuntimeError, match=r"was still speaking 'papa papa' \(es\) after 1e-06 s and was killed"
    ):
        ph.synthesize("papa papa", "es")
    espeak_process._stop_helper()
    monkeypatch.delenv("LIPSYNC_ESPEAK_TIMEOUT_S")
    assert len(ph.synthesize("papa", "es").pcm) > 0


def test_timings_are_the_synthesisers_not_guessed() -> None:
    """Slower speech gives proportionally longer phonemes: the times follow espeak-ng's audio."""
    text = SENTENCES["en"][1]
    slow = ph.synthesize(text, "en", ph.VoiceStyle(rate_wpm=100))
    fast = ph.synthesize(text, "en", ph.VoiceStyle(rate_wpm=250))
    assert [p.phoneme for p in slow.phonemes] == [p.phoneme for p in fast.phonemes]
    span = lambda s: s.phonemes[-1].end_ms - s.phonemes[0].start_ms  # noqa: E731
    assert span(slow) / span(fast) > 1.8
    assert slow.duration_ms / fast.duration_ms > 1.8


@pytest.mark.parametrize(
    ("language", "text", "bilabials"),
    [
        ("en", "Bob put the map back in the blue box.", 5),
        ("es", "Mi mamá bebe poca agua.", 4),
        ("hi", "बाबा पानी में", 3),
    ],
)
def test_bilabials_are_closed_visemes(language: str, text: str, bilabials: int) -> None:
    timeline = ph.phoneme_timeline(text, language)
    closed = [p for p in timeline if p.viseme == "bilabial"]
    assert len(closed) >= bilabials
    assert all(p.openness == 0.0 for p in closed)
    assert {p.phoneme[0] for p in closed} <= {"p", "b", "m", "β"}


@pytest.mark.parametrize("language", ["en", "es", "hi"])
def test_viseme_map_orders_mouth_shapes(language: str) -> None:
    vm = ph.viseme_map(language)
    openness = {v: ph.VISEME_OPENNESS[v] for v in set(vm.values())}
    assert vm["p"] == vm["b"] == vm["m"] == "bilabial"
    assert vm["a"] == "open_vowel" and vm["u"] == "rounded" and vm["f"] == "labiodental"
    assert openness["bilabial"] < openness["labiodental"] < openness["rounded"] < openness["open_vowel"]


def test_cadence_counts_syllables_per_second() -> None:
    speech = ph.synthesize("papa papa papa papa", "es", ph.VoiceStyle(rate_wpm=150))
    stats = ph.cadence(speech.phonemes)
    vowels = sum(ph.is_vowel(p.phoneme) for p in speech.phonemes)
    assert vowels == 8
    assert stats["syllables_per_second"] == pytest.approx(vowels / stats["speech_seconds"])
    assert 0 < stats["syllables_per_second"] < stats["phonemes_per_second"]


@pytest.mark.parametrize(
    ("language", "text"),
    [("de", "Guten Morgen"), ("cmn", "你好世界"), ("ja", "こんにちは"), ("fr", "Bonjour")],
)
def test_any_espeak_voice_gives_a_timeline(language: str, text: str) -> None:
    timeline = ph.phoneme_timeline(text, language)
    assert len(timeline) >= 3
    assert all(p.viseme in ph.VISEME_OPENNESS for p in timeline)


def test_unknown_language_lists_the_voices() -> None:
    with pytest.raises(BadInput) as err:
        ph.synthesize("hello", "klingon")
    message = str(err.value)
    assert "klingon" in message and "en" in message.split("available:")[1] and "hi" in message


def test_shift_timeline_moves_every_phoneme_and_keeps_the_rest() -> None:
    timeline = [ph.Phoneme("m", 100.0, 180.0, "bilabial", 0.0), ph.Phoneme("a", 180.0, 300.0, "open", 1.0)]
    early = ph.shift_timeline(timeline, -80.0)
    assert [(p.start_ms, p.end_ms) for p in early] == [(20.0, 100.0), (100.0, 220.0)]
    assert [(p.phoneme, p.viseme, p.openness) for p in early] == [("m", "bilabial", 0.0), ("a", "open", 1.0)]
    assert ph.shift_timeline(early, 80.0) == timeline


def test_openness_curve_is_smooth_and_follows_timeline() -> None:
    timeline = [ph.Phoneme("a", 100, 300, "open_vowel", 1.0), ph.Phoneme("m", 300, 400, "bilabial", 0.0)]
    curve = ph.openness_curve(timeline, 600)
    assert curve[200] > 0.95 and curve[50] < 0.05 and curve[550] < 0.05
    assert np.abs(np.diff(curve)).max() < 0.05  # no square wave: co-articulated glide
    per_frame = ph.openness_per_frame(timeline, 15, fps=25)
    assert per_frame.argmax() in (4, 5, 6)  # 160..280 ms


def test_json_round_trip() -> None:
    timeline = ph.phoneme_timeline("Hello there", "en")
    assert ph.timeline_from_json(ph.timeline_to_json(timeline)) == timeline
