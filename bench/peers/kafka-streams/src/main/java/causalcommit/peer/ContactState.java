package causalcommit.peer;

import java.io.ByteArrayInputStream;
import java.io.ByteArrayOutputStream;
import java.io.DataInputStream;
import java.io.DataOutputStream;
import java.io.IOException;
import java.io.UncheckedIOException;
import java.util.TreeMap;

/**
 * One contact's sequencing state, as causal-commit's sequencer keeps it: the resolved
 * high-water mark (every sequence up to it is committed or blocked), the version (effects so
 * far), the next sequence to assign, an optional hold, and the waiting intents by sequence with
 * their bytes and since-time. Stored as bytes in the `contacts` RocksDB store.
 */
final class ContactState {
    private static final byte FORMAT = 1;
    static final long NO_GAP = -1;

    enum HoldKind { NONE, WAIT_TIMEOUT, BACKLOG_OVERFLOW }

    long resolved;
    long version;
    long next = 1;
    HoldKind hold = HoldKind.NONE;
    long holdSince;
    /** WAIT_TIMEOUT: the missing sequence; BACKLOG_OVERFLOW: the bound. */
    long holdDetail;
    /** When the current stall began (restarted whenever the contact progresses), or NO_GAP. */
    long gapSince = NO_GAP;
    final TreeMap<Long, Waiting> waiting = new TreeMap<>();

    boolean held() {
        return hold != HoldKind.NONE;
    }

    /** A waiting intent: what it takes to emit it later, byte for byte. */
    static final class Waiting {
        long seq;
        long since;
        long fingerprint;
        String intentId;
        String correlationId;
        int partition;
        long offset;
        byte[] key;
        byte[] value;
        byte[] traceparent;
    }

    byte[] encode() {
        ByteArrayOutputStream bytes = new ByteArrayOutputStream(64);
        try (DataOutputStream out = new DataOutputStream(bytes)) {
            out.writeByte(FORMAT);
            out.writeLong(resolved);
            out.writeLong(version);
            out.writeLong(next);
            out.writeByte(hold.ordinal());
            out.writeLong(holdSince);
            out.writeLong(holdDetail);
            out.writeLong(gapSince);
            out.writeInt(waiting.size());
            for (Waiting w : waiting.values()) {
                out.writeLong(w.seq);
                out.writeLong(w.since);
                out.writeLong(w.fingerprint);
                writeString(out, w.intentId);
                writeString(out, w.correlationId);
                out.writeInt(w.partition);
                out.writeLong(w.offset);
                writeBytes(out, w.key);
                writeBytes(out, w.value);
                writeBytes(out, w.traceparent);
            }
        } catch (IOException e) {
            throw new UncheckedIOException(e);
        }
        return bytes.toByteArray();
    }

    static ContactState decode(byte[] data) {
        ContactState c = new ContactState();
        try (DataInputStream in = new DataInputStream(new ByteArrayInputStream(data))) {
            byte format = in.readByte();
            if (format != FORMAT) {
                throw new IllegalStateException("contact state format " + format + " is unknown");
            }
            c.resolved = in.readLong();
            c.version = in.readLong();
            c.next = in.readLong();
            c.hold = HoldKind.values()[in.readByte()];
            c.holdSince = in.readLong();
            c.holdDetail = in.readLong();
            c.gapSince = in.readLong();
            int n = in.readInt();
            for (int i = 0; i < n; i++) {
                Waiting w = new Waiting();
                w.seq = in.readLong();
                w.since = in.readLong();
                w.fingerprint = in.readLong();
                w.intentId = readString(in);
                w.correlationId = readString(in);
                w.partition = in.readInt();
                w.offset = in.readLong();
                w.key = readBytes(in);
                w.value = readBytes(in);
                w.traceparent = readBytes(in);
                c.waiting.put(w.seq, w);
            }
        } catch (IOException e) {
            throw new UncheckedIOException(e);
        }
        return c;
    }

    private static void writeString(DataOutputStream out, String s) throws IOException {
        writeBytes(out, s.getBytes(java.nio.charset.StandardCharsets.UTF_8));
    }

    private static String readString(DataInputStream in) throws IOException {
        byte[] b = readBytes(in);
        return b == null ? "" : new String(b, java.nio.charset.StandardCharsets.UTF_8);
    }

    private static void writeBytes(DataOutputStream out, byte[] b) throws IOException {
        if (b == null) {
            out.writeInt(-1);
        } else {
            out.writeInt(b.length);
            out.write(b);
        }
    }

    private static byte[] readBytes(DataInputStream in) throws IOException {
        int n = in.readInt();
        if (n < 0) {
            return null;
        }
        byte[] b = new byte[n];
        in.readFully(b);
        return b;
    }
}
