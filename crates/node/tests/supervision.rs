//! Supervision: a panic inside an actor's work is logged in the actor's span and the actor
//! is restarted by its supervisor and serves again; a shipping round that stops
//! progressing (a peer that accepts connections and never answers) is aborted by the
//! heartbeat watchdog after the configured time and the shipper is restarted.

use actix::Supervisor;
use qatflow_core::Conversation;
use qatflow_node::actors::shipper::{ShardShipper, ShipperParts};
use qatflow_node::client;
use qatflow_node::status::StatusBoard;
use qatflow_shards::{Outbox, SealLimits};
use qatflow_store::{NewConversation, Store};
use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Everything the tests' tracing subscriber printed (one global subscriber per binary).
fn logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || Sink(sink.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).unwrap();
        buf
    })
    .clone()
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn log_text() -> String {
    String::from_utf8_lossy(&logs().lock().unwrap()).into_owned()
}

fn system() -> actix::SystemRunner {
    qatflow_node::system(Some(2))
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(debug_assertions)]
#[test]
fn a_panicking_receiver_is_logged_and_restarted() {
    use qatflow_node::actors::receiver::{InjectPanic, Query, ReceiveError, ShardReceiver};
    use qatflow_shards::{Inbox, InboxLimits, ShardId};

    logs();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("db")).unwrap();
    let inbox = Inbox::open(
        &store,
        &dir.path().join("inbox"),
        InboxLimits::default(),
        qatflow_gates::Checker::new(&qatflow_gates::GateProfile::builtin("v4").unwrap()),
    )
    .unwrap();
    let board = StatusBoard::new("spark", "spark");
    system().block_on(async {
        let b = board.clone();
        let receiver =
            Supervisor::start(move |_| ShardReceiver::new(inbox.clone(), store.clone(), b.clone()));
        let err = receiver
            .send(InjectPanic {
                parent: tracing::Span::none(),
            })
            .await
            .unwrap()
            .unwrap_err();
        assert!(matches!(err, ReceiveError::Panicked(_)), "{err}");
        assert!(err.to_string().contains("injected panic"), "{err}");
        wait_for("the supervisor restarts the receiver", || {
            board.restarts() == 1
        })
        .await;

        // The restarted actor serves again.
        let q = receiver
            .send(Query {
                id: ShardId::of_bytes(b"x"),
                parent: tracing::Span::none(),
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(q.committed_offset, 0);
    });
    let text = log_text();
    let line = text
        .lines()
        .find(|l| l.contains("injected panic"))
        .unwrap_or_else(|| panic!("the panic is logged:\n{text}"));
    assert!(line.contains("ERROR"), "{line}");
    assert!(
        line.contains("ShardReceiver.InjectPanic"),
        "logged inside the actor's span: {line}"
    );
}

#[test]
fn a_stalled_shipping_round_is_aborted_and_the_shipper_restarted() {
    logs();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("db")).unwrap();
    let outbox = Outbox::open(&store, &dir.path().join("outbox")).unwrap();
    let convs: Vec<Conversation> = (0..4)
        .map(|i| {
            Conversation::from_json(&format!(
                r#"{{"messages":[{{"role":"user","content":"q {i}"}},{{"role":"assistant","content":"a {i}."}}]}}"#
            ))
            .unwrap()
        })
        .collect();
    store
        .insert_batch(convs.iter().map(|c| NewConversation {
            conversation: c,
            category: Some("c"),
            source: None,
            flags: &[],
        }))
        .unwrap();
    let board = StatusBoard::new("workstation", "workstation");
    system().block_on(async {
        // A peer that accepts connections and never says a word.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = format!("http://{}", silent.local_addr().unwrap());
        let parts = Arc::new(ShipperParts {
            store: store.clone(),
            outbox: outbox.clone(),
            limits: SealLimits {
                max_conversations: 2,
                max_bytes: 1 << 20,
            },
            client: client::shards(&peer, None).unwrap(),
            poll: Duration::from_millis(50),
            stall_timeout: Duration::from_millis(300),
        });
        let b = board.clone();
        let started = Instant::now();
        // Holding the address keeps the supervisor restarting the actor.
        let _shipper = Supervisor::start(move |_| ShardShipper::new(parts.clone(), b.clone()));
        wait_for("the watchdog restarts the shipper twice", || {
            board.restarts() >= 2
        })
        .await;
        assert!(
            started.elapsed() >= Duration::from_millis(600),
            "two stalls of 300 ms each take at least 600 ms"
        );
        drop(silent);
    });
    assert_eq!(outbox.counts().unwrap(), (2, 0), "sealed, nothing shipped");
    let text = log_text();
    assert!(
        text.lines().any(|l| l.contains("ERROR")
            && l.contains("ShardShipper.Watchdog")
            && l.contains("no progress")),
        "the stall is logged:\n{text}"
    );
}
