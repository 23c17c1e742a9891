package causalcommit.peer;

import java.nio.file.Path;
import java.util.LinkedHashMap;
import java.util.Map;
import java.util.Properties;

import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.common.serialization.Serdes;
import org.apache.kafka.streams.StreamsConfig;

/** The peer's flags (GNU style, `--name value`), with causal-commit's defaults. */
final class PeerConfig {
    String bootstrapServers = "127.0.0.1:9092";
    String applicationId = "causal-commit-kstreams";
    String intentsTopic = "intents";
    String sideEffectsTopic = "side-effects";
    String reviewTopic = "intents.manual-review";
    int threads = 2;
    long commitIntervalMs = 100;
    String stateDir = Path.of(System.getProperty("java.io.tmpdir"), "causal-commit-kstreams").toString();
    /** sequencer.wait_timeout */
    long waitTimeoutMs = 300_000;
    /** How often the wall-clock punctuator looks for timed-out gaps. */
    long punctuateMs = 1_000;
    /** sequencer.max_pending_per_contact */
    int maxPendingPerContact = 64;
    /** limits.* */
    int maxRecordBytes = 960 * 1024; // causal-commit's limits.max_record_bytes default
    int maxPayloadBytes = 256 * 1024;
    int maxIdBytes = 256;
    /** Record cache in front of the stores (Kafka Streams' statestore.cache.max.bytes). */
    long cacheBytes = 10L * 1024 * 1024;
    /** Any other Kafka Streams / client property, `--prop key=value`. */
    final Map<String, String> extra = new LinkedHashMap<>();

    static final String USAGE = String.join("\n",
            "usage: java -jar causal-commit-kstreams.jar [flags]",
            "  --bootstrap-servers HOST:PORT   (127.0.0.1:9092)",
            "  --application-id ID             consumer group, transactional ids, internal topics",
            "  --intents-topic T               (intents)",
            "  --side-effects-topic T          (side-effects)",
            "  --review-topic T                (intents.manual-review)",
            "  --threads N                     stream threads (2)",
            "  --commit-interval-ms MS         (100)",
            "  --state-dir DIR                 RocksDB state",
            "  --wait-timeout-ms MS            gap timeout before WAIT_TIMEOUT + hold (300000)",
            "  --punctuate-ms MS               how often timeouts are checked (1000)",
            "  --max-pending-per-contact N     (64)",
            "  --max-record-bytes N  --max-payload-bytes N  --max-id-bytes N",
            "  --cache-bytes N                 statestore.cache.max.bytes (10485760)",
            "  --prop KEY=VALUE                any other Kafka Streams property (repeatable)");

    static PeerConfig parse(String[] args) {
        PeerConfig c = new PeerConfig();
        for (int i = 0; i < args.length; i++) {
            String flag = args[i];
            if (flag.equals("--help") || flag.equals("-h")) {
                throw new UsageException(null);
            }
            if (i + 1 >= args.length) {
                throw new UsageException("flag " + flag + " needs a value");
            }
            String v = args[++i];
            switch (flag) {
                case "--bootstrap-servers" -> c.bootstrapServers = v;
                case "--application-id" -> c.applicationId = v;
                case "--intents-topic" -> c.intentsTopic = v;
                case "--side-effects-topic" -> c.sideEffectsTopic = v;
                case "--review-topic" -> c.reviewTopic = v;
                case "--threads" -> c.threads = positiveInt(flag, v);
                case "--commit-interval-ms" -> c.commitIntervalMs = positiveLong(flag, v);
                case "--state-dir" -> c.stateDir = v;
                case "--wait-timeout-ms" -> c.waitTimeoutMs = positiveLong(flag, v);
                case "--punctuate-ms" -> c.punctuateMs = positiveLong(flag, v);
                case "--max-pending-per-contact" -> c.maxPendingPerContact = positiveInt(flag, v);
                case "--max-record-bytes" -> c.maxRecordBytes = positiveInt(flag, v);
                case "--max-payload-bytes" -> c.maxPayloadBytes = positiveInt(flag, v);
                case "--max-id-bytes" -> c.maxIdBytes = positiveInt(flag, v);
                case "--cache-bytes" -> c.cacheBytes = Math.max(0, positiveLong(flag, v));
                case "--prop" -> {
                    int eq = v.indexOf('=');
                    if (eq <= 0) {
                        throw new UsageException("--prop takes KEY=VALUE, got " + v);
                    }
                    c.extra.put(v.substring(0, eq), v.substring(eq + 1));
                }
                default -> throw new UsageException("unknown flag " + flag);
            }
        }
        if (c.intentsTopic.equals(c.sideEffectsTopic) || c.intentsTopic.equals(c.reviewTopic)) {
            throw new UsageException("--intents-topic must differ from the output topics");
        }
        if (c.maxPayloadBytes >= c.maxRecordBytes) {
            throw new UsageException("--max-payload-bytes must be below --max-record-bytes");
        }
        return c;
    }

    private static long positiveLong(String flag, String v) {
        try {
            long n = Long.parseLong(v);
            if (n > 0) {
                return n;
            }
        } catch (NumberFormatException e) {
            // reported below
        }
        throw new UsageException(flag + " takes a positive integer, got " + v);
    }

    private static int positiveInt(String flag, String v) {
        long n = positiveLong(flag, v);
        if (n > Integer.MAX_VALUE) {
            throw new UsageException(flag + " is too large: " + v);
        }
        return (int) n;
    }

    Properties streamsProperties() {
        Properties p = new Properties();
        p.put(StreamsConfig.APPLICATION_ID_CONFIG, applicationId);
        p.put(StreamsConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrapServers);
        p.put(StreamsConfig.PROCESSING_GUARANTEE_CONFIG, StreamsConfig.EXACTLY_ONCE_V2);
        p.put(StreamsConfig.NUM_STREAM_THREADS_CONFIG, threads);
        p.put(StreamsConfig.COMMIT_INTERVAL_MS_CONFIG, commitIntervalMs);
        p.put(StreamsConfig.STATE_DIR_CONFIG, stateDir);
        p.put(StreamsConfig.STATESTORE_CACHE_MAX_BYTES_CONFIG, cacheBytes);
        p.put(StreamsConfig.DEFAULT_KEY_SERDE_CLASS_CONFIG, Serdes.ByteArraySerde.class);
        p.put(StreamsConfig.DEFAULT_VALUE_SERDE_CLASS_CONFIG, Serdes.ByteArraySerde.class);
        p.put(StreamsConfig.consumerPrefix(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG), "earliest");
        p.putAll(extra);
        return p;
    }

    static final class UsageException extends RuntimeException {
        UsageException(String message) {
            super(message);
        }
    }
}
