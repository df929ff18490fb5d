-- runs record the input as prepared (an unchanged re-run is known before it starts) and whether duplicates fan out
ALTER TABLE runs ADD COLUMN input_fingerprint VARCHAR;
ALTER TABLE runs ADD COLUMN fan_out BOOLEAN NOT NULL DEFAULT true;
DROP VIEW run_outputs;
-- A duplicate (exact after normalization, or near) gets its canonical request's answer:
-- follow duplicate_of, since its own request_key may differ from the canonical's. A run
-- with fan_out off answers its canonical requests only.
CREATE VIEW run_outputs AS
    SELECT r.run_id, q.custom_id, q.duplicate_of, o.sample_index, o.text, o.finish_reason,
           o.prompt_tokens, o.completion_tokens, o.error_code, o.error, o.output_id,
           o.run_id AS produced_by_run_id, q.request_key, q.dataset_version, o.mean_logprob, o.latency_seconds
    FROM runs r
    JOIN requests q ON q.dataset_version = r.dataset_version
    LEFT JOIN requests c ON c.dataset_version = q.dataset_version AND c.custom_id = q.duplicate_of
    JOIN outputs o ON o.request_key = coalesce(c.request_key, q.request_key)
                  AND o.model_fingerprint = r.model_fingerprint
                  AND o.sampling_hash = r.sampling_hash
    WHERE r.fan_out OR q.duplicate_of IS NULL;
