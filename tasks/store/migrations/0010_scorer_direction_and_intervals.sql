-- scorer direction with every score; win rates by direction with ties and Wilson intervals; paired differences with bootstrap intervals and sign-test p-values
-- Paired differences of means (b - a) per pair of variants and scorer, computed by the compare flow
-- in Python (a paired bootstrap interval; an exact two-sided sign test over the pairs that differ).
CREATE TABLE comparison_differences (
    comparison_id   VARCHAR NOT NULL,
    variant_a       VARCHAR NOT NULL,
    variant_b       VARCHAR NOT NULL,
    scorer          VARCHAR NOT NULL,
    scorer_version  VARCHAR NOT NULL,
    direction       VARCHAR NOT NULL,
    pairs           BIGINT NOT NULL,
    mean_a          DOUBLE NOT NULL,
    mean_b          DOUBLE NOT NULL,
    mean_diff       DOUBLE NOT NULL,
    diff_ci95_low   DOUBLE NOT NULL,
    diff_ci95_high  DOUBLE NOT NULL,
    b_higher        BIGINT NOT NULL,
    a_higher        BIGINT NOT NULL,
    p_value         DOUBLE NOT NULL,
    resamples       INTEGER NOT NULL,
    seed            BIGINT NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT current_timestamp,
    PRIMARY KEY (comparison_id, variant_a, variant_b, scorer, scorer_version)
);
-- Which value of a scorer is better: 'higher', 'lower' or 'none' (no winner, e.g. a length). Rows
-- stored before get their built-in's direction; other scorers (user scorers, a judge renamed by its
-- `name` option) 'none', until a new version of them writes rows of its own.
-- A new table rather than ADD COLUMN and UPDATE: DuckDB sets no NOT NULL on a column with outstanding updates.
CREATE TABLE scores_directed (
    output_id VARCHAR NOT NULL,
    scorer VARCHAR NOT NULL,
    scorer_version VARCHAR NOT NULL,
    "value" DOUBLE,
    "label" VARCHAR,
    run_id VARCHAR NOT NULL,
    created_at TIMESTAMP WITH TIME ZONE DEFAULT(current_timestamp) NOT NULL,
    direction VARCHAR DEFAULT('none') NOT NULL
);
INSERT INTO scores_directed BY NAME
    SELECT *, CASE
        WHEN scorer IN ('valid_json', 'json_schema', 'regex', 'exact_match', 'contains', 'chrf', 'mean_logprob', 'judge')
             OR regexp_matches(scorer, '^distinct_[0-9]+$') THEN 'higher'
        WHEN scorer IN ('finish_reason', 'empty_output', 'refusal', 'perplexity') THEN 'lower'
        ELSE 'none' END AS direction
    FROM scores;
DROP TABLE scores;
ALTER TABLE scores_directed RENAME TO scores;
-- Per run and scorer, with the scorer's direction.
CREATE OR REPLACE VIEW run_scores AS
    SELECT ro.run_id, s.scorer, s.scorer_version, any_value(s.direction) AS direction,
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
CREATE OR REPLACE VIEW comparison_scores AS
    SELECT c.comparison_id, c.variant, c.run_id, s.scorer, s.scorer_version, s.direction, s.n, s.unscored, s.mean,
           s.stddev, s.ci95_low, s.ci95_high
    FROM comparisons c JOIN run_scores s ON s.run_id = c.run_id;
-- Every ordered pair of variants' values for one request and sample, per scorer (unscored answers left out).
CREATE VIEW comparison_pairs AS
    WITH scored AS (
        SELECT c.comparison_id, c.variant, ro.custom_id, ro.sample_index, s.scorer, s.scorer_version, s.direction, s.value
        FROM comparisons c
        JOIN run_outputs ro ON ro.run_id = c.run_id AND ro.duplicate_of IS NULL
        JOIN scores s ON s.output_id = ro.output_id
        WHERE s.value IS NOT NULL
    )
    SELECT a.comparison_id, a.variant AS variant_a, b.variant AS variant_b, a.custom_id, a.sample_index,
           a.scorer, a.scorer_version, a.direction, a.value AS value_a, b.value AS value_b
    FROM scored a
    JOIN scored b ON b.comparison_id = a.comparison_id AND b.variant <> a.variant
                 AND b.custom_id = a.custom_id AND b.sample_index = a.sample_index
                 AND b.scorer = a.scorer AND b.scorer_version = a.scorer_version;
