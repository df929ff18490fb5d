CREATE TABLE annotations (
    server_url VARCHAR,
    annotation_id BIGINT,
    task_id BIGINT NOT NULL,
    project_id BIGINT,
    run_id VARCHAR NOT NULL,
    custom_id VARCHAR NOT NULL,
    output_id VARCHAR,
    annotator VARCHAR,
    verdict VARCHAR,
    rating INTEGER,
    corrected_text VARCHAR,
    cancelled BOOLEAN NOT NULL,
    created_at TIMESTAMP WITH TIME ZONE,
    updated_at TIMESTAMP WITH TIME ZONE,
    pulled_at TIMESTAMP WITH TIME ZONE NOT NULL,
    PRIMARY KEY(server_url, annotation_id)
);

CREATE MACRO compare_runs(run_a, run_b) AS TABLE WITH checked AS (SELECT CASE  WHEN ((a.dataset_version = b.dataset_version)) THEN (a.dataset_version) ELSE "error"((((('compare_runs: runs ' || a.run_id) || ' and ') || b.run_id) || ' are on different dataset versions')) END AS dataset_version FROM runs AS a , runs AS b WHERE ((a.run_id = run_a) AND (b.run_id = run_b))), scored AS (SELECT ro.run_id, ro.custom_id, ro.sample_index, s.scorer, s.scorer_version, s.direction, s."value" FROM (run_outputs AS ro INNER JOIN scores AS s ON ((s.output_id = ro.output_id))) WHERE ((ro.run_id IN (run_a, run_b)) AND (ro.duplicate_of IS NULL) AND (ro.dataset_version = (SELECT dataset_version FROM checked)))), paired AS (SELECT a.scorer, a.scorer_version, any_value(a.direction) AS direction, count_star() AS pairs, avg(a."value") AS mean_a, avg(b."value") AS mean_b, avg((b."value" - a."value")) AS mean_diff, (avg((b."value" - a."value")) - ((1.96 * stddev_samp((b."value" - a."value"))) / sqrt(count_star()))) AS diff_ci95_low, (avg((b."value" - a."value")) + ((1.96 * stddev_samp((b."value" - a."value"))) / sqrt(count_star()))) AS diff_ci95_high, count_star() FILTER (WHERE (b."value" > a."value")) AS b_higher, count_star() FILTER (WHERE (b."value" < a."value")) AS a_higher, count_star() FILTER (WHERE (b."value" = a."value")) AS equal FROM (scored AS a INNER JOIN scored AS b ON (((b.custom_id = a.custom_id) AND (b.sample_index = a.sample_index) AND (b.scorer = a.scorer) AND (b.scorer_version = a.scorer_version)))) WHERE ((a.run_id = run_a) AND (b.run_id = run_b) AND (a."value" IS NOT NULL) AND (b."value" IS NOT NULL)) GROUP BY a.scorer, a.scorer_version), tested AS (SELECT d.scorer, d.scorer_version, CASE  WHEN ((ca.run_id = run_a)) THEN (d.diff_ci95_low) ELSE (-(d.diff_ci95_high)) END AS diff_boot_ci95_low, CASE  WHEN ((ca.run_id = run_a)) THEN (d.diff_ci95_high) ELSE (-(d.diff_ci95_low)) END AS diff_boot_ci95_high, d.p_value FROM ((comparison_differences AS d INNER JOIN comparisons AS ca ON (((ca.comparison_id = d.comparison_id) AND (ca.variant = d.variant_a)))) INNER JOIN comparisons AS cb ON (((cb.comparison_id = d.comparison_id) AND (cb.variant = d.variant_b)))) WHERE (((ca.run_id = run_a) AND (cb.run_id = run_b)) OR ((ca.run_id = run_b) AND (cb.run_id = run_a))) QUALIFY (row_number() OVER (PARTITION BY d.scorer, d.scorer_version ORDER BY d.created_at DESC) = 1)) SELECT p.scorer, p.scorer_version, p.direction, p.pairs, p.mean_a, p.mean_b, p.mean_diff, p.diff_ci95_low, p.diff_ci95_high, t.diff_boot_ci95_low, t.diff_boot_ci95_high, t.p_value, p.b_higher, p.a_higher, p.equal FROM (paired AS p LEFT JOIN tested AS t ON (((t.scorer = p.scorer) AND (t.scorer_version = p.scorer_version)))) ORDER BY p.scorer, p.scorer_version;

