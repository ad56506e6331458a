//! The log sink: every thread appends its formatted line to one shared buffer, and a thread of its own
//! writes that buffer to stderr in blocks.
//!
//! Why not a channel with a writer thread (tracing-appender's non-blocking writer): with one line per
//! decision, its writer thread drains the channel, flushes and parks between two lines, so every line
//! costs a wake-up of that thread and a `write(2)` — at saturation a few microseconds per decision, the
//! largest item of a token-cache hit. Here a line costs a short critical section and a copy; the writer
//! thread wakes on a timer (every [`FLUSH_EVERY`]) or when [`FLUSH_AT`] bytes are waiting, and writes
//! all of them at once. Nothing is dropped: past [`MAX_PENDING`] bytes a logging thread waits for the
//! writer (stderr that cannot keep up slows the service rather than losing its audit trail).
//!
//! A line reaches stderr at most [`FLUSH_EVERY`] after it was logged; on exit [`LogGuard`] writes what
//! is left. What a SIGKILL interrupts in the last [`FLUSH_EVERY`] is lost, as with any user-space buffer.

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long a line may wait in the buffer.
pub const FLUSH_EVERY: Duration = Duration::from_millis(20);
/// The writer thread is woken early when this much is waiting.
pub const FLUSH_AT: usize = 64 * 1024;
/// Logging threads wait for the writer beyond this much.
pub const MAX_PENDING: usize = 8 * 1024 * 1024;

#[derive(Default)]
struct State {
    pending: Vec<u8>,
    closed: bool,
}

struct Shared {
    state: Mutex<State>,
    /// The writer thread waits on it: signalled at [`FLUSH_AT`] and at close.
    wake: Condvar,
    /// Logging threads past [`MAX_PENDING`] wait on it: signalled after every block written.
    room: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A thread that panicked while holding the lock left a valid byte buffer: keep logging.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A `MakeWriter` for the fmt layer: appends each line to the shared buffer, or writes it to stderr
/// directly when the writer thread could not be started or has stopped.
#[derive(Clone)]
pub struct BlockWriter {
    shared: Option<Arc<Shared>>,
}

/// Keep it until the process ends: dropping it writes what is left and stops the writer thread.
pub struct LogGuard {
    shared: Option<Arc<Shared>>,
    thread: Option<JoinHandle<()>>,
}

/// A block writer to stderr, and the guard that flushes it at exit.
pub fn stderr() -> (BlockWriter, LogGuard) {
    spawn(io::stderr)
}

/// A block writer to the sink `open` makes on the writer thread.
pub fn spawn<W, F>(open: F) -> (BlockWriter, LogGuard)
where
    W: Write,
    F: FnOnce() -> W + Send + 'static,
{
    let shared = Arc::new(Shared {
        state: Mutex::new(State::default()),
        wake: Condvar::new(),
        room: Condvar::new(),
    });
    let worker = shared.clone();
    match std::thread::Builder::new()
        .name("s2s-authz-log".to_owned())
        .spawn(move || write_blocks(&worker, open()))
    {
        Ok(thread) => (
            BlockWriter {
                shared: Some(shared.clone()),
            },
            LogGuard {
                shared: Some(shared),
                thread: Some(thread),
            },
        ),
        Err(_) => (
            BlockWriter { shared: None },
            LogGuard {
                shared: None,
                thread: None,
            },
        ),
    }
}

/// The writer thread: takes what is pending every [`FLUSH_EVERY`] (or sooner when woken) and writes it
/// outside the lock, until closed and empty.
fn write_blocks(shared: &Shared, mut sink: impl Write) {
    let mut block = Vec::with_capacity(FLUSH_AT);
    loop {
        let closed = {
            let mut state = shared.lock();
            if state.pending.len() < FLUSH_AT && !state.closed {
                state = shared
                    .wake
                    .wait_timeout(state, FLUSH_EVERY)
                    .map_or_else(|e| e.into_inner().0, |(s, _)| s);
            }
            std::mem::swap(&mut state.pending, &mut block);
            state.closed
        };
        if !block.is_empty() {
            // Nowhere to report a failing stderr; the lines are dropped rather than retried forever.
            let _ = sink.write_all(&block).and_then(|()| sink.flush());
            block.clear();
            shared.room.notify_all();
        }
        if closed && shared.lock().pending.is_empty() {
            return;
        }
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        if let Some(shared) = &self.shared {
            shared.lock().closed = true;
            shared.wake.notify_one();
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One line's writer, as the fmt layer asks for it.
pub struct LineWriter<'a> {
    shared: Option<&'a Shared>,
}

impl Write for LineWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let Some(shared) = self.shared else {
            return io::stderr().write(bytes);
        };
        let mut state = shared.lock();
        while state.pending.len() >= MAX_PENDING && !state.closed {
            shared.wake.notify_one();
            state = shared.room.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        if state.closed {
            drop(state);
            return io::stderr().write(bytes);
        }
        let before = state.pending.len();
        state.pending.extend_from_slice(bytes);
        let crossed = before < FLUSH_AT && state.pending.len() >= FLUSH_AT;
        drop(state);
        if crossed {
            shared.wake.notify_one();
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for BlockWriter {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter {
            shared: self.shared.as_deref(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::fmt::MakeWriter as _;

    /// What was written, and in how many `write` calls.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<(Vec<u8>, usize)>>);

    impl Sink {
        fn spawn(&self) -> (BlockWriter, LogGuard) {
            let sink = self.clone();
            spawn(move || sink)
        }
    }

    impl Write for Sink {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            let mut sink = self.0.lock().unwrap();
            sink.0.extend_from_slice(bytes);
            sink.1 += 1;
            Ok(bytes.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_line_of_every_thread_is_written_whole_and_in_blocks() {
        let sink = Sink::default();
        let (writer, guard) = sink.spawn();
        std::thread::scope(|s| {
            for t in 0..4 {
                let writer = writer.clone();
                s.spawn(move || {
                    for i in 0..5_000 {
                        let line = format!("thread {t} line {i}\n");
                        writer.make_writer().write_all(line.as_bytes()).unwrap();
                    }
                });
            }
        });
        drop(guard);
        let (bytes, writes) = sink.0.lock().unwrap().clone();
        let text = String::from_utf8(bytes).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 20_000);
        for t in 0..4 {
            let mine: Vec<&str> = lines
                .iter()
                .copied()
                .filter(|l| l.starts_with(&format!("thread {t} ")))
                .collect();
            let expected: Vec<String> =
                (0..5_000).map(|i| format!("thread {t} line {i}")).collect();
            assert_eq!(mine, expected, "thread {t}: every line, whole, in order");
        }
        assert!(writes < 20_000 / 10, "{writes} writes for 20,000 lines");
    }

    #[test]
    fn a_line_is_written_without_more_lines_or_an_exit() {
        let sink = Sink::default();
        let (writer, _guard) = sink.spawn();
        writer.make_writer().write_all(b"alone\n").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while sink.0.lock().unwrap().0.is_empty() {
            assert!(std::time::Instant::now() < deadline, "never written");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(sink.0.lock().unwrap().0, b"alone\n");
    }
}
