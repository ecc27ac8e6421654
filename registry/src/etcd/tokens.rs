//! Bootstrap tokens in etcd (`bootstrap-tokens/<id>`): the [`TokenStore`]
//! of this backend, each record on an etcd lease that ends when the token
//! expires so etcd drops it by itself. Apart from the subnet registry, as
//! it shares only the client and the prefix.
//!
//! [`TokenStore`]: crate::TokenStore

use std::time::{SystemTime, UNIX_EPOCH};

use etcd_client::{GetOptions, PutOptions};

use super::rpc::rpc;
use super::EtcdRegistry;
use crate::RegistryError;

impl EtcdRegistry {
    fn token_key(&self, id: &str) -> Result<String, RegistryError> {
        if id.is_empty() || id.contains('/') {
            return Err(RegistryError::Refused {
                what: format!("naming bootstrap token {id:?}"),
                reason: "a token id must be non-empty and without '/'".into(),
            });
        }
        Ok(format!("{}{id}", self.keys.tokens))
    }
}

impl crate::TokenStore for EtcdRegistry {
    async fn put_token(&mut self, record: &crate::TokenRecord) -> Result<(), RegistryError> {
        let key = self.token_key(&record.id)?;
        let what = format!("writing {key}");
        let options = match record.expires_at {
            None => None,
            Some(at) => {
                let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
                let ttl = i64::try_from(at.saturating_sub(now).max(1)).unwrap_or(i64::MAX);
                let lease = rpc(&self.endpoints, &what, self.leases.grant(ttl, None)).await?;
                Some(PutOptions::new().with_lease(lease.id()))
            }
        };
        rpc(&self.endpoints, &what, self.kv.put(key.clone(), record.to_json(), options)).await?;
        Ok(())
    }

    async fn token(&mut self, id: &str) -> Result<Option<crate::TokenRecord>, RegistryError> {
        let key = self.token_key(id)?;
        let what = format!("reading {key}");
        let response = rpc(&self.endpoints, &what, self.kv.get(key.clone(), None)).await?;
        response
            .kvs()
            .first()
            .map(|kv| crate::TokenRecord::from_json(id, kv.value()).map_err(crate::tokens::bad_record))
            .transpose()
    }

    async fn tokens(&mut self) -> Result<Vec<crate::TokenRecord>, RegistryError> {
        let prefix = self.keys.tokens.clone();
        let what = format!("listing {prefix}");
        let response =
            rpc(&self.endpoints, &what, self.kv.get(prefix.clone(), Some(GetOptions::new().with_prefix()))).await?;
        let mut records = Vec::new();
        for kv in response.kvs() {
            let id = String::from_utf8_lossy(kv.key()).strip_prefix(&prefix).unwrap_or_default().to_string();
            match crate::TokenRecord::from_json(&id, kv.value()) {
                Ok(record) => records.push(record),
                Err(error) => tracing::warn!("etcd at {}: skipping: {error}", self.endpoints),
            }
        }
        Ok(records)
    }

    async fn delete_token(&mut self, id: &str) -> Result<bool, RegistryError> {
        let key = self.token_key(id)?;
        let what = format!("deleting {key}");
        let response = rpc(&self.endpoints, &what, self.kv.delete(key.clone(), None)).await?;
        Ok(response.deleted() > 0)
    }
}