CREATE TABLE comparison_differences (
    comparison_id VARCHAR,
    variant_a VARCHAR,
    variant_b VARCHAR,
    scorer VARCHAR,
    scorer_version VARCHAR,
    direction VARCHAR NOT NULL,
    pairs BIGINT NOT NULL,
    mean_a DOUBLE NOT NULL,
    mean_b DOUBLE NOT NULL,
    mean_diff DOUBLE NOT NULL,
    diff_ci95_low DOUBLE NOT NULL,
    diff_ci95_high DOUBLE NOT NULL,
    b_higher BIGINT NOT NULL,
    a_higher BIGINT NOT NULL,
    p_value DOUBLE NOT NULL,
    resamples INTEGER NOT NULL,
    seed BIGINT NOT NULL,
    created_at TIMESTAMP WITH TIME ZONE DEFAULT(current_timestamp) NOT NULL,
    PRIMARY KEY(comparison_id, variant_a, variant_b, scorer, scorer_version)
);

CREATE VIEW comparison_pairs AS WITH scored AS (SELECT c.comparison_id, c.variant, ro.custom_id, ro.sample_index, s.scorer, s.scorer_version, s.direction, s."value" FROM ((comparisons AS c INNER JOIN run_outputs AS ro ON (((ro.run_id = c.run_id) AND (ro.duplicate_of IS NULL)))) INNER JOIN scores AS s ON ((s.output_id = ro.output_id))) WHERE (s."value" IS NOT NULL)) SELECT a.comparison_id, a.variant AS variant_a, b.variant AS variant_b, a.custom_id, a.sample_index, a.scorer, a.scorer_version, a.direction, a."value" AS value_a, b."value" AS value_b FROM (scored AS a INNER JOIN scored AS b ON (((b.comparison_id = a.comparison_id) AND (b.variant != a.variant) AND (b.custom_id = a.custom_id) AND (b.sample_index = a.sample_index) AND (b.scorer = a.scorer) AND (b.scorer_version = a.scorer_version))));

CREATE VIEW comparison_scores AS SELECT c.comparison_id, c.variant, c.run_id, s.scorer, s.scorer_version, s.direction, s.n, s.unscored, s.mean, s.stddev, s.ci95_low, s.ci95_high FROM (comparisons AS c INNER JOIN run_scores AS s ON ((s.run_id = c.run_id)));

CREATE VIEW comparison_win_rates AS WITH counted AS (SELECT comparison_id, variant_a, variant_b, scorer, scorer_version, direction, count_star() AS pairs, count_star() FILTER (WHERE (((direction = 'higher') AND (value_a > value_b)) OR ((direction = 'lower') AND (value_a < value_b)))) AS wins, count_star() FILTER (WHERE (((direction = 'higher') AND (value_a < value_b)) OR ((direction = 'lower') AND (value_a > value_b)))) AS losses, count_star() FILTER (WHERE (value_a = value_b)) AS "ties" FROM comparison_pairs GROUP BY comparison_id, variant_a, variant_b, scorer, scorer_version, direction), rated AS (SELECT *, ((wins + (0.5 * "ties")) / pairs) AS rate, 1.959963984540054 AS z FROM counted) SELECT comparison_id, variant_a, variant_b, scorer, scorer_version, direction, pairs, CASE  WHEN ((direction != 'none')) THEN (wins) ELSE NULL END AS wins, CASE  WHEN ((direction != 'none')) THEN (losses) ELSE NULL END AS losses, CASE  WHEN ((direction != 'none')) THEN ("ties") ELSE NULL END AS "ties", CASE  WHEN ((direction != 'none')) THEN (rate) ELSE NULL END AS win_rate, CASE  WHEN ((direction != 'none')) THEN ((((rate + ((z * z) / (2 * pairs))) - (z * sqrt((((rate * (1 - rate)) / pairs) + ((z * z) / ((4 * pairs) * pairs)))))) / (1 + ((z * z) / pairs)))) ELSE NULL END AS win_rate_ci95_low, CASE  WHEN ((direction != 'none')) THEN ((((rate + ((z * z) / (2 * pairs))) + (z * sqrt((((rate * (1 - rate)) / pairs) + ((z * z) / ((4 * pairs) * pairs)))))) / (1 + ((z * z) / pairs)))) ELSE NULL END AS win_rate_ci95_high FROM rated;

CREATE TABLE comparisons (
    comparison_id VARCHAR,
    variant VARCHAR,
    run_id VARCHAR NOT NULL,
    created_at TIMESTAMP WITH TIME ZONE DEFAULT(current_timestamp) NOT NULL,
    PRIMARY KEY(comparison_id, variant)
);

