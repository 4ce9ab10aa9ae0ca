//! How the GPU's decode attention (`kernels/paged_attention.cu`) cuts long contexts into splits.
//!
//! One block of the decode kernel attends for one (sequence, query head) pair. A single stream
//! of Phi-3-mini is 32 such pairs, which fill 32 of an H100's 132 multiprocessors, and each block
//! reads its keys at the pace of its memory latency: a 4k-token context took several times as
//! long as reading the weights. Splitting each pair's keys over several blocks, and merging their
//! partial softmax results in a second launch, spreads the same work over the whole GPU. A large
//! batch needs no splits (it has thousands of pairs already), so the split size grows with the
//! batch: the launch aims at [`TARGET_BLOCKS`] blocks, which also bounds the partial results'
//! scratch memory. Kept apart from the launcher (CUDA builds only) so that the policy is tested
//! on every build, and so that the emulation test launches exactly what the GPU would.

/// Blocks a decode launch aims for: several per multiprocessor of the largest GPUs, enough for
/// their memory system to have many loads in flight.
pub const TARGET_BLOCKS: usize = 1024;

/// The fewest keys a split takes: below this, merging costs more than the split saves.
pub const MIN_SPLIT_KEYS: usize = 128;

/// How a decode launch over `n_seqs` sequences of `n_heads` query heads, the longest with
/// `max_keys` visible keys, splits them: `None` for one block per (sequence, head), else `(keys
/// per split, splits of the longest sequence)`.
pub fn decode_splits(max_keys: usize, n_seqs: usize, n_heads: usize) -> Option<(usize, usize)> {
    let pairs = n_seqs.max(1) * n_heads.max(1);
    let split_keys = (max_keys * pairs).div_ceil(TARGET_BLOCKS).next_multiple_of(MIN_SPLIT_KEYS);
    let split_keys = split_keys.max(MIN_SPLIT_KEYS);
    let n_splits = max_keys.div_ceil(split_keys);
    (n_splits > 1).then_some((split_keys, n_splits))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_stream_spreads_over_the_gpu_and_a_large_batch_is_not_split() {
        // Phi-3-mini: 32 query heads.
        assert_eq!(decode_splits(100, 1, 32), None, "one split's worth of keys");
        assert_eq!(decode_splits(128, 1, 32), None);
        assert_eq!(decode_splits(129, 1, 32), Some((128, 2)));
        assert_eq!(decode_splits(300, 1, 32), Some((128, 3)));
        // A 4k context: 32 splits of 128, 1024 blocks.
        assert_eq!(decode_splits(4096, 1, 32), Some((128, 32)));
        // 128k: larger splits rather than more blocks.
        let (keys, n) = decode_splits(131_072, 1, 32).unwrap();
        assert!(keys.is_multiple_of(MIN_SPLIT_KEYS) && keys * n >= 131_072);
        assert!(32 * n <= TARGET_BLOCKS, "{n} splits");
        // 64 streams of 500 keys: 2048 blocks already.
        assert_eq!(decode_splits(500, 64, 32), None);
        assert_eq!(decode_splits(0, 0, 32), None);
    }

    #[test]
    fn blocks_and_scratch_stay_bounded() {
        for max_keys in [1, 127, 128, 129, 1000, 2047, 4096, 32_768, 131_072] {
            for n_seqs in [1, 2, 7, 64, 128] {
                for n_heads in [24, 32, 40] {
                    let pairs = n_seqs * n_heads;
                    match decode_splits(max_keys, n_seqs, n_heads) {
                        None => assert!(max_keys <= MIN_SPLIT_KEYS || pairs * 2 > TARGET_BLOCKS),
                        Some((keys, n)) => {
                            assert!(n >= 2 && keys >= MIN_SPLIT_KEYS);
                            assert!((n - 1) * keys < max_keys && n * keys >= max_keys);
                            // Rounding the split up to MIN_SPLIT_KEYS at most doubles the count.
                            assert!(pairs * n <= 2 * TARGET_BLOCKS + pairs, "{max_keys} {pairs}");
                        }
                    }
                }
            }
        }
    }
}
