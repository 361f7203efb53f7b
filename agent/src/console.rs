//! Milestone lines on the console.
//!
//! Each milestone prints one machine-readable line on stdout (the ramdisk's console):
//! `SLIPWAY-EVENT <name> t=<seconds since boot> key=value...`, which the VM tests and the boot
//! benchmark read from the serial port. Names in use: init, modules, network, dhcp-retry,
//! retry (from `init`), enrolled, registered (from `session`), inspected, cleaned,
//! image-written, power-command (from `commands`), rebooting, kexec, powering-off (from
//! `run`).
//!
//! The bottom of the agent's run-time layers: it imports none of them.

/// Prints a milestone line to the console.
pub fn milestone(name: &str, fields: &str) {
    let uptime = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into());
    // Straight to stdout (the console), not through the log filter.
    println!("{}", line(name, &uptime, fields));
}

/// The text of a milestone line, without the newline.
pub fn line(name: &str, uptime: &str, fields: &str) -> String {
    format!(
        "SLIPWAY-EVENT {name} t={uptime}{}{fields}",
        if fields.is_empty() { "" } else { " " }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_have_the_shape_the_vm_tests_read() {
        assert_eq!(
            line("enrolled", "12.34", "host=worker-0"),
            "SLIPWAY-EVENT enrolled t=12.34 host=worker-0"
        );
        assert_eq!(line("retry", "?", ""), "SLIPWAY-EVENT retry t=?");
    }
}
