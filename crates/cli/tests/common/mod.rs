//! Set-up shared by the CLI's integration tests.

use std::path::Path;

/// Writes `take` conversations of the shipped example dataset, from line `skip + 1` on,
/// without their (long) system prompts, to `out` as JSONL: short training data for tiny
/// models.
pub fn write_example_conversations(out: &Path, skip: usize, take: usize) {
    let examples =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/examples/qat_v4_example.jsonl");
    let mut data = String::new();
    for line in std::fs::read_to_string(examples)
        .unwrap()
        .lines()
        .skip(skip)
        .take(take)
    {
        let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
        v["messages"]
            .as_array_mut()
            .unwrap()
            .retain(|m| m["role"] != "system");
        data.push_str(&serde_json::to_string(&v).unwrap());
        data.push('\n');
    }
    std::fs::write(out, data).unwrap();
}
