//! Fair turns for users' SQL: a bound on the queries running at once over all environments, and
//! a smaller one per environment, so one environment's slow queries cannot hold every slot and
//! starve another's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use roster_store::EnvironmentId;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::EngineError;

pub(crate) struct QuerySlots {
    total: Arc<Semaphore>,
    per_environment_limit: usize,
    per_environment: Mutex<HashMap<EnvironmentId, Arc<Semaphore>>>,
    /// Longest a query waits for its turn before it is refused with 429 (its client retries).
    longest_wait: Duration,
}

/// Both permits of a running query; dropping it gives the slots back.
pub(crate) struct QueryTurn {
    _environment: OwnedSemaphorePermit,
    _total: OwnedSemaphorePermit,
}

impl QuerySlots {
    pub(crate) fn new(total: usize, per_environment: usize, longest_wait: Duration) -> Self {
        let total = total.max(1);
        QuerySlots {
            total: Arc::new(Semaphore::new(total)),
            per_environment_limit: per_environment.clamp(1, total),
            per_environment: Mutex::new(HashMap::new()),
            longest_wait,
        }
    }

    /// Waits for the environment's turn, then for a slot; the environment's own bound comes
    /// first, so its queued queries never hold a shared slot while they wait.
    pub(crate) async fn turn(&self, environment_id: EnvironmentId) -> Result<QueryTurn, EngineError> {
        let environment_slots = {
            let mut slots = self.per_environment.lock().map_err(|_| busy(self.per_environment_limit))?;
            Arc::clone(
                slots.entry(environment_id).or_insert_with(|| Arc::new(Semaphore::new(self.per_environment_limit))),
            )
        };
        let deadline = tokio::time::Instant::now() + self.longest_wait;
        let environment = tokio::time::timeout_at(deadline, environment_slots.acquire_owned())
            .await
            .map_err(|_| busy(self.per_environment_limit))?
            .map_err(|_| busy(self.per_environment_limit))?;
        let total = tokio::time::timeout_at(deadline, Arc::clone(&self.total).acquire_owned())
            .await
            .map_err(|_| busy(self.per_environment_limit))?
            .map_err(|_| busy(self.per_environment_limit))?;
        Ok(QueryTurn { _environment: environment, _total: total })
    }
}

fn busy(per_environment_limit: usize) -> EngineError {
    EngineError::TooManyQueries(format!(
        "this environment already runs {per_environment_limit} queries at once and more are waiting; retry later"
    ))
}
