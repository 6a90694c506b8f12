//! Installing the CRDs into a cluster: server-side apply with a stable field manager (safe
//! on upgrade), then waiting until the apiserver serves them.

use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::wait::{await_condition, conditions};

/// Field manager used for every object the hub applies.
pub const FIELD_MANAGER: &str = "shapeblock-hub";

/// Why the CRDs could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("applying CRD {name}: {source}")]
    Apply {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("CRD {name} was not Established within {timeout:?}")]
    NotEstablished { name: String, timeout: Duration },
    #[error("waiting for CRD {name}: {source}")]
    Wait {
        name: String,
        #[source]
        source: kube::runtime::wait::Error,
    },
}

/// Applies every ShapeBlock CRD and waits until each is Established.
pub async fn install(client: kube::Client, timeout: Duration) -> Result<(), InstallError> {
    let api: Api<CustomResourceDefinition> = Api::all(client);
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let crds = super::all();
    for crd in &crds {
        let name = crd.metadata.name.clone().unwrap_or_default();
        api.patch(&name, &params, &Patch::Apply(crd))
            .await
            .map_err(|source| InstallError::Apply {
                name: name.clone(),
                source,
            })?;
    }
    for crd in &crds {
        let name = crd.metadata.name.clone().unwrap_or_default();
        let established = await_condition(api.clone(), &name, conditions::is_crd_established());
        match tokio::time::timeout(timeout, established).await {
            Ok(Ok(_)) => {}
            Ok(Err(source)) => return Err(InstallError::Wait { name, source }),
            Err(_) => return Err(InstallError::NotEstablished { name, timeout }),
        }
    }
    Ok(())
}
