-- label studio curation
CREATE TABLE label_tasks (
    server_url    VARCHAR NOT NULL,
    project_id    BIGINT NOT NULL,
    project_title VARCHAR NOT NULL,
    run_id        VARCHAR NOT NULL,
    custom_id     VARCHAR NOT NULL,
    output_id     VARCHAR NOT NULL,
    task_id       BIGINT NOT NULL,
    strategy      VARCHAR NOT NULL,
    pushed_at     TIMESTAMPTZ NOT NULL DEFAULT current_timestamp,
    PRIMARY KEY (server_url, project_id, run_id, custom_id)
);
CREATE TABLE annotations (
    server_url     VARCHAR NOT NULL,
    annotation_id  BIGINT NOT NULL,
    task_id        BIGINT NOT NULL,
    project_id     BIGINT,
    run_id         VARCHAR NOT NULL,
    custom_id      VARCHAR NOT NULL,
    output_id      VARCHAR,
    annotator      VARCHAR,
    verdict        VARCHAR,
    rating         INTEGER,
    corrected_text VARCHAR,
    cancelled      BOOLEAN NOT NULL,
    created_at     TIMESTAMPTZ,
    updated_at     TIMESTAMPTZ,
    pulled_at      TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (server_url, annotation_id)
);
CREATE TABLE curated_versions (
    curated_version VARCHAR PRIMARY KEY,
    name            VARCHAR NOT NULL,
    content_hash    VARCHAR NOT NULL,
    source_runs     JSON NOT NULL,
    examples        BIGINT NOT NULL,
    accepted        BIGINT NOT NULL,
    corrected       BIGINT NOT NULL,
    path            VARCHAR NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT current_timestamp
);
