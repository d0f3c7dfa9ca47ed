//! Hot reload: notices changed inputs and hands each new configuration, or its errors, to the caller.
//!
//! It polls content hashes rather than using inotify: Kubernetes updates mounted Secrets by swapping
//! symlinks, which file events report unreliably, and a few small files hashed every second or two
//! cost nothing measurable.

use std::time::Duration;

use super::{ConfigErrors, Fingerprint, Loaded, Sources, load};

/// Checks the sources every `interval` and calls `apply` with the result of each changed input,
/// and `checked` after every check. A configuration that failed is not reported again until its
/// inputs change once more.
pub async fn watch(
    sources: Sources,
    interval: Duration,
    current: Fingerprint,
    apply: impl Fn(Result<Loaded, ConfigErrors>),
    checked: impl Fn(),
) {
    let mut last = current;
    loop {
        tokio::time::sleep(interval).await;
        let sources = sources.clone();
        let credential_files = last.credential_files.clone();
        let last_hash = last.hash;
        // File reads and compiling are blocking work; keep them off the request threads.
        let checked_result = tokio::task::spawn_blocking(move || {
            let fingerprint = match sources.read() {
                Ok(snapshot) => Fingerprint::new(snapshot.hash, credential_files),
                // Unreadable sources are a change worth reporting, once.
                Err(e) => return Some((Fingerprint::default(), Err(e))),
            };
            if fingerprint.hash == last_hash {
                return None;
            }
            let result = load(&sources);
            let fingerprint = match &result {
                Ok(loaded) => loaded.fingerprint.clone(),
                Err(_) => fingerprint,
            };
            Some((fingerprint, result))
        })
        .await;
        match checked_result {
            Ok(Some((fingerprint, result))) if !(last.hash == fingerprint.hash && result.is_err()) => {
                last = fingerprint;
                apply(result);
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "config reload task failed"),
        }
        checked();
    }
}
