"""Uploads decoded in separate processes, with a timeout: a file that hangs or crashes a decoder costs one
request a 422, never the server.

A :class:`DecoderPool` keeps a few worker processes (spawned once, so a request pays a
pipe round trip, not an interpreter start). Each worker decodes one upload at a time
with :func:`tasks.uploads.decode_upload`. A worker that runs past the timeout is killed,
and so is one that dies (a decoder's segfault, the memory limit); either way a fresh
worker takes its place and the request gets the reason.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import threading
from pathlib import Path

import numpy as np

from tasks.uploads import UploadError, UploadLimits, decode_upload

log = logging.getLogger("mirflow")
_CONTEXT = multiprocessing.get_context("spawn")  # never fork a server full of threads


def serve_decodes(connection) -> None:
    """A worker's loop: ``(path, sample_rate, limits)`` in, ``("ok", waveform)`` or ``("refused", (status, reason))`` out."""
    while True:
        try:
            path, sample_rate, limits = connection.recv()
        except (EOFError, OSError):
            return
        try:
            reply = ("ok", decode_upload(Path(path), sample_rate=sample_rate, limits=limits))
        except UploadError as err:
            reply = ("refused", (err.status, err.reason))
        except Exception as err:  # anything else a decoder raises is still a bad file, said as such
            reply = ("refused", (422, f"the audio cannot be decoded: {type(err).__name__}: {err}"))
        connection.send(reply)


class DecoderPool:
    """``size`` decoding processes; :meth:`decode` waits for a free one (at most ``timeout_s`` for the decode)."""

    def __init__(self, size: int = 2, *, timeout_s: float = 30.0, target=serve_decodes) -> None:
        self.timeout_s, self._target = timeout_s, target
        self._idle: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._workers: list = []
        for _ in range(max(1, size)):
            self._idle.put(self._start())

    def _start(self):
        parent, child = _CONTEXT.Pipe()
        process = _CONTEXT.Process(target=self._target, args=(child,), daemon=True, name="mirflow-decoder")
        process.start()
        child.close()
        with self._lock:
            self._workers.append(process)
        return process, parent

    def _replace(self, process, connection) -> None:
        connection.close()
        if process.is_alive():
            process.kill()
        process.join(5)
        with self._lock:
            if process in self._workers:
                self._workers.remove(process)
        self._idle.put(self._start())

    def decode(self, path: Path, *, sample_rate: int, limits: UploadLimits) -> np.ndarray:
        """The upload's waveform at ``sample_rate``; :class:`UploadError` for a refusal, a timeout or a crash."""
        process, connection = self._idle.get()
        try:
            connection.send((str(path), sample_rate, limits))
            if not connection.poll(self.timeout_s):
                self._replace(process, connection)
                raise UploadError(422, f"decoding took longer than {self.timeout_s:.0f} s; the file was given up")
            kind, value = connection.recv()
        except (EOFError, OSError, BrokenPipeError):
            process.join(5)
            code = process.exitcode
            self._replace(process, connection)
            raise UploadError(422, f"the decoder stopped on this file (exit code {code})") from None
        self._idle.put((process, connection))
        if kind == "refused":
            raise UploadError(*value)
        return value

    def close(self) -> None:
        with self._lock:
            workers = list(self._workers)
        for process in workers:
            process.kill()
            process.join(5)
