//! What a watch decides about a file from its name and first bytes, as pure functions:
//! whether to ignore it, its subject, content type, event type and object extension.

use std::path::Path;

use super::config::{RuleConfig, WatchConfig};
use super::patterns::{Glob, SubjectTemplate, lossy_os};
use crate::spool::extension;

/// Content types by extension, for what cameras and NVRs write.
const BY_EXTENSION: &[(&str, &str)] = &[
    ("jpg", "image/jpeg"),
    ("jpeg", "image/jpeg"),
    ("png", "image/png"),
    ("gif", "image/gif"),
    ("bmp", "image/bmp"),
    ("webp", "image/webp"),
    ("heic", "image/heic"),
    ("tif", "image/tiff"),
    ("tiff", "image/tiff"),
    ("mp4", "video/mp4"),
    ("m4v", "video/mp4"),
    ("mov", "video/quicktime"),
    ("avi", "video/x-msvideo"),
    ("mkv", "video/x-matroska"),
    ("webm", "video/webm"),
    ("ts", "video/mp2t"),
    ("h264", "video/h264"),
    ("264", "video/h264"),
    ("h265", "video/h265"),
    ("265", "video/h265"),
    ("hevc", "video/h265"),
    ("json", "application/json"),
    ("txt", "text/plain"),
    ("log", "text/plain"),
    ("csv", "text/csv"),
    ("xml", "application/xml"),
];

/// The content type of a file named `name` whose first bytes are `head`: by extension
/// when it is a known one, else by magic bytes, else `application/octet-stream`.
pub(crate) fn content_type(name: &str, head: &[u8]) -> &'static str {
    if let Some(ext) = extension(name)
        && let Some((_, ct)) = BY_EXTENSION.iter().find(|(e, _)| *e == ext)
    {
        return ct;
    }
    sniff(head).unwrap_or("application/octet-stream")
}

/// The content type the first bytes of a file give away, for the formats cameras write.
pub(crate) fn sniff(head: &[u8]) -> Option<&'static str> {
    let at = |i: usize, m: &[u8]| head.get(i..i + m.len()) == Some(m);
    if at(0, &[0xFF, 0xD8, 0xFF]) {
        Some("image/jpeg")
    } else if at(0, b"\x89PNG\r\n\x1a\n") {
        Some("image/png")
    } else if at(0, b"GIF87a") || at(0, b"GIF89a") {
        Some("image/gif")
    } else if at(0, b"BM") && head.len() >= 14 {
        Some("image/bmp")
    } else if at(0, b"RIFF") && at(8, b"WEBP") {
        Some("image/webp")
    } else if at(0, b"RIFF") && at(8, b"AVI ") {
        Some("video/x-msvideo")
    } else if at(4, b"ftypqt") {
        Some("video/quicktime")
    } else if at(4, b"ftypheic") || at(4, b"ftypmif1") {
        Some("image/heic")
    } else if at(4, b"ftyp") {
        Some("video/mp4")
    } else if at(0, &[0x1A, 0x45, 0xDF, 0xA3]) {
        Some("video/x-matroska")
    } else if at(0, &[0, 0, 0, 1]) || at(0, &[0, 0, 1]) {
        // An Annex B elementary stream (a bare H.264 dump, as some cameras write).
        Some("video/h264")
    } else {
        None
    }
}

/// A watch's decisions, compiled from its configuration and the global ignore list.
#[derive(Debug, Clone)]
pub(crate) struct Rules {
    ignore: Vec<Glob>,
    subject: SubjectTemplate,
    rules: Vec<RuleConfig>,
    default_type: String,
}

/// What the rules say about one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Described {
    pub(crate) event_type: String,
    pub(crate) content_type: String,
    pub(crate) subject: String,
}

impl Rules {
    /// Compiles a validated watch; `global_ignore` is `files.ignore`. The watch's rules
    /// come first, then the [default rules](super::config::default_rules).
    pub(crate) fn new(watch: &WatchConfig, global_ignore: &[String]) -> Result<Self, String> {
        let ignore = global_ignore
            .iter()
            .chain(&watch.ignore)
            .map(|p| Glob::new(p))
            .collect::<Result<_, _>>()?;
        let mut rules = watch.rules.clone();
        rules.extend(super::config::default_rules());
        Ok(Self {
            ignore,
            subject: SubjectTemplate::parse(&watch.subject)?,
            rules,
            default_type: watch.event_type.clone(),
        })
    }

    /// Whether a file named `name` is a temporary or otherwise ignored one.
    pub(crate) fn ignored(&self, name: &str) -> bool {
        self.ignore.iter().any(|g| g.matches(name))
    }

    /// Type, content type and subject of the file at `rel` with first bytes `head`.
    pub(crate) fn describe(&self, watch: &str, rel: &Path, head: &[u8]) -> Described {
        let name = rel.file_name().map(lossy_os).unwrap_or_default();
        let guessed = content_type(&name, head);
        let ext = extension(&name);
        let rule = self.rules.iter().find(|r| {
            ext.as_ref()
                .is_some_and(|e| r.extensions.iter().any(|x| x.eq_ignore_ascii_case(e)))
                || r.content_types
                    .iter()
                    .any(|p| content_type_matches(p, guessed))
        });
        Described {
            event_type: rule.map_or(&self.default_type, |r| &r.event_type).clone(),
            content_type: rule
                .and_then(|r| r.content_type.clone())
                .unwrap_or_else(|| guessed.to_owned()),
            subject: self.subject.render(watch, rel),
        }
    }
}

