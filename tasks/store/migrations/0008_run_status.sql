-- runs carry a status and are committed while they run (live counts; finished_at set when they end)
ALTER TABLE runs ADD COLUMN status VARCHAR NOT NULL DEFAULT 'completed';
ALTER TABLE runs ALTER COLUMN finished_at DROP NOT NULL;
ALTER TABLE run_shards ADD COLUMN committed_at TIMESTAMPTZ;
CREATE OR REPLACE VIEW run_summary AS
    SELECT r.run_id, r.status, r.dataset_name, r.dataset_version, r.model, r.model_fingerprint, r.engine,
           r.sampling_hash, r.template_hash, r.code_version, r.started_at, r.finished_at, r.wall_seconds,
           r.requests, r.unique_requests, r.duplicates, r.rejected, r.shards, r.cached_shards,
           r.engine_requests, r.outputs, r.errors,
           CASE WHEN r.outputs > 0 THEN r.errors / r.outputs END AS error_rate,
           r.prompt_tokens, r.completion_tokens, r.generated_tokens, r.tokens_per_second,
           (SELECT map_from_entries(list((s.scorer || '@' || s.scorer_version, s.mean) ORDER BY s.scorer))
            FROM run_scores s WHERE s.run_id = r.run_id) AS mean_scores
    FROM runs r;
