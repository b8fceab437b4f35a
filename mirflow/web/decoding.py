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
import os
import queue
import signal
import threading
from pathlib import Path

import numpy as np

from tasks.uploads import UploadError, UploadLimits, decode_upload

log = logging.getLogger("mirflow")
_CONTEXT = multiprocessing.get_context("spawn")  # never fork a server full of threads


def serve_decodes(connection) -> None:
    """A worker's loop: ``(path, sample_rate, limits)`` in; ``("ok", waveform)`` or ``("refused", (status, why))`` out.

    The worker leads its own process group, so that killing it also kills a decoder it started (audioread's ffmpeg).
    """
    import os

    os.setsid()
    connection.send(("ready", os.getpid()))  # imports done: from here on, the decode timeout is the decode's
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

    def __init__(
        self,
        size: int = 2,
        *,
        timeout_s: float = 30.0,
        wait_s: float | None = None,
        start_s: float = 120.0,
        target=serve_decodes,
    ) -> None:
        self.timeout_s, self._target = timeout_s, target
        self.start_s = start_s  # how long a fresh worker may take to start (spawn + imports), apart from decoding
        self.wait_s = timeout_s if wait_s is None else wait_s  # how long a request waits for a free decoder
        self._idle: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._workers: list = []
        self._missing, self._closed = 0, False
        for _ in range(max(1, size)):
            self._idle.put(self._start())

    def _start(self):
        parent, child = _CONTEXT.Pipe()
        process = _CONTEXT.Process(target=self._target, args=(child,), daemon=True, name="mirflow-decoder")
        process.start()
        child.close()
        with self._lock:
            self._workers.append(process)
        return process, parent, False  # not known to be ready: its first message says so

    @staticmethod
    def _kill(process) -> None:
        if process.is_alive():
            try:
                os.killpg(process.pid, signal.SIGKILL)  # the worker and any decoder it started
            except OSError:
                process.kill()
        process.join(5)

    def _replace(self, process, connection) -> None:
        """Kill a worker and put a fresh one in its place; a failed start leaves a slot that :meth:`decode` refills."""
        connection.close()
        self._kill(process)
        with self._lock:
            if process in self._workers:
                self._workers.remove(process)
            self._missing += 1
        self._refill()

    def _refill(self) -> None:
        while not self._closed:
            with self._lock:
                if self._missing == 0:
                    return
                self._missing -= 1
            try:
                self._idle.put(self._start())
            except Exception:  # no process could be started now (file descriptors, memory): try on the next request
                with self._lock:
                    self._missing += 1
                log.exception("serve: a decoding process could not be started")
                return

    def decode(self, path: Path, *, sample_rate: int, limits: UploadLimits) -> np.ndarray:
        """The upload's waveform at ``sample_rate``; :class:`UploadError` for a refusal, a timeout or a crash."""
        if self._closed:
            raise UploadError(503, "the service is shutting down")
        self._refill()
        try:
            process, connection, ready = self._idle.get(timeout=self.wait_s)
        except queue.Empty:
            raise UploadError(503, "every decoder is busy; try again in a moment") from None
        try:
            if not ready:
                try:
                    started = connection.poll(self.start_s) and connection.recv()  # ("ready", pid)
                except (EOFError, OSError):  # it died while starting: the service's fault, not the upload's
                    started = False
                if not started:
                    self._replace(process, connection)
                    raise UploadError(503, f"a decoding process did not start within {self.start_s:.0f} s")
            connection.send((str(path), sample_rate, limits))
            if not connection.poll(self.timeout_s):
                self._replace(process, connection)
                raise UploadError(422, f"decoding took longer than {self.timeout_s:.0f} s; the file was given up")
            kind, value = connection.recv()
        except UploadError:
            raise
        except (EOFError, OSError):
            process.join(5)
            code = process.exitcode
            self._replace(process, connection)
            raise UploadError(422, f"the decoder stopped on this file (exit code {code})") from None
        except BaseException:  # anything else (a reply too large to unpickle, an interrupt): never lose the worker
            self._replace(process, connection)
            raise
        self._idle.put((process, connection, True))
        if kind == "refused":
            raise UploadError(*value)
        return value

    def close(self) -> None:
        """Stop every worker (the app's shutdown); later :meth:`decode` calls get a 503."""
        self._closed = True
        with self._lock:
            workers = list(self._workers)
        while True:
            try:
                _, connection, _ = self._idle.get_nowait()
                connection.close()
            except queue.Empty:
                break
        for process in workers:
            self._kill(process)
