"""The retrain flow: download -> validate -> train -> merge -> batch inference -> evaluate -> register
(-> promote, with `registry.auto_promote`).

One MLflow parent run per flow run, a child run per step. The dataset snapshot and the merged model are
versioned with DVC; their hashes, the git commit and the Prefect flow-run id tag the run and the model
version. Download and validation are cached on their inputs and the content of the files they read, so a
rerun with unchanged inputs reuses them (the log says `Cached`). A retry of a flow run (`prefect flow-run retry`)
goes on in the run folder its first try made: train, merge, the eval predictions that finished and the registration
are reused too, and an eval job it stopped answers only the shards it had not finished. A cached result is reused only
while the files and folders it names are there (`tasks.caching.run_or_reuse`): a retry after the run folder's train/
or merged/ was deleted runs that step again. A flow run registers one version per merged model: a retry after
register, say of a failed promotion, keeps that version and its alias as the earlier try left them while its merge is
reused (the version's `prefect_merge_task_run_id` tag names the merge task run), and runs the steps after register
again; a retry that merged again (merged/ or train/ deleted since) evaluates and registers the new model as a new
version, which takes the alias, the earlier version left as it was. The registered version carries its whole lineage
(vlmops.registry.lineage); the flow run has two artifacts: a summary with links to the MLflow run and model version,
and a table of eval samples.

A retry goes on in the MLflow parent run its earlier try opened (found by the flow run's id and run folder tags),
which ends FINISHED when the retry succeeds: one parent run per flow run, whose id the registered version's
`mlflow_run_id` tag names. Each try logs a child run under it for every step it reaches; a step whose result the
retry reused logs that result again in its own child run, tagged `cached: True` (`base.cached` / `finetuned.cached`
for the eval predictions), beside the earlier try's child run that did the work (and holds its live loss curve).

    vlmops run --config pipeline.yaml --set train.epochs=2
    prefect deployment run retrain/scheduled --param overrides='["train.epochs=2"]'
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run as prefect_flow_run
from prefect.states import State

from flows import refuses_bad_settings
from flows.launch import errors_after_prefect_reports, patient_ephemeral_server
from flows.promote import promote
from flows.run_folder import flow_run_folder, write_run_config
from tasks.caching import run_or_reuse
from tasks.download import fetch_base_model, log_download
from tasks.evaluate import evaluate, log_evaluation
from tasks.infer import batch_infer_task, log_batch
from tasks.merge import log_merge, merge
from tasks.register import register
from tasks.report import FLOW_RUN_TAG, flow_run_tags, publish_samples, publish_summary
from tasks.retry import names_unreachable_service, retry_this_flow_run
from tasks.train import log_training, train_model
from tasks.validate import log_validation, validate_dataset
from tasks.version import dvc_store, version_path
from vlmops.config import dump_config, load_config
from vlmops.data.prepare import dataset_inputs
from vlmops.errors import RunFailed, UserInputError
from vlmops.evaluate.run import BASE_PREDICTIONS, EVAL_DIR, PREDICTIONS
from vlmops.evaluate.samples import sample_rows
from vlmops.infer.resolve import RETRAIN_MODEL_DIR
from vlmops.models.download import local_source_path
from vlmops.redact import redact_log_handlers, redact_text, redact_uri
from vlmops.registry.lineage import version_tags
from vlmops.tracking import MlflowLinks, Tracker, git_commit, mlflow_links, ui_command

SUMMARY_KEY = "retrain-summary"
SAMPLES_KEY = "retrain-eval-samples"


@dataclass
class RunSummary:
    """What a person wants to know when the run ends; also written as summary.json."""

    base_accuracy: float | None
    finetuned_accuracy: float
    model_name: str
    model_version: str
    model_alias: str
    mlflow_run_id: str
    mlflow_tracking_uri: str
    mlflow_ui: str
    run_dir: str
    dataset_dvc_md5: str | None
    model_dvc_md5: str | None
    seconds: float
    promotion: str | None = None
    """promoted / rejected / unchanged when `registry.auto_promote` ran the gate, else None."""
    alias_version: str | None = None
    """The version `model_alias` names: this run's, unless a run registering at the same time made a newer one."""

    def alias_text(self) -> str:
        if self.alias_version in (None, self.model_version):
            return f"@{self.model_alias}"
        return f"@{self.model_alias} is on version {self.alias_version}, newer, from a run at the same time"

    @property
    def promotion_failed(self) -> bool:
        return (self.promotion or "").startswith("failed")

    def text(self) -> str:
        base = "n/a" if self.base_accuracy is None else f"{self.base_accuracy:.3f}"
        lines = [
            "",
            "vlmops retrain: trained and registered; the promotion failed"
            if self.promotion_failed
            else "vlmops retrain: done",
            f"  accuracy (exact match)  base {base}  ->  fine-tuned {self.finetuned_accuracy:.3f}",
            f"  registered model        {self.model_name} version {self.model_version} ({self.alias_text()})",
            f"  MLflow run              {self.mlflow_run_id}",
            f"  MLflow store            {self.mlflow_tracking_uri}",
            f"  open the UI             {self.mlflow_ui}",
            f"  run folder              {self.run_dir}",
        ]
        if self.dataset_dvc_md5:
            lines.append(f"  DVC dataset / model     {self.dataset_dvc_md5} / {self.model_dvc_md5}")
        if self.promotion:
            lines.append(f"  promotion               {self.promotion}")
        lines.append(f"  took                    {self.seconds:.0f} s")
        return "\n".join(lines)

    def markdown(self, links: MlflowLinks) -> str:
        """The flow run's summary artifact: the numbers, and links to the MLflow run and model version."""
        base = "n/a" if self.base_accuracy is None else f"{self.base_accuracy:.3f}"
        failed = " (promotion failed)" if self.promotion_failed else ""
        lines = [
            f"# retrain: {self.model_name} version {self.model_version} ({self.alias_text()}){failed}",
            "",
            "| accuracy (exact match) | base | fine-tuned |",
            "| --- | --- | --- |",
            f"| eval split | {base} | {self.finetuned_accuracy:.3f} |",
            "",
            f"- MLflow run: [{self.mlflow_run_id}]({links.run})",
            f"- Model version: [{self.model_name} v{self.model_version}]({links.model_version})",
            f"- MLflow store: `{self.mlflow_tracking_uri}` (local store: `{self.mlflow_ui}`)",
            f"- Run folder: `{self.run_dir}`",
        ]
        if self.dataset_dvc_md5:
            lines.append(f"- DVC dataset / model: `{self.dataset_dvc_md5}` / `{self.model_dvc_md5}`")
        if self.promotion:
            lines.append(f"- Promotion: {self.promotion}")
        lines.append(f"- Took {self.seconds:.0f} s")
        return "\n".join(lines) + "\n"


