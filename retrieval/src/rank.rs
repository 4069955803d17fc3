//! Pure ranking steps of the broker: merge shard answers, blend following with interest
//! candidates, and cut the ranked list into diversified pages.

use feedgraph_model::PinId;
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};

use crate::query::Candidate;

/// Total order: score, then newer, then higher pin id — deterministic, so that a
/// ranking recomputed from the same snapshot is identical.
fn better(a: &Candidate, b: &Candidate) -> std::cmp::Ordering {
    b.score
        .total_cmp(&a.score)
        .then(b.created_at_ms.cmp(&a.created_at_ms))
        .then(b.pin.get().cmp(&a.pin.get()))
}

/// Merges per-shard lists into the best `limit`, best first, without duplicate pins.
pub fn merge(lists: Vec<Vec<Candidate>>, limit: usize) -> Vec<Candidate> {
    // A pin lives on its owner's shard only, so duplicates need ids reused across
    // owners; keep the best of each anyway, in one pass rather than a sort.
    let mut all: Vec<Candidate> = Vec::new();
    let mut at: HashMap<PinId, usize> = HashMap::default();
    for c in lists.into_iter().flatten() {
        match at.get(&c.pin) {
            Some(&i) => {
                if better(&c, &all[i]).is_lt() {
                    all[i] = c;
                }
            }
            None => {
                at.insert(c.pin, all.len());
                all.push(c);
            }
        }
    }
    // Select the best `limit` without sorting the rest (8,000 merged for 500 kept).
    if all.len() > limit {
        all.select_nth_unstable_by(limit, better);
        all.truncate(limit);
    }
    all.sort_unstable_by(better);
    all
}

/// Interleaves interest candidates into the following list so that about `share` of
/// the first positions are interest (fewer when it runs out, and vice versa); a pin in
/// both lists keeps its following position. At most `limit` items.
pub fn blend(
    following: Vec<Candidate>,
    interest: Vec<Candidate>,
    share: f64,
    limit: usize,
) -> Vec<Candidate> {
    let in_following: HashSet<_> = following.iter().map(|c| c.pin).collect();
    let mut f = following.into_iter().peekable();
    let mut i = interest.into_iter().filter(|c| !in_following.contains(&c.pin)).peekable();
    let mut out = Vec::with_capacity(limit);
    let mut interest_taken = 0usize;
    while out.len() < limit {
        let want_interest = (interest_taken as f64) < share * (out.len() + 1) as f64;
        let next = match (want_interest, f.peek().is_some(), i.peek().is_some()) {
            (_, false, false) => break,
            (true, _, true) | (false, false, true) => {
                interest_taken += 1;
                i.next()
            }
            _ => f.next(),
        };
        out.extend(next);
    }
    out
}

/// Cuts a ranked list into pages of at most `page_size` items in which no owner has
/// more than `max_per_owner` items and no board more than `max_per_board`. Items are
/// taken in rank order; one that would break a cap waits for the next page, where it
/// comes first. Every item lands on exactly one page. Caps below 1 count as 1.
///
/// Equivalently — and so it is computed, moving each item once — every item, in rank
/// order, goes to the earliest page that has room for it: page `p` takes an item when
/// it is not full and the item's owner and board are under their caps there. (Page
/// `p`'s pass in rank order over the items earlier pages left takes exactly these.)
pub fn paginate(
    items: Vec<Candidate>,
    page_size: usize,
    max_per_owner: usize,
    max_per_board: usize,
) -> Vec<Vec<Candidate>> {
    let (page_size, max_per_owner, max_per_board) =
        (page_size.max(1), max_per_owner.max(1), max_per_board.max(1));
    let mut pages: Vec<Vec<Candidate>> = Vec::new();
    // Per page: items of each owner and board placed there.
    let mut owners: Vec<HashMap<u64, usize>> = Vec::new();
    let mut boards: Vec<HashMap<u64, usize>> = Vec::new();
    // Pages before this one are full.
    let mut first_open = 0usize;
    for item in items {
        let (owner, board) = (item.owner.get(), item.board.get());
        let mut p = first_open;
        loop {
            if p == pages.len() {
                pages.push(Vec::with_capacity(page_size));
                owners.push(HashMap::default());
                boards.push(HashMap::default());
            }
            let fits = pages[p].len() < page_size
                && owners[p].get(&owner).copied().unwrap_or(0) < max_per_owner
                && boards[p].get(&board).copied().unwrap_or(0) < max_per_board;
            if fits {
                *owners[p].entry(owner).or_default() += 1;
                *boards[p].entry(board).or_default() += 1;
                pages[p].push(item);
                break;
            }
            p += 1;
        }
        while pages.get(first_open).is_some_and(|page| page.len() == page_size) {
            first_open += 1;
        }
    }
    pages
}

