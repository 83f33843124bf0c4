//! Facts about the machine the gateway runs on that sysinfo does not give precisely:
//! free space of the filesystem holding a path, and the SoC temperature.

use std::path::Path;

/// Space on the filesystem that holds a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DiskSpace {
    pub(crate) total_bytes: u64,
    /// Available to the gateway (an unprivileged user): what `df` shows as "Avail".
    pub(crate) free_bytes: u64,
}

/// Space on the filesystem holding `path` (`statvfs(3)`), so a bind mount or a separate
/// partition for the data directory is measured, not the root filesystem.
pub(crate) fn disk_space(path: &Path) -> std::io::Result<DiskSpace> {
    let space = pigeon_shared::sys::fs_space(path)?;
    Ok(DiskSpace {
        total_bytes: space.total_bytes,
        free_bytes: space.available_bytes,
    })
}

/// The SoC (CPU) temperature in °C, if the board reports one: the thermal zone named
/// like the CPU (`cpu-thermal` on a Raspberry Pi, `x86_pkg_temp`, `soc_thermal`, …), or
/// else the first zone that reads, under `/sys/class/thermal`.
pub(crate) fn soc_temperature() -> Option<f64> {
    soc_temperature_in(Path::new("/sys/class/thermal"))
}

fn soc_temperature_in(root: &Path) -> Option<f64> {
    let mut zones: Vec<_> = std::fs::read_dir(root)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("thermal_zone"))
        })
        .collect();
    // thermal_zone2 before thermal_zone10.
    zones.sort_by_key(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.trim_start_matches("thermal_zone").parse::<u32>().ok())
            .unwrap_or(u32::MAX)
    });
    let read = |zone: &Path| -> Option<f64> {
        let raw = std::fs::read_to_string(zone.join("temp")).ok()?;
        let milli: i64 = raw.trim().parse().ok()?;
        // Below absolute zero or above 200 °C is a sensor that is not there.
        let c = milli as f64 / 1000.0;
        (-273.0..=200.0).contains(&c).then_some(c)
    };
    let is_cpu = |zone: &Path| {
        std::fs::read_to_string(zone.join("type")).is_ok_and(|t| {
            let t = t.trim().to_ascii_lowercase();
            ["cpu", "soc", "x86_pkg_temp"].iter().any(|k| t.contains(k))
        })
    };
    zones
        .iter()
        .filter(|z| is_cpu(z))
        .find_map(|z| read(z))
        .or_else(|| zones.iter().find_map(|z| read(z)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zone(root: &Path, n: u32, kind: &str, temp: &str) {
        let z = root.join(format!("thermal_zone{n}"));
        std::fs::create_dir_all(&z).unwrap();
        std::fs::write(z.join("type"), format!("{kind}\n")).unwrap();
        std::fs::write(z.join("temp"), format!("{temp}\n")).unwrap();
    }

    #[test]
    fn the_cpu_zone_wins_and_millidegrees_become_degrees() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(soc_temperature_in(&d.path().join("absent")), None);
        assert_eq!(soc_temperature_in(d.path()), None);
        zone(d.path(), 0, "acpitz", "27800");
        assert_eq!(soc_temperature_in(d.path()), Some(27.8));
        zone(d.path(), 10, "cpu-thermal", "48312");
        assert_eq!(soc_temperature_in(d.path()), Some(48.312));
    }

    #[test]
    fn unreadable_or_absurd_zones_are_skipped() {
        let d = tempfile::tempdir().unwrap();
        zone(d.path(), 0, "cpu-thermal", "n/a");
        zone(d.path(), 1, "soc_thermal", "-274000");
        zone(d.path(), 2, "board", "35000");
        assert_eq!(soc_temperature_in(d.path()), Some(35.0));
    }

    #[test]
    fn disk_space_of_a_real_directory() {
        let d = tempfile::tempdir().unwrap();
        let s = disk_space(d.path()).unwrap();
        assert!(s.total_bytes > 0 && s.free_bytes <= s.total_bytes, "{s:?}");
        assert!(disk_space(&d.path().join("missing")).is_err());
    }
}
