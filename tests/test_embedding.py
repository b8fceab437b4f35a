"""Embeddings (tasks.embedding), the transfer's inputs (tasks.feature_sets) and the pre-trained model
resource (infra.pretrained): inference in batches, the files and their provenance, and every way a model
reference or a downloaded model can be unusable."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from core.errors import DatasetError, ParameterError
from core.settings import FeatureSettings, KMeansSettings
from core.storage import parquet_schema, write_frame
from infra.pretrained import PRETRAINED, PRETRAINED_KIND, Pretrained, model_uri_of, read_pretrained
from tasks.embedding import EmbeddingProvenance, embed_vectors, embedding_model, read_embeddings, write_embeddings
from tasks.feature_sets import read_target_tracks, target_with_features, tracks_without_features
from tasks.transfer import TransferError

PROVENANCE = EmbeddingProvenance(
    model_uri="runs:/abc/model",
    model_run_id="abc" * 10 + "de",
    model_name="tags · mlp-1",
    kmeans_feature_set="km-set",
    kmeans_manifest_sha1="f00",
)


class _Doubler:
    """An embedder: each row's first two features, doubled (and counts its batches)."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dtype == torch.float32
        self.batches.append(len(x))
        return 2 * x[:, :2]


def test_embeddings_are_computed_in_batches_as_float32():
    vectors = np.arange(35, dtype=np.float64).reshape(7, 5)
    module = _Doubler()
    out = embed_vectors(module, vectors, batch_size=3)
    assert module.batches == [3, 3, 1]
    assert out.dtype == np.float32 and out.shape == (7, 2)
    np.testing.assert_allclose(out, 2 * vectors[:, :2], rtol=1e-6)


def test_embeddings_files_carry_their_model(tmp_path):
    path = tmp_path / "emb" / "m.parquet"
    vectors = np.array([[0.5, 1.0], [2.0, -1.0], [0.0, 3.0]], dtype=np.float32)
    assert write_embeddings(path, ["b", "a", "c"], vectors, provenance=PROVENANCE) == path
    back = read_embeddings(path)
    assert list(back) == ["b", "a", "c"]
    np.testing.assert_allclose(back["a"], [2.0, -1.0])
    assert back["a"].dtype == np.float32
    assert embedding_model(path) == ("tags · mlp-1", PROVENANCE.model_run_id)
    meta = parquet_schema(path).metadata
    assert meta[b"mirflow.kmeans_feature_set"] == b"km-set" and meta[b"mirflow.kmeans_manifest_sha1"] == b"f00"
    assert [p.name for p in path.parent.iterdir()] == ["m.parquet"]  # no temporary file left


def test_non_finite_embeddings_are_refused_and_nothing_is_written(tmp_path):
    path = tmp_path / "m.parquet"
    with pytest.raises(DatasetError, match="1 embeddings are not finite"):
        write_embeddings(path, ["a", "b"], np.array([[1.0, np.nan], [0.0, 1.0]]), provenance=PROVENANCE)
    assert not path.exists()


def _target(tmp_path) -> pd.DataFrame:
    frame = pd.DataFrame(
        {
            "track_id": [f"t{i}" for i in range(8)],
            "split": ["train", "train", "valid", "valid", "test", "test", "train", "train"],
            "tags": [["rock"], ["jazz"], ["rock"], ["jazz"], ["rock"], ["jazz"], ["rock"], ["jazz"]],
            "source_path": ["x"] * 8,
        }
    )
    write_frame(tmp_path / "tracks.parquet", frame)
    return read_target_tracks(tmp_path / "tracks.parquet")


