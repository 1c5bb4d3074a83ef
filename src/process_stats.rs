//! The process's own memory figures, for benchmark reports (`replay`'s summary, the examples).
//!
//! Reads `/proc/self/status` (Linux); elsewhere the figures are `None`. An edge: never used by
//! the core.

/// Current resident set size, in bytes (`VmRSS`).
pub fn resident_bytes() -> Option<u64> {
    status_bytes("VmRSS:")
}

/// Peak resident set size since the process started, in bytes (`VmHWM`).
pub fn peak_resident_bytes() -> Option<u64> {
    status_bytes("VmHWM:")
}

fn status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with(field))?;
    let kilobytes: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kilobytes * 1024)
}
