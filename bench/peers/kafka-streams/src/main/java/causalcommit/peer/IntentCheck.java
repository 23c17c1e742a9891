package causalcommit.peer;

import java.nio.charset.StandardCharsets;
import java.util.Arrays;
import java.util.UUID;

import causal_commit.v1.CausalCommit.Action;
import causal_commit.v1.CausalCommit.Intent;
import com.google.protobuf.InvalidProtocolBufferException;

/**
 * Decoding and validation of an input record: the same checks, in the same order, as
 * causal-commit's src/intent.rs. Never throws on bad bytes.
 */
final class IntentCheck {
    private IntentCheck() {}

    /** A valid intent, or why not (with what could be decoded, for the review record). */
    record Result(Intent intent, String correlationId, long fingerprint, String invalid, Intent partial) {
        boolean valid() {
            return invalid == null;
        }
    }

    static Result decode(byte[] key, byte[] value, PeerConfig limits) {
        if (value == null) {
            return invalid("record has no value (tombstone)", null);
        }
        int size = value.length + (key == null ? 0 : key.length);
        if (size > limits.maxRecordBytes) {
            return invalid("record is " + size + " bytes, above limits.max_record_bytes ("
                    + limits.maxRecordBytes + ")", null);
        }
        Intent intent;
        try {
            intent = Intent.parseFrom(value);
        } catch (InvalidProtocolBufferException | RuntimeException e) {
            return invalid("value is not a protobuf Intent: " + e.getMessage(), null);
        }
        String why = validate(intent, key, limits);
        if (why != null) {
            return invalid(why, intent);
        }
        if (intent.getCausalSequence() < 0) {
            // uint64 above 2^63-1: causal-commit's sequencer refuses it (SequenceOutOfRange).
            return invalid("sequence_out_of_range", intent);
        }
        String correlation = intent.getCorrelationId().isEmpty()
                ? UUID.randomUUID().toString()
                : intent.getCorrelationId();
        return new Result(intent, correlation, fingerprint(intent), null, null);
    }

    private static Result invalid(String why, Intent partial) {
        return new Result(null, partial == null ? "" : partial.getCorrelationId(), 0, why, partial);
    }

    private static String validate(Intent intent, byte[] key, PeerConfig limits) {
        String[][] fields = {
            {"intent_id", intent.getIntentId(), "required"},
            {"contact_id", intent.getContactId(), "required"},
            {"clinic_id", intent.getClinicId(), ""},
            {"correlation_id", intent.getCorrelationId(), ""},
        };
        for (String[] f : fields) {
            if (!f[2].isEmpty() && f[1].strip().isEmpty()) {
                return "required field `" + f[0] + "` is missing or empty";
            }
            int len = f[1].getBytes(StandardCharsets.UTF_8).length;
            if (len > limits.maxIdBytes) {
                return "field `" + f[0] + "` is " + len + " bytes, above limits.max_id_bytes ("
                        + limits.maxIdBytes + ")";
            }
        }
        if (intent.getPayload().size() > limits.maxPayloadBytes) {
            return "payload is " + intent.getPayload().size() + " bytes, above limits.max_payload_bytes ("
                    + limits.maxPayloadBytes + ")";
        }
        Action action = Action.forNumber(intent.getActionValue());
        if (action == null) {
            return "action " + intent.getActionValue() + " is not a known Action value";
        }
        if (action == Action.ACTION_UNSPECIFIED) {
            return "action is ACTION_UNSPECIFIED";
        }
        byte[] contact = intent.getContactId().getBytes(StandardCharsets.UTF_8);
        if (key == null) {
            return "record key is missing; it must equal contact_id \"" + intent.getContactId() + "\"";
        }
        if (!Arrays.equals(key, contact)) {
            return "record key \"" + new String(key, StandardCharsets.UTF_8) + "\" does not equal contact_id \""
                    + intent.getContactId() + "\"";
        }
        return null;
    }

    /**
     * Content hash for idempotency conflicts: everything but correlation_id and created_at_ms,
     * length-prefixed (FNV-1a 64; causal-commit uses xxh3 over the same fields).
     */
    static long fingerprint(Intent i) {
        Fnv h = new Fnv();
        for (String s : new String[] {i.getIntentId(), i.getContactId(), i.getClinicId()}) {
            byte[] b = s.getBytes(StandardCharsets.UTF_8);
            h.putLong(b.length).put(b);
        }
        h.putLong(i.getDispatchPriority());
        h.putLong(i.getCausalSequence());
        h.putLong(i.getExpectedVersion());
        h.putLong(i.getActionValue());
        h.putLong(i.getPayload().size());
        h.put(i.getPayload().toByteArray());
        return h.hash;
    }

    private static final class Fnv {
        long hash = 0xcbf29ce484222325L;

        Fnv put(byte[] bytes) {
            for (byte b : bytes) {
                hash ^= (b & 0xff);
                hash *= 0x100000001b3L;
            }
            return this;
        }

        Fnv putLong(long v) {
            for (int i = 0; i < 8; i++) {
                hash ^= (v >>> (8 * i)) & 0xff;
                hash *= 0x100000001b3L;
            }
            return this;
        }
    }
}
