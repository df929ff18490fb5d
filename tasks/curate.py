"""Curate: choose samples for review, shape Label Studio tasks, read reviews back, build curated versions.

Pure functions first (SQL builders, the labeling config, task payloads, annotation parsing,
curated rows and their hash); the thin tasks at the end do the I/O against DuckDB, files and
Label Studio.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal
from xml.sax.saxutils import escape

import duckdb
import pyarrow as pa
from prefect import task
from pydantic import BaseModel, ConfigDict, Field, model_validator

from blocks.label_studio import LabelStudio
from tasks import files
from tasks.config import StoreConfig
from tasks.label_studio import LabelStudioClient, LabelStudioError
from tasks.store import connect, migrate

# Scorers whose positive value suggests rejecting the answer (blank, or cut off by max_tokens).
REJECT_SIGNALS = ("empty_output", "finish_reason")
CURATED_FORMAT = "chat-jsonl-v1"


class SampleSelection(BaseModel):
    """Which outputs of a run go to review, and how they are chosen."""

    model_config = ConfigDict(extra="forbid")

    run_id: str = Field(description="The run whose outputs are reviewed.")
    strategy: Literal["lowest", "stratified", "disagreement", "where"] = Field(
        "lowest",
        description="lowest: lowest `scorer` values first; stratified: equal draws from equal-width buckets "
        "of `scorer`; disagreement: requests whose answers differ between run_id and other_run_id (both "
        "answers are pushed); where: a SQL condition over the candidate columns.",
    )
    scorer: str = Field("completion_tokens", description="Score that orders or buckets the samples.")
    limit: int = Field(50, ge=1, description="Samples to push (disagreement: pairs).")
    buckets: int = Field(5, ge=1, description="stratified: number of score buckets.")
    seed: int = Field(0, description="stratified: seed of the draw inside each bucket.")
    other_run_id: str | None = Field(None, description="disagreement: the run to compare with.")
    where: str | None = Field(
        None,
        description="where: e.g. \"scores['empty_output'] = 1 OR completion_tokens < 4\". Columns: run_id, "
        "custom_id, output_id, prompt, response, finish_reason, completion_tokens, scores (map scorer → value).",
    )

    @model_validator(mode="after")
    def _strategy_inputs(self) -> SampleSelection:
        if self.strategy == "disagreement" and not self.other_run_id:
            raise ValueError("strategy 'disagreement' needs other_run_id")
        if self.strategy == "where" and not (self.where or "").strip():
            raise ValueError("strategy 'where' needs a where condition")
        return self


# One row per reviewable answer of a run: canonical requests, no error rows, latest score per scorer.
CANDIDATES_SQL = """
    SELECT o.run_id, o.custom_id, o.output_id, q.prompt, q.messages, o.text AS response,
           o.finish_reason, o.completion_tokens,
           coalesce(s.scores, MAP {{}}::MAP(VARCHAR, DOUBLE)) AS scores
    FROM run_outputs o
    JOIN requests q ON q.dataset_version = o.dataset_version AND q.custom_id = o.custom_id
    LEFT JOIN (
        SELECT output_id, map(list(scorer), list(value)) AS scores
        FROM (SELECT output_id, scorer, arg_max(value, created_at) AS value FROM scores GROUP BY ALL)
        GROUP BY output_id
    ) s ON s.output_id = o.output_id
    WHERE o.run_id = {run} AND o.duplicate_of IS NULL AND o.error_code IS NULL AND o.sample_index = 0
