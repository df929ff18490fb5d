-- outputs say whether an error is the request's own answer (permanent) or the server's passing trouble (transient)
ALTER TABLE outputs ADD COLUMN error_kind VARCHAR;
-- Errors stored before this version: connection errors, timeouts, 408, 409, 429 and 5xx after the
-- retries, and the 401 and 403 a wrong key answered, were the server's; the rest belong to their requests.
UPDATE outputs SET error_kind = CASE
    WHEN error_code IN ('connection_error', 'http_401', 'http_403', 'http_408', 'http_409', 'http_429',
                        'http_500', 'http_502', 'http_503', 'http_504') THEN 'transient'
    ELSE 'permanent' END
WHERE error_code IS NOT NULL;
ALTER TABLE runs ADD COLUMN transient_errors BIGINT NOT NULL DEFAULT 0;
ALTER TABLE run_shards ADD COLUMN transient_errors INTEGER NOT NULL DEFAULT 0;
DROP VIEW run_outputs;
CREATE VIEW run_outputs AS
    SELECT r.run_id, q.custom_id, q.duplicate_of, o.sample_index, o.text, o.finish_reason,
           o.prompt_tokens, o.completion_tokens, o.error_code, o.error, o.output_id,
           o.run_id AS produced_by_run_id, q.request_key, q.dataset_version, o.mean_logprob, o.latency_seconds,
           o.error_kind
    FROM runs r
    JOIN requests q ON q.dataset_version = r.dataset_version
    LEFT JOIN requests c ON c.dataset_version = q.dataset_version AND c.custom_id = q.duplicate_of
    JOIN outputs o ON o.request_key = coalesce(c.request_key, q.request_key)
                  AND o.model_fingerprint = r.model_fingerprint
                  AND o.sampling_hash = r.sampling_hash
    WHERE r.fan_out OR q.duplicate_of IS NULL;
