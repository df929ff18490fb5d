-- judgements of stored runs by an LLM judge (pairwise in both orders, or absolute) and the verdicts they add up from
-- One row per judgement: what was judged, by which judge run, and the numbers its verdicts add up to
-- (computed by the judge_runs flow; a test recomputes them from judge_verdicts). Judging the same
-- answers again with the same judge replaces the judgement's rows.
CREATE TABLE judgements (
    judgement_id            VARCHAR PRIMARY KEY,
    kind                    VARCHAR NOT NULL,
    run_a                   VARCHAR NOT NULL,
    run_b                   VARCHAR,
    against                 VARCHAR NOT NULL,
    judge_run_id            VARCHAR NOT NULL,
    judge_model             VARCHAR NOT NULL,
    judge_model_fingerprint VARCHAR NOT NULL,
    judge_sampling_hash     VARCHAR NOT NULL,
    verdict_format          VARCHAR NOT NULL,
    rubric_hash             VARCHAR NOT NULL,
    requests                BIGINT NOT NULL,
    pairs                   BIGINT NOT NULL,
    unjudged                BIGINT NOT NULL,
    unparseable             BIGINT NOT NULL,
    judge_errors            BIGINT NOT NULL,
    a_wins                  BIGINT NOT NULL,
    b_wins                  BIGINT NOT NULL,
    ties                    BIGINT NOT NULL,
    inconsistent            BIGINT,
    position_bias           DOUBLE,
    first_position_rate     DOUBLE,
    mean_score_a            DOUBLE,
    mean_score_b            DOUBLE,
    win_rate                DOUBLE,
    win_rate_ci95_low       DOUBLE,
    win_rate_ci95_high      DOUBLE,
    p_value                 DOUBLE,
    created_at              TIMESTAMPTZ NOT NULL DEFAULT current_timestamp
);
-- One row per judge request: the answers it judged, the judge's answer (an output of the judge run),
-- and the verdict read from it. No key, as outputs: a judgement's rows are replaced as a whole.
CREATE TABLE judge_verdicts (
    judgement_id    VARCHAR NOT NULL,
    custom_id       VARCHAR NOT NULL,
    sample_index    INTEGER NOT NULL,
    position        VARCHAR NOT NULL,
    output_id_a     VARCHAR NOT NULL,
    output_id_b     VARCHAR,
    judge_custom_id VARCHAR NOT NULL,
    judge_output_id VARCHAR,
    verdict         VARCHAR,
    winner          VARCHAR,
    score           DOUBLE,
    reason          VARCHAR,
    error           VARCHAR
);
