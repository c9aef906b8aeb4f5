//! The vocabulary of the permission table: what "read a KV key", "consume a work queue" or
//! "serve a micro endpoint" means in NATS subjects, written once.

use std::collections::BTreeSet;

use serde::Serialize;

/// The subjects one identity may publish and subscribe to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Permissions {
    pub publish: BTreeSet<String>,
    pub subscribe: BTreeSet<String>,
    /// May answer the requests it receives (publish to their reply subjects, once each, within
    /// a short window): how micro services reply without a grant on every inbox.
    pub responds: bool,
}

/// Builds [`Permissions`] from what a role does.
#[derive(Debug, Default)]
pub struct Grants(Permissions);

impl Grants {
    pub fn new(inbox_prefix: &str) -> Self {
        let mut grants = Grants::default();
        // Replies (JetStream API answers, PubAcks, request-reply) land in the identity's own
        // inbox; nobody else may subscribe there.
        grants.subscribe(format!("{inbox_prefix}.>"));
        grants
    }

    pub fn build(self) -> Permissions {
        self.0
    }

    pub fn publish(&mut self, subject: impl Into<String>) -> &mut Self {
        self.0.publish.insert(subject.into());
        self
    }

    pub fn subscribe(&mut self, subject: impl Into<String>) -> &mut Self {
        self.0.subscribe.insert(subject.into());
        self
    }

    pub fn everything(&mut self) -> &mut Self {
        self.publish(">").subscribe(">")
    }

    fn js_api(&mut self, api: impl AsRef<str>) -> &mut Self {
        self.publish(format!("$JS.API.{}", api.as_ref()))
    }

    /// Looks a stream up (`get_stream`): its configuration and counters, not its messages.
    pub fn stream_info(&mut self, stream: &str) -> &mut Self {
        self.js_api(format!("STREAM.INFO.{stream}"))
    }

    /// Consumes a durable pull consumer `durable` with exactly `filter` on `stream`: create or
    /// update it (the server checks the filter in the subject against the config), pull, ack.
    pub fn work_consumer(&mut self, stream: &str, durable: &str, filter: &str) -> &mut Self {
        self.stream_info(stream)
            .js_api(format!("CONSUMER.CREATE.{stream}.{durable}.{filter}"))
            .js_api(format!("CONSUMER.INFO.{stream}.{durable}"))
            .js_api(format!("CONSUMER.MSG.NEXT.{stream}.{durable}"))
            .publish(format!("$JS.ACK.{stream}.{durable}.>"))
    }

    /// Ends the poison messages of `stream`: hears the max-deliveries advisories of
    /// `consumers` (a durable name or `*`), reads a message by its sequence, deletes it.
    pub fn poison_messages(&mut self, stream: &str, consumers: &str) -> &mut Self {
        self.subscribe(imagemesh_runtime::poison::advisory_subject(
            stream, consumers,
        ))
        .js_api(format!("STREAM.MSG.GET.{stream}"))
        .js_api(format!("STREAM.MSG.DELETE.{stream}"))
    }

    /// Publishes into a JetStream stream (the PubAck comes back to the inbox).
    pub fn stream_publish(&mut self, subject: impl Into<String>) -> &mut Self {
        self.publish(subject)
    }

    /// Reads keys matching `key` (a subject pattern) of KV bucket `bucket` (direct get).
    pub fn kv_read(&mut self, bucket: &str, key: &str) -> &mut Self {
        self.stream_info(&format!("KV_{bucket}"))
            .js_api(format!("DIRECT.GET.KV_{bucket}.$KV.{bucket}.{key}"))
    }

    /// Writes (puts, deletes, purges) keys matching `key` of KV bucket `bucket`.
    pub fn kv_write(&mut self, bucket: &str, key: &str) -> &mut Self {
        self.stream_info(&format!("KV_{bucket}"))
            .publish(format!("$KV.{bucket}.{key}"))
    }

    /// Watches every key of KV bucket `bucket` (an ordered push consumer into the inbox).
    /// An ordered consumer that lost its server (a NATS restart, a failover) deletes its old
    /// consumer and creates a new one by name (`CONSUMER.CREATE.<stream>.<name>.<filter>`); the
    /// names are random, so both grants are for any consumer of the bucket: a watcher reads
    /// every key anyway, and at worst makes another watcher of the same bucket recreate itself.
    pub fn kv_watch(&mut self, bucket: &str) -> &mut Self {
        let stream = format!("KV_{bucket}");
        self.stream_info(&stream)
            .js_api(format!("CONSUMER.CREATE.{stream}"))
            .js_api(format!("CONSUMER.CREATE.{stream}.*.$KV.{bucket}.>"))
            .js_api(format!("CONSUMER.DELETE.{stream}.*"))
            .publish(format!("$JS.FC.{stream}.>"))
    }

    /// Reads objects of object store `bucket`: the metadata by direct get, the chunks through
    /// an ordered consumer.
    pub fn object_read(&mut self, bucket: &str) -> &mut Self {
        let stream = format!("OBJ_{bucket}");
        self.stream_info(&stream)
            .js_api(format!("DIRECT.GET.{stream}.>"))
            .js_api(format!("STREAM.MSG.GET.{stream}"))
            .js_api(format!("CONSUMER.CREATE.{stream}"))
            .publish(format!("$JS.FC.{stream}.>"))
    }

    /// Writes and replaces objects of object store `bucket` (a replaced object's chunks are
    /// purged).
    pub fn object_write(&mut self, bucket: &str) -> &mut Self {
        let stream = format!("OBJ_{bucket}");
        self.stream_info(&stream)
            .js_api(format!("DIRECT.GET.{stream}.>"))
            .js_api(format!("STREAM.MSG.GET.{stream}"))
            .js_api(format!("STREAM.PURGE.{stream}"))
            .publish(format!("$O.{bucket}.>"))
    }

    /// Serves NATS micro service `name`: its endpoints plus `$SRV.PING/INFO/STATS` discovery,
    /// replying to what it receives.
    pub fn micro_service(&mut self, name: &str, endpoints: &[&str]) -> &mut Self {
        for verb in ["PING", "INFO", "STATS"] {
            self.subscribe(format!("$SRV.{verb}"))
                .subscribe(format!("$SRV.{verb}.{name}"))
                .subscribe(format!("$SRV.{verb}.{name}.*"));
        }
        for endpoint in endpoints {
            self.subscribe(*endpoint);
        }
        self.0.responds = true;
        self
    }
}