"""
SAMPLE_COLUMNS = "run_id, custom_id, output_id, prompt, messages, response, CAST(to_json(scores) AS VARCHAR) AS scores"


def selection_sql(selection: SampleSelection) -> tuple[str, dict]:
    """The query that returns the chosen samples, ordered, with its parameters."""
    params = {"run": selection.run_id, "scorer": selection.scorer, "limit": selection.limit}
    candidates = f"candidates AS ({CANDIDATES_SQL.format(run='$run')})"
    if selection.strategy == "lowest":
        sql = f"""WITH {candidates}
            SELECT {SAMPLE_COLUMNS} FROM candidates
            ORDER BY scores[$scorer] ASC NULLS LAST, custom_id LIMIT $limit"""
    elif selection.strategy == "stratified":
        params |= {"buckets": selection.buckets, "seed": str(selection.seed)}
        sql = f"""WITH {candidates},
            scored AS (SELECT *, scores[$scorer] AS score FROM candidates WHERE scores[$scorer] IS NOT NULL),
            bucketed AS (
                SELECT *, CASE WHEN max(score) OVER () = min(score) OVER () THEN 0
                    ELSE least(floor((score - min(score) OVER ()) / (max(score) OVER () - min(score) OVER ())
                                     * $buckets), $buckets - 1) END AS bucket
                FROM scored),
            drawn AS (
                SELECT *, row_number() OVER (PARTITION BY bucket ORDER BY md5(custom_id || ':' || $seed)) AS draw
                FROM bucketed)
            SELECT {SAMPLE_COLUMNS} FROM drawn ORDER BY draw, bucket LIMIT $limit"""
    elif selection.strategy == "disagreement":
        params["other"] = selection.other_run_id
        sql = f"""WITH {candidates}, other AS ({CANDIDATES_SQL.format(run='$other')}),
            pairs AS (
                SELECT a.custom_id, abs(a.scores[$scorer] - b.scores[$scorer]) AS gap
                FROM candidates a JOIN other b USING (custom_id)
                WHERE a.response IS DISTINCT FROM b.response
                ORDER BY gap DESC NULLS LAST, custom_id LIMIT $limit),
            both_runs AS (SELECT * FROM candidates UNION ALL SELECT * FROM other)
            SELECT {SAMPLE_COLUMNS} FROM both_runs JOIN pairs USING (custom_id)
            ORDER BY gap DESC NULLS LAST, custom_id, run_id = $other"""
    else:
        sql = f"""WITH {candidates}
            SELECT {SAMPLE_COLUMNS} FROM candidates WHERE ({selection.where}) ORDER BY custom_id LIMIT $limit"""
    return sql, {name: value for name, value in params.items() if f"${name}" in sql}


def labeling_config(title: str) -> str:
    """Prompt and response side by side; accept/reject, a 1–5 rating, an optional corrected response."""
    return f"""<View>
  <Header value="{escape(title, {'"': "&quot;"})}"/>
  <Header value="Prompt" size="5"/>
  <Text name="prompt" value="$prompt"/>
  <Header value="Response" size="5"/>
  <Text name="response" value="$response"/>
  <Text name="scores" value="$scores"/>
  <Choices name="verdict" toName="response" choice="single" required="true" showInline="true">
    <Choice value="accept"/>
    <Choice value="reject"/>
  </Choices>
  <Rating name="rating" toName="response" maxRating="5"/>
  <TextArea name="corrected" toName="response" placeholder="Corrected response (optional)" rows="4"
            editable="true" maxSubmissions="1"/>
</View>"""


def display_prompt(prompt: str | None, messages: str | None) -> str:
    """What the model saw: the chat messages one per paragraph, or the plain prompt."""
    if not messages:
        return prompt or ""
    return "\n\n".join(f"[{m['role']}] {m['content']}" for m in json.loads(messages))


def suggested_verdict(scores: dict[str, float]) -> str:
    return "reject" if any((scores.get(name) or 0) > 0 for name in REJECT_SIGNALS) else "accept"


def task_payload(sample: dict, scorer: str) -> dict:
    """A Label Studio task: the sample's keys and text as data, our scores as a pre-filled prediction."""
    scores = json.loads(sample["scores"] or "{}")
    return {
        "data": {
            "run_id": sample["run_id"],
            "custom_id": sample["custom_id"],
            "output_id": sample["output_id"],
            "prompt": display_prompt(sample["prompt"], sample["messages"]),
            "response": sample["response"] or "",
            "scores": " · ".join(f"{name} = {value:g}" for name, value in sorted(scores.items()) if value is not None),
        },
        "predictions": [
            {
                "model_version": "vllm-batch-flows scores",
                "score": scores.get(scorer),
                "result": [
                    {
                        "from_name": "verdict",
                        "to_name": "response",
                        "type": "choices",
                        "value": {"choices": [suggested_verdict(scores)]},
                    }
                ],
            }
        ],
    }


