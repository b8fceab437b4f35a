"""The job layer behind both front doors: the ``mirflow`` command and the Prefect deployments build equal
settings from equal options, the cluster included, and offer the same options.

No flow runs here: each job's ``run_*`` is replaced by one that raises the plan it was handed,
so that the test sees exactly what each door would run.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
import yaml
from typer.main import get_command
from typer.testing import CliRunner

from core.errors import MirflowError, ParameterError
from core.settings import ClusterSettings
from mirflow import cli, deployments, jobs
from mirflow.environment import DASK_ADDRESS, DATA_DIR, TRACKING_URI

ROOT = Path(__file__).resolve().parents[1]
SCHEDULER = "tcp://127.0.0.1:8786"


class Planned(Exception):
    """What a stubbed ``run_*`` raises: the plan a door built."""

    def __init__(self, plan):
        super().__init__(type(plan).__name__)
        self.plan = plan


def _stub(plan, *args, **kwargs):
    raise Planned(plan)


@pytest.fixture
def doors(tmp_path, monkeypatch):
    """A working directory with inputs in it; the service environment of a deployment with a Dask scheduler;
    every job's run stubbed. Yields the storage root both doors use."""
    for name in dir(jobs):
        if name.startswith("run_"):
            monkeypatch.setattr(jobs, name, _stub)
    monkeypatch.setattr(cli, "_quiet_lightning", lambda: None)
    monkeypatch.chdir(tmp_path)
    for name in ("manifest.csv", "annotations.csv", "a.txt", "b.txt", "heldout.txt"):
        (tmp_path / name).write_text("x\n")
    (tmp_path / "heldout.txt").write_text("item-1\n\nitem-2\n")
    for name in ("audio", "splits", "genres"):
        (tmp_path / name).mkdir()
    data = tmp_path / "store"
    monkeypatch.setenv(DATA_DIR, str(data))
    monkeypatch.setenv(DASK_ADDRESS, SCHEDULER)
    monkeypatch.delenv(TRACKING_URI, raising=False)
    return data


def cli_plan(argv: list[str], data: Path):
    """The plan ``mirflow <argv> --data-dir DATA --cluster address --address SCHEDULER`` builds."""
    result = CliRunner().invoke(cli.app, [*argv, "--data-dir", str(data)])
    assert isinstance(result.exception, Planned), result.output
    return result.exception.plan


def deployment_plan(deployment, **params):
    """The plan a deployment run with ``params`` builds (the flow's function, without a Prefect run)."""
    with pytest.raises(Planned) as caught:
        deployment.fn(**params)
    return caught.value.plan


CLUSTER = ["--cluster", "address", "--address", SCHEDULER]


def _abs(name: str) -> str:
    """An input of the working directory (the test's), as a deployment is given it: absolute."""
    return str(Path.cwd() / name)


