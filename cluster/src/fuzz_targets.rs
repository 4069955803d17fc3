//! Entry points for the fuzzers (`fuzz/`) into this crate's decoders of outside bytes.
//! Not an API: the fuzz crate calls these.

use prost::Message;

use crate::checkpoint::Manifest;
use feedgraph_proto::pb::internal as ipb;

/// A checkpoint manifest as a bootstrapping follower receives it from its leader.
pub fn checkpoint_manifest(data: &[u8]) {
    if let Ok(m) = ipb::CheckpointManifest::decode(data) {
        let _ = Manifest::from_proto(m);
    }
}
