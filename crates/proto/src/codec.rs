//! Decoding messages as protobuf or as the proto3 JSON mapping.

use std::sync::OnceLock;

use prost::{Message, Name};
use prost_reflect::{DescriptorPool, DynamicMessage};

/// Content type of protobuf payloads (the default when a message has no Content-Type).
pub const CONTENT_TYPE_PROTOBUF: &str = "application/protobuf";
/// Content type of proto3 JSON payloads.
pub const CONTENT_TYPE_JSON: &str = "application/json";

static DESCRIPTORS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));

/// Why a payload could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("malformed protobuf {message}: {source}")]
    Protobuf {
        message: &'static str,
        source: prost::DecodeError,
    },
    #[error("malformed JSON {message}: {detail}")]
    Json {
        message: &'static str,
        detail: String,
    },
    #[error("unsupported content type {0:?} (use application/protobuf or application/json)")]
    UnsupportedContentType(String),
}

fn pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| DescriptorPool::decode(DESCRIPTORS).expect("embedded descriptors decode"))
}

/// Decodes `payload` as `T`: JSON when `content_type` is `application/json` (parameters such as
/// `; charset=utf-8` are ignored), protobuf when it is absent or `application/protobuf`.
pub fn decode<T: Message + Name + Default>(
    payload: &[u8],
    content_type: Option<&str>,
) -> Result<T, DecodeError> {
    let media_type = content_type
        .map(|ct| {
            ct.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    match media_type.as_str() {
        "" | CONTENT_TYPE_PROTOBUF | "application/x-protobuf" => {
            T::decode(payload).map_err(|source| DecodeError::Protobuf {
                message: T::NAME,
                source,
            })
        }
        CONTENT_TYPE_JSON => decode_json(payload),
        other => Err(DecodeError::UnsupportedContentType(other.to_string())),
    }
}

fn decode_json<T: Message + Name + Default>(payload: &[u8]) -> Result<T, DecodeError> {
    let json_error = |detail: String| DecodeError::Json {
        message: T::NAME,
        detail,
    };
    let descriptor = pool()
        .get_message_by_name(&T::full_name())
        .ok_or_else(|| json_error("type not in descriptor pool".into()))?;
    let mut deserializer = serde_json::Deserializer::from_slice(payload);
    let dynamic = DynamicMessage::deserialize(descriptor, &mut deserializer)
        .map_err(|e| json_error(e.to_string()))?;
    deserializer.end().map_err(|e| json_error(e.to_string()))?;
    dynamic
        .transcode_to::<T>()
        .map_err(|e| json_error(e.to_string()))
}

/// Encodes `message` in the proto3 JSON mapping (for CLIs and humans).
pub fn to_json<T: Message + Name>(message: &T) -> serde_json::Value {
    let descriptor = pool()
        .get_message_by_name(&T::full_name())
        .expect("every imagemesh type is in the descriptor pool");
    let mut dynamic = DynamicMessage::new(descriptor);
    dynamic
        .transcode_from(message)
        .expect("a message transcodes to its own descriptor");
    serde_json::to_value(&dynamic).expect("dynamic messages serialize")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{ContainerRequest, RequestKind};

    #[test]
    fn reads_protobuf_and_json_alike() {
        let req = ContainerRequest {
            request_id: "r-1".into(),
            kind: RequestKind::Build as i32,
            image_id: "img".into(),
            ..Default::default()
        };
        let from_pb: ContainerRequest = decode(&req.encode_to_vec(), None).unwrap();
        assert_eq!(from_pb, req);

        let json = br#"{"requestId":"r-1","kind":"REQUEST_KIND_BUILD","imageId":"img"}"#;
        let from_json: ContainerRequest =
            decode(json, Some("application/json; charset=utf-8")).unwrap();
        assert_eq!(from_json, req);
        assert_eq!(to_json(&req)["kind"], "REQUEST_KIND_BUILD");
    }

    #[test]
    fn malformed_payloads_say_what_is_wrong() {
        let err = decode::<ContainerRequest>(b"\xff\xff\xff", None).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("malformed protobuf ContainerRequest")
        );
        let err =
            decode::<ContainerRequest>(b"{\"requestId\": 3", Some(CONTENT_TYPE_JSON)).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("malformed JSON ContainerRequest")
        );
        let err =
            decode::<ContainerRequest>(b"{\"nope\": 1}", Some(CONTENT_TYPE_JSON)).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
        let err = decode::<ContainerRequest>(b"x", Some("text/plain")).unwrap_err();
        assert!(matches!(err, DecodeError::UnsupportedContentType(_)));
    }
}