def task_key(data: dict) -> tuple[str, str] | None:
    """(run_id, custom_id) of a task this project pushed; None for tasks added by other means."""
    if "run_id" in data and "custom_id" in data:
        return str(data["run_id"]), str(data["custom_id"])
    return None


def parse_annotation(project_id: int, task: dict, annotation: dict, emails: dict[int, str]) -> dict:
    """One `annotations` row from a Label Studio annotation of one of our tasks."""
    fields: dict = {"verdict": None, "rating": None, "corrected_text": None}
    for item in annotation.get("result") or []:
        value = item.get("value") or {}
        if item.get("from_name") == "verdict" and value.get("choices"):
            fields["verdict"] = value["choices"][0]
        elif item.get("from_name") == "rating" and value.get("rating") is not None:
            fields["rating"] = int(value["rating"])
        elif item.get("from_name") == "corrected" and value.get("text"):
            fields["corrected_text"] = "\n".join(value["text"]).strip() or None
    completed_by = annotation.get("completed_by")
    if isinstance(completed_by, dict):
        annotator = completed_by.get("email") or str(completed_by.get("id"))
    else:
        annotator = emails.get(completed_by, str(completed_by))
    return {
        "annotation_id": annotation["id"],
        "task_id": task["id"],
        "project_id": project_id,
        "run_id": str(task["data"]["run_id"]),
        "custom_id": str(task["data"]["custom_id"]),
        "output_id": task["data"].get("output_id"),
        "annotator": annotator,
        **fields,
        "cancelled": bool(annotation.get("was_cancelled")),
        "created_at": annotation.get("created_at"),
        "updated_at": annotation.get("updated_at") or annotation.get("created_at"),
    }


# The latest non-cancelled annotation per sample decides; corrected text wins over the model's text.
CURATED_SQL = """
    WITH latest AS (
        SELECT a.*, row_number() OVER (
            PARTITION BY a.run_id, a.custom_id ORDER BY a.updated_at DESC, a.annotation_id DESC) AS newest
        FROM annotations a
        WHERE NOT a.cancelled
          AND ($project IS NULL OR EXISTS (
              SELECT 1 FROM label_tasks t
              WHERE t.server_url = a.server_url AND t.task_id = a.task_id AND t.project_title = $project))
          AND (len($runs) = 0 OR list_contains($runs, a.run_id))
    )
    SELECT l.run_id, l.custom_id, l.output_id, q.prompt, q.messages, o.text AS model_response,
           l.corrected_text, l.verdict, l.rating, l.annotator, l.annotation_id
    FROM latest l
    JOIN outputs o ON o.output_id = l.output_id
    JOIN runs r ON r.run_id = l.run_id
    JOIN requests q ON q.dataset_version = r.dataset_version AND q.custom_id = l.custom_id
    WHERE l.newest = 1 AND (l.verdict = 'accept' OR nullif(trim(l.corrected_text), '') IS NOT NULL)
    ORDER BY l.run_id, l.custom_id
"""


def curated_record(row: dict) -> dict:
    """One curated example: the conversation with the reviewed answer last."""
    corrected = bool((row["corrected_text"] or "").strip())
    messages = json.loads(row["messages"]) if row["messages"] else [{"role": "user", "content": row["prompt"]}]
    return {
        "run_id": row["run_id"],
        "custom_id": row["custom_id"],
        "output_id": row["output_id"],
        "source": "corrected" if corrected else "accepted",
        "rating": row["rating"],
        "messages": [*messages, {"role": "assistant", "content": row["corrected_text"] if corrected else row["model_response"]}],
    }


