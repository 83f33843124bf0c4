//! Camera drop directories: every finished upload becomes a file in the spool and a
//! record in the outbox, then an object and an event at the relay.
//!
//! * [`patterns`] — file-name patterns and subject templates (pure), which [`config`]
//!   checks and [`rules`] applies;
//! * [`config`] — `[files]` and `[[files.watch]]`;
//! * [`rules`] — ignore patterns, subject template, content and event types (pure);
//! * [`tracker`] — when a file counts as finished (pure);
//! * the spool itself (taking a finished file in crash-safely, letting it go once
//!   delivered) is [`crate::spool`], which the uplink's file lane uses too;
//! * [`source`] — the running task: watchers, scans, the tracker and pickups.

mod config;
mod patterns;
pub(crate) mod rules;
mod source;
pub(crate) mod tracker;

pub(crate) use config::FilesConfig;
pub(crate) use source::FilesSource;
