//! The text log line: `tracing-subscriber`'s own format, except that the audit record (one per
//! decision, `engine::audit`) is written straight into the line instead of through the generic event
//! and field formatters. The bytes are the same; only the work differs.
//!
//! Every decision writes an audit record, so its formatting is on the hot path. The generic formatter
//! pays for generality the audit record does not need: a `fmt::Arguments` with three parts and ANSI
//! painting per field, `str`'s `Debug` escaping char by char, level padding, span-scope lookups. Here
//! a field value that is printable ASCII without `"` or `\` (every value an audit record normally
//! holds: reason codes, GUIDs, hex hashes, names) is copied between quotes, which is exactly what its
//! `Debug` form is; anything else goes through `Debug` as before. Whenever the line would look any
//! different — ANSI colours (a terminal), a span in scope, another level or target — the generic
//! formatter writes it.

use std::fmt::{self, Write as _};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::fmt::format::{self, Format, FormatEvent, FormatFields, Full, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::registry::LookupSpan;

/// The target of the audit records.
pub const AUDIT_TARGET: &str = "s2s_authz::audit";

/// `tracing-subscriber`'s default text format (`Format<Full, T>`), with the audit record written
/// directly. `T` is the timer; the service uses the default, `UtcMicros`.
#[derive(Clone, Debug)]
pub struct TextFormat<T = UtcMicros> {
    generic: Format<Full, T>,
    timer: T,
}

impl Default for TextFormat<UtcMicros> {
    fn default() -> Self {
        TextFormat::with_timer(UtcMicros)
    }
}

/// The same timestamp as `tracing-subscriber`'s `SystemTime` (RFC 3339, UTC, microseconds:
/// `2026-12-03T12:29:01.123456Z`), with the date and time of day formatted once per second and
/// thread instead of on every line: `SystemTime` works out the calendar date for each line, about a
/// third of an audit line's formatting.
#[derive(Clone, Copy, Debug, Default)]
pub struct UtcMicros;

thread_local! {
    /// The second last formatted on this thread, and its `YYYY-MM-DDTHH:MM:SS`.
    static SECOND: std::cell::RefCell<(u64, String)> = const {
        std::cell::RefCell::new((u64::MAX, String::new()))
    };
}

impl FormatTime for UtcMicros {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        let Ok(now) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) else {
            // A clock before 1970: whatever `SystemTime` makes of it.
            return SystemTime.format_time(w);
        };
        write_utc_micros(w, now.as_secs(), now.subsec_micros())
    }
}

/// `secs` (since the Unix epoch) and `micros` as `UtcMicros` writes them.
fn write_utc_micros(w: &mut impl fmt::Write, secs: u64, micros: u32) -> fmt::Result {
    SECOND.with(|cell| {
        let mut cached = cell.borrow_mut();
        if cached.0 != secs {
            let date = i64::try_from(secs)
                .ok()
                .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
                .ok_or(fmt::Error)?;
            cached.1.clear();
            write!(
                cached.1,
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
                date.year(),
                u8::from(date.month()),
                date.day(),
                date.hour(),
                date.minute(),
                date.second()
            )?;
            cached.0 = secs;
        }
        w.write_str(&cached.1)?;
        write!(w, ".{micros:06}Z")
    })
}

impl<T: FormatTime + Clone> TextFormat<T> {
    pub fn with_timer(timer: T) -> Self {
        TextFormat {
            generic: format().with_timer(timer.clone()),
            timer,
        }
    }
}

fn format() -> Format<Full, SystemTime> {
    format::Format::default()
}

impl<S, N, T> FormatEvent<S, N> for TextFormat<T>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    T: FormatTime,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let direct = meta.target() == AUDIT_TARGET
            && *meta.level() == Level::INFO
            && !writer.has_ansi_escapes()
            && ctx.event_scope().is_none();
        if !direct {
            return self.generic.format_event(ctx, writer, event);
        }
        // What `Format<Full, _>` writes for an INFO event without spans, colours, thread names or
        // source locations: `{time} {level:>5} {target}: {fields}`.
        if self.timer.format_time(&mut writer).is_err() {
            writer.write_str("<unknown time>")?;
        }
        writer.write_str("  INFO ")?;
        writer.write_str(AUDIT_TARGET)?;
        writer.write_str(": ")?;
        let mut fields = AuditFields {
            writer: &mut writer,
            first: true,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        writer.write_char('\n')
    }
}

/// The fields as `DefaultFields` writes them: the message first as it is, then ` name=value` with
/// each value's `Debug` form, separated by one space.
struct AuditFields<'w, 'a> {
    writer: &'w mut Writer<'a>,
    first: bool,
    result: fmt::Result,
}

