//! Writer schemas of Avro input: the configured id -> file mapping, then the registry.
//!
//! Each partition task keeps its own [`SchemaStore`] (a writer schema is compiled into a decode
//! plan once per task); the registry client, with its cache, is shared.

use std::path::Path;
use std::time::Duration;

use crate::codec::avro::{SchemaError, SchemaStore};
use crate::codec::output::shipped_schema;
use crate::codec::registry::{RegistryClient, RegistryConfig, RegistryError};
use crate::codec::DecodeError;
use crate::config::SchemaSettings;

/// Where writer schemas come from.
#[derive(Debug)]
pub(crate) struct Schemas {
    /// (id, name, text) of the configured files, read once at start.
    files: Vec<(u32, String, String)>,
    registry: Option<RegistryClient>,
}

/// Why the configured schemas cannot be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SchemasError {
    /// A file is missing, unreadable or not a valid schema.
    #[error("schemas.files.\"{id}\": {source}")]
    File {
        /// The schema id it is mapped to.
        id: u32,
        /// What is wrong.
        source: SchemaError,
    },
    /// The registry settings are unusable.
    #[error("schemas.registry_url: {0}")]
    Registry(RegistryError),
}

impl Schemas {
    /// Reads every configured file (relative paths against `base`) and sets up the registry.
    pub(crate) fn load(settings: &SchemaSettings, base: &Path) -> Result<Self, SchemasError> {
        let mut files = Vec::new();
        let mut check = SchemaStore::new();
        for (id, path) in &settings.files {
            let text = match path.to_str().and_then(|path| path.strip_prefix("builtin:")) {
                Some(name) => shipped_schema(name)
                    .ok_or_else(|| SchemasError::File {
                        id: *id,
                        source: SchemaError::Parse {
                            name: path.display().to_string(),
                            message: "no such shipped schema".into(),
                        },
                    })?
                    .to_owned(),
                None => {
                    let path = base.join(path);
                    std::fs::read_to_string(&path).map_err(|source| SchemasError::File {
                        id: *id,
                        source: SchemaError::Read {
                            path: path.display().to_string(),
                            source,
                        },
                    })?
                }
            };
            let name = path.display().to_string();
            check
                .insert(*id, &name, &text)
                .map_err(|source| SchemasError::File { id: *id, source })?;
            files.push((*id, name, text));
        }
        let registry = match &settings.registry {
            None => None,
            Some(registry) => Some(
                RegistryClient::new(RegistryConfig {
                    username: registry.username.clone(),
                    password: registry.password.clone(),
                    timeout: registry.timeout,
                    retries: registry.retries,
                    ..RegistryConfig::new(registry.url.clone())
                })
                .map_err(SchemasError::Registry)?,
            ),
        };
        Ok(Schemas { files, registry })
    }

    /// A store holding the configured files.
    pub(crate) fn store(&self) -> Result<SchemaStore, SchemaError> {
        let mut store = SchemaStore::new();
        for (id, name, text) in &self.files {
            store.insert(*id, name, text)?;
        }
        Ok(store)
    }

    /// Adds schema `id` to `store` from the registry. An id the registry does not have (or
    /// that is not Avro) is the record's fault; an unreachable or refusing registry is not, so
    /// that is retried with backoff, holding this partition back, until it answers.
    pub(crate) async fn fetch(&self, store: &mut SchemaStore, id: u32) -> Result<(), DecodeError> {
        let Some(registry) = &self.registry else {
            return Err(DecodeError::UnknownSchema(id));
        };
        let mut backoff = Duration::from_secs(1);
        loop {
            match registry.schema(id).await {
                Ok(text) => {
                    return store
                        .insert(id, &format!("registry id {id}"), &text)
                        .map_err(|error| DecodeError::Avro(format!("writer schema {id}: {error}")));
                }
                Err(RegistryError::NotFound { .. } | RegistryError::NotAvro { .. }) => {
                    return Err(DecodeError::UnknownSchema(id));
                }
                Err(error) => {
                    tracing::error!(id, %error, retry_in_seconds = backoff.as_secs(), "schema registry unusable");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }
}