CREATE TABLE curated_versions (
    curated_version VARCHAR PRIMARY KEY,
    "name" VARCHAR NOT NULL,
    content_hash VARCHAR NOT NULL,
    source_runs JSON NOT NULL,
    examples BIGINT NOT NULL,
    accepted BIGINT NOT NULL,
    corrected BIGINT NOT NULL,
    path VARCHAR NOT NULL,
    created_at TIMESTAMP WITH TIME ZONE DEFAULT(current_timestamp) NOT NULL
);

CREATE TABLE dataset_versions (
    dataset_version VARCHAR PRIMARY KEY,
    dataset_name VARCHAR NOT NULL,
    "source" VARCHAR NOT NULL,
    spec JSON NOT NULL,
    template_hash VARCHAR NOT NULL,
    rows_read BIGINT NOT NULL,
    requests BIGINT NOT NULL,
    unique_requests BIGINT NOT NULL,
    rejected BIGINT NOT NULL,
    created_at TIMESTAMP WITH TIME ZONE DEFAULT(current_timestamp) NOT NULL
);

CREATE TABLE judge_verdicts (
    judgement_id VARCHAR NOT NULL,
    custom_id VARCHAR NOT NULL,
    sample_index INTEGER NOT NULL,
    "position" VARCHAR NOT NULL,
    output_id_a VARCHAR NOT NULL,
    output_id_b VARCHAR,
    judge_custom_id VARCHAR NOT NULL,
    judge_output_id VARCHAR,
    verdict VARCHAR,
    winner VARCHAR,
    score DOUBLE,
    reason VARCHAR,
    "error" VARCHAR
);

CREATE TABLE judgements (
    judgement_id VARCHAR PRIMARY KEY,
    kind VARCHAR NOT NULL,
    run_a VARCHAR NOT NULL,
    run_b VARCHAR,
    against VARCHAR NOT NULL,
    judge_run_id VARCHAR NOT NULL,
    judge_model VARCHAR NOT NULL,
    judge_model_fingerprint VARCHAR NOT NULL,
    judge_sampling_hash VARCHAR NOT NULL,
    verdict_format VARCHAR NOT NULL,
    rubric_hash VARCHAR NOT NULL,
    requests BIGINT NOT NULL,
    pairs BIGINT NOT NULL,
    unjudged BIGINT NOT NULL,
    unparseable BIGINT NOT NULL,
    judge_errors BIGINT NOT NULL,
    a_wins BIGINT NOT NULL,
    b_wins BIGINT NOT NULL,
    "ties" BIGINT NOT NULL,
    inconsistent BIGINT,
    position_bias DOUBLE,
    first_position_rate DOUBLE,
    mean_score_a DOUBLE,
    mean_score_b DOUBLE,
    win_rate DOUBLE,
    win_rate_ci95_low DOUBLE,
    win_rate_ci95_high DOUBLE,
    p_value DOUBLE,
    created_at TIMESTAMP WITH TIME ZONE DEFAULT(current_timestamp) NOT NULL,
    judge_version VARCHAR
);

CREATE TABLE label_tasks (
    server_url VARCHAR,
    project_id BIGINT,
    project_title VARCHAR NOT NULL,
    run_id VARCHAR,
    custom_id VARCHAR,
    output_id VARCHAR NOT NULL,
    task_id BIGINT NOT NULL,
    strategy VARCHAR NOT NULL,
    pushed_at TIMESTAMP WITH TIME ZONE DEFAULT(current_timestamp) NOT NULL,
    PRIMARY KEY(server_url, project_id, run_id, custom_id)
);

CREATE VIEW latest_outputs AS SELECT r.dataset_name, ro.custom_id, r.model, ro.sample_index, ro.run_id, r.started_at, ro.dataset_version, ro.duplicate_of, ro."text", ro.finish_reason, ro.prompt_tokens, ro.completion_tokens, ro.error_code, ro."error", ro.output_id, ro.produced_by_run_id, ro.request_key FROM (run_outputs AS ro INNER JOIN runs AS r ON ((r.run_id = ro.run_id))) QUALIFY (row_number() OVER (PARTITION BY r.dataset_name, ro.custom_id, r.model, ro.sample_index ORDER BY r.started_at DESC, r.run_id DESC) = 1);