impl AuditFields<'_, '_> {
    fn name(&mut self, field: &Field) -> fmt::Result {
        if !std::mem::take(&mut self.first) {
            self.writer.write_char(' ')?;
        }
        match field.name() {
            "message" => Ok(()),
            name => {
                self.writer
                    .write_str(name.strip_prefix("r#").unwrap_or(name))?;
                self.writer.write_char('=')
            }
        }
    }
}

impl Visit for AuditFields<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.result.is_err() {
            return;
        }
        if field.name() == "message" {
            return self.record_debug(field, &format_args!("{value}"));
        }
        self.result = self.name(field).and_then(|()| {
            if is_plain(value) {
                self.writer.write_char('"')?;
                self.writer.write_str(value)?;
                self.writer.write_char('"')
            } else {
                write!(self.writer, "{value:?}")
            }
        });
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if self.result.is_err() {
            return;
        }
        self.result = self
            .name(field)
            .and_then(|()| write!(self.writer, "{value}"));
    }

    // `record_error` is left to `Visit`'s default (`Display`): the generic formatter also lists an
    // error's sources. The audit record holds strings and one integer, and nothing else is written
    // under its target.
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_err() {
            return;
        }
        if field.name() == "message" {
            let sanitize = self.writer.sanitizes_ansi_escapes();
            self.result = self.name(field).and_then(|()| {
                if sanitize {
                    write!(Sanitized(self.writer), "{value:?}")
                } else {
                    write!(self.writer, "{value:?}")
                }
            });
            return;
        }
        self.result = self
            .name(field)
            .and_then(|()| write!(self.writer, "{value:?}"));
    }
}

/// Whether `s`'s `Debug` form is `s` between double quotes: printable ASCII, no `"` and no `\`.
fn is_plain(s: &str) -> bool {
    s.bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
}

/// The message as `tracing-subscriber` writes it when it sanitizes ANSI escapes (its `EscapeGuard`):
/// the C0 controls that start terminal sequences, DEL and the C1 controls are written escaped.
struct Sanitized<'w, 'a>(&'w mut Writer<'a>);

impl fmt::Write for Sanitized<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if s.chars().all(|c| !needs_sanitizing(c)) {
            return self.0.write_str(s);
        }
        for c in s.chars() {
            match c {
                '\x1b' => self.0.write_str("\\x1b")?,
                '\x07' => self.0.write_str("\\x07")?,
                '\x08' => self.0.write_str("\\x08")?,
                '\x0c' => self.0.write_str("\\x0c")?,
                '\x7f' => self.0.write_str("\\x7f")?,
                c if needs_sanitizing(c) => write!(self.0, "\\u{{{:x}}}", c as u32)?,
                c => self.0.write_char(c)?,
            }
        }
        Ok(())
    }
}

