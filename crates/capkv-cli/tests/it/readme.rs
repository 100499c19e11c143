//! The README is a test: every command in its `console` blocks runs here, in order, in one
//! shell, as a newcomer would type it, and its output is compared with the README's.
//!
//! - Commands run in one `bash` (so `&`, `%1` and `$?` mean what they mean in a terminal),
//!   in a fresh directory, with the `capkv` under test first on `PATH`;
//!   `cargo run --release --` stands for that binary (the suite does not rebuild it).
//! - A foreground command's output (stdout and stderr) must be exactly the lines the README
//!   shows; a command shown with no output must succeed (exit 0).
//! - A command ending in `&` runs in the background; the lines the README shows must
//!   appear in its stdout, in order (this is also how the test knows it is ready).
//! - What differs from run to run is a wildcard: revisions, pids and the playground's
//!   temporary directory. A pid or directory matched in an output line replaces the
//!   README's example value in later commands (`kill -9 4243` kills the real node 2).
//!
//! After the README's commands, the test checks what the README's prose promises: the
//! killed node is restarted and catches up, and Ctrl-C stops the playground and every node.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use regex::Regex;

use crate::fixture::{wait_until, Slot, BIN};

/// One `$ command` of a console block and the lines shown under it.
#[derive(Debug, Clone)]
struct Step {
    command: String,
    expected: Vec<String>,
}

/// Every `$` command of every `console` block, in order.
fn parse_console_blocks(markdown: &str) -> Vec<Step> {
    let mut steps: Vec<Step> = Vec::new();
    let mut in_console = false;
    for line in markdown.lines() {
        let fence = line.trim_start().starts_with("```");
        if !in_console {
            in_console = fence && line.trim() == "```console";
            continue;
        }
        if fence {
            in_console = false;
        } else if let Some(cmd) = line.strip_prefix("$ ") {
            steps.push(Step {
                command: cmd.to_string(),
                expected: vec![],
            });
        } else if let Some(step) = steps.last_mut() {
            step.expected.push(line.to_string());
        }
    }
    steps
}

/// The command without its trailing `# comment`, and whether it ends in `&`.
fn split_command(command: &str) -> (String, bool) {
    let mut cmd = command.to_string();
    // README commands put no `#` inside quotes; a comment starts at " #".
    if let Some(i) = cmd.find(" #") {
        cmd.truncate(i);
    }
    let cmd = cmd.trim_end();
    match cmd.strip_suffix('&') {
        Some(bg) if !bg.ends_with('&') => (bg.trim_end().to_string(), true),
        _ => (cmd.to_string(), false),
    }
}

/// The wildcards: what may differ between the README and a run, and whether a match names
/// a value later commands use.
const WILDCARDS: [(&str, &str, bool); 3] = [
    (r"revision=\d+", r"revision=\d+", false),
    (r"pid \d+", r"pid (\d+)", true),
    (
        r"/tmp/capkv-playground-\w+",
        r"(\S*/capkv-playground-\w+)",
        true,
    ),
];

/// A pattern for one expected line, and the README's example values it captures.
struct LinePattern {
    regex: Regex,
    examples: Vec<String>,
}

fn line_pattern(expected: &str) -> LinePattern {
    let mut spans: Vec<(usize, usize, &str, bool)> = Vec::new();
    for (find, replace, captures) in WILDCARDS {
        for m in Regex::new(find).unwrap().find_iter(expected) {
            spans.push((m.start(), m.end(), replace, captures));
        }
    }
    spans.sort();
    let mut pattern = String::from("^");
    let mut examples = Vec::new();
    let mut at = 0;
    for (start, end, replace, captures) in spans {
        if start < at {
            continue;
        }
        pattern.push_str(&regex::escape(&expected[at..start]));
        pattern.push_str(replace);
        if captures {
            let example = &expected[start..end];
            // The value itself: the digits of `pid 4243`, or the whole path.
            let value = example.strip_prefix("pid ").unwrap_or(example);
            examples.push(value.to_string());
        }
        at = end;
    }
    pattern.push_str(&regex::escape(&expected[at..]));
    pattern.push('$');
    LinePattern {
        regex: Regex::new(&pattern).unwrap(),
        examples,
    }
}

/// Whether `actual` matches `expected`; records captured values (README example -> actual).
fn matches(expected: &str, actual: &str, values: &mut HashMap<String, String>) -> bool {
    let p = line_pattern(expected);
    let Some(caps) = p.regex.captures(actual) else {
        return false;
    };
    for (example, m) in p.examples.iter().zip(caps.iter().skip(1)) {
        if let Some(m) = m {
            values.insert(example.clone(), m.as_str().to_string());
        }
    }
    true
}

/// `command` with the README's example values replaced by this run's.
fn substitute(command: &str, values: &HashMap<String, String>) -> String {
    let mut out = command.to_string();
    for (example, actual) in values {
        let word = Regex::new(&format!(r"(^|[^\w/]){}($|[^\w])", regex::escape(example))).unwrap();
        out = word
            .replace_all(&out, |c: &regex::Captures| {
                format!("{}{actual}{}", &c[1], &c[2])
            })
            .into_owned();
    }
    out.replace("cargo run --release --", "capkv")
}

