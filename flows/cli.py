"""vbf: the command line of vllm-batch-flows. Every subcommand ends in the same DuckDB results file.

    vbf run                                    # the bundled sample on the tiny CPU model
    vbf run prompts.parquet --prompt-column question --model /models/llama --max-tokens 256
    vbf sql "SELECT * FROM run_summary"

A mistake in what you gave (a spec, a file, a run id, a flag) prints one line naming the file, row
or field and exits with status 1; --verbose shows the traceback too.
"""

from __future__ import annotations

# Only the standard library at the top: vLLM starts its engine processes with multiprocessing's
# spawn, which imports the `vbf` script, and so this module, again in each of them.
import argparse
import sys
import textwrap
import traceback


def describe(error: BaseException) -> str:
    from pydantic import ValidationError

    from tasks.config import describe_errors

    return describe_errors(error) if isinstance(error, ValidationError) else str(error)


# ---------------------------------------------------------------- the parser


def command(subparsers, name: str, handler, help: str, example: str, parents: list) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name,
        help=help,
        description=f"{help}\n\nexample:\n{textwrap.indent(example, '  ')}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=parents,
    )
    parser.set_defaults(handler=handler)
    return parser


def add_dataset_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("dataset")
    group.add_argument(
        "source", nargs="?", help="a Parquet file/folder/glob, a JSONL file or an OpenAI batch file (default: the bundled sample)"
    )
    group.add_argument("--spec", help="a dataset spec YAML instead of SOURCE (see docs/datasets.md)")
    group.add_argument("--prompt-column", help="the column holding the prompt (with SOURCE)")
    group.add_argument("--id-column", help="the column holding a unique id per row (with SOURCE; unset: ids from content)")
    group.add_argument("--system-prompt", help="a system message for chat mode (with SOURCE)")
    group.add_argument("--name", help="the dataset's name (with SOURCE; default: the file name)")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model and engine")
    group.add_argument(
        "--model",
        help="local model folder, a model config YAML, or the served name for --engine openai (default: the tiny CPU model)",
    )
    group.add_argument(
        "--engine", choices=["vllm", "openai"], help="vllm: in-process (default); openai: an OpenAI-compatible server"
    )
    group.add_argument("--base-url", help="the server for --engine openai, e.g. http://127.0.0.1:8000/v1")
    group.add_argument("--api-key-secret", help="name of the Prefect Secret block holding the server's API key")
    group.add_argument("--tensor-parallel-size", type=int)
    group.add_argument("--dtype")
    group.add_argument("--max-model-len", type=int)
    group.add_argument("--gpu-memory-utilization", type=float, help="on the CPU build: the share of RAM for the KV cache")
    group.add_argument(
        "--enforce-eager", action="store_true", default=None, help="no graph compilation: starts faster, may run slower"
    )
    group.add_argument(
        "--reasoning-parser", help="vLLM's reasoning parser (deepseek_r1, qwen3, ...): the thinking apart from the answer"
    )
    group = parser.add_argument_group("sampling")
    group.add_argument(
        "--sampling", help="a sampling config YAML (any field of docs/inference.md's sampling, `extra` too); flags override it"
    )
    group.add_argument("--temperature", type=float)
    group.add_argument("--top-p", type=float)
    group.add_argument("--n", type=int, help="samples per request")
    group.add_argument("--max-tokens", type=int)
    group.add_argument("--seed", type=int)
    group.add_argument(
        "--chat-template-kwargs",
        metavar="JSON",
        help="""variables for the model's chat template, a JSON object: '{"enable_thinking": false}' turns a """
        "reasoning model's thinking off (Qwen3's template reads it)",
    )


def add_metrics_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("monitoring")
    group.add_argument(
        "--metrics-port", type=int, help="serve the run's Prometheus metrics on this port while it goes (see docs/monitoring.md)"
    )
    group.add_argument("--metrics-host", help="the address to serve them on (default: 127.0.0.1; 0.0.0.0 for another machine)")


