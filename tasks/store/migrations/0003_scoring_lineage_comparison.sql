-- scoring, lineage and comparison
ALTER TABLE requests ADD COLUMN reference VARCHAR;
CREATE TABLE comparisons (
    comparison_id VARCHAR NOT NULL,
    variant       VARCHAR NOT NULL,
    run_id        VARCHAR NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT current_timestamp,
    PRIMARY KEY (comparison_id, variant)
);
-- Where one answer came from: its run, shard, dataset version and source file and row.
CREATE VIEW output_lineage AS
    SELECT o.output_id, o.custom_id, o.run_id, o.dataset_version, d.dataset_name, d.source AS dataset_source,
           q.source_file, q.source_row, q.request_key, o.shard_key, o.output_key, o.sample_index,
           r.model, r.model_fingerprint, r.sampling_hash, r.template_hash, r.code_version, o.created_at
    FROM outputs o
    JOIN requests q ON q.dataset_version = o.dataset_version AND q.custom_id = o.custom_id
    JOIN dataset_versions d ON d.dataset_version = o.dataset_version
    JOIN runs r ON r.run_id = o.run_id;
-- Per run and scorer: the mean over the run's unique outputs with a 95% normal-approximation CI.
CREATE VIEW run_scores AS
    SELECT ro.run_id, s.scorer, s.scorer_version,
           count(s.value) AS n,
           count(*) - count(s.value) AS unscored,
           avg(s.value) AS mean,
           stddev_samp(s.value) AS stddev,
           avg(s.value) - 1.96 * stddev_samp(s.value) / sqrt(count(s.value)) AS ci95_low,
           avg(s.value) + 1.96 * stddev_samp(s.value) / sqrt(count(s.value)) AS ci95_high
    FROM run_outputs ro
    JOIN scores s ON s.output_id = ro.output_id
    WHERE ro.duplicate_of IS NULL
    GROUP BY ro.run_id, s.scorer, s.scorer_version;
CREATE OR REPLACE VIEW run_summary AS
    SELECT r.run_id, r.dataset_name, r.dataset_version, r.model, r.model_fingerprint, r.engine,
           r.sampling_hash, r.template_hash, r.code_version, r.started_at, r.wall_seconds,
           r.requests, r.unique_requests, r.duplicates, r.rejected, r.shards, r.cached_shards,
           r.engine_requests, r.outputs, r.errors,
           CASE WHEN r.outputs > 0 THEN r.errors / r.outputs END AS error_rate,
           r.prompt_tokens, r.completion_tokens, r.generated_tokens, r.tokens_per_second,
           (SELECT map_from_entries(list((s.scorer || '@' || s.scorer_version, s.mean) ORDER BY s.scorer))
            FROM run_scores s WHERE s.run_id = r.run_id) AS mean_scores
    FROM runs r;
-- The newest answer per input row and model: what "the current result" means.
CREATE VIEW latest_outputs AS
    SELECT r.dataset_name, ro.custom_id, r.model, ro.sample_index, ro.run_id, r.started_at,
           ro.dataset_version, ro.duplicate_of, ro.text, ro.finish_reason, ro.prompt_tokens,
           ro.completion_tokens, ro.error_code, ro.error, ro.output_id, ro.produced_by_run_id,
           ro.request_key
    FROM run_outputs ro
    JOIN runs r ON r.run_id = ro.run_id
    QUALIFY row_number() OVER (
        PARTITION BY r.dataset_name, ro.custom_id, r.model, ro.sample_index
        ORDER BY r.started_at DESC, r.run_id DESC
    ) = 1;
-- Two runs of the same dataset version, scorer by scorer, over the requests both answered.
CREATE MACRO compare_runs(run_a, run_b) AS TABLE
    WITH checked AS (
        SELECT CASE WHEN a.dataset_version = b.dataset_version THEN a.dataset_version
                    ELSE error('compare_runs: runs ' || a.run_id || ' and ' || b.run_id
                               || ' are on different dataset versions') END AS dataset_version
        FROM runs a, runs b WHERE a.run_id = run_a AND b.run_id = run_b
    ),
    scored AS (
        SELECT ro.run_id, ro.custom_id, ro.sample_index, s.scorer, s.scorer_version, s.value
        FROM run_outputs ro JOIN scores s ON s.output_id = ro.output_id
        WHERE ro.run_id IN (run_a, run_b) AND ro.duplicate_of IS NULL
          AND ro.dataset_version = (SELECT dataset_version FROM checked)
    )
    SELECT a.scorer, a.scorer_version, count(*) AS pairs,
           avg(a.value) AS mean_a, avg(b.value) AS mean_b, avg(b.value - a.value) AS mean_diff,
           avg(b.value - a.value) - 1.96 * stddev_samp(b.value - a.value) / sqrt(count(*)) AS diff_ci95_low,
           avg(b.value - a.value) + 1.96 * stddev_samp(b.value - a.value) / sqrt(count(*)) AS diff_ci95_high,
           count(*) FILTER (WHERE b.value > a.value) AS b_higher,
           count(*) FILTER (WHERE b.value < a.value) AS a_higher,
           count(*) FILTER (WHERE b.value = a.value) AS equal
    FROM scored a
    JOIN scored b ON b.custom_id = a.custom_id AND b.sample_index = a.sample_index
                 AND b.scorer = a.scorer AND b.scorer_version = a.scorer_version
    WHERE a.run_id = run_a AND b.run_id = run_b AND a.value IS NOT NULL AND b.value IS NOT NULL
    GROUP BY a.scorer, a.scorer_version
    ORDER BY a.scorer, a.scorer_version;
CREATE VIEW comparison_scores AS
    SELECT c.comparison_id, c.variant, c.run_id, s.scorer, s.scorer_version, s.n, s.unscored, s.mean,
           s.stddev, s.ci95_low, s.ci95_high
    FROM comparisons c JOIN run_scores s ON s.run_id = c.run_id;
-- Pairwise win rates per scorer (a higher value wins; ties count half; unscored answers are left out).
CREATE VIEW comparison_win_rates AS
    WITH scored AS (
        SELECT c.comparison_id, c.variant, ro.custom_id, ro.sample_index, s.scorer, s.scorer_version, s.value
        FROM comparisons c
        JOIN run_outputs ro ON ro.run_id = c.run_id AND ro.duplicate_of IS NULL
        JOIN scores s ON s.output_id = ro.output_id
        WHERE s.value IS NOT NULL
    )
    SELECT a.comparison_id, a.variant AS variant_a, b.variant AS variant_b, a.scorer, a.scorer_version,
           count(*) AS pairs,
           count(*) FILTER (WHERE a.value > b.value) AS wins,
           count(*) FILTER (WHERE a.value < b.value) AS losses,
           count(*) FILTER (WHERE a.value = b.value) AS ties,
           (count(*) FILTER (WHERE a.value > b.value) + 0.5 * count(*) FILTER (WHERE a.value = b.value))
               / count(*) AS win_rate
    FROM scored a
    JOIN scored b ON b.comparison_id = a.comparison_id AND b.variant <> a.variant
                 AND b.custom_id = a.custom_id AND b.sample_index = a.sample_index
                 AND b.scorer = a.scorer AND b.scorer_version = a.scorer_version
    GROUP BY a.comparison_id, a.variant, b.variant, a.scorer, a.scorer_version;