class PromotionFailed(RunFailed):
    """`registry.auto_promote`'s promotion failed after the version was registered; carries the run's summary
    (written as summary.json too). Its exit code is the promotion error's: 2 for bad input, else 1."""

    def __init__(self, message: str, summary: RunSummary | None = None, summary_file: str = "", exit_code: int = 1):
        super().__init__(message)  # the message alone in args: the exception pickles (and Prefect may pickle it)
        self.summary = summary
        self.summary_file = summary_file
        self.exit_code = exit_code

    @classmethod
    def after(cls, summary: RunSummary, summary_file: str, cause: BaseException) -> PromotionFailed:
        message = (
            f"{summary.model_name} version {summary.model_version} was trained and registered "
            f"(@{summary.model_alias}; summary {summary_file}), but its promotion failed: {type(cause).__name__}: "
            f"{redact_text(str(cause))}\nfix that and promote it with `vlmops promote --challenger "
            f"{summary.model_version}`: no need to train again"
        )
        bad_input = isinstance(cause, (UserInputError, ValueError, FileNotFoundError))
        return cls(message, summary, summary_file, 2 if bad_input else 1)


RUN_FOLDER_TAG = "run_folder"
"""The lineage tag naming the run folder (under `run.output_dir`/runs) that holds a run's training and merged model."""

MERGE_TAG = "prefect_merge_task_run_id"
"""The lineage tag naming the merge task run that made the registered model (`MergeResult.task_run_id`): the same for
every try that reuses that merge, another once a retry merges again."""


def _cached(state: State) -> bool:
    return state.name == "Cached"


def _after_an_outage() -> str:
    """What to run once the server that did not answer is back, and what it reuses."""
    return (
        f"retry this flow run to reuse the steps that finished: {retry_this_flow_run(__file__, 'retrain')}; a new run "
        "reuses only the download and the validation. A retry reads the flow run's config as it was: after fixing a URL "
        "in it, start a new run"
    )


