package causalcommit.peer;

import java.time.Duration;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.atomic.AtomicBoolean;

import org.apache.kafka.streams.KafkaStreams;
import org.apache.kafka.streams.errors.StreamsUncaughtExceptionHandler;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * The Kafka Streams peer of causal-commit: consumes the intents topic, sequences every contact's
 * intents (the same rules as causal-commit, see README.md here for where it differs) and produces
 * effects and manual-review records, exactly once (v2). Runs until SIGTERM / Ctrl-C, which
 * closes the application cleanly (the open transaction commits).
 */
public final class Main {
    private static final Logger LOG = LoggerFactory.getLogger(Main.class);

    private Main() {}

    public static void main(String[] args) throws InterruptedException {
        PeerConfig config;
        try {
            config = PeerConfig.parse(args);
        } catch (PeerConfig.UsageException e) {
            if (e.getMessage() != null) {
                System.err.println("causal-commit-kstreams: " + e.getMessage());
            }
            System.err.println(PeerConfig.USAGE);
            System.exit(e.getMessage() == null ? 0 : 2);
            return;
        }
        KafkaStreams streams = new KafkaStreams(SequencerTopology.build(config), config.streamsProperties());
        CountDownLatch stopped = new CountDownLatch(1);
        AtomicBoolean failed = new AtomicBoolean(false);
        streams.setStateListener((now, before) -> {
            LOG.info("state {} -> {}", before, now);
            if (now == KafkaStreams.State.ERROR) {
                failed.set(true);
            }
            if (now == KafkaStreams.State.NOT_RUNNING || now == KafkaStreams.State.ERROR) {
                stopped.countDown();
            }
        });
        streams.setUncaughtExceptionHandler(e -> {
            LOG.error("stream thread failed; shutting the application down", e);
            failed.set(true);
            return StreamsUncaughtExceptionHandler.StreamThreadExceptionResponse.SHUTDOWN_CLIENT;
        });
        Thread hook = new Thread(() -> {
            LOG.info("shutdown requested: closing (the open transaction commits)");
            streams.close(Duration.ofSeconds(30));
            stopped.countDown();
        }, "shutdown");
        Runtime.getRuntime().addShutdownHook(hook);
        LOG.info("starting application {} on {}: {} -> {}, {} ({} threads, commit every {} ms, exactly_once_v2)",
                config.applicationId, config.bootstrapServers, config.intentsTopic, config.sideEffectsTopic,
                config.reviewTopic, config.threads, config.commitIntervalMs);
        streams.start();
        stopped.await();
        if (failed.get()) {
            streams.close(Duration.ofSeconds(10));
            Runtime.getRuntime().halt(1);
        }
    }
}
