// ---- appended by scripts/fail_before_fix.sh: issue 18 tests of main, on the old reader ----
#[cfg(test)]
mod failfirst {
    use super::*;
    use std::io::Cursor;

    fn lines(data: &[u8], limit: usize) -> Vec<(usize, Result<String, LineProblem>)> {
        JsonlReader::new(Cursor::new(data.to_vec()), "mem.jsonl")
            .with_max_line_bytes(limit)
            .map(|l| {
                let l = l.unwrap();
                (l.number, l.text)
            })
            .collect()
    }

    /// Verbatim from main (defect 9).
    #[test]
    fn a_leading_byte_order_mark_is_dropped() {
        let got = lines(b"\xEF\xBB\xBF{\"a\":1}\n\xEF\xBB\xBFx\n", 100);
        assert_eq!(got[0], (1, Ok("{\"a\":1}".into())));
        // Only at the start of the file.
        assert_eq!(got[1], (2, Ok("\u{feff}x".into())));
        assert!(
            lines(b"\xEF\xBB\xBF", 100).is_empty(),
            "a BOM alone is an empty file"
        );
    }

    /// Main's body (defect 15), run on a thread with a deadline: on the old reader it
    /// never returns, and a hang is reported as a failure instead of blocking the run.
    #[test]
    fn a_line_without_end_stops_the_reader() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // An endless source, like /dev/zero.
            let reader = JsonlReader::new(BufReader::with_capacity(64, io::repeat(0)), "zero")
                .with_max_line_bytes(1000);
            let got: Vec<_> = reader.collect();
            let _ = tx.send(
                got.iter()
                    .map(|l| l.as_ref().err().map(|e| e.to_string()))
                    .collect::<Vec<_>>(),
            );
        });
        let got = rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("the reader of an endless line never returned (20 s)");
        assert_eq!(got.len(), 1);
        let err = got[0].clone().expect("an error");
        assert!(err.contains("zero:1: no line end within"), "{err}");
        // A long line that does end is still only skipped.
        let mut data = vec![b'x'; 5 * 1000];
        data.extend_from_slice(b"\nok\n");
        let got = lines(&data, 1000);
        assert_eq!(got[1], (2, Ok("ok".into())));
    }

    /// Main's fuzz module ("Also": fuzz target). The old reader has no
    /// `JsonlError::NoLineEnd`, so that arm is left out; everything else is verbatim.
    mod fuzz {
        use super::*;
        use crate::Conversation;
        use proptest::prelude::*;

        fn check(data: &[u8], limit: usize, chunk: usize) {
            let reader = JsonlReader::new(BufReader::with_capacity(chunk, Cursor::new(data)), "f")
                .with_max_line_bytes(limit);
            let mut last = 0;
            for line in reader {
                let line = match line {
                    Ok(line) => line,
                    Err(e) => panic!("{e}"),
                };
                assert!(line.number > last);
                last = line.number;
                if let Ok(text) = &line.text {
                    assert!(text.len() <= limit);
                    let _ = Conversation::from_json(text);
                }
            }
        }

        fn jsonish() -> impl Strategy<Value = Vec<u8>> {
            let pieces = prop::sample::select(vec![
                &b"{\"messages\":["[..],
                b"{\"role\":\"user\",\"content\":",
                b"\"hi\"",
                b"null",
                b"}",
                b"]",
                b",",
                b"\n",
                b"\r\n",
                b"\xEF\xBB\xBF",
                b"\xff",
                b"\\u0000",
                b"{\"tool_calls\":[{\"function\":{\"name\":1}}]}",
            ]);
            prop::collection::vec(pieces, 0..40).prop_map(|v| v.concat())
        }

        proptest! {
            #[test]
            fn arbitrary_bytes(data in prop::collection::vec(any::<u8>(), 0..2048),
                               limit in 1usize..300, chunk in 1usize..64) {
                check(&data, limit, chunk);
            }

            #[test]
            fn json_like_fragments(data in jsonish(), limit in 8usize..400) {
                check(&data, limit, 16);
            }

            #[test]
            fn arbitrary_text_never_panics_the_parser(text in "\\PC{0,200}") {
                let _ = Conversation::from_json(&text);
            }
        }
    }
}
