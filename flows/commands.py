"""What each `vbf` subcommand does (the parser is in cli.py).

Nothing heavy is imported at the top: `vbf run` starts loading the vLLM engine before it imports
Prefect, so the engine's start (the longest step of a small job) overlaps Prefect's start-up and
the dataset's preparation. Each command imports what it runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from pathlib import Path

import yaml

from tasks import console
from tasks.config import (
    SAMPLE_DATASET,
    TINY_CPU_MODEL,
    DatasetSpec,
    MetricsConfig,
    ModelConfig,
    SampleSelection,
    SamplingConfig,
    ShardingConfig,
    SpecError,
    StoreConfig,
    openai_batch_dataset,
    read_yaml,
)
from tasks.errors import USER_ERRORS, RunStopped


def caused_by_user_error(error: BaseException | None) -> bool:
    """Whether the error, or one it was raised while handling, is a user's mistake."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, USER_ERRORS):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


class HideUserErrors(logging.Filter):
    """Prefect logs a failed task or flow with its traceback; for a user's mistake the CLI's own line says it all.

    A record of something else that went wrong while the run failed (an event Prefect could not send,
    say) keeps its line but loses its traceback, which would repeat the user's error as context.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.exc_info or not caused_by_user_error(record.exc_info[1]):
            return True
        if isinstance(record.exc_info[1], USER_ERRORS):
            return False
        record.exc_info, record.exc_text = None, None
        return True


def start_prefect(verbose: bool) -> None:
    """Prefect's defaults for a batch command (set before Prefect is imported: it reads them once),
    its logging set up now, and user mistakes' tracebacks kept off its console handler."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry from a batch job, unless asked
    # Prefect's temporary server builds its database on a first run and competes for the CPU with
    # the engine's start: on a small machine it can need longer than Prefect's default 20 s.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    from prefect.logging.configuration import ensure_logging_setup
    from prefect.settings import PREFECT_MEMO_STORE_PATH

    from tasks.engines.faults import ensure_reaper

    # On a new machine the folder is missing and the temporary server warns on every first run.
    PREFECT_MEMO_STORE_PATH.value().parent.mkdir(parents=True, exist_ok=True)

    ensure_reaper()  # a batch command killed outright leaves no temporary Prefect server (nor engine) behind

    ensure_logging_setup()
    if not verbose:
        for handler in logging.getLogger().handlers:
            handler.addFilter(HideUserErrors())
    console.filter_terminal()  # after: the log file keeps the tracebacks


# ---------------------------------------------------------------- vbf run


def dataset_of(args: argparse.Namespace) -> DatasetSpec:
    """A spec file, a plain data file with its columns named by flags, or the bundled sample."""
    if args.spec:
        return DatasetSpec.from_yaml(args.spec)
    if not args.source:
        return SAMPLE_DATASET
    fields = {"prompt_column": args.prompt_column, "id_column": args.id_column, "system_prompt": args.system_prompt}
    return DatasetSpec(
        name=args.name or Path(args.source).stem.split(".")[0], source=args.source, **{k: v for k, v in fields.items() if v}
    )


def model_of(args: argparse.Namespace) -> ModelConfig:
    """The embedded tiny CPU model unless --model names another (a model config YAML, or a folder or
    served name with vLLM's own defaults); then the flags."""
    base = TINY_CPU_MODEL if args.model is None else ModelConfig(model=args.model)
    if args.model and args.model.endswith((".yaml", ".yml")):
        base = read_yaml(ModelConfig, Path(args.model), "model config")
    flags = {
        name: getattr(args, name)
        for name in (
            "engine",
            "base_url",
            "api_key_secret",
            "tensor_parallel_size",
            "dtype",
            "max_model_len",
            "gpu_memory_utilization",
            "enforce_eager",
            "reasoning_parser",
        )
        if getattr(args, name) is not None
    }
    return ModelConfig.model_validate({**base.model_dump(exclude_defaults=True), **flags})


