"""The promote flow: challenger and champion answer the same evaluation set; `champion` moves past the gate.

    vlmops promote --config pipeline.yaml --set registry.promotion.min_margin=0.02
    prefect deployment run 'promote/on-demand' --param challenger=7

The gate (`registry.promotion`: metric, min_margin, eval_file) is in the config; with no champion the
challenger becomes the first. The decision is an MLflow run, `promotion.*` tags on both versions, and two
artifacts of this flow run: the decision (markdown, with links) and the eval samples side by side (table).

A retry of the flow run (`prefect flow-run retry`, a flow's `retries`) goes on in the work folder its earlier try made
for the same challenger (flows/run_folder.py): a version's eval predictions that finished are reused (the task run says
`Cached`, as long as the predictions file is there) and an eval job cut short answers only the shards it had not
finished. The contest is read from the registry again and the decision made against it: a champion another promotion
moved meanwhile answers the evaluation set as the new champion, and @challenger (with no `challenger` given) naming a
newer version is another contest, in a folder of its own. A new flow run starts over in a new folder.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run as prefect_flow_run

from flows import refuses_bad_settings
from flows.launch import errors_after_prefect_reports, patient_ephemeral_server
from flows.run_folder import flow_run_folder, write_run_config
from tasks.caching import run_or_reuse
from tasks.infer import batch_infer_task
from tasks.promote import fetch_evaluation_set, find_contenders, record_promotion, score
from tasks.report import flow_run_tags, publish_samples, publish_summary
from tasks.retry import names_unreachable_service, retry_this_flow_run
from vlmops.config import dump_config, load_config
from vlmops.evaluate.samples import sample_rows
from vlmops.filenames import safe_name
from vlmops.redact import redact_log_handlers
from vlmops.registry.promote import CHAMPION, decide
from vlmops.tracking import Tracker, mlflow_links

DECISION_KEY = "promote-decision"
SAMPLES_KEY = "promote-eval-samples"


def _after_an_outage() -> str:
    """What to run once the server that did not answer is back, and what it reuses."""
    return (
        f"retry this flow run to reuse the eval predictions that finished: {retry_this_flow_run(__file__, 'promote')}; "
        "a new run answers the evaluation set anew. A retry reads the flow run's config as it was: after fixing a URL in "
        "it, start a new run"
    )


@flow(name="promote")
@refuses_bad_settings
@names_unreachable_service(_after_an_outage, new_run="start a new run: it answers the evaluation set anew")
def promote(
    config_path: str = "pipeline.yaml", overrides: list[str] | None = None, challenger: int | str | None = None
) -> dict[str, Any]:
    """Compare `challenger` (a version number or models:/ URI; default: the config's alias) with the champion
    on one evaluation set and move `champion` if the gate in the config passes."""
    redact_log_handlers()  # Prefect's handlers (console, API) are set up by now
    logger = get_run_logger()
    config = load_config(config_path, overrides)
    # An int too: Prefect's CLI reads `--param challenger=7` as JSON, and the parameter schema would refuse a number.
    contest = find_contenders(config, None if challenger is None else str(challenger))
    if contest.settled:
        logger.info(
            "%s version %s is @%s already: nothing to do", contest.challenger.name, contest.challenger.version, CHAMPION
        )
        return {"decision": "unchanged", "model_name": contest.challenger.name, "champion": contest.challenger.version}
    output_dir = Path(config.run.output_dir).resolve()
    this_run = prefect_flow_run.id or ""
    prefix = f"{safe_name(contest.challenger.name)}-v{contest.challenger.version}-"
    work_dir = flow_run_folder(output_dir / "promotions", this_run, prefix)
    if (work_dir / "config.yaml").is_file():
        logger.info("try %d of flow run %s: going on in %s", prefect_flow_run.run_count, this_run, work_dir)
    write_run_config(work_dir / "config.yaml", dump_config(config))
    eval_file = fetch_evaluation_set(config, contest, str(work_dir))  # a retry's: restored once, into this folder

    results = {}
    for role, contender in (("challenger", contest.challenger), (CHAMPION, contest.champion)):
        if contender is not None:
            # Named by version: a champion that moved between two tries is another model, another job.
            out_file = work_dir / f"{role}-v{contender.version}_predictions.jsonl"
            predictions, cached = run_or_reuse(batch_infer_task, contender.uri, eval_file, str(out_file), config)
            if cached:
                logger.info("%s v%s: eval predictions reused from an earlier try", role, contender.version)
            results[role] = score(str(predictions.path))
    decision = decide(contest, results["challenger"], results.get(CHAMPION), config, Path(eval_file))
    samples = sample_rows(eval_file, results, allowed_roots=config.data.allowed_roots)

    tracker = Tracker(config.tracking, artifact_root=output_dir / "mlartifacts")
    run_id = record_promotion(tracker, decision, contest, flow_run_tags(), samples)
    links = mlflow_links(tracker.uri, tracker.experiment_id, run_id, decision.name, decision.challenger)
    publish_summary(
        DECISION_KEY,
        decision.markdown(links.run) + f"\nChallenger version: {links.model_version}\n",
        f"{decision.name} v{decision.challenger}: {decision.outcome}",
    )
    against = f"champion v{decision.champion}" if decision.champion else "no champion yet"
    publish_samples(SAMPLES_KEY, samples, f"{decision.name}: challenger v{decision.challenger} vs {against}")
    summary = {**asdict(decision), "decision": decision.outcome, "mlflow_run_id": run_id, "work_dir": str(work_dir)}
    (work_dir / "decision.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.info("%s", decision.reason)
    return summary


def promote_from_cli(config_path: str | None, overrides: list[str], challenger: str | None) -> dict[str, Any]:
    """`vlmops promote`: the flow on Prefect's ephemeral API unless PREFECT_API_URL points at a server."""
    load_config(config_path or "pipeline.yaml", overrides)  # a bad key or a credential stops here, before a flow run
    with patient_ephemeral_server(), errors_after_prefect_reports():
        return promote(config_path or "pipeline.yaml", overrides, challenger)
