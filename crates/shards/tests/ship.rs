//! Sealing on one store, shipping in chunks with interruptions, committing into another.

use qatflow_core::{Conversation, ConversationId};
use qatflow_gates::{Checker, GateProfile};
use qatflow_shards::{
    encode, Inbox, InboxLimits, Outbox, SealLimits, ShardError, ShardId, ShardLine,
};
use qatflow_store::{Filter, NewConversation, Store};
use std::collections::BTreeSet;

/// The receiver's checks: the v4 profile without the system prompt gate, so the test
/// conversations (which have no system prompt) are clean unless they break a rule.
fn checker() -> Checker {
    let mut profile = GateProfile::builtin("v4").unwrap();
    profile.gates.min_system_prompt_chars = None;
    Checker::new(&profile)
}

/// Uploads `bytes` as one shard and commits it.
fn send(inbox: &Inbox, spark: &Store, bytes: &[u8]) -> (ShardId, Result<u64, ShardError>) {
    let id = ShardId::of_bytes(bytes);
    inbox.append(&id, 0, bytes, bytes.len() as u64).unwrap();
    inbox.sync(&id).unwrap();
    let out = inbox
        .commit(spark, &id, bytes.len() as u64)
        .map(|o| o.imported);
    (id, out)
}

#[test]
fn the_receiver_checks_what_it_imports_with_its_own_gates() {
    let dir = tempfile::tempdir().unwrap();
    let spark = Store::open(dir.path().join("spark")).unwrap();
    let inbox = Inbox::open(
        &spark,
        &dir.path().join("inbox"),
        InboxLimits::default(),
        checker(),
    )
    .unwrap();
    // A correctly checksummed shard whose sender called everything clean.
    let line = |reply: &str| ShardLine {
        category: Some("c".into()),
        source: Some("sender".into()),
        conversation: serde_json::json!({"messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": reply},
        ]})
        .to_string(),
    };
    let bytes = encode(&[
        line("<think>\n</think>\nHello there."),
        line("**Hello** 😀 there."),
    ])
    .unwrap();
    let (_, imported) = send(&inbox, &spark, &bytes);
    assert_eq!(imported.unwrap(), 2);
    let stored: Vec<Vec<String>> = spark
        .iter(&Filter::default())
        .map(|s| s.unwrap().record.flags)
        .collect();
    assert!(stored[0].is_empty(), "{stored:?}");
    for flag in ["emoji", "markdown", "think_prefix"] {
        assert!(stored[1].iter().any(|f| f == flag), "{flag} in {stored:?}");
    }
    let clean = spark
        .iter(&Filter {
            clean_only: true,
            ..Filter::default()
        })
        .count();
    assert_eq!(clean, 1, "clean_only means what the receiver's gates say");
}