def sampling_of(args: argparse.Namespace) -> SamplingConfig:
    """A sampling config YAML (--sampling), or the defaults; then the flags."""
    base = read_yaml(SamplingConfig, Path(args.sampling), "sampling config") if args.sampling else SamplingConfig()
    return SamplingConfig.model_validate({**base.model_dump(exclude_defaults=True), **sampling_flags(args)})


def sampling_flags(args: argparse.Namespace) -> dict:
    """The sampling flags given, as SamplingConfig fields."""
    flags = {
        name: getattr(args, name)
        for name in ("temperature", "top_p", "n", "max_tokens", "seed")
        if getattr(args, name) is not None
    }
    if args.chat_template_kwargs is not None:
        flags["chat_template_kwargs"] = json_object("--chat-template-kwargs", args.chat_template_kwargs)
    return flags


def json_object(flag: str, text: str) -> dict:
    """A flag's JSON object; anything else is the user's mistake, named by the flag."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise SpecError(f"{flag}: not valid JSON ({error.msg} at character {error.pos}): {text}") from None
    if not isinstance(value, dict):
        raise SpecError(f"{flag}: expected a JSON object such as '{{\"enable_thinking\": false}}', got {text}")
    return value


def store_of(args: argparse.Namespace) -> StoreConfig:
    return StoreConfig(duckdb_path=args.duckdb, storage=args.storage)


def start_engine_unless_answered(dataset: DatasetSpec, model: ModelConfig, sampling: SamplingConfig, store: StoreConfig) -> None:
    """Start loading the engine now — unless an earlier run answered this very input with this
    model and sampling, when no request will need it."""
    if model.engine != "vllm":
        return
    from tasks.engines.vllm import start_engine_in_background
    from tasks.inference.job import check_sampling
    from tasks.keys import hash_memo_path, input_fingerprint, model_fingerprint, sampling_hash
    from tasks.prepare.dataset import check_dataset
    from tasks.store.queries import answered_before

    try:
        check_sampling(model, sampling)  # values vLLM refuses need no engine either
        check_dataset(dataset)  # files and schemas (Parquet footers): a bad input needs no engine
        fingerprint = input_fingerprint(dataset, model.mode, model.max_model_len)
        model_key = model_fingerprint(model, hash_memo_path(store.storage))
    except SpecError:
        return  # the flow reports a bad source (or an unresolvable hub revision) with its context
    if not answered_before(store.duckdb_path, fingerprint, model_key, sampling_hash(sampling)):
        start_engine_in_background(model, store.storage)


def dry_run(dataset: DatasetSpec, model: ModelConfig, sampling: SamplingConfig, store: StoreConfig, args: argparse.Namespace):
    """Price the job and print it; no engine starts unless --sample asks for one."""
    quiet_console(store, args.verbose)
    start_prefect(args.verbose)
    from flows.estimate_run import estimate_run
    from tasks.config import PricingConfig
    from tasks.engines.vllm import close_engine
    from tasks.inference.estimate import format_estimate

    pricing = PricingConfig(per_gpu_hour=args.price_per_gpu_hour, per_million_tokens=args.price_per_million_tokens)
    try:
        estimate = estimate_run(dataset=dataset, model=model, sampling=sampling, store=store, pricing=pricing, sample=args.sample)
    finally:
        close_engine(timeout=0)
    print(format_estimate(estimate))
    return estimate


def sharding_of(args: argparse.Namespace) -> ShardingConfig:
    chosen = {"shard_size": args.shard_size, "on_stop": args.on_stop}
    return ShardingConfig(**{name: value for name, value in chosen.items() if value})


def metrics_of(args: argparse.Namespace) -> MetricsConfig:
    chosen = {"port": args.metrics_port, "host": args.metrics_host, "progress_file": getattr(args, "progress_file", None)}
    return MetricsConfig(**{name: value for name, value in chosen.items() if value is not None})


def run(args: argparse.Namespace) -> None:
    dataset, model, sampling, store = dataset_of(args), model_of(args), sampling_of(args), store_of(args)
    if args.dry_run:
        estimate = dry_run(dataset, model, sampling, store, args)
        if args.summary_json:
            Path(args.summary_json).write_text(estimate.model_dump_json(indent=2))
        return
    summary = run_flow(dataset, model, sampling, sharding_of(args), store, args.scorer, args.verbose, metrics_of(args))
    if args.summary_json:
        Path(args.summary_json).write_text(summary.model_dump_json(indent=2))


def quiet_console(store: StoreConfig, verbose: bool) -> None:
    """Unless --verbose: engine and library output to a log file under the storage folder (said at the end)."""
    if not verbose:
        console.quiet(console.log_file_for(store.storage, store.duckdb_path))


def run_flow(
    dataset: DatasetSpec,
    model: ModelConfig,
    sampling: SamplingConfig,
    sharding: ShardingConfig,
    store: StoreConfig,
    scorers: list[str] | None,
    verbose: bool,
    metrics: MetricsConfig | None = None,
):
    """batch_inference, its engine loading while Prefect starts; prints the summary and returns it."""
    quiet_console(store, verbose)
    start_engine_unless_answered(dataset, model, sampling, store)
    start_prefect(verbose)
    from prefect.exceptions import TerminationSignal

    from flows.batch_inference import batch_inference
    from tasks.engines.vllm import close_engine
    from tasks.report.summary import format_summary
    from tasks.scoring.registry import DEFAULT_SCORERS

    try:
        summary = batch_inference(
            dataset=dataset,
            model=model,
            sampling=sampling,
            sharding=sharding,
            store=store,
            scorers=scorers or DEFAULT_SCORERS,
            metrics=metrics or MetricsConfig(),
        )
    except TerminationSignal as stop:  # SIGTERM, as Ctrl-C: the flow has committed what finished
        raise RunStopped(f"stopped by signal {stop.signal}") from stop
    finally:
        close_engine(timeout=0)  # committed, or failed: nothing for the engine to drain
    print(format_summary(summary))
    if console.log_path():
        print(f"engine and library output: {console.log_path()} (--verbose shows it here)")
    return summary


# ---------------------------------------------------------------- vbf run-batch


def run_batch(args: argparse.Namespace) -> None:
    """`vllm run-batch`'s files, through the pipeline: a re-run recomputes nothing that finished."""
    from tasks.export.batch_files import write_batch_result

    store = store_of(args)
    summary = run_flow(
        openai_batch_dataset(args.input_file, Path(args.input_file).stem.split(".")[0]),
        model_of(args),
        sampling_of(args),
        sharding_of(args),
        store,
        None,
        args.verbose,
        metrics_of(args),
    )
    files = write_batch_result(store, summary.run_id, args.output_file, args.error_file)
    where = f"{args.output_file}" + (f", {files.error_lines} → {args.error_file}" if args.error_file else "")
    print(f"{files.output_lines} answered, {files.error_lines} errors → {where}")


