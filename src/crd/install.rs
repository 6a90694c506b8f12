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
///
/// The CRDs are applied at once, and a CRD the apply's answer shows Established (every one,
/// when the hub restarts) needs no wait: a cluster's install is then one round trip through its
/// tunnel instead of a dozen, which is what a fleet's reconnect storm queues on.
pub async fn install(client: kube::Client, timeout: Duration) -> Result<Installed, InstallError> {
    use futures_util::future::join_all;
    use kube::runtime::wait::Condition;
    static CRDS: std::sync::LazyLock<Vec<CustomResourceDefinition>> =
        std::sync::LazyLock::new(super::all);
    let api: Api<CustomResourceDefinition> = Api::all(client);
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let (api_ref, params) = (&api, &params);
    let answers = join_all(CRDS.iter().map(|crd| async move {
        let name = crd.metadata.name.as_deref().unwrap_or_default();
        api_ref.patch(name, params, &Patch::Apply(crd)).await
    }))
    .await;
    let mut teams_refused = None;
    let mut pending = vec![];
    for (crd, answer) in CRDS.iter().zip(answers) {
        let name = crd.metadata.name.clone().unwrap_or_default();
        match answer {
            Ok(applied) if conditions::is_crd_established().matches_object(Some(&applied)) => {}
            Ok(_) => pending.push(name),
            Err(kube::Error::Api(e)) if e.code == 403 && name == TEAMS_CRD => {
                teams_refused = Some(e.message);
            }
            Err(source) => return Err(InstallError::Apply { name, source }),
        }
    }
    let waits = pending.into_iter().map(|name| {
        let api = api.clone();
        async move {
            let established = await_condition(api, &name, conditions::is_crd_established());
            let waited = tokio::time::timeout(timeout, established).await;
            match waited {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(source)) => Err(InstallError::Wait { name, source }),
                Err(_) => Err(InstallError::NotEstablished { name, timeout }),
            }
        }
    });
    join_all(waits)
        .await
        .into_iter()
        .collect::<Result<Vec<()>, _>>()?;
    Ok(Installed { teams_refused })
}
