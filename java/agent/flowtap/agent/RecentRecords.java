package flowtap.agent;

import java.lang.ref.WeakReference;
import java.nio.ByteBuffer;
import java.util.Arrays;
import java.util.LinkedHashMap;
import java.util.Map;

/**
 * The last few TLS outputs of engines, keyed by their first bytes (a record header then random
 * or encrypted bytes: unique in practice), so that the channel write that sends one, even from
 * a copy, tells which engine uses that channel. Oldest entries go first; engines are weak.
 */
final class RecentRecords {
    private static final int KEY = 32;
    private final Map<Key, Entry> map;

    /** An engine (weak), and the plaintext of its output if it had no channel yet. */
    static final class Entry {
        final WeakReference<Object> engine;
        final byte[] pending;

        Entry(Object engine, byte[] pending) {
            this.engine = new WeakReference<>(engine);
            this.pending = pending;
        }
    }

    RecentRecords(int cap) {
        map =
                new LinkedHashMap<Key, Entry>(64, 0.75f, false) {
                    private static final long serialVersionUID = 1L;

                    @Override
                    protected boolean removeEldestEntry(Map.Entry<Key, Entry> e) {
                        return size() > cap;
                    }
                };
    }

    void put(ByteBuffer b, int pos, int len, Object engine, byte[] pending) {
        Key k = key(b, pos, len);
        if (k != null) {
            synchronized (map) {
                map.put(k, new Entry(engine, pending));
            }
        }
    }

    /** The entry of the output that starts b[pos, pos + len), taken out: one write sends it. */
    Entry take(ByteBuffer b, int pos, int len) {
        Key k = key(b, pos, len);
        if (k == null) {
            return null;
        }
        synchronized (map) {
            return map.remove(k);
        }
    }

    /** Bytes [pos, pos + min(len, 32)) by absolute reads: the buffer's position stays. */
    private static Key key(ByteBuffer b, int pos, int len) {
        int n = Math.min(len, KEY);
        if (b == null || pos < 0 || n <= 0 || pos > b.limit() - n) {
            return null;
        }
        byte[] out = new byte[n];
        for (int i = 0; i < n; i++) {
            out[i] = b.get(pos + i);
        }
        return new Key(out);
    }

    private static final class Key {
        final byte[] bytes;
        final int hash;

        Key(byte[] bytes) {
            this.bytes = bytes;
            this.hash = Arrays.hashCode(bytes);
        }

        @Override
        public int hashCode() {
            return hash;
        }

        @Override
        public boolean equals(Object o) {
            return o instanceof Key && Arrays.equals(bytes, ((Key) o).bytes);
        }
    }
}
