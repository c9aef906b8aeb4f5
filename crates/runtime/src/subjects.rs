//! Every NATS subject of the mesh. `docs/architecture.md` (Subjects and streams) describes
//! them; keep the two in step.

/// Prefix of the intake: a client publishes a ContainerRequest on `imagemesh.intake.<request
/// id>` (stream `IMAGEMESH_INTAKE`, which keeps one message per subject, so an id is taken once).
pub const INTAKE_PREFIX: &str = "imagemesh.intake";
/// Every intake subject (what schedulers consume).
pub const INTAKE_ALL: &str = "imagemesh.intake.*";
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
/// Prefix of status subjects; one subject per request id.
pub const STATUS_PREFIX: &str = "imagemesh.status";
/// Prefix of dead-letter subjects; one subject per service.
pub const DEAD_LETTER_PREFIX: &str = "imagemesh.deadletter";
/// Prefix of build log subjects; one subject per request id.
pub const BUILD_LOG_PREFIX: &str = "imagemesh.buildlog";

/// Where a client submits the request `request_id`, which must have passed
/// [`imagemesh_proto::validate_request_id`].
pub fn intake(request_id: &str) -> String {
    format!("{INTAKE_PREFIX}.{request_id}")
}

/// The request id an intake subject names, if it is one.
pub fn intake_request_id(subject: &str) -> Option<&str> {
    subject.strip_prefix(INTAKE_PREFIX)?.strip_prefix('.')
}

/// Status events of one request. `request_id` must have passed
/// [`imagemesh_proto::validate_request_id`].
pub fn status(request_id: &str) -> String {
    format!("{STATUS_PREFIX}.{request_id}")
}

/// Dead letters of one service.
pub fn dead_letter(service: &str) -> String {
    format!("{DEAD_LETTER_PREFIX}.{service}")
}

/// Build log lines of one request.
pub fn build_log(request_id: &str) -> String {
    format!("{BUILD_LOG_PREFIX}.{request_id}")
}

/// Header naming the payload encoding (`application/protobuf` or `application/json`).
pub const CONTENT_TYPE_HEADER: &str = "Content-Type";

/// Prefix of a mounter's control subjects (`<prefix>.<worker id>.unmount`, `.mounts`).
pub const MOUNTER_CONTROL_PREFIX: &str = "imagemesh.mounter";

/// Where the control subjects of mounter `worker_id` start.
pub fn mounter_control_prefix(worker_id: &str) -> String {
    format!("{MOUNTER_CONTROL_PREFIX}.{worker_id}")
}