/// A `bash` that reads commands from its stdin, as a terminal session would.
struct Shell {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    dir: PathBuf,
    /// Background commands: their pid and stdout file.
    background: Vec<(u32, PathBuf)>,
}

const DONE: &str = "@@readme-step-done";

impl Shell {
    fn start(dir: &Path) -> Shell {
        let bin_dir = Path::new(BIN).parent().unwrap();
        let path = format!(
            "{}:{}",
            bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut child = Command::new("bash")
            .arg("--norc")
            .current_dir(dir)
            .env("PATH", path)
            .env_remove("CAPKV_ENDPOINTS")
            .env("RUST_LOG", "info")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start bash");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Shell {
            child,
            stdin,
            lines,
            dir: dir.to_path_buf(),
            background: vec![],
        }
    }

    /// Runs `cmd` in the foreground; returns its output lines and exit code.
    fn run(&mut self, cmd: &str) -> (Vec<String>, i32) {
        writeln!(self.stdin, "{{ {cmd}\n}} 2>&1; echo \"{DONE} $?\"").unwrap();
        self.stdin.flush().unwrap();
        let mut out = Vec::new();
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(120))
                .unwrap_or_else(|_| panic!("`{cmd}` did not finish within 120 s; output: {out:?}"));
            if let Some(code) = line.strip_prefix(DONE) {
                return (out, code.trim().parse().unwrap_or(-1));
            }
            out.push(line);
        }
    }

    /// Starts `cmd` in the background; returns its pid and stdout file.
    fn spawn(&mut self, cmd: &str) -> (u32, PathBuf) {
        let n = self.background.len() + 1;
        let out = self.dir.join(format!("background-{n}.out"));
        let err = self.dir.join(format!("background-{n}.err"));
        let (lines, _) = self.run(&format!(
            "{cmd} > {} 2> {} &\necho \"$!\"",
            out.display(),
            err.display()
        ));
        let pid: u32 = lines
            .last()
            .and_then(|l| l.trim().parse().ok())
            .expect("pid of the job");
        self.background.push((pid, out.clone()));
        (pid, out)
    }
}

fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
}

/// Sends `sig` to `pid` if it is one of the processes this test started.
fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) on a pid this test started (directly or through the playground).
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Pids of the playground's nodes, from its pid files.
fn node_pids(data: &Path) -> Vec<u32> {
    (1..=3)
        .filter_map(|i| std::fs::read_to_string(data.join(format!("node-{i}.pid"))).ok())
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

/// Whatever the outcome, no process this test started outlives it.
struct Cleanup {
    pids: Vec<u32>,
    data: Option<PathBuf>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let mut pids = self.pids.clone();
        if let Some(d) = &self.data {
            pids.extend(node_pids(d));
        }
        for pid in pids {
            if alive(pid) {
                signal(pid, libc::SIGKILL);
            }
        }
    }
}