def jsonl_bytes(records: list[dict]) -> bytes:
    return b"".join(json.dumps({"messages": r["messages"]}, ensure_ascii=False, sort_keys=True).encode() + b"\n" for r in records)


def version_manifest(name: str, records: list[dict]) -> dict:
    """Same records → same content hash → same version, whenever and wherever it is built."""
    canonical = json.dumps(records, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode()
    content_hash = hashlib.sha256(canonical).hexdigest()
    source_runs = sorted({r["run_id"] for r in records})
    version = hashlib.sha256(f"{CURATED_FORMAT}:{name}:{content_hash}".encode()).hexdigest()[:16]
    return {
        "name": name,
        "curated_version": version,
        "format": CURATED_FORMAT,
        "content_hash": content_hash,
        "source_runs": source_runs,
        "counts": {
            "examples": len(records),
            "accepted": sum(r["source"] == "accepted" for r in records),
            "corrected": sum(r["source"] == "corrected" for r in records),
        },
        "files": {"parquet": "curated.parquet", "jsonl": "curated.jsonl"},
    }


def records_table(records: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(
        [{**r, "messages": json.dumps(r["messages"], ensure_ascii=False)} for r in records],
        schema=pa.schema(
            [
                ("run_id", pa.string()),
                ("custom_id", pa.string()),
                ("output_id", pa.string()),
                ("source", pa.string()),
                ("rating", pa.int32()),
                ("messages", pa.string()),  # JSON list of {role, content}, the reviewed answer last
            ]
        ),
    )


# ---- tasks: DuckDB ------------------------------------------------------------------------------


@task(name="select-samples")
def select_samples(store: StoreConfig, selection: SampleSelection) -> list[dict]:
    """Read-only: a user's WHERE condition cannot change the results file."""
    sql, params = selection_sql(selection)
    if not Path(store.duckdb_path).is_file():
        raise ValueError(f"results file {store.duckdb_path} does not exist: run batch_inference first")
    con = duckdb.connect(store.duckdb_path, read_only=True)
    try:
        found = con.execute("SELECT count(*) FROM runs WHERE run_id = ?", [selection.run_id]).fetchone()[0]
        if not found:
            raise ValueError(f"run {selection.run_id!r} is not in {store.duckdb_path}")
        try:
            cursor = con.execute(sql, params)
        except duckdb.Error as error:
            if selection.strategy != "where":
                raise
            raise ValueError(f"selection where condition {selection.where!r} does not work: {error}") from error
        columns = [c[0] for c in cursor.description]
        return [dict(zip(columns, row)) for row in cursor.fetchall()]
    finally:
        con.close()


@task(name="read-pushed-samples")
def read_pushed_samples(store: StoreConfig, server_url: str, project_id: int) -> dict[tuple[str, str], int]:
    con = connect(store.duckdb_path, store.lock_timeout_seconds)
    try:
        migrate(con)
        rows = con.execute(
            "SELECT run_id, custom_id, task_id FROM label_tasks WHERE server_url = ? AND project_id = ?",
            [server_url, project_id],
        ).fetchall()
        return {(run_id, custom_id): task_id for run_id, custom_id, task_id in rows}
    finally:
        con.close()


@task(name="write-label-tasks")
def write_label_tasks(store: StoreConfig, rows: list[dict]) -> None:
    """Record which Label Studio task holds which sample; a known sample keeps its first row."""
    if not rows:
        return
    con = connect(store.duckdb_path, store.lock_timeout_seconds)
    try:
        migrate(con)
        con.execute("BEGIN")
        con.executemany(
            "INSERT INTO label_tasks (server_url, project_id, project_title, run_id, custom_id, output_id, task_id, "
            "strategy) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            [[r["server_url"], r["project_id"], r["project_title"], r["run_id"], r["custom_id"], r["output_id"],
              r["task_id"], r["strategy"]] for r in rows],
        )  # fmt: skip
        con.execute("COMMIT")
    finally:
        con.close()


