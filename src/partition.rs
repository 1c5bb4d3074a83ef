//! Kafka's default partitioner for keyed records, as the Java clients compute it (pure).
//!
//! Input topics are co-partitioned by contact id: a contact's clickstream, conversions and
//! purchases must land in the same partition number, whichever client produced them. Java
//! producers (and librdkafka with `partitioner=murmur2_random`) use
//! `toPositive(murmur2(key)) % partitions`; librdkafka's own default (`consistent_random`,
//! CRC32) differs. This is the Java function, so the service can tell which partition (and so
//! which instance) owns a contact, and so our own producers can match Java ones.

/// Kafka's `Utils.murmur2`: MurmurHash2, 32 bits, seed `0x9747b28c`.
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    // The length is folded in as a 32-bit int, as Java does (keys are far below 4 GiB).
    let mut hash = SEED ^ (data.len() as u32);
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        hash = hash.wrapping_mul(M);
        hash ^= k;
    }
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        hash ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        hash ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        hash ^= u32::from(tail[0]);
        hash = hash.wrapping_mul(M);
    }
    hash ^= hash >> 13;
    hash = hash.wrapping_mul(M);
    hash ^= hash >> 15;
    hash as i32
}

/// The partition the Java client's default partitioner puts `key` in.
pub fn partition_for(key: &[u8], partitions: u32) -> u32 {
    debug_assert!(partitions > 0, "a topic has at least one partition");
    // Kafka's `toPositive` masks the sign bit rather than taking the absolute value.
    (murmur2(key) as u32 & 0x7fff_ffff) % partitions.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_java_clients_reference_values() {
        // From Kafka's `UtilsTest.testMurmur2`.
        let cases: [(&str, i32); 6] = [
            ("21", -973_932_308),
            ("foobar", -790_332_482),
            ("a-little-bit-long-string", -985_981_536),
            ("a-little-bit-longer-string", -1_486_304_829),
            ("lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58_897_971),
            ("abc", 479_470_107),
        ];
        for (key, expected) in cases {
            assert_eq!(murmur2(key.as_bytes()), expected, "{key}");
        }
    }

    #[test]
    fn partitions_are_in_range_and_stable() {
        for index in 0..1000 {
            let key = format!("c{index:09}");
            let partition = partition_for(key.as_bytes(), 12);
            assert!(partition < 12);
            assert_eq!(partition, partition_for(key.as_bytes(), 12));
        }
        // toPositive masks the sign: murmur2("21") is negative.
        assert_eq!(partition_for(b"21", 7), ((-973_932_308i32) as u32 & 0x7fff_ffff) % 7);
    }
}