# ---------------------------------------------------------------- vbf serve, vbf keys

LOOPBACK = ("127.0.0.1", "localhost", "::1")
BATCH_API_DEPLOYMENT = "batch-inference/batch-api"


def prefect_server_configured() -> bool:
    """Whether Prefect talks to a server (PREFECT_API_URL, in the environment or the profile), not a temporary one."""
    from prefect.settings import get_current_settings

    return bool(get_current_settings().api.url)


def served_models(pairs: list[str] | None) -> dict[str, ModelConfig]:
    """`NAME=PATH` pairs (a model folder, or a model config YAML); none: the bundled tiny model as `tiny-llama`."""
    if not pairs:
        return {"tiny-llama": TINY_CPU_MODEL.model_copy(update={"model": str(Path(TINY_CPU_MODEL.model).resolve())})}
    models = {}
    for pair in pairs:
        name, _, path = pair.partition("=")
        if not name or not path:
            raise SpecError(f"--model {pair!r}: expected NAME=PATH (a model folder or a model config YAML)")
        config = (
            read_yaml(ModelConfig, Path(path), "model config") if path.endswith((".yaml", ".yml")) else ModelConfig(model=path)
        )
        models[name] = config
    return models


def absolute(path: str) -> str:
    return path if "://" in path else str(Path(path).resolve())