ANNOTATION_COLUMNS = [
    "annotation_id", "task_id", "project_id", "run_id", "custom_id", "output_id", "annotator", "verdict", "rating",
    "corrected_text", "cancelled", "created_at", "updated_at",
]  # fmt: skip


def sync_annotation_rows(con, server_url: str, project_id: int, rows: list[dict]) -> dict[str, int]:
    """Make the project's stored annotations equal the pulled ones, in one transaction.

    New ones are inserted, changed ones updated, identical ones left untouched (their pulled_at
    too), and ones deleted in Label Studio removed, so a withdrawn review stops counting.
    """
    con.execute("BEGIN")
    try:
        con.execute(
            "CREATE TEMP TABLE pulled AS SELECT * EXCLUDE (server_url, pulled_at) FROM annotations LIMIT 0"
        )
        if rows:
            con.executemany(
                f"INSERT INTO pulled ({', '.join(ANNOTATION_COLUMNS)}) VALUES ({', '.join('?' for _ in ANNOTATION_COLUMNS)})",
                [[row[c] for c in ANNOTATION_COLUMNS] for row in rows],
            )
        same = " AND ".join(f"a.{c} IS NOT DISTINCT FROM p.{c}" for c in ANNOTATION_COLUMNS[1:])
        new, changed = con.execute(
            f"""SELECT count(*) FILTER (WHERE a.annotation_id IS NULL),
                       count(*) FILTER (WHERE a.annotation_id IS NOT NULL AND NOT ({same}))
                FROM pulled p LEFT JOIN annotations a ON a.server_url = $url AND a.annotation_id = p.annotation_id""",
            {"url": server_url},
        ).fetchone()
        updates = ", ".join(f"{c} = excluded.{c}" for c in ANNOTATION_COLUMNS[1:])
        differs = " OR ".join(f"annotations.{c} IS DISTINCT FROM excluded.{c}" for c in ANNOTATION_COLUMNS[1:])
        con.execute(
            f"""INSERT INTO annotations (server_url, {', '.join(ANNOTATION_COLUMNS)}, pulled_at)
                SELECT $url, {', '.join(ANNOTATION_COLUMNS)}, current_timestamp FROM pulled
                ON CONFLICT (server_url, annotation_id) DO UPDATE SET {updates}, pulled_at = excluded.pulled_at
                WHERE {differs}""",
            {"url": server_url},
        )
        removed = len(con.execute(
            """DELETE FROM annotations WHERE server_url = $url AND project_id = $project
               AND annotation_id NOT IN (SELECT annotation_id FROM pulled) RETURNING annotation_id""",
            {"url": server_url, "project": project_id},
        ).fetchall())
        con.execute("DROP TABLE pulled")
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    return {"pulled": len(rows), "new": new, "changed": changed, "unchanged": len(rows) - new - changed, "removed": removed}


@task(name="write-annotations")
def write_annotations(store: StoreConfig, server_url: str, project_id: int, rows: list[dict]) -> dict[str, int]:
    con = connect(store.duckdb_path, store.lock_timeout_seconds)
    try:
        migrate(con)
        return sync_annotation_rows(con, server_url, project_id, rows)
    finally:
        con.close()


@task(name="read-curated-records")
def read_curated_records(store: StoreConfig, project: str | None, run_ids: list[str]) -> list[dict]:
    con = connect(store.duckdb_path, store.lock_timeout_seconds)
    try:
        migrate(con)
        cursor = con.execute(CURATED_SQL, {"project": project, "runs": run_ids})
        columns = [c[0] for c in cursor.description]
        return [curated_record(dict(zip(columns, row))) for row in cursor.fetchall()]
    finally:
        con.close()


