"""The factorization's refit policy (reuse / incremental / full) on small cases, and its fits and files."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from core.settings import WMFSettings
from tasks.listening import PlayMatrix, cold_start_split, load_factors
from tasks.refit import (
    decide_refit,
    factor_files,
    factors_on_disk,
    fit_factorization,
    fold_in_heldout,
    load_model,
    needs_evaluation,
    read_state,
    save_factorization,
    split_key,
    split_plays,
    warm_start_from,
    write_state,
)
from tasks.wmf import WMFModel, fit_wmf

WMF = WMFSettings(factors=4, iterations=4, seed=0)
FIT_KEY = WMF.fit_key()
SPLIT = split_key(["t1", "t2"], WMF)
BATCHES = {"batch-a": "sha-a", "batch-b": "sha-b"}


def _state(**changes) -> dict:
    state = {"fit_key": FIT_KEY, "split": SPLIT, "batches": dict(BATCHES), "model_uri": "runs:/x/model"}
    state.update(changes)
    return state


def _decide(state, contents=BATCHES, *, have_factors=True, fit_key=FIT_KEY, split=SPLIT):
    return decide_refit(state, fit_key=fit_key, split=split, contents=contents, have_factors=have_factors)


def test_the_same_batches_with_the_same_settings_are_reused():
    decision = _decide(_state())
    assert decision.mode == "reused"
    assert decision.previous == BATCHES


def test_new_batches_beside_unchanged_ones_update_incrementally():
    decision = _decide(_state(), {**BATCHES, "batch-c": "sha-c"})
    assert decision.mode == "incremental"
    assert decision.previous == BATCHES  # what the update starts from (the run's tag)
    assert "batch-c" in decision.reason


@pytest.mark.parametrize(
    ("state", "contents", "have_factors", "why"),
    [
        (None, BATCHES, True, "no previous factorization"),
        (_state(fit_key={**FIT_KEY, "factors": 99}), BATCHES, True, "fit settings"),
        (_state(split=split_key(None, WMF)), BATCHES, True, "split"),
        (_state(), {**BATCHES, "batch-c": "sha-c"}, False, "missing"),
        (_state(), BATCHES, False, "missing"),
        (_state(model_uri=""), BATCHES, True, "no model"),
        (_state(), {"batch-a": "sha-a", "batch-b": "changed", "batch-c": "sha-c"}, True, "batch-b"),
        (_state(), {"batch-a": "sha-a"}, True, "batch-b"),  # a batch dropped
    ],
)
def test_anything_else_refits_in_full_and_says_why(state, contents, have_factors, why):
    decision = _decide(state, contents, have_factors=have_factors)
    assert decision.mode == "full"
    assert why in decision.reason


def test_the_previous_batches_are_only_those_of_the_same_setup():
    assert _decide(_state(split=split_key(["t3"], WMF))).previous == {}
    assert _decide(_state(), {"batch-a": "sha-a"}).previous == BATCHES


def test_reused_factors_are_evaluated_again_only_for_another_k_or_no_table():
    key = {"k": 10, "eval_max_users": 0}
    assert not needs_evaluation({"eval_key": key, "rows": [{"name": "WMF"}]}, key)
    assert needs_evaluation({"eval_key": {**key, "k": 20}, "rows": [{"name": "WMF"}]}, key)
    assert needs_evaluation({"eval_key": key, "rows": []}, key)
    assert needs_evaluation({}, key)


def test_split_keys_name_the_protocol_and_ignore_the_order_of_held_out_ids():
    assert split_key(["b", "a"], WMF) == split_key(["a", "b"], WMF)
    assert split_key(["a"], WMF) != split_key(["a", "b"], WMF)
    assert split_key(None, WMF) == {"protocol": "in-matrix", "test_fraction": WMF.test_fraction}


def test_the_state_keeps_the_order_of_its_batches(tmp_path):
    assert read_state(tmp_path) is None
    (tmp_path / "state.json").write_text("{not json")
    assert read_state(tmp_path) is None
    state = _state(batches={"z-batch": "1", "a-batch": "2"})
    write_state(tmp_path, state)
    assert list(read_state(tmp_path)["batches"]) == ["z-batch", "a-batch"]


def _matrix(seed: int = 0, n_users: int = 60, n_items: int = 40) -> PlayMatrix:
    rng = np.random.default_rng(seed)
    dense = np.where(rng.random((n_users, n_items)) < 0.25, rng.integers(1, 9, (n_users, n_items)), 0)
    dense[:, 0] = 1  # every user has a play
    return PlayMatrix(
        plays=sp.csr_matrix(dense.astype(np.float32)),
        users=np.array([f"u{i}" for i in range(n_users)], dtype=object),
        items=np.array([f"i{i}" for i in range(n_items)], dtype=object),
    )


def test_early_stopping_picks_the_sweeps_then_refits_on_all_training_plays():
    train = _matrix()
    settings = WMFSettings(factors=4, iterations=6, early_stopping_patience=2, seed=0)
    swept = []
    with threadpool_limits(1):
        model = fit_factorization(train, settings, k=5, on_sweep=lambda: swept.append(1))
        again = fit_wmf(train.plays, settings=settings, iterations=model.iterations)
    assert model.validation and 1 <= model.iterations <= settings.iterations
    assert len(swept) == model.validation[-1][0]  # the sweeps of the validated fit
    # The returned factors are the refit on all of train for the chosen number of sweeps.
    np.testing.assert_allclose(model.user_factors, again.user_factors, rtol=1e-4, atol=1e-5)
    assert model.user_factors.shape == (train.plays.shape[0], 4)


def _random_model(train: PlayMatrix, factors: int = 4) -> WMFModel:
    """Factors of the right shapes for a file round trip."""
    rng = np.random.default_rng(1)
    return WMFModel(
        rng.standard_normal((train.plays.shape[0], factors)).astype(np.float32),
        rng.standard_normal((train.plays.shape[1], factors)).astype(np.float32),
    )


def test_factors_are_saved_and_read_back_and_warm_start_keeps_known_keys(tmp_path):
    matrix = _matrix()
    split = split_plays(matrix, ["i1", "i2", "i3"], WMF)
    assert split.test.items.tolist() == ["i1", "i2", "i3"]
    with threadpool_limits(1):
        model = fit_factorization(split.train, WMF, k=5)
    heldout = fold_in_heldout(model, split, WMF)
    files = factor_files(tmp_path)
    assert not factors_on_disk(files, cold_start=True)
    paths = save_factorization(files, split, model, heldout)
    assert set(paths) == {"user_factors", "item_factors", "heldout_item_factors", "heldout_plays"}
    assert factors_on_disk(files, cold_start=True)
    loaded, loaded_heldout = load_model(files, cold_start=True)
    np.testing.assert_allclose(loaded.item_factors, model.item_factors, rtol=1e-6)
    np.testing.assert_allclose(loaded_heldout, heldout, rtol=1e-6)
    init, counts = warm_start_from(files, split.train, WMF)
    assert counts["new_users"] == 0 and counts["new_items"] == 0
    np.testing.assert_allclose(init.user_factors, model.user_factors, rtol=1e-6)
    # In-matrix after cold start: the held-out files go.
    in_matrix = split_plays(matrix, None, WMF)
    save_factorization(files, in_matrix, _random_model(in_matrix.train), None)
    assert not files["heldout_plays"].exists() and not files["heldout_item_factors"].exists()
    assert load_factors(files["item_factors"])[0].tolist() == in_matrix.train.items.tolist()


def test_cold_start_split_is_the_listening_split():
    matrix = _matrix()
    ours = split_plays(matrix, ["i5"], WMF)
    theirs = cold_start_split(matrix, heldout_items=np.asarray(["i5"], dtype=object))
    assert (ours.test.plays != theirs.test.plays).nnz == 0
