"""Uploads decoded in a separate process, with a timeout: a file that hangs or crashes a decoder costs one
request a 422, never the server.

Each upload is decoded in its own process forked from a forkserver that has already
imported the decoding code, so a request pays a fork (milliseconds), not an
interpreter start. The process is killed when it runs past the timeout; a process
that dies (a decoder's segfault, the memory limit) is reported as such.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
from pathlib import Path

import numpy as np

from tasks.uploads import UploadError, UploadLimits, decode_upload

_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["numpy", "soundfile", "soxr", "tasks.audio", "tasks.uploads"])


def _decode_into(connection, path: str, sample_rate: int, limits: UploadLimits) -> None:
    try:
        connection.send(("ok", decode_upload(Path(path), sample_rate=sample_rate, limits=limits)))
    except UploadError as err:
        connection.send(("refused", (err.status, err.reason)))
    except Exception as err:  # anything else a decoder raises is still a bad file, said as such
        connection.send(("refused", (422, f"the audio cannot be decoded: {type(err).__name__}: {err}")))
    finally:
        connection.close()


def decode_isolated(path: Path, *, sample_rate: int, limits: UploadLimits, timeout_s: float = 30.0) -> np.ndarray:
    """:func:`tasks.uploads.decode_upload` in a child process; :class:`UploadError` for a refusal, a timeout or a crash."""
    receive, send = _CONTEXT.Pipe(duplex=False)
    process = _CONTEXT.Process(target=_decode_into, args=(send, str(path), sample_rate, limits), daemon=True)
    process.start()
    send.close()
    try:
        if not receive.poll(timeout_s):
            raise UploadError(422, f"decoding took longer than {timeout_s:.0f} s; the file was given up")
        try:
            kind, value = receive.recv()
        except EOFError:
            process.join(5)
            raise UploadError(422, f"the decoder stopped on this file (exit code {process.exitcode})") from None
    finally:
        receive.close()
        if process.is_alive():
            process.kill()
        process.join(5)
    if kind == "refused":
        raise UploadError(*value)
    return value
