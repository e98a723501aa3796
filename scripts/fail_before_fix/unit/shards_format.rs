// ---- appended by scripts/fail_before_fix.sh: issue 18 tests of main, on the old decoder ----
#[cfg(test)]
mod failfirst {
    use super::*;
    use proptest::prelude::*;

    /// Main's test (defect 10) without `decoded_limit`, which the old crate lacks: a bomb
    /// far past any sane compression ratio is refused as too large although it is under
    /// the configured maximum (1 GiB).
    #[test]
    fn a_zstd_bomb_stops_at_the_ratio_cap() {
        let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 19).unwrap();
        match decode(&bomb, 1 << 30) {
            Err(ShardError::TooLarge {
                what: "decompressed shard",
                limit,
                ..
            }) => assert!(limit < 64 << 20, "{limit}"),
            other => panic!("not refused by a ratio cap: {other:?}"),
        }
    }

    // Main's fuzz property of the shard decoder added with the fix ("Also": fuzz target), verbatim.
    proptest! {
        #[test]
        fn compressed_arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let compressed = zstd::bulk::compress(&bytes, 1).unwrap();
            let _ = decode(&compressed, 1 << 16);
        }

    }
}