def serve(args: argparse.Namespace) -> None:
    """The OpenAI Batch API until Ctrl-C; batches' runs go on in their own processes."""
    import uvicorn

    from tasks.config import ServiceConfig
    from tasks.service.app import create_app, service_db_path
    from tasks.store.service import any_active_key, service_db

    store = StoreConfig(duckdb_path=absolute(args.duckdb), storage=absolute(args.storage))
    deployment = args.deployment if args.deployment != "auto" else (BATCH_API_DEPLOYMENT if prefect_server_configured() else None)
    limits = {
        "max_file_bytes": args.max_file_bytes,
        "max_line_bytes": args.max_line_bytes,
        "running_batches": args.running_batches,
    }
    config = ServiceConfig(
        host=args.host,
        port=args.port,
        folder=absolute(args.folder),
        models=served_models(args.model),
        store=store,
        deployment=deployment or None,
        metrics=metrics_of(args),
        **{name: value for name, value in limits.items() if value is not None},
    )
    with service_db(service_db_path(config.folder)) as con:
        for name in args.api_key_secret or []:
            add_secret_key(con, name)
        keyed = any_active_key(con)
    if not keyed and config.host not in LOOPBACK:
        raise SpecError(
            f"--host {config.host}: without API keys the server listens on 127.0.0.1 only (anyone reaching it could "
            "use it); create one with `vbf keys create NAME` first"
        )
    where = f"flow runs of {config.deployment}" if config.deployment else "processes of this server"
    print(
        f"Batch API on http://{config.host}:{config.port}/v1 — models: {', '.join(config.models)}; batches run as {where}",
        flush=True,
    )
    if not keyed:
        print("no API keys: any local client may use it (`vbf keys create NAME` to require keys)", flush=True)
    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level="warning")


def add_secret_key(con, secret_name: str) -> None:
    """A key whose value lives in a Prefect Secret block: its hash is stored (again) under `secret:NAME`."""
    from blocks import secret_value
    from tasks.service.app import key_hash
    from tasks.store.service import replace_key

    start_prefect(verbose=False)
    replace_key(con, f"secret:{secret_name}", secret_name, key_hash(secret_value(secret_name)))


def keys(args: argparse.Namespace) -> None:
    """Create, list or revoke the Batch API's keys; a key is shown once, and only its hash is kept."""
    import secrets

    from tasks.service.app import key_hash, service_db_path
    from tasks.store.service import add_key, audit_trail, list_keys, revoke_key, service_db

    with service_db(service_db_path(absolute(args.folder))) as con:
        if args.keys_command == "create":
            key_id, key = f"key_{secrets.token_hex(6)}", f"vbf-{secrets.token_urlsafe(32)}"
            add_key(con, key_id, args.name, key_hash(key))
            print(f"{key_id} ({args.name}): {key}\nkeep it now: it is not stored and cannot be shown again")
        elif args.keys_command == "list":
            for row in list_keys(con):
                print(
                    f"{row['key_id']}  {row['name']}  created {row['created_at']}"
                    + (f"  revoked {row['revoked_at']}" if row["revoked_at"] else "")
                )
        elif args.keys_command == "revoke":
            if not revoke_key(con, args.key_id):
                raise SpecError(f"key {args.key_id}: no such active key")
            print(f"{args.key_id}: revoked")
        else:
            for row in audit_trail(con, args.limit):
                print(f"{row['at']:.3f}  {row['key_id']}  {row['action']}  {row['object_id']}")


