-- How many partitions of a side-effects topic its effects are spread over (R1: each contact's
-- effects on one partition, in commit order). Recorded from the topic the first time a
-- processor starts with it; afterwards every effect goes to the partition the producer's
-- partitioner gives its contact for this count, not for the topic's count now: partitions an
-- operator adds to the topic would otherwise move contacts' later effects to other
-- partitions, where a reader meets them in no order with the earlier ones. The added
-- partitions stay empty; a topic with fewer partitions than recorded is refused at the start.
-- Keyed by topic name: a new topic (kafka.side_effects_topic changed) gets its own count.
CREATE TABLE cc_effect_partitions (
    topic       text        PRIMARY KEY,
    partitions  integer     NOT NULL CHECK (partitions > 0),
    recorded_at timestamptz NOT NULL DEFAULT now()
);
