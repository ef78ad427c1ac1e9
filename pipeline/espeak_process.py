"""Every espeak-ng synthesis starts from the same state: a fresh copy of an initialised espeak-ng per call.

espeak-ng's wave generator keeps state from one synthesis to the next that only initialisation resets (the
glottal phase, the pitch flutter's place in its table, which of two harmonic spectra is current). In one
process the same text spoken twice comes out different: up to ~10 ms longer or shorter per sentence, its
phoneme times moved by a few ms each, depending on everything spoken before. The synth corpus would depend
on the order its clips were made in, and scoring's transcript timeline (and so viseme agreement) on the
order the clips were scored in.

So a small helper process (a zygote) loads and initialises libespeak-ng once and speaks nothing itself;
for each request it forks a child that speaks once, sends its result back and exits. A fork costs
milliseconds. One helper per process that asks, started on first use, ends when its pipe closes.
"""

from __future__ import annotations

import atexit
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from typing import IO, Any

from core.errors import BadInput

_HEADER = struct.Struct("!Q")
# A synthesis takes milliseconds; one that has not finished after this long is killed and reported, never
# waited for. LIPSYNC_ESPEAK_TIMEOUT_S (read by the helper when it starts) overrides it.
SPEAK_TIMEOUT_S = 60.0
_lock = threading.Lock()  # one request at a time through the pipe
_helper: subprocess.Popen | None = None
_helper_owner = 0  # the pid that started it: a forked copy of this process starts its own


def speak_fresh(text: str, language: str, style: Any) -> tuple[Any, int, list[tuple[int, int, str]]]:
    """`pipeline.phonemes.speak_here(text, language, style)`, run in a fresh copy of espeak-ng."""
    with _lock:
        helper = _running_helper()
        try:
            _send(helper.stdin, (text, language, style))
            reply = _receive(helper.stdout)
        except (BrokenPipeError, EOFError) as exc:
            raise RuntimeError(f"the espeak-ng helper process ended (exit code {helper.poll()})") from exc
    if reply[0] == "ok":
        return reply[1]
    kind, message = reply[1], reply[2]
    raise (BadInput if kind == "BadInput" else RuntimeError)(message)


def _running_helper() -> subprocess.Popen:
    global _helper, _helper_owner
    if _helper is None or _helper_owner != os.getpid() or _helper.poll() is not None:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        _helper = subprocess.Popen(
            [sys.executable, "-m", "pipeline.espeak_process"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        _helper_owner = os.getpid()
    return _helper


@atexit.register
def _stop_helper() -> None:
    if _helper is not None and _helper_owner == os.getpid() and _helper.poll() is None:
        _helper.stdin.close()  # the helper ends at end of input
        try:
            _helper.wait(timeout=5)
        except subprocess.TimeoutExpired:
            _helper.kill()


def _send(stream: IO[bytes] | None, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    assert stream is not None
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _read_exactly(stream: IO[bytes], n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = stream.read(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return bytes(data)


def _receive(stream: IO[bytes] | None) -> Any:
    assert stream is not None
    (size,) = _HEADER.unpack(_read_exactly(stream, _HEADER.size))
    return pickle.loads(_read_exactly(stream, size))


def _speak_in_child(request: tuple, timeout_s: float) -> bytes:
    """Fork; the child speaks `request` and writes its pickled reply to a pipe; returns the reply (an error
    reply if the child died, or was killed for running past `timeout_s`)."""
    from pipeline.phonemes import speak_here

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: speak once, reply, exit without running the parent's exit handlers
        os.close(read_end)
        os.dup2(2, 1)  # anything espeak-ng prints goes to stderr, never into the helper's reply stream
        try:
            reply: tuple = ("ok", speak_here(*request))
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the caller
            reply = ("error", type(exc).__name__, str(exc))
        with os.fdopen(write_end, "wb") as out:
            out.write(pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL))
        os._exit(0)
    os.close(write_end)
    what = f"{request[0][:40]!r} ({request[1]})"
    with os.fdopen(read_end, "rb", buffering=0) as replies:
        data, finished = _read_until_closed(replies, timeout_s)
    if not finished:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    if not finished:
        message = f"espeak-ng was still speaking {what} after {timeout_s:g} s and was killed"
        return pickle.dumps(("error", "RuntimeError", message))
    if not data:
        return pickle.dumps(
            ("error", "RuntimeError", f"espeak-ng died speaking {what}: wait status {status}")
        )
    return data


def _read_until_closed(stream: IO[bytes], timeout_s: float) -> tuple[bytes, bool]:
    """(what `stream` held, whether its writer closed it within `timeout_s`)."""
    data, deadline = bytearray(), time.monotonic() + timeout_s
    while True:
        ready, _, _ = select.select([stream], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            return bytes(data), False
        chunk = stream.read(1 << 16)
        if not chunk:
            return bytes(data), True
        data += chunk


def main() -> None:
    """The helper: initialise espeak-ng once, then one forked child per request until end of input."""
    from pipeline.phonemes import _library

    _library()
    timeout_s = float(os.environ.get("LIPSYNC_ESPEAK_TIMEOUT_S") or SPEAK_TIMEOUT_S)
    requests, replies = sys.stdin.buffer, sys.stdout.buffer
    while True:
        try:
            request = _receive(requests)
        except EOFError:
            return
        data = _speak_in_child(request, timeout_s)
        replies.write(_HEADER.pack(len(data)) + data)
        replies.flush()


if __name__ == "__main__":
    main()
