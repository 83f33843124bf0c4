//! `[files]` and its `[[files.watch]]` blocks: the drop directories cameras upload into.

use std::path::{Path, PathBuf};

use pigeon_shared::units::Duration;
use serde::Deserialize;

use super::patterns::{Glob, SubjectTemplate};
use crate::outbox::{Policy, WhenFull};

/// The `[files]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FilesConfig {
    /// Where picked-up files wait for their upload. Default: `<gateway.data_dir>/spool`.
    /// On the same filesystem as the drop directories a file is moved (renamed), not
    /// copied, which costs no writes on the SD card.
    pub(crate) spool_dir: Option<PathBuf>,
    /// How long a file must stay unchanged (size and modification time) to count as
    /// finished when no close-after-write tells: files found at start, `finished =
    /// "quiet"` watches, polled watches.
    #[serde(default = "default_quiet_period")]
    pub(crate) quiet_period: Duration,
    /// File names never picked up: temporary upload names. `*` and `?` wildcards,
    /// matched against the file name only.
    #[serde(default = "default_ignore")]
    pub(crate) ignore: Vec<String>,
    /// Every watch is scanned again this often, in case the kernel's event queue
    /// overflowed or a directory appeared while nobody looked.
    #[serde(default = "default_rescan_interval")]
    pub(crate) rescan_interval: Duration,
    #[serde(default)]
    pub(crate) watch: Vec<WatchConfig>,
}

/// The watch name of spool files the outbox did not know (after a damaged outbox was
/// replaced): they are sent under `/gateways/<id>/files/recovered`.
pub(crate) const RECOVERED_WATCH: &str = "recovered";

/// One `[[files.watch]]` block: a drop directory and how its files become events.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WatchConfig {
    /// Names the watch in the event source (`/gateways/<id>/files/<name>`), in metrics
    /// and logs: 1 to 64 characters from `A-Z a-z 0-9 . _ -`.
    pub(crate) name: String,
    pub(crate) path: PathBuf,
    /// Also watch every directory below `path` (a folder per camera, per day…).
    #[serde(default = "crate::config::default_true")]
    pub(crate) recursive: bool,
    #[serde(default)]
    pub(crate) finished: Finished,
    /// Poll the directory instead of using inotify: for network filesystems (NFS, SMB),
    /// where the kernel does not see other machines' writes. Implies the quiet period.
    #[serde(default)]
    pub(crate) poll: bool,
    #[serde(default = "default_poll_interval")]
    pub(crate) poll_interval: Duration,
    /// The event `subject`: `{top}` (the first directory below `path`, usually the
    /// camera, or the watch name for files directly in `path`), `{dir}`, `{path}`,
    /// `{name}`, `{watch}`, and any literal text.
    #[serde(default = "default_subject")]
    pub(crate) subject: String,
    /// The event `type` when no rule matches.
    #[serde(rename = "type", default = "default_type")]
    pub(crate) event_type: String,
    /// What happens to a file once the relay has it.
    #[serde(default)]
    pub(crate) after_upload: AfterUpload,
    /// Where `after_upload = "move"` puts delivered files (keeping their path below
    /// `path`).
    pub(crate) move_to: Option<PathBuf>,
    /// More names to ignore in this watch, besides `files.ignore`.
    #[serde(default)]
    pub(crate) ignore: Vec<String>,
    /// 0 (least) to 9 (most important): higher uploads first and is dropped last. Camera
    /// files default to 2, below readings (5).
    #[serde(default = "default_priority")]
    pub(crate) priority: u8,
    /// What a full outbox does: `"drop_oldest"` (drop the oldest files and records of
    /// this priority or lower to make room) or `"refuse"` (files stay in the drop
    /// directory until there is room). Either way a file is never dropped before it
    /// reached the spool.
    #[serde(default)]
    pub(crate) when_full: WhenFull,
    /// Rules that pick the event type (and content type) of a file, first match wins.
    /// After them, the default rules apply ([`default_rules`]: images are
    /// `io.pigeon.camera.image`, videos `io.pigeon.camera.video`); a rule for
    /// `content_types = ["*/*"]` turns those off.
    #[serde(default)]
    pub(crate) rules: Vec<RuleConfig>,
}

