package causalcommit.peer;

import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.ArrayList;
import java.util.List;
import java.util.function.Function;

import causal_commit.v1.CausalCommit.Intent;
import causal_commit.v1.CausalCommit.ManualReview;
import causal_commit.v1.CausalCommit.ReviewReason;
import causal_commit.v1.CausalCommit.SideEffect;
import com.google.protobuf.ByteString;
import com.google.protobuf.InvalidProtocolBufferException;
import org.apache.kafka.common.header.Header;
import org.apache.kafka.common.header.Headers;
import org.apache.kafka.common.header.internals.RecordHeaders;
import org.apache.kafka.streams.processor.PunctuationType;
import org.apache.kafka.streams.processor.api.Processor;
import org.apache.kafka.streams.processor.api.ProcessorContext;
import org.apache.kafka.streams.processor.api.Record;
import org.apache.kafka.streams.processor.api.RecordMetadata;
import org.apache.kafka.streams.state.KeyValueIterator;
import org.apache.kafka.streams.state.KeyValueStore;

/**
 * causal-commit's sequencing rules on Kafka Streams' processor API, one instance per task
 * (input partition). The rule numbers are CONTRACT.md's:
 *
 * <ul>
 *   <li>R2: causal_sequence &gt; 0 is the commit sequence (strict); otherwise the contact's next
 *       number at first sight, after every number already taken.
 *   <li>R3: sequence N commits only when N-1 is resolved; otherwise the intent waits, bytes and
 *       all, in the contact's state (RocksDB + changelog).
 *   <li>R5: intent_id seen before: same content = duplicate (nothing emitted), other content =
 *       IDEMPOTENCY_CONFLICT.
 *   <li>R6: expected_version guard at commit time (VERSION_CONFLICT), sequence claimed twice or
 *       already passed (SEQUENCE_CONFLICT); a blocked intent resolves its slot.
 *   <li>R7: a wall-clock punctuator sends the waiting intents of a gap older than the wait
 *       timeout to review (WAIT_TIMEOUT) and holds the contact; later intents of a held contact
 *       go to review (CONTACT_ON_HOLD).
 *   <li>Bounded per contact: the intent that would exceed max-pending-per-contact sends the
 *       contact's waiting intents and itself to review (CONTACT_BACKLOG_OVERFLOW), and holds it.
 * </ul>
 */
final class SequencerProcessor implements Processor<byte[], byte[], byte[], byte[]> {
    private static final String CORRELATION_HEADER = "correlation_id";
    private static final String TRACEPARENT_HEADER = "traceparent";

    private final PeerConfig config;
    private ProcessorContext<byte[], byte[]> ctx;
    private KeyValueStore<String, byte[]> contacts;
    private KeyValueStore<String, byte[]> outcomes;
    private KeyValueStore<String, Long> gaps;

    SequencerProcessor(PeerConfig config) {
        this.config = config;
    }

    @Override
    public void init(ProcessorContext<byte[], byte[]> context) {
        this.ctx = context;
        this.contacts = context.getStateStore(SequencerTopology.CONTACTS);
        this.outcomes = context.getStateStore(SequencerTopology.OUTCOMES);
        this.gaps = context.getStateStore(SequencerTopology.GAPS);
        context.schedule(Duration.ofMillis(config.punctuateMs), PunctuationType.WALL_CLOCK_TIME, this::expire);
    }

    /** Where an input record came from, and what an output about it needs. */
    private record Source(String topic, int partition, long offset, byte[] key, byte[] value, byte[] traceparent) {}