def parser() -> argparse.ArgumentParser:
    from flows import commands
    from tasks.config import ShardingConfig, StoreConfig

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true", help="show tracebacks of errors")
    store = argparse.ArgumentParser(add_help=False)
    store.add_argument("--duckdb", default=StoreConfig().duckdb_path, help="the results file (default: %(default)s)")
    store.add_argument("--storage", default=StoreConfig().storage, help="shard files and cached results (default: %(default)s)")

    top = argparse.ArgumentParser(prog="vbf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run_parser = command(
        subparsers,
        "run",
        commands.run,
        "Run batch inference on a dataset; results land in the DuckDB file.",
        "vbf run prompts.parquet --prompt-column question --id-column id --max-tokens 256",
        [common, store],
    )
    add_dataset_options(run_parser)
    add_model_options(run_parser)
    run_parser.add_argument(
        "--shard-size", type=int, help=f"most unique requests per inference task (default: {ShardingConfig().shard_size})"
    )
    run_parser.add_argument(
        "--on-stop",
        choices=["finish", "abort"],
        help="on Ctrl-C or SIGTERM: let the shards in flight finish and commit them (default), or abort them "
        "(their finished parts are kept); either way the next run goes on from there",
    )
    run_parser.add_argument(
        "--scorer", action="append", help="scorer name or package.module:attribute (repeatable; default: every built-in)"
    )
    run_parser.add_argument("--summary-json", help="also write the run summary (or the dry run's estimate) to this file")
    dry = run_parser.add_argument_group("dry run")
    dry.add_argument(
        "--dry-run",
        action="store_true",
        help="price the job: counts, exact prompt tokens, output tokens, engine time, cost; runs nothing",
    )
    dry.add_argument("--sample", type=int, default=0, help="with --dry-run: measure the rate and output length on N requests")
    dry.add_argument("--price-per-gpu-hour", type=float, help="with --dry-run: the cost of engine time")
    dry.add_argument("--price-per-million-tokens", type=float, help="with --dry-run: the cost of prompt + output tokens")
    add_metrics_options(run_parser)
    run_parser.add_argument(
        "--progress-file", help="rewrite this JSON file with the run's live progress every second (vbf serve's page reads it)"
    )

    batch_parser = command(
        subparsers,
        "run-batch",
        commands.run_batch,
        "An OpenAI batch file in, its output (and error) file out, as `vllm run-batch` — resumable, results in DuckDB too.",
        "vbf run-batch -i requests.jsonl -o results.jsonl --error-file errors.jsonl --model /models/llama",
        [common, store],
    )
    batch_parser.add_argument("-i", "--input-file", required=True, help="the OpenAI batch input file (JSONL)")
    batch_parser.add_argument(
        "-o", "--output-file", required=True, help="the answered lines (and, without --error-file, the errors)"
    )
    batch_parser.add_argument("--error-file", help="the lines that failed, with their error")
    add_model_options(batch_parser)
    batch_parser.add_argument("--shard-size", type=int, help="most unique requests per inference task")
    batch_parser.add_argument("--on-stop", choices=["finish", "abort"], help="on Ctrl-C or SIGTERM (see vbf run)")
    add_metrics_options(batch_parser)
    batch_parser.set_defaults(scorer=None)

    export_parser = command(
        subparsers,
        "export",
        commands.export,
        "Export outputs to Parquet, chat JSONL and OpenAI batch output files.",
        "vbf export out/ --run RUN_ID\nvbf export out/ --where \"finish_reason = 'stop'\"",
        [common, store],
    )
    export_parser.add_argument("out_dir")
    export_parser.add_argument("--run", help="one run's outputs (default: the newest output per input row and model)")
    export_parser.add_argument("--where", help="a SQL condition over the exported columns (see docs/exports.md)")
    export_parser.add_argument(
        "--format", action="append", choices=["parquet", "chat_jsonl", "openai_batch"], help="repeatable (default: all)"
    )

    rescore_parser = command(
        subparsers,
        "rescore",
        commands.rescore,
        "Score a stored run again (new scorers or versions), without inference.",
        "vbf rescore RUN_ID --scorer valid_json --scorer my_scorers:shouting",
        [common, store],
    )
    rescore_parser.add_argument("run_id")
    rescore_parser.add_argument(
        "--scorer", action="append", required=True, help="built-in name or package.module:attribute (repeatable)"
    )

    rerun_parser = command(
        subparsers,
        "rerun",
        commands.rerun,
        "Ask again, with a larger token budget, the answers of a run that were cut off inside their reasoning.",
        "vbf rerun RUN_ID --max-tokens 4096\nvbf rerun RUN_ID --cut-off length   # every answer that stopped at max_tokens",
        [common, store],
    )
    rerun_parser.add_argument("run_id")
    rerun_parser.add_argument(
        "--max-tokens", type=int, help="the new budget (default: twice the largest the cut-off answers had)"
    )
    rerun_parser.add_argument(
        "--cut-off",
        choices=["reasoning", "length"],
        default="reasoning",
        help="reasoning: answers cut off inside the thinking (default); length: every answer cut off at max_tokens",
    )
    rerun_parser.add_argument("--scorer", action="append", help="scorer (repeatable; default: every built-in)")
    rerun_parser.add_argument("--summary-json", help="also write the rerun's summary to this file")

    compare_parser = command(
        subparsers,
        "compare",
        commands.compare,
        "Run variants of one dataset and compare their scores.",
        "vbf compare --variant greedy --variant sampled:temperature=0.8,seed=1 --judge",
        [common, store],
    )
    add_dataset_options(compare_parser)
    add_model_options(compare_parser)
    compare_parser.add_argument(
        "--variant", action="append", help="NAME or NAME:field=value,... (sampling fields, system_prompt, prompt_template, model)"
    )
    compare_parser.add_argument("--scorer", action="append", help="scorer (repeatable; default: every built-in)")
    compare_parser.add_argument("--judge", action="store_true", help="also score with an LLM judge on the same model")
    compare_parser.add_argument(
        "--significance-level", type=float, default=0.05, help="the level the report calls a difference significant at"
    )

    judge_parser = command(
        subparsers,
        "judge",
        commands.judge,
        "Judge stored runs with an LLM judge: pairwise in both orders (win rate, position bias) or absolute (1-10).",
        "vbf judge RUN_A RUN_B --model /models/judge          # pairwise: a's answers against b's\n"
        "vbf judge RUN_A --reference --json-verdict           # against the reference answers, with reasons\n"
        "vbf judge RUN_A RUN_B --absolute                     # each answer graded 1-10 alone",
        [common, store],
    )
    judge_parser.add_argument("run_a", help="the run whose answers are judged (a)")
    judge_parser.add_argument("run_b", nargs="?", help="the run it is compared with (b)")
    judge_parser.add_argument("--reference", action="store_true", help="pairwise against run a's reference answers")
    judge_parser.add_argument("--absolute", action="store_true", help="grade each answer alone, 1-10 (default: pairwise)")
    judge_parser.add_argument(
        "--json-verdict", action="store_true", help="a JSON verdict with a one-sentence reason (default: the label alone)"
    )
    judge_parser.add_argument("--rubric", help="a Jinja template file for the judge's prompt (see docs/scoring.md#judging)")
    add_model_options(judge_parser)
    judge_parser.add_argument("--shard-size", type=int, help="most judge requests per inference task")
    judge_parser.add_argument("--on-stop", choices=["finish", "abort"], help="on Ctrl-C or SIGTERM (see vbf run)")
    judge_parser.add_argument("--summary-json", help="also write the judgement and the judge run's summary to this file")

    review = subparsers.add_parser(
        "review", help="Human review in Label Studio: push samples, pull verdicts, export a curated dataset."
    )
    review_commands = review.add_subparsers(dest="review_command", required=True, metavar="COMMAND")
    label_studio = argparse.ArgumentParser(add_help=False)
    label_studio.add_argument(
        "--block", default="label-studio", help="name of the saved Label Studio block (default: %(default)s)"
    )
    push = command(
        review_commands,
        "push",
        commands.review_push,
        "Choose outputs of a run and push them to a Label Studio project.",
        "vbf review push RUN_ID --project Review --strategy lowest --scorer completion_tokens --limit 50",
        [common, store, label_studio],
    )
    push.add_argument("run_id")
    push.add_argument("--project", required=True, help="project title (created if missing)")
    push.add_argument("--strategy", default="lowest", choices=["lowest", "stratified", "disagreement", "where"])
    push.add_argument("--scorer", default="completion_tokens")
    push.add_argument("--limit", type=int, default=50)
    push.add_argument("--other-run-id", help="disagreement: the run to compare with")
    push.add_argument("--where", help="where: a SQL condition over the candidates (see docs/curation.md)")
    pull = command(
        review_commands,
        "pull",
        commands.review_pull,
        "Pull a project's annotations into the results file.",
        "vbf review pull --project Review",
        [common, store, label_studio],
    )
    pull.add_argument("--project", required=True)
    curated = command(
        review_commands,
        "export",
        commands.review_export,
        "Export accepted and corrected answers as a versioned curated dataset.",
        "vbf review export --name support-sft --output-dir curated --project Review",
        [common, store],
    )
    curated.add_argument("--name", required=True, help="curated dataset name")
    curated.add_argument("--output-dir", default="curated")
    curated.add_argument("--project", help="only reviews from this Label Studio project")
    curated.add_argument("--run-id", action="append", default=[], help="only these runs (repeatable)")

    sql_parser = command(
        subparsers,
        "sql",
        commands.sql,
        "Query the results file (read-only): one query, or an interactive prompt.",
        'vbf sql "SELECT * FROM run_summary"\nvbf sql                # a prompt; end statements with ;',
        [common, store],
    )
    sql_parser.add_argument("query", nargs="?")
    sql_parser.add_argument("--max-rows", type=int, default=50)
    sql_parser.add_argument("--lock-timeout", type=float, default=60.0, help="seconds to wait while a run writes the file")

    service = argparse.ArgumentParser(add_help=False)
    service.add_argument("--folder", default="results/service", help="the Batch API's files and records (default: %(default)s)")
    serve_parser = command(
        subparsers,
        "serve",
        commands.serve,
        "The OpenAI Batch API (/v1/files, /v1/batches): each batch a run of the pipeline.",
        "vbf serve --port 8000 --model llama=/models/llama --model qwen=qwen.yaml\n"
        "# then, with the openai SDK: OpenAI(base_url='http://127.0.0.1:8000/v1', api_key=...)",
        [common, store, service],
    )
    serve_parser.add_argument("--host", default="127.0.0.1")
    serve_parser.add_argument("--port", type=int, default=8000)
    serve_parser.add_argument(
        "--model",
        action="append",
        help="NAME=PATH: a model folder or a model config YAML (repeatable; default: the tiny model as tiny-llama)",
    )
    serve_parser.add_argument(
        "--deployment",
        default="auto",
        help="run each batch as a flow run of this deployment on a Prefect server's gpu pool; '' for processes of the "
        "server's own (default auto: batch-inference/batch-api when a Prefect server is configured)",
    )
    serve_parser.add_argument(
        "--api-key-secret",
        action="append",
        help="name of a Prefect Secret block holding an API key (repeatable), besides `vbf keys`",
    )
    serve_parser.add_argument("--running-batches", type=int, help="batches run at once, each in its own process (default: 1)")
    serve_parser.add_argument("--max-file-bytes", type=int, help="largest upload (default: 200 MB)")
    serve_parser.add_argument("--max-line-bytes", type=int, help="longest line of an upload (default: 1 MB)")
    add_metrics_options(serve_parser)

    keys_parser = subparsers.add_parser("keys", help="The Batch API's keys: create, list, revoke; the audit trail.")
    keys_commands = keys_parser.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    create = command(
        keys_commands, "create", commands.keys, "Create a key (shown once).", "vbf keys create alice", [common, service]
    )
    create.add_argument("name")
    command(
        keys_commands, "list", commands.keys, "List the keys (never the keys themselves).", "vbf keys list", [common, service]
    )
    revoke = command(
        keys_commands, "revoke", commands.keys, "Revoke a key.", "vbf keys revoke key_0a1b2c3d4e5f", [common, service]
    )
    revoke.add_argument("key_id")
    audit = command(
        keys_commands,
        "audit",
        commands.keys,
        "Who created, read, cancelled or deleted what.",
        "vbf keys audit --limit 20",
        [common, service],
    )
    audit.add_argument("--limit", type=int, default=50)

    cluster_parser = command(
        subparsers,
        "cluster",
        commands.cluster,
        "The whole system on this machine: Prefect server, pools, workers, deployments.",
        "vbf cluster              # until Ctrl-C\nvbf cluster --blocks-only  # save the default blocks on PREFECT_API_URL",
        [common, store],
    )
    cluster_parser.add_argument("--port", type=int, default=4200)
    cluster_parser.add_argument("--home", help="PREFECT_HOME of the server (default: a new temporary folder)")
    cluster_parser.add_argument(
        "--database-url", help="the server's database, e.g. postgresql+asyncpg://... (default: SQLite in its home)"
    )
    cluster_parser.add_argument(
        "--blocks-only", action="store_true", help="register the block types' defaults on the current server and stop"
    )
    return top


def main(argv: list[str] | None = None) -> int:
    from tasks.errors import USER_ERRORS, RunStopped

    args = parser().parse_args(argv)
    try:
        args.handler(args)
    except (RunStopped, KeyboardInterrupt):
        print(
            f"vbf {args.command}: stopped; what finished is committed, and the same command goes on from there", file=sys.stderr
        )
        return 130
    except USER_ERRORS as error:
        if args.verbose:
            traceback.print_exc()
        print(f"vbf {args.command}: error: {describe(error)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
