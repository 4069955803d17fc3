//! ML re-ranking of the head of a light-ranked list, within a deadline; on any failure
//! the light order stands and the stats say why.

use feedgraph_model::FeedRequest;

use super::scatter::Gathered;
use super::{Broker, FallbackReason, FeedStats, Scoring};
use crate::cursor::FeedKind;
use crate::features;
use crate::query::Candidate;
use crate::rank;

impl Broker {
    /// Re-ranks the head of the list with the ML model, if one is configured; on any
    /// failure the light-score order stands and the stats say why.
    pub(super) async fn rerank(
        &self,
        kind: FeedKind,
        req: &FeedRequest,
        g: Gathered,
        now_ms: i64,
    ) -> (Vec<Candidate>, FeedStats) {
        let Gathered { mut list, follows, mut stats, .. } = g;
        let Some(model) = &self.cfg.model else { return (list, stats) };
        let take = model.candidates.min(list.len());
        if take == 0 {
            stats.scoring = Scoring::Model;
            return (list, stats);
        }
        let Some(scorer) = &self.scorer else {
            stats.scoring = Scoring::LightFallback(FallbackReason::Unavailable);
            return (list, stats);
        };
        let batch = features::score_batch(&model.name, &list[..take], req, &follows, kind, now_ms);
        let scored = match tokio::time::timeout(model.deadline, scorer.score(batch)).await {
            Err(_) => Err(FallbackReason::Deadline),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "scorer failed; light-score fallback");
                Err(match e {
                    feedgraph_scoring::Error::DeadlineExceeded(_) => FallbackReason::Deadline,
                    feedgraph_scoring::Error::Unavailable(_) | feedgraph_scoring::Error::Internal(_) => {
                        FallbackReason::Unavailable
                    }
                    _ => FallbackReason::Refused,
                })
            }
            Ok(Ok(s)) if s.scores.len() != take => {
                tracing::warn!(
                    got = s.scores.len(),
                    sent = take,
                    "scorer answered the wrong number of scores"
                );
                Err(FallbackReason::Refused)
            }
            Ok(Ok(s)) => Ok(s),
        };
        let scores = match scored {
            Ok(s) => s,
            Err(reason) => {
                stats.scoring = Scoring::LightFallback(reason);
                return (list, stats);
            }
        };
        let tail = list.split_off(take);
        for (c, score) in list.iter_mut().zip(&scores.scores) {
            // A NaN score sorts last rather than poisoning the order.
            c.score = if score.is_nan() { f64::NEG_INFINITY } else { f64::from(*score) };
        }
        let by_model = |v: &mut Vec<Candidate>| v.sort_by(|a, b| b.score.total_cmp(&a.score));
        let mut head = match kind {
            FeedKind::Following => {
                by_model(&mut list);
                list
            }
            // The blend's share of interest positions stands: re-rank each side, then
            // blend them again.
            FeedKind::Home => {
                let (mut following, mut interest): (Vec<_>, Vec<_>) =
                    list.into_iter().partition(|c| c.source.is_following());
                by_model(&mut following);
                by_model(&mut interest);
                rank::blend(following, interest, self.cfg.home_interest_share, take)
            }
        };
        head.extend(tail);
        stats.scoring = Scoring::Model;
        stats.model = Some(format!("{}@{}", scores.model, scores.version));
        (head, stats)
    }
}