/// When a file counts as finished.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Finished {
    /// When its writer closes it after writing (inotify close-write), or when it is
    /// renamed into its final name; the quiet period for files no writer was seen on.
    #[default]
    Close,
    /// Only after the quiet period without change: for writers that close and reopen a
    /// file while uploading it.
    Quiet,
}

/// What happens to a file in the drop directory once the relay has stored it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum AfterUpload {
    /// Deleted (it was moved into the spool at pickup, so the drop directory is free at
    /// once).
    #[default]
    Delete,
    /// Moved to `move_to`.
    Move,
    /// Left where the camera put it. The gateway copies it into the spool (a camera may
    /// write the same name again) and remembers it so that it is not sent again.
    Keep,
}

/// A `[[files.watch.rules]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RuleConfig {
    /// File name extensions this rule applies to, without the dot, any case.
    #[serde(default)]
    pub(crate) extensions: Vec<String>,
    /// Content types this rule applies to, e.g. `"image/*"` or `"video/mp4"` (the
    /// content type from the extension, or from the first bytes when the extension
    /// does not tell).
    #[serde(default)]
    pub(crate) content_types: Vec<String>,
    #[serde(rename = "type")]
    pub(crate) event_type: String,
    /// Overrides the content type the file is described with.
    pub(crate) content_type: Option<String>,
}

fn default_priority() -> u8 {
    2
}
fn default_quiet_period() -> Duration {
    Duration::from_secs(30)
}
fn default_rescan_interval() -> Duration {
    Duration::from_secs(600)
}
fn default_poll_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_subject() -> String {
    "{top}".into()
}
fn default_type() -> String {
    "io.pigeon.file".into()
}
/// Temporary names of the usual FTP servers and clients: pure-ftpd's
/// `.pureftpd-upload.*` (and every hidden file), `*.part`, `*.tmp`, …
pub(crate) fn default_ignore() -> Vec<String> {
    [
        ".*",
        "*.part",
        "*.partial",
        "*.tmp",
        "*.temp",
        "*.filepart",
        "*.crdownload",
    ]
    .map(String::from)
    .to_vec()
}
/// The rules every watch ends with: images and videos by content type.
pub(crate) fn default_rules() -> Vec<RuleConfig> {
    let rule = |family: &str, ty: &str| RuleConfig {
        extensions: Vec::new(),
        content_types: vec![format!("{family}/*")],
        event_type: ty.into(),
        content_type: None,
    };
    vec![
        rule("image", "io.pigeon.camera.image"),
        rule("video", "io.pigeon.camera.video"),
    ]
}