    @Override
    public void process(Record<byte[], byte[]> record) {
        long now = ctx.currentSystemTimeMs();
        RecordMetadata meta = ctx.recordMetadata().orElse(null);
        Source src = new Source(
                meta == null ? config.intentsTopic : meta.topic(),
                meta == null ? -1 : meta.partition(),
                meta == null ? -1 : meta.offset(),
                record.key(),
                record.value(),
                header(record.headers(), TRACEPARENT_HEADER));
        IntentCheck.Result checked = IntentCheck.decode(record.key(), record.value(), config);
        if (!checked.valid()) {
            Intent partial = checked.partial();
            review(src, partial, checked.correlationId(), ReviewReason.INVALID_INTENT, checked.invalid(), 0,
                    partial == null ? 0 : partial.getCausalSequence(), 0, now);
            return;
        }
        Intent intent = checked.intent();
        String contactId = intent.getContactId();
        ContactState.Waiting w = new ContactState.Waiting();
        w.fingerprint = checked.fingerprint();
        w.intentId = intent.getIntentId();
        w.correlationId = checked.correlationId();
        w.partition = src.partition();
        w.offset = src.offset();
        w.key = src.key();
        w.value = src.value();
        w.traceparent = src.traceparent();

        byte[] stored = contacts.get(contactId);
        ContactState c = stored == null ? new ContactState() : ContactState.decode(stored);

        // R5: an intent_id with an outcome gets no second one.
        byte[] knownBytes = outcomes.get(w.intentId);
        if (knownBytes != null) {
            Outcome known = Outcome.decode(knownBytes);
            if (known.fingerprint() != w.fingerprint) {
                String detail = String.format(
                        "intent_id already %s with other content (fingerprint %016x, received %016x)",
                        known.stateName(), known.fingerprint(), w.fingerprint);
                review(src, intent, w.correlationId, ReviewReason.IDEMPOTENCY_CONFLICT, detail, 0, 0, 0, now);
            }
            if (stored == null) {
                contacts.put(contactId, c.encode());
            }
            return;
        }
        long claimed = intent.getCausalSequence();
        if (c.held()) {
            String detail = "contact is on hold (" + c.hold + ") since " + c.holdSince + " ms";
            reviewOutcome(src, intent, w, ReviewReason.CONTACT_ON_HOLD, Outcome.Reason.CONTACT_ON_HOLD, detail,
                    0, claimed, 0, now);
            if (stored == null) {
                contacts.put(contactId, c.encode());
            }
            return;
        }
        // R2 / R6.
        long seq;
        if (claimed > 0) {
            ContactState.Waiting owner = c.waiting.get(claimed);
            if (claimed <= c.resolved || owner != null) {
                String detail = owner != null
                        ? "sequence " + claimed + " is already claimed by intent " + owner.intentId
                        : "sequence " + claimed + " is already resolved (through " + c.resolved + ")";
                blocked(src, intent, w, ReviewReason.SEQUENCE_CONFLICT, Outcome.Reason.SEQUENCE_CONFLICT, detail,
                        c.resolved + 1, claimed, now);
                contacts.put(contactId, c.encode());
                return;
            }
            seq = claimed;
        } else {
            seq = c.next;
        }
        // R3: commit now, or wait (bounded per contact).
        if (seq == c.resolved + 1) {
            settle(c, w, intent, now);
            releaseReady(contactId, c, true, now);
        } else if (c.waiting.size() >= config.maxPendingPerContact) {
            overflow(contactId, c, src, intent, w, claimed, now);
        } else {
            enqueue(contactId, c, seq, w, now);
        }
        contacts.put(contactId, c.encode());
    }

    /** Resolves slot resolved + 1 with this intent: its effect, or a version conflict. */
    private void settle(ContactState c, ContactState.Waiting w, Intent decoded, long now) {
        long seq = c.resolved + 1;
        c.resolved = seq;
        c.next = Math.max(c.next, seq + 1);
        Source src = new Source(config.intentsTopic, w.partition, w.offset, w.key, w.value, w.traceparent);
        Intent intent = decoded;
        if (intent == null) {
            try {
                intent = Intent.parseFrom(w.value);
            } catch (InvalidProtocolBufferException e) {
                review(src, null, w.correlationId, ReviewReason.INVALID_INTENT,
                        "stored intent could not be decoded again", 0, 0, 0, now);
                return;
            }
        }
        long expected = intent.getExpectedVersion();
        if (expected != 0 && expected != c.version) {
            String detail = "expected contact version " + expected + ", committed version is " + c.version;
            blocked(src, intent, w, ReviewReason.VERSION_CONFLICT, Outcome.Reason.VERSION_CONFLICT, detail, seq,
                    seq, now);
            return;
        }
        c.version += 1;
        SideEffect effect = SideEffect.newBuilder()
                .setIntentId(intent.getIntentId())
                .setContactId(intent.getContactId())
                .setClinicId(intent.getClinicId())
                .setCorrelationId(w.correlationId)
                .setDispatchPriority(intent.getDispatchPriority())
                .setActionValue(intent.getActionValue())
                .setPayload(intent.getPayload())
                .setCreatedAtMs(intent.getCreatedAtMs())
                .setCommitSequence(seq)
                .setContactVersion(c.version)
                .setCommittedAtMs(now)
                .setFencingToken(0)
                .setSequenceFromProducer(intent.getCausalSequence() > 0)
                .build();
        ctx.forward(new Record<>(intent.getContactId().getBytes(StandardCharsets.UTF_8), effect.toByteArray(), now,
                headers(w.correlationId, w.traceparent)), SequencerTopology.EFFECTS_SINK);
        outcomes.put(w.intentId, new Outcome(w.fingerprint, Outcome.State.COMMITTED, Outcome.Reason.NONE, seq,
                c.version).encode());
    }

