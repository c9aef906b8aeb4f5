//! Dockerfile builds: context, credentials, `buildah bud` in the build sandbox, `buildah push`,
//! in a private build directory that is removed on every path.

use std::time::Duration;

use async_nats::jetstream;
use imagemesh_proto::TenantRequest;
use imagemesh_proto::v1::{AuthScheme, BuildOptions, ContainerRequest, RegistryCredential};
use imagemesh_registry::dockerfile::base_images;
use imagemesh_registry::{Reference, RegistryClient, RegistrySettings, credential_for_image, host};
use imagemesh_runtime::ErrorCode;
use imagemesh_runtime::status::{StatusReporter, Step};
use tokio::time::Instant;

use crate::buildah::{BudSpec, Buildah, BuildahError, BuildahFiles};
use crate::config::BuilderConfig;
use crate::failure::Failure;
use crate::log::BuildLog;
use crate::sandbox::{BuildSandbox, Sandbox};
use crate::workdir::WorkDir;
use crate::{auth, base_pull, build_args, context, history, layout_push};

/// One Dockerfile build of one request.
pub struct DockerfileBuild<'a> {
    pub settings: &'a BuilderConfig,
    /// Where `RUN` steps run (`sandbox.rs`).
    pub sandbox: &'a Sandbox,
    /// Where the request's tenant's build contexts are.
    pub js: &'a jetstream::Context,
    pub status: &'a StatusReporter,
    pub log: &'a BuildLog,
    pub request: &'a ContainerRequest,
    /// The build registry, with the request's build token, and where the image goes there.
    pub target_client: &'a RegistryClient,
    pub target: &'a Reference,
}

/// When a build must be done, and the limit its failure names when it is not.
#[derive(Debug, Clone, Copy)]
struct Deadline {
    at: Instant,
    limit: Duration,
}

/// A base image whose registry wants a bearer token: fetched in-process, not by buildah.
struct BearerBase<'a> {
    image: Reference,
    credential: &'a RegistryCredential,
}