@task(name="write-curated-version")
def write_curated_version(store: StoreConfig, output_dir: str, records: list[dict], manifest: dict) -> str:
    """Write the files (atomically, each) first, then record the version: a crash leaves no row."""
    folder = Path(output_dir) / manifest["name"] / manifest["curated_version"]
    files.write_parquet(records_table(records), str(folder / "curated.parquet"))
    write_atomically(folder / "curated.jsonl", jsonl_bytes(records))
    write_atomically(folder / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n")
    con = connect(store.duckdb_path, store.lock_timeout_seconds)
    try:
        migrate(con)
        con.execute(
            "INSERT INTO curated_versions (curated_version, name, content_hash, source_runs, examples, accepted, "
            "corrected, path) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            [manifest["curated_version"], manifest["name"], manifest["content_hash"], json.dumps(manifest["source_runs"]),
             manifest["counts"]["examples"], manifest["counts"]["accepted"], manifest["counts"]["corrected"], str(folder)],
        )  # fmt: skip
    finally:
        con.close()
    return str(folder)


def write_atomically(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(content)
    partial.replace(path)


# ---- tasks: Label Studio ------------------------------------------------------------------------


def retry_when_transient(task, task_run, state) -> bool:
    """Retry network failures and 5xx answers; a 4xx (bad key, bad config) will not heal by waiting."""
    error = state.result(raise_on_failure=False)
    return not isinstance(error, LabelStudioError) or error.transient


def remote(task_function, connection: LabelStudio):
    """The task with the connection's retry policy."""
    return task_function.with_options(
        retries=connection.retries,
        retry_delay_seconds=connection.retry_delay_seconds,
        retry_condition_fn=retry_when_transient,
    )


def load_connection(label_studio: str | LabelStudio) -> LabelStudio:
    """A block document name, or the connection itself."""
    return LabelStudio.load(label_studio) if isinstance(label_studio, str) else label_studio


@task(name="ensure-project")
def ensure_project(connection: LabelStudio, title: str) -> int:
    with LabelStudioClient(connection) as client:
        return client.find_project(title) or client.create_project(
            title, labeling_config(title), description="Pushed by vllm-batch-flows push_for_review."
        )


@task(name="find-project")
def find_project(connection: LabelStudio, title: str) -> int:
    with LabelStudioClient(connection) as client:
        project_id = client.find_project(title)
    if project_id is None:
        raise LabelStudioError(f"Label Studio at {connection.url} has no project titled {title!r}", transient=False)
    return project_id


@task(name="push-samples")
def push_samples(connection: LabelStudio, project_id: int, samples: list[dict], scorer: str) -> dict[tuple[str, str], int]:
    """Import the samples the project lacks; return every pushed sample's task id.

    The project itself is asked which samples it holds, so a push that died between the import
    and the DuckDB write does not import the same samples again.
    """
    with LabelStudioClient(connection) as client:
        present = held_tasks(client, project_id)
        missing = [s for s in samples if (s["run_id"], s["custom_id"]) not in present]
        if missing:
            client.import_tasks(project_id, [task_payload(s, scorer) for s in missing])
            present = held_tasks(client, project_id)
    return {key: present[key] for key in ((s["run_id"], s["custom_id"]) for s in samples) if key in present}


def held_tasks(client: LabelStudioClient, project_id: int) -> dict[tuple[str, str], int]:
    held = {}
    for item in client.export_tasks(project_id, annotated_only=False):
        key = task_key(item["data"])
        if key is not None:
            held.setdefault(key, item["id"])
    return held


@task(name="fetch-annotations")
def fetch_annotations(connection: LabelStudio, project_id: int) -> list[dict]:
    """Every annotation of our tasks in the project, as `annotations` rows (the export holds no secrets)."""
    with LabelStudioClient(connection) as client:
        annotated = client.export_tasks(project_id, annotated_only=True)
        emails = client.user_emails()
    return [
        parse_annotation(project_id, item, annotation, emails)
        for item in annotated
        if task_key(item["data"]) is not None
        for annotation in item.get("annotations") or []
    ]
