"""Flows: write the synthetic world (MTAT-style clips + Taste Profile triplets) and its GTZAN-like target catalogue."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from prefect import flow

from core.settings import ClusterSettings, WorldSettings
from infra.cluster import chunked, dask_client, map_batches
from tasks import synth

log = logging.getLogger("mirflow")
CLIPS_PER_TASK = 16


@flow(name="synthetic-world")
def synthetic_world(root: Path, world: WorldSettings, cluster: ClusterSettings) -> Path:
    """Render the world under ``root`` unless a complete one with the same settings is there.

    An interrupted run resumes: clips already on disk are not rendered again.
    """
    root = Path(root)
    if synth.world_is_complete(root, world):
        log.info("synthetic world already complete at %s", root)
        return root
    if synth.begin_world(root, world):
        log.warning("removed a synthetic world made with other settings from %s", root)
    tracks = synth.plan_world(world)
    with dask_client(cluster) as client:
        map_batches(
            client,
            synth.render_clips,
            chunked(tracks, CLIPS_PER_TASK),
            description="render synthetic clips",
            unit="clips",
            size=len,
            root=root,
            settings=world,
        )
    synth.write_annotations(tracks, root=root)
    synth.write_listening(tracks, root=root, settings=world)
    synth.write_truth(tracks, root=root, settings=world)
    return root


@flow(name="synthetic-target")
def synthetic_target(
    root: Path, world: WorldSettings, cluster: ClusterSettings, *, n_tracks: int = 200, seed: int = 1
) -> Path:
    """Render the GTZAN-like target catalogue under ``root`` unless a complete one with the same settings is there.

    Meant for ``<world root>/gtzan``, where :func:`tasks.datasets.gtzan_tracks` reads it
    as it reads GTZAN. ``world`` supplies the seed, sample rate and clip length; an
    interrupted run resumes (clips already on disk are not rendered again), and a
    catalogue made with other settings is removed first.
    """
    root = Path(root)
    if synth.target_is_complete(root, world, n_tracks=n_tracks, seed=seed):
        log.info("synthetic target catalogue already complete at %s", root)
        return root
    if synth.begin_target(root, world, n_tracks=n_tracks, seed=seed):
        log.warning("removed a synthetic target catalogue made with other settings from %s", root)
    tracks = synth.plan_target(world, n_tracks=n_tracks, seed=seed)
    with dask_client(cluster) as client:
        map_batches(
            client,
            functools.partial(synth.render_target, root),
            chunked(tracks, CLIPS_PER_TASK),
            description="render target clips",
            unit="clips",
            size=len,
            settings=world,
        )
    synth.write_target_truth(tracks, root=root, settings=world, n_tracks=n_tracks, seed=seed)
    return root
