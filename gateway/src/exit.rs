//! The binary's exit codes besides 0 and 1, shared by its commands ([`crate::cli`],
//! [`crate::dead_letter_cli`]). Scripts, systemd units and docs/operations.md rely on them.

/// A configuration that cannot be used (EX_CONFIG would be 78; 64 is EX_USAGE, which is
/// what systemd units and scripts here check for).
pub(crate) const BAD_CONFIG: u8 = 64;

/// `status`: the gateway is not running, as for LSB init scripts' `status` action.
pub(crate) const NOT_RUNNING: u8 = 3;

/// `status`: the gateway's state cannot be told (LSB's "unknown").
pub(crate) const STATE_UNKNOWN: u8 = 4;
