package flowtap.agent;

import java.lang.ref.ReferenceQueue;
import java.lang.ref.WeakReference;
import java.util.HashMap;

/**
 * A small synchronized map keyed by object identity that does not keep its keys alive, with
 * a size cap: past the cap it drops what the collector freed, then everything (the entries
 * are hints that later traffic re-creates).
 */
public final class WeakIdentityMap<K, V> {
    private final HashMap<Object, V> map = new HashMap<>();
    private final ReferenceQueue<Object> queue = new ReferenceQueue<>();
    private final int cap;

    public WeakIdentityMap(int cap) {
        this.cap = cap;
    }

    public synchronized V get(K key) {
        return key == null ? null : map.get(new Probe(key));
    }

    public synchronized void put(K key, V value) {
        if (key == null) {
            return;
        }
        expunge();
        if (map.size() >= cap) {
            map.clear();
        }
        map.put(new Ref(key, queue), value);
    }

    public synchronized void remove(K key) {
        if (key != null) {
            map.remove(new Probe(key));
        }
    }

    public synchronized int size() {
        expunge();
        return map.size();
    }

    private void expunge() {
        Object ref;
        while ((ref = queue.poll()) != null) {
            map.remove(ref);
        }
    }

    /** Stored key: equal to a probe or ref for the same referent, or to itself once cleared. */
    private static final class Ref extends WeakReference<Object> {
        final int hash;

        Ref(Object key, ReferenceQueue<Object> queue) {
            super(key, queue);
            hash = System.identityHashCode(key);
        }

        @Override
        public int hashCode() {
            return hash;
        }

        @Override
        public boolean equals(Object o) {
            if (o == this) {
                return true;
            }
            Object mine = get();
            if (mine == null) {
                return false;
            }
            if (o instanceof Ref) {
                return ((Ref) o).get() == mine;
            }
            return o instanceof Probe && ((Probe) o).key == mine;
        }
    }

    /** Lookup key: a strong reference for the duration of one call. */
    private static final class Probe {
        final Object key;

        Probe(Object key) {
            this.key = key;
        }

        @Override
        public int hashCode() {
            return System.identityHashCode(key);
        }

        @Override
        public boolean equals(Object o) {
            if (o instanceof Ref) {
                return ((Ref) o).get() == key;
            }
            return o instanceof Probe && ((Probe) o).key == key;
        }
    }
}
