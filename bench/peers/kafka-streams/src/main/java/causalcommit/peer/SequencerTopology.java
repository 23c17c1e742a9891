package causalcommit.peer;

import org.apache.kafka.common.serialization.Serdes;
import org.apache.kafka.streams.Topology;
import org.apache.kafka.streams.state.Stores;

/** intents -> sequencer (three RocksDB stores, each with its changelog) -> effects | review. */
final class SequencerTopology {
    static final String SOURCE = "intents";
    static final String SEQUENCER = "sequencer";
    static final String EFFECTS_SINK = "effects";
    static final String REVIEW_SINK = "review";
    /** contact_id -> ContactState. */
    static final String CONTACTS = "contacts";
    /** intent_id -> Outcome (idempotency). */
    static final String OUTCOMES = "outcomes";
    /** contact_id -> gap start (ms): the contacts with waiting intents, scanned by the punctuator. */
    static final String GAPS = "gaps";

    private SequencerTopology() {}

    static Topology build(PeerConfig config) {
        Topology t = new Topology();
        t.addSource(SOURCE, Serdes.ByteArray().deserializer(), Serdes.ByteArray().deserializer(),
                config.intentsTopic);
        t.addProcessor(SEQUENCER, () -> new SequencerProcessor(config), SOURCE);
        t.addStateStore(Stores.keyValueStoreBuilder(Stores.persistentKeyValueStore(CONTACTS),
                Serdes.String(), Serdes.ByteArray()).withCachingEnabled(), SEQUENCER);
        t.addStateStore(Stores.keyValueStoreBuilder(Stores.persistentKeyValueStore(OUTCOMES),
                Serdes.String(), Serdes.ByteArray()).withCachingEnabled(), SEQUENCER);
        t.addStateStore(Stores.keyValueStoreBuilder(Stores.persistentKeyValueStore(GAPS),
                Serdes.String(), Serdes.Long()).withCachingEnabled(), SEQUENCER);
        t.addSink(EFFECTS_SINK, config.sideEffectsTopic, Serdes.ByteArray().serializer(),
                Serdes.ByteArray().serializer(), SEQUENCER);
        t.addSink(REVIEW_SINK, config.reviewTopic, Serdes.ByteArray().serializer(),
                Serdes.ByteArray().serializer(), SEQUENCER);
        return t;
    }
}