/// `*/*` matches everything, `image/*` every `image/…`; anything else must be equal
/// (any case).
fn content_type_matches(pattern: &str, ct: &str) -> bool {
    if pattern == "*/*" {
        return true;
    }
    match pattern.strip_suffix("/*") {
        Some(family) => ct
            .split_once('/')
            .is_some_and(|(f, _)| f.eq_ignore_ascii_case(family)),
        None => pattern.eq_ignore_ascii_case(ct),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extensions_and_content_types() {
        assert_eq!(extension("snap.JPG").as_deref(), Some("jpg"));
        assert_eq!(extension("clip.tar.gz").as_deref(), Some("gz"));
        assert_eq!(extension(".hidden"), None);
        assert_eq!(extension("noext"), None);
        assert_eq!(extension("weird.ü"), None);
        assert_eq!(extension(&format!("a.{}", "x".repeat(17))), None);
        assert_eq!(content_type("a.jpeg", b""), "image/jpeg");
        assert_eq!(content_type("a.MP4", b""), "video/mp4");
        // No extension, or an unknown one: the first bytes tell.
        assert_eq!(
            content_type("snapshot", &[0xFF, 0xD8, 0xFF, 0xE0]),
            "image/jpeg"
        );
        assert_eq!(
            content_type("clip.dav", b"\0\0\0\x18ftypisom\0\0\0\0"),
            "video/mp4"
        );
        assert_eq!(content_type("x", b"\0\0\0\x14ftypqt  "), "video/quicktime");
        assert_eq!(
            content_type("x", b"RIFF\0\0\0\0AVI LIST"),
            "video/x-msvideo"
        );
        assert_eq!(content_type("x", b"\x1aE\xdf\xa3"), "video/x-matroska");
        assert_eq!(content_type("x", b"\x89PNG\r\n\x1a\n"), "image/png");
        assert_eq!(content_type("x", b"hello"), "application/octet-stream");
        assert_eq!(content_type("x", b""), "application/octet-stream");
    }

    fn watch(extra: &str) -> WatchConfig {
        toml::from_str(&format!("name = \"cameras\"\npath = \"/srv\"\n{extra}")).unwrap()
    }

    #[test]
    fn default_rules_split_images_and_videos() {
        let r = Rules::new(&watch(""), &super::super::config::default_ignore()).unwrap();
        let d = r.describe("cameras", Path::new("cam-3/snap.jpg"), b"");
        assert_eq!(d.event_type, "io.pigeon.camera.image");
        assert_eq!(d.content_type, "image/jpeg");
        assert_eq!(d.subject, "cam-3");
        let d = r.describe("cameras", Path::new("cam-3/clip"), b"\0\0\0\x18ftypmp42");
        assert_eq!(d.event_type, "io.pigeon.camera.video");
        let d = r.describe("cameras", Path::new("notes.txt"), b"");
        assert_eq!(d.event_type, "io.pigeon.file");
        assert_eq!(d.content_type, "text/plain");
        assert!(r.ignored(".pureftpd-upload.abc"));
        assert!(r.ignored("clip.mp4.part"));
        assert!(!r.ignored("snap.jpg"));
    }

    #[test]
    fn configured_rules_first_match_wins() {
        let w = watch(
            r#"
            type = "other"
            ignore = ["*.idx"]
            [[rules]]
            extensions = ["dav"]
            type = "dahua.video"
            content_type = "video/x-dahua"
            [[rules]]
            content_types = ["video/mp4", "image/*"]
            type = "media"
            "#,
        );
        let r = Rules::new(&w, &[]).unwrap();
        let d = r.describe("cameras", Path::new("a.DAV"), b"");
        assert_eq!(
            (d.event_type.as_str(), d.content_type.as_str()),
            ("dahua.video", "video/x-dahua")
        );
        assert_eq!(r.describe("c", Path::new("a.png"), b"").event_type, "media");
        assert_eq!(r.describe("c", Path::new("a.mp4"), b"").event_type, "media");
        // After the configured rules, the default ones still sort videos out.
        assert_eq!(
            r.describe("c", Path::new("a.mkv"), b"").event_type,
            "io.pigeon.camera.video"
        );
        assert_eq!(r.describe("c", Path::new("a.txt"), b"").event_type, "other");
        assert!(r.ignored("x.idx"));
        assert!(!r.ignored(".hidden"), "the global list was not given");
        // A rule for everything turns the default rules off.
        let everything = watch("[[rules]]\ncontent_types = [\"*/*\"]\ntype = \"all\"\n");
        let r = Rules::new(&everything, &[]).unwrap();
        assert_eq!(r.describe("c", Path::new("a.mkv"), b"").event_type, "all");
    }
}