    /** Settles every waiting intent that became ready, then restarts or clears the gap clock. */
    private void releaseReady(String contactId, ContactState c, boolean progressed, long now) {
        while (!c.waiting.isEmpty() && c.waiting.firstKey() == c.resolved + 1) {
            settle(c, c.waiting.pollFirstEntry().getValue(), null, now);
            progressed = true;
        }
        if (c.waiting.isEmpty()) {
            if (c.gapSince != ContactState.NO_GAP) {
                gaps.delete(contactId);
                c.gapSince = ContactState.NO_GAP;
            }
        } else if (progressed) {
            c.gapSince = now;
            gaps.put(contactId, now);
        }
    }

    private void enqueue(String contactId, ContactState c, long seq, ContactState.Waiting w, long now) {
        c.next = Math.max(c.next, seq + 1);
        if (c.waiting.isEmpty()) {
            c.gapSince = now;
            gaps.put(contactId, now);
        }
        w.seq = seq;
        w.since = now;
        c.waiting.put(seq, w);
        outcomes.put(w.intentId, new Outcome(w.fingerprint, Outcome.State.WAITING, Outcome.Reason.NONE, seq, 0)
                .encode());
    }

    private void overflow(String contactId, ContactState c, Source src, Intent intent, ContactState.Waiting w,
            long claimed, long now) {
        int limit = config.maxPendingPerContact;
        String detail = "contact has " + limit + " waiting intents, its bound";
        hold(c, ContactState.HoldKind.BACKLOG_OVERFLOW, limit, now);
        evictWaiting(contactId, c, ReviewReason.CONTACT_BACKLOG_OVERFLOW, Outcome.Reason.CONTACT_BACKLOG_OVERFLOW,
                x -> detail, x -> 0L, 0, now);
        reviewOutcome(src, intent, w, ReviewReason.CONTACT_BACKLOG_OVERFLOW, Outcome.Reason.CONTACT_BACKLOG_OVERFLOW,
                detail, 0, claimed, 0, now);
    }

    private static void hold(ContactState c, ContactState.HoldKind kind, long detail, long now) {
        c.hold = kind;
        c.holdSince = now;
        c.holdDetail = detail;
    }

    /** Sends every waiting intent of the contact to review, in sequence order; slots stay unresolved. */
    private void evictWaiting(String contactId, ContactState c, ReviewReason reason, Outcome.Reason code,
            Function<ContactState.Waiting, String> detail,
            Function<ContactState.Waiting, Long> waited, long expected, long now) {
        for (ContactState.Waiting x : c.waiting.values()) {
            Source src = new Source(config.intentsTopic, x.partition, x.offset, x.key, x.value, x.traceparent);
            Intent decoded = null;
            try {
                decoded = Intent.parseFrom(x.value);
            } catch (InvalidProtocolBufferException e) {
                // Reviewed with its raw bytes only.
            }
            reviewOutcome(src, decoded, x, reason, code, detail.apply(x), expected, x.seq, waited.apply(x), now);
        }
        c.waiting.clear();
        if (c.gapSince != ContactState.NO_GAP) {
            gaps.delete(contactId);
            c.gapSince = ContactState.NO_GAP;
        }
    }

