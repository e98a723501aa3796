// ---- appended by scripts/fail_before_fix.sh: issue 18 test of main, on the old backend ----
#[cfg(test)]
mod failfirst {
    use super::*;

    fn backend(seed: u64) -> OfflineBackend {
        OfflineBackend::new(
            &OfflineConfig {
                seed,
                delay: Duration::ZERO,
            },
            &TeacherConfig::builtin(),
        )
        .unwrap()
    }

    /// Verbatim from main (defect 12).
    #[test]
    fn no_two_categories_write_the_same_messages() {
        let b = backend(0);
        let mut seen = std::collections::HashMap::new();
        for c in TeacherConfig::builtin().categories {
            let text = b.render(&c.name, 0, c.count as usize).unwrap();
            for line in text.lines() {
                let messages = serde_json::from_str::<serde_json::Value>(line).unwrap()["messages"]
                    .to_string();
                if let Some(other) = seen.insert(messages, c.name.clone()) {
                    panic!("{} repeats a conversation of {other}: {line}", c.name);
                }
            }
        }
    }
}
