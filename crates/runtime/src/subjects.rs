//! Every NATS subject of the mesh. `docs/architecture.md` (Subjects and streams) describes
//! them; keep the two in step.

/// Where clients publish ContainerRequests (stream `IMAGEMESH_INTAKE`).
pub const INTAKE: &str = "imagemesh.intake";
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
