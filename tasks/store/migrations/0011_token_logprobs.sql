-- outputs keep each token's logprob and its top alternatives (and the prompt's), when asked: list columns beside the answer, no side table
ALTER TABLE outputs ADD COLUMN token_logprobs STRUCT("token" VARCHAR, token_id INTEGER, logprob FLOAT, top STRUCT("token" VARCHAR, token_id INTEGER, logprob FLOAT)[])[];
ALTER TABLE outputs ADD COLUMN prompt_logprobs STRUCT("token" VARCHAR, token_id INTEGER, logprob FLOAT, top STRUCT("token" VARCHAR, token_id INTEGER, logprob FLOAT)[])[];
