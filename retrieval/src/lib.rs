//! Retrieval for feedgraph (filled by the issue "Following and home feeds end to end").
//!
//! Will own: the shard-local candidate query (OR of followed users' / boards' / topics'
//! bitmaps → AND-NOT filters → newest-first scan with a work bound → drop seen pins and
//! blocked owners → light score → top-K with features), and the broker: follows lookup
//! (cached), grouping by owner shard, scatter with deadlines, gather and merge, ML
//! re-rank with fallback, diversity caps, home-feed blending and cursor pagination.
//! Speaks `feedgraph-model` types only; prost types stop in `proto` and `server`.
