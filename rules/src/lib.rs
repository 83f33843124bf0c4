//! The gateway's edge rules (issue 18) as pure logic, one module per building block:
//!
//! * [`condition`] — `when = "abs(avg - 21.0) > 2"`: conditions on numbers;
//! * [`window`] — tumbling, hopping and sliding windows aligned to the clock, and the
//!   accumulator of a window's figures (avg, min, max, sum, count, first, last, stddev);
//! * [`threshold`] — alarms with hysteresis and a minimum duration or count;
//! * [`exception`] — report by exception (deadband, maximum interval);
//! * [`config`] — `[[rules]]` as written, checked into [`config::Rule`]s;
//! * [`engine`] — every reading through every rule, windows closed and silent groups
//!   found by [`engine::Engine::tick`], the derived events and the changed states.
//!
//! Nothing here reads a clock, a file or a socket: every time is passed in (milliseconds
//! since the epoch), every state is a plain value the caller keeps. That is what lets
//! the gateway commit a rule's state in the same transaction as the readings that
//! changed it, so a restart resumes exactly where the last commit left off.

pub mod condition;
pub mod config;
pub mod engine;
pub mod exception;
pub mod threshold;
pub mod window;

pub use config::{Rule, RuleConfig, RuleError};
pub use engine::{Derived, Engine, Outcome, Reading, RuleStats, StateChange};
