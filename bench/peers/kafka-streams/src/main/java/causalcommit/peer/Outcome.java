package causalcommit.peer;

import java.nio.ByteBuffer;

/**
 * What the `outcomes` store knows of an intent_id: its content fingerprint and the outcome it
 * ended in (or, while it waits, that it is waiting). Fixed 26 bytes.
 */
record Outcome(long fingerprint, State state, Reason reason, long commitSequence, long contactVersion) {
    enum State { COMMITTED, WAITING, BLOCKED, MANUAL_REVIEW }

    enum Reason { NONE, VERSION_CONFLICT, SEQUENCE_CONFLICT, WAIT_TIMEOUT, CONTACT_ON_HOLD, CONTACT_BACKLOG_OVERFLOW }

    byte[] encode() {
        return ByteBuffer.allocate(26)
                .putLong(fingerprint)
                .put((byte) state.ordinal())
                .put((byte) reason.ordinal())
                .putLong(commitSequence)
                .putLong(contactVersion)
                .array();
    }

    static Outcome decode(byte[] b) {
        ByteBuffer in = ByteBuffer.wrap(b);
        long fp = in.getLong();
        State s = State.values()[in.get()];
        Reason r = Reason.values()[in.get()];
        return new Outcome(fp, s, r, in.getLong(), in.getLong());
    }

    String stateName() {
        return switch (state) {
            case COMMITTED -> "committed_causal";
            case WAITING -> "waiting_previous_commit";
            case BLOCKED -> "blocked_conflict";
            case MANUAL_REVIEW -> "manual_review";
        };
    }
}
