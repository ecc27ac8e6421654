//! The network config key (`<prefix>/config`, flannel's): reading it,
//! writing it once (`netd registry init`), and the errors that name it.
//! Acquiring and the watch read the config too, so its errors are shared
//! from here.

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use netd_model::flannel;

use super::rpc::rpc;
use super::EtcdRegistry;
use crate::{NetworkConfig, Registry, RegistryError};

impl EtcdRegistry {
    /// Writes the network config unless one is there: an equal one (parsed,
    /// whatever its spelling) is fine, a different one is
    /// [`RegistryError::BadConfig`]. flannel's operators write this key by
    /// hand; this is the `netd registry init` of the etcd backend.
    pub async fn put_network_config(&mut self, config: &NetworkConfig) -> Result<(), RegistryError> {
        config.check()?;
        let key = self.keys.config.clone();
        let json = flannel::network_config_json(config);
        let txn = Txn::new()
            .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), json.clone(), None)])
            .or_else([TxnOp::get(key.clone(), None)]);
        let what = format!("writing {key}");
        let response = rpc(&self.endpoints, &what, self.kv.txn(txn)).await?;
        if response.succeeded() {
            self.config = Some(*config);
            return Ok(());
        }
        let existing = self.network_config().await?;
        if existing != *config {
            return Err(RegistryError::BadConfig(format!(
                "{key} already holds {}, not {json}",
                flannel::network_config_json(&existing)
            )));
        }
        Ok(())
    }

    /// [`Registry::network_config`]: reads the config key, and remembers it
    /// for renewing and for the watch.
    pub(super) async fn read_network_config(&mut self) -> Result<NetworkConfig, RegistryError> {
        let key = self.keys.config.clone();
        let what = format!("reading {key}");
        let response = rpc(&self.endpoints, &what, self.kv.get(key.clone(), None)).await?;
        let kv = response.kvs().first().ok_or_else(|| missing_config(&key, &self.endpoints))?;
        let config = flannel::parse_network_config(kv.value()).map_err(|e| config_error(&key, e.into()))?;
        self.config = Some(config);
        Ok(config)
    }
}

pub(super) fn missing_config(key: &str, endpoints: &str) -> RegistryError {
    RegistryError::BadConfig(format!(
        "etcd {endpoints} holds no {key}; write flannel's network config there, e.g. \
         {{\"Network\":\"10.244.0.0/16\",\"SubnetLen\":24,\"Backend\":{{\"Type\":\"vxlan\",\"VNI\":1}}}}"
    ))
}

pub(super) fn config_error(key: &str, error: RegistryError) -> RegistryError {
    match error {
        RegistryError::BadConfig(reason) => RegistryError::BadConfig(format!("{key}: {reason}")),
        other => other,
    }
}