#[test]
fn the_readme_tour_runs_as_written() {
    // It uses the README's default ports (7379.., 8379..), which no other test uses.
    let _slot = Slot::take_all();
    let readme_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md");
    let readme = std::fs::read_to_string(&readme_path).unwrap();
    let steps = parse_console_blocks(&readme);
    assert!(
        steps.iter().any(|s| s.command.starts_with("capkv server"))
            && steps.iter().any(|s| s.command.contains("playground")),
        "the README's tour starts one node and the playground: {steps:?}"
    );
    let dir = tempfile::Builder::new()
        .prefix("capkv-readme-")
        .tempdir()
        .unwrap();
    let mut shell = Shell::start(dir.path());
    let mut values: HashMap<String, String> = HashMap::new();
    let mut cleanup = Cleanup {
        pids: vec![],
        data: None,
    };
    for step in &steps {
        let (cmd, background) = split_command(&step.command);
        let cmd = substitute(&cmd, &values);
        eprintln!("$ {cmd}");
        if background {
            let (pid, out) = shell.spawn(&cmd);
            cleanup.pids.push(pid);
            let deadline = Instant::now() + Duration::from_secs(90);
            let mut want = step.expected.iter().peekable();
            let mut seen = 0;
            while want.peek().is_some() {
                let text = std::fs::read_to_string(&out).unwrap_or_default();
                for line in text.lines().skip(seen) {
                    seen += 1;
                    if want.peek().is_some_and(|w| matches(w, line, &mut values)) {
                        want.next();
                    }
                }
                if want.peek().is_none() {
                    break;
                }
                assert!(
                    alive(pid) && Instant::now() < deadline,
                    "`{cmd}` never printed {:?}; it printed:\n{text}",
                    want.peek()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        } else {
            let (out, code) = shell.run(&cmd);
            for line in &out {
                eprintln!("  {line}");
            }
            if step.expected.is_empty() {
                assert_eq!(code, 0, "`{cmd}` failed: {out:?}");
            } else {
                assert_eq!(
                    out.len(),
                    step.expected.len(),
                    "`{cmd}`: {out:?} vs {:?}",
                    step.expected
                );
                for (want, got) in step.expected.iter().zip(&out) {
                    assert!(
                        matches(want, got, &mut values),
                        "`{cmd}`: README shows {want:?}, the binary printed {got:?}"
                    );
                }
            }
        }
        if let Some((_, path)) = values.iter().find(|(k, _)| k.contains("capkv-playground-")) {
            cleanup.data = Some(PathBuf::from(path));
        }
    }

    // What the prose promises after the kill: the playground restarts node 2 and it
    // catches up on the partition written while it was down.
    let data = cleanup
        .data
        .clone()
        .expect("the playground printed its data dir");
    let playground = *cleanup
        .pids
        .last()
        .expect("the playground runs in the background");
    let playground_err = dir
        .path()
        .join(format!("background-{}.err", cleanup.pids.len()));
    let err = std::fs::read_to_string(&playground_err).unwrap_or_default();
    assert!(
        err.contains("node 2 exited (signal: 9 (SIGKILL)); the other nodes keep serving"),
        "the playground says which node exited and how: {err}"
    );
    assert!(
        err.contains("by hand: ") && err.contains("server --id 2 --data-dir"),
        "the playground prints the command that restarts the node: {err}"
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let partition = capkv_types::partition_for_key(b"user:3", 8).0;
        let view = |addr: &'static str| async move {
            capkv_client::fetch_node_status(addr, Duration::from_secs(1))
                .await
                .ok()
                .and_then(|s| s.partitions.into_iter().find(|p| p.id == partition))
        };
        // Node 1 or 3 leads the partition now and committed user:3 before answering.
        wait_until(
            Duration::from_secs(60),
            "node 2 is back and applied what its peers committed",
            || async {
                let committed = [view("127.0.0.1:7379").await, view("127.0.0.1:7381").await]
                    .into_iter()
                    .flatten()
                    .map(|p| p.commit_index)
                    .max();
                let applied = view("127.0.0.1:7380").await.map(|p| p.applied_index);
                matches!((committed, applied), (Some(c), Some(a)) if c > 1 && a >= c)
            },
        )
        .await;
    });
    let err = std::fs::read_to_string(&playground_err).unwrap_or_default();
    assert!(err.contains("node 2 restarted (pid "), "{err}");

    // Ctrl-C stops the playground and every node.
    let nodes = node_pids(&data);
    assert_eq!(nodes.len(), 3, "a pid file per running node");
    signal(playground, libc::SIGINT);
    let deadline = Instant::now() + Duration::from_secs(30);
    while (alive(playground) || nodes.iter().any(|p| alive(*p))) && Instant::now() < deadline {
        // The shell reaps its finished jobs when it runs a command.
        shell.run("true");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!alive(playground), "Ctrl-C stops the playground");
    assert!(
        nodes.iter().all(|p| !alive(*p)),
        "and every node: {nodes:?}"
    );
    let out = std::fs::read_to_string(
        dir.path()
            .join(format!("background-{}.out", cleanup.pids.len())),
    )
    .unwrap();
    assert!(out.trim_end().ends_with("stopped"), "{out}");
    assert!(!data.exists(), "the temporary data dir is removed on exit");
    let _ = shell.child.kill();
    let _ = shell.child.wait();
}

#[test]
fn readme_lines_match_with_wildcards_only_where_runs_differ() {
    let mut values = HashMap::new();
    assert!(matches(
        "OK revision=2 partition=1",
        "OK revision=14 partition=1",
        &mut values
    ));
    assert!(!matches(
        "OK revision=2 partition=1",
        "OK revision=2 partition=3",
        &mut values
    ));
    assert!(!matches("exit=1", "exit=2", &mut values));
    assert!(matches(
        "node 2: pid 4243, gRPC 127.0.0.1:7380",
        "node 2: pid 999, gRPC 127.0.0.1:7380",
        &mut values
    ));
    assert!(matches(
        "data: /tmp/capkv-playground-Xy12ab  (logs)",
        "data: /var/tmp/capkv-playground-AbC123  (logs)",
        &mut values
    ));
    assert_eq!(substitute("kill -9 4243", &values), "kill -9 999");
    assert_eq!(substitute("kill -9 42431", &values), "kill -9 42431");
    assert_eq!(
        substitute("cat /tmp/capkv-playground-Xy12ab/node-2.pid", &values),
        "cat /var/tmp/capkv-playground-AbC123/node-2.pid"
    );
    assert_eq!(
        substitute("cargo run --release -- playground", &values),
        "capkv playground"
    );
    assert_eq!(
        split_command("capkv server &   # one node"),
        ("capkv server".into(), true)
    );
    assert_eq!(split_command("a && b"), ("a && b".into(), false));
    let steps = parse_console_blocks("x\n```console\n$ a\nout\n$ b\n```\n```sh\n$ c\n```\n");
    assert_eq!(steps.len(), 2);
    assert_eq!(steps[0].expected, vec!["out".to_string()]);
}
