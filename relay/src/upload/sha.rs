//! SHA-256 whose state can be saved and restored between blocks.
//!
//! An upload into S3 ships the file in parts as they arrive; once a part is stored the
//! relay keeps only the hash state at its end (a [`Midstate`], in the upload's manifest),
//! not the part's bytes. After a restart the hash resumes from there — the bytes held in
//! S3 cannot be read back before the upload is completed. `sha2::Sha256` keeps its state
//! private, so this wraps the block function (`sha2::block_api::compress256`) with the standard
//! padding (FIPS 180-4, 5.1.1).

use serde::{Deserialize, Serialize};

const BLOCK: usize = 64;
/// SHA-256's initial hash value (FIPS 180-4, 5.3.3).
const H0: [u32; 8] = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
];

/// A running SHA-256.
#[derive(Clone)]
pub struct Sha256 {
    state: [u32; 8],
    /// Bytes hashed so far, including those in `buf`.
    len: u64,
    buf: [u8; BLOCK],
    buffered: usize,
}

/// The state of a [`Sha256`] at a block boundary: the eight words and the bytes hashed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Midstate {
    /// The eight state words, as 64 lowercase hex digits.
    pub state: String,
    /// Bytes hashed; a multiple of 64.
    pub bytes: u64,
}

impl Default for Sha256 {
    fn default() -> Self {
        Self::new()
    }
}

impl Sha256 {
    pub fn new() -> Self {
        Self {
            state: H0,
            len: 0,
            buf: [0; BLOCK],
            buffered: 0,
        }
    }

    /// Bytes hashed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        if self.buffered > 0 {
            let take = (BLOCK - self.buffered).min(data.len());
            self.buf[self.buffered..self.buffered + take].copy_from_slice(&data[..take]);
            self.buffered += take;
            data = &data[take..];
            if self.buffered < BLOCK {
                return;
            }
            sha2::block_api::compress256(&mut self.state, &[self.buf]);
            self.buffered = 0;
        }
        let (blocks, rest) = data.as_chunks::<BLOCK>();
        sha2::block_api::compress256(&mut self.state, blocks);
        self.buf[..rest.len()].copy_from_slice(rest);
        self.buffered = rest.len();
    }

    /// The digest of everything hashed.
    pub fn finalize(mut self) -> [u8; 32] {
        let bits = self.len.wrapping_mul(8);
        let mut tail = [0u8; 2 * BLOCK];
        tail[..self.buffered].copy_from_slice(&self.buf[..self.buffered]);
        tail[self.buffered] = 0x80;
        // The length goes in the last 8 bytes of the block that has room for it.
        let end = if self.buffered < BLOCK - 8 {
            BLOCK
        } else {
            2 * BLOCK
        };
        tail[end - 8..end].copy_from_slice(&bits.to_be_bytes());
        let (blocks, _) = tail[..end].as_chunks::<BLOCK>();
        sha2::block_api::compress256(&mut self.state, blocks);
        let mut out = [0u8; 32];
        for (o, w) in out.chunks_exact_mut(4).zip(self.state) {
            o.copy_from_slice(&w.to_be_bytes());
        }
        out
    }

    /// The state, if it is at a block boundary (a multiple of 64 bytes hashed).
    pub fn midstate(&self) -> Option<Midstate> {
        if self.buffered != 0 {
            return None;
        }
        let mut state = String::with_capacity(64);
        for w in self.state {
            state.push_str(&format!("{w:08x}"));
        }
        Some(Midstate {
            state,
            bytes: self.len,
        })
    }

    /// Resumes from a saved state; `None` if it is not one.
    pub fn resume(m: &Midstate) -> Option<Self> {
        let s = m.state.as_bytes();
        if s.len() != 64 || !m.bytes.is_multiple_of(BLOCK as u64) {
            return None;
        }
        let mut state = [0u32; 8];
        for (w, hex) in state.iter_mut().zip(s.chunks_exact(8)) {
            let hex = std::str::from_utf8(hex).ok()?;
            if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            *w = u32::from_str_radix(hex, 16).ok()?;
        }
        Some(Self {
            state,
            len: m.bytes,
            buf: [0; BLOCK],
            buffered: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest;

    fn reference(data: &[u8]) -> [u8; 32] {
        sha2::Sha256::digest(data).into()
    }

    #[test]
    fn matches_sha2_for_every_length_and_split() {
        let data: Vec<u8> = (0..300u32).map(|i| (i * 7 + 3) as u8).collect();
        for len in 0..data.len() {
            let want = reference(&data[..len]);
            let mut one = Sha256::new();
            one.update(&data[..len]);
            assert_eq!(one.len(), len as u64);
            assert_eq!(one.finalize(), want, "length {len} in one update");
            for split in [1, 13, 63, 64, 65] {
                let mut h = Sha256::new();
                for chunk in data[..len].chunks(split) {
                    h.update(chunk);
                }
                assert_eq!(h.finalize(), want, "length {len} in chunks of {split}");
            }
        }
        // The FIPS 180-2 example.
        let mut abc = Sha256::new();
        abc.update(b"abc");
        assert_eq!(
            pigeon_shared::wire::sha256_hex(&abc.finalize()),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn a_midstate_resumes_where_it_was_taken() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        let mut h = Sha256::new();
        h.update(&data[..100]);
        assert_eq!(h.midstate(), None, "100 bytes are not a block boundary");
        h.update(&data[100..128]);
        let m = h.midstate().expect("128 bytes are two blocks");
        assert_eq!(m.bytes, 128);
        // Through JSON, as in a manifest.
        let m: Midstate = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
        let mut resumed = Sha256::resume(&m).expect("a valid midstate");
        resumed.update(&data[128..]);
        assert_eq!(resumed.finalize(), reference(&data));
        let empty = Sha256::resume(&Sha256::new().midstate().unwrap()).unwrap();
        assert_eq!(empty.finalize(), reference(b""));
    }

    #[test]
    fn damaged_midstates_are_refused() {
        let good = Sha256::new().midstate().unwrap();
        for bad in [
            Midstate {
                bytes: 65,
                ..good.clone()
            },
            Midstate {
                state: good.state[1..].to_owned(),
                ..good.clone()
            },
            Midstate {
                state: format!("{}g", &good.state[1..]),
                ..good.clone()
            },
            Midstate {
                state: format!("+{}", &good.state[1..]),
                ..good.clone()
            },
        ] {
            assert!(Sha256::resume(&bad).is_none(), "{bad:?}");
        }
    }
}