# ---------------------------------------------------------------- the other subcommands


def export(args: argparse.Namespace) -> None:
    start_prefect(args.verbose)
    from flows.export_outputs import export_outputs
    from tasks.export.tasks import FORMATS

    export_outputs(args.out_dir, args.run, args.where, args.format or FORMATS, store_of(args))


def rescore(args: argparse.Namespace) -> None:
    start_prefect(args.verbose)
    from flows.rescore import rescore as rescore_flow

    rescore_flow(args.run_id, args.scorer, store_of(args))


def rerun(args: argparse.Namespace) -> None:
    """The cut-off answers of a run, asked again with a larger budget: a new run whose rerun_of names the first."""
    store = store_of(args)
    quiet_console(store, args.verbose)
    start_prefect(args.verbose)
    from flows.rerun_cut_off import rerun_cut_off
    from tasks.engines.vllm import close_engine
    from tasks.report.summary import format_summary
    from tasks.scoring.registry import DEFAULT_SCORERS

    try:
        summary = rerun_cut_off(
            args.run_id, store, max_tokens=args.max_tokens, cut_off=args.cut_off, scorers=args.scorer or DEFAULT_SCORERS
        )
    finally:
        close_engine(timeout=0)
    if summary is None:
        print(f"run {args.run_id}: no answer was cut off ({args.cut_off}); nothing to ask again")
        return
    print(format_summary(summary))
    if args.summary_json:
        Path(args.summary_json).write_text(summary.model_dump_json(indent=2))


def parse_variant(text: str, base: SamplingConfig) -> dict:
    """`NAME` or `NAME:field=value,...`: sampling fields, system_prompt, prompt_template or model."""
    name, _, settings = text.partition(":")
    values = {key.strip(): yaml.safe_load(value) for key, value in (item.split("=", 1) for item in settings.split(",") if item)}
    sampling = {key: values.pop(key) for key in list(values) if key in SamplingConfig.model_fields}
    variant = {"name": name, **values, "sampling": base.model_copy(update=sampling).model_dump() if sampling else None}
    if "model" in variant:
        variant["model"] = ModelConfig(model=str(variant["model"]))
    return variant


def compare(args: argparse.Namespace) -> None:
    dataset, model, sampling, store = dataset_of(args), model_of(args), sampling_of(args), store_of(args)
    start_prefect(args.verbose)
    from flows.compare_runs import compare_runs
    from tasks.scoring.compare import Variant
    from tasks.scoring.registry import DEFAULT_SCORERS
    from tasks.scoring.scorers import ScorerSpec

    variants = [
        Variant.model_validate(parse_variant(text, sampling))
        for text in args.variant or ["greedy", "sampled:temperature=0.8,seed=1"]
    ]
    scorers: list = list(args.scorer or DEFAULT_SCORERS)
    if args.judge:
        scorers.append(ScorerSpec(name="judge", options={"model": model.model_dump()}))
    result = compare_runs(
        variants=variants,
        dataset=dataset,
        model=model,
        sampling=sampling,
        store=store,
        scorers=scorers,
        significance_level=args.significance_level,
    )
    print(f"chart: {result.chart_path}")


def judge_of(args: argparse.Namespace):
    """The judge: its model (the model flags), which judge and verdict form, a rubric file, and the sampling
    flags given (none: the judge's defaults)."""
    from tasks.scoring.judge import DEFAULT_MAX_TOKENS, JudgeConfig

    verdict = "json" if args.json_verdict else "choice"
    flags = sampling_flags(args)
    sampling = SamplingConfig(**{"max_tokens": DEFAULT_MAX_TOKENS[verdict], **flags}) if flags else None
    rubric = None
    if args.rubric:
        if not Path(args.rubric).is_file():
            raise SpecError(f"--rubric {args.rubric}: file not found")
        rubric = Path(args.rubric).read_text()
    kind = "absolute" if args.absolute else "pairwise"
    return JudgeConfig(model=model_of(args), kind=kind, verdict=verdict, rubric=rubric, sampling=sampling)