CREATE VIEW output_lineage AS SELECT o.output_id, o.custom_id, o.run_id, o.dataset_version, d.dataset_name, d."source" AS dataset_source, q.source_file, q.source_row, q.request_key, o.shard_key, o.output_key, o.sample_index, r.model, r.model_fingerprint, r.sampling_hash, r.template_hash, r.code_version, o.created_at FROM (((outputs AS o INNER JOIN requests AS q ON (((q.dataset_version = o.dataset_version) AND (q.custom_id = o.custom_id)))) INNER JOIN dataset_versions AS d ON ((d.dataset_version = o.dataset_version))) INNER JOIN runs AS r ON ((r.run_id = o.run_id)));

CREATE TABLE outputs (
    output_id VARCHAR NOT NULL,
    request_key VARCHAR NOT NULL,
    model_fingerprint VARCHAR NOT NULL,
    sampling_hash VARCHAR NOT NULL,
    sample_index INTEGER NOT NULL,
    run_id VARCHAR NOT NULL,
    dataset_version VARCHAR NOT NULL,
    custom_id VARCHAR NOT NULL,
    shard_key VARCHAR NOT NULL,
    output_key VARCHAR NOT NULL,
    "text" VARCHAR,
    finish_reason VARCHAR,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    error_code VARCHAR,
    "error" VARCHAR,
    created_at TIMESTAMP WITH TIME ZONE DEFAULT(current_timestamp) NOT NULL,
    mean_logprob DOUBLE,
    latency_seconds DOUBLE,
    error_kind VARCHAR,
    token_logprobs STRUCT(token VARCHAR, token_id INTEGER, logprob FLOAT, top STRUCT(token VARCHAR, token_id INTEGER, logprob FLOAT)[])[],
    prompt_logprobs STRUCT(token VARCHAR, token_id INTEGER, logprob FLOAT, top STRUCT(token VARCHAR, token_id INTEGER, logprob FLOAT)[])[],
    reasoning VARCHAR,
    reasoning_tokens INTEGER,
    text_tokens INTEGER,
    reasoning_truncated BOOLEAN
);

CREATE TABLE rejected_rows (
    dataset_version VARCHAR,
    source_file VARCHAR,
    source_row BIGINT,
    custom_id VARCHAR,
    field VARCHAR NOT NULL,
    reason VARCHAR NOT NULL,
    PRIMARY KEY(dataset_version, source_file, source_row)
);

CREATE TABLE requests (
    dataset_version VARCHAR,
    custom_id VARCHAR,
    request_key VARCHAR NOT NULL,
    prompt VARCHAR,
    messages JSON,
    duplicate_of VARCHAR,
    source_file VARCHAR NOT NULL,
    source_row BIGINT NOT NULL,
    reference VARCHAR,
    overrides JSON,
    PRIMARY KEY(dataset_version, custom_id)
);

CREATE VIEW rerun_attempts AS SELECT r.run_id, r.rerun_of, n.custom_id, n.sample_index, f.output_id AS first_output_id, f.finish_reason AS first_finish_reason, f.completion_tokens AS first_completion_tokens, f.reasoning_tokens AS first_reasoning_tokens, f.reasoning_truncated AS first_reasoning_truncated, n.output_id, n.finish_reason, n.completion_tokens, n.reasoning_tokens, n.text_tokens, n.reasoning_truncated, n.reasoning, n."text" FROM ((runs AS r INNER JOIN run_outputs AS n ON ((n.run_id = r.run_id))) INNER JOIN run_outputs AS f ON (((f.run_id = r.rerun_of) AND (f.custom_id = n.custom_id) AND (f.sample_index = n.sample_index)))) WHERE (r.rerun_of IS NOT NULL);

CREATE VIEW run_outputs AS SELECT r.run_id, q.custom_id, q.duplicate_of, o.sample_index, o."text", o.finish_reason, o.prompt_tokens, o.completion_tokens, o.error_code, o."error", o.output_id, o.run_id AS produced_by_run_id, q.request_key, q.dataset_version, o.mean_logprob, o.latency_seconds, o.error_kind, o.reasoning, o.reasoning_tokens, o.text_tokens, o.reasoning_truncated FROM (((runs AS r INNER JOIN requests AS q ON ((q.dataset_version = r.dataset_version))) LEFT JOIN requests AS c ON (((c.dataset_version = q.dataset_version) AND (c.custom_id = q.duplicate_of)))) INNER JOIN outputs AS o ON (((o.request_key = COALESCE(c.request_key, q.request_key)) AND (o.model_fingerprint = r.model_fingerprint) AND (o.sampling_hash = r.sampling_hash)))) WHERE (r.fan_out OR (q.duplicate_of IS NULL));

