//! The Windows Event Log (Application log), for what an administrator must see without
//! opening log files: the service starting and stopping, warnings and errors.
//!
//! Events are written with `ReportEventW` under a source named after the service. `service
//! install` registers that source with .NET's `EventLogMessages.dll` as its message file (every
//! event id there is the message "%1"), so Event Viewer shows our text as is; without the
//! registration the text still arrives, behind a "description ... cannot be found" preamble.
//! Event ids: 1 information, 2 warning, 3 error.

// The Win32 calls below need `unsafe`; each states why it is sound.
#![allow(unsafe_code)]

use std::fmt::Write as _;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;
use windows_sys::Win32::System::EventLog::{
    DeregisterEventSource, EVENTLOG_ERROR_TYPE, EVENTLOG_INFORMATION_TYPE, EVENTLOG_WARNING_TYPE,
    REPORT_EVENT_TYPE, RegisterEventSourceW, ReportEventW,
};

/// The registry key of an Application log source (for `reg.exe`, at install and uninstall).
pub fn source_key(name: &str) -> String {
    format!(r"HKLM\SYSTEM\CurrentControlSet\Services\EventLog\Application\{name}")
}

/// The message file that renders "%1" for every event id (shipped with .NET Framework 4, which
/// Windows Server 2016 and later include).
pub const MESSAGE_FILE: &str =
    r"%SystemRoot%\Microsoft.NET\Framework64\v4.0.30319\EventLogMessages.dll";

#[derive(Debug, Clone, Copy)]
pub enum Kind {
    Info,
    Warning,
    Error,
}

/// A registered event source. The handle is kept as an integer: it is only ever passed back to
/// the Event Log API, which is thread-safe.
pub struct EventLog {
    handle: isize,
}

impl EventLog {
    /// Opens the source `name` on this machine. Fails only if the Event Log service refuses.
    pub fn open(name: &str) -> std::io::Result<EventLog> {
        let wide = to_wide(name);
        // SAFETY: `wide` is a NUL-terminated UTF-16 string that outlives the call; a null
        // server name means the local machine.
        let h = unsafe { RegisterEventSourceW(std::ptr::null(), wide.as_ptr()) };
        if h.is_null() {
            return Err(std::io::Error::last_os_error());
        }
        Ok(EventLog { handle: h as isize })
    }

    /// Writes one event. Failures are ignored: logging must never take the service down.
    pub fn report(&self, kind: Kind, text: &str) {
        let (ty, id): (REPORT_EVENT_TYPE, u32) = match kind {
            Kind::Info => (EVENTLOG_INFORMATION_TYPE, 1),
            Kind::Warning => (EVENTLOG_WARNING_TYPE, 2),
            Kind::Error => (EVENTLOG_ERROR_TYPE, 3),
        };
        // An event's strings are limited to 31,839 characters; keep well below.
        let text: String = text.chars().take(8000).collect();
        let wide = to_wide(&text);
        let strings = [wide.as_ptr()];
        // SAFETY: the handle came from RegisterEventSourceW and is open until drop; `strings`
        // holds one valid NUL-terminated UTF-16 pointer that outlives the call; no SID and no
        // raw data (null pointers with size 0).
        unsafe {
            ReportEventW(
                self.handle as _,
                ty,
                0,
                id,
                std::ptr::null_mut(),
                1,
                0,
                strings.as_ptr(),
                std::ptr::null(),
            );
        }
    }
}

impl Drop for EventLog {
    fn drop(&mut self) {
        // SAFETY: the handle is valid and not used after this.
        unsafe {
            DeregisterEventSource(self.handle as _);
        }
    }
}

fn to_wide(s: &str) -> Vec<u16> {
    s.encode_utf16()
        .map(|c| if c == 0 { u16::from(b' ') } else { c })
        .chain(std::iter::once(0))
        .collect()
}

/// A tracing layer that copies warnings and errors to the Event Log.
pub struct EventLogLayer {
    pub log: std::sync::Arc<EventLog>,
}

impl<S: Subscriber> tracing_subscriber::Layer<S> for EventLogLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let kind = match *event.metadata().level() {
            Level::ERROR => Kind::Error,
            Level::WARN => Kind::Warning,
            _ => return,
        };
        let mut v = Text::default();
        event.record(&mut v);
        self.log.report(kind, &v.0);
    }
}

/// `message key=value ...`, like the text log.
#[derive(Default)]
struct Text(String);

impl Visit for Text {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let rest = std::mem::take(&mut self.0);
            self.0 = format!("{value:?}{rest}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            let rest = std::mem::take(&mut self.0);
            self.0 = format!("{value}{rest}");
        } else {
            let _ = write!(self.0, " {}={value}", field.name());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Under Wine and on Windows alike the Event Log API accepts a source and an event; this
    /// exercises the FFI (string encoding, handle round trip) without asserting on the log,
    /// which a test cannot read back portably.
    #[test]
    fn reports_through_the_real_api() {
        let log = EventLog::open("OutriggerTest").expect("RegisterEventSourceW");
        log.report(Kind::Info, "outrigger unit test: information");
        log.report(Kind::Error, "outrigger unit test: error with a \0 NUL");
    }

    #[test]
    fn formats_fields_like_the_text_log() {
        use tracing_subscriber::layer::SubscriberExt;
        #[derive(Clone, Default)]
        struct Capture(std::sync::Arc<std::sync::Mutex<Vec<String>>>);
        impl<S: Subscriber> tracing_subscriber::Layer<S> for Capture {
            fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
                let mut v = Text::default();
                event.record(&mut v);
                self.0.lock().unwrap().push(v.0);
            }
        }
        let cap = Capture::default();
        let sub = tracing_subscriber::registry().with(cap.clone());
        tracing::subscriber::with_default(sub, || {
            tracing::warn!(listener = "web", port = 8080, "backend unreachable");
        });
        assert_eq!(
            cap.0.lock().unwrap().as_slice(),
            ["backend unreachable listener=web port=8080"]
        );
    }

    #[test]
    fn names_the_registry_key_of_the_source() {
        assert_eq!(
            source_key("Outrigger"),
            r"HKLM\SYSTEM\CurrentControlSet\Services\EventLog\Application\Outrigger"
        );
    }
}