impl DockerfileBuild<'_> {
    /// Builds and pushes to `request.build_image_ref`; returns the pushed manifest digest.
    pub async fn run(&self) -> Result<String, Failure> {
        let dir = WorkDir::create(&self.settings.storage_dir, &self.request.request_id)
            .map_err(|e| Failure::internal(format!("cannot create a build directory: {e}")))?;
        // Dropped before the directory, also when this future is: it removes the containers
        // the build left running.
        let result = match self
            .sandbox
            .enter(&self.request.tenant, dir.runtime_state())
        {
            Ok(sandbox) => self.run_in(&dir, &sandbox).await,
            Err(e) => Err(Failure::internal(e)),
        };
        dir.remove().await;
        result
    }

    async fn run_in(&self, dir: &WorkDir, sandbox: &BuildSandbox<'_>) -> Result<String, Failure> {
        let options = self.request.build_options.clone().unwrap_or_default();
        let limit = self.settings.timeout(options.timeout_seconds);
        let deadline = Deadline {
            at: Instant::now() + limit,
            limit,
        };
        let id = self.request.key();
        let mut build_args: Vec<_> = options.build_args.clone().into_iter().collect();
        build_args.sort();
        build_args::check(&build_args)
            .map_err(|e| Failure::reject(ErrorCode::MalformedRequest, e))?;
        if !options.context_object.is_empty() {
            let bytes = self.fetch_context(dir, &options.context_object).await?;
            let step = Step::running("context-fetched", format!("build context {bytes} bytes"))
                .detail("context_object", &options.context_object)
                .detail("bytes", bytes);
            self.status.report(id, step).await;
        }
        let dockerfile = dir.private().join("Dockerfile");
        std::fs::write(&dockerfile, &options.dockerfile)
            .map_err(|e| Failure::internal(format!("cannot write the Dockerfile: {e}")))?;
        let (buildah, bearer_bases) = self.buildah(dir, sandbox, &options)?;
        for (n, base) in bearer_bases.iter().enumerate() {
            self.store_bearer_base(&buildah, dir, n, base, deadline)
                .await?;
        }

        let tag = format!("localhost/imagemesh-build:{}", self.request.image_id);
        let spec = BudSpec {
            dockerfile: &dockerfile,
            context: &dir.context(),
            tag: &tag,
            build_args: build_args.clone(),
        };
        self.status
            .report(id, Step::running("building", "buildah bud"))
            .await;
        buildah
            .bud(&spec, self.log, deadline.at)
            .await
            .map_err(|e| self.bud_failure(e, deadline.limit, sandbox))?;
        self.status
            .report(id, Step::running("built", "image built"))
            .await;

        // buildah writes an OCI layout, pushed from here: a bearer token cannot go to buildah,
        // and the history must lose the build arguments' values first (`history.rs`).
        let layout = dir.private().join("layout");
        let destination = format!("oci:{}:latest", layout.display());
        buildah
            .push(&tag, &destination, self.log, deadline.at)
            .await
            .map_err(|e| self.build_failure(e, deadline.limit))?;
        if history::redact_layout(&layout, &build_args)? {
            self.log
                .line("build argument values removed from the image history")
                .await;
        }
        let push = layout_push::push_layout(&layout, self.target_client, self.target, self.log);
        self.within(deadline, push).await
    }

    /// `work`, or a timed-out build failure when the deadline passes first.
    async fn within<T>(
        &self,
        deadline: Deadline,
        work: impl Future<Output = Result<T, Failure>>,
    ) -> Result<T, Failure> {
        tokio::time::timeout_at(deadline.at, work)
            .await
            .unwrap_or_else(|_| Err(self.build_failure(BuildahError::TimedOut, deadline.limit)))
    }

    async fn fetch_context(&self, dir: &WorkDir, name: &str) -> Result<u64, Failure> {
        let limit = self.settings.max_context_bytes;
        let archive = dir.private().join("context.tar");
        let tenant = &self.request.tenant;
        let bytes = context::fetch(self.js, tenant, name, &archive, limit).await?;
        let into = dir.context();
        tokio::task::spawn_blocking(move || context::unpack(&archive, &into, limit))
            .await
            .map_err(|e| Failure::internal(format!("context unpacking stopped: {e}")))??;
        Ok(bytes)
    }

    /// Fetches a base image whose registry wants a bearer token and stores it in the build's
    /// storage under its own name (`base_pull.rs`), so buildah uses it without pulling.
    async fn store_bearer_base(
        &self,
        buildah: &Buildah<'_>,
        dir: &WorkDir,
        n: usize,
        base: &BearerBase<'_>,
        deadline: Deadline,
    ) -> Result<(), Failure> {
        let credential = base.credential;
        let client = RegistryClient::new(
            &credential.registry,
            Some(credential),
            &self.settings.registry,
        );
        let layout = dir.private().join(format!("base-{n}"));
        let fetch = base_pull::fetch_to_layout(&client, &base.image, &layout, self.log);
        let image_id = self.within(deadline, fetch).await?;
        let name = base.image.whole();
        let tag = base_pull::LAYOUT_TAG;
        buildah
            .store_layout(&layout, tag, &image_id, &name, self.log, deadline.at)
            .await
            .map_err(|e| self.build_failure(e, deadline.limit))?;
        let _ = tokio::fs::remove_dir_all(&layout).await;
        Ok(())
    }

    /// buildah with an auth file holding the credential of every registry the build talks to:
    /// the build registry (push) and each base image's registry (pull). Base images whose
    /// credential is a bearer token are returned instead: they are fetched in-process.
    fn buildah<'d>(
        &'d self,
        dir: &'d WorkDir,
        sandbox: &'d BuildSandbox<'d>,
        options: &BuildOptions,
    ) -> Result<(Buildah<'d>, Vec<BearerBase<'d>>), Failure> {
        let build_registry = self.build_credential()?;
        let mut credentials = vec![build_registry];
        let mut registries = vec![host::normalize(&build_registry.registry)];
        let mut bearer_bases = Vec::new();
        for base in base_images(&options.dockerfile, &options.build_args) {
            let registry = host::normalize(base.registry());
            match credential_for_image(self.request, &registry, base.repository()) {
                Some(credential) if credential.scheme() == AuthScheme::Bearer => {
                    // A bearer token is scoped to one repository; another's would be refused.
                    let covers = credential
                        .scope
                        .as_ref()
                        .is_some_and(|s| s.repository == base.repository());
                    if !covers {
                        return Err(Failure::reject(
                            ErrorCode::NoCredentials,
                            format!(
                                "the base image {} is in a registry that wants a bearer token, \
                                 and the request carries none for its repository",
                                base.whole()
                            ),
                        ));
                    }
                    bearer_bases.push(BearerBase {
                        image: base,
                        credential,
                    });
                }
                Some(credential) => credentials.push(credential),
                None => {}
            }
            registries.push(registry);
        }
        let files = BuildahFiles {
            auth_file: dir.private().join("auth.json"),
            registries_conf: dir.private().join("registries.conf"),
            containers_conf: dir.private().join("containers.conf"),
        };
        auth::write_auth_file(&files.auth_file, &credentials)
            .map_err(|e| Failure::internal(format!("cannot write the registry auth file: {e}")))?;
        let insecure = insecure(&self.settings.registry, registries);
        auth::write_registries_conf(&files.registries_conf, &insecure)
            .map_err(|e| Failure::internal(format!("cannot write registries.conf: {e}")))?;
        auth::write_private(&files.containers_conf, sandbox.containers_conf().as_bytes())
            .map_err(|e| Failure::internal(format!("cannot write containers.conf: {e}")))?;
        let buildah = Buildah::new(self.settings, dir, sandbox, files);
        Ok((buildah, bearer_bases))
    }

    fn build_credential(&self) -> Result<&RegistryCredential, Failure> {
        self.request.build_registry_creds.as_ref().ok_or_else(|| {
            Failure::reject(
                ErrorCode::NoCredentials,
                "request carries no build_registry_creds",
            )
        })
    }

    fn build_failure(&self, err: BuildahError, timeout: Duration) -> Failure {
        match err {
            BuildahError::TimedOut => Failure::build(format!(
                "build exceeded its time limit of {}s and was stopped",
                timeout.as_secs()
            )),
            BuildahError::Failed { error_line, .. } => Failure::build(format!(
                "build failed: {error_line}\nlast lines of the build log:\n{}",
                self.log.tail().join("\n")
            )),
            BuildahError::Spawn(e) => Failure::internal(format!("cannot run buildah: {e}")),
        }
    }

    /// A failed `bud`; when a `RUN` step failed, the message says what its sandbox allowed.
    fn bud_failure(&self, err: BuildahError, timeout: Duration, sandbox: &BuildSandbox) -> Failure {
        match err {
            BuildahError::Failed { error_line, .. } if error_line.contains("at STEP \"RUN ") => {
                Failure::build(format!(
                    "build failed: {error_line}\n{}\nlast lines of the build log:\n{}",
                    sandbox.describe(),
                    self.log.tail().join("\n")
                ))
            }
            other => self.build_failure(other, timeout),
        }
    }
}

/// Registries whose HTTP is plain: loopback ones and those configured insecure.
fn insecure(settings: &RegistrySettings, registries: Vec<String>) -> Vec<String> {
    let mut insecure: Vec<String> = registries
        .into_iter()
        .filter(|r| settings.is_insecure(r))
        .collect();
    insecure.extend(settings.insecure.iter().map(|r| host::normalize(r)));
    insecure.sort();
    insecure.dedup();
    insecure
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_and_configured_registries_are_insecure() {
        let settings = RegistrySettings {
            insecure: vec!["lab.internal:5000".into()],
            ..Default::default()
        };
        let found = insecure(&settings, vec!["127.0.0.1:5000".into(), "docker.io".into()]);
        assert_eq!(found, vec!["127.0.0.1:5000", "lab.internal:5000"]);
    }
}
