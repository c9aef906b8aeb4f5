//! A build's log: every line buildah prints goes, as it is printed, to the request's log subject
//! `imagemesh.buildlog.<tenant>.<request_id>` (core NATS: live viewers only, nothing is stored;
//! its tenant's clients alone may read it), and the last lines are kept to explain a failure.

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::Bytes;
use imagemesh_proto::RequestKey;
use imagemesh_runtime::subjects;

/// Lines kept for failure messages.
const TAIL_LINES: usize = 12;

/// Where one build's output goes.
pub struct BuildLog {
    client: async_nats::Client,
    subject: String,
    /// Secrets the request carries; scrubbed from every line in case a build echoes one.
    secrets: Vec<String>,
    tail: Mutex<VecDeque<String>>,
}

impl BuildLog {
    pub fn new(client: async_nats::Client, request: RequestKey<'_>, secrets: Vec<String>) -> Self {
        Self {
            client,
            subject: subjects::build_log(request),
            secrets: secrets.into_iter().filter(|s| !s.is_empty()).collect(),
            tail: Mutex::new(VecDeque::with_capacity(TAIL_LINES)),
        }
    }

    /// Publishes one line and remembers it.
    pub async fn line(&self, raw: &str) {
        let mut line = raw.trim_end().to_string();
        for secret in &self.secrets {
            line = line.replace(secret.as_str(), "[redacted]");
        }
        tracing::debug!(target: "buildlog", "{line}");
        if let Err(err) = self
            .client
            .publish(self.subject.clone(), Bytes::from(line.clone()))
            .await
        {
            tracing::debug!(error = %err, "could not publish a build log line");
        }
        let mut tail = self.tail.lock().expect("log tail lock");
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    }

    /// The last lines, oldest first.
    pub fn tail(&self) -> Vec<String> {
        self.tail
            .lock()
            .expect("log tail lock")
            .iter()
            .cloned()
            .collect()
    }

    /// The line that says why buildah failed: its last `Error:` line, else the last line.
    pub fn error_line(&self) -> Option<String> {
        let tail = self.tail();
        tail.iter()
            .rev()
            .find(|l| l.starts_with("Error:") || l.starts_with("error"))
            .or(tail.last())
            .cloned()
    }
}
