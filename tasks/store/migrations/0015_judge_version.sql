-- judgements record their judge's version, so a judge whose prompt or verdict parsing changed is told apart
-- The `judge` scorer's version for the same judge (code version + rubric, model, sampling); null for
-- judgements recorded before it was.
ALTER TABLE judgements ADD COLUMN judge_version VARCHAR;
