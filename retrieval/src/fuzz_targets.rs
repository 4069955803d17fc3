//! Entry points for the fuzzers (`fuzz/`) into this crate's decoders of outside bytes.
//! Not an API: the fuzz crate calls these.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::Mac;

use crate::cursor::CursorCodec;

/// A cursor a client sends back: first as given (the MAC refuses almost everything),
/// then the same bytes as a body behind a valid MAC, which reaches the decoder. A
/// cursor that decodes survives its own encoding.
pub fn cursor(data: &[u8]) {
    let codec = CursorCodec::new([7; 32]);
    let _ = codec.decode(&String::from_utf8_lossy(data));
    let tag = codec.mac().chain_update(data).finalize().into_bytes();
    let mut signed = data.to_vec();
    signed.extend_from_slice(&tag[..crate::cursor::TAG_BYTES]);
    if let Ok(state) = codec.decode(&URL_SAFE_NO_PAD.encode(&signed)) {
        assert_eq!(
            codec.decode(&codec.encode(&state)).as_ref(),
            Ok(&state),
            "a decoded cursor does not round-trip"
        );
    }
}

/// Valid cursors' bodies (without their MACs), for the corpus.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let codec = CursorCodec::new([7; 32]);
    let Ok(bytes) = URL_SAFE_NO_PAD.decode(codec.encode(&crate::cursor::sample_state())) else {
        return Vec::new();
    };
    vec![("cursor", bytes[..bytes.len() - crate::cursor::TAG_BYTES].to_vec())]
}