CREATE VIEW run_scores AS SELECT ro.run_id, s.scorer, s.scorer_version, any_value(s.direction) AS direction, count(s."value") AS n, (count_star() - count(s."value")) AS unscored, avg(s."value") AS mean, stddev_samp(s."value") AS stddev, (avg(s."value") - ((1.96 * stddev_samp(s."value")) / sqrt(count(s."value")))) AS ci95_low, (avg(s."value") + ((1.96 * stddev_samp(s."value")) / sqrt(count(s."value")))) AS ci95_high FROM (run_outputs AS ro INNER JOIN scores AS s ON ((s.output_id = ro.output_id))) WHERE (ro.duplicate_of IS NULL) GROUP BY ro.run_id, s.scorer, s.scorer_version;

CREATE TABLE run_shards (
    run_id VARCHAR,
    shard_key VARCHAR,
    output_key VARCHAR NOT NULL,
    requests INTEGER NOT NULL,
    errors INTEGER NOT NULL,
    prompt_tokens BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    generate_seconds DOUBLE NOT NULL,
    cached BOOLEAN NOT NULL,
    batch_size INTEGER,
    max_num_seqs INTEGER,
    engine_load_seconds DOUBLE,
    transient_errors INTEGER DEFAULT(0) NOT NULL,
    committed_at TIMESTAMP WITH TIME ZONE,
    PRIMARY KEY(run_id, shard_key)
);

CREATE VIEW run_summary AS SELECT r.run_id, r.status, r.dataset_name, r.dataset_version, r.model, r.model_fingerprint, r.engine, r.sampling_hash, r.template_hash, r.code_version, r.started_at, r.finished_at, r.wall_seconds, r.requests, r.unique_requests, r.duplicates, r.rejected, r.shards, r.cached_shards, r.engine_requests, r.outputs, r.errors, CASE  WHEN ((r.outputs > 0)) THEN ((r.errors / r.outputs)) ELSE NULL END AS error_rate, r.prompt_tokens, r.completion_tokens, r.generated_tokens, r.tokens_per_second, (SELECT map_from_entries(list("row"(((s.scorer || '@') || s.scorer_version), s.mean) ORDER BY s.scorer)) FROM run_scores AS s WHERE (s.run_id = r.run_id)) AS mean_scores FROM runs AS r;

CREATE TABLE runs (
    run_id VARCHAR PRIMARY KEY,
    dataset_version VARCHAR NOT NULL,
    dataset_name VARCHAR NOT NULL,
    model VARCHAR NOT NULL,
    model_fingerprint VARCHAR NOT NULL,
    engine VARCHAR NOT NULL,
    engine_args JSON NOT NULL,
    sampling_params JSON NOT NULL,
    sampling_hash VARCHAR NOT NULL,
    template_hash VARCHAR NOT NULL,
    scorers VARCHAR NOT NULL,
    code_version VARCHAR NOT NULL,
    started_at TIMESTAMP WITH TIME ZONE NOT NULL,
    finished_at TIMESTAMP WITH TIME ZONE,
    wall_seconds DOUBLE NOT NULL,
    rows_read BIGINT NOT NULL,
    rejected BIGINT NOT NULL,
    requests BIGINT NOT NULL,
    unique_requests BIGINT NOT NULL,
    duplicates BIGINT NOT NULL,
    shards INTEGER NOT NULL,
    cached_shards INTEGER NOT NULL,
    engine_requests BIGINT NOT NULL,
    outputs BIGINT NOT NULL,
    errors BIGINT NOT NULL,
    prompt_tokens BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    generated_tokens BIGINT NOT NULL,
    tokens_per_second DOUBLE NOT NULL,
    stage_seconds JSON,
    reused_requests BIGINT DEFAULT(0) NOT NULL,
    input_fingerprint VARCHAR,
    fan_out BOOLEAN DEFAULT(true) NOT NULL,
    transient_errors BIGINT DEFAULT(0) NOT NULL,
    status VARCHAR DEFAULT('completed') NOT NULL,
    rerun_of VARCHAR
);

CREATE TABLE schema_migrations (
    "version" INTEGER PRIMARY KEY,
    "name" VARCHAR NOT NULL,
    applied_at TIMESTAMP WITH TIME ZONE DEFAULT(current_timestamp) NOT NULL
);

CREATE TABLE scores (
    output_id VARCHAR NOT NULL,
    scorer VARCHAR NOT NULL,
    scorer_version VARCHAR NOT NULL,
    "value" DOUBLE,
    "label" VARCHAR,
    run_id VARCHAR NOT NULL,
    created_at TIMESTAMP WITH TIME ZONE DEFAULT(current_timestamp) NOT NULL,
    direction VARCHAR DEFAULT('none') NOT NULL
);
