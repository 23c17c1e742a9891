-- The consumer group that last restored each partition, so wrote its batches since. A group's
-- recovery points (in its Kafka offsets' metadata) speak only for the batches its own instances
-- wrote: a partition last written under another group (a second deployment over the same store,
-- blue/green under a new group id) is decided by PostgreSQL alone (see store::recovery::decide).
-- NULL: restored last by a version that did not record it.
ALTER TABLE cc_partition ADD COLUMN writer_group text;