fn needs_sanitizing(c: char) -> bool {
    matches!(
        c,
        '\x1b' | '\x07' | '\x08' | '\x0c' | '\x7f' | '\u{80}'..='\u{9f}'
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::layer::SubscriberExt as _;

    #[test]
    fn utc_micros_writes_rfc3339_with_microseconds() {
        let at = |secs, micros| {
            let mut s = String::new();
            write_utc_micros(&mut s, secs, micros).unwrap();
            s
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(at(1_764_765_000, 7), "2025-12-03T12:30:00.000007Z");
        // The same second again (cached), then the next one, then back: the cache follows the clock.
        assert_eq!(at(1_764_765_000, 999_999), "2025-12-03T12:30:00.999999Z");
        assert_eq!(at(1_764_765_001, 0), "2025-12-03T12:30:01.000000Z");
        assert_eq!(at(1_764_765_000, 1), "2025-12-03T12:30:00.000001Z");
        // A leap day and the end of a year.
        assert_eq!(at(1_709_164_799, 5), "2024-02-28T23:59:59.000005Z");
        assert_eq!(at(1_709_251_199, 5), "2024-02-29T23:59:59.000005Z");
        assert_eq!(at(1_767_225_599, 123_456), "2025-12-31T23:59:59.123456Z");
    }

    #[test]
    fn utc_micros_agrees_with_tracing_subscribers_system_time() {
        // Both read the clock, so compare all but the sub-second digits, retrying across a second
        // boundary.
        let line = |timer: &dyn FormatTime| {
            let mut s = String::new();
            timer.format_time(&mut Writer::new(&mut s)).unwrap();
            s
        };
        let same = (0..5).any(|_| {
            let (ours, theirs) = (line(&UtcMicros), line(&SystemTime));
            assert_eq!(ours.len(), theirs.len(), "{ours} vs {theirs}");
            ours[..20] == theirs[..20] && ours.ends_with('Z')
        });
        assert!(same);
    }

    /// A fixed clock, so that two formatters' lines can be compared byte for byte.
    #[derive(Clone)]
    struct Fixed;

    impl FormatTime for Fixed {
        fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
            w.write_str("2026-12-02T10:00:00.123456Z")
        }
    }

    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The lines `emit` logs through the generic text format and through `TextFormat`.
    fn both(ansi: bool, emit: impl Fn()) -> (String, String) {
        let generic = Lines::default();
        let direct = Lines::default();
        let sink = generic.clone();
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .event_format(format().with_timer(Fixed))
                .with_ansi(ansi)
                .with_writer(move || sink.clone()),
        );
        tracing::subscriber::with_default(subscriber, &emit);
        let sink = direct.clone();
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .event_format(TextFormat::with_timer(Fixed))
                .with_ansi(ansi)
                .with_writer(move || sink.clone()),
        );
        tracing::subscriber::with_default(subscriber, &emit);
        let text = |l: Lines| String::from_utf8(l.0.lock().unwrap().clone()).unwrap();
        (text(generic), text(direct))
    }

    fn audit(values: &[String; 11], latency_us: u64) {
        tracing::info!(
            target: AUDIT_TARGET,
            api = values[0].as_str(),
            decision = values[1].as_str(),
            reason = values[2].as_str(),
            token_hash = values[3].as_str(),
            tenant = values[4].as_str(),
            client_app_id = values[5].as_str(),
            application_user = values[6].as_str(),
            application_user_id = values[7].as_str(),
            role = values[8].as_str(),
            effective_user = values[9].as_str(),
            latency_us,
            detail = values[10].as_str(),
            "decision"
        );
    }

    fn typical() -> [String; 11] {
        [
            "ext_authz",
            "deny",
            "ROLE_MISSING",
            "a70637dd0dcbd51d",
            "3f6b2a1e-8c4d-4e5f-9a7b-1c2d3e4f5a6b",
            "8b9c0d1e-2f30-4a41-b5c6-d7e8f9a0b1c2",
            "",
            "",
            "",
            "",
            "token lacks app role `S2SAppRole`",
        ]
        .map(str::to_owned)
    }

    #[test]
    fn the_audit_line_is_the_generic_line() {
        let (generic, direct) = both(false, || audit(&typical(), 450));
        assert_eq!(direct, generic);
        assert_eq!(
            direct,
            "2026-12-02T10:00:00.123456Z  INFO s2s_authz::audit: decision api=\"ext_authz\" \
             decision=\"deny\" reason=\"ROLE_MISSING\" token_hash=\"a70637dd0dcbd51d\" \
             tenant=\"3f6b2a1e-8c4d-4e5f-9a7b-1c2d3e4f5a6b\" \
             client_app_id=\"8b9c0d1e-2f30-4a41-b5c6-d7e8f9a0b1c2\" application_user=\"\" \
             application_user_id=\"\" role=\"\" effective_user=\"\" latency_us=450 \
             detail=\"token lacks app role `S2SAppRole`\"\n"
        );
    }

    #[test]
    fn other_lines_spans_and_colours_are_the_generic_formatter_s() {
        // In a span, with colours, at another level or target: the generic formatter writes them.
        let (generic, direct) = both(false, || {
            let _span = tracing::info_span!("decision", api = "native").entered();
            audit(&typical(), 1);
        });
        assert_eq!(direct, generic);
        assert!(
            direct.contains("decision{api=\"native\"}: s2s_authz::audit"),
            "{direct}"
        );
        let (generic, direct) = both(true, || audit(&typical(), 1));
        assert_eq!(direct, generic);
        assert!(direct.contains('\x1b'), "{direct}");
        let (generic, direct) = both(false, || {
            tracing::warn!(target: AUDIT_TARGET, api = "x\"y", "decision");
            // A message that needs sanitizing, on the direct path.
            tracing::info!(target: AUDIT_TARGET, r#type = "t", "dec\x1b[31mision\u{9b}");
            tracing::info!(reason = "other target", n = 3_i64, "a message");
        });
        assert_eq!(direct, generic);
    }

    proptest! {
        #[test]
        fn any_field_values_come_out_as_the_generic_formatter_writes_them(
            values in proptest::array::uniform11(prop_oneof![
                "[ -~]{0,40}",
                any::<String>(),
                "[\"\\\\\\x00-\\x1f\\x7f\\u{80}-\\u{9f}\\u{300}é✓]{0,8}",
            ]),
            latency_us in any::<u64>(),
        ) {
            let (generic, direct) = both(false, || audit(&values, latency_us));
            prop_assert_eq!(direct, generic);
        }
    }
}