/// A bad value, with the key it is under.
type Invalid = (&'static str, String);

/// Watch names are used in event sources, object keys and metric labels.
pub(crate) fn valid_watch_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl FilesConfig {
    /// Checks what the types alone cannot, naming the key at fault.
    pub(crate) fn validate(&self) -> Result<(), Invalid> {
        if self.watch.is_empty() {
            return Err((
                "files.watch",
                "is empty: add at least one [[files.watch]] block, or remove [files]".into(),
            ));
        }
        if self.quiet_period.get() < std::time::Duration::from_millis(100) {
            return Err(("files.quiet_period", "must be at least 100ms".into()));
        }
        if self.rescan_interval.get() < std::time::Duration::from_secs(1) {
            return Err(("files.rescan_interval", "must be at least 1s".into()));
        }
        for p in &self.ignore {
            Glob::new(p).map_err(|e| ("files.ignore", e))?;
        }
        let mut names = std::collections::HashSet::new();
        for w in &self.watch {
            w.validate()?;
            if !names.insert(w.name.as_str()) {
                return Err((
                    "files.watch.name",
                    format!("{:?} is used by more than one watch", w.name),
                ));
            }
        }
        for (i, a) in self.watch.iter().enumerate() {
            for b in &self.watch[i + 1..] {
                if a.path.starts_with(&b.path) || b.path.starts_with(&a.path) {
                    return Err((
                        "files.watch.path",
                        format!(
                            "{} ({}) and {} ({}) overlap: a file would belong to both",
                            a.path.display(),
                            a.name,
                            b.path.display(),
                            b.name
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The spool directory for a gateway whose data lives in `data_dir`.
    pub(crate) fn spool_dir(&self, data_dir: &Path) -> PathBuf {
        self.spool_dir
            .clone()
            .unwrap_or_else(|| data_dir.join("spool"))
    }
}

impl WatchConfig {
    /// How its files are treated under pressure.
    pub(crate) fn policy(&self) -> Policy {
        Policy {
            priority: self.priority,
            when_full: self.when_full,
        }
    }

    fn validate(&self) -> Result<(), Invalid> {
        if self.priority > 9 {
            return Err((
                "files.watch.priority",
                format!(
                    "{} (watch {:?}): use 0 (least) to 9 (most important)",
                    self.priority, self.name
                ),
            ));
        }
        if self.name == RECOVERED_WATCH {
            return Err((
                "files.watch.name",
                format!(
                    "{:?} is the name the gateway gives files it recovers from its spool; choose another",
                    self.name
                ),
            ));
        }
        if !valid_watch_name(&self.name) {
            return Err((
                "files.watch.name",
                format!(
                    "{:?}: use 1 to 64 characters from A-Z a-z 0-9 . _ -, not starting with '.'",
                    self.name
                ),
            ));
        }
        let named = |m: String| format!("{m} (watch {:?})", self.name);
        if !self.path.is_absolute() {
            return Err((
                "files.watch.path",
                named(format!("{} must be an absolute path", self.path.display())),
            ));
        }
        if self.poll_interval.get() < std::time::Duration::from_millis(100) {
            return Err((
                "files.watch.poll_interval",
                named("must be at least 100ms".into()),
            ));
        }
        SubjectTemplate::parse(&self.subject).map_err(|e| ("files.watch.subject", named(e)))?;
        if self.event_type.trim().is_empty() {
            return Err(("files.watch.type", named("is empty".into())));
        }
        match (self.after_upload, &self.move_to) {
            (AfterUpload::Move, None) => {
                return Err((
                    "files.watch.move_to",
                    named("is needed with after_upload = \"move\"".into()),
                ));
            }
            (AfterUpload::Move, Some(to)) if !to.is_absolute() => {
                return Err((
                    "files.watch.move_to",
                    named(format!("{} must be an absolute path", to.display())),
                ));
            }
            (AfterUpload::Move, Some(to)) if to == &self.path => {
                return Err((
                    "files.watch.move_to",
                    named("is the watched directory itself".into()),
                ));
            }
            (AfterUpload::Delete | AfterUpload::Keep, Some(_)) => {
                return Err((
                    "files.watch.move_to",
                    named("is only used with after_upload = \"move\"".into()),
                ));
            }
            _ => {}
        }
        for p in &self.ignore {
            Glob::new(p).map_err(|e| ("files.watch.ignore", named(e)))?;
        }
        for r in &self.rules {
            if r.event_type.trim().is_empty() {
                return Err(("files.watch.rules.type", named("is empty".into())));
            }
            if r.extensions.is_empty() && r.content_types.is_empty() {
                return Err((
                    "files.watch.rules",
                    named(format!(
                        "the rule for type {:?} matches nothing: give extensions or content_types",
                        r.event_type
                    )),
                ));
            }
            for e in &r.extensions {
                if e.is_empty() || e.contains('.') || e.contains('/') {
                    return Err((
                        "files.watch.rules.extensions",
                        named(format!(
                            "{e:?}: write a file name's last extension without the dot, e.g. \"jpg\" (for clip.tar.gz: \"gz\")"
                        )),
                    ));
                }
            }
            let not_a_type = |c: &String| {
                named(format!(
                    "{c:?} is not a content type like \"image/jpeg\" or \"image/*\""
                ))
            };
            for c in &r.content_types {
                if !c.contains('/') {
                    return Err(("files.watch.rules.content_types", not_a_type(c)));
                }
            }
            if let Some(c) = &r.content_type
                && (!c.contains('/') || c.contains('*'))
            {
                return Err(("files.watch.rules.content_type", not_a_type(c)));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<FilesConfig, String> {
        let c: FilesConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        c.validate().map_err(|(k, m)| format!("{k}: {m}"))?;
        Ok(c)
    }

    const ONE: &str = r#"
        [[watch]]
        name = "cameras"
        path = "/srv/ftp/cameras"
    "#;

    #[test]
    fn defaults() {
        let c = parse(ONE).unwrap();
        let w = &c.watch[0];
        assert!(w.recursive && !w.poll);
        assert_eq!(w.finished, Finished::Close);
        assert_eq!(w.after_upload, AfterUpload::Delete);
        assert_eq!(w.subject, "{top}");
        assert!(
            w.rules.is_empty(),
            "the default rules apply after the configured ones"
        );
        assert_eq!(c.quiet_period.get().as_secs(), 30);
        assert!(c.ignore.iter().any(|p| p == ".*"));
        assert_eq!(
            c.spool_dir(Path::new("/var/lib/pigeon")),
            PathBuf::from("/var/lib/pigeon/spool")
        );
    }

    #[test]
    fn full_watch() {
        let c = parse(
            r#"
            quiet_period = "5s"
            ignore = ["*.upload"]
            spool_dir = "/srv/ftp/.spool"
            [[watch]]
            name = "front-door"
            path = "/srv/ftp/front"
            recursive = false
            finished = "quiet"
            subject = "door/{name}"
            type = "io.example.file"
            after_upload = "move"
            move_to = "/srv/ftp/done"
            [[watch.rules]]
            extensions = ["JPG", "jpeg"]
            type = "io.example.image"
            [[watch.rules]]
            content_types = ["video/*"]
            type = "io.example.video"
            content_type = "video/mp4"
            "#,
        )
        .unwrap();
        let w = &c.watch[0];
        assert_eq!(w.finished, Finished::Quiet);
        assert_eq!(w.after_upload, AfterUpload::Move);
        assert_eq!(w.rules[1].content_type.as_deref(), Some("video/mp4"));
        assert_eq!(
            c.spool_dir(Path::new("/x")),
            PathBuf::from("/srv/ftp/.spool")
        );
    }

    #[test]
    fn bad_values_are_named() {
        for (text, key) in [
            ("watch = []", "files.watch"),
            ("quiet_period = \"5s\"", "files.watch"),
            (
                &ONE.replace("\"cameras\"", "\"recovered\""),
                "files.watch.name",
            ),
            (
                &format!("{ONE}[[watch.rules]]\nextensions = [\"tar.gz\"]\ntype = \"x\"\n"),
                "files.watch.rules.extensions",
            ),
            (
                &format!(
                    "{ONE}[[watch.rules]]\nextensions = [\"dav\"]\ntype = \"x\"\ncontent_type = \"video/*\"\n"
                ),
                "files.watch.rules.content_type",
            ),
            (&ONE.replace("cameras\"", "cam eras\""), "files.watch.name"),
            (
                &ONE.replace("/srv/ftp/cameras", "srv/ftp"),
                "files.watch.path",
            ),
            (
                &format!("{ONE}after_upload = \"move\"\n"),
                "files.watch.move_to",
            ),
            (
                &format!("{ONE}move_to = \"/srv/done\"\n"),
                "files.watch.move_to",
            ),
            (
                &format!("{ONE}subject = \"{{camera}}\"\n"),
                "files.watch.subject",
            ),
            (&format!("{ONE}type = \" \"\n"), "files.watch.type"),
            (
                &format!("{ONE}[[watch.rules]]\ntype = \"x\"\n"),
                "files.watch.rules",
            ),
            (
                &format!("{ONE}[[watch.rules]]\nextensions = [\".jpg\"]\ntype = \"x\"\n"),
                "files.watch.rules.extensions",
            ),
            (
                &format!("{ONE}[[watch.rules]]\ncontent_types = [\"image\"]\ntype = \"x\"\n"),
                "files.watch.rules.content_types",
            ),
            (
                &format!("quiet_period = \"10ms\"\n{ONE}"),
                "files.quiet_period",
            ),
            (&format!("ignore = [\"\"]\n{ONE}"), "files.ignore"),
            (
                &format!(
                    "{ONE}{}",
                    ONE.replace("/srv/ftp/cameras", "/srv/ftp/cameras/cam1")
                ),
                "files.watch.name",
            ),
            (
                &format!(
                    "{ONE}{}",
                    ONE.replace("/srv/ftp/cameras", "/srv/ftp/cameras/cam1")
                        .replace("\"cameras\"", "\"cam1\"")
                ),
                "files.watch.path",
            ),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.starts_with(key), "{text}\n→ {e}");
        }
        let e = parse(&format!("{ONE}intervall = 3\n")).unwrap_err();
        assert!(e.contains("intervall"), "{e}");
    }
}
