-- inference details: logprobs, latency, batch sizes, stage timings
ALTER TABLE outputs ADD COLUMN mean_logprob DOUBLE;
ALTER TABLE outputs ADD COLUMN latency_seconds DOUBLE;
ALTER TABLE run_shards ADD COLUMN batch_size INTEGER;
ALTER TABLE run_shards ADD COLUMN max_num_seqs INTEGER;
ALTER TABLE run_shards ADD COLUMN engine_load_seconds DOUBLE;
ALTER TABLE runs ADD COLUMN stage_seconds JSON;
