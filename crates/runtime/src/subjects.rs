//! Every NATS subject of the mesh. `docs/architecture.md` (Subjects and streams) describes
//! them; keep the two in step.
//!
//! Subjects a client publishes to or reads from carry its tenant as their third token
//! (`imagemesh.<kind>.<tenant>.<request id>`), so the NATS server's permissions can confine
//! each client identity to its own tenant: it may publish to `imagemesh.intake.<tenant>.*` and
//! read `imagemesh.status.<tenant>.>` and `imagemesh.buildlog.<tenant>.>`, nothing else.

use imagemesh_proto::RequestKey;

/// Prefix of the intake: a client publishes a ContainerRequest on
/// `imagemesh.intake.<tenant>.<request id>` (stream `IMAGEMESH_INTAKE`, which keeps one message
/// per subject, so an id is taken once per tenant).
pub const INTAKE_PREFIX: &str = "imagemesh.intake";
/// Every intake subject (what schedulers consume).
pub const INTAKE_ALL: &str = "imagemesh.intake.*.*";
/// Enriched build requests for builders (stream `IMAGEMESH_BUILD`).
pub const BUILD: &str = "imagemesh.work.build";
/// Enriched runtime requests for mounters (stream `IMAGEMESH_MOUNT`).
pub const MOUNT: &str = "imagemesh.work.mount";
/// Index requests from builders to indexers (stream `IMAGEMESH_INDEX`).
pub const INDEX: &str = "imagemesh.work.index";
/// Credential service endpoint that mints scoped tokens (the scheduler's).
pub const CREDENTIAL_MINT: &str = "imagemesh.credential.mint";
/// Credential service endpoint that refreshes pull-only tokens (the mounter's).
pub const CREDENTIAL_REFRESH: &str = "imagemesh.credential.refresh";
/// Prefix of status subjects; one subject per tenant and request id.
pub const STATUS_PREFIX: &str = "imagemesh.status";
/// Prefix of dead-letter subjects; one subject per service.
pub const DEAD_LETTER_PREFIX: &str = "imagemesh.deadletter";
/// Prefix of build log subjects; one subject per tenant and request id.
pub const BUILD_LOG_PREFIX: &str = "imagemesh.buildlog";

/// Where a client of `tenant` submits the request `request_id`; both must be valid
/// ([`imagemesh_proto::validate_tenant`], [`imagemesh_proto::validate_request_id`]).
pub fn intake(tenant: &str, request_id: &str) -> String {
    format!("{INTAKE_PREFIX}.{tenant}.{request_id}")
}

/// The tenant and request id an intake subject names, if it is one (each a single token; their
/// contents are validated by whoever reads them).
pub fn parse_intake(subject: &str) -> Option<RequestKey<'_>> {
    per_request(INTAKE_PREFIX, subject)
}

/// Status events of one request.
pub fn status(request: RequestKey<'_>) -> String {
    format!("{STATUS_PREFIX}.{}.{}", request.tenant, request.id)
}

/// Dead letters of one service.
pub fn dead_letter(service: &str) -> String {
    format!("{DEAD_LETTER_PREFIX}.{service}")
}

/// Build log lines of one request.
pub fn build_log(request: RequestKey<'_>) -> String {
    format!("{BUILD_LOG_PREFIX}.{}.{}", request.tenant, request.id)
}

/// `<prefix>.<tenant>.<request id>`, exactly two tokens after the prefix.
fn per_request<'a>(prefix: &str, subject: &'a str) -> Option<RequestKey<'a>> {
    let rest = subject.strip_prefix(prefix)?.strip_prefix('.')?;
    let (tenant, id) = rest.split_once('.')?;
    let token = |t: &str| !t.is_empty() && !t.contains('.');
    (token(tenant) && token(id)).then_some(RequestKey::new(tenant, id))
}

/// Header naming the payload encoding (`application/protobuf` or `application/json`).
pub const CONTENT_TYPE_HEADER: &str = "Content-Type";

/// Prefix of a mounter's control subjects (`<prefix>.<worker id>.unmount`, `.mounts`).
pub const MOUNTER_CONTROL_PREFIX: &str = "imagemesh.mounter";

/// Where the control subjects of mounter `worker_id` start.
pub fn mounter_control_prefix(worker_id: &str) -> String {
    format!("{MOUNTER_CONTROL_PREFIX}.{worker_id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intake_subjects_name_tenant_and_request() {
        let key = RequestKey::new("team-a", "req-1");
        assert_eq!(intake("team-a", "req-1"), "imagemesh.intake.team-a.req-1");
        assert_eq!(parse_intake("imagemesh.intake.team-a.req-1"), Some(key));
        for other in [
            "imagemesh.intake.req-1",
            "imagemesh.intake.a.b.c",
            "imagemesh.intake..req-1",
            "imagemesh.intake.a.",
            "imagemesh.intakes.a.b",
            "imagemesh.status.a.b",
        ] {
            assert_eq!(parse_intake(other), None, "{other}");
        }
    }

    #[test]
    fn per_request_subjects_put_the_tenant_before_the_id() {
        let key = RequestKey::new("b", "x");
        assert_eq!(status(key), "imagemesh.status.b.x");
        assert_eq!(build_log(key), "imagemesh.buildlog.b.x");
        assert_ne!(status(key), status(RequestKey::new("a", "x")));
    }
}