@flow(name="retrain")
@refuses_bad_settings
@names_unreachable_service(_after_an_outage, new_run="start a new run: it reuses only the download and the validation")
def retrain(config_path: str = "pipeline.yaml", overrides: list[str] | None = None) -> dict[str, Any]:
    """Fine-tune, evaluate and register a DeepSeek-VL model as pipeline.yaml (plus overrides) says."""
    started = time.time()
    redact_log_handlers()  # Prefect's handlers (console, API) are set up by now
    logger = get_run_logger()
    config = load_config(config_path, overrides)
    output_dir = Path(config.run.output_dir).resolve()
    this_run = prefect_flow_run.id or ""
    run_dir = flow_run_folder(output_dir / "runs", this_run)
    if (run_dir / "config.yaml").is_file():
        logger.info("try %d of flow run %s: going on in %s", prefect_flow_run.run_count, this_run, run_dir)
    run_id = run_dir.name
    config_file = run_dir / "config.yaml"
    write_run_config(config_file, dump_config(config))
    tracker = Tracker(config.tracking, artifact_root=output_dir / "mlartifacts")
    lineage = {"git_commit": git_commit() or "unknown", **flow_run_tags(), RUN_FOLDER_TAG: run_id}

    # One parent run per flow run and run folder: a retry goes on in the one its earlier try opened.
    with tracker.run(f"{config.run.name}-{run_id}", tags=lineage, once_per=(FLOW_RUN_TAG, RUN_FOLDER_TAG)) as parent:
        tracker.log_params(parent, config.to_flat_dict())
        tracker.log_artifact(parent, config_file)

        with tracker.run("download_model", parent) as step:
            snapshot, cached = fetch_base_model(
                config.model, config.storage, str(output_dir), local_source_path(config)
            )
            log_download(tracker, step, snapshot, cached)

        train_file, eval_file = dataset_inputs(config)
        with tracker.run("validate_dataset", parent) as step:
            args = (
                config.data,
                str(train_file),
                str(eval_file) if eval_file else None,
                str(snapshot.path),
                str(output_dir),
                config.model.system_prompt,
                config.storage,
                config.run.seed,
                [str(path) for path in dvc_store(config).writes()] if config.versioning.enabled else None,
            )
            dataset, cached = run_or_reuse(validate_dataset, *args)
            log_validation(tracker, step, dataset, cached)
            data_version = version_path(config, str(dataset.path)) if config.versioning.enabled else None
            if data_version:
                tracker.set_tags(step, {"dvc.md5": data_version.md5, "dvc.file": data_version.dvc_file})

        with tracker.run("train", parent) as step:
            trained, cached = run_or_reuse(
                train_model,
                str(config_file),
                str(snapshot.path),
                str(dataset.path),
                str(run_dir / "train"),
                tracker.uri,
                step,
            )
            log_training(tracker, step, trained, cached)

        with tracker.run("merge", parent) as step:
            merged, cached = run_or_reuse(
                merge,
                str(trained.run_dir),
                str(run_dir / RETRAIN_MODEL_DIR),
                config.merge.parity_atol,
                config.model.dtype,
            )
            log_merge(tracker, step, merged, cached)
            model_version = version_path(config, str(merged.path)) if config.versioning.enabled else None
            if model_version:
                tracker.set_tags(step, {"dvc.md5": model_version.md5, "dvc.file": model_version.dvc_file})

        with tracker.run("batch_infer", parent) as step:
            evaluation = run_dir / EVAL_DIR  # the layout `vlmops eval` writes too
            evaluation.mkdir(exist_ok=True)  # a retry's: its jobs go on from the shards they finished
            base = None
            if config.eval.evaluate_base:
                base, cached = run_or_reuse(
                    batch_infer_task,
                    str(snapshot.path),
                    str(dataset.eval_file),
                    str(evaluation / BASE_PREDICTIONS),
                    config,
                )
                log_batch(tracker, step, "base", base, cached)
            tuned, cached = run_or_reuse(
                batch_infer_task,
                str(merged.path),
                str(dataset.eval_file),
                str(evaluation / PREDICTIONS),
                config,
            )
            log_batch(tracker, step, "finetuned", tuned, cached)

        with tracker.run("evaluate", parent) as step:
            result = evaluate(str(evaluation), str(dataset.eval_file), str(merged.path), tuned, base)
            log_evaluation(tracker, step, result)
            metrics = result.metrics()
            tracker.log_metrics(parent, metrics)

        tags = {
            **version_tags(
                config=config,
                run={**lineage, "mlflow_run_id": parent, MERGE_TAG: merged.task_run_id},
                base_model={
                    "id": snapshot.id,
                    "revision": snapshot.revision,
                    "source": snapshot.source,
                    "manifest_hash": snapshot.digest,
                },
                dataset_path=str(dataset.path),
                dataset_hash=dataset.content_hash,
                data_version=data_version,
                model_version=model_version,
            ),
            **{k: f"{v:.4f}" for k, v in metrics.items()},
        }
        with tracker.run("register", parent) as step:
            # Once per flow run and merged model: a retry takes the version its earlier try registered (the task run
            # is `Cached`), or finishes the one that try created before it failed (its alias not set yet), while the
            # merge is that try's; a retry that merged again registers the new model as a version of its own.
            registered = register(
                tracker,
                step,
                str(merged.path),
                config.registry.model_name,
                config.registry.alias,
                tags,
                model_version,
                once_per=(FLOW_RUN_TAG, RUN_FOLDER_TAG, MERGE_TAG),
                return_state=True,
            )
            version = registered.result()
            tracker.set_tags(
                step, {"model_name": version.name, "model_version": version.version, "cached": _cached(registered)}
            )
        tracker.set_tags(parent, {k: v for k, v in tags.items() if k.startswith("dvc.")})

    summary = RunSummary(
        base_accuracy=metrics.get("base_accuracy"),
        finetuned_accuracy=metrics["finetuned_accuracy"],
        model_name=version.name,
        model_version=version.version,
        model_alias=version.alias,
        alias_version=version.alias_version,
        mlflow_run_id=parent,
        mlflow_tracking_uri=redact_uri(tracker.uri),
        mlflow_ui=ui_command(tracker.uri),
        run_dir=str(run_dir),
        dataset_dvc_md5=data_version.md5 if data_version else None,
        model_dvc_md5=model_version.md5 if model_version else None,
        seconds=time.time() - started,
    )
    promotion_error: Exception | None = None
    if config.registry.auto_promote:
        try:
            summary.promotion = promote(config_path, overrides, challenger=version.version)["decision"]
        except Exception as err:
            # The version is trained, evaluated and registered: its summary is written before the run fails.
            promotion_error = err
            summary.promotion = f"failed: {type(err).__name__}: {(redact_text(str(err)).splitlines() or [''])[0][:300]}"
    links = mlflow_links(tracker.uri, tracker.experiment_id, parent, version.name, version.version)
    publish_summary(SUMMARY_KEY, summary.markdown(links), f"{version.name} v{version.version}")
    results = {"finetuned": result.tuned, **({"base": result.base} if result.base is not None else {})}
    publish_samples(
        SAMPLES_KEY, sample_rows(dataset.eval_file, results), f"eval split of {version.name} v{version.version}"
    )
    summary.seconds = time.time() - started
    summary_file = run_dir / "summary.json"
    summary_file.write_text(json.dumps(asdict(summary), indent=2) + "\n")
    # One line here (the flow log of a deployment run); the whole text is the CLI's output and the artifact.
    logger.info(
        "done in %.0f s: %s version %s (@%s), accuracy %s -> %.3f; summary %s",
        summary.seconds,
        summary.model_name,
        summary.model_version,
        summary.model_alias,
        "n/a" if summary.base_accuracy is None else f"{summary.base_accuracy:.3f}",
        summary.finetuned_accuracy,
        summary_file,
    )
    if promotion_error is not None:
        raise PromotionFailed.after(summary, str(summary_file), promotion_error) from promotion_error
    return asdict(summary) | {"summary_file": str(summary_file)}


def run_from_cli(config_path: str | None, overrides: list[str]) -> int:
    """`vlmops run`: the flow on Prefect's ephemeral API unless PREFECT_API_URL points at a server; the
    summary goes to stdout as plain text once the flow is done."""
    load_config(config_path or "pipeline.yaml", overrides)  # a bad key or a credential stops here, before a flow run
    try:
        with patient_ephemeral_server(), errors_after_prefect_reports():
            result = retrain(config_path or "pipeline.yaml", overrides)
    except PromotionFailed as err:  # what the run did is worth showing before the error `vlmops` prints
        if err.summary is not None:
            print(err.summary.text())
            print(f"  summary                 {err.summary_file}")
        raise
    summary = RunSummary(**{k: v for k, v in result.items() if k in RunSummary.__dataclass_fields__})
    print(summary.text())
    print(f"  summary                 {result['summary_file']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_from_cli(sys.argv[1] if len(sys.argv) > 1 else None, sys.argv[2:]))