def judge(args: argparse.Namespace) -> None:
    """Judge stored runs; a judgement already made is read from the cache, not computed again."""
    from tasks.scoring.judgement import JudgedRuns, check_judged_runs

    judge_config, store = judge_of(args), store_of(args)
    runs = JudgedRuns(run_a=args.run_a, run_b=args.run_b, reference=args.reference)
    check_judged_runs(runs, judge_config.kind)  # a wrong pair of runs is one line, before Prefect starts
    quiet_console(store, args.verbose)
    start_prefect(args.verbose)
    from prefect.exceptions import TerminationSignal

    from flows.judge_runs import judge_runs
    from tasks.engines.vllm import close_engine
    from tasks.report.summary import format_judgement

    try:
        result = judge_runs(**runs.model_dump(), judge=judge_config, sharding=sharding_of(args), store=store)
    except TerminationSignal as stop:  # SIGTERM, as Ctrl-C: the judge run has committed what finished
        raise RunStopped(f"stopped by signal {stop.signal}") from stop
    finally:
        close_engine(timeout=0)
    print(format_judgement(result.judgement, result.judge_run))
    if args.summary_json:
        Path(args.summary_json).write_text(result.model_dump_json(indent=2))


def review_push(args: argparse.Namespace) -> None:
    start_prefect(args.verbose)
    from flows.push_for_review import push_for_review

    selection = SampleSelection(
        run_id=args.run_id,
        strategy=args.strategy,
        scorer=args.scorer,
        limit=args.limit,
        other_run_id=args.other_run_id,
        where=args.where,
    )
    print(push_for_review(selection, args.project, args.block, store_of(args)))


def review_pull(args: argparse.Namespace) -> None:
    start_prefect(args.verbose)
    from flows.pull_reviews import pull_reviews

    print(pull_reviews(args.project, args.block, store_of(args)))


def review_export(args: argparse.Namespace) -> None:
    start_prefect(args.verbose)
    from flows.export_curated import export_curated

    print(export_curated(args.name, args.output_dir, args.project, args.run_id, store_of(args)))


def sql(args: argparse.Namespace) -> None:
    """A query (read-only, while runs go on), or an interactive prompt when none is given."""
    from tasks.store.connection import reading
    from tasks.store.queries import run_query

    with reading(args.duckdb, lock_timeout_seconds=args.lock_timeout) as con:
        if args.query:
            print(format_table(run_query(con, args.query), args.max_rows))
            return
        print(f"{args.duckdb} (read-only). End a statement with ';', quit with Ctrl-D.")
        for statement in statements_from_stdin():
            try:
                print(format_table(run_query(con, statement), args.max_rows))
            except Exception as error:  # noqa: BLE001 - a bad query at the prompt is shown and the prompt goes on
                print(f"error: {error}")


def format_table(table, max_rows: int) -> str:
    text = table.slice(0, max_rows).to_pandas().to_string(index=False, max_colwidth=60)
    return text + (f"\n... {table.num_rows - max_rows} more rows" if table.num_rows > max_rows else "")


def statements_from_stdin():
    buffer = ""
    while True:
        try:
            line = input("vbf sql> " if not buffer else "     ...> ")
        except EOFError:
            return
        buffer += line + "\n"
        if buffer.strip().endswith(";"):
            yield buffer.strip()
            buffer = ""


def cluster(args: argparse.Namespace) -> None:
    from tasks.cluster import run_until_interrupted, save_default_blocks

    if args.blocks_only:
        start_prefect(args.verbose)
        save_default_blocks(TINY_CPU_MODEL.model, args.duckdb, args.storage)
        return
    home = Path(args.home or tempfile.mkdtemp(prefix="prefect-cluster-"))
    run_until_interrupted(home, args.port, args.database_url)
