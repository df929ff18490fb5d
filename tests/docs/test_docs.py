"""Docs that cannot rot, in the manner of sqlite-utils: every SQL block runs against a results file real
flows made; every table, view and column DESCRIBE shows is documented; every `vbf` subcommand, every
deployment and every module is named in its page; every link resolves."""

import re
from pathlib import Path

import duckdb
import pytest
import yaml

from tasks.store.migrations import migrate

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
# Queries that may rightly return nothing here: this database holds no judgement, but they run against its
# schema (tests/flows/test_judge_runs.py checks the judgements' rows).
MAY_BE_EMPTY = ("FROM judgements", "FROM judge_verdicts")


def doc_statements() -> list[str]:
    pages = sorted(DOCS.glob("*.md"))
    blocks = [block for page in pages for block in re.findall(r"```sql\n(.*?)```", page.read_text(), re.DOTALL)]
    with duckdb.connect() as con:
        return [statement.query for block in blocks for statement in con.extract_statements(block)]


def test_the_docs_have_at_least_ten_queries():
    assert len(doc_statements()) >= 10


@pytest.mark.slow
def test_every_documented_query_runs_against_a_database_made_by_the_flows(prefect_harness, tiny_model, reference_slice, store):
    from flows.compare_runs import compare_runs
    from tasks.config import SamplingConfig, ShardingConfig
    from tasks.scoring.compare import Variant
    from tasks.scoring.registry import DEFAULT_SCORERS
    from tasks.scoring.scorers import ScorerSpec

    judge = ScorerSpec(name="judge", options={"model": tiny_model.model_dump(), "sampling": {"max_tokens": 8}})
    compare_runs(  # two batch_inference runs of the slice, scored with a judge too, and their comparison
        variants=[
            Variant(name="greedy"),
            # with top-2 token logprobs, so the recipes over outputs.token_logprobs have rows
            Variant(name="sampled", sampling=SamplingConfig(temperature=1.0, seed=3, max_tokens=8, logprobs=2)),
        ],
        dataset=reference_slice,
        model=tiny_model,
        sampling=SamplingConfig(max_tokens=8),
        sharding=ShardingConfig(shard_size=16),
        store=store,
        scorers=[*DEFAULT_SCORERS, judge],
    )

    empty = []
    with duckdb.connect(store.duckdb_path, read_only=True) as con:
        for statement in doc_statements():
            rows = con.execute(statement).fetchall()
            if not rows and not any(marker in statement for marker in MAY_BE_EMPTY):
                empty.append(statement)
    assert empty == []


def documented_columns() -> dict[str, set[str]]:
    """The `### \\`name\\`` sections of docs/store.md, and the `column` of each row of their tables."""
    sections = re.split(r"(?m)^### `(\w+)`\s*$", (DOCS / "store.md").read_text())
    return {name: set(re.findall(r"(?m)^\| `(\w+)` \|", body)) for name, body in zip(sections[1::2], sections[2::2])}


def test_every_table_view_and_column_is_documented_and_nothing_else():
    with duckdb.connect() as con:
        migrate(con)
        relations = [name for (name,) in con.execute("SELECT table_name FROM information_schema.tables").fetchall()]
        described = {name: {row[0] for row in con.execute(f"DESCRIBE {name}").fetchall()} for name in relations}
    assert documented_columns() == described


def subcommands() -> list[str]:
    from flows.cli import parser

    commands = []
    for name, sub in parser()._subparsers._group_actions[0].choices.items():
        nested = sub._subparsers._group_actions[0].choices if sub._subparsers else {}
        commands += [f"{name} {child}" for child in nested] or [name]
    return commands


def test_every_vbf_subcommand_is_documented():
    page = (DOCS / "cli.md").read_text()
    assert len(subcommands()) >= 9
    assert [command for command in subcommands() if f"`vbf {command}" not in page] == []


def test_every_deployment_in_prefect_yaml_is_documented():
    deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    page = (DOCS / "deployments.md").read_text()
    for deployment in deployments:
        flow_file = deployment["entrypoint"].split(":")[0]
        flow_name = Path(flow_file).stem.replace("_", "-")
        assert f"`{flow_name}/{deployment['name']}`" in page and f"`{flow_file}`" in page, deployment["name"]


def architecture_paths() -> set[str]:
    """The paths the tree in docs/architecture.md names (indentation gives the folders)."""
    tree = re.search(r"```\n(flows/.*?)```", (DOCS / "architecture.md").read_text(), re.DOTALL).group(1)
    paths, folders = set(), []
    for line in tree.splitlines():
        depth, name = (len(line) - len(line.lstrip())) // 2, line.split()[0]
        folders = folders[:depth]
        paths.add("/".join([*folders, name]).rstrip("/"))
        if name.endswith("/"):
            folders.append(name.rstrip("/"))
    return paths


def test_the_architecture_page_names_every_module_and_nothing_that_is_not_there():
    named = architecture_paths()
    modules = {str(path.relative_to(REPO)) for top in ("flows", "tasks", "blocks") for path in (REPO / top).rglob("*.py")}
    package_docstrings = {m for m in modules if m.endswith("/__init__.py") and m.count("/") > 1 and "engines" not in m}
    modules -= {"flows/__init__.py", "tasks/__init__.py", *package_docstrings}
    modules = {m for m in modules if "/migrations/" not in m}  # the migrations folder is named as a whole
    assert modules <= named, sorted(modules - named)
    assert all((REPO / path).exists() for path in named), sorted(p for p in named if not (REPO / p).exists())


def test_the_readme_opens_with_the_two_commands_and_links_every_page():
    readme = (REPO / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", readme, re.DOTALL).group(1)
    assert [line.split()[:2] for line in first_block.strip().splitlines()] == [["make", "demo"], ["make", "test"]]
    assert {f"docs/{page.name}" for page in DOCS.glob("*.md")} <= set(re.findall(r"\]\((docs/[\w.]+)\)", readme))


def test_every_relative_link_in_the_docs_resolves():
    broken = []
    for page in [REPO / "README.md", *DOCS.glob("*.md")]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            if not (page.parent / target).exists():
                broken.append(f"{page.name}: {target}")
    assert broken == []
