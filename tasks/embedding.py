"""Embeddings of a catalogue by a pre-trained source model (ISMIR 2014): the network's hidden activations.

One Parquet file per catalogue and model, ``track_id, embedding, model_uri, model_run_id``, its schema
metadata naming the model and the K-means features it was computed from (``mirflow.*`` keys), so that a
file read on its own says where it came from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import torch

from core.errors import DatasetError
from core.storage import parquet_schema, read_parquet, write_parquet


class Embedder(Protocol):
    """Anything with the pre-trained network's ``embed``: raw feature rows -> hidden activations."""

    def embed(self, x: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class EmbeddingProvenance:
    """Where a file of embeddings came from: the model and the K-means features it encoded."""

    model_uri: str
    model_run_id: str
    model_name: str  # e.g. "tags · mlp-1"
    kmeans_feature_set: str  # the K-means features' folder name
    kmeans_manifest_sha1: str  # their manifest's hash ("" when absent)

    def metadata(self) -> dict[str, str]:
        return {
            "mirflow.model_uri": self.model_uri,
            "mirflow.model_run_id": self.model_run_id,
            "mirflow.model": self.model_name,
            "mirflow.kmeans_feature_set": self.kmeans_feature_set,
            "mirflow.kmeans_manifest_sha1": self.kmeans_manifest_sha1,
        }


@torch.no_grad()
def embed_vectors(module: Embedder, vectors: np.ndarray, *, batch_size: int = 1024) -> np.ndarray:
    """The module's embedding of each row of ``vectors``, in batches of ``batch_size`` rows.

    Parameters
    ----------
    module : Embedder
        In eval mode (dropout off), on the CPU.
    vectors : np.ndarray [shape=(n, n_inputs)]
        Raw K-means feature vectors; cast to float32.

    Returns
    -------
    np.ndarray [shape=(n, dims), dtype=float32]
    """
    parts = [
        module.embed(torch.from_numpy(np.ascontiguousarray(vectors[i : i + batch_size], dtype=np.float32)))
        for i in range(0, len(vectors), batch_size)
    ]
    return torch.cat(parts).numpy().astype(np.float32, copy=False)


def write_embeddings(
    path: Path, track_ids: Sequence[str], embeddings: np.ndarray, *, provenance: EmbeddingProvenance
) -> Path:
    """``track_id, embedding`` Parquet, tagged (schema metadata and columns) with the model that made it; atomic.

    ``embeddings`` is (len(track_ids), dims); a non-finite row is refused (:class:`~core.errors.DatasetError`)
    and nothing is written.
    """
    embeddings = np.asarray(embeddings)
    if not np.isfinite(embeddings).all():
        raise DatasetError(f"{int((~np.isfinite(embeddings)).any(axis=1).sum())} embeddings are not finite")
    track_ids = list(track_ids)
    table = pa.table(
        {
            "track_id": pa.array(track_ids, pa.string()),
            "embedding": pa.array(list(embeddings), pa.list_(pa.float32())),
            "model_uri": pa.array([provenance.model_uri] * len(track_ids), pa.string()),
            "model_run_id": pa.array([provenance.model_run_id] * len(track_ids), pa.string()),
        }
    ).replace_schema_metadata(provenance.metadata())
    # pyarrow's own defaults (snappy, one row group): the bytes, and so the digest a run logs, stay as they were.
    return write_parquet(path, table, compression="snappy")


def read_embeddings(path: Path) -> dict[str, np.ndarray]:
    """``{track_id: (dims,) float32}`` of a file written by :func:`write_embeddings`."""
    table = read_parquet(path, columns=["track_id", "embedding"])
    return {
        t: np.asarray(e, dtype=np.float32)
        for t, e in zip(table.column("track_id").to_pylist(), table.column("embedding").to_pylist())
    }


def embedding_model(path: Path) -> tuple[str, str]:
    """(model name, model run id) of an embeddings file, from its schema metadata; ``"?"`` where missing."""
    meta = parquet_schema(path).metadata or {}
    return meta.get(b"mirflow.model", b"?").decode(), meta.get(b"mirflow.model_run_id", b"?").decode()