def test_only_tracks_every_feature_set_covers_are_classified(tmp_path):
    tracks = _target(tmp_path)
    assert list(tracks.columns) == ["track_id", "split", "labels"]
    vectors = {
        "a": {f"t{i}": np.full(2, i, dtype=np.float32) for i in range(8)},
        "b": {f"t{i}": np.full(3, i, dtype=np.float32) for i in range(8) if i != 6},
    }
    assert tracks_without_features(tracks, vectors) == ["t6"]
    target = target_with_features(tracks, vectors, cv=None)
    assert target.track_ids == ("t0", "t1", "t2", "t3", "t4", "t5", "t7")
    assert target.labels[1] == ("jazz",) and target.splits.tolist()[4] == "test"
    assert target.check.classes == ("jazz", "rock")
    np.testing.assert_allclose(target.matrix(vectors["b"])[:, 0], [0, 1, 2, 3, 4, 5, 7])


def test_a_target_emptied_by_failed_decodes_is_refused(tmp_path):
    tracks = _target(tmp_path)
    vectors = {"a": {t: np.zeros(2) for t in ("t0", "t1", "t2", "t3")}}  # no test track left
    with pytest.raises(TransferError):
        target_with_features(tracks, vectors, cv=None)


# ----------------------------------------------------------------------------- the pre-trained model resource


def test_model_references():
    run = "0123456789abcdef" * 2
    assert model_uri_of(f" {run} ") == f"runs:/{run}/model"
    assert model_uri_of(f"models:/{PRETRAINED}-tags-mlp-1@champion") == f"models:/{PRETRAINED}-tags-mlp-1@champion"
    assert model_uri_of("runs:/x/model") == "runs:/x/model"
    with pytest.raises(ParameterError, match="run id \\(32 hex digits\\) or models:/") as err:
        model_uri_of("champion")
    assert "--" not in str(err.value)  # the library's words, no command-line flag


def _model_folder(tmp_path, config: dict | str | None, *, checkpoint: bool = True):
    artifacts = tmp_path / "model" / "artifacts"
    artifacts.mkdir(parents=True)
    if config is not None:
        (artifacts / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if checkpoint:
        (artifacts / "model.ckpt").write_bytes(b"not a checkpoint")
    return tmp_path / "model"


CONFIG = {
    "kind": PRETRAINED_KIND,
    "name": "tags · mlp-1",
    "features": FeatureSettings().model_dump(mode="json"),
    "kmeans": KMeansSettings(k=8).model_dump(mode="json"),
    "timescales": ["mel_1024"],
}


def test_a_downloaded_source_model_is_read_with_its_settings(tmp_path):
    model = read_pretrained(_model_folder(tmp_path, CONFIG), model_uri="runs:/r/model", run_id="f" * 32)
    assert isinstance(model, Pretrained)
    assert model.kmeans.k == 8 and model.timescales == ("mel_1024",)
    assert model.tag == "tags-mlp-1-ffffffff"
    assert model.codebooks.name == "codebooks" and model.checkpoint.name == "model.ckpt"
    with pytest.raises(ParameterError, match="could not be loaded"):  # a truncated checkpoint
        model.module()


@pytest.mark.parametrize(
    ("config", "checkpoint", "message"),
    [
        (None, True, "not a pre-trained source model of mirflow \\(no config.json\\)"),
        ("{oops", True, "config.json is not JSON"),
        ({**CONFIG, "kind": "tagger"}, True, "is a tagger model, not a pre-trained source model"),
        (CONFIG, False, "checkpoint is missing"),
        ({k: v for k, v in CONFIG.items() if k != "kmeans"}, True, "does not describe a model .*KeyError"),
        ({**CONFIG, "kmeans": {"k": 1}}, True, "does not describe a model .*ValidationError"),
    ],
)
def test_unusable_model_folders_are_parameter_errors(tmp_path, config, checkpoint, message):
    folder = _model_folder(tmp_path, config, checkpoint=checkpoint)
    with pytest.raises(ParameterError, match=message) as err:
        read_pretrained(folder, model_uri="runs:/r/model", run_id="r", ref="my-ref")
    assert "'my-ref'" in str(err.value) and "--model" not in str(err.value)
