//! Property tests of the tunnel line protocol: `tunnel::worker::serve` driven over
//! `tokio::io::duplex` with a small in-test `CommandHandler`, fed arbitrary bytes and
//! well-formed and malformed command lines cut into arbitrary write chunks. It must never
//! panic and must write exactly one reply line per input line, in order, each a JSON object
//! with a boolean `success`.
//!
//! The default case count is small so CI stays fast. To search longer, e.g.:
//! `PROPTEST_CASES=20000 cargo nextest run --test line_protocol_prop`.

use std::time::Duration;

use futures_util::future::BoxFuture;
use mtunnel::task::{TaskLog, TaskManager};
use mtunnel::tunnel::worker::{CommandHandler, Outcome, serve};
use proptest::prelude::*;
use serde_json::{Map, Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Cases per property unless `PROPTEST_CASES` says otherwise.
const DEFAULT_CASES: u32 = 64;

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES);
    ProptestConfig::with_cases(cases)
}

/// Knows `echo` (replies with its parameters), `fail` (an error) and `quit` (exit mode).
struct Echo;

impl CommandHandler for Echo {
    fn knows(&self, cmd: &str) -> bool {
        matches!(cmd, "echo" | "fail" | "quit")
    }

    fn handle<'a>(
        &'a mut self,
        cmd: &'a str,
        params: Map<String, Value>,
    ) -> BoxFuture<'a, Outcome> {
        Box::pin(async move {
            match cmd {
                "echo" => Outcome::ok(params),
                "quit" => Outcome {
                    reply: Ok(Map::new()),
                    exit: true,
                },
                _ => Outcome::err("no"),
            }
        })
    }

    fn finish(&mut self, _end: &str) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// Runs `serve` on `input`, written in pieces cut at `cuts` through a duplex pipe of
/// `capacity` bytes; returns its result and the reply lines.
fn run_serve(input: &[u8], cuts: &[usize], capacity: usize) -> (bool, Vec<String>) {
    let tmp = tempfile::tempdir().expect("temporary directory");
    let log = task_log(tmp.path());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let (exit, output) = rt.block_on(async {
        let (mut to_server, server_in) = tokio::io::duplex(capacity);
        let (server_out, mut from_server) = tokio::io::duplex(capacity);
        let writer = async move {
            let mut at = 0;
            for &cut in cuts.iter().chain(std::iter::once(&input.len())) {
                to_server.write_all(&input[at..cut]).await.expect("write");
                at = cut;
            }
            // Dropping the pipe is the client's EOF.
        };
        let mut handler = Echo;
        let server = serve(server_in, server_out, &mut handler, &log);
        let reader = async move {
            let mut out = Vec::new();
            from_server.read_to_end(&mut out).await.expect("read");
            out
        };
        let all = async { tokio::join!(writer, server, reader) };
        let ((), served, out) = tokio::time::timeout(Duration::from_secs(20), all)
            .await
            .expect("serve finished within 20 s");
        (served.expect("serve returned an error"), out)
    });
    let text = String::from_utf8(output).expect("replies are UTF-8");
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "last reply is not newline-terminated: {text:?}"
    );
    (exit, text.lines().map(str::to_string).collect())
}

fn task_log(dir: &std::path::Path) -> TaskLog {
    TaskManager::new("prop", dir)
        .and_then(|m| m.create("qmtunnel", "100", "root@pam"))
        .expect("task log")
}

/// The lines `serve` sees in `input`: newline-separated, plus a last unterminated one.
fn count_lines(input: &[u8]) -> usize {
    let newlines = input.iter().filter(|&&b| b == b'\n').count();
    let tail = input.rsplit(|&b| b == b'\n').next().unwrap_or(&[]);
    newlines + usize::from(!tail.is_empty())
}

/// Sorted cut points inside `0..=len`.
fn cuts_for(len: usize, raw: Vec<usize>) -> Vec<usize> {
    let mut cuts: Vec<usize> = raw.into_iter().map(|c| c % (len + 1)).collect();
    cuts.sort_unstable();
    cuts
}

fn parse_reply(line: &str) -> Map<String, Value> {
    match serde_json::from_str::<Value>(line) {
        Ok(Value::Object(map)) => {
            assert!(
                map.get("success").is_some_and(Value::is_boolean),
                "reply without a boolean 'success': {line}"
            );
            map
        }
        other => panic!("reply is not a JSON object: {line:?} ({other:?})"),
    }
}

/// One generated command line and what the worker must answer.
#[derive(Debug, Clone)]
enum Line {
    Echo { seq: u32, pad: String },
    Fail,
    Quit,
    Unknown(String),
    NoCmd,
    CmdNotString(i64),
    NotObject(&'static str),
    Invalid(String),
}

impl Line {
    fn text(&self) -> String {
        match self {
            Line::Echo { seq, pad } => json!({"cmd": "echo", "seq": seq, "pad": pad}).to_string(),
            Line::Fail => r#"{"cmd":"fail"}"#.to_string(),
            Line::Quit => r#" {"cmd" : "quit"} "#.to_string(),
            Line::Unknown(cmd) => json!({"cmd": cmd}).to_string(),
            Line::NoCmd => r#"{"command":"echo"}"#.to_string(),
            Line::CmdNotString(n) => json!({"cmd": n}).to_string(),
            Line::NotObject(s) => s.to_string(),
            Line::Invalid(rest) => format!("{{\"cmd\"{rest}"),
        }
    }

