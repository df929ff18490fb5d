-- outputs of a reasoning model keep the thinking apart from the answer, with the tokens of each; a run says which run it re-asks
ALTER TABLE outputs ADD COLUMN reasoning VARCHAR;
ALTER TABLE outputs ADD COLUMN reasoning_tokens INTEGER;
ALTER TABLE outputs ADD COLUMN text_tokens INTEGER;
ALTER TABLE outputs ADD COLUMN reasoning_truncated BOOLEAN;
ALTER TABLE runs ADD COLUMN rerun_of VARCHAR;
DROP VIEW run_outputs;
CREATE VIEW run_outputs AS
    SELECT r.run_id, q.custom_id, q.duplicate_of, o.sample_index, o.text, o.finish_reason,
           o.prompt_tokens, o.completion_tokens, o.error_code, o.error, o.output_id,
           o.run_id AS produced_by_run_id, q.request_key, q.dataset_version, o.mean_logprob, o.latency_seconds,
           o.error_kind, o.reasoning, o.reasoning_tokens, o.text_tokens, o.reasoning_truncated
    FROM runs r
    JOIN requests q ON q.dataset_version = r.dataset_version
    LEFT JOIN requests c ON c.dataset_version = q.dataset_version AND c.custom_id = q.duplicate_of
    JOIN outputs o ON o.request_key = coalesce(c.request_key, q.request_key)
                  AND o.model_fingerprint = r.model_fingerprint
                  AND o.sampling_hash = r.sampling_hash
    WHERE r.fan_out OR q.duplicate_of IS NULL;
-- A rerun's answers beside the attempts they re-ask (`vbf rerun`): one row per re-asked answer.
CREATE VIEW rerun_attempts AS
    SELECT r.run_id, r.rerun_of, n.custom_id, n.sample_index,
           f.output_id AS first_output_id, f.finish_reason AS first_finish_reason,
           f.completion_tokens AS first_completion_tokens, f.reasoning_tokens AS first_reasoning_tokens,
           f.reasoning_truncated AS first_reasoning_truncated,
           n.output_id, n.finish_reason, n.completion_tokens, n.reasoning_tokens, n.text_tokens,
           n.reasoning_truncated, n.reasoning, n.text
    FROM runs r
    JOIN run_outputs n ON n.run_id = r.run_id
    JOIN run_outputs f ON f.run_id = r.rerun_of AND f.custom_id = n.custom_id AND f.sample_index = n.sample_index
    WHERE r.rerun_of IS NOT NULL;
