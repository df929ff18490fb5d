-- outputs and scores without primary keys: DuckDB writes a table's whole index again at every checkpoint, so with them each shard's commit cost grew with everything stored (1-2 s a commit at 300k outputs); inserts now skip rows already there by an anti-join
CREATE TABLE outputs_unkeyed (
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
    error_kind VARCHAR
);
INSERT INTO outputs_unkeyed BY NAME SELECT * FROM outputs;
DROP TABLE outputs;
ALTER TABLE outputs_unkeyed RENAME TO outputs;
CREATE TABLE scores_unkeyed (
    output_id VARCHAR NOT NULL,
    scorer VARCHAR NOT NULL,
    scorer_version VARCHAR NOT NULL,
    "value" DOUBLE,
    "label" VARCHAR,
    run_id VARCHAR NOT NULL,
    created_at TIMESTAMP WITH TIME ZONE DEFAULT(current_timestamp) NOT NULL
);
INSERT INTO scores_unkeyed BY NAME SELECT * FROM scores;
DROP TABLE scores;
ALTER TABLE scores_unkeyed RENAME TO scores;
