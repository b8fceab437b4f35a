"""The web service (FastAPI): upload a track, get its tags and cold-start recommendations; browse the catalogue.

    POST /api/analyze                      a multipart upload -> tags, predicted factors, similar tracks, listeners
    GET  /api/tracks/{id}                  tags, nearest tracks by WMF factors and by predicted factors
    GET  /api/users/{id}/recommendations   new tracks ranked for a user by predicted factors
    GET  /api/map                          t-SNE of the predicted factors, with tags
    GET  /api/audio/{id}                   a catalogue track's audio, by id
    GET  /healthz

The app computes nothing itself: the spectrogram of an upload is :func:`tasks.spectrogram.log_mel`
through :func:`lightning_modules.served.mel_clips` with the settings stored with the
model, the predictions are the served models', and the neighbours are one matrix product
over the catalogue (:func:`tasks.recommend.nearest_by_cosine`). Every error is JSON
``{"error": reason}``; nothing a request says becomes a path.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.errors import MirflowError, ParameterError
from lightning_modules.served import (
    mel_clips,
    predict_latent_factors,
    predict_tag_scores,
)
from mirflow.web.catalogue import TRACK_ID, Catalogue
from mirflow.web.decoding import DecoderPool
from tasks.recommend import nearest_by_cosine
from tasks.uploads import UploadError, UploadLimits

log = logging.getLogger("mirflow")
STATIC = Path(__file__).resolve().parent / "static"
_CHUNK = 1 << 20


class ApiError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


def _track(catalogue: Catalogue, track_id: str) -> int:
    if not TRACK_ID.match(track_id):
        raise ApiError(400, "a track id is letters, digits, '.', '_' or '-' (at most 128)")
    if track_id not in catalogue.position:
        raise ApiError(404, f"no track {track_id!r} in the catalogue")
    return catalogue.position[track_id]


def _neighbours(catalogue: Catalogue, factors: np.ndarray, row: int, k: int) -> list[dict]:
    usable = np.isfinite(factors).all(axis=1)
    if not usable[row]:
        return []
    index = np.flatnonzero(usable)
    order, similarity = nearest_by_cosine(factors[index], int(np.searchsorted(index, row)), n=k)
    return [_summary(catalogue, int(index[i]), cosine=float(s)) for i, s in zip(order, similarity)]


def _summary(catalogue: Catalogue, row: int, **extra) -> dict:
    track_id = str(catalogue.track_ids[row])
    return {"track_id": track_id, "tags": catalogue.tags[row], "audio": f"/api/audio/{track_id}", **extra}


class Served:
    """The catalogue being served. With a ``loader`` and none yet, it is loaded in a background thread (again at
    most every ``retry_s`` after a failure); requests meanwhile get a 503 with the reason, never a wait."""

    def __init__(
        self, catalogue: Catalogue | None, loader: Callable[[], Catalogue] | None = None, retry_s: float = 15.0
    ) -> None:
        if catalogue is None and loader is None:
            raise ParameterError("the app needs a catalogue to serve, or a loader that makes one: give either")
        self.catalogue, self.loader, self.retry_s = catalogue, loader, retry_s
        self.reason, self._tried, self._loading = "not loaded yet", -float("inf"), False
        self._lock = threading.Lock()
        if catalogue is None:
            self._start_loading()

    def _start_loading(self) -> None:
        with self._lock:
            if self._loading or time.monotonic() - self._tried < self.retry_s:
                return
            self._loading, self._tried = True, time.monotonic()
        threading.Thread(target=self._load, name="mirflow-catalogue", daemon=True).start()

    def _load(self) -> None:
        try:
            self.catalogue = self.loader()
            log.info("serve: loaded %d tracks (%s)", len(self.catalogue.track_ids), self.catalogue.source)
        except MirflowError as err:
            self.reason = str(err)
        except Exception as err:  # a store or a file in a state nobody planned for: said, and tried again later
            self.reason = f"{type(err).__name__}: {err}"
            log.exception("serve: loading the models and the catalogue failed")
        finally:
            self._loading = False

    def get(self) -> Catalogue:
        if self.catalogue is None:
            self._start_loading()
            if self._loading:
                raise ApiError(503, "loading the models and the catalogue; try again in a moment")
            raise ApiError(503, f"no models to serve yet: {self.reason}")
        return self.catalogue


def create_app(
    catalogue: Catalogue | None,
    *,
    loader: Callable[[], Catalogue] | None = None,
    limits: UploadLimits | None = None,
    decode_timeout_s: float = 30.0,
    decoders_size: int = 2,
) -> FastAPI:
    """The service over a loaded catalogue (:func:`mirflow.web.catalogue.load_catalogue`), or over what
    ``loader`` loads once it can (503 with the reason until then)."""
    limits = limits if limits is not None else UploadLimits()
    served = Served(catalogue, loader)
    decoders = DecoderPool(decoders_size, timeout_s=decode_timeout_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        decoders.close()  # the decoding processes end with the server

    app = FastAPI(
        title="mirflow", description="Tags and cold-start recommendations from audio (mirflow).", lifespan=lifespan
    )
    app.state.decoders = decoders

    @app.middleware("http")
    async def _refuse_large_bodies(request: Request, call_next):
        """An upload whose declared length passes the limit is refused before its body is read (or spooled)."""
        length = request.headers.get("content-length", "")
        if request.url.path == "/api/analyze" and length.isdigit() and int(length) > limits.max_bytes + (1 << 16):
            return JSONResponse(
                {
                    "error": f"the upload is {int(length) / 2**20:.1f} MB; the limit is "
                    f"{limits.max_bytes / 2**20:.0f} MB"
                },
                status_code=413,
            )
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError) -> JSONResponse:
        return JSONResponse({"error": err.reason}, status_code=err.status)

    @app.exception_handler(UploadError)
    async def _upload_error(request: Request, err: UploadError) -> JSONResponse:
        return JSONResponse({"error": err.reason}, status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(err.detail)}, status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse({"error": f"invalid request: {where}: {first.get('msg', 'invalid')}"}, status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> JSONResponse:
        log.exception("serve: %s %s failed", request.method, request.url.path)
        return JSONResponse(
            {"error": f"internal error ({type(err).__name__}); the server log has the details"}, status_code=500
        )

    @app.get("/healthz")
    def healthz() -> dict:
        try:
            catalogue = served.get()
        except ApiError as err:
            return {"status": "waiting", "reason": err.reason}
        return {
            "status": "ok",
            "tracks": len(catalogue.track_ids),
            "users": len(catalogue.users),
            "models": catalogue.source,
        }

    @app.post("/api/analyze")
    def analyze(file: UploadFile, top: int = 10) -> dict:
        catalogue = served.get()
        top = max(1, min(int(top), 100))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "upload"  # never the client's file name
            copy_upload(file.file, path, limits.max_bytes)
            y = decoders.decode(path, sample_rate=catalogue.cnn.mel.sample_rate, limits=limits)
            y_tagger = (
                y
                if catalogue.tagger.mel.sample_rate == catalogue.cnn.mel.sample_rate
                else decoders.decode(path, sample_rate=catalogue.tagger.mel.sample_rate, limits=limits)
            )
        tagger, cnn = catalogue.tagger, catalogue.cnn
        scores = predict_tag_scores(
            tagger.module, mel_clips(y_tagger[None], mel=tagger.mel), crop=tagger.crop, hop=tagger.hop
        )[0]
        factors = predict_latent_factors(cnn.module, mel_clips(y[None], mel=cnn.mel), crop=cnn.crop, hop=cnn.hop)[0]
        with_upload = np.vstack([catalogue.predicted, factors[None]])
        similar, cosine = nearest_by_cosine(with_upload, len(with_upload) - 1, n=top)
        listeners = catalogue.user_factors @ factors
        best = np.argsort(-listeners, kind="stable")[:top]
        tags = list(tagger.module.hparams.tags)
        return {
            "duration_s": round(len(y) / cnn.mel.sample_rate, 3),
            "tags": sorted(({"tag": t, "score": float(s)} for t, s in zip(tags, scores)), key=lambda r: -r["score"]),
            "factors": [float(v) for v in factors],
            "similar": [_summary(catalogue, int(i), cosine=float(c)) for i, c in zip(similar, cosine)],
            "listeners": [{"user_id": str(catalogue.users[u]), "score": float(listeners[u])} for u in best],
        }

    @app.get("/api/tracks/{track_id}")
    def track(track_id: str, top: int = 5) -> dict:
        catalogue = served.get()
        row = _track(catalogue, track_id)
        top = max(1, min(int(top), 50))
        return {
            **_summary(catalogue, row),
            "has_wmf_factors": bool(np.isfinite(catalogue.wmf[row]).all()),
            "by_wmf": _neighbours(catalogue, catalogue.wmf, row, top),
            "by_predicted": _neighbours(catalogue, catalogue.predicted, row, top),
        }

    @app.get("/api/users/{user_id}/recommendations")
    def recommendations(user_id: str, top: int = 10) -> dict:
        catalogue = served.get()
        if not TRACK_ID.match(user_id):
            raise ApiError(400, "a user id is letters, digits, '.', '_' or '-' (at most 128)")
        where = np.flatnonzero(catalogue.users == user_id)
        if not len(where):
            raise ApiError(404, f"no user {user_id!r} in the factorization")
        new = np.flatnonzero(~catalogue.factorized)  # tracks the factorization never saw: cold start
        candidates = new if len(new) else np.arange(len(catalogue.track_ids))
        scores = catalogue.predicted[candidates] @ catalogue.user_factors[where[0]]
        order = np.argsort(-scores, kind="stable")[: max(1, min(int(top), 100))]
        return {
            "user_id": user_id,
            "candidates": "new tracks (not in the factorization)" if len(new) else "all tracks",
            "tracks": [_summary(catalogue, int(candidates[i]), score=float(scores[i])) for i in order],
        }

    @app.get("/api/map")
    def catalogue_map() -> dict:
        catalogue = served.get()
        return {
            "points": [
                {"track_id": str(t), "x": float(x), "y": float(y), "tags": tags}
                for t, (x, y), tags in zip(catalogue.track_ids, catalogue.coordinates, catalogue.tags)
            ]
        }

    @app.get("/api/audio/{track_id}")
    def audio(track_id: str) -> FileResponse:
        catalogue = served.get()
        row = _track(catalogue, track_id)
        path = Path(catalogue.audio[str(catalogue.track_ids[row])])
        if not path.is_file():
            raise ApiError(404, f"the audio of track {track_id!r} is not on this machine any more")
        media = {
            ".mp3": "audio/mpeg",
            ".wav": "audio/wav",
            ".au": "audio/basic",
            ".flac": "audio/flac",
            ".ogg": "audio/ogg",
        }.get(path.suffix.lower(), "application/octet-stream")
        return FileResponse(path, media_type=media)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")  # the page's own assets: no CDN

    @app.get("/")
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    return app


def copy_upload(source, target: Path, limit: int) -> int:
    """Copy a file object to ``target``, refusing (413) once it passes ``limit`` bytes; returns the size."""
    written = 0
    with open(target, "wb") as out:
        while chunk := source.read(_CHUNK):
            written += len(chunk)
            if written > limit:
                raise UploadError(413, f"the file is larger than the limit of {limit / 2**20:.0f} MB")
            out.write(chunk)
    return written