-- Win rates of a over b by the scorer's direction; ties count half, in the rate and in its 95% Wilson
-- interval (z = 1.96, n = pairs). A scorer without a direction has pairs but no winner: nulls.
CREATE OR REPLACE VIEW comparison_win_rates AS
    WITH counted AS (
        SELECT comparison_id, variant_a, variant_b, scorer, scorer_version, direction,
               count(*) AS pairs,
               count(*) FILTER (WHERE (direction = 'higher' AND value_a > value_b)
                                   OR (direction = 'lower' AND value_a < value_b)) AS wins,
               count(*) FILTER (WHERE (direction = 'higher' AND value_a < value_b)
                                   OR (direction = 'lower' AND value_a > value_b)) AS losses,
               count(*) FILTER (WHERE value_a = value_b) AS ties
        FROM comparison_pairs
        GROUP BY comparison_id, variant_a, variant_b, scorer, scorer_version, direction
    ),
    rated AS (
        SELECT *, (wins + 0.5 * ties) / pairs AS rate, 1.959963984540054 AS z FROM counted
    )
    SELECT comparison_id, variant_a, variant_b, scorer, scorer_version, direction, pairs,
           CASE WHEN direction <> 'none' THEN wins END AS wins,
           CASE WHEN direction <> 'none' THEN losses END AS losses,
           CASE WHEN direction <> 'none' THEN ties END AS ties,
           CASE WHEN direction <> 'none' THEN rate END AS win_rate,
           CASE WHEN direction <> 'none' THEN
               (rate + z * z / (2 * pairs) - z * sqrt(rate * (1 - rate) / pairs + z * z / (4 * pairs * pairs)))
               / (1 + z * z / pairs) END AS win_rate_ci95_low,
           CASE WHEN direction <> 'none' THEN
               (rate + z * z / (2 * pairs) + z * sqrt(rate * (1 - rate) / pairs + z * z / (4 * pairs * pairs)))
               / (1 + z * z / pairs) END AS win_rate_ci95_high
    FROM rated;
-- Two runs, scorer by scorer, with the direction; the bootstrap interval and p-value of the newest
-- comparison that paired these two runs (null when no compare flow did).
CREATE OR REPLACE MACRO compare_runs(run_a, run_b) AS TABLE
    WITH checked AS (
        SELECT CASE WHEN a.dataset_version = b.dataset_version THEN a.dataset_version
                    ELSE error('compare_runs: runs ' || a.run_id || ' and ' || b.run_id
                               || ' are on different dataset versions') END AS dataset_version
        FROM runs a, runs b WHERE a.run_id = run_a AND b.run_id = run_b
    ),
    scored AS (
        SELECT ro.run_id, ro.custom_id, ro.sample_index, s.scorer, s.scorer_version, s.direction, s.value
        FROM run_outputs ro JOIN scores s ON s.output_id = ro.output_id
        WHERE ro.run_id IN (run_a, run_b) AND ro.duplicate_of IS NULL
          AND ro.dataset_version = (SELECT dataset_version FROM checked)
    ),
    paired AS (
        SELECT a.scorer, a.scorer_version, any_value(a.direction) AS direction, count(*) AS pairs,
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
    ),
    tested AS (  -- stored as (variant a, variant b) in either order of these runs: b - a turns sign with it
        SELECT d.scorer, d.scorer_version,
               CASE WHEN ca.run_id = run_a THEN d.diff_ci95_low ELSE -d.diff_ci95_high END AS diff_boot_ci95_low,
               CASE WHEN ca.run_id = run_a THEN d.diff_ci95_high ELSE -d.diff_ci95_low END AS diff_boot_ci95_high,
               d.p_value
        FROM comparison_differences d
        JOIN comparisons ca ON ca.comparison_id = d.comparison_id AND ca.variant = d.variant_a
        JOIN comparisons cb ON cb.comparison_id = d.comparison_id AND cb.variant = d.variant_b
        WHERE (ca.run_id = run_a AND cb.run_id = run_b) OR (ca.run_id = run_b AND cb.run_id = run_a)
        QUALIFY row_number() OVER (PARTITION BY d.scorer, d.scorer_version ORDER BY d.created_at DESC) = 1
    )
    SELECT p.scorer, p.scorer_version, p.direction, p.pairs, p.mean_a, p.mean_b, p.mean_diff,
           p.diff_ci95_low, p.diff_ci95_high, t.diff_boot_ci95_low, t.diff_boot_ci95_high, t.p_value,
           p.b_higher, p.a_higher, p.equal
    FROM paired p
    LEFT JOIN tested t ON t.scorer = p.scorer AND t.scorer_version = p.scorer_version
    ORDER BY p.scorer, p.scorer_version;
