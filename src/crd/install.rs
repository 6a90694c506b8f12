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

/// The CRD of Teams, which an agent installed from a manifest older than Teams may not apply.
pub const TEAMS_CRD: &str = "teams.apps.shapeblock.io";

/// What [`install`] installed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Installed {
    /// Why the Team CRD was not installed: the apiserver refused it to an agent whose install
    /// manifest predates Teams (everything else works; Teams wait for the manifest). None:
    /// installed.
    pub teams_refused: Option<String>,
}

/// Applies every ShapeBlock CRD and waits until each is Established. A refusal (403) of the
/// Team CRD alone is not an error: [`Installed::teams_refused`] says so.
pub async fn install(client: kube::Client, timeout: Duration) -> Result<Installed, InstallError> {
    let api: Api<CustomResourceDefinition> = Api::all(client);
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let mut crds = super::all();
    let mut teams_refused = None;
    let mut applied = Vec::with_capacity(crds.len());
    for crd in crds.drain(..) {
        let name = crd.metadata.name.clone().unwrap_or_default();
        match api.patch(&name, &params, &Patch::Apply(&crd)).await {
            Ok(_) => applied.push(crd),
            Err(kube::Error::Api(e)) if e.code == 403 && name == TEAMS_CRD => {
                teams_refused = Some(e.message);
            }
            Err(source) => {
                return Err(InstallError::Apply {
                    name: name.clone(),
                    source,
                });
            }
        }
    }
    let crds = applied;
    for crd in &crds {
        let name = crd.metadata.name.clone().unwrap_or_default();
        let established = await_condition(api.clone(), &name, conditions::is_crd_established());
        match tokio::time::timeout(timeout, established).await {
            Ok(Ok(_)) => {}
            Ok(Err(source)) => return Err(InstallError::Wait { name, source }),
            Err(_) => return Err(InstallError::NotEstablished { name, timeout }),
        }
    }
    Ok(Installed { teams_refused })
}
