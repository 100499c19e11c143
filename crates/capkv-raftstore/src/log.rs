//! raft-rs logs through `slog`; [`TracingDrain`] hands its records to `tracing` under the
//! target `raft` (its info records at debug, its debug records at trace), so
//! `RUST_LOG=raft=debug` (`CAPKV_SERVER_LOG` for servers that tests start) shows elections
//! and refusals. Records are formatted only when that level is enabled.

use std::fmt::{self, Write as _};

/// The `slog` drain the driver gives raft-rs.
pub struct TracingDrain;

struct KvText(String);

impl slog::Serializer for KvText {
    fn emit_arguments(&mut self, key: slog::Key, val: &fmt::Arguments) -> slog::Result {
        let _ = write!(self.0, " {key}={val}");
        Ok(())
    }
}

impl slog::Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &slog::Record, values: &slog::OwnedKVList) -> Result<(), slog::Never> {
        let level = match record.level() {
            slog::Level::Critical | slog::Level::Error => tracing::Level::ERROR,
            slog::Level::Warning => tracing::Level::WARN,
            slog::Level::Info => tracing::Level::DEBUG,
            slog::Level::Debug | slog::Level::Trace => tracing::Level::TRACE,
        };
        let enabled = match level {
            tracing::Level::ERROR => tracing::enabled!(target: "raft", tracing::Level::ERROR),
            tracing::Level::WARN => tracing::enabled!(target: "raft", tracing::Level::WARN),
            tracing::Level::DEBUG => tracing::enabled!(target: "raft", tracing::Level::DEBUG),
            _ => tracing::enabled!(target: "raft", tracing::Level::TRACE),
        };
        if !enabled {
            return Ok(());
        }
        let mut kv = KvText(String::new());
        let _ = slog::KV::serialize(&record.kv(), record, &mut kv);
        let _ = slog::KV::serialize(values, record, &mut kv);
        let msg = record.msg();
        match level {
            tracing::Level::ERROR => tracing::error!(target: "raft", "{msg}{}", kv.0),
            tracing::Level::WARN => tracing::warn!(target: "raft", "{msg}{}", kv.0),
            tracing::Level::DEBUG => tracing::debug!(target: "raft", "{msg}{}", kv.0),
            _ => tracing::trace!(target: "raft", "{msg}{}", kv.0),
        }
        Ok(())
    }
}