#[test]
fn a_shard_whose_content_cannot_be_imported_is_quarantined_and_answered_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let spark = Store::open(dir.path().join("spark")).unwrap();
    let inbox = Inbox::open(
        &spark,
        &dir.path().join("inbox"),
        InboxLimits::default(),
        checker(),
    )
    .unwrap();
    // A zstd bomb: 64 MiB of zeros, a few KiB on the wire.
    let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 19).unwrap();
    let (id, result) = send(&inbox, &spark, &bomb);
    let err = result.unwrap_err();
    assert!(matches!(err, ShardError::Rejected { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains(id.as_str()),
        "the error names the shard: {text}"
    );
    assert!(text.contains("exceeds the limit"), "{text}");
    assert!(
        !dir.path()
            .join("inbox/shards")
            .join(id.file_name())
            .exists(),
        "no leftover in inbox/shards"
    );
    assert!(
        inbox.quarantine_path(&id).exists(),
        "kept in the quarantine"
    );
    // The sender asking again learns that it was rejected, not that it may commit.
    let q = inbox.query(&id).unwrap();
    assert!(!q.committed);
    assert!(q.rejected.as_deref().unwrap().contains("exceeds the limit"));
    assert!(matches!(
        inbox.commit(&spark, &id, bomb.len() as u64),
        Err(ShardError::Rejected { .. })
    ));
    assert!(matches!(
        inbox.append(&id, 0, &bomb[..10], bomb.len() as u64),
        Err(ShardError::Rejected { .. })
    ));
    assert_eq!(inbox.rejected_count(), 1);

    // A line that is not a conversation, and a category with a NUL byte: rejected too,
    // with nothing of the shard imported.
    let good = ShardLine {
        category: None,
        source: None,
        conversation: r#"{"messages":[{"role":"user","content":"a"}]}"#.into(),
    };
    let not_conv = encode(&[
        good.clone(),
        ShardLine {
            conversation: r#"{"messages":3}"#.into(),
            ..good.clone()
        },
    ])
    .unwrap();
    let (_, r) = send(&inbox, &spark, &not_conv);
    assert!(r.unwrap_err().to_string().contains("line 2"));
    let nul = encode(&[
        good.clone(),
        ShardLine {
            category: Some("a\0b".into()),
            ..good
        },
    ])
    .unwrap();
    let (_, r) = send(&inbox, &spark, &nul);
    assert!(matches!(r, Err(ShardError::Rejected { .. })));
    assert!(spark.is_empty(), "nothing of a rejected shard is imported");
}

fn conv(i: usize) -> Conversation {
    Conversation::from_json(&format!(
        r#"{{"messages":[{{"role":"user","content":"question {i}"}},{{"role":"assistant","content":"<think>\n</think>\nanswer {i}."}}],"category":"c{}"}}"#,
        i % 3
    ))
    .unwrap()
}

/// Stores `n` conversations, every fifth one flagged; returns the accepted ids.
fn fill(store: &Store, range: std::ops::Range<usize>) -> BTreeSet<ConversationId> {
    let flagged = vec!["markdown".to_string()];
    let convs: Vec<_> = range.map(|i| (i, conv(i))).collect();
    store
        .insert_batch(convs.iter().map(|(i, c)| NewConversation {
            conversation: c,
            category: Some("c"),
            source: Some("test"),
            flags: if i % 5 == 0 { &flagged } else { &[] },
        }))
        .unwrap();
    convs
        .iter()
        .filter(|(i, _)| i % 5 != 0)
        .map(|(_, c)| ConversationId::of(c))
        .collect()
}

fn ids(store: &Store) -> Vec<ConversationId> {
    store
        .iter(&Filter::default())
        .map(|s| s.unwrap().id)
        .collect()
}

/// Ships every pending shard in chunks of `chunk` bytes; when `cut_after` is set, the first
/// upload stops after that many chunks and resumes from a fresh query.
fn ship(outbox: &Outbox, inbox: &Inbox, spark: &Store, chunk: usize, cut_after: Option<usize>) {
    for meta in outbox.pending().unwrap() {
        let bytes = outbox.read(&meta).unwrap();
        let mut cut = cut_after;
        loop {
            let q = inbox.query(&meta.id).unwrap();
            if q.committed {
                break;
            }
            let mut offset = q.committed_offset as usize;
            let mut sent = 0;
            while offset < bytes.len() {
                if cut == Some(sent) {
                    break;
                }
                let end = (offset + chunk).min(bytes.len());
                offset = inbox
                    .append(&meta.id, offset as u64, &bytes[offset..end], meta.size)
                    .unwrap() as usize;
                sent += 1;
            }
            inbox.sync(&meta.id).unwrap();
            if offset < bytes.len() {
                cut = None;
                continue;
            }
            let out = inbox.commit(spark, &meta.id, meta.size).unwrap();
            assert!(!out.already_committed);
            assert_eq!(out.imported, meta.conversations);
            break;
        }
        outbox.mark_shipped(&meta.id).unwrap();
    }
}

#[test]
fn accepted_conversations_arrive_exactly_once_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let ws = Store::open(dir.path().join("ws")).unwrap();
    let spark = Store::open(dir.path().join("spark")).unwrap();
    let outbox = Outbox::open(&ws, &dir.path().join("outbox")).unwrap();
    let inbox = Inbox::open(
        &spark,
        &dir.path().join("inbox"),
        InboxLimits::default(),
        checker(),
    )
    .unwrap();
    let limits = SealLimits {
        max_conversations: 7,
        max_bytes: 1 << 20,
    };

    let mut accepted = fill(&ws, 0..40);
    let sealed = outbox.seal(&ws, &limits, false).unwrap();
    assert_eq!(
        sealed.len(),
        32 / 7,
        "only full shards without flush_partial"
    );
    assert!(sealed.iter().all(|m| m.conversations == 7));
    ship(&outbox, &inbox, &spark, 100, Some(2));

    accepted.extend(fill(&ws, 40..55));
    let more = outbox.seal(&ws, &limits, true).unwrap();
    assert!(!more.is_empty());
    assert!(
        outbox.seal(&ws, &limits, true).unwrap().is_empty(),
        "nothing left to seal"
    );
    ship(&outbox, &inbox, &spark, 64, None);

    let received = ids(&spark);
    assert_eq!(received.len(), accepted.len());
    assert_eq!(received.iter().copied().collect::<BTreeSet<_>>(), accepted);
    let sent_order: Vec<_> = ws
        .iter(&Filter::default())
        .map(|s| s.unwrap())
        .filter(|s| s.record.flags.is_empty())
        .map(|s| s.id)
        .collect();
    assert_eq!(
        received, sent_order,
        "import order is the workstation's order"
    );
    assert_eq!(
        outbox.counts().unwrap(),
        (
            sealed.len() as u64 + more.len() as u64,
            sealed.len() as u64 + more.len() as u64
        )
    );
    assert_eq!(
        inbox.committed_count(),
        sealed.len() as u64 + more.len() as u64
    );

    // A repeated commit is a no-op.
    let again = inbox.commit(&spark, &sealed[0].id, sealed[0].size).unwrap();
    assert!(again.already_committed);
    assert_eq!(ids(&spark).len(), accepted.len());
    assert!(inbox.query(&sealed[0].id).unwrap().committed);
}

