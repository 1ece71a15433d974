//! Start-up helpers shared by the daemon and by in-process simulations of
//! many nodes (so both run the same code).

use std::time::Duration;

use tokio::sync::watch;
use tracing::warn;

/// Retries `attempt` while it fails transiently (throttling, 5xx,
/// timeouts: never fatal at start), with jittered exponential backoff up to
/// 30 s. `Ok(None)` when `stop` turns true first (SIGTERM/SIGINT), also
/// while an attempt is in flight.
pub async fn with_retries<T, E: std::fmt::Display>(
    what: &str,
    stop: &mut watch::Receiver<bool>,
    transient: impl Fn(&E) -> bool,
    mut attempt: impl AsyncFnMut() -> Result<T, E>,
) -> Result<Option<T>, E> {
    let mut delay = Duration::from_millis(500);
    loop {
        if *stop.borrow() {
            return Ok(None);
        }
        let result = tokio::select! {
            biased;
            r = attempt() => r,
            _ = stop.wait_for(|s| *s) => return Ok(None),
        };
        match result {
            Ok(v) => return Ok(Some(v)),
            Err(e) if transient(&e) => {
                let wait = providers::jitter::upper_half(delay);
                warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "{what}: the cloud answered with a transient error; trying again");
                tokio::select! {
                    biased;
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.wait_for(|s| *s) => return Ok(None),
                }
                delay = (delay * 2).min(Duration::from_secs(30));
            }
            Err(e) => return Err(e),
        }
    }
}
