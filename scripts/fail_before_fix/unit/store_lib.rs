// ---- appended by scripts/fail_before_fix.sh: issue 18 tests of main, on the old store ----
#[cfg(test)]
mod failfirst {
    use super::*;

    fn conv(text: &str) -> Conversation {
        Conversation::from_json(&format!(
            r#"{{"messages":[{{"role":"user","content":{text:?}}},{{"role":"assistant","content":"ok"}}],"x_extra":[1,2]}}"#
        ))
        .unwrap()
    }

    fn new<'a>(c: &'a Conversation, cat: &'a str, flags: &'a [String]) -> NewConversation<'a> {
        NewConversation {
            conversation: c,
            category: Some(cat),
            source: Some("test"),
            flags,
        }
    }

    /// Main's test (defect 12); the old crate has no `DUPLICATE_MESSAGES` constant, so
    /// its value is written out.
    #[test]
    fn identical_messages_under_other_metadata_are_flagged() {
        const DUPLICATE_MESSAGES: &str = "duplicate_messages";
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let a = conv("same");
        let mut b = a.clone();
        b.extra
            .insert("category".into(), serde_json::Value::String("other".into()));
        assert_ne!(ConversationId::of(&a), ConversationId::of(&b));
        let out = store
            .insert_batch([new(&a, "x", &[]), new(&b, "y", &[])])
            .unwrap();
        assert!(out.iter().all(|o| matches!(o, InsertOutcome::Inserted(_))));
        let first = store.get(&ConversationId::of(&a)).unwrap().unwrap();
        let second = store.get(&ConversationId::of(&b)).unwrap().unwrap();
        assert!(first.record.flags.is_empty());
        assert_eq!(second.record.flags, [DUPLICATE_MESSAGES]);
        assert_eq!(store.stats().unwrap().by_flag[DUPLICATE_MESSAGES], 1);
    }

    /// Verbatim from main (defect 8).
    #[test]
    fn an_invalid_item_refuses_the_whole_batch() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let convs: Vec<Conversation> = (0..BATCH + 10).map(|i| conv(&format!("n{i}"))).collect();
        let items = convs
            .iter()
            .enumerate()
            .map(|(i, c)| new(c, if i == BATCH + 5 { "bad\0cat" } else { "ok" }, &[]));
        assert!(matches!(
            store.insert_batch(items),
            Err(StoreError::InvalidName { .. })
        ));
        assert_eq!(store.len(), 0, "nothing of a refused batch is stored");
    }
}