    /// The exact reply, or `None` for a JSON parse error (whose text is serde_json's).
    fn expected(&self, exit_mode: bool) -> Option<Value> {
        let fail = |msg: String| Some(json!({"success": false, "msg": msg}));
        let cmd = match self {
            Line::NoCmd | Line::CmdNotString(_) => return fail("'cmd' missing".into()),
            Line::NotObject(_) => {
                return fail("failed to parse command - not a JSON object".into());
            }
            Line::Invalid(_) => return None,
            Line::Echo { .. } => "echo",
            Line::Fail => "fail",
            Line::Quit => "quit",
            Line::Unknown(cmd) => cmd,
        };
        if exit_mode {
            return fail(format!(
                "tunnel is in exit-mode, processing '{cmd}' cmd not possible"
            ));
        }
        match self {
            Line::Echo { seq, pad } => Some(json!({"seq": seq, "pad": pad, "success": true})),
            Line::Fail => fail("failed to handle 'fail' command - no".into()),
            Line::Quit => Some(json!({"success": true})),
            _ => fail(format!("unknown command '{cmd}' given")),
        }
    }
}

fn line_strategy() -> impl Strategy<Value = Line> {
    prop_oneof![
        4 => (any::<u32>(), any::<String>()).prop_map(|(seq, pad)| Line::Echo { seq, pad }),
        1 => Just(Line::Fail),
        1 => Just(Line::Quit),
        1 => "[a-z-]{1,12}"
            .prop_filter("a known command", |c| !matches!(c.as_str(), "echo" | "fail" | "quit"))
            .prop_map(Line::Unknown),
        1 => Just(Line::NoCmd),
        1 => any::<i64>().prop_map(Line::CmdNotString),
        1 => prop_oneof![Just("[1,2]"), Just("42"), Just("\"echo\""), Just("null"), Just("true")]
            .prop_map(Line::NotObject),
        // After `{"cmd"` anything but `:` (or JSON whitespace then `:`) is a syntax error.
        2 => "[^:\n\r\t ][^\n]{0,30}".prop_map(Line::Invalid),
    ]
}

proptest! {
    #![proptest_config(config())]

    /// Any bytes at all: one reply per line, each an object with `success`.
    #[test]
    fn prop_arbitrary_bytes_get_one_reply_per_line(
        input in prop::collection::vec(
            prop_oneof![3 => any::<u8>(), 1 => Just(b'\n'), 1 => Just(b'{'), 1 => Just(b'"')],
            0..600,
        ),
        raw_cuts in prop::collection::vec(any::<usize>(), 0..8),
        capacity in 1usize..128,
    ) {
        let cuts = cuts_for(input.len(), raw_cuts);
        let (_, replies) = run_serve(&input, &cuts, capacity);
        prop_assert_eq!(replies.len(), count_lines(&input));
        for reply in &replies {
            parse_reply(reply);
        }
    }

    /// Valid and invalid commands in any mix and any write chunking: the exact reply for
    /// each, in order (echo carries its sequence number back), exit mode after `quit`.
    #[test]
    fn prop_replies_follow_requests_in_order(
        lines in prop::collection::vec(line_strategy(), 0..40),
        crlf in any::<bool>(),
        final_newline in any::<bool>(),
        raw_cuts in prop::collection::vec(any::<usize>(), 0..16),
        capacity in 1usize..256,
    ) {
        let end = if crlf { "\r\n" } else { "\n" };
        let mut input = lines.iter().map(Line::text).collect::<Vec<_>>().join(end);
        if final_newline && !lines.is_empty() {
            input.push_str(end);
        }
        let cuts = cuts_for(input.len(), raw_cuts);
        let (exit, replies) = run_serve(input.as_bytes(), &cuts, capacity);
        prop_assert_eq!(replies.len(), lines.len());
        let mut exit_mode = false;
        for (line, reply) in lines.iter().zip(&replies) {
            let got = Value::Object(parse_reply(reply));
            match line.expected(exit_mode) {
                Some(want) => prop_assert_eq!(&got, &want, "for {:?}", line),
                None => {
                    prop_assert_eq!(&got["success"], &json!(false));
                    let msg = got["msg"].as_str().unwrap_or_default();
                    prop_assert!(msg.starts_with("failed to parse command - "), "{}", msg);
                }
            }
            exit_mode |= matches!(line, Line::Quit);
        }
        prop_assert_eq!(exit, exit_mode, "serve reports a clean end exactly after quit");
    }
}
