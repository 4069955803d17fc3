//! Opaque, integrity-checked pagination cursors.
//!
//! A cursor names a ranking (its id in the broker's ranking cache) and the page to
//! serve, plus the snapshot the ranking was computed from (its "now", and each shard's
//! ordinal watermark), so that a broker without the cached ranking — restarted, or
//! another node — recomputes the same list: pins that arrived after the first page are
//! left out, scores use the same "now". The bytes are authenticated with HMAC-SHA256
//! (truncated to 128 bits) under the broker's key: a forged or altered cursor is refused.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

const VERSION: u8 = 1;
pub(crate) const TAG_BYTES: usize = 16;
/// Longest cursor accepted, in characters.
pub const MAX_CURSOR_CHARS: usize = 4096;

/// Which feed a ranking belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FeedKind {
    Following,
    Home,
}

/// What a cursor carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CursorState {
    pub kind: FeedKind,
    pub user: u64,
    pub ranking: String,
    pub ranking_id: u64,
    /// Index of the page to serve next.
    pub page: u32,
    pub page_size: u32,
    pub now_ms: i64,
    /// Per shard, the ordinal bound of the ranking's snapshot.
    pub watermarks: Vec<u32>,
}

/// Encodes and verifies cursors under one key.
pub struct CursorCodec {
    key: [u8; 32],
}

impl std::fmt::Debug for CursorCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CursorCodec(..)")
    }
}

impl CursorCodec {
    pub fn new(key: [u8; 32]) -> Self {
        Self { key }
    }

    pub(crate) fn mac(&self) -> Hmac<Sha256> {
        // HMAC accepts keys of any length.
        #[allow(clippy::expect_used)]
        Hmac::<Sha256>::new_from_slice(&self.key).expect("hmac takes any key length")
    }

    pub fn encode(&self, c: &CursorState) -> String {
        let mut b = Vec::with_capacity(48 + c.ranking.len() + 4 * c.watermarks.len());
        b.push(VERSION);
        b.push(match c.kind {
            FeedKind::Following => 0,
            FeedKind::Home => 1,
        });
        b.extend_from_slice(&c.user.to_le_bytes());
        b.extend_from_slice(&c.ranking_id.to_le_bytes());
        b.extend_from_slice(&c.page.to_le_bytes());
        b.extend_from_slice(&c.page_size.to_le_bytes());
        b.extend_from_slice(&c.now_ms.to_le_bytes());
        let name = c.ranking.as_bytes();
        b.push(name.len().min(255) as u8);
        b.extend_from_slice(&name[..name.len().min(255)]);
        b.extend_from_slice(&(c.watermarks.len() as u16).to_le_bytes());
        for w in &c.watermarks {
            b.extend_from_slice(&w.to_le_bytes());
        }
        let tag = self.mac().chain_update(&b).finalize().into_bytes();
        b.extend_from_slice(&tag[..TAG_BYTES]);
        URL_SAFE_NO_PAD.encode(b)
    }

    /// Verifies and decodes; the error says why the cursor is refused.
    pub fn decode(&self, s: &str) -> Result<CursorState, &'static str> {
        if s.len() > MAX_CURSOR_CHARS {
            return Err("is too long");
        }
        let bytes = URL_SAFE_NO_PAD.decode(s).map_err(|_| "is not a cursor this service issued")?;
        if bytes.len() < TAG_BYTES + 1 {
            return Err("is not a cursor this service issued");
        }
        let (body, tag) = bytes.split_at(bytes.len() - TAG_BYTES);
        self.mac()
            .chain_update(body)
            .verify_truncated_left(tag)
            .map_err(|_| "failed its integrity check (altered, or issued under another key)")?;
        let mut r = Reader(body);
        let malformed = "is malformed";
        if r.take(1).ok_or(malformed)?[0] != VERSION {
            return Err("has an unsupported version");
        }
        let kind = match r.take(1).ok_or(malformed)?[0] {
            0 => FeedKind::Following,
            1 => FeedKind::Home,
            _ => return Err(malformed),
        };
        let user = r.u64().ok_or(malformed)?;
        let ranking_id = r.u64().ok_or(malformed)?;
        let page = r.u32().ok_or(malformed)?;
        let page_size = r.u32().ok_or(malformed)?;
        let now_ms = r.u64().ok_or(malformed)? as i64;
        let name_len = r.take(1).ok_or(malformed)?[0] as usize;
        let ranking =
            String::from_utf8(r.take(name_len).ok_or(malformed)?.to_vec()).map_err(|_| malformed)?;
        let n = u16::from_le_bytes(r.take(2).ok_or(malformed)?.try_into().map_err(|_| malformed)?) as usize;
        let watermarks = (0..n).map(|_| r.u32()).collect::<Option<Vec<_>>>().ok_or(malformed)?;
        if !r.0.is_empty() {
            return Err(malformed);
        }
        Ok(CursorState { kind, user, ranking, ranking_id, page, page_size, now_ms, watermarks })
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
}

/// A cursor state with every field set: the unit tests' and the fuzz corpus's.
pub(crate) fn sample_state() -> CursorState {
    CursorState {
        kind: FeedKind::Home,
        user: 42,
        ranking: "default".into(),
        ranking_id: 7,
        page: 3,
        page_size: 25,
        now_ms: 1_700_000_000_000,
        watermarks: vec![10, 20, 30],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let codec = CursorCodec::new([7; 32]);
        assert_eq!(codec.decode(&codec.encode(&sample_state())).unwrap(), sample_state());
    }

    #[test]
    fn forged_altered_or_foreign_cursors_are_refused() {
        let codec = CursorCodec::new([7; 32]);
        let good = codec.encode(&sample_state());
        // Flip every character in turn: never accepted.
        for i in 0..good.len() {
            let mut chars: Vec<char> = good.chars().collect();
            chars[i] = if chars[i] == 'A' { 'B' } else { 'A' };
            let altered: String = chars.into_iter().collect();
            if altered != good {
                assert!(codec.decode(&altered).is_err(), "altered at {i}");
            }
        }
        assert!(CursorCodec::new([8; 32]).decode(&good).is_err());
        assert!(codec.decode("").is_err());
        assert!(codec.decode("not base64 !!").is_err());
        assert!(codec.decode(&"A".repeat(5000)).is_err());
    }
}
