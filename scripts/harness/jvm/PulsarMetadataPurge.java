// Deletes the ephemeral nodes left in a Pulsar standalone's RocksDB metadata store by a process
// that was SIGKILLed (scripts/harness/pulsar.py runs it between the kill and the next launch).
// Run with java's source-file mode: java -cp rocksdbjni.jar PulsarMetadataPurge.java METADATA_DIR
//
// Pulsar's RocksdbMetadataStore stores each node as a header (header size, format version,
// version, owner instance, created, modified, ephemeral flag) followed by the data; the store of
// the next launch treats an ephemeral node of an earlier instance as absent but deletes it only
// lazily, unconditionally and asynchronously, which races with the lock it re-creates there
// (bookie registration, broker registration, namespace bundle ownership). With the store closed,
// every ephemeral node is stale: removing them all before the launch leaves nothing to race with.
import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.List;
import org.rocksdb.Options;
import org.rocksdb.RocksDB;
import org.rocksdb.RocksIterator;
import org.rocksdb.TransactionDB;
import org.rocksdb.TransactionDBOptions;
import org.rocksdb.WriteOptions;

public class PulsarMetadataPurge {
    private static final int HEADER_SIZE = 4 + 4 + 8 + 8 + 8 + 8 + 1;
    private static final int EPHEMERAL_AT = HEADER_SIZE - 1;

    static boolean ephemeral(byte[] value) {
        if (value == null || value.length < HEADER_SIZE) {
            return false; // the store's own counters are bare 8-byte longs
        }
        ByteBuffer buffer = ByteBuffer.wrap(value);
        int headerSize = buffer.getInt();
        int formatVersion = buffer.getInt();
        return headerSize >= HEADER_SIZE && formatVersion >= 1 && value[EPHEMERAL_AT] != 0;
    }

    public static void main(String[] args) throws Exception {
        if (args.length != 1) {
            System.err.println("usage: PulsarMetadataPurge METADATA_DIR");
            System.exit(2);
        }
        RocksDB.loadLibrary();
        try (Options options = new Options();
                TransactionDBOptions txOptions = new TransactionDBOptions();
                TransactionDB db = TransactionDB.open(options, txOptions, args[0]);
                WriteOptions sync = new WriteOptions().setSync(true)) {
            List<byte[]> stale = new ArrayList<>();
            try (RocksIterator it = db.newIterator()) {
                for (it.seekToFirst(); it.isValid(); it.next()) {
                    if (ephemeral(it.value())) {
                        stale.add(it.key());
                    }
                }
            }
            for (byte[] key : stale) {
                db.delete(sync, key);
                System.out.println(new String(key, StandardCharsets.UTF_8));
            }
        }
    }
}