# (CLI argv, deployment, its parameters): the same options through both doors, relative paths on the command
# line (read from the working directory) and absolute ones in the deployment.
CASES = {
    "pipeline-synthetic": (
        ["demo", *CLUSTER, "--tracks", "64", "--users", "100", "--clip-seconds", "4", "--seed", "3"]
        + ["--epochs", "2", "--initial-batches", "1", "--model", "short-chunk-resnet", "--objective", "wpe"]
        + ["--devices", "2", "--precision", "16-mixed", "--compile"],
        deployments.pipeline_job,
        lambda: dict(
            tracks=64,
            users=100,
            clip_seconds=4.0,
            seed=3,
            epochs=2,
            initial_batches=1,
            model="short-chunk-resnet",
            objective="wpe",
            devices=2,
            precision="16-mixed",
            compile=True,
        ),
    ),
    "pipeline-defaults": (["demo", *CLUSTER], deployments.pipeline_job, dict),
    "pipeline-mtat": (
        ["pipeline", *CLUSTER, "--annotations", "annotations.csv", "--audio-root", "audio", "--dataset", "ext"]
        + ["--triplets", "a.txt", "--triplets", "b.txt", "--epochs", "1"],
        deployments.pipeline_job,
        lambda: dict(
            dataset="ext",
            annotations=_abs("annotations.csv"),
            audio_root=_abs("audio"),
            triplets=[_abs("a.txt"), _abs("b.txt")],
            epochs=1,
        ),
    ),
    "features": (
        ["features", *CLUSTER, "--adapter", "mtat", "--source", "annotations.csv", "--dataset", "tones"]
        + ["--audio-root", "audio", "--split", "lists", "--split-dir", "splits", "--windows", "512,2048"]
        + ["--hop", "256", "--sample-rate", "22050", "--n-mels", "40", "--pyramid", "gaussian"]
        + ["--pyramid-levels", "3", "--audio-shards", "--files-per-task", "8"],
        deployments.features_job,
        lambda: dict(
            adapter="mtat",
            source=_abs("annotations.csv"),
            dataset="tones",
            audio_root=_abs("audio"),
            split="lists",
            split_dir=_abs("splits"),
            windows="512,2048",
            hop=256,
            sample_rate=22050,
            n_mels=40,
            pyramid="gaussian",
            pyramid_levels=3,
            audio_shards=True,
            files_per_task=8,
        ),
    ),
    "features-defaults": (
        ["features", *CLUSTER, "--adapter", "manifest", "--source", "manifest.csv", "--dataset", "tones"],
        deployments.features_job,
        lambda: dict(adapter="manifest", source=_abs("manifest.csv"), dataset="tones"),
    ),
    "wmf": (
        ["wmf", *CLUSTER, "--listening", "a.txt", "--listening", "b.txt", "--format", "triplets"]
        + ["--heldout-items", "heldout.txt", "--factors", "8", "--regularization", "1.5", "--iterations", "4"]
        + ["--confidence", "linear", "--alpha", "3", "--epsilon", "0.5", "--test-fraction", "0.3"]
        + ["--early-stopping", "2", "--eval-max-users", "10", "--k", "50"],
        deployments.wmf_job,
        lambda: dict(
            listening=[_abs("a.txt"), _abs("b.txt")],
            listening_format="triplets",
            heldout_items=["item-1", "item-2"],
            factors=8,
            regularization=1.5,
            iterations=4,
            confidence="linear",
            alpha=3.0,
            epsilon=0.5,
            test_fraction=0.3,
            early_stopping=2,
            eval_max_users=10,
            k=50,
        ),
    ),
    "wmf-defaults": (
        ["wmf", *CLUSTER, "--listening", "a.txt"],
        deployments.wmf_job,
        lambda: dict(listening=[_abs("a.txt")]),
    ),
    "train-tagger": (
        ["train-tagger", "--dataset", "ext", "--epochs", "3"],
        deployments.train_tagger_job,
        lambda: dict(dataset="ext", epochs=3),
    ),
    "train-recommender": (["train-recommender"], deployments.train_recommender_job, dict),
    "retrain": (
        ["retrain", "--metric", "auc", "--margin", "0.01", "--epochs", "2"],
        deployments.retrain_job,
        lambda: dict(metric="auc", margin=0.01, epochs=2),
    ),
    "study-tagging": (
        ["study", "tagging", *CLUSTER, "--preset", "smoke", "--k", "8", "--epochs", "1", "--tracks", "64"]
        + ["--users", "100", "--clip-seconds", "4", "--seed", "2", "--devices", "2", "--precision", "16-mixed"]
        + ["--compile", "--dataset", "synthetic"],
        deployments.study_tagging_job,
        lambda: dict(
            preset="smoke",
            k=8,
            epochs=1,
            tracks=64,
            users=100,
            clip_seconds=4.0,
            seed=2,
            devices=2,
            precision="16-mixed",
            compile=True,
        ),
    ),
    "study-tagging-end-to-end": (
        ["study", "tagging", *CLUSTER, "--preset", "icassp2014-smoke", "--epochs", "1"],
        deployments.study_tagging_job,
        lambda: dict(preset="icassp2014-smoke", epochs=1),
    ),
    "study-tagging-defaults": (["study", "tagging", *CLUSTER], deployments.study_tagging_job, dict),
    "study-recommendation": (
        ["study", "recommendation", *CLUSTER, "--preset", "nips2013-smoke", "--query", "t1", "--query", "t2"]
        + ["--queries", "3", "--k", "8", "--triplets", "a.txt", "--dataset", "ext", "--epochs", "1"]
        + ["--devices", "2"],
        deployments.study_recommendation_job,
        lambda: dict(
            preset="nips2013-smoke",
            query=["t1", "t2"],
            queries=3,
            k=8,
            triplets=[_abs("a.txt")],
            dataset="ext",
            epochs=1,
            devices=2,
        ),
    ),
    "study-recommendation-defaults": (
        ["study", "recommendation", *CLUSTER],
        deployments.study_recommendation_job,
        dict,
    ),
    "study-transfer": (
        ["study", "transfer", *CLUSTER, "--preset", "ismir2014-smoke", "--cv", "3", "--classifier", "svm"]
        + ["--k", "8", "--triplets", "a.txt", "--tracks", "64", "--epochs", "1", "--precision", "bf16-mixed"],
        deployments.study_transfer_job,
        lambda: dict(
            preset="ismir2014-smoke",
            cv=3,
            classifier="svm",
            k=8,
            triplets=[_abs("a.txt")],
            tracks=64,
            epochs=1,
            precision="bf16-mixed",
        ),
    ),
    "study-transfer-defaults": (["study", "transfer", *CLUSTER], deployments.study_transfer_job, dict),
    "embed": (
        ["embed", *CLUSTER, "--model", "models:/m@champion", "--dataset", "gtz", "--adapter", "gtzan"]
        + ["--source", "genres", "--split", "random", "--split-dir", "splits"],
        deployments.embed_job,
        lambda: dict(
            model="models:/m@champion",
            dataset="gtz",
            adapter="gtzan",
            source=_abs("genres"),
            split="random",
            split_dir=_abs("splits"),
        ),
    ),
    "embed-tracks-table": (
        ["embed", *CLUSTER, "--model", "run-1", "--dataset", "gtz"],
        deployments.embed_job,
        lambda: dict(model="run-1", dataset="gtz"),
    ),
    "transfer": (
        ["transfer", *CLUSTER, "--dataset", "gtz", "--adapter", "manifest", "--source", "manifest.csv"]
        + ["--model", "m1", "--model", "m2", "--feature-set", "pretrained", "--feature-set", "mfcc"]
        + ["--cv", "3", "--classifier", "svm", "--k", "16", "--split", "random", "--split-dir", "splits"]
        + ["--seed", "4"],
        deployments.transfer_job,
        lambda: dict(
            dataset="gtz",
            adapter="manifest",
            source=_abs("manifest.csv"),
            models=["m1", "m2"],
            feature_sets=["pretrained", "mfcc"],
            cv=3,
            classifier="svm",
            k=16,
            split="random",
            split_dir=_abs("splits"),
            seed=4,
        ),
    ),
    "transfer-defaults": (
        ["transfer", *CLUSTER, "--dataset", "gtz"],
        deployments.transfer_job,
        lambda: dict(dataset="gtz"),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_both_doors_build_equal_settings(case, doors):
    argv, deployment, params = CASES[case]
    from_cli = cli_plan(argv, doors)
    from_service = deployment_plan(deployment, **params())
    assert from_cli == from_service
    # The storage root, the MLflow store and (for the jobs that use one) the cluster are the same ones.
    where = getattr(from_cli, "runtime", None) or getattr(from_cli, "settings", from_cli)
    assert where.data_dir == doors.resolve()
    assert where.tracking.tracking_uri == f"sqlite:///{doors.resolve() / 'mlflow.db'}"
    if isinstance(from_cli, jobs.PipelinePlan) or hasattr(from_cli, "runtime"):
        assert where.cluster == ClusterSettings(kind="address", address=SCHEDULER)


def test_the_plans_carry_the_options(doors):
    """A few spot checks that equal plans are also the right ones (both doors could drop the same option)."""
    wmf = cli_plan(CASES["wmf"][0], doors)
    assert wmf.settings.confidence == "linear" and wmf.settings.alpha == pytest.approx(3.0)
    assert wmf.settings.epsilon == pytest.approx(0.5) and wmf.settings.test_fraction == pytest.approx(0.3)
    assert wmf.settings.eval_max_users == 10 and wmf.settings.early_stopping_patience == 2 and wmf.k == 50
    assert wmf.heldout_items == ("item-1", "item-2")
    assert [(s.path, s.format) for s in wmf.sources] == [(Path.cwd() / n, "triplets") for n in ("a.txt", "b.txt")]
    pipeline = cli_plan(CASES["pipeline-synthetic"][0], doors).settings
    assert pipeline.world.n_tracks == 64 and pipeline.world.clip_seconds == pytest.approx(4.0)
    assert pipeline.tagger.model == "short-chunk-resnet" and pipeline.recommender.objective == "wpe"
    assert pipeline.tagger.train.devices == 2 and pipeline.recommender.train.max_epochs == 2
    assert pipeline.retrain.finetune.compile and pipeline.evaluation.map_tags  # the world's styles
    study = cli_plan(CASES["study-tagging"][0], doors)
    assert study.study.kmeans.k == 8 and study.study.mlp.train.devices == 2 and study.world.seed == 2
    transfer = cli_plan(CASES["transfer-defaults"][0], doors)
    assert transfer.settings.feature_sets == ("kmeans", "logmel-stats", "mfcc")  # no model: no "pretrained"
    features = cli_plan(CASES["features"][0], doors)
    assert features.source.path == Path.cwd() / "annotations.csv" and features.source.split_dir == Path.cwd() / "splits"
    assert features.features.mel.n_fft == 512 and features.features.extra_windows == (2048,)


def test_a_deployment_without_a_scheduler_runs_a_local_cluster_like_the_command(doors, monkeypatch):
    monkeypatch.delenv(DASK_ADDRESS)
    from_service = deployment_plan(deployments.wmf_job, listening=[_abs("a.txt")])
    assert from_service.runtime.cluster == ClusterSettings()
    assert cli_plan(["wmf", "--listening", "a.txt"], doors) == from_service


def test_serve_and_world_build_their_settings_in_the_job_layer(doors):
    argv = ["serve", "--wait", "--dataset", "ext", "--port", "8100", "--max-upload-mb", "5", "--decoders", "3"]
    served = cli_plan(argv, doors)
    options = jobs.ServeOptions(dataset="ext", port=8100, max_upload_mb=5.0, decoders=3, wait=True)
    assert served == jobs.plan_serve(jobs.command_runtime(doors), options)
    assert served.limits.max_bytes == 5 * 2**20 and served.limits.max_seconds == pytest.approx(600.0)
    assert jobs.WorldOptions(tracks=64, seed=5).world().model_dump() == {
        **jobs.WorldOptions().world().model_dump(),
        "n_tracks": 64,
        "seed": 5,
    }


# A relative path means the caller's directory on the command line (tested above); a deployment has no such
# directory, so it refuses one, naming the parameter.
RELATIVE = {
    "features-source": (deployments.features_job, dict(adapter="manifest", source="manifest.csv", dataset="x")),
    "features-audio-root": (
        deployments.features_job,
        lambda: dict(adapter="mtat", source=_abs("annotations.csv"), dataset="x", audio_root="audio"),
    ),
    "features-split-dir": (
        deployments.features_job,
        lambda: dict(adapter="gtzan", source=_abs("genres"), dataset="x", split_dir="splits"),
    ),
    "wmf-listening": (deployments.wmf_job, dict(listening=[_abs("a.txt"), "b.txt"])),
    "pipeline-annotations": (
        deployments.pipeline_job,
        lambda: dict(dataset="ext", annotations="annotations.csv", audio_root=_abs("audio"), triplets=[_abs("a.txt")]),
    ),
    "pipeline-triplets": (
        deployments.pipeline_job,
        lambda: dict(dataset="ext", annotations=_abs("annotations.csv"), audio_root=_abs("audio"), triplets=["a.txt"]),
    ),
    "study-triplets": (deployments.study_recommendation_job, dict(triplets=["a.txt"])),
    "embed-source": (deployments.embed_job, dict(model="run-1", dataset="x", adapter="gtzan", source="genres")),
    "transfer-split-dir": (
        deployments.transfer_job,
        lambda: dict(dataset="x", adapter="gtzan", source=_abs("genres"), split_dir="splits"),
    ),
}


@pytest.mark.parametrize("case", sorted(RELATIVE))
def test_a_deployment_refuses_a_relative_path(case, doors):
    deployment, params = RELATIVE[case]
    params = params() if callable(params) else params
    with pytest.raises(ParameterError) as refused:
        deployment.fn(**params)
    option = case.split("-", 1)[1].replace("-", "_")
    message = str(refused.value)
    assert message.startswith(f"{option} '") and "relative path" in message and "absolute path" in message


@pytest.mark.parametrize(
    ("argv", "deployment", "params"),
    [
        (["embed", "--model", "m", "--dataset", "x"], deployments.embed_job, dict(model="m", dataset="x")),
        (["transfer", "--dataset", "x"], deployments.transfer_job, dict(dataset="x")),
    ],
)
def test_a_source_without_an_adapter_is_refused_by_both_doors(argv, deployment, params, doors):
    result = CliRunner().invoke(cli.app, [*argv, "--source", "genres", "--data-dir", str(doors)])
    assert result.exit_code == 2 and "source needs an adapter" in result.output
    with pytest.raises(MirflowError, match="source needs an adapter"):
        deployment.fn(**params, source=_abs("genres"))


def test_a_tagging_study_deployment_refuses_a_preset_of_another_kind(doors):
    with pytest.raises(ParameterError, match="is a recommendation study: run `mirflow study recommendation"):
        deployments.study_tagging_job.fn(preset="nips2013")


# ------------------------------------------------------------------------------------- no option drift

# Each job: its options class, its deployment (None: the command line only), its commands.
DOORS = {
    "pipeline": (jobs.PipelineOptions, deployments.pipeline_job, ["demo", "pipeline"]),
    "features": (jobs.FeaturesOptions, deployments.features_job, ["features"]),
    "wmf": (jobs.WMFOptions, deployments.wmf_job, ["wmf"]),
    "train-tagger": (jobs.TrainOptions, deployments.train_tagger_job, ["train-tagger"]),
    "train-recommender": (jobs.TrainOptions, deployments.train_recommender_job, ["train-recommender"]),
    "retrain": (jobs.RetrainOptions, deployments.retrain_job, ["retrain"]),
    "study-tagging": (jobs.TaggingStudyOptions, deployments.study_tagging_job, ["study tagging"]),
    "study-recommendation": (
        jobs.RecommendationStudyOptions,
        deployments.study_recommendation_job,
        ["study recommendation"],
    ),
    "study-transfer": (jobs.TransferStudyOptions, deployments.study_transfer_job, ["study transfer"]),
    "embed": (jobs.EmbedOptions, deployments.embed_job, ["embed"]),
    "transfer": (jobs.TransferOptions, deployments.transfer_job, ["transfer"]),
    "serve": (jobs.ServeOptions, None, ["serve"]),
    "world": (jobs.WorldOptions, None, ["world"]),
}
# Where a command runs rather than what it does: the storage root, the cluster, the logging.
RUNTIME_FLAGS = {"data_dir", "workers", "cluster", "address", "verbose"}


def _command_params(path: str) -> set[str]:
    command = get_command(cli.app)
    for name in path.split():
        command = command.commands[name]
    return {param.name.removesuffix("_") for param in command.params} - RUNTIME_FLAGS


@pytest.mark.parametrize("job", sorted(DOORS))
def test_both_doors_offer_every_option_of_the_job_with_its_defaults(job):
    options, deployment, commands = DOORS[job]
    fields = {f.name: f for f in dataclasses.fields(options)}
    assert set().union(*(_command_params(c) for c in commands)) == set(fields)
    if deployment is None:
        return
    parameters = inspect.signature(deployment.fn).parameters
    assert set(parameters) == set(fields)
    for name, parameter in parameters.items():
        default = fields[name].default
        if default is not dataclasses.MISSING and default != ():
            assert parameter.default == default, name


def test_prefect_yaml_names_every_deployment_entry_point():
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    entrypoints = {d["name"]: d["entrypoint"] for d in config["deployments"]}
    functions = {name for name, value in vars(deployments).items() if hasattr(value, "fn") and name.endswith("_job")}
    assert {e.split(":")[1] for e in entrypoints.values()} == functions
    assert {e.split(":")[0] for e in entrypoints.values()} == {"mirflow/deployments.py"}
    assert {d for _, d, _ in DOORS.values() if d is not None} == {getattr(deployments, f) for f in functions}
    for deployment in config["deployments"]:
        assert not set(deployment.get("parameters", {})) - set(
            inspect.signature(getattr(deployments, deployment["entrypoint"].split(":")[1]).fn).parameters
        )
