-- initial schema
CREATE TABLE dataset_versions (
    dataset_version VARCHAR PRIMARY KEY,
    dataset_name    VARCHAR NOT NULL,
    source          VARCHAR NOT NULL,
    spec            JSON NOT NULL,
    template_hash   VARCHAR NOT NULL,
    rows_read       BIGINT NOT NULL,
    requests        BIGINT NOT NULL,
    unique_requests BIGINT NOT NULL,
    rejected        BIGINT NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT current_timestamp
);
CREATE TABLE requests (
    dataset_version VARCHAR NOT NULL,
    custom_id       VARCHAR NOT NULL,
    request_key     VARCHAR NOT NULL,
    prompt          VARCHAR,
    messages        JSON,
    duplicate_of    VARCHAR,
    source_file     VARCHAR NOT NULL,
    source_row      BIGINT NOT NULL,
    PRIMARY KEY (dataset_version, custom_id)
);
CREATE TABLE rejected_rows (
    dataset_version VARCHAR NOT NULL,
    source_file     VARCHAR NOT NULL,
    source_row      BIGINT NOT NULL,
    custom_id       VARCHAR,
    field           VARCHAR NOT NULL,
    reason          VARCHAR NOT NULL,
    PRIMARY KEY (dataset_version, source_file, source_row)
);
CREATE TABLE runs (
    run_id            VARCHAR PRIMARY KEY,
    dataset_version   VARCHAR NOT NULL,
    dataset_name      VARCHAR NOT NULL,
    model             VARCHAR NOT NULL,
    model_fingerprint VARCHAR NOT NULL,
    engine            VARCHAR NOT NULL,
    engine_args       JSON NOT NULL,
    sampling_params   JSON NOT NULL,
    sampling_hash     VARCHAR NOT NULL,
    template_hash     VARCHAR NOT NULL,
    scorers           VARCHAR NOT NULL,
    code_version      VARCHAR NOT NULL,
    started_at        TIMESTAMPTZ NOT NULL,
    finished_at       TIMESTAMPTZ NOT NULL,
    wall_seconds      DOUBLE NOT NULL,
    rows_read         BIGINT NOT NULL,
    rejected          BIGINT NOT NULL,
    requests          BIGINT NOT NULL,
    unique_requests   BIGINT NOT NULL,
    duplicates        BIGINT NOT NULL,
    shards            INTEGER NOT NULL,
    cached_shards     INTEGER NOT NULL,
    engine_requests   BIGINT NOT NULL,
    outputs           BIGINT NOT NULL,
    errors            BIGINT NOT NULL,
    prompt_tokens     BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    generated_tokens  BIGINT NOT NULL,
    tokens_per_second DOUBLE NOT NULL
);
CREATE TABLE run_shards (
    run_id            VARCHAR NOT NULL,
    shard_key         VARCHAR NOT NULL,
    output_key        VARCHAR NOT NULL,
    requests          INTEGER NOT NULL,
    errors            INTEGER NOT NULL,
    prompt_tokens     BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    generate_seconds  DOUBLE NOT NULL,
    cached            BOOLEAN NOT NULL,
    PRIMARY KEY (run_id, shard_key)
);
CREATE TABLE outputs (
    output_id         VARCHAR PRIMARY KEY,
    request_key       VARCHAR NOT NULL,
    model_fingerprint VARCHAR NOT NULL,
    sampling_hash     VARCHAR NOT NULL,
    sample_index      INTEGER NOT NULL,
    run_id            VARCHAR NOT NULL,
    dataset_version   VARCHAR NOT NULL,
    custom_id         VARCHAR NOT NULL,
    shard_key         VARCHAR NOT NULL,
    output_key        VARCHAR NOT NULL,
    text              VARCHAR,
    finish_reason     VARCHAR,
    prompt_tokens     INTEGER,
    completion_tokens INTEGER,
    error_code        VARCHAR,
    error             VARCHAR,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT current_timestamp
);
CREATE TABLE scores (
    output_id      VARCHAR NOT NULL,
    scorer         VARCHAR NOT NULL,
    scorer_version VARCHAR NOT NULL,
    value          DOUBLE,
    label          VARCHAR,
    run_id         VARCHAR NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT current_timestamp,
    PRIMARY KEY (output_id, scorer, scorer_version)
);
CREATE VIEW run_outputs AS
    SELECT r.run_id, q.custom_id, q.duplicate_of, o.sample_index, o.text, o.finish_reason,
           o.prompt_tokens, o.completion_tokens, o.error_code, o.error, o.output_id,
           o.run_id AS produced_by_run_id, q.request_key, q.dataset_version
    FROM runs r
    JOIN requests q ON q.dataset_version = r.dataset_version
    JOIN outputs o ON o.request_key = q.request_key
                  AND o.model_fingerprint = r.model_fingerprint
                  AND o.sampling_hash = r.sampling_hash;
CREATE VIEW run_summary AS
    SELECT run_id, dataset_name, dataset_version, model, started_at, wall_seconds,
           requests, unique_requests, duplicates, rejected, shards, cached_shards,
           engine_requests, outputs, errors,
           CASE WHEN outputs > 0 THEN errors / outputs END AS error_rate,
           prompt_tokens, completion_tokens, tokens_per_second
    FROM runs;