/// The definition [`paginate`] computes faster: one pass per page over what earlier
/// pages left.
#[cfg(test)]
fn paginate_by_passes(
    items: Vec<Candidate>,
    page_size: usize,
    max_per_owner: usize,
    max_per_board: usize,
) -> Vec<Vec<Candidate>> {
    let mut pages = Vec::new();
    let mut pending = items;
    while !pending.is_empty() {
        let mut page = Vec::with_capacity(page_size);
        let mut rest = Vec::new();
        let mut owners: HashMap<u64, usize> = HashMap::default();
        let mut boards: HashMap<u64, usize> = HashMap::default();
        for item in pending {
            let o = owners.entry(item.owner.get()).or_default();
            let b = boards.entry(item.board.get()).or_default();
            if page.len() < page_size && *o < max_per_owner && *b < max_per_board {
                *o += 1;
                *b += 1;
                page.push(item);
            } else {
                rest.push(item);
            }
        }
        pages.push(page);
        pending = rest;
    }
    pages
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::query::Source;
    use feedgraph_model::{BoardId, UserId};
    use proptest::prelude::*;

    fn cand(pin: u64, owner: u64, board: u64, score: f64, source: Source) -> Candidate {
        Candidate {
            pin: PinId::new(pin).unwrap(),
            owner: UserId::new(owner).unwrap(),
            board: BoardId::new(board).unwrap(),
            created_at_ms: pin as i64,
            score,
            source,
            signals: Default::default(),
        }
    }

    #[test]
    fn merge_orders_and_deduplicates() {
        let a = vec![cand(1, 1, 1, 0.9, Source::FollowedUser), cand(2, 1, 1, 0.5, Source::FollowedUser)];
        let b = vec![cand(3, 2, 2, 0.7, Source::FollowedBoard), cand(1, 1, 1, 0.9, Source::FollowedBoard)];
        let m = merge(vec![a.clone(), b.clone()], 10);
        assert_eq!(m.iter().map(|c| c.pin.get()).collect::<Vec<_>>(), [1, 3, 2]);
        let m = merge(vec![a, b], 2);
        assert_eq!(m.iter().map(|c| c.pin.get()).collect::<Vec<_>>(), [1, 3]);
        // Of a duplicated pin, the better-scored copy is kept, wherever it comes.
        let low = vec![cand(5, 1, 1, 0.1, Source::FollowedUser), cand(6, 1, 1, 0.5, Source::FollowedUser)];
        let high = vec![cand(5, 1, 1, 0.9, Source::FollowedBoard)];
        let m = merge(vec![low, high], 10);
        assert_eq!(
            m.iter().map(|c| (c.pin.get(), c.source)).collect::<Vec<_>>(),
            [(5, Source::FollowedBoard), (6, Source::FollowedUser)]
        );
    }

    #[test]
    fn blend_takes_the_share_and_falls_back() {
        let f: Vec<_> = (1..=10).map(|p| cand(p, p, p, 1.0, Source::FollowedUser)).collect();
        let i: Vec<_> = (11..=20).map(|p| cand(p, p, p, 1.0, Source::FollowedTopic)).collect();
        let out = blend(f.clone(), i.clone(), 0.3, 10);
        let interest = out.iter().filter(|c| !c.source.is_following()).count();
        assert_eq!(interest, 3);
        assert_eq!(out.len(), 10);
        // Interest only when following runs out.
        let out = blend(f[..2].to_vec(), i, 0.0, 5);
        assert_eq!(out.iter().filter(|c| c.source.is_following()).count(), 2);
        assert_eq!(out.len(), 5);
        // A pin in both lists appears once.
        let out = blend(f[..2].to_vec(), vec![cand(1, 1, 1, 1.0, Source::FollowedTopic)], 0.5, 5);
        assert_eq!(out.len(), 2);
    }

    proptest! {
        /// Pages partition the list, respect the caps, and keep rank order within a page.
        #[test]
        fn pages_respect_caps_and_partition(
            owners in proptest::collection::vec(1u64..6, 0..120),
            page_size in 1usize..15,
            max_owner in 1usize..4,
            max_board in 1usize..4,
        ) {
            let items: Vec<Candidate> = owners.iter().enumerate()
                .map(|(i, o)| cand(i as u64 + 1, *o, o * 10 + (i as u64 % 2), 1000.0 - i as f64, Source::FollowedUser))
                .collect();
            let pages = paginate(items.clone(), page_size, max_owner, max_board);
            prop_assert_eq!(&pages, &paginate_by_passes(items.clone(), page_size, max_owner, max_board));
            let mut all: Vec<u64> = pages.iter().flatten().map(|c| c.pin.get()).collect();
            all.sort_unstable();
            prop_assert_eq!(all, (1..=items.len() as u64).collect::<Vec<_>>());
            for page in &pages {
                prop_assert!(!page.is_empty() && page.len() <= page_size);
                let mut o: HashMap<u64, usize> = HashMap::default();
                let mut b: HashMap<u64, usize> = HashMap::default();
                for c in page {
                    *o.entry(c.owner.get()).or_default() += 1;
                    *b.entry(c.board.get()).or_default() += 1;
                }
                prop_assert!(o.values().all(|n| *n <= max_owner));
                prop_assert!(b.values().all(|n| *n <= max_board));
                prop_assert!(page.windows(2).all(|w| w[0].score >= w[1].score));
            }
        }
    }
}