#[test]
fn bad_bytes_are_discarded_and_offsets_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let spark = Store::open(dir.path().join("spark")).unwrap();
    let limits = InboxLimits {
        max_shard_bytes: 1000,
        max_chunk_bytes: 100,
        max_decoded_bytes: 1 << 20,
    };
    let inbox = Inbox::open(&spark, &dir.path().join("inbox"), limits, checker()).unwrap();
    let id = ShardId::of_bytes(b"the real shard");

    assert!(matches!(
        inbox.append(&id, 0, &[0; 101], 500),
        Err(ShardError::TooLarge { what: "chunk", .. })
    ));
    assert!(matches!(
        inbox.append(&id, 0, &[0; 10], 1001),
        Err(ShardError::TooLarge { what: "shard", .. })
    ));
    assert_eq!(
        inbox.query(&id).unwrap().committed_offset,
        0,
        "nothing written"
    );

    assert_eq!(inbox.append(&id, 0, b"not the ", 14).unwrap(), 8);
    assert!(matches!(
        inbox.append(&id, 3, b"x", 14),
        Err(ShardError::OffsetMismatch { committed: 8, .. })
    ));
    assert_eq!(inbox.append(&id, 8, b"shard!", 14).unwrap(), 14);
    let err = inbox.commit(&spark, &id, 14).unwrap_err();
    assert!(matches!(err, ShardError::Checksum { .. }), "{err}");
    assert_eq!(inbox.query(&id).unwrap().committed_offset, 0, "discarded");
    assert!(spark.is_empty());
}

#[test]
fn sealing_is_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let ws = Store::open(dir.path().join("ws")).unwrap();
    fill(&ws, 0..12);
    let limits = SealLimits {
        max_conversations: 5,
        max_bytes: 1 << 20,
    };
    let a = {
        let outbox = Outbox::open(&ws, &dir.path().join("a")).unwrap();
        outbox.seal(&ws, &limits, true).unwrap()
    };
    // A second outbox over a copy of the same conversations seals byte-identical shards.
    let ws2 = Store::open(dir.path().join("ws2")).unwrap();
    fill(&ws2, 0..12);
    let b = Outbox::open(&ws2, &dir.path().join("b"))
        .unwrap()
        .seal(&ws2, &limits, true)
        .unwrap();
    assert_eq!(
        a.iter().map(|m| m.id.clone()).collect::<Vec<_>>(),
        b.iter().map(|m| m.id.clone()).collect::<Vec<_>>()
    );
}

#[test]
fn a_damaged_sealed_file_is_reported_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let ws = Store::open(dir.path().join("ws")).unwrap();
    fill(&ws, 0..4);
    let outbox_dir = dir.path().join("outbox");
    let outbox = Outbox::open(&ws, &outbox_dir).unwrap();
    let meta = outbox.seal(&ws, &SealLimits::default(), true).unwrap();
    std::fs::write(outbox.path_of(&meta[0].id), b"damaged").unwrap();
    let err = Outbox::open(&ws, &outbox_dir).err().unwrap().to_string();
    assert!(err.contains("sha256 differs"), "{err}");
}
