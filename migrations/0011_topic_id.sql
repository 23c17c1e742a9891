-- The id of the topic each partition's batches were consumed from (Kafka's topic id, KIP-516,
-- as its tools print it), recorded at every restore. A topic deleted and created again under
-- the same name gets a new id: a partition whose recorded id is not the topic's id now resumes
-- at an offset of another log, so its restore is refused until an operator says where it
-- resumes (store::recovery::within_log, `recovery-point resume-at`). NULL: not recorded (an
-- older version, or brokers without topic ids).
ALTER TABLE cc_partition ADD COLUMN topic_id text;