    /** R7: every second (wall clock), the gaps older than the wait timeout are timed out. */
    private void expire(long now) {
        List<String> due = new ArrayList<>();
        try (KeyValueIterator<String, Long> it = gaps.all()) {
            while (it.hasNext()) {
                var kv = it.next();
                if (kv.value != null && now - kv.value > config.waitTimeoutMs) {
                    due.add(kv.key);
                }
            }
        }
        for (String contactId : due) {
            byte[] stored = contacts.get(contactId);
            if (stored == null) {
                gaps.delete(contactId);
                continue;
            }
            ContactState c = ContactState.decode(stored);
            if (c.waiting.isEmpty()) {
                gaps.delete(contactId);
                continue;
            }
            long missing = c.resolved + 1;
            hold(c, ContactState.HoldKind.WAIT_TIMEOUT, missing, now);
            evictWaiting(contactId, c, ReviewReason.WAIT_TIMEOUT, Outcome.Reason.WAIT_TIMEOUT,
                    x -> "sequence " + missing + " did not arrive within the wait timeout (waited "
                            + (now - x.since) + " ms)",
                    x -> Math.max(0, now - x.since), missing, now);
            contacts.put(contactId, c.encode());
        }
    }

    private void blocked(Source src, Intent intent, ContactState.Waiting w, ReviewReason reason,
            Outcome.Reason code, String detail, long expected, long seq, long now) {
        review(src, intent, w.correlationId, reason, detail, expected, seq, 0, now);
        outcomes.put(w.intentId, new Outcome(w.fingerprint, Outcome.State.BLOCKED, code, seq, 0).encode());
    }

    private void reviewOutcome(Source src, Intent intent, ContactState.Waiting w, ReviewReason reason,
            Outcome.Reason code, String detail, long expected, long seq, long waitedMs, long now) {
        review(src, intent, w.correlationId, reason, detail, expected, seq, waitedMs, now);
        outcomes.put(w.intentId, new Outcome(w.fingerprint, Outcome.State.MANUAL_REVIEW, code, seq, 0).encode());
    }

    /** A manual-review record: the original bytes, byte for byte, plus why. */
    private void review(Source src, Intent intent, String correlationId, ReviewReason reason, String detail,
            long expected, long received, long waitedMs, long now) {
        ManualReview.Builder r = ManualReview.newBuilder()
                .setOriginalValue(src.value() == null ? ByteString.EMPTY : ByteString.copyFrom(src.value()))
                .setOriginalKey(src.key() == null ? ByteString.EMPTY : ByteString.copyFrom(src.key()))
                .setReason(reason)
                .setDetail(detail)
                .setCorrelationId(correlationId == null ? "" : correlationId)
                .setExpectedSequence(expected)
                .setReceivedSequence(received)
                .setWaitedMs(waitedMs)
                .setSourceTopic(src.topic())
                .setSourcePartition(src.partition())
                .setSourceOffset(src.offset())
                .setReviewedAtMs(now)
                .setFencingToken(0);
        if (intent != null) {
            r.setIntentId(intent.getIntentId()).setContactId(intent.getContactId()).setClinicId(intent.getClinicId());
        }
        byte[] key = src.key() != null && src.key().length > 0
                ? src.key()
                : (src.partition() + "-" + src.offset()).getBytes(StandardCharsets.UTF_8);
        ctx.forward(new Record<>(key, r.build().toByteArray(), now, headers(correlationId, src.traceparent())),
                SequencerTopology.REVIEW_SINK);
    }

    private static Headers headers(String correlationId, byte[] traceparent) {
        RecordHeaders h = new RecordHeaders();
        if (correlationId != null && !correlationId.isEmpty()) {
            h.add(CORRELATION_HEADER, correlationId.getBytes(StandardCharsets.UTF_8));
        }
        if (traceparent != null) {
            h.add(TRACEPARENT_HEADER, traceparent);
        }
        return h;
    }

    private static byte[] header(Headers headers, String name) {
        if (headers == null) {
            return null;
        }
        Header h = headers.lastHeader(name);
        return h == null ? null : h.value();
    }
}
